"""Benchmark the shipped organ segmenter (tools/models/organ_seg_slake) through the tool, on SLAKE validate (held out).

    .venv/bin/python bench/bench_organ_segment.py [--limit N] [--no-refine] [--update-card]

Every validate CT/MR image goes through agent.imaging.loaders.load_views and the organ_segment tool exactly as in a run.
Images whose mask is empty (8 of validate's 69 CT/MR images) were never annotated and are left out, as in training.
Printed per organ (left/right merged): Dice (`strict`: mean over images where the organ is in the truth or predicted
above the presence floor, as the card's figures; `truth`: mean over images where the organ is in the truth),
presence accuracy (present = at least 0.05 % of the picture, as the tool), and for paired organs the side accuracy
(each truth side's centroid matched to the nearest predicted component, whose patient side the tool derived from
geometry under the radiological convention); then time per image (tool run alone, and load + classify + segment)
and peak memory. `--no-refine` runs the U-Net alone (no LiteMedSAM outlines); `--update-card` writes the figures into
the card's validation.json and card.yaml (block `tool`, keyed refined / unet_only).
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
    ap.add_argument("--no-refine", action="store_true", help="U-Net outlines only (no LiteMedSAM refinement)")
    ap.add_argument("--update-card", action="store_true", help="write the figures into the bundled card")
    args = ap.parse_args()
    if not (SLAKE / "validate.jsonl").is_file():
        print("../shared/data/slake_dev is absent: nothing to measure")
        return
    from PIL import Image

    from agent.core.tool import ToolContext
    from agent.engine.registry import discover
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore
    from tools.organ_segment import MIN_FRACTION, REFINE

    names = {int(k): v.strip() for k, v in (line.split(":", 1) for line in
                                             (SLAKE / "mask.txt").read_text().splitlines() if ":" in line)}
    rows, seen = [], set()
    for line in (SLAKE / "validate.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["modality"] in ("CT", "MRI") and r["image"] not in seen:
            seen.add(r["image"])
            if np.asarray(Image.open(SLAKE / r["mask"])).any():  # an empty mask was never annotated
                rows.append(r)
    rows = rows[: args.limit] if args.limit else rows
    tool = discover()["organ_segment"]
    store = ArtifactStore(tempfile.mkdtemp(prefix="bench-organ-"))
    dice, dice_t, presence = defaultdict(list), defaultdict(list), defaultdict(list)
    side_hits: dict[str, list[bool]] = defaultdict(list)
    t_tool, t_all = [], []
    for r in rows:
        t0 = time.perf_counter()
        (view,) = load_views([str(SLAKE / r["image"])], store, modality="CT" if r["modality"] == "CT" else "MR")
        from agent.core.state import CaseInput, CaseState

        ctx = ToolContext(state=CaseState(inputs=CaseInput(paths=[r["image"]]), views=[view]), store=store)
        t1 = time.perf_counter()
        out = tool.run(ctx, tool.Input(refine=not args.no_refine))
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
                if t.any():
                    dice_t[lab].append(dice[lab][-1])
        for lab, parts in sided.items():
            organ = next((o for o in out.organs if o.label == lab), None)
            for side, m in parts:
                if organ is None or not organ.components:
                    side_hits[lab].append(False)
                    continue
                rc = np.array(np.nonzero(m)).mean(1)
                near = min(organ.components, key=lambda c: float(np.hypot(*(np.array(c.centroid) - rc))))
                side_hits[lab].append(near.side == side)
    large = ("liver", "lung", "heart", "kidney")
    mode = "unet_only" if args.no_refine else "refined"
    print(f"SLAKE validate, {len(rows)} annotated CT/MR images, card {out.model_card.name} "
          f"({out.model_card.sha256[:12]}), {mode}{'' if args.no_refine else ' (' + ', '.join(out.refined or ['-']) + ')'}")
    print(f"{'organ':28} {'n':>4} {'strict':>6} {'n_t':>4} {'truth':>6} {'presence acc':>12} {'side acc':>9}")
    per = {}
    for lab in sorted(dice, key=lambda k: -len(dice[k])):
        s = side_hits.get(lab)
        side = f"{np.mean(s):9.3f}" if s else f"{'':9}"
        dt = float(np.mean(dice_t[lab])) if dice_t[lab] else float("nan")
        per[lab] = {"n": len(dice[lab]), "dice": round(float(np.mean(dice[lab])), 4), "n_truth": len(dice_t[lab]),
                    "dice_truth_present": round(dt, 4), "presence_acc": round(float(np.mean(presence[lab])), 4)}
        print(f"{lab:28} {len(dice[lab]):4d} {np.mean(dice[lab]):6.3f} {len(dice_t[lab]):4d} {dt:6.3f} "
              f"{np.mean(presence[lab]):12.3f} {side}" + (f" (n={len(s)})" if s else ""))
    all_sides = [x for v in side_hits.values() for x in v]
    big = [per[k]["dice"] for k in large if k in per]
    big_t = [per[k]["dice_truth_present"] for k in large if k in per]
    print(f"large organs (liver, lung, heart, kidney): mean Dice strict {np.mean(big):.3f}, truth present "
          f"{np.mean(big_t):.3f}")
    print(f"side accuracy over all paired organs: {np.mean(all_sides):.3f} (n={len(all_sides)})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"organ_segment run: median {1000 * np.median(t_tool):.0f} ms, p95 {1000 * np.percentile(t_tool, 95):.0f} "
          f"ms; load + classify + segment median {1000 * np.median(t_all):.0f} ms per image; peak RSS {rss:.0f} MB")
    if args.update_card and not args.limit:
        write_card(mode, {"dataset": f"SLAKE 1.0 validate, {len(rows)} annotated CT/MR images, through the tool",
                          "refined_organs": [] if args.no_refine else sorted(REFINE),
                          "mean_dice_large_organs": round(float(np.mean(big)), 4),
                          "mean_dice_large_organs_truth_present": round(float(np.mean(big_t)), 4),
                          **{f"dice_{k}": per[k]["dice"] for k in large if k in per},
                          "side_accuracy": round(float(np.mean(all_sides)), 4),
                          "ms_per_image_median": round(1000 * float(np.median(t_tool)), 1), "per_class": per})


def write_card(mode: str, block: dict) -> None:
    """Put the tool's figures under `tool.<mode>` in the bundled card's validation.json and card.yaml."""
    import yaml

    d = ROOT / "tools/models/organ_seg_slake"
    full = json.loads((d / "validation.json").read_text())
    full.setdefault("tool", {})[mode] = block
    (d / "validation.json").write_text(json.dumps(full, indent=1) + "\n")
    card = yaml.safe_load((d / "card.yaml").read_text())
    card["validation"].setdefault("tool", {})[mode] = {k: v for k, v in block.items() if k != "per_class"}
    (d / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False, width=120))
    print(f"wrote tool.{mode} into {d}/validation.json and card.yaml")


if __name__ == "__main__":
    main()
