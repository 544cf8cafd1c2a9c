"""Pictures for vision-capable endpoints: a view rendered as a PNG (CT windowed, downscaled), kept as an artifact.

What is sent is pixels only, de-identified as far as the header goes (nothing of it is in a PNG). Burned-in text in the
pixels (names, dates on ultrasound and secondary captures) cannot be detected here: `redact_corners` blacks out the
four corner boxes (RED_FRAC of each side) where scanners usually write it, and the trace records that it was done.
The artifact store keeps every picture sent, and the trace names it by sha256, so replay needs neither the pixels
nor the endpoint.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from agent.core.state import CaseState, ImageView
from agent.store.artifacts import ArtifactStore

RED_FRAC = 0.15
SOFT_TISSUE = (40.0, 400.0)  # CT window (centre, width) in HU for the picture sent


def render(store: ArtifactStore, view: ImageView, max_px: int, redact_corners: bool = False,
           bbox: tuple[int, int, int, int] | None = None) -> tuple[bytes, dict[str, Any]]:
    """(PNG bytes, what was done) of a view's 2D picture (a volume's middle slice), optionally cut to `bbox`
    ([row0, col0, row1, col1] in the view's pixels, end exclusive)."""
    from PIL import Image

    from agent.analysis.display import display_slice, is_rgb, looks_like_hu, to_uint8

    arr = store.get_array(view.pixels)
    rgb = is_rgb(view)
    pic = display_slice(arr, rgb)
    if bbox is not None:
        r0, c0, r1, c1 = bbox
        pic = pic[r0:r1, c0:c1]
    how: dict[str, Any] = {"view": view.id, "source_shape": list(pic.shape[:2])}
    if rgb:
        img = np.asarray(pic, dtype=np.float32)
        img = img if img.max() > 1.5 else img * 255.0
        img = img.clip(0, 255).astype(np.uint8)
    elif view.modality == "CT" and looks_like_hu(arr):
        c, w = SOFT_TISSUE
        img, how["window"] = to_uint8(pic.astype(np.float32), c - w / 2, c + w / 2), f"soft tissue C={c:g} W={w:g} HU"
    else:
        img = to_uint8(pic.astype(np.float32))
    if redact_corners:
        img = img.copy()
        h, w = img.shape[:2]
        dh, dw = max(1, int(h * RED_FRAC)), max(1, int(w * RED_FRAC))
        for rs in (slice(0, dh), slice(h - dh, h)):
            for cs in (slice(0, dw), slice(w - dw, w)):
                img[rs, cs] = 0
        how["redacted_corners"] = RED_FRAC
    im = Image.fromarray(img)
    scale = min(1.0, max_px / max(im.size))
    if scale < 1.0:
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
    how["size"] = [im.size[1], im.size[0]]  # rows, columns sent
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), how


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def planner_views(state: CaseState, max_images: int) -> list[ImageView]:
    """The views the planner looks at: the study (V1) and the latest views derived by crop_zoom or window_level."""
    derived = [v for v in state.views if v.parent is not None]
    return ([state.views[0]] + derived[-(max_images - 1):]) if max_images > 1 else [state.views[0]]


def image_parts(store: ArtifactStore, views: list[ImageView], max_px: int, redact_corners: bool) -> list[dict[str, Any]]:
    """One part per view: {view, sha256, size, ..., url}; the PNG is stored as an artifact ("llm_image")."""
    parts = []
    for v in views:
        png, how = render(store, v, max_px, redact_corners)
        ref = store.put_bytes(png, kind="llm_image", media_type="image/png", description=f"{v.id} as sent to the LLM")
        parts.append({**how, "sha256": ref.sha256, "ref": ref.model_dump(mode="json"), "url": data_url(png)})
    return parts


def content(text: str, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat content: the text, then each picture as an image_url part."""
    return [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": p.get("url") or ""}}
                                               for p in parts]


def recorded(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts as the trace holds them: no pixels; the artifact reference names the stored picture."""
    return [{k: v for k, v in p.items() if k != "url"} for p in parts]
