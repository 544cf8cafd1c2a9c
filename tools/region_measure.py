"""region_measure: segment the dominant object of a 2D image and measure it.

Method (classical, deterministic):

1. gray values (colour images through skimage `rgb2gray`), smoothed with a Gaussian (sigma 1 px);
2. on colour images, a dark field-of-view vignette (a dermoscope's ring: a region darker than
   half the median that holds two or more image corners) is left out;
3. Otsu threshold; the foreground is the dark or the bright class (`polarity`; "auto" takes the
   class that touches the image border less, and "dark" for colour images, where lesions are
   darker than skin);
4. opening and closing with a disk (radius ~1 % of the short side), holes filled;
5. one connected component: the one holding `seed_point` (or the nearest to it), else the largest,
   weighted toward the image centre and against long contact with the border, since a shadow or
   vignette at the edge is rarely the object asked about. `bbox` restricts all of this to a box.

Pictures (or boxes) longer than WORK_PX a side are segmented at a working resolution (downscaled with
anti-aliasing, the mask brought back to the original grid by nearest neighbour; the output says so):
the morphology's cost grows with the pixels times the disk (61 s on a 4095 x 3342 radiograph before).
Measurements are always taken on the original grid, in mm when the view's pixel spacing is known,
else in pixels (the output and findings say which). The longest diameter is the maximum Feret
diameter, measured on the convex hull of the region's contour in physical coordinates.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform
from skimage.color import rgb2gray
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import find_contours, regionprops

from agent.analysis.display import bbox_to_px, draw_segment, is_rgb, outline, rgb_canvas
from agent.analysis.masks import border as _border
from agent.analysis.masks import clean as _clean
from agent.analysis.masks import vignette as _vignette
from agent.core.state import SPACING_UNKNOWN_NOTE, ImageView
from agent.core.tool import FindingDraft, Measurement, Tool, ToolContext, ToolError, ToolInput

WORK_PX = 1024


def at_working_size(sub: np.ndarray, seed: tuple[int, int] | None, polarity: str, rgb: bool
                    ) -> tuple[np.ndarray, str, float, str]:
    """segment() at most WORK_PX a side; the mask on `sub`'s own grid."""
    from skimage.transform import rescale, resize

    scale = WORK_PX / max(sub.shape)
    if scale >= 1.0:
        return segment(sub, polarity, rgb, seed)
    small = rescale(sub.astype(np.float32), scale, anti_aliasing=True, preserve_range=True)
    s_seed = None if seed is None else (min(small.shape[0] - 1, int(seed[0] * scale)),
                                        min(small.shape[1] - 1, int(seed[1] * scale)))
    m, pol, t, note = segment(small, polarity, rgb, s_seed)
    mask = resize(m, sub.shape, order=0, anti_aliasing=False, preserve_range=True).astype(bool)
    work = f"segmented at {small.shape[0]}x{small.shape[1]} (working resolution, {scale:.2f}x), measured on the " \
        f"original {sub.shape[0]}x{sub.shape[1]} pixels"
    return mask, pol, t, f"{note}; {work}" if note else work


class RegionInput(ToolInput):
    polarity: Literal["auto", "bright", "dark"] = Field(
        "auto", description="is the object brighter or darker than its surroundings; auto decides (dark for colour)"
    )
    seed_point: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[row, col] in pixels inside the object to measure"
    )
    bbox: list[float] | None = Field(
        None, min_length=4, max_length=4,
        description="restrict to [row0, col0, row1, col1] in pixels, or fractions when all four lie in [0, 1]",
    )


class RegionOutput(BaseModel):
    area: float
    area_unit: str  # "mm2" or "px2"
    equivalent_diameter: float
    longest_diameter: float  # maximum Feret diameter
    length_unit: str  # "mm" or "px"
    longest_diameter_endpoints: list[list[float]]  # [[row, col], [row, col]] in pixels
    centroid: list[float]  # [row, col] in pixels
    bbox: list[int]  # [row0, col0, row1, col1] in pixels, end exclusive
    pixels: int
    fraction_of_image: float
    mean_intensity: float
    std_intensity: float
    intensity_unit: str
    eccentricity: float
    solidity: float
    polarity: str
    threshold: float
    touches_border: bool
    spacing_known: bool
    note: str = ""


