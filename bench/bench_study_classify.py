"""Benchmark the shipped study classifier (tools/models/study_cnn_v1) through the runtime path, on held-out images.

    .venv/bin/python bench/bench_study_classify.py [--limit N]

Each held-out image (SLAKE validate; the realcases 30 % case-id test split; the held-out non-medical pictures; see
scripts/study_data.py) is loaded with agent.imaging.loaders.load_views exactly as `dxagent run` loads it, so the figures are
those of the study block a user sees: per head, accuracy, expected calibration error (15 bins), the most confident
wrong answer and how many wrong answers are above 0.9; the modality confusion matrix; the pixel rules
(guess_modality) on the same images; load + classify time per image and the process's peak memory. Plane and region
are scored as the report states them (conditioned on the modality; region for radiology only).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from study_data import available, other_items, real_items, slake_items  # noqa: E402


def ece(conf: np.ndarray, right: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="at most N images per set (0: all)")
    args = ap.parse_args()
    if not available():
        print("../shared/data (slake_dev, realcases) is absent: nothing to measure")
        return
    from PIL import Image

    from agent.analysis.study import study_facts
    from agent.imaging.modality import guess_modality
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore

    rng = np.random.default_rng(14)
    sets = {"slake_validate": slake_items("validate"),
            "realcases_test": [it for it in real_items() if it["split"] == "test"],
            "other_test": [it for it in other_items(rng) if it["split"] == "test"]}
    store = ArtifactStore(tempfile.mkdtemp(prefix="bench-study-"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-study-img-"))
    t_all, n_all = [], 0
    print(f"{'set':16} {'head':9} {'n':>4} {'acc':>6} {'ECE':>6} {'max wrong p':>11} {'wrong>0.9':>9}  rules acc")
    for name, items in sets.items():
        items = items[: args.limit] if args.limit else items
        rows: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
        rules_right = []
        confusion: Counter = Counter()
        for i, it in enumerate(items):
            path = it.get("path")
            if path is None:  # an in-memory picture: through a PNG file, as a user would give it
                path = tmp / f"{name}_{i}.png"
                Image.fromarray(np.asarray(it["array"], dtype=np.uint8)).save(path)
            t0 = time.perf_counter()
            (view,) = load_views([str(path)], store)
            t_all.append(time.perf_counter() - t0)
            n_all += 1
            f = study_facts(view)
            got, p = view.modality, float(view.metadata.get("modality_confidence") or 0.0)
            got = "DX" if got == "CR" else got  # a DICOM file's CR tag: the same radiograph family as DX
            rows["modality"].append((it["modality"], got, p))
            confusion[(it["modality"], got)] += 1
            arr = store.get_array(view.pixels)
            pic = arr if view.photometric == "RGB" or arr.ndim == 2 else arr[arr.shape[0] // 2]
            rules_right.append(guess_modality(pic, view.photometric == "RGB")[0] == it["modality"])
            if it.get("plane") and f["plane"]:
                rows["plane"].append((it["plane"], f["plane"], f["plane_probability"]))
            if it.get("region") and f["body_region"]:
                rows["region"].append((it["region"], f["body_region"], f["body_region_probability"]))
        for head, r in rows.items():
            truth, pred, conf = (np.array(x) for x in zip(*r, strict=True))
            conf = conf.astype(float)
            right = truth == pred
            wrong = conf[~right]
            rules = f"{np.mean(rules_right):.3f}" if head == "modality" else ""
            print(f"{name:16} {head:9} {len(r):4d} {right.mean():6.3f} {ece(conf, right):6.3f} "
                  f"{(wrong.max() if wrong.size else 0):11.2f} {int((wrong > 0.9).sum()):9d}  {rules}")
        wrong_pairs = {f"{t}->{g}": n for (t, g), n in sorted(confusion.items()) if t != g}
        print(f"{'':16} modality confusions: {json.dumps(wrong_pairs)}")
    t = np.array(t_all)
    print(f"load_views + classify: median {1000 * np.median(t):.0f} ms, p95 {1000 * np.percentile(t, 95):.0f} ms per "
          f"image over {n_all} images (first, with model load: {1000 * t[0]:.0f} ms); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    from agent.analysis.study import StudyClassifier
    from agent.analysis.study_net import preprocess

    tool = StudyClassifier()
    card = tool.cards(None)[0]
    net = tool.load(card)
    x = preprocess(np.zeros((512, 512), np.float32), False)[None]
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(50):
            net(torch.from_numpy(x))
    print(f"network forward alone: {1000 * (time.perf_counter() - t0) / 50:.1f} ms per image "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
