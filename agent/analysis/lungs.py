"""Lung fields on a frontal chest radiograph (classical image processing at a 256 px working resolution): the
segmentation, the overlay picture to draw on, and the spacing plausibility check. The cxr_lung_fields,
cardiothoracic_ratio and detect_candidates tools use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2gray
from skimage.exposure import equalize_adapthist
from skimage.filters import gaussian, sobel, threshold_otsu
from skimage.measure import block_reduce, label, regionprops
from skimage.morphology import disk
from skimage.segmentation import find_boundaries, watershed
from skimage.transform import resize

from agent.analysis.display import is_rgb, to_uint8
from agent.core.state import ImageView
from agent.core.tool import ToolError

WORK_SIDE = 256  # working resolution (longest side, px); morphology sizes below are tuned to it

DISPLAY_SIDE = 2048  # overlays are shrunk to at most this many pixels a side


@dataclass
class LungFields:
    """Masks at the image's resolution; `right` is the patient's right lung (image left)."""

    right: np.ndarray
    left: np.ndarray
    midline_col: float  # image column of the midline (spine / mediastinum)


def gray_image(view: ImageView, arr: np.ndarray) -> np.ndarray:
    """The 2D gray picture of a radiograph view (colour files through rgb2gray)."""
    return rgb2gray(arr).astype(np.float32) if is_rgb(view) else np.asarray(arr, dtype=np.float32)


def _midline(eq: np.ndarray) -> int:
    h, w = eq.shape
    c0, c1 = int(0.3 * w), int(0.7 * w)
    band = eq[int(0.2 * h):int(0.8 * h), c0:c1].mean(axis=0)
    return c0 + int(np.argmax(ndi.uniform_filter1d(band, max(3, w // 40))))


def _plausible(r: float, c: float, h: int, w: int) -> bool:
    return 0.1 * h < r < 0.8 * h and 0.12 * w < c < 0.88 * w


def _markers(eq: np.ndarray, background: np.ndarray, thresh: float) -> np.ndarray:
    """1 = background (given, plus cores along the border or off the thorax), 2.. = lung cores."""
    h, w = eq.shape
    cores = label(ndi.binary_opening(eq < thresh, disk(3)))
    ring = np.zeros(eq.shape, bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    edges = np.zeros(eq.shape, bool)  # bands along the sides, the top and the bottom
    edges[:, : int(0.08 * w)] = edges[:, -int(0.08 * w):] = True
    edges[: int(0.05 * h)] = edges[-int(0.05 * h):] = True
    keep_off = ndi.binary_dilation(background, disk(3))
    markers = background.astype(np.int32)
    k = 2
    for p in regionprops(cores):
        m = cores == p.label
        r0, c0, r1, c1 = p.bbox
        contact = np.count_nonzero(m & ring) / ((r1 - r0) + (c1 - c0))
        inside = _plausible(*p.centroid, h, w)
        if contact > 0.15 and inside and p.area > 0.02 * h * w and c1 - c0 < 0.6 * w:  # a lung joined to outside air
            markers[m & edges] = 1
            rest = label(ndi.binary_opening(m & ~ndi.binary_dilation(edges, disk(3)), disk(2)))
            if rest.max():
                big = rest == 1 + int(np.argmax(np.bincount(rest.ravel())[1:]))
                if big.sum() > 0.01 * h * w:
                    markers[big & ~keep_off] = k
                    k += 1
        elif contact > 0.15 or not inside:
            markers[m] = 1
        elif p.area > 0.005 * h * w:
            markers[m & ~keep_off] = k
            k += 1
    return markers


def segment_lungs(gray: np.ndarray) -> LungFields:
    """Right and left lung field masks of a frontal chest radiograph; raises ToolError when not found."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2:
        raise ToolError(f"lung segmentation needs a 2D gray image, got shape {gray.shape}")
    h, w = gray.shape
    if min(h, w) < 64:
        raise ToolError(f"image {h}×{w} is too small for lung segmentation (under 64 px a side)")
    f = WORK_SIDE / max(h, w)
    sh = (max(32, round(h * f)), max(32, round(w * f)))
    k = max(1, max(h, w) // (2 * WORK_SIDE))  # block means first: anti-aliasing a 4k image is slow
    small = resize(block_reduce(gray, (k, k), np.mean) if k > 1 else gray, sh, anti_aliasing=True, preserve_range=True)
    lo, hi = (float(v) for v in np.percentile(small, [1, 99]))
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise ToolError("the image is flat (no contrast): no lung fields to find")
    eq = gaussian(equalize_adapthist(np.clip((small - lo) / (hi - lo), 0, 1), clip_limit=0.01), 1.0)
    H, W = sh
    mid = _midline(eq)
    t = threshold_otsu(eq)
    t_low = threshold_otsu(eq[eq < t])
    background = np.zeros(sh, bool)
    background[:2], background[-2:], background[:, :2], background[:, -2:] = True, True, True, True
    background[:, mid - 2:mid + 3] = True
    ws = watershed(sobel(gaussian(eq, 1.5)), _markers(eq, background, (t + t_low) / 2))
    cand = ndi.binary_opening((ws >= 2) & (eq < t), disk(2))
    cand[:, mid - 1:mid + 2] = False
    lab = label(cand)
    best: dict = {}
    for p in regionprops(lab):
        r, c = p.centroid
        side = "right" if c < mid else "left"
        if p.area > 0.02 * H * W and 0.12 * H < r < 0.75 * H and 0.1 * W < c < 0.9 * W:
            if side not in best or p.area > best[side].area:
                best[side] = p
    missing = [s for s in ("right", "left") if s not in best]
    if missing:
        raise ToolError(
            f"no plausible {' or '.join(missing)} lung field found: not a frontal chest radiograph, "
            "or the lung is largely opacified"
        )
    a_r, a_l = best["right"].area, best["left"].area
    (r0a, _, r1a, _), (r0b, _, r1b, _) = best["right"].bbox, best["left"].bbox
    overlap = (min(r1a, r1b) - max(r0a, r0b)) / min(r1a - r0a, r1b - r0b)
    if min(a_r, a_l) / max(a_r, a_l) < 0.25:
        raise ToolError(f"the two lung fields found differ too much in area (ratio {min(a_r, a_l) / max(a_r, a_l):.2f}); "
                        "one lung is probably largely opacified or the view is not frontal")
    if min(r1a - r0a, r1b - r0b) < 0.2 * H or overlap < 0.5:
        raise ToolError("the dark regions found are not two side-by-side lung fields (too short or vertically offset)")
    masks = []
    for s in ("right", "left"):
        m = ndi.binary_fill_holes(ndi.binary_closing(np.pad(lab == best[s].label, 6), disk(5)))[6:-6, 6:-6]
        masks.append(resize(m.astype(np.float32), (h, w), order=1) > 0.5)
    return LungFields(right=masks[0], left=masks[1], midline_col=(mid + 0.5) * w / W - 0.5)


class Overlay:
    """The radiograph as an RGB picture to draw on, shrunk by an integer factor to at most DISPLAY_SIDE px
    a side (a 4k PNG takes seconds to encode); drawing calls take the image's own pixel coordinates."""

    def __init__(self, gray: np.ndarray):
        self.s = max(1, -(-max(gray.shape) // DISPLAY_SIDE))
        self.rgb = np.repeat(to_uint8(gray[:: self.s, :: self.s])[..., None], 3, axis=-1)
        self.t = max(1, max(self.rgb.shape[:2]) // 400)  # line half-thickness

    @property
    def scale_note(self) -> str:
        return "" if self.s == 1 else f" (shown at 1/{self.s} scale)"

    def tint(self, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.25) -> None:
        m = mask[:: self.s, :: self.s]
        self.rgb[m] = ((1 - alpha) * self.rgb[m] + alpha * np.array(colour)).astype(np.uint8)
        edge = find_boundaries(m, mode="inner")
        if self.t > 1:
            edge = ndi.binary_dilation(edge, iterations=self.t // 2)
        self.rgb[edge] = colour

    def hline(self, row: int, c0: int, c1: int, colour: tuple[int, int, int]) -> None:
        """A horizontal measurement line with end ticks."""
        h, w = self.rgb.shape[:2]
        row, c0, c1, t = row // self.s, c0 // self.s, c1 // self.s, self.t
        self.rgb[max(0, row - t):min(h, row + t + 1), max(0, c0):min(w, c1 + 1)] = colour
        tick = 4 * t + 4
        for c in (c0, c1):
            self.rgb[max(0, row - tick):min(h, row + tick + 1), max(0, c - t):min(w, c + t + 1)] = colour

    def vline(self, col: int, r0: int, r1: int, colour: tuple[int, int, int]) -> None:
        h, w = self.rgb.shape[:2]
        col, r0, r1, t = col // self.s, r0 // self.s, r1 // self.s, self.t
        self.rgb[max(0, r0):min(h, r1 + 1), max(0, col - t):min(w, col + t + 1)] = colour


def spacing_check(cols: tuple[int, int], col_mm: float) -> str:
    """A note when the lung fields' width in mm is implausible for a chest (the spacing tag is then suspect)."""
    width = (cols[1] - cols[0]) * col_mm
    if 150.0 <= width <= 450.0:
        return ""
    return (f"the lung fields span {width:.0f} mm across, implausible for a chest: the file's pixel spacing "
            "is probably wrong (e.g. kept from a larger original), so mm sizes are doubtful")
