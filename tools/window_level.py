"""window_level: a new view holding a gray image windowed to 0..1 (linear, clipped), plus a preview PNG.

Presets are the usual CT windows in Hounsfield units (center/width): lung -600/1500,
mediastinum 40/400, bone 400/1800, brain 40/80, abdomen 60/400, liver 60/160. "auto" takes the
DICOM WindowCenter/WindowWidth when the file had them, else the 1st..99th percentile range, and
works for any gray modality. An explicit center or width overrides the preset's value.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from agent.analysis.display import display_slice, is_rgb, looks_like_hu
from agent.core.state import ImageView
from agent.core.tool import Tool, ToolContext, ToolError, ToolInput

PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 160.0),
}


class WindowInput(ToolInput):
    preset: Literal["lung", "mediastinum", "bone", "brain", "abdomen", "liver", "auto"] = Field(
        "auto", description="CT window preset in HU; 'auto' uses the file's window or the 1st..99th percentiles"
    )
    center: float | None = Field(None, description="window center in image units (overrides the preset)")
    width: float | None = Field(None, gt=0, description="window width in image units (overrides the preset)")


class WindowOutput(BaseModel):
    new_view: str
    center: float
    width: float
    preset: str
    source: str  # "preset", "dicom", "percentiles", "user"
    fraction_below: float  # share of pixels clipped to 0
    fraction_above: float  # share of pixels clipped to 1


def _first(v: object) -> float | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return float(v) if isinstance(v, int | float) else None


class WindowLevel(Tool):
    name = "window_level"
    description = "Window a gray image (CT presets lung/mediastinum/bone/brain/abdomen/liver, or auto) into a new view."
    kind = "view"
    topics = ("window", "contrast")
    Input = WindowInput
    Output = WindowOutput

    def applicable(self, view: ImageView) -> str | None:
        if is_rgb(view):
            return f"{self.name} needs a grayscale image; {view.id} is RGB"
        return super().applicable(view)

    def run(self, ctx: ToolContext, inp: WindowInput) -> WindowOutput:
        view = self.usable_view(ctx, inp.view)
        arr = ctx.pixels(inp.view).astype(np.float32, copy=False)
        if inp.preset != "auto":
            if not looks_like_hu(arr):
                raise ToolError(
                    f"preset '{inp.preset}' is in Hounsfield units but {view.id} ({view.modality}) is not in HU; "
                    "use preset 'auto' or give center and width"
                )
            center, width = PRESETS[inp.preset]
            source = "preset"
        else:
            center, width = _first(view.metadata.get("WindowCenter")), _first(view.metadata.get("WindowWidth"))
            source = "dicom"
            if center is None or width is None or width <= 0:
                p1, p99 = (float(v) for v in np.percentile(arr, [1, 99]))
                center, width, source = (p1 + p99) / 2, max(p99 - p1, 1e-6), "percentiles"
        if inp.center is not None or inp.width is not None:
            center = inp.center if inp.center is not None else center
            width = inp.width if inp.width is not None else width
            source = "user"
        lo = center - width / 2
        out = np.clip((arr - np.float32(lo)) / np.float32(width), 0.0, 1.0).astype(np.float32)
        below, above = float(np.mean(arr < lo)), float(np.mean(arr > lo + width))
        meta = {k: v for k, v in view.metadata.items() if k not in ("WindowCenter", "WindowWidth")}
        meta["value_range"] = "0..1 (windowed)"
        new = ctx.add_view(
            out, parent=view,
            provenance={"tool": self.name, "center": center, "width": width, "preset": inp.preset},
            metadata=meta,
        )
        preview = (display_slice(out, False) * 255).round().astype(np.uint8)
        ctx.save_png(preview, kind="preview", description=f"{view.id} windowed C={center:g} W={width:g} ({new.id})")
        return WindowOutput(
            new_view=new.id, center=center, width=width, preset=inp.preset, source=source,
            fraction_below=round(below, 6), fraction_above=round(above, 6),
        )

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, WindowOutput)
        return (
            f"{output.new_view}: window C={output.center:g} W={output.width:g} ({output.preset}, {output.source}); "
            f"{100 * output.fraction_below:.0f}% below, {100 * output.fraction_above:.0f}% above"
        )
