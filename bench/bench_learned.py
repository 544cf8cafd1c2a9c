"""Learned-adapter benchmark: load time, per-call time and peak memory of each model-card adapter on this CPU.

    .venv/bin/python bench/bench_learned.py [--adapters xrv sam clip yolo monai] [--calls 3] [--small]

No real medical weights can be downloaded here, so each adapter runs weights of its REAL architecture that the
project makes (random-initialised or briefly trained; speed and memory depend on the architecture, not on the
values): TorchXRayVision DenseNet-121 (18 labels, 224 px); segment-anything vit_b (1024 px; MedSAM is the same
network); CLIP ViT-B/32 (224 px; a small word-level tokenizer); ultralytics yolo11n (trained for one epoch by
tests/makers/yolo.py); a MONAI bundle with the spleen_ct_segmentation UNet (16-256 channels, 4 strides, 2 residual
units, 96³ sliding window) on a 96 x 256 x 256 CT-sized volume. `--small` runs the tiny test models instead.

Each adapter runs in its own process, in two steps: one process makes the weights and card, a second adds the card
to a fresh model store and measures: importing torch and the adapter's library, the RSS after imports,
`tool.load(card)` (sha256 of the weights + building the network), the first call through a ToolContext as the
graph runs it, then `--calls` more calls (SAM: the same picture with another box, which reuses the cached
embedding), a call on a new picture, and the process's peak RSS.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

ADAPTERS = ("xrv", "sam", "clip", "yolo", "monai")
LIBRARY = {"xrv": "torchxrayvision", "sam": "segment_anything", "clip": "transformers", "yolo": "ultralytics",
           "monai": "monai"}
TOOL = {"xrv": "xrv_classify", "sam": "sam_segment", "clip": "clip_classify", "yolo": "yolo_detect",
        "monai": "monai_bundle"}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- making weights (a process of its own) ------------------------------------------------------------------------
def make(adapter: str, folder: Path, small: bool) -> tuple[Path, str]:
    import torch
    from makers import write_card

    folder.mkdir(parents=True, exist_ok=True)
    if adapter == "xrv":
        import torchxrayvision as xrv

        labels = list(xrv.datasets.default_pathologies)
        arch = {"block_config": [2, 2, 2, 2]} if small else {}
        torch.manual_seed(0)
        net = xrv.models.DenseNet(weights=None, num_classes=len(labels), in_channels=1,
                                  **{k: tuple(v) for k, v in arch.items()})
        torch.save(net.state_dict(), folder / "xrv.pt")
        return write_card(folder, "xrv.pt", name="bench_xrv", kind="classify", adapter="torchxrayvision",
                          modalities=["DX", "CR"], labels=labels, input={"resolution": 64 if small else 224, **arch},
                          validation="random weights: timing only"), "DenseNet-121" if not small else "DenseNet (2,2,2,2)"
    if adapter == "sam":
        from makers import sam as sam_maker

        if small:
            return sam_maker.make(folder, name="bench_sam"), "ViT 48-wide, depth 2"
        from segment_anything.build_sam import build_sam_vit_b

        torch.manual_seed(0)
        torch.save(build_sam_vit_b().state_dict(), folder / "sam_vit_b.pth")
        return write_card(folder, "sam_vit_b.pth", name="bench_sam", kind="segment", adapter="sam", modalities=["any"],
                          labels=["object"], input={"model_type": "vit_b"}, validation="random weights: timing only"), "vit_b"
    if adapter == "clip":
        from makers import clip as clip_maker

        if small:
            return clip_maker.make(folder, train_steps=20, name="bench_clip"), "tiny CLIP"
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        tok = clip_maker._tokenizer("clip")
        cfg = CLIPConfig(text_config={"vocab_size": len(tok), "max_position_embeddings": 16, "pad_token_id": 0,
                                      "bos_token_id": 2, "eos_token_id": 3},
                         vision_config={"image_size": 224, "patch_size": 32})  # ViT-B/32 vision tower
        torch.manual_seed(0)
        out = folder / "clip_vit_b32"
        CLIPModel(cfg).save_pretrained(out)
        tok.save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
        return write_card(folder, "clip_vit_b32", name="bench_clip", kind="classify", adapter="clip", modalities=["any"],
                          labels=list(clip_maker.LABELS), input={"template": clip_maker.TEMPLATE},
                          validation="random weights: timing only"), "CLIP ViT-B/32"
    if adapter == "yolo":
        from makers import yolo as yolo_maker

        return yolo_maker.make(folder, epochs=1), "yolo11n (1 epoch)"
    if adapter == "monai":
        from makers import monai_bundle

        if small:
            return monai_bundle.make(folder, steps=20), "tiny UNet, roi 32³"
        return monai_bundle.make_spleen_like(folder), "spleen_ct UNet, roi 96³"
    raise ValueError(adapter)


# -- measuring (another process) ----------------------------------------------------------------------------------
def pictures(adapter: str, folder: Path, small: bool) -> tuple[list[Path], dict, list[dict]]:
    """Input files for the calls, load_views keyword arguments, and the argument sets of the calls."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files: list[Path] = []
    if adapter == "monai":
        import nibabel as nib

        shape = (48, 64, 64) if small else (96, 256, 256)  # (z, rows, cols)
        vol = rng.normal(40, 20, shape).astype(np.float32)
        z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
        vol[((z - shape[0] / 2) / 10) ** 2 + ((y - shape[1] / 2) / 20) ** 2 + ((x - shape[2] / 3) / 20) ** 2 <= 1] = 140
        p = folder / "volume.nii.gz"
        nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.diag([0.8, 0.8, 2.5, 1.0])), p)
        return [p], {"modality": "CT"}, [{}]
    side = {"xrv": (1024, 1024), "sam": (450, 600), "clip": (450, 600), "yolo": (480, 640)}[adapter]
    for i in range(2):
        if adapter == "xrv":
            img = rng.normal(120, 40, side).clip(0, 255).astype(np.uint8)
        else:
            img = rng.normal(90, 25, (*side, 3)).clip(0, 255).astype(np.uint8)
            img[100:260, 200:380] = (200, 120, 90)
        p = folder / f"picture{i}.png"
        Image.fromarray(img).save(p)
        files.append(p)
    kw = {"modality": "DX"} if adapter == "xrv" else {"modality": "XC"}
    calls = [{"bbox": [100, 200, 260, 380]}, {"bbox": [90, 190, 270, 390]}] if adapter == "sam" else [{}]
    return files, kw, calls


