"""crop_zoom: crop a box of a view and enlarge it (bilinear) into a new view for a closer look.

Volumes are cropped in-plane on every slice. The zoom is lowered, and the output says so, when
the result would exceed `MAX_SIDE` pixels a side or `_MAX_OUT_VOXELS` in all.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field
from skimage.transform import rescale

from agent.analysis.display import bbox_to_px, display_slice, is_rgb, to_uint8
from agent.core.tool import Tool, ToolContext, ToolError, ToolInput
from agent.imaging.loaders import MAX_SIDE

_MAX_OUT_VOXELS = 64_000_000


class CropZoomInput(ToolInput):
    bbox: list[float] = Field(
        ..., min_length=4, max_length=4,
        description="[row0, col0, row1, col1] in pixels of the view (end exclusive), "
        "or fractions of the height/width when all four numbers lie in [0, 1]",
    )
    zoom: float = Field(2.0, ge=1.0, le=8.0, description="enlargement factor (bilinear), 1..8")


class CropZoomOutput(BaseModel):
    new_view: str
    parent: str
    bbox_px: list[int]  # [row0, col0, row1, col1] in the parent's pixels, end exclusive
    zoom: float  # the zoom applied
    zoom_requested: float
    shape: list[int]
    spacing_mm: list[float] | str


class CropZoom(Tool):
    name = "crop_zoom"
    description = "Crop a box ([row0, col0, row1, col1], pixels or fractions) and enlarge it into a new view."
    kind = "view"
    topics = ("zoom", "crop", "closer look", "region")
    Input = CropZoomInput
    Output = CropZoomOutput

    def run(self, ctx: ToolContext, inp: CropZoomInput) -> CropZoomOutput:
        view = ctx.view(inp.view)
        arr = ctx.pixels(inp.view)
        rgb = is_rgb(view)
        h, w = arr.shape[:2] if rgb else arr.shape[-2:]
        try:
            r0, c0, r1, c1 = bbox_to_px(inp.bbox, h, w)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        crop = arr[r0:r1, c0:c1] if rgb or arr.ndim == 2 else arr[:, r0:r1, c0:c1]
        ch, cw = r1 - r0, c1 - c0
        n_planes = 1 if rgb or arr.ndim == 2 else arr.shape[0]
        zoom = min(inp.zoom, MAX_SIDE / max(ch, cw), (_MAX_OUT_VOXELS / (n_planes * ch * cw)) ** 0.5)
        zoom = max(1.0, zoom)
        if zoom > 1.0:
            scale = (zoom, zoom) if rgb or arr.ndim == 2 else (1.0, zoom, zoom)
            out = rescale(crop.astype(np.float32), scale, order=1, preserve_range=True, anti_aliasing=False,
                          channel_axis=-1 if rgb else None)
        else:
            out = crop.astype(np.float32)
        out = out.round().clip(0, 255).astype(np.uint8) if rgb else out.astype(np.float32)
        oh, ow = out.shape[:2] if rgb else out.shape[-2:]
        spacing = view.spacing_mm
        if view.spacing_known:
            spacing = (*view.spacing_mm[:-2], view.spacing_mm[-2] * ch / oh, view.spacing_mm[-1] * cw / ow)
        new = ctx.add_view(
            out, parent=view,
            provenance={"tool": self.name, "bbox_px": [r0, c0, r1, c1], "zoom": zoom, "parent": view.id},
            spacing_mm=spacing,
        )
        pic = display_slice(out, rgb)
        ctx.save_png(pic if rgb else to_uint8(pic), kind="preview",
                     description=f"{view.id} rows {r0}:{r1}, cols {c0}:{c1} ×{zoom:.3g} ({new.id})")
        return CropZoomOutput(
            new_view=new.id, parent=view.id, bbox_px=[r0, c0, r1, c1], zoom=round(zoom, 4), zoom_requested=inp.zoom,
            shape=list(out.shape), spacing_mm=list(spacing) if view.spacing_known else "unknown",
        )

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, CropZoomOutput)
        r0, c0, r1, c1 = output.bbox_px
        return (
            f"{output.new_view}: rows {r0}:{r1}, cols {c0}:{c1} of {output.parent} ×{output.zoom:g} "
            f"-> {'×'.join(map(str, output.shape))}"
        )
