"""Small mask helpers shared by the classical segmentation tools (a private module: not a tool)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def disk(r: int) -> np.ndarray:
    """A filled disk of radius r as a boolean structuring element."""
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def clean(fg: np.ndarray, r: int) -> np.ndarray:
    """Open, close and fill holes; edge padding keeps objects that run off the image intact."""
    p = np.pad(fg, r + 1, mode="edge")
    p = ndi.binary_closing(ndi.binary_opening(p, disk(r)), disk(r))
    return ndi.binary_fill_holes(p[r + 1 : -r - 1, r + 1 : -r - 1])


def border(shape: tuple[int, ...]) -> np.ndarray:
    """True on the outermost rows and columns."""
    b = np.zeros(shape, dtype=bool)
    b[0, :] = b[-1, :] = b[:, 0] = b[:, -1] = True
    return b


def vignette(g: np.ndarray, r: int) -> np.ndarray:
    """A dark region (below half the median) holding two or more image corners: outside the field of view."""
    lab, _ = ndi.label(g < 0.5 * float(np.median(g)))
    corners = [lab[0, 0], lab[0, -1], lab[-1, 0], lab[-1, -1]]
    keep = [k for k in set(corners) - {0} if corners.count(k) >= 2]
    art = np.isin(lab, keep)
    if not art.any() or (~art).sum() < 0.3 * g.size:
        return np.zeros_like(art)
    return ndi.binary_dilation(art, disk(r + 1))
