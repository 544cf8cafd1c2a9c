"""Try a YOLOv8n abnormality detector on SLAKE 1.0's boxes and measure its validation AP.

    .venv/bin/python scripts/train_finding_detector.py --task cxr [--epochs 15] [--imgsz 512] [--out /tmp/finding_detector_cxr]

An experiment, not a shipped tool: it writes only under --out (default /tmp). Seeded, CPU, one torch thread,
offline (YOLO_OFFLINE=1; the model is built from yolov8n.yaml, no pretrained weights, no fonts, plots off, AMP off so
no AMP-check download).

Data: SLAKE 1.0 English (../shared/data/slake_dev; CC BY 4.0; Liu et al., ISBI 2021), deduplicated by image.
`detection.json` holds `{label: [x, y, w, h]}` boxes, top-left corner + size in the source image's pixels (checked
on overlays; all boxes lie inside their images).
- `--task cxr`: chest X-rays, the 8 findings (Atelectasis, Cardiomegaly, Effusion, Infiltrate, Mass, Nodule,
  Pneumonia, Pneumothorax); every SLAKE X-ray has at least one.
- `--task lesion`: CT and MR images, the lesion classes (Liver/Lung/Kidney Cancer, Brain Edema, Brain (Non-)
  Enhancing Tumor); organ boxes are ignored and images without a lesion are kept as negatives.
Split: SLAKE train minus a 10 % hold-out (sha1 of the image path) trains the net; the hold-out picks the
checkpoint (ultralytics' fitness). SLAKE validate is used only for the final figures, never for tuning.

Figures (figures.json next to best.pt, also printed): on validate, ultralytics val of best.pt (mAP50, mAP50-95,
precision, recall, per-class AP50), class-agnostic AP50/AP50-95 (ultralytics val with single_cls=True: every
finding is one class, agnostic NMS: does it box *something abnormal* in the right place?), the same on the
hold-out, CPU inference ms per image (one thread, predict() on the source image), training time, weights size.
"""

from __future__ import annotations

import os

os.environ["YOLO_OFFLINE"] = "1"  # ultralytics.utils.is_online() -> False: no downloads, no telemetry
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", "/tmp/ultralytics_cfg")  # keep ultralytics' settings.json out of $HOME

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = (ROOT.parent / "shared" / "data" / "slake_dev").resolve()
if not DATA.exists():
    DATA = Path("/work/shared/data/slake_dev")

SEED = 20240611
HELD_OUT = 10  # percent of SLAKE train images held out for checkpoint selection
CLASSES = {
    "cxr": ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax"],
    "lesion": ["Liver Cancer", "Lung Cancer", "Kidney Cancer", "Brain Edema", "Brain Enhancing Tumor",
               "Brain Non-enhancing Tumor"],
}
MODALITIES = {"cxr": {"X-Ray"}, "lesion": {"CT", "MRI"}}


def seed_all(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)


