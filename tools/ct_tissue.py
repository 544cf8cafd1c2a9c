"""ct_tissue_composition: lung, fat, soft tissue and bone inside the body of a CT image, by HU range.

Hounsfield ranges (the conventional thresholds of CT body-composition work, e.g. adipose tissue
-190..-30 HU as in Kvist et al., Am J Clin Nutr 1988, and Mourtzakis et al., Appl Physiol Nutr
Metab 2008; lung parenchyma -900..-500 HU as in lung densitometry):

    lung          -900 <= HU < -500
    fat           -190 <= HU <= -30
    soft_tissue    -30 <  HU <= 150   (muscle, organs, fluid, unenhanced vessels)
    bone                  HU > 300    (cortical and dense trabecular bone, calcification, contrast)

Air (< -900 HU) is only meaningful outside the body and is not reported; voxels between the ranges
(-500..-190, 150..300) stay unclassified, so the fractions sum to at most 1.

Body mask: HU > -500, a small opening to detach the table, the largest connected component, and
holes filled slice by slice, which brings the lungs and airways (enclosed by the body wall) in.
Areas are mm² (2D) and volumes mL (3D) when the spacing is known, else pixel/voxel counts.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from agent.analysis.ct import HU_RANGES, body_mask, tissue_masks
from agent.analysis.display import looks_like_hu, to_uint8
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, Measurement, Tool, ToolContext, ToolError, ToolInput

_COLOURS = {"lung": (60, 140, 255), "fat": (255, 220, 0), "soft_tissue": (230, 60, 60), "bone": (255, 255, 255)}
_ALPHA = 0.45


class TissueAmount(BaseModel):
    label: str  # "fat (HU -190..-30)"
    amount: float  # in `unit`
    unit: str  # "mm2", "mL", "px2", "voxels"
    pixels: int
    fraction_of_body: float
    mean_hu: float | None


class CTTissueOutput(BaseModel):
    body_amount: float
    unit: str
    body_pixels: int
    tissues: dict[str, TissueAmount]
    soft_tissue_mean_hu: float | None
    spacing_known: bool
    body_touches_edge: bool  # the field of view cuts through the body
    overlay_slice: int | None = None  # for volumes: the slice shown in the overlay
    note: str = ""


class CTTissueComposition(Tool):
    name = "ct_tissue_composition"
    description = "Lung, fat, soft-tissue and bone area/volume and fractions inside the body on CT, by HU ranges."
    kind = "measure"
    modalities = frozenset({"CT"})
    subjects = ("fat", "bone", "lung", "soft tissue", "air", "area", "volume", "fraction_of_body", "mean_hu")
    topics = ("tissue", "fat", "lung", "bone", "composition", "hounsfield", "hu", "body")
    Input = ToolInput
    Output = CTTissueOutput

    def applicable(self, view: ImageView) -> str | None:
        if view.photometric == "RGB":
            return f"{self.name} needs a gray CT image in HU; {view.id} is RGB"
        return super().applicable(view)

    def run(self, ctx: ToolContext, inp: ToolInput) -> CTTissueOutput:
        view = self.usable_view(ctx, inp.view)
        hu = ctx.pixels(inp.view).astype(np.float32, copy=False)
        if not looks_like_hu(hu):
            raise ToolError(
                f"values are not Hounsfield units (min {float(hu.min()):.4g}, max {float(hu.max()):.4g}); "
                "this needs a CT in HU, not a windowed or exported image"
            )
        body = body_mask(hu)
        n_body = int(body.sum())
        if n_body == 0:
            raise ToolError("no body found (nothing above -500 HU)")
        three_d = hu.ndim == 3
        if view.spacing_known:
            unit_size = float(np.prod(view.spacing_mm)) / (1000.0 if three_d else 1.0)
            unit = "mL" if three_d else "mm2"
        else:
            unit_size, unit = 1.0, "voxels" if three_d else "px2"
        masks = {k: m & body for k, m in tissue_masks(hu).items()}
        tissues = {}
        for k, m in masks.items():
            n = int(m.sum())
            tissues[k] = TissueAmount(
                label=f"{k.replace('_', ' ')} (HU {HU_RANGES[k]})", amount=round(n * unit_size, 3), unit=unit,
                pixels=n, fraction_of_body=round(n / n_body, 5), mean_hu=round(float(hu[m].mean()), 2) if n else None,
            )
        edge = np.zeros(body.shape[-2:], dtype=bool)
        edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
        touches = bool((body & edge).any())  # broadcasts over the slices of a volume
        note = "the body runs off the image edge (cropped field of view): lung open to the edge is not counted" \
            if touches else ""
        k_slice = int(np.argmax(body.reshape(body.shape[0], -1).sum(1))) if three_d else None
        pick = (lambda a: a[k_slice]) if three_d else (lambda a: a)
        rgb = np.repeat(to_uint8(pick(hu), -160.0, 240.0)[..., None], 3, axis=-1).astype(np.float32)
        for k, m in masks.items():
            sel = pick(m)
            rgb[sel] = (1 - _ALPHA) * rgb[sel] + _ALPHA * np.array(_COLOURS[k], dtype=np.float32)
        where = f" slice {k_slice}" if three_d else ""
        ctx.save_png(rgb.round().astype(np.uint8), kind="overlay",
                     description=f"{view.id}{where}: lung blue, fat yellow, soft tissue red, bone white")
        ctx.save_mask(body, description=f"{view.id}: body mask (HU > -500, holes filled)", legend={1: "body"},
                      view=view.id)
        labels = np.zeros(hu.shape, dtype=np.uint8)
        for i, m in enumerate(masks.values(), 1):
            labels[m] = i
        ctx.save_mask(labels, description=f"{view.id}: tissue labels 1 lung, 2 fat, 3 soft tissue, 4 bone",
                      legend={i: k.replace("_", " ") for i, k in enumerate(masks, 1)}, view=view.id)
        return CTTissueOutput(
            body_amount=round(n_body * unit_size, 3), unit=unit, body_pixels=n_body, tissues=tissues,
            soft_tissue_mean_hu=tissues["soft_tissue"].mean_hu, spacing_known=view.spacing_known,
            body_touches_edge=touches, overlay_slice=k_slice, note=note,
        )

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, CTTissueOutput)
        name = "volume" if output.unit in ("mL", "voxels") else "area"
        out = []
        for t in output.tissues.values():
            ms = [Measurement(name=name, value=t.amount, unit=t.unit),
                  Measurement(name="fraction_of_body", value=round(100 * t.fraction_of_body, 2), unit="%")]
            if t.mean_hu is not None:
                ms.append(Measurement(name="mean_hu", value=t.mean_hu, unit="HU"))
            notes = [] if output.spacing_known else ["pixel spacing unknown: amounts are pixel counts"]
            note = "; ".join(notes + ([output.note] if output.note else []))
            out.append(FindingDraft(label=t.label, present=None, location="body", measurements=ms, note=note))
        return out

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, CTTissueOutput)
        parts = ", ".join(f"{k} {100 * t.fraction_of_body:.0f}%" for k, t in output.tissues.items())
        return f"body {output.body_amount:g} {output.unit}: {parts}; soft tissue mean {output.soft_tissue_mean_hu} HU"