def segment(gray: np.ndarray, polarity: str, rgb: bool, seed: tuple[int, int] | None = None
            ) -> tuple[np.ndarray, str, float, str]:
    """(mask, polarity used, threshold on the smoothed image, note) for a 2D gray image."""
    g = gaussian(gray.astype(np.float64), 1.0, preserve_range=True)
    r = max(1, round(min(g.shape) / 100))
    outside = _vignette(g, r) if rgb else np.zeros(g.shape, dtype=bool)
    inside = g[~outside]
    if inside.size < 4 or float(inside.max() - inside.min()) <= 1e-9 * max(1.0, abs(float(inside.max()))):
        raise ToolError("the image is uniform; there is no object to segment")
    t = float(threshold_otsu(inside))
    border = _border(g.shape) & ~outside
    if polarity == "auto":
        if rgb:
            polarity = "dark"
        else:
            dark_contact = float(((g <= t) & border).sum())
            polarity = "bright" if dark_contact >= border.sum() / 2 else "dark"
    fg = _clean(((g <= t) if polarity == "dark" else (g > t)) & ~outside, r)
    lab, n = ndi.label(fg)
    if n == 0:
        raise ToolError(f"no {polarity} region found (Otsu threshold {t:.4g})")
    idx = np.arange(1, n + 1)
    note = ""
    if seed is not None:
        k = int(lab[seed])
        if k == 0:
            dist, (ir, ic) = ndi.distance_transform_edt(lab == 0, return_indices=True)
            k = int(lab[ir[seed], ic[seed]])
            note = f"seed point lies outside every {polarity} region; the nearest ({dist[seed]:.1f} px away) is used"
    else:
        h, w = g.shape
        sizes = ndi.sum(fg, lab, idx)
        contact = ndi.sum(_border(g.shape), lab, idx)
        cy, cx = np.array(ndi.center_of_mass(fg, lab, idx)).reshape(-1, 2).T
        off_centre = np.hypot((cy - h / 2) / h, (cx - w / 2) / w)
        score = sizes * np.exp(-(off_centre**2) / (2 * 0.25**2)) * (1 - np.minimum(0.9, contact / (0.25 * 2 * (h + w))))
        k = int(idx[int(np.argmax(score))])
    return lab == k, polarity, t, note


def _feret(mask: np.ndarray, spacing: tuple[float, float]) -> tuple[float, list[list[float]]]:
    """Maximum Feret diameter (physical units) and its endpoints in pixels."""
    pts = np.concatenate(find_contours(np.pad(mask, 1).astype(np.uint8), 0.5)) - 1.0
    pts = np.unique(np.round(pts, 3), axis=0)
    scaled = pts * np.asarray(spacing)
    if len(pts) >= 3:
        try:
            hull = ConvexHull(scaled).vertices
            pts, scaled = pts[hull], scaled[hull]
        except QhullError:  # collinear points: a one-pixel-wide line
            pass
    if len(pts) < 2:
        return 0.0, [pts[0].tolist(), pts[0].tolist()] if len(pts) else [[0.0, 0.0], [0.0, 0.0]]
    d = squareform(pdist(scaled))
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(d[i, j]), [[round(float(v), 2) for v in pts[i]], [round(float(v), 2) for v in pts[j]]]


