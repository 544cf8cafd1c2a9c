"""cardiothoracic_ratio: cardiac width / thoracic width on a frontal chest radiograph (DX/CR).

Method: the lung fields of `tools.cxr_lungs.segment_lungs` (classical CLAHE + watershed), then

* thoracic width: the widest image row across both lungs' outer (lateral) borders, which approximate
  the inner rib margins;
* cardiac width (Danzer: MRD + MLD): from the most lateral point of the right heart border to that of
  the left heart border, the two points possibly on different rows. A heart border is a lung's medial
  border searched from 60 % of the lung's craniocaudal extent (below the hilum) down to its base (the
  last row at least 40 % as wide as the lung's widest row, and no lower than 85 % of its extent),
  keeping only points with lung below them (the lung column just lateral of the point goes on down at
  least 3 % of the image height): beside the heart the lung runs on down to the diaphragm, where the
  medial border follows the diaphragm dome it does not.

CTR = cardiac width / thoracic width; above 0.5 on a PA film suggests cardiomegaly. AP films
(portable, supine) magnify the heart and overestimate the CTR, so there 0.5 is not reliable evidence.
The projection comes from the DICOM ViewPosition when present, else the `projection` input, else it is
unknown (the threshold then assumes PA). Widths are mm when the pixel spacing is known, else px; the
ratio needs no spacing. A CTR outside 0.25..0.8 is refused as a segmentation failure, not reported.

Validation (bench/bench_cxr_measure.py, 52 frontal realcases CXR: xrv_tests, actualmed_covid_cxr,
covid_chestxray): a CTR on 39 (the rest refused: lungs not found, or no heart border off the
diaphragm); the one NIH "Cardiomegaly" case 0.59, the 38 others median 0.43 (IQR 0.37-0.51, 10 above
0.5, mostly COVID/AP films), the 8 "no finding" ones median 0.43 (max 0.61). On visual check of the
39 overlays, ~27 put both lines where a reader would; misses come from partly segmented (consolidated)
lungs and lung masks leaking below the diaphragm. Synthetic phantoms: widths within 1.5 %.
~0.5 s per call (3 s for a 4k image).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from scipy import ndimage as ndi

from agent.analysis.lungs import LungFields, Overlay, gray_image, segment_lungs, spacing_check
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, Measurement, Tool, ToolContext, ToolError, ToolInput

CTR_THRESHOLD = 0.5
START, BASE_CAP = 0.6, 0.85  # heart border search: fractions of each lung's craniocaudal extent
HEART_COLOUR, THORAX_COLOUR, LUNG_COLOUR = (255, 40, 200), (0, 200, 255), (255, 220, 0)


class CTRInput(ToolInput):
    projection: Literal["auto", "PA", "AP"] = Field(
        "auto", description="radiograph projection; auto reads the DICOM ViewPosition (unknown when absent)"
    )


class CTROutput(BaseModel):
    ctr: float
    cardiac_width: float
    thoracic_width: float
    length_unit: str  # "mm" or "px"
    spacing_known: bool
    heart_right_border: list[int]  # [row, col] most lateral point of the right heart border (image left)
    heart_left_border: list[int]  # [row, col] most lateral point of the left heart border (image right)
    midline_col: float  # where the overlay joins the two half-widths (the ratio does not depend on it)
    thorax_row: int
    thorax_cols: list[int]
    rows_used: list[int]  # [row0, row1] searched for the heart borders (lower lung fields, above the diaphragm)
    projection: str  # "PA", "AP" or "unknown"
    projection_source: str  # "dicom ViewPosition", "input" or "none"
    cardiomegaly_suggested: bool  # ctr > 0.5
    threshold: float = CTR_THRESHOLD
    note: str = ""


def _edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: first and last True column (-1 where the row is empty) and the count."""
    any_ = mask.any(axis=1)
    w = mask.shape[1]
    first = np.where(any_, np.argmax(mask, axis=1), -1)
    last = np.where(any_, w - 1 - np.argmax(mask[:, ::-1], axis=1), -1)
    return first, last, mask.sum(axis=1)


