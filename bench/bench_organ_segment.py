"""Benchmark the shipped organ segmenter (tools/models/organ_seg_slake) through the tool, on SLAKE validate (held out).

    .venv/bin/python bench/bench_organ_segment.py [--limit N]

Every validate CT/MR image goes through tools.imaging.load_views and the organ_segment tool exactly as in a run.
Printed per organ (left/right merged): Dice (mean over images where the organ is in the truth or predicted above the
presence floor, as the card's figures),
presence accuracy (present = at least 0.05 % of the picture, as the tool), and for paired organs the side accuracy
(each truth side's centroid matched to the nearest predicted component, whose patient side the tool derived from
geometry under the radiological convention); then time per image (tool run alone, and load + classify + segment)
and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SLAKE = ROOT.parent / "shared" / "data" / "slake_dev"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    if not (SLAKE / "validate.jsonl").is_file():
        print("../shared/data/slake_dev is absent: nothing to measure")
        return
    from PIL import Image

    from agent.artifacts import ArtifactStore
    from tools.base import ToolContext, discover
    from tools.imaging import load_views
    from tools.organ_segment import MIN_FRACTION

    names = {int(k): v.strip() for k, v in (line.split(":", 1) for line in
                                             (SLAKE / "mask.txt").read_text().splitlines() if ":" in line)}
    rows, seen = [], set()
    for line in (SLAKE / "validate.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["modality"] in ("CT", "MRI") and r["image"] not in seen:
            seen.add(r["image"])
            rows.append(r)
    rows = rows[: args.limit] if args.limit else rows
    tool = discover()["organ_segment"]
    store = ArtifactStore(tempfile.mkdtemp(prefix="bench-organ-"))
    dice, presence = defaultdict(list), defaultdict(list)
    side_hits: dict[str, list[bool]] = defaultdict(list)
    t_tool, t_all = [], []
    for r in rows:
        t0 = time.perf_counter()
        (view,) = load_views([str(SLAKE / r["image"])], store, modality="CT" if r["modality"] == "CT" else "MR")
        from agent.state import CaseInput, CaseState

        ctx = ToolContext(state=CaseState(inputs=CaseInput(paths=[r["image"]]), views=[view]), store=store)
        t1 = time.perf_counter()
        out = tool.run(ctx, tool.Input())
        t_tool.append(time.perf_counter() - t1)
        t_all.append(time.perf_counter() - t0)
        labels = tool.cards(view)[0].labels
        pred = store.get_array(out.mask)
        raw = np.asarray(Image.open(SLAKE / r["mask"]))
        truth: dict[str, np.ndarray] = {}
        sided: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
        for value, name in names.items():
            m = raw == value
            if not m.any():
                continue
            side = "left" if name.startswith("Left ") else "right" if name.startswith("Right ") else None
            merged = (name.split(" ", 1)[1] if side else name).lower().replace(" ", "_").replace("-", "_")
            truth[merged] = truth.get(merged, np.zeros_like(m)) | m
            if side:
                sided[merged].append((side, m))
        floor = MIN_FRACTION * pred.size
        for i, lab in enumerate(labels, start=1):
            p, t = pred == i, truth.get(lab)
            t = np.zeros_like(p) if t is None else t
            presence[lab].append(bool(p.sum() >= floor) == bool(t.any()))
            if p.sum() >= floor or t.any():  # the card's definition: predicted = area above the presence floor
                dice[lab].append(2 * float((p & t).sum()) / float(p.sum() + t.sum()))
        for lab, parts in sided.items():
            organ = next((o for o in out.organs if o.label == lab), None)
            for side, m in parts:
                if organ is None or not organ.components:
                    side_hits[lab].append(False)
                    continue
                rc = np.array(np.nonzero(m)).mean(1)
                near = min(organ.components, key=lambda c: float(np.hypot(*(np.array(c.centroid) - rc))))
                side_hits[lab].append(near.side == side)
    print(f"SLAKE validate, {len(rows)} CT/MR images, card {out.model_card.name} ({out.model_card.sha256[:12]})")
    print(f"{'organ':28} {'n':>4} {'Dice':>6} {'presence acc':>12} {'side acc':>9}")
    for lab in sorted(dice, key=lambda k: -len(dice[k])):
        s = side_hits.get(lab)
        side = f"{np.mean(s):9.3f}" if s else f"{'':9}"
        print(f"{lab:28} {len(dice[lab]):4d} {np.mean(dice[lab]):6.3f} {np.mean(presence[lab]):12.3f} {side}"
              + (f" (n={len(s)})" if s else ""))
    all_sides = [x for v in side_hits.values() for x in v]
    print(f"side accuracy over all paired organs: {np.mean(all_sides):.3f} (n={len(all_sides)})")
    print(f"organ_segment run: median {1000 * np.median(t_tool):.0f} ms, p95 {1000 * np.percentile(t_tool, 95):.0f} "
          f"ms; load + classify + segment median {1000 * np.median(t_all):.0f} ms per image; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
