"""Inference helpers for the 2D organ segmenter trained on SLAKE 1.0 masks (organ_seg_slake).

Method: a MONAI 2D U-Net (architecture given as data, the card's `input.net`) takes one slice or picture resized to
`size` x `size` (bilinear, antialiased) after percentile scaling (0.5..99.5 -> 0..1, clipped), so 0..255 JPEGs and HU
or raw MR values land on the same range. Logits are upsampled bilinearly to the original shape, then softmax and
argmax (the card's `input.tta: [hflip]` averages the softmax with that of the mirrored picture first); index 0 is
background. Left/right organs are trained as one merged class (so horizontal flips are
label-safe), except in a network trained without flips for the one-sided organs (`ClassOverride`, organ_seg_slake 1.3:
liver and spleen); `sides` splits a predicted organ into connected components and places each one left, right or on the
midline of the picture relative to the body's centroid column. Image sides are not patient sides: under the
radiological convention image left = patient right, which is the caller's business.
Shared by scripts/train_organ_segmenter.py and the runtime tool; no training code here. Research use only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks import nets
from skimage.measure import label, regionprops

ARCHS = ("UNet", "BasicUNet", "AttentionUnet")
MIN_COMPONENT = 0.02  # components under 2 % of the organ's area are ignored by `sides`
MIDLINE_BALANCE = 0.6  # a component whose extent on the smaller side is >= 60 % of the larger side is "midline"


class ClassOverride(torch.nn.Module):
    """A base network whose probabilities for some classes come from an expert network over the same labels.

    p = base softmax (with `base_tta: [hflip]`, the mean of the picture's and its mirror's), q = expert softmax, S =
    the override channels: out[c in S] = q[c], out[k not in S] = p[k] * (1 - q_S) / (1 - p_S), which sums to 1.
    Returns log-probabilities, so predict()'s softmax gives them back. Used for organ_seg_slake 1.3: liver and
    spleen (unpaired, one-sided organs) from a network trained without flips, everything else from the flip-trained
    one (scripts/compose_organ_segmenter.py)."""

    def __init__(self, base: torch.nn.Module, expert: torch.nn.Module, classes: list[int],
                 base_tta: tuple[str, ...] = ()):
        super().__init__()
        self.base, self.expert, self.base_tta = base, expert, tuple(base_tta)
        self.classes = list(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.base(x), 1)
        if "hflip" in self.base_tta:
            p = 0.5 * (p + torch.softmax(self.base(x.flip(-1)), 1).flip(-1))
        q = torch.softmax(self.expert(x), 1)
        s = torch.zeros(p.shape[1], dtype=torch.bool)
        s[self.classes] = True
        q_s, p_s = q[:, s].sum(1, keepdim=True), p[:, s].sum(1, keepdim=True)
        out = p * (1 - q_s) / (1 - p_s).clamp_min(1e-6)
        out[:, s] = q[:, s]
        return torch.log(out.clamp_min(1e-8))


def build_net(cfg: dict[str, Any]) -> torch.nn.Module:
    """The network described by `cfg` (the card's `input` dict, or its `net` entry): `arch` (default UNet) + kwargs;
    `arch: ClassOverride` takes `base` and `expert` (two such descriptions), `classes` (channel indices) and
    `base_tta`."""
    kw = dict(cfg.get("net", cfg))
    arch = kw.pop("arch", "UNet")
    if arch == "ClassOverride":
        return ClassOverride(build_net(kw["base"]), build_net(kw["expert"]), [int(c) for c in kw["classes"]],
                             tuple(kw.get("base_tta") or ()))
    if arch not in ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}; expected one of {ARCHS}")
    for k in ("channels", "strides"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return getattr(nets, arch)(**kw)


def load_net(cfg: dict[str, Any], weights: str | Path) -> torch.nn.Module:
    """Build the network and load a (possibly float16) state_dict; returns it in eval mode, float32."""
    net = build_net(cfg)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


def _gray(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(-1) if a.shape[-1] in (3, 4) else a.mean(0)
    if a.ndim != 2:
        raise ValueError(f"expected a 2D picture, got shape {np.shape(img)}")
    return a


def preprocess(img: np.ndarray, rgb: bool, size: int) -> np.ndarray:
    """Float32 (C, size, size): C = 3 if `rgb` (uint8 RGB / 255) else 1 (gray, percentile 0.5..99.5 -> 0..1)."""
    if rgb:
        a = np.asarray(img, dtype=np.float32)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        a = np.moveaxis(a[..., :3], -1, 0) / 255.0
    else:
        g = _gray(img)
        lo, hi = np.percentile(g, [0.5, 99.5])
        a = (np.clip((g - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0))[None]
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].numpy().astype(np.float32)


WORK_PX = 1024  # logits are upsampled to at most this a side; labels then to the picture's own grid (nearest)


TTA = ("hflip",)  # test-time augmentations predict() knows


@torch.no_grad()
def predict(net: torch.nn.Module, img: np.ndarray, rgb: bool, size: int,
            with_probs: bool = True, tta: tuple[str, ...] | list[str] = ()) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels int64 (H, W) at the input picture's original shape, probs float32 (K, h, w) or None), where (h, w) is
    (H, W) for pictures up to WORK_PX a side and that shape scaled down to WORK_PX otherwise: upsampling every class's
    logits to a 4096 px picture took 15 s and gigabytes for nothing the network resolves.

    `tta` ("hflip", the card's `input.tta`): the softmax of the picture and of its horizontal mirror (mirrored back)
    are averaged before the argmax - label-safe since left/right organs are one class; twice the network time."""
    unknown = set(tta) - set(TTA)
    if unknown:
        raise ValueError(f"unknown test-time augmentation {sorted(unknown)}; expected some of {TTA}")
    h, w = np.asarray(img).shape[:2]
    scale = min(1.0, WORK_PX / max(h, w))
    wh, ww = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(preprocess(img, rgb, size))[None]
    net = net.eval()
    if "hflip" in tta:
        p = 0.5 * (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(-1)), 1).flip(-1))
        p = F.interpolate(p, size=(wh, ww), mode="bilinear", align_corners=False)[0]
        labels = p.argmax(0)
        probs = p.numpy().astype(np.float32) if with_probs else None
    else:
        logits = F.interpolate(net(x), size=(wh, ww), mode="bilinear", align_corners=False)[0]
        labels = logits.argmax(0)
        probs = torch.softmax(logits, 0).numpy().astype(np.float32) if with_probs else None
    if (wh, ww) != (h, w):
        labels = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    return labels.numpy().astype(np.int64), probs


