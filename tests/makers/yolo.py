"""A small Ultralytics YOLO detector the project trains itself (no pretrained weights, no downloads): generated
gray pictures of bright filled discs and hollow square frames on a noisy dark background, YOLO txt labels and a
dataset YAML, trained from the yolo11n.yaml architecture that ships inside the ultralytics package; best.pt is copied
next to its card.

`draw(rng, shape)` makes one picture with its true boxes, for tests that need new images of any size.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import write_card

LABELS = ["disc", "frame"]
# 30 epochs of 48 pictures are 180 steps: Ultralytics' defaults (100 warm-up steps, mosaic, scale 0.5, SGD/auto lr)
# leave yolo11n at mAP50 0 to 0.5 there; this reaches about 0.99 in about 70 s on two CPU cores
RECIPE: dict[str, Any] = {"warmup_epochs": 0, "mosaic": 0.0, "scale": 0.25, "optimizer": "AdamW", "lr0": 0.004}


def draw(rng: np.random.Generator, shape: tuple[int, int], n: tuple[int, int] = (1, 4), size: tuple[int, int] = (18, 40)
         ) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """(uint8 picture, [(class id, [row0, col0, row1, col1] end exclusive), ...]): n[0] to n[1]-1 non-overlapping
    bright filled discs (class 0) and hollow square frames (class 1; filled squares and discs are too alike for 30
    epochs: labels right about 60 %) of side size[0] to size[1]-1 px on dark noise."""
    h, w = shape
    img = rng.normal(40, 12, (h, w))
    rr, cc = np.mgrid[:h, :w]
    boxes: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(*n))):
        for _try in range(50):
            s = int(rng.integers(*size))
            r0, c0 = int(rng.integers(2, h - s - 2)), int(rng.integers(2, w - s - 2))
            box = [float(r0), float(c0), float(r0 + s), float(c0 + s)]
            if all(box[2] + 4 <= b[0] or b[2] + 4 <= box[0] or box[3] + 4 <= b[1] or b[3] + 4 <= box[1] for _, b in boxes):
                break
        else:
            continue
        k = int(rng.integers(0, 2))
        value = rng.uniform(170, 235)
        if k == 0:
            rc, ccen, rad = r0 + s / 2 - 0.5, c0 + s / 2 - 0.5, s / 2
            img[(rr - rc) ** 2 + (cc - ccen) ** 2 <= rad ** 2] = value
        else:
            t = max(3, s // 5)
            frame = np.zeros((s, s), bool)
            frame[:t], frame[-t:], frame[:, :t], frame[:, -t:] = True, True, True, True
            img[r0:r0 + s, c0:c0 + s][frame] = value
        boxes.append((k, box))
    img += rng.normal(0, 6, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def write_dataset(root: Path, n_train: int = 48, n_val: int = 16, side: int = 160, seed: int = 0,
                  size: tuple[int, int] = (18, 40)) -> Path:
    """Images, YOLO labels (class cx cy w h, normalised) and data.yaml under root; returns data.yaml."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, boxes = draw(rng, (side, side), size=size)
            Image.fromarray(img).save(root / "images" / split / f"{i:03d}.png")
            lines = [f"{k} {(c0 + c1) / 2 / side:.6f} {(r0 + r1) / 2 / side:.6f} {(c1 - c0) / side:.6f} "
                     f"{(r1 - r0) / side:.6f}" for k, (r0, c0, r1, c1) in boxes]
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {i}: {name}\n" for i, name in enumerate(LABELS)))
    return data


@contextmanager
def _no_font_fetch():
    """Ultralytics' dataset check fetches Arial.ttf for its plots (a HEAD request even offline); plots are off, so
    skip it."""
    import ultralytics.data.utils as du

    saved = du.check_font
    du.check_font = lambda *a, **k: None
    try:
        yield
    finally:
        du.check_font = saved


def make(folder: Path, epochs: int = 30, images: int = 64, side: int = 160, seed: int = 0, batch: int = 8,
         size: tuple[int, int] = (18, 40), **train: Any) -> Path:
    """Train the tiny detector under `folder` (dataset and runs in sub-folders) and write its card; returns the card.
    About 100 s on two CPU cores."""
    from tools.yolo_detect import offline_ultralytics

    offline_ultralytics()
    import torch
    from ultralytics import YOLO

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_val = images // 4
    data = write_dataset(folder / "data", images - n_val, n_val, side, seed, size)
    t0 = time.perf_counter()
    model = YOLO("yolo11n.yaml", task="detect")
    threads = torch.get_num_threads()  # its select_device() sets them for the whole process
    with _no_font_fetch():
        model.train(data=str(data), epochs=epochs, imgsz=side, batch=batch, workers=0, device="cpu", plots=False,
                    project=str(folder / "runs"), name="train", exist_ok=True, seed=seed, deterministic=True,
                    pretrained=False, amp=False, verbose=False, val=True,
                    **{**RECIPE, **train})
    torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    trainer: Any = model.trainer
    metrics = trainer.metrics or {}
    best = Path(trainer.best)
    shutil.copy2(best, folder / "yolo_tiny.pt")
    figures = {
        "mAP50": round(float(metrics.get("metrics/mAP50(B)", 0.0)), 3),
        "mAP50-95": round(float(metrics.get("metrics/mAP50-95(B)", 0.0)), 3),
        "recall": round(float(metrics.get("metrics/recall(B)", 0.0)), 3),
        "precision": round(float(metrics.get("metrics/precision(B)", 0.0)), 3),
        "dataset": f"{n_val} generated {side}-px validation images (discs, frames)",
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
    }
    return write_card(folder, "yolo_tiny.pt", name="yolo_tiny", kind="detect", adapter="yolo", modalities=["any"],
                      labels=list(LABELS), input={"size": side}, validation=figures)