def load_split(split: str, task: str) -> list[dict]:
    """One record per image of `split` in the task's modalities: image path, modality, boxes [(cls, x, y, w, h)]."""
    seen: dict[str, dict] = {}
    with open(DATA / f"{split}.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["modality"] in MODALITIES[task]:
                seen.setdefault(r["image"], r)
    names = CLASSES[task]
    out = []
    for image, r in sorted(seen.items(), key=lambda kv: int(kv[0].split("/")[1].removeprefix("xmlab"))):
        W, H = Image.open(DATA / image).size
        boxes = []
        for d in json.loads((DATA / r["detection"]).read_text()):
            for label, (x, y, w, h) in d.items():
                if label not in names:
                    continue
                x0, y0 = max(0.0, x), max(0.0, y)
                x1, y1 = min(float(W), x + w), min(float(H), y + h)
                if x1 - x0 < 1 or y1 - y0 < 1:
                    continue
                boxes.append((names.index(label), x0, y0, x1, y1))
        out.append({"image": image, "modality": r["modality"], "W": W, "H": H, "boxes": boxes})
    return out


def held_out(image: str) -> bool:
    return int(hashlib.sha1(image.encode()).hexdigest(), 16) % 100 < HELD_OUT


def write_subset(root: Path, subset: str, recs: list[dict], imgsz: int) -> Path:
    """images/<subset>/xmlabN.jpg (resized copy when larger than imgsz, else a symlink) + labels/<subset>/xmlabN.txt."""
    img_dir, lab_dir = root / "images" / subset, root / "labels" / subset
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for r in recs:
        stem = r["image"].split("/")[1]
        dst = img_dir / f"{stem}.jpg"
        src = DATA / r["image"]
        if max(r["W"], r["H"]) > imgsz:
            s = imgsz / max(r["W"], r["H"])
            Image.open(src).convert("RGB").resize((round(r["W"] * s), round(r["H"] * s)), Image.BILINEAR).save(
                dst, quality=95)
        else:
            dst.symlink_to(src)
        lines = [
            f"{c} {(x0 + x1) / 2 / r['W']:.6f} {(y0 + y1) / 2 / r['H']:.6f} {(x1 - x0) / r['W']:.6f} "
            f"{(y1 - y0) / r['H']:.6f}"
            for c, x0, y0, x1, y1 in r["boxes"]
        ]
        (lab_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return img_dir


def build_dataset(task: str, root: Path, imgsz: int) -> tuple[Path, Path, dict]:
    if root.exists():
        shutil.rmtree(root)
    train = load_split("train", task)
    val = load_split("validate", task)
    fit = [r for r in train if not held_out(r["image"])]
    hold = [r for r in train if held_out(r["image"])]
    names = dict(enumerate(CLASSES[task]))
    dirs = {s: write_subset(root, s, recs, imgsz) for s, recs in (("fit", fit), ("hold", hold), ("validate", val))}
    train_yaml = root / "train.yaml"  # what training sees: fit + hold-out, never validate
    train_yaml.write_text(yaml.safe_dump({"path": str(root), "train": "images/fit", "val": "images/hold",
                                          "names": names}))
    eval_yaml = root / "validate.yaml"  # final figures only
    eval_yaml.write_text(yaml.safe_dump({"path": str(root), "train": "images/fit", "val": "images/validate",
                                         "names": names}))

    def stats(recs):
        return {"images": len(recs), "images_with_box": sum(bool(r["boxes"]) for r in recs),
                "boxes": sum(len(r["boxes"]) for r in recs),
                "boxes_per_class": {CLASSES[task][c]: n for c, n in
                                    sorted(Counter(b[0] for r in recs for b in r["boxes"]).items())},
                "modalities": dict(Counter(r["modality"] for r in recs))}

    info = {"fit": stats(fit), "hold": stats(hold), "validate": stats(val)}
    return train_yaml, eval_yaml, {"counts": info, "validate_images": [str(DATA / r["image"]) for r in val],
                                   "dirs": {k: str(v) for k, v in dirs.items()}}


def box_figures(metrics, names: list[str]) -> dict:
    b = metrics.box
    per_class = {names[int(c)]: round(float(b.ap50[i]), 4) for i, c in enumerate(b.ap_class_index)}
    return {"mAP50": round(float(b.map50), 4), "mAP50-95": round(float(b.map), 4),
            "precision": round(float(b.mp), 4), "recall": round(float(b.mr), 4), "per_class_AP50": per_class}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(CLASSES), default="cxr")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--imgsz", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="default /tmp/finding_detector_<task>")
    args = ap.parse_args()
    out = (args.out or Path(f"/tmp/finding_detector_{args.task}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seed_all()

    import ultralytics.utils.torch_utils as tu
    from ultralytics import YOLO

    tu.NUM_THREADS = 1  # select_device() resets torch threads to this

    train_yaml, eval_yaml, info = build_dataset(args.task, out / "data", args.imgsz)
    print(json.dumps(info["counts"], indent=1))
    names = CLASSES[args.task]

    model = YOLO("yolov8n.yaml")  # from scratch: no pretrained weights here
    t0 = time.perf_counter()
    model.train(data=str(train_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device="cpu",
                workers=0, pretrained=False, plots=False, amp=False, seed=SEED, deterministic=True,
                project=str(out), name="train", exist_ok=True, verbose=False, patience=max(args.epochs, 100))
    train_s = time.perf_counter() - t0
    weights = out / "train" / "weights" / "best.pt"

    torch.set_num_threads(1)
    best = YOLO(str(weights))
    common = dict(imgsz=args.imgsz, batch=8, device="cpu", workers=0, plots=False, verbose=False, conf=0.001,
                  iou=0.7, project=str(out), exist_ok=True)
    val = box_figures(best.val(data=str(eval_yaml), name="val", **common), names)
    val_agn = box_figures(best.val(data=str(eval_yaml), name="val_agnostic", single_cls=True, **common), names)
    hold = box_figures(best.val(data=str(train_yaml), name="hold", **common), names)
    hold_agn = box_figures(best.val(data=str(train_yaml), name="hold_agnostic", single_cls=True, **common), names)

    # CPU inference time per image: one thread, predict() on the source image (pre/post-processing included).
    torch.set_num_threads(1)
    imgs = info["validate_images"]
    for p in imgs[:3]:
        best.predict(p, imgsz=args.imgsz, device="cpu", verbose=False)
    ms = []
    for p in imgs:
        t = time.perf_counter()
        best.predict(p, imgsz=args.imgsz, device="cpu", verbose=False)
        ms.append((time.perf_counter() - t) * 1000)

    figures = {
        "task": args.task, "classes": names, "epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch,
        "seed": SEED, "model": "yolov8n.yaml from scratch",
        "data": info["counts"],
        "validate": {**val, "class_agnostic_AP50": val_agn["mAP50"], "class_agnostic_AP50-95": val_agn["mAP50-95"],
                     "class_agnostic_precision": val_agn["precision"], "class_agnostic_recall": val_agn["recall"]},
        "hold_out": {**hold, "class_agnostic_AP50": hold_agn["mAP50"]},
        "train_seconds": round(train_s, 1),
        "inference_ms_per_image": {"median": round(statistics.median(ms), 1), "mean": round(statistics.mean(ms), 1),
                                   "n": len(ms), "threads": torch.get_num_threads()},
        "weights": str(weights), "weights_bytes": weights.stat().st_size,
        "command": f".venv/bin/python scripts/train_finding_detector.py --task {args.task} --epochs {args.epochs} "
                   f"--imgsz {args.imgsz} --batch {args.batch} --out {out}",
    }
    (weights.parent / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    print(f"wrote {weights.parent / 'figures.json'}")


if __name__ == "__main__":
    main()
