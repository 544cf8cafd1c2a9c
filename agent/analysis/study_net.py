"""The study classifier's network and input normalisation, shared by its training script and the runtime.

`scripts/train_study_classifier.py` trains it; `agent/analysis/study.py` runs it (card `study_cnn_v1` in
tools/models/). One small CNN (five conv blocks, global average pooling, about 0.3 M parameters) with three heads:

- modality: CT, MR, DX (radiograph), US, XC (dermoscopy / clinical photo), OP (fundus), ES (endoscopy),
  SM (microscopy / pathology), OT (anything else, non-medical pictures included);
- plane: axial, coronal, sagittal (cross-sectional), frontal, lateral (radiographs);
- region: head, neck, chest, abdomen, pelvis (no limb images were available to train on, so there is no limb class).

Input (`preprocess`): the 2D picture (a volume's middle slice), letterboxed into SIZE x SIZE (aspect ratio kept, black
bars), three channels in [0, 1]: RGB / 255 as is; a gray picture in Hounsfield units through a soft-tissue window
(-160..240 HU, as CT is usually exported), any other gray picture between its 0.5th and 99.5th percentiles, repeated
to three channels. Each head's logits are divided by its temperature (fitted on held-out data, stored in the card)
before the softmax. Only numpy and torch here: no project types.
"""

from __future__ import annotations

import numpy as np

MODALITIES = ("CT", "MR", "DX", "US", "XC", "OP", "ES", "SM", "OT")
PLANES = ("axial", "coronal", "sagittal", "frontal", "lateral")
REGIONS = ("head", "neck", "chest", "abdomen", "pelvis")
HEADS = {"modality": MODALITIES, "plane": PLANES, "region": REGIONS}
SIZE = 128
HU_WINDOW = (-160.0, 240.0)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (h, w) + img.shape[2:], order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def preprocess(img: np.ndarray, rgb: bool, hu: bool = False, size: int = SIZE) -> np.ndarray:
    """(3, size, size) float32 in [0, 1]: the picture normalised as the module docstring says, letterboxed."""
    a = np.asarray(img)
    if rgb:
        x = a[..., :3].astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        if hu:
            lo, hi = HU_WINDOW
        else:
            lo, hi = (float(v) for v in np.percentile(a, [0.5, 99.5]))
        x = np.clip((a - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(a)
        x = np.repeat(x[..., None], 3, axis=-1)
    h, w = x.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = _resize(x, nh, nw)
    out = np.zeros((size, size, 3), np.float32)
    r0, c0 = (size - nh) // 2, (size - nw) // 2
    out[r0:r0 + nh, c0:c0 + nw] = np.clip(small, 0.0, 1.0)
    return out.transpose(2, 0, 1).copy()


def build_net(width: int = 16):
    """The network (torch imported here, so importing this module stays cheap)."""
    import torch
    from torch import nn

    class StudyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [3, width, 2 * width, 4 * width, 6 * width, 8 * width]
            blocks: list[nn.Module] = []
            for a, b in zip(chans, chans[1:], strict=False):
                blocks += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                           nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                           nn.MaxPool2d(2)]
            self.features = nn.Sequential(*blocks)
            self.drop = nn.Dropout(0.2)
            self.heads = nn.ModuleDict({k: nn.Linear(chans[-1], len(v)) for k, v in HEADS.items()})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            f = self.drop(self.features(x).mean(dim=(2, 3)))
            return {k: head(f) for k, head in self.heads.items()}

    return StudyNet()


def predict(net, batch: np.ndarray, temperatures: dict[str, float]) -> list[dict[str, dict[str, float]]]:
    """Calibrated probabilities per image and head: [{"modality": {"CT": p, ...}, "plane": ..., "region": ...}]."""
    import torch

    with torch.inference_mode():
        logits = net(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    out: list[dict[str, dict[str, float]]] = [{} for _ in range(batch.shape[0])]
    for head, names in HEADS.items():
        p = torch.softmax(logits[head] / float(temperatures.get(head, 1.0)), dim=1).numpy()
        for i in range(batch.shape[0]):
            out[i][head] = {n: round(float(v), 4) for n, v in zip(names, p[i], strict=True)}
    return out