class RegionMeasure(Tool):
    name = "region_measure"
    description = ("Find and segment the dominant bright or dark object (Otsu) of a 2D image; its area, longest diameter, "
                   "shape, bbox.")
    kind = "measure"
    dims = frozenset({2})
    subjects = ("dominant region", "area", "longest_diameter")
    topics = ("size", "measure", "area", "diameter", "lesion", "region", "mass", "nodule")
    Input = RegionInput
    Output = RegionOutput

    def run(self, ctx: ToolContext, inp: RegionInput) -> RegionOutput:
        view = self.usable_view(ctx, inp.view)
        arr = ctx.pixels(inp.view)
        rgb = is_rgb(view)
        gray = rgb2gray(arr) if rgb else arr.astype(np.float32)
        h, w = gray.shape
        r0, c0, r1, c1 = 0, 0, h, w
        if inp.bbox is not None:
            try:
                r0, c0, r1, c1 = bbox_to_px(inp.bbox, h, w)
            except ValueError as exc:
                raise ToolError(str(exc)) from None
            if r1 - r0 < 4 or c1 - c0 < 4:
                raise ToolError(f"bbox rows {r0}:{r1}, cols {c0}:{c1} is too small to segment (under 4 px)")
        seed = None
        if inp.seed_point is not None:
            sr, sc = (float(v) for v in inp.seed_point)
            if 0 <= sr <= 1 and 0 <= sc <= 1:
                sr, sc = sr * h, sc * w
            sr, sc = int(math.floor(sr)), int(math.floor(sc))
            if not (r0 <= sr < r1 and c0 <= sc < c1):
                raise ToolError(f"seed point [{sr}, {sc}] lies outside the image/bbox rows {r0}:{r1}, cols {c0}:{c1}")
            seed = (sr - r0, sc - c0)
        sub, polarity, t, note = at_working_size(gray[r0:r1, c0:c1], seed, inp.polarity, rgb)
        mask = np.zeros((h, w), dtype=bool)
        mask[r0:r1, c0:c1] = sub

        spacing = view.plane_spacing()
        n = int(mask.sum())
        area = n * spacing[0] * spacing[1]
        props = regionprops(mask.astype(np.uint8))[0]
        feret, ends = _feret(mask, spacing)
        values = gray[mask]
        br0, bc0, br1, bc1 = (int(v) for v in props.bbox)
        if not view.spacing_known:
            note = (note + "; " if note else "") + SPACING_UNKNOWN_NOTE

        over = rgb_canvas(arr if rgb else gray, rgb)
        outline(over, mask, (0, 255, 0))
        draw_segment(over, ends, (255, 0, 0))
        ctx.save_png(over, kind="overlay", description=f"{view.id}: region contour (green), longest diameter (red)")
        ctx.save_mask(mask, description=f"{view.id}: dominant region mask", legend={1: "dominant region"}, view=view.id)

        unit = view.length_unit
        return RegionOutput(
            area=round(area, 3), area_unit=unit + "2", equivalent_diameter=round(math.sqrt(4 * area / math.pi), 3),
            longest_diameter=round(feret, 3), length_unit=unit, longest_diameter_endpoints=ends,
            centroid=[round(float(v), 2) for v in props.centroid], bbox=[br0, bc0, br1, bc1], pixels=n,
            fraction_of_image=round(n / mask.size, 5), mean_intensity=round(float(values.mean()), 4),
            std_intensity=round(float(values.std()), 4),
            intensity_unit="gray 0..1 (rgb2gray)" if rgb else "image units",
            eccentricity=round(float(props.eccentricity), 4), solidity=round(float(props.solidity), 4),
            polarity=polarity, threshold=round(t, 6), touches_border=bool((mask & _border(mask.shape)).any()),
            spacing_known=view.spacing_known, note=note,
        )

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, RegionOutput)
        return [FindingDraft(
            label="dominant region", present=None, location=f"centroid row {output.centroid[0]:.0f}, "
            f"col {output.centroid[1]:.0f}", bbox=[float(v) for v in output.bbox],
            measurements=[
                Measurement(name="area", value=output.area, unit=output.area_unit),
                Measurement(name="longest_diameter", value=output.longest_diameter, unit=output.length_unit),
                Measurement(name="equivalent_diameter", value=output.equivalent_diameter, unit=output.length_unit),
            ],
            note=output.note,
        )]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, RegionOutput)
        return (
            f"{output.polarity} region: area {output.area:g} {output.area_unit}, longest diameter "
            f"{output.longest_diameter:g} {output.length_unit}, solidity {output.solidity:.2f}"
            + (" (spacing unknown)" if not output.spacing_known else "")
        )
