"""Break the organ segmenter's liver Dice down by modality and failure type, on SLAKE train's held-out 10 % or validate.

    .venv/bin/python scripts/diagnose_organ_liver.py [--split heldout|validate] [--card tools/models/organ_seg_slake]
        [--post none,flip,lcc,flip+lcc]

Per image with liver in the truth or predicted above the presence floor (the card's `strict` definition): modality,
truth / predicted area, Dice, and the failure type:
- `missed`: liver in the truth, predicted area under the floor;
- `false_positive`: liver predicted above the floor on an image whose truth has none;
- `under`: predicted < 70 % of the truth's area (Dice < 0.8); `over`: predicted > 130 % (Dice < 0.8);
- `misplaced`: neither, Dice < 0.8 (outline in the wrong place); `ok`: Dice >= 0.8.
Confusion: the classes the truth's liver pixels were given, and the truth classes of the pixels predicted liver.
`--post` compares post-processing variants on the same images (flip: average of the softmax of the picture and its
horizontal mirror - label-safe since left/right organs are merged; lcc: keep the liver's largest connected component).
Unannotated (empty) masks are left out, as in training. Tune on `heldout` only; `validate` is for the report.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from train_organ_segmenter import PRESENT_FRAC, card_net_and_lut, held_out, load_split, read_case  # noqa: E402


def variant_labels(net, img, size, post: str, liver_i: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    from skimage.measure import label

    from agent.analysis.organ_net import preprocess

    x = torch.from_numpy(preprocess(img, False, size))[None]
    with torch.no_grad():
        lg = net(x)
        p = torch.softmax(lg, 1)
        if "flip" in post:
            p = 0.5 * (p + torch.softmax(net(x.flip(-1)), 1).flip(-1))
        p = F.interpolate(p, size=img.shape[:2], mode="bilinear", align_corners=False)[0]
    lab = p.argmax(0).numpy()
    if "lcc" in post:
        m = lab == liver_i
        if m.any():
            cc = label(m, connectivity=2)
            keep = np.argmax(np.bincount(cc.ravel())[1:]) + 1
            lab[m & (cc != keep)] = 0
    return lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="heldout", choices=["heldout", "validate", "fit"])
    ap.add_argument("--card", type=Path, default=ROOT / "tools/models/organ_seg_slake")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/slake_dev")
    ap.add_argument("--post", default="none")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    import torch


    torch.set_num_threads(1)
    card, net, lut = card_net_and_lut(args.card, args.data)
    labels, size = card["labels"], int(card["input"]["size"])
    li = labels.index("liver") + 1
    if args.split == "validate":
        rows = [r for r in load_split(args.data, "validate.jsonl") if r["modality"] != "X-Ray"]
    else:
        want = args.split == "heldout"
        rows = [r for r in load_split(args.data, "train.jsonl") if r["modality"] != "X-Ray"
                and held_out(r["image"]) == want]
    cases = []
    for r in rows:
        img, raw = read_case(args.data, r)
        if raw.any():
            cases.append((r, img, lut[raw]))
    name = lambda i: "bg" if i == 0 else labels[i - 1]  # noqa: E731
    for post in args.post.split(","):
        recs = []
        lost, gained = Counter(), Counter()
        for r, img, truth in cases:
            pred = variant_labels(net, img, size, post, li)
            t, p = truth == li, pred == li
            floor = PRESENT_FRAC * truth.size
            present = p.sum() > floor
            if not (t.any() or present):
                continue
            d = 2 * float((t & p).sum()) / float(t.sum() + p.sum())
            ratio = p.sum() / max(t.sum(), 1)
            if t.any() and not present:
                kind = "missed"
            elif present and not t.any():
                kind = "false_positive"
            elif d >= 0.8:
                kind = "ok"
            elif ratio < 0.7:
                kind = "under"
            elif ratio > 1.3:
                kind = "over"
            else:
                kind = "misplaced"
            lost.update({name(int(k)): int(v) for k, v in zip(*np.unique(pred[t & ~p], return_counts=True), strict=True)})
            gained.update({name(int(k)): int(v) for k, v in zip(*np.unique(truth[p & ~t], return_counts=True), strict=True)})
            mod = "MR" if r["modality"] == "MRI" else r["modality"]
            recs.append({"image": r["image"].split("/")[1], "mod": mod, "t": int(t.sum()), "p": int(p.sum()),
                         "dice": d, "kind": kind, "truth_present": bool(t.any())})
        print(f"== {args.split} post={post}: {len(cases)} annotated CT/MR images, {len(recs)} scored for liver")
        if not args.quiet:
            for x in sorted(recs, key=lambda x: (x["mod"], x["dice"])):
                print(f"  {x['image']:9} {x['mod']:3} truth {x['t']:6d} pred {x['p']:6d} dice {x['dice']:.3f} "
                      f"{x['kind']}")
        by = defaultdict(list)
        for x in recs:
            by[x["mod"]].append(x)
            by["all"].append(x)
        for k, xs in sorted(by.items()):
            tp = [x["dice"] for x in xs if x["truth_present"]]
            print(f"  {k:3}: n {len(xs):2d} strict {np.mean([x['dice'] for x in xs]):.4f}  truth-present n "
                  f"{len(tp):2d} {np.mean(tp) if tp else float('nan'):.4f}  kinds "
                  f"{dict(Counter(x['kind'] for x in xs))}")
        print(f"  truth-liver pixels not predicted liver went to: {dict(lost.most_common(6))}")
        print(f"  predicted-liver pixels outside truth liver were: {dict(gained.most_common(6))}")


if __name__ == "__main__":
    main()
