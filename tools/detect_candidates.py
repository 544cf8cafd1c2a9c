"""detect_candidates: blob / nodule candidates by Laplacian-of-Gaussian, any gray 2D or 3D image.

Method (classical, deterministic):

1. gray values (colour through rgb2gray), optionally restricted to a mask (`within`):
   * "body": CT in HU: the body mask of ct_tissue_composition (HU > -500, largest object, holes
     filled); other images: Otsu threshold, brighter class, largest connected object, holes filled;
   * "lungs": chest radiographs (DX/CR): the lung fields of cxr_lung_fields; CT in HU: -900..-500 HU
     inside the body, opened, holes filled slice by slice (so nodules and vessels inside the lung
     count, nodules touching the chest wall may not);
2. values normalised between the image's 1st and 99th percentiles (min and max where those coincide),
   outside the mask set to the median inside it (so the mask's edge does not read as a blob); "dark"
   polarity inverts;
3. Laplacian-of-Gaussian scale space as in skimage `blob_log` (scale-normalised, log-spaced sigmas for
   diameters `min_diameter`..`max_diameter`, sigma = d / (2 sqrt 2) per axis from the pixel spacing),
   local maxima above 0.03 and above 10 % of the strongest (skimage `peak_local_max`, at most 5000),
   overlapping blobs pruned, at most 300 kept; computed on a copy shrunk so the smallest sigma is
   ~2 px and the copy stays under ~4 M pixels/voxels;
4. per blob: mean intensity inside its disc and contrast = mean inside - mean in the ring out to twice
   its radius, in units of the normalised range (0..1), on the blob's own slice; blobs whose centre
   lies outside the mask or with contrast <= 0 are dropped; the rest sorted by contrast, top `top_n`.

Diameters are mm when the pixel spacing is known (default 5-30 mm), else pixels (default 1 %-8 % of
the image's short side), and the output says so. Every candidate has a bbox [row0, col0, row1, col1]
so crop_zoom or a box-prompted segmenter can follow up.

Validation (bench/bench_cxr_measure.py): three planted discs (12, 20, 30 px) found with diameters
within 7 %; TBX11K tuberculosis boxes in realcases (2 radiographs, 3 expert boxes): 2 of 3 hold the
centre of one of the top-10 candidates within the lungs (far too few cases for a claim; TB lesions are
rarely round). ~0.7-1.5 s per radiograph.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from scipy import ndimage as ndi
from skimage.color import rgb2gray
from skimage.draw import circle_perimeter
from skimage.filters import gaussian, threshold_otsu
from skimage.transform import resize

from agent.analysis.ct import body_mask as ct_body_mask
from agent.analysis.display import is_rgb, looks_like_hu, shrink_for_display, to_uint8
from agent.analysis.lungs import segment_lungs
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, Measurement, Tool, ToolContext, ToolError, ToolInput

_MAX_WORK_VOXELS = 4_000_000
_MAX_PEAKS, _MAX_KEEP = 5000, 300  # scale-space maxima considered; blobs kept after pruning


class DetectInput(ToolInput):
    within: Literal["none", "body", "lungs"] = Field(
        "none", description="search only inside: the body, or the lungs (chest radiograph or CT in HU)"
    )
    min_diameter: float | None = Field(
        None, gt=0, description="smallest blob diameter, mm (px when spacing is unknown); default 5 mm, or 1 % of the side"
    )
    max_diameter: float | None = Field(
        None, gt=0, description="largest blob diameter, mm (px when spacing is unknown); default 30 mm, or 8 % of the side"
    )
    polarity: Literal["bright", "dark"] = Field("bright", description="look for blobs brighter or darker than around")
    top_n: int = Field(10, ge=1, le=50, description="how many candidates to return, highest contrast first")


class Candidate(BaseModel):
    center: list[float]  # [row, col] or [z, row, col] in pixels
    radius_px: float  # in-plane radius in pixels
    diameter: float  # in length_unit
    mean_intensity: float
    contrast: float  # mean inside - mean of the surrounding ring, in units of the normalised range 0..1
    bbox: list[int]  # [row0, col0, row1, col1] in pixels, end exclusive
    slices: list[int] | None = None  # volumes: [z0, z1] the blob spans, end exclusive


class DetectOutput(BaseModel):
    candidates: list[Candidate]
    n_blobs: int  # blobs found before filtering and top_n
    within: str
    diameter_range: list[float]  # [min, max] searched, in length_unit
    length_unit: str  # "mm" or "px"
    intensity_unit: str
    spacing_known: bool
    note: str = ""


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    return lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))


def _fill(mask: np.ndarray) -> np.ndarray:
    return ndi.binary_fill_holes(mask) if mask.ndim == 2 else np.stack([ndi.binary_fill_holes(s) for s in mask])


def search_mask(view: ImageView, img: np.ndarray, within: str) -> np.ndarray | None:
    """The region to search (bool, shaped like img), or None for the whole image."""
    if within == "none":
        return None
    hu = view.modality == "CT" and not is_rgb(view) and looks_like_hu(img)
    if within == "body":
        if hu:
            return ct_body_mask(img)
        g = gaussian(img, 1.0)
        return _fill(_largest(g > threshold_otsu(g)))
    if view.modality in ("DX", "CR") and img.ndim == 2:
        lungs = segment_lungs(img)
        return lungs.right | lungs.left
    if hu:
        st = ndi.generate_binary_structure(2, 1)
        st = st if img.ndim == 2 else st[None]
        lung = ndi.binary_opening((img >= -900) & (img <= -500), structure=st) & ct_body_mask(img)
        lung = _fill(lung)
        lab, n = ndi.label(lung)
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            lung = np.isin(lab, 1 + np.flatnonzero(sizes >= 0.02 * sizes.max()))
        if not lung.any():
            raise ToolError("no lung found (no pixels between -900 and -500 HU inside the body)")
        return lung
    raise ToolError(f"within='lungs' needs a chest radiograph (DX/CR) or a CT in HU, not {view.modality}")


def log_blobs(img: np.ndarray, s_lo: np.ndarray, s_hi: np.ndarray, num_sigma: int) -> np.ndarray:
    """Scale-normalised Laplacian-of-Gaussian blobs as rows [centre..., sigma per axis...], strongest first.

    The method of skimage's `blob_log` (log-spaced sigmas, local maxima of the scale-space stack above
    0.03 and above 10 % of the strongest), with the number of maxima capped (blob_log's pruning runs out
    of memory on the thousands of maxima along organ edges in a volume), the scale refined between the
    sigmas, and a blob dropped when its centre lies within two sigmas of a stronger one."""
    sigmas = [s_lo * (s_hi / s_lo) ** t for t in np.linspace(0.0, 1.0, num_sigma)]
    stack = np.stack([-float(np.mean(sg)) ** 2 * ndi.gaussian_laplace(img.astype(np.float32), sg) for sg in sigmas],
                     axis=-1)
    from skimage.feature import peak_local_max  # here: it imports scipy.stats (~0.5 s), and every tool module is
    # imported when the registry is built

    peaks = peak_local_max(stack, threshold_abs=0.03, threshold_rel=0.1, footprint=np.ones((3,) * stack.ndim, bool),
                           exclude_border=False, num_peaks=_MAX_PEAKS)
    if len(peaks) == 0:
        return np.zeros((0, 2 * img.ndim))
    peaks = peaks[np.argsort(-stack[tuple(peaks.T)], kind="stable")]
    # the scale refined by a parabola through the responses at the neighbouring sigmas (in log-sigma)
    k = peaks[:, -1]
    at = [tuple(peaks[:, :-1].T) + (np.clip(k + j, 0, num_sigma - 1),) for j in (-1, 0, 1)]
    r_m, r_0, r_p = (stack[a] for a in at)
    curv = r_m - 2 * r_0 + r_p
    inner = (k > 0) & (k < num_sigma - 1) & (curv < 0)
    delta = np.where(inner, 0.5 * (r_m - r_p) / np.where(inner, curv, -1.0), 0.0).clip(-0.5, 0.5)
    t = (k + delta) / max(1, num_sigma - 1)
    sig = s_lo[None] * (s_hi / s_lo)[None] ** t[:, None]
    centres = peaks[:, :-1].astype(float)
    kept: list[int] = []
    for i in range(len(peaks)):  # greedy: drop a blob whose centre lies inside a stronger one
        if kept:
            d = (centres[kept] - centres[i]) / np.maximum(sig[kept], sig[i])
            if (np.sum(d**2, axis=1) < 4.0).any():
                continue
        kept.append(i)
        if len(kept) >= _MAX_KEEP:
            break
    return np.hstack([centres[kept], sig[kept]])


def _contrast(norm: np.ndarray, img: np.ndarray, r: float, c: float, rad: float) -> tuple[float, float]:
    """(mean inside the disc, mean inside - mean of the ring out to 2 radii) on one 2D slice."""
    h, w = norm.shape
    R = 2 * rad + 1
    r0, r1, c0, c1 = max(0, int(r - R)), min(h, int(r + R) + 2), max(0, int(c - R)), min(w, int(c + R) + 2)
    yy, xx = np.ogrid[r0:r1, c0:c1]
    d2 = (yy - r) ** 2 + (xx - c) ** 2
    inside = d2 <= rad**2
    ring = (d2 > rad**2) & (d2 <= (2 * rad) ** 2)
    if not inside.any():
        inside = d2 == d2.min()
    win, iwin = norm[r0:r1, c0:c1], img[r0:r1, c0:c1]
    ring_mean = float(win[ring].mean()) if ring.any() else float(win[inside].mean())
    return float(iwin[inside].mean()), float(win[inside].mean()) - ring_mean


class DetectCandidates(Tool):
    name = "detect_candidates"
    description = ("Find blob/nodule candidates (Laplacian of Gaussian) with centre, size, contrast and a bbox; "
                   "optionally only inside the body or lungs.")
    kind = "detect"
    subjects = ("blob candidate", "diameter")
    topics = ("nodule", "nodules", "mass", "lesion", "lesions", "blob", "spot", "opacity", "candidate", "detect",
              "metastasis", "where")
    timeout_s = 90.0
    limitations = ("candidates, not diagnoses: vessels seen end-on, rib crossings and tissue overlap also make blobs; "
                   "only roughly round objects in the size range; juxtapleural nodules may fall outside a lung mask")
    validation = "synthetic planted discs: diameters within 7 %; TBX11K expert boxes hit by a top-10 candidate: 2/3 (2 images)"
    Input = DetectInput
    Output = DetectOutput

    def applicable(self, view: ImageView) -> str | None:
        if is_rgb(view) and view.modality not in ("DX", "CR", "CT", "MR"):
            return f"{self.name} works on gray images; {view.id} is a colour {view.modality} picture"
        return super().applicable(view)

    def run(self, ctx: ToolContext, inp: DetectInput) -> DetectOutput:
        view = self.usable_view(ctx, inp.view)
        arr = ctx.pixels(inp.view)
        img = rgb2gray(arr).astype(np.float32) if is_rgb(view) else np.asarray(arr, dtype=np.float32)
        three_d = img.ndim == 3
        mask = search_mask(view, img, inp.within)
        if mask is not None and not mask.any():
            raise ToolError(f"the '{inp.within}' mask is empty: nothing to search")
        notes = []
        if view.spacing_known:
            sp = np.array([float(s) for s in view.spacing_mm])
            lo_d, hi_d = inp.min_diameter or 5.0, inp.max_diameter or 30.0
        else:
            sp = np.ones(img.ndim)
            short = min(img.shape[-2:])
            lo_d = inp.min_diameter or max(4.0, round(0.01 * short, 1))
            hi_d = inp.max_diameter or max(3 * lo_d, round(0.08 * short, 1))
            notes.append("pixel spacing unknown: diameters are in pixels" + (", cubic voxels assumed" if three_d else ""))
        if hi_d < lo_d:
            raise ToolError(f"max_diameter {hi_d:g} is smaller than min_diameter {lo_d:g}")

        p1, p99 = (float(v) for v in np.percentile(img, [1, 99]))
        if p99 - p1 <= 1e-6 * max(1.0, abs(p99)):  # a flat background with a few small objects
            p1, p99 = float(img.min()), float(img.max())
        if p99 <= p1:
            raise ToolError("the image (or search region) is flat: no blobs to find")
        norm = np.clip((img - p1) / (p99 - p1), 0, 1)
        if inp.polarity == "dark":
            norm = 1.0 - norm
        search = norm if mask is None else np.where(mask, norm, np.median(norm[mask])).astype(np.float32)

        k = 2 * math.sqrt(2)
        s_lo, s_hi = lo_d / k / sp, hi_d / k / sp  # sigma per axis, in pixels
        f = np.maximum(1.0, s_lo / 2.0)  # shrink so the smallest sigma is ~2 px
        work_shape = np.maximum(8, np.round(np.array(img.shape) / f)).astype(int)
        if work_shape.prod() > _MAX_WORK_VOXELS:
            extra = (work_shape.prod() / _MAX_WORK_VOXELS) ** (1 / img.ndim)
            work_shape = np.maximum(8, np.round(work_shape / extra)).astype(int)
        f = np.array(img.shape) / work_shape
        work = resize(search, tuple(work_shape), anti_aliasing=bool((f > 1).any()), preserve_range=True)
        if (f > 1).any():
            notes.append(f"searched on a copy shrunk {float(f.max()):.2g}x")
        blobs = log_blobs(work, np.maximum(0.5, s_lo / f), np.maximum(0.5, s_hi / f), 6 if three_d else 10)
        nd = img.ndim
        cands: list[Candidate] = []
        for b in blobs:
            centre, sig = (b[:nd] + 0.5) * f - 0.5, b[nd:]
            rad = float(sig[-1] * f[-1] * math.sqrt(2))  # in-plane radius, pixels
            idx = tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(centre, img.shape, strict=True))
            if mask is not None and not mask[idx]:
                continue
            z = idx[0] if three_d else None
            plane_n, plane_i = (norm[z], img[z]) if three_d else (norm, img)
            mean_i, contrast = _contrast(plane_n, plane_i, float(centre[-2]), float(centre[-1]), max(rad, 0.5))
            if contrast <= 0:
                continue
            r, c = float(centre[-2]), float(centre[-1])
            h, w = img.shape[-2:]
            bbox = [max(0, math.floor(r - rad)), max(0, math.floor(c - rad)), min(h, math.ceil(r + rad) + 1),
                    min(w, math.ceil(c + rad) + 1)]
            slices = None
            if three_d:
                rz = float(sig[0] * f[0] * math.sqrt(2))
                slices = [max(0, math.floor(centre[0] - rz)), min(img.shape[0], math.ceil(centre[0] + rz) + 1)]
            cands.append(Candidate(
                center=[round(float(v), 1) for v in centre], radius_px=round(rad, 2),
                diameter=round(2 * rad * float(sp[-1]), 2), mean_intensity=round(mean_i, 4),
                contrast=round(contrast, 4), bbox=bbox, slices=slices,
            ))
        cands.sort(key=lambda cd: -cd.contrast)
        top = cands[: inp.top_n]
        if not top:
            notes.append("no blob of the size range stands out from its surroundings")
        self._overlay(ctx, view, img, arr, mask, top)
        if view.modality == "CT" and not is_rgb(view) and looks_like_hu(img):
            iunit = "HU"
        else:
            iunit = "gray 0..1 (rgb2gray)" if is_rgb(view) else "image units"
        return DetectOutput(
            candidates=top, n_blobs=len(blobs), within=inp.within, diameter_range=[round(lo_d, 2), round(hi_d, 2)],
            length_unit=view.length_unit, intensity_unit=iunit,
            spacing_known=view.spacing_known, note="; ".join(notes),
        )

    @staticmethod
    def _overlay(ctx: ToolContext, view: ImageView, img: np.ndarray, arr: np.ndarray, mask: np.ndarray | None,
                 cands: list[Candidate]) -> None:
        three_d = img.ndim == 3
        k = int(round(cands[0].center[0])) if three_d and cands else (img.shape[0] // 2 if three_d else None)
        plane = img[k] if three_d else img
        rgb = np.array(arr, dtype=np.uint8) if is_rgb(view) else np.repeat(to_uint8(plane)[..., None], 3, axis=-1)
        if mask is not None:
            m = mask[k] if three_d else mask
            rgb[m ^ ndi.binary_erosion(m)] = (0, 160, 255)
        h, w = plane.shape
        for i, cd in enumerate(cands):
            if three_d and cd.slices and not (cd.slices[0] <= k < cd.slices[1]):
                continue
            colour = (255, 40, 40) if i < 3 else (255, 220, 0)
            for extra in range(max(1, max(h, w) // 500)):
                rr, cc = circle_perimeter(int(round(cd.center[-2])), int(round(cd.center[-1])),
                                          max(1, int(round(cd.radius_px)) + extra), shape=(h, w))
                rgb[rr, cc] = colour
        where = f" slice {k}" if three_d else ""
        rgb, scale = shrink_for_display(rgb)
        ctx.save_png(rgb, kind="overlay", description=f"{view.id}{where}: blob candidates (top 3 red, others yellow)"
                     + (", search mask blue" if mask is not None else "") + scale)

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, DetectOutput)
        out = []
        for i, cd in enumerate(output.candidates, 1):
            where = f"row {cd.center[-2]:.0f}, col {cd.center[-1]:.0f}"
            if cd.slices is not None:
                where = f"slice {cd.center[0]:.0f}, " + where
            out.append(FindingDraft(
                label="candidate nodule/blob", present=None, location=where, bbox=[float(v) for v in cd.bbox],
                measurements=[Measurement(name="diameter", value=cd.diameter, unit=output.length_unit),
                              Measurement(name="contrast", value=cd.contrast, unit="ratio")],
                note=f"blob candidate #{i} of {len(output.candidates)} by contrast (LoG detector, within={output.within}); "
                     "a candidate to look at, not a diagnosis" + (f"; {output.note}" if output.note else ""),
            ))
        return out

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, DetectOutput)
        if not output.candidates:
            return f"no blob candidates ({output.n_blobs} blobs, none standing out; within={output.within})"
        best = output.candidates[0]
        return (
            f"{len(output.candidates)} blob candidates (within={output.within}); best at "
            f"{[round(v) for v in best.center]} diameter {best.diameter:g} {output.length_unit}, contrast {best.contrast:.2f}"
        )
