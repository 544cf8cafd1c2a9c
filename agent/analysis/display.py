"""Display and geometry helpers shared by the image tools: gray to 8 bits, the 2D picture of a view, boxes to pixels,
and the Hounsfield-unit test. Pure numpy over agent.core.state.ImageView."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from skimage.draw import line
from skimage.segmentation import find_boundaries

from agent.core.state import ImageView


def looks_like_hu(arr: np.ndarray) -> bool:
    """True if a gray image's values look like Hounsfield units: air near -1000 and dense tissue above +100.

    Values below -3100 (padding outside the reconstruction circle, e.g. -3024 or -32768) are ignored."""
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
        return False
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if lo < -3100.0:
        rest = arr[arr >= -3100.0]
        lo = float(rest.min()) if rest.size else lo
    return lo <= -500.0 and hi >= 100.0


def is_rgb(view: ImageView) -> bool:
    return view.photometric == "RGB"


def picture(arr: np.ndarray, view: ImageView, slice_index: int | None) -> tuple[np.ndarray, int | None, list[str]]:
    """The 2D picture a 2D tool acts on: the image itself, or slice `slice_index` (axis 0; default the middle) of a
    gray volume; returns (picture, the slice or None, notes). ValueError when the slice is outside the volume."""
    if not is_rgb(view) and arr.ndim == 3:
        k = arr.shape[0] // 2 if slice_index is None else slice_index
        if not 0 <= k < arr.shape[0]:
            raise ValueError(f"slice_index {k} is outside the volume's slices 0..{arr.shape[0] - 1}")
        return arr[k], k, []
    return arr, None, ["slice_index ignored: the view is 2D"] if slice_index not in (None, 0) else []


def to_uint8(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Gray image to uint8 for display: linear between lo and hi (default: the 1st/99th percentiles)."""
    img = np.asarray(img, dtype=np.float32)
    if lo is None or hi is None:
        p1, p99 = (float(v) for v in np.percentile(img, [1, 99]))
        lo, hi = p1 if lo is None else lo, p99 if hi is None else hi
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((img - lo) * scale).clip(0, 255).astype(np.uint8)


def display_slice(arr: np.ndarray, rgb: bool, index: int | None = None) -> np.ndarray:
    """The 2D picture of a view: itself, or slice `index` (default the middle) of a volume."""
    if rgb or arr.ndim == 2:
        return arr
    return arr[arr.shape[0] // 2 if index is None else index]


def bbox_to_px(bbox: list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """[row0, col0, row1, col1] in pixels, or fractions of the image when all four lie in [0, 1];
    returns integer pixel bounds clipped to the image (end exclusive). Raises ValueError if empty."""
    if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
        raise ValueError(f"bbox must be four finite numbers [row0, col0, row1, col1], got {bbox}")
    r0, c0, r1, c1 = (float(v) for v in bbox)
    if all(0.0 <= v <= 1.0 for v in (r0, c0, r1, c1)):
        r0, r1, c0, c1 = r0 * height, r1 * height, c0 * width, c1 * width
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"bbox {bbox} is empty: row1 must exceed row0 and col1 must exceed col0")
    ir0, ic0 = max(0, math.floor(r0)), max(0, math.floor(c0))
    ir1, ic1 = min(height, math.ceil(r1)), min(width, math.ceil(c1))
    if ir1 <= ir0 or ic1 <= ic0:
        raise ValueError(f"bbox {bbox} does not overlap the {height}×{width} image (or is empty)")
    return ir0, ic0, ir1, ic1


def rgb_canvas(img: np.ndarray, rgb: bool) -> np.ndarray:
    """A writable uint8 (H, W, 3) copy to draw an overlay on: a colour picture as is, a gray one to 8 bits between its
    1st and 99th percentiles (`to_uint8`)."""
    base = img if rgb else np.repeat(to_uint8(img)[..., None], 3, axis=-1)
    return np.array(base, dtype=np.uint8, copy=True)


def outline(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Draw the inner boundary of `mask` on `canvas` in `colour`."""
    canvas[find_boundaries(mask, mode="inner")] = colour


def draw_segment(canvas: np.ndarray, ends: tuple[tuple[float, float], tuple[float, float]], colour: tuple[int, int, int]) -> None:
    """Draw the straight line between two (row, col) points (a measured diameter), clipped to the canvas."""
    h, w = canvas.shape[:2]
    (a_r, a_c), (b_r, b_c) = ends
    rr, cc = line(int(round(a_r)), int(round(a_c)), int(round(b_r)), int(round(b_c)))
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    canvas[rr[ok], cc[ok]] = colour


def box_edges(canvas: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int] = (255, 255, 0)) -> None:
    """Draw the edges of a [row0, col0, row1, col1) pixel box (end exclusive)."""
    r0, c0, r1, c1 = box
    for edge in (np.s_[r0, c0:c1], np.s_[r1 - 1, c0:c1], np.s_[r0:r1, c0], np.s_[r0:r1, c1 - 1]):
        canvas[edge] = colour


def shrink_for_display(rgb: np.ndarray, side: int = 2048) -> tuple[np.ndarray, str]:
    """An overlay shrunk by an integer factor (box filter) to at most `side` px a side, and a note saying so."""
    s = -(-max(rgb.shape[:2]) // side)
    if s <= 1:
        return rgb, ""
    return np.asarray(Image.fromarray(rgb).reduce(s)), f" (shown at 1/{s} scale)"
