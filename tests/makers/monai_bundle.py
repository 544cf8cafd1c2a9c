"""A tiny MONAI bundle the project trains itself: a 2-level monai UNet that segments bright ellipsoids (3D) or
ellipses (2D) in noise, laid out as in the MONAI Model Zoo (configs/inference.json, configs/metadata.json,
models/model.pt as a state_dict), with its card.

The inference config is zoo-shaped on purpose: `imports`, `bundle_root`, `output_dir`, a `device` expression,
`network_def` + `network`, `preprocessing` (LoadImaged, EnsureChannelFirstd, Orientationd RAS, ScaleIntensityRanged
-100..300 -> 0..1, EnsureTyped), `inferer` (SlidingWindowInferer), `postprocessing` (Activationsd softmax,
AsDiscreted argmax, SaveImaged into `output_dir`, which the adapter must neutralise), and the dataset / evaluator /
checkpointloader sections the adapter must leave unresolved (their dataset_dir does not exist).

Training (one CPU thread, deterministic for a seed): 300 steps of 4 synthetic patches (24^3, or 48^2 in 2D) with
0-2 axis-aligned ellipsoids (radii 3-11 voxels, value +120..260) on a background of mean -30..30 and noise sd 10-35,
DiceCE loss, Adam 5e-3; about 5 s (3D) / 2 s (2D) of CPU. The Dice measured on 6 held-out synthetic volumes larger
than the window (40x48x56, or 80x96), through the bundle's own SlidingWindowInferer, goes into the card's validation:
0.98 (min 0.97) in 3D, 0.996 (min 0.985) in 2D.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from makers import write_card

A_MIN, A_MAX = -100.0, 300.0


def phantom(shape: tuple[int, ...], rng: np.random.Generator, n_max: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(image, label): noise with 0..n_max bright axis-aligned ellipsoids (ellipses in 2D), in HU-like values."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    img = rng.normal(rng.uniform(-30, 30), rng.uniform(10, 35), shape).astype(np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    for _ in range(int(rng.integers(0, n_max + 1))):
        radii = rng.uniform(3, 11, len(shape))
        centre = [rng.uniform(0, s) for s in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
        img[inside] += rng.uniform(120, 260)
        lab[inside] = 1
    return img, lab


def scale(img: np.ndarray) -> np.ndarray:
    """The bundle's ScaleIntensityRanged: -100..300 to 0..1, clipped."""
    return np.clip((img - A_MIN) / (A_MAX - A_MIN), 0.0, 1.0).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def config(dims: int, roi: int) -> dict:
    spatial = [roi] * dims
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/nonexistent/dataset",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": dims, "in_channels": 1, "out_channels": 2,
                        "channels": [8, 16], "strides": [2], "num_res_units": 0},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            *([{"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"}] if dims == 3 else []),
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": A_MIN, "a_max": A_MAX, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": spatial, "sw_batch_size": 4, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "separate_folder": False},
        ]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing"},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def train(dims: int = 3, steps: int = 300, seed: int = 0):
    """The trained UNet, the held-out Dice figures and the training time (one CPU thread: on a shared 2-core machine
    two threads spin against other processes and run 10-40x slower; the result is the same)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(dims, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(dims: int, steps: int, seed: int):
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    roi, patch = (32, 24) if dims == 3 else (64, 48)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=0)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    t0 = time.perf_counter()
    net.train()
    for _ in range(steps):
        pairs = [phantom((patch,) * dims, rng) for _ in range(4)]
        x = torch.from_numpy(np.stack([scale(p[0]) for p in pairs])[:, None])
        y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.int64))
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    net.eval()
    inferer = SlidingWindowInferer(roi_size=[roi] * dims, sw_batch_size=4, overlap=0.25)
    held_rng = np.random.default_rng(seed + 1000)
    shape = (40, 48, 56) if dims == 3 else (80, 96)
    scores = []
    with torch.no_grad():
        while len(scores) < 6:
            img, lab = phantom(shape, held_rng)
            if not lab.any():
                continue  # Dice needs a target
            pred = inferer(torch.from_numpy(scale(img))[None, None], net).argmax(1)[0].numpy().astype(bool)
            scores.append(dice(pred, lab.astype(bool)))
    return net, {"train_s": train_s, "eval_s": time.perf_counter() - t1, "dice_mean": float(np.mean(scores)),
                 "dice_min": float(np.min(scores)), "n": len(scores), "steps": steps, "patch": patch}


def make(folder: Path, steps: int = 300, dims: int = 3, seed: int = 0) -> Path:
    """Train and write `folder/<name>/` (a bundle) and `folder/card.yaml`; returns the card path."""
    import torch

    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, not {dims}")
    name = "sphere_ct_unet" if dims == 3 else "disc_unet_2d"
    roi = 32 if dims == 3 else 64
    net, figures = train(dims, steps, seed)
    root = folder / name
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(config(dims, roi), indent=2))
    meta = {
        "version": "0.1.0", "name": f"{'Sphere' if dims == 3 else 'Disc'} segmentation (dxagent test bundle)",
        "monai_version": __import__("monai").__version__, "pytorch_version": torch.__version__.split("+")[0],
        "task": f"bright {'ellipsoid' if dims == 3 else 'ellipse'} segmentation in noise (synthetic)",
        "description": "tiny UNet trained by tests/makers/monai_bundle.py on synthetic phantoms",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1,
                                 "spatial_shape": [roi] * dims, "dtype": "float32"}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                 "spatial_shape": [roi] * dims, "dtype": "float32",
                                 "channel_def": {"0": "background", "1": "sphere" if dims == 3 else "disc"}}},
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    validation = {"dice": round(figures["dice_mean"], 3), "dice_min": round(figures["dice_min"], 3),
                  "dataset": f"{figures['n']} held-out synthetic {'volumes 40x48x56' if dims == 3 else 'images 80x96'}",
                  "training": f"{steps} steps of 4 synthetic {figures['patch']}^{dims} patches, {figures['train_s']:.1f} s CPU"}
    return write_card(folder, name, name=name, kind="segment", adapter="monai_bundle", modalities=["CT", "MR"],
                      labels=["sphere" if dims == 3 else "disc"],
                      input={"dims": dims, "channels": 1, "roi": [roi] * dims, "intensity": "-100..300 -> 0..1"},
                      validation=validation)


def make_spleen_like(folder: Path, name: str = "spleen_like_unet", seed: int = 0) -> Path:
    """The MONAI Model Zoo spleen_ct_segmentation inference config (UNet 16-256 with 2 residual units and batch norm,
    Orientationd RAS, Spacingd 1.5 x 1.5 x 2.0 mm, HU -57..164, SlidingWindowInferer roi 96^3 overlap 0.5, Invertd)
    with random-initialised weights: a full-size bundle for timing the adapter, not for its masks."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    arch = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"}
    net = UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    cfg = config(3, 96)
    cfg["network_def"] = {"_target_": "UNet", **arch}
    pre = cfg["preprocessing"]["transforms"]
    pre.insert(3, {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"})
    pre[4].update(a_min=-57, a_max=164)
    cfg["inferer"]["overlap"] = 0.5
    cfg["postprocessing"]["transforms"].insert(1, {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                                                   "orig_keys": "image", "nearest_interp": False, "to_tensor": True})
    root = folder / name
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.0.1", "name": "Spleen-like CT segmentation (random weights, dxagent timing bundle)",
        "network_data_format": {"inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1}},
                                "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2}}},
    }, indent=2))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return write_card(folder, name, name=name, kind="segment", adapter="monai_bundle", modalities=["CT"],
                      labels=["spleen"], body_part="abdomen",
                      input={"dims": 3, "channels": 1, "roi": [96, 96, 96], "spacing": [1.5, 1.5, 2.0],
                             "intensity": "HU -57..164 -> 0..1"},
                      validation="random-initialised weights: timing only")