def peak_probability(prob: np.ndarray, fraction: float) -> float:
    """A class's mean probability over its `fraction` of the picture where it is most likely (at least one pixel): how
    close the network came to finding an organ of the minimum size it reports - the presence signal behind "absent"."""
    flat = np.asarray(prob, dtype=np.float32).ravel()
    k = max(1, min(flat.size, int(round(fraction * flat.size))))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def apply_floors(labels: np.ndarray, names: list[str], floors: dict[str, float]) -> tuple[np.ndarray, list[str]]:
    """`labels` with every class whose area is under its presence floor (the card's `input.presence_floor`: class ->
    fraction of the picture) set to background, and the names of the classes so removed. Floors are chosen on the
    held-out slice of SLAKE train (scripts/tune_organ_refine.py) to drop small false positives."""
    out, dropped = labels, []
    for name, frac in floors.items():
        if name not in names:
            raise ValueError(f"presence floor for {name!r}, which is not one of the card's labels")
        m = labels == names.index(name) + 1
        n = int(m.sum())
        if 0 < n < float(frac) * labels.size:
            out = out.copy() if out is labels else out
            out[m] = 0
            dropped.append(name)
    return out, dropped


def gray8(img: np.ndarray) -> np.ndarray:
    """The picture as (H, W, 3) uint8 for the box-prompted refiner: gray, percentile 0.5..99.5 -> 0..255."""
    g = _gray(img)
    lo, hi = np.percentile(g, [0.5, 99.5])
    u8 = np.clip((g - lo) / max(float(hi - lo), 1e-6) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(u8[..., None], 3, -1)


def body_mask(img: np.ndarray, rgb: bool = False) -> np.ndarray:
    """Pixels clearly above background (p1 + 15 % of the p1..p99 range), largest component, holes filled."""
    g = _gray(img)  # rgb pictures are reduced to their mean channel either way
    lo, hi = np.percentile(g, [1, 99])
    fg = g > lo + 0.15 * max(float(hi - lo), 1e-6)
    lab = label(fg, connectivity=2)
    if lab.max() == 0:
        return fg
    body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    holes = label(~body, connectivity=1)
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    return body | ~np.isin(holes, border)


def sides(mask: np.ndarray, body: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Connected components (>= 2 % of the organ's area) of one organ's mask with their image side.

    Each: centroid (row, col), area_px, bbox [r0, c0, r1, c1] (r1, c1 exclusive), image_side left|right|midline;
    the midline is the body's centroid column (image centre without a body). A component is `midline` when it
    crosses the midline with its extent on the smaller side at least 60 % of that on the larger side.
    """
    mask = np.asarray(mask, dtype=bool)
    if body is not None and np.asarray(body).any():
        mid = float(np.nonzero(body)[1].mean())
    else:
        mid = (mask.shape[1] - 1) / 2.0
    total = int(mask.sum())
    out: list[dict[str, Any]] = []
    if total == 0:
        return out
    for p in regionprops(label(mask, connectivity=2)):
        if p.area < MIN_COMPONENT * total:
            continue
        r0, c0, r1, c1 = (int(v) for v in p.bbox)
        cr, cc = (float(v) for v in p.centroid)
        left_ext, right_ext = mid - c0, c1 - 1 - mid
        if min(left_ext, right_ext) > 0 and min(left_ext, right_ext) >= MIDLINE_BALANCE * max(left_ext, right_ext):
            side = "midline"
        else:
            side = "left" if cc < mid else "right"
        out.append({"centroid": [round(cr, 1), round(cc, 1)], "area_px": int(p.area), "bbox": [r0, c0, r1, c1],
                    "image_side": side})
    return sorted(out, key=lambda d: -d["area_px"])


def refine(labels: np.ndarray, targets: dict[int, float], segment: Any, min_component: float = MIN_COMPONENT,
           ) -> tuple[np.ndarray, dict[int, int]]:
    """Re-draw the outline of the classes in `targets` with a box-prompted segmenter (LiteMedSAM).

    For each target class i (value: the box margin as a fraction of the component's height/width), every connected
    component of `labels == i` with at least `min_component` of the class's area gives a box (its extent plus the
    margin, clipped); `segment(box)` returns a probability map at the picture's size for the one object in that box.
    The class's new mask is the union, over its components, of the pieces with probability > 0.5 that touch the
    component's own box; pixels the U-Net gave to another class are left to that class unless the box-prompted
    probability there is higher than 0.5 and the pixel was background or the same class before. Where two refined
    classes claim a pixel, the higher probability wins. Returns (new labels, pixels changed per class).
    """
    from scipy import ndimage as ndi

    out = labels.copy()
    h, w = labels.shape
    best = np.zeros(labels.shape, dtype=np.float32)
    claim = np.zeros(labels.shape, dtype=np.int64)
    for i, margin in targets.items():
        m = labels == i
        total = int(m.sum())
        if total == 0:
            continue
        union_p = np.zeros(labels.shape, dtype=np.float32)
        for p in regionprops(label(m, connectivity=2)):
            if p.area < min_component * total:
                continue
            r0, c0, r1, c1 = (int(v) for v in p.bbox)
            dr, dc = int(round(margin * (r1 - r0))), int(round(margin * (c1 - c0)))
            box = (max(0, r0 - dr), max(0, c0 - dc), min(h, r1 + dr), min(w, c1 + dc))
            prob = np.asarray(segment(box), dtype=np.float32)
            piece = prob > 0.5
            lab_, n = ndi.label(piece)
            if n > 1:
                keep = np.unique(lab_[r0:r1, c0:c1])
                piece = np.isin(lab_, keep[keep > 0])
            union_p = np.where(piece & (prob > union_p), prob, union_p)
        allowed = (labels == 0) | (labels == i)
        take = (union_p > 0.5) & allowed & (union_p > best)
        best[take], claim[take] = union_p[take], i
    changed: dict[int, int] = {}
    for i in targets:
        old = labels == i
        new = claim == i
        if not old.any():
            continue
        out[old & ~new] = 0
        out[new] = i
        changed[i] = int((old ^ new).sum())
    return out, changed