def measure(adapter: str, card_path: Path, folder: Path, n_calls: int, small: bool) -> dict:
    import os

    os.environ["DXAGENT_MODELS"] = str(folder / "store")
    import importlib

    import numpy as np  # noqa: F401
    from helpers import make_ctx

    from agent.engine.registry import discover
    from agent.store.artifacts import ArtifactStore
    from agent.store.models import ModelStore

    tool = discover()[TOOL[adapter]]
    t0 = time.perf_counter()
    importlib.import_module("torch")
    importlib.import_module(LIBRARY[adapter])
    import_s = time.perf_counter() - t0
    rss_imports = rss_mb()
    card = ModelStore().add(card_path)
    files, kw, calls = pictures(adapter, folder, small)
    art = ArtifactStore(folder / "artifacts")
    t0 = time.perf_counter()
    tool.load(card)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    ctx = make_ctx(art, files[0], **kw)
    why = tool.applicable(ctx.state.views[0])
    if why:
        return {"adapter": adapter, "error": why}
    t0 = time.perf_counter()
    tool.run(ctx, tool.Input(**calls[0]))
    first_s = time.perf_counter() - t0
    warm = []
    for i in range(n_calls):
        args = calls[(i + 1) % len(calls)]
        t0 = time.perf_counter()
        tool.run(ctx, tool.Input(**args))
        warm.append(time.perf_counter() - t0)
    new_s = None
    if len(files) > 1:
        ctx2 = make_ctx(art, files[1], **kw)
        t0 = time.perf_counter()
        tool.run(ctx2, tool.Input(**calls[0]))
        new_s = time.perf_counter() - t0
    weights = card.weights_path
    size = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file()) if weights.is_dir() else weights.stat().st_size
    return {"adapter": adapter, "tool": tool.name, "weights_mb": round(size / 2**20, 1), "import_s": round(import_s, 2),
            "load_s": round(load_s, 2),
            "first_call_s": round(first_s, 3), "warm_call_s": round(statistics.median(warm), 3) if warm else None,
            "new_picture_s": round(new_s, 3) if new_s is not None else None, "rss_imports_mb": round(rss_imports),
            "rss_loaded_mb": round(rss_loaded), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=ADAPTERS)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the tiny test models instead of real-size architectures")
    ap.add_argument("--step", choices=("make", "measure"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step == "make":
        t0 = time.perf_counter()
        card, arch = make(args.adapters[0], args.dir, args.small)
        print(json.dumps({"card": str(card), "arch": arch, "make_s": round(time.perf_counter() - t0, 1)}))
        return
    if args.step == "measure":
        card = Path(json.loads((args.dir / "made.json").read_text())["card"])
        print(json.dumps(measure(args.adapters[0], card, args.dir, args.calls, args.small)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="dxagent-bench-learned-") as tmp:
        for adapter in args.adapters:
            d = Path(tmp) / adapter
            d.mkdir()
            base = [sys.executable, __file__, "--adapters", adapter, "--dir", str(d)] + (["--small"] if args.small else [])
            made = subprocess.run(base + ["--step", "make"], capture_output=True, text=True)
            if made.returncode != 0:
                rows.append({"adapter": adapter, "error": "make failed: " + made.stderr.strip().splitlines()[-1][:200]})
                continue
            info = json.loads(made.stdout.strip().splitlines()[-1])
            (d / "made.json").write_text(json.dumps(info))
            got = subprocess.run(base + ["--step", "measure", "--calls", str(args.calls)], capture_output=True, text=True)
            if got.returncode != 0:
                rows.append({"adapter": adapter, "error": "measure failed: " + got.stderr.strip().splitlines()[-1][:200]})
                continue
            row = json.loads(got.stdout.strip().splitlines()[-1]) | {"arch": info["arch"], "make_s": info["make_s"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'adapter':8} {'architecture':24} {'weights MB':>10} {'import s':>8} {'load s':>7} {'1st call s':>10} {'warm s':>7} "
          f"{'new pic s':>9} {'RSS MB imports/loaded/peak':>28}")
    for r in rows:
        if "error" in r:
            print(f"{r['adapter']:8} error: {r['error']}")
            continue
        warm = "-" if r["warm_call_s"] is None else f"{r['warm_call_s']:.3f}"
        new = "-" if r["new_picture_s"] is None else f"{r['new_picture_s']:.3f}"
        print(f"{r['adapter']:8} {r['arch']:24} {r['weights_mb']:>10} {r['import_s']:>8.2f} {r['load_s']:>7.2f} "
              f"{r['first_call_s']:>10.3f} "
              f"{warm:>7} {new:>9} {str(r['rss_imports_mb']) + '/' + str(r['rss_loaded_mb']) + '/' + str(r['peak_rss_mb']):>28}")


if __name__ == "__main__":
    main()
