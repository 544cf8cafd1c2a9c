"""CT in Hounsfield units: tissue classes by HU range and the body mask (the patient without the table and the air
around). The ct_tissue_composition and detect_candidates tools use them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

HU_RANGES = {"lung": "-900..-500", "fat": "-190..-30", "soft_tissue": "-29..150", "bone": ">300"}  # for labels


def tissue_masks(hu: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "lung": (hu >= -900) & (hu < -500),
        "fat": (hu >= -190) & (hu <= -30),
        "soft_tissue": (hu > -30) & (hu <= 150),
        "bone": hu > 300,
    }


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest connected object above -500 HU, with enclosed holes (lungs, airways) filled."""
    mask = hu > -500
    radius = 1 if min(hu.shape[-2:]) < 256 else 2
    st = ndi.iterate_structure(ndi.generate_binary_structure(2, 1), radius)
    st = st if hu.ndim == 2 else st[None]  # in-plane only for volumes
    opened = ndi.binary_opening(mask, structure=st)
    labels, n = ndi.label(opened)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    body = labels == (1 + int(np.argmax(sizes)))
    body = ndi.binary_dilation(body, structure=st) & mask  # give back the rim the opening took
    if body.ndim == 2:
        return ndi.binary_fill_holes(body)
    return np.stack([ndi.binary_fill_holes(s) for s in body])
