"""Train the study classifier (modality, plane, body region) and write its weights, card and validation figures.

    .venv/bin/python scripts/train_study_classifier.py [--epochs 40] [--out tools/models/study_cnn_v1]

Seeded, CPU, one thread, about 10 minutes here. Data (never copied into the repo):

- SLAKE 1.0 English train (../shared/data/slake_dev/train.jsonl; CC BY 4.0): modality from the file, region from its
  `location`, plane from the image's "Plane" question (Transverse -> axial, Coronal -> coronal; a radiograph's
  coronal plane is a frontal view; a radiograph with no plane question is taken as frontal: SLAKE's chest X-rays
  are frontal). SLAKE validate is held out for the figures only.
- realcases (../shared/data/realcases; per-case licences, several research / non-commercial only): modality per source,
  region chest for chest X-ray / chest CT / breast ultrasound and head for brain MRI; radiograph view from the `view`
  field (PA/AP -> frontal, L -> lateral); the brain MRI planes were assigned by the developer by eye from a contact
  sheet (BRAIN_PLANES below). Split by a hash of the case id: 30 % test (figures), 15 % calibration, 55 % fit.
- OT (other): scikit-image's and scikit-learn's bundled non-medical photographs and faces (BSD-3; the training
  photographs also as gray copies and random crops), and seeded synthetic pictures (noise, gradients, shapes, text);
  a hash split of the pictures holds some out.

Held-out calibration: a hash split of SLAKE train (15 %) and of realcases (the 15 %) fits one temperature per head
(NLL, L-BFGS). Figures (validation.json, the card): per-head accuracy, ECE (15 bins), the modality confusion matrix and
the most confident wrong guess on SLAKE validate and the realcases test split, with the pixel rules
(agent/imaging/loaders.py:guess_modality) on the same images for comparison. Because of the small weights' licence mix, the
card's licence says which sources the weights were trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.analysis.display import looks_like_hu  # noqa: E402
from agent.analysis.study_net import HEADS, MODALITIES, PLANES, REGIONS, SIZE, build_net, preprocess  # noqa: E402
from agent.imaging.loaders import load_file  # noqa: E402
from agent.imaging.modality import guess_modality  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from study_data import SEED, other_items, real_items, slake_items  # noqa: E402


def load_picture(path: Path) -> tuple[np.ndarray, bool, bool]:
    """The picture as the runtime loads it (agent/imaging/loaders.py), its middle slice for a volume: (arr, rgb, hu)."""
    ld = load_file(str(path))
    arr = ld.arr if ld.rgb or ld.arr.ndim == 2 else ld.arr[ld.arr.shape[0] // 2]
    return arr, ld.rgb, (not ld.rgb) and looks_like_hu(arr)


def encode(items: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    xs, ys, rules = [], {h: [] for h in HEADS}, []
    for it in items:
        if "array" in it:
            arr, rgb, hu = it["array"], it["rgb"], False
        else:
            arr, rgb, hu = load_picture(it["path"])
        xs.append(preprocess(arr, rgb, hu))
        rules.append(guess_modality(arr, rgb)[0])
        for h, names in HEADS.items():
            v = it["modality"] if h == "modality" else it[h]
            ys[h].append(names.index(v) if v is not None else -100)
    return np.stack(xs), {h: np.array(v, dtype=np.int64) for h, v in ys.items()}, rules


def augment(x, rng: random.Random):
    """One training sample's augmentation (torch tensor (3, S, S) in [0, 1])."""
    import torch
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as F

    x = T.RandomResizedCrop(SIZE, scale=(0.65, 1.0), ratio=(0.8, 1.25), antialias=True)(x)
    if rng.random() < 0.5:
        x = F.horizontal_flip(x)
    if rng.random() < 0.5:
        x = F.rotate(x, rng.uniform(-12, 12))
    gray = bool(torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2]))
    x = x.clamp(0, 1) ** rng.uniform(0.6, 1.6)  # another window / gamma
    x = F.adjust_contrast(x, rng.uniform(0.7, 1.3))
    x = F.adjust_brightness(x, rng.uniform(0.75, 1.25))
    if not gray:
        x = F.adjust_saturation(x, rng.uniform(0.7, 1.3))
        x = F.adjust_hue(x, rng.uniform(-0.03, 0.03))
    if rng.random() < 0.3:
        x = x + torch.randn_like(x[:1]).expand_as(x) * rng.uniform(0.0, 0.05)
    return x.clamp(0, 1)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return float(total)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    import torch

    m = labels >= 0
    if m.sum() < 5:
        return 1.0
    lg, lb = torch.tensor(logits[m]), torch.tensor(labels[m])
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lg / log_t.exp(), lb)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().clamp(0.05, 20.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "tools" / "models" / "study_cnn_v1"))
    args = ap.parse_args()
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    rng_np, rng = np.random.default_rng(SEED), random.Random(SEED)
    t0 = time.time()
    items = slake_items("train") + slake_items("validate") + real_items() + other_items(rng_np)
    x, y, rules = encode(items)
    split = np.array([it["split"] for it in items])
    print(f"{len(items)} images encoded in {time.time() - t0:.0f} s; "
          + ", ".join(f"{s} {int((split == s).sum())}" for s in ("fit", "calib", "test")), flush=True)

    fit = np.where(split == "fit")[0]
    counts = np.bincount(y["modality"][fit], minlength=len(MODALITIES)).astype(np.float64)
    w = 1.0 / np.sqrt(np.maximum(counts[y["modality"][fit]], 1))
    net = build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = max(1, len(fit) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps_per_epoch)
    xt = torch.from_numpy(x)
    yt = {h: torch.from_numpy(v) for h, v in y.items()}
    for epoch in range(args.epochs):
        net.train()
        order = rng_np.choice(fit, size=steps_per_epoch * 32, replace=True, p=w / w.sum())
        total = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * 32:(s + 1) * 32]
            batch = torch.stack([augment(xt[i], rng) for i in idx])
            out = net(batch)
            loss = sum(torch.nn.functional.cross_entropy(out[h], yt[h][idx], ignore_index=-100)
                       if (yt[h][idx] >= 0).any() else out[h].sum() * 0 for h in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / steps_per_epoch:.3f} ({time.time() - t0:.0f} s)",
              flush=True)

    net.eval()
    with torch.inference_mode():
        logits = {h: torch.cat([net(xt[i:i + 64])[h] for i in range(0, len(xt), 64)]).numpy() for h in HEADS}
    calib = split == "calib"
    temps = {h: fit_temperature(logits[h][calib], y[h][calib]) for h in HEADS}
    print("temperatures", temps, flush=True)

    def probs_of(h: str, m: np.ndarray) -> np.ndarray:
        z = logits[h][m] / temps[h]
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    figures: dict = {"seed": SEED, "epochs": args.epochs, "train_seconds": round(time.time() - t0),
                     "n": {s: int((split == s).sum()) for s in ("fit", "calib", "test")}, "temperatures": temps,
                     "sets": {}}
    sources = np.array([it["source"] for it in items])
    test_sets = {"slake_validate": (split == "test") & (sources == "slake"),
                 "realcases_test": (split == "test") & ~np.isin(sources, ["slake", "skimage", "synthetic"]),
                 "other_test": (split == "test") & (sources == "skimage")}
    for name, m in test_sets.items():
        block: dict = {}
        for h, names in HEADS.items():
            mm = m & (y[h] >= 0)
            if not mm.any():
                continue
            p, lab = probs_of(h, mm), y[h][mm]
            pred = p.argmax(1)
            wrong = pred != lab
            block[h] = {"n": int(mm.sum()), "accuracy": round(float((pred == lab).mean()), 4),
                        "ece": round(ece(p, lab), 4),
                        "max_wrong_confidence": round(float(p.max(1)[wrong].max()), 4) if wrong.any() else None,
                        "wrong_above_0.9": int((p.max(1)[wrong] > 0.9).sum())}
            if h == "modality":
                cm = np.zeros((len(names), len(names)), dtype=int)
                for t, q in zip(lab, pred, strict=True):
                    cm[t, q] += 1
                block[h]["confusion"] = {names[i]: {names[j]: int(cm[i, j]) for j in range(len(names)) if cm[i, j]}
                                         for i in range(len(names)) if cm[i].any()}
                rl = np.array(rules)[mm]
                truth = np.array([names[i] for i in lab])
                block[h]["pixel_rules_accuracy"] = round(float(np.mean(
                    [(r == t) or (r in ("DX", "CR") and t == "DX") for r, t in zip(rl, truth, strict=True)])), 4)
        figures["sets"][name] = block
        print(name, json.dumps(block), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, out / "weights.pt")
    digest = hashlib.sha256((out / "weights.pt").read_bytes()).hexdigest()
    (out / "validation.json").write_text(json.dumps(figures, indent=1) + "\n")
    sv, rv = figures["sets"]["slake_validate"], figures["sets"]["realcases_test"]
    validation = {
        "modality_accuracy_slake_validate": sv["modality"]["accuracy"],
        "modality_accuracy_realcases_test": rv["modality"]["accuracy"],
        "modality_ece_slake_validate": sv["modality"]["ece"],
        "modality_ece_realcases_test": rv["modality"]["ece"],
        "plane_accuracy_slake_validate": sv.get("plane", {}).get("accuracy"),
        "region_accuracy_slake_validate": sv.get("region", {}).get("accuracy"),
        "region_accuracy_realcases_test": rv.get("region", {}).get("accuracy"),
        "pixel_rules_modality_accuracy_slake_validate": sv["modality"]["pixel_rules_accuracy"],
        "modality_max_wrong_confidence_medical": max((b["modality"]["max_wrong_confidence"] or 0.0) for b in (sv, rv)),
        "ot_accuracy_non_medical_test": figures["sets"]["other_test"]["modality"]["accuracy"],
        "ot_n_non_medical_test": figures["sets"]["other_test"]["modality"]["n"],
        "figures": "validation.json (held out: SLAKE validate, a case-id 30 % split of realcases)",
    }
    card = {
        "name": out.name, "kind": "classify", "adapter": "study_cnn", "modalities": ["any"],
        "labels": [f"modality:{m}" for m in MODALITIES] + [f"plane:{p}" for p in PLANES]
        + [f"region:{r}" for r in REGIONS],
        "input": {"size": SIZE, "width": 16, "temperatures": {h: round(t, 4) for h, t in temps.items()},
                  "normalisation": "letterbox to 128 px; RGB/255; HU -160..240; other gray 0.5-99.5 percentile"},
        "weights": "weights.pt", "sha256": digest,
        "license": "mixed: SLAKE 1.0 (CC BY 4.0), realcases sources (several research / non-commercial only, see "
                   "../shared/data/realcases), scikit-image data (BSD-3): research, non-commercial use",
        "intended_use": "research triage of what a 2D picture shows (modality, plane, body region) when no DICOM tag "
                        "says it; not for diagnosis",
        "validation": validation, "version": "1.0",
    }
    import yaml

    (out / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
    print(f"wrote {out} ({(out / 'weights.pt').stat().st_size / 1e6:.2f} MB, sha256 {digest[:12]}) in "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