def _heart_border(mask: np.ndarray, edge: np.ndarray, n: np.ndarray, lateral: int, size: int) -> tuple[int, int, list[int]]:
    """(row, col) of the most lateral point of one lung's medial border along the heart, and the rows searched.

    `edge` is the lung's medial border column per row and `n` the lung's width per row; `lateral` is +1
    when lateral is toward higher columns. Rows searched: from 60 % of the lung's craniocaudal extent
    (below the hilum) down to the lung base, which is the last row at least 40 % as wide as the lung's
    widest row but no lower than 85 % of its extent (below that the medial border follows the diaphragm
    into the costophrenic tip). Of those, only border points with lung below them count: the lung
    column just lateral of the point goes on down for at least 3 % of the image height, as it does beside
    the heart and does not where the medial border follows the diaphragm dome. The border is
    median-filtered over ~1 % of the image height."""
    h, w = mask.shape
    rows = np.flatnonzero(n)
    top, bottom = int(rows[0]), int(rows[-1])
    start = top + int(START * (bottom - top))
    base = min(int(np.flatnonzero(n >= 0.4 * n.max())[-1]), top + int(BASE_CAP * (bottom - top)))
    if base - start < 3:
        raise ToolError("the lower lung field is too short to find the heart border")
    e = ndi.median_filter(edge[top:base + 1].astype(float), size=size, mode="nearest")[start - top:]
    r = np.arange(start, base + 1)
    low = np.where(mask.any(axis=0), h - 1 - np.argmax(mask[::-1], axis=0), -1)  # last lung row per column
    probe = np.clip(np.round(e).astype(int) + lateral * max(2, w // 100), 0, w - 1)
    ok = low[probe] >= r + max(3, h // 33)
    if ok.sum() < 3:
        raise ToolError("the medial lung border follows the diaphragm all along the lower lung: no heart border found")
    i = int(np.flatnonzero(ok)[np.argmax(lateral * e[ok])])
    return start + i, int(round(e[i])), [start, base]


def ctr_geometry(lungs: LungFields) -> dict:
    """Cardiac and thoracic width (pixels) from the right (image left) and left lung masks.

    Cardiac width: the horizontal extent of the heart shadow, from the most lateral point of the right
    heart border (right lung's medial border) to that of the left heart border (Danzer: MRD + MLD; the
    two points may lie on different rows). Thoracic width: the widest row across both lungs' outer borders."""
    r_first, r_last, r_n = _edges(lungs.right)
    l_first, l_last, l_n = _edges(lungs.left)
    both = (r_n > 0) & (l_n > 0)
    if not both.any():
        raise ToolError("the two lung fields share no image row: cannot measure across the chest")
    size = max(3, (len(both) // 100) | 1)
    rr, rc, used_r = _heart_border(lungs.right, r_last, r_n, -1, size)  # right heart border: image left
    lr, lc, used_l = _heart_border(lungs.left, l_first, l_n, +1, size)
    span = np.where(both, ndi.median_filter(np.where(both, l_last - r_first + 1, 0).astype(float), size=size,
                                            mode="nearest"), -1)
    tr = int(np.argmax(span))
    return {
        "heart_right_border": [rr, rc + 1], "heart_left_border": [lr, lc - 1],
        "thorax_row": tr, "thorax_cols": [int(r_first[tr]), int(l_last[tr])],
        "rows_used": [min(used_r[0], used_l[0]), max(used_r[1], used_l[1])],
    }


def _projection(view: ImageView, requested: str) -> tuple[str, str]:
    vp = str(view.metadata.get("ViewPosition", "")).strip().upper()
    if vp in ("PA", "AP"):
        return vp, "dicom ViewPosition"
    if requested != "auto":
        return requested, "input"
    return "unknown", "none"


class CardiothoracicRatio(Tool):
    name = "cardiothoracic_ratio"
    description = "Cardiothoracic ratio (heart width / chest width) on a frontal chest radiograph; > 0.5 suggests cardiomegaly."
    kind = "measure"
    modalities = frozenset({"DX", "CR"})
    dims = frozenset({2})
    subjects = ("cardiomegaly", "heart", "cardiothoracic_ratio", "cardiac_width", "thoracic_width")
    topics = ("heart", "cardiomegaly", "cardiac", "ctr", "cardiothoracic", "heart size", "enlarged heart", "chest")
    timeout_s = 60.0
    limitations = (
        "needs both lung fields (classical segmentation); the 0.5 threshold holds for PA films only, AP/supine "
        "films overestimate the CTR; obscured heart borders (consolidation, effusion) bias the cardiac width"
    )
    validation = (
        "realcases frontal CXR: CTR on 39/52; NIH Cardiomegaly case 0.59 vs 38 others median 0.43 (10 above 0.5); "
        "~27/39 overlays plausible on visual check; phantom widths within 1.5 %"
    )
    Input = CTRInput
    Output = CTROutput

    def run(self, ctx: ToolContext, inp: CTRInput) -> CTROutput:
        view = self.usable_view(ctx, inp.view)
        gray = gray_image(view, ctx.pixels(inp.view))
        lungs = segment_lungs(gray)
        g = ctr_geometry(lungs)
        sc = float(view.spacing_mm[1]) if view.spacing_known else 1.0
        cardiac = (g["heart_left_border"][1] - g["heart_right_border"][1] + 1) * sc
        thoracic = (g["thorax_cols"][1] - g["thorax_cols"][0] + 1) * sc
        ctr = cardiac / thoracic
        if not 0.25 <= ctr <= 0.8:
            raise ToolError(f"implausible cardiothoracic ratio {ctr:.2f} (outside 0.25..0.8): the lung segmentation "
                            "probably failed, so no ratio is reported")
        projection, source = _projection(view, inp.projection)
        notes = [f"CTR > {CTR_THRESHOLD} suggests cardiomegaly on a PA film"]
        if projection == "AP":
            notes.append("this is an AP film, which magnifies the heart: the CTR is overestimated and a value "
                         "above 0.5 is not reliable evidence of cardiomegaly")
        elif projection == "unknown":
            notes.append("projection unknown (no ViewPosition): the threshold assumes PA; AP films overestimate")
        if not view.spacing_known:
            notes.append("pixel spacing unknown: widths are in pixels (the ratio is unaffected)")
        elif warn := spacing_check(tuple(g["thorax_cols"]), sc):
            notes.append(warn + " (the ratio is unaffected)")

        over = Overlay(gray)
        for m in (lungs.right, lungs.left):
            over.tint(m, LUNG_COLOUR, alpha=0.12)
        over.hline(g["thorax_row"], *g["thorax_cols"], THORAX_COLOUR)
        (rr, rc), (lr, lc) = g["heart_right_border"], g["heart_left_border"]
        mid = int(round(min(max(lungs.midline_col, rc), lc)))
        over.hline(rr, rc, mid, HEART_COLOUR)
        over.hline(lr, mid, lc, HEART_COLOUR)
        over.vline(mid, min(rr, lr), max(rr, lr), HEART_COLOUR)
        ctx.save_png(over.rgb, kind="overlay", description=f"{view.id}: CTR {ctr:.2f}; cardiac width magenta (right and left "
                     f"heart borders to the midline), thoracic width cyan, lung fields yellow{over.scale_note}")
        unit = view.length_unit
        return CTROutput(
            ctr=round(ctr, 3), cardiac_width=round(cardiac, 2), thoracic_width=round(thoracic, 2), length_unit=unit,
            spacing_known=view.spacing_known, projection=projection, projection_source=source,
            cardiomegaly_suggested=ctr > CTR_THRESHOLD, midline_col=round(lungs.midline_col, 1),
            note="; ".join(notes), **g,
        )

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, CTROutput)
        return [FindingDraft(
            label="cardiomegaly", present=output.cardiomegaly_suggested, location="heart",
            measurements=[
                Measurement(name="cardiothoracic_ratio", value=output.ctr, unit="ratio"),
                Measurement(name="cardiac_width", value=output.cardiac_width, unit=output.length_unit),
                Measurement(name="thoracic_width", value=output.thoracic_width, unit=output.length_unit),
            ],
            note=f"CTR {output.ctr:.2f} vs threshold {output.threshold} ({output.projection} projection); " + output.note,
        ), FindingDraft(  # the heart as a structure: where it lies, from its borders (no yes/no claim)
            label="heart", present=None, location="heart borders",
            bbox=[float(min(output.heart_right_border[0], output.heart_left_border[0], output.rows_used[0])),
                  float(output.heart_right_border[1]),
                  float(max(output.heart_right_border[0], output.heart_left_border[0], output.rows_used[1])),
                  float(output.heart_left_border[1])],
            note="box from the right heart border to the left heart border over the rows searched for them",
        )]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, CTROutput)
        verdict = "above" if output.cardiomegaly_suggested else "not above"
        return (
            f"CTR {output.ctr:.2f} ({verdict} {output.threshold}; {output.projection} projection): "
            f"cardiac {output.cardiac_width:g} "
            f"/ thoracic {output.thoracic_width:g} {output.length_unit}"
        )
