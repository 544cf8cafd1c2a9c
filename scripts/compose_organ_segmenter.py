"""Compose the organ segmenter card from two trained U-Nets: some classes from an expert, the rest from a base.

    .venv/bin/python scripts/compose_organ_segmenter.py --base DIR --expert DIR [--classes liver,spleen]
        [--out tools/models/organ_seg_slake] [--version 1.3]

organ_seg_slake 1.3 = base `scripts/train_organ_segmenter.py --epochs 120 --bf16` (v1.2: flip augmentation and
test-time flip) + expert `--epochs 120 --bf16 --no-flip-aug --tta ''` for liver and spleen. Why those two: they are
the unpaired organs that lie on one side, so a network that sees mirrored pictures in training cannot use their side;
on the held-out 10 % of SLAKE train the expert raised them (liver 0.906 -> 0.933, spleen 0.679 -> 0.879) while its
other classes were not better (all-class mean 0.699 -> 0.640, mostly liver cancer, stomach, mandible and brain edema
on one or two images each). Both networks must share the label list (same training data and class rule).

Writes weights.pt (one float16 state_dict, keys base.* and expert.*; agent/analysis/organ_net.py ClassOverride),
card.yaml (input.net: arch ClassOverride; input.tta empty - the base's flip averaging happens inside the network;
input.orientation radiological - the expert expects image left = patient right), and validation.json with both
networks' training records and held-out figures. The validate figures come from bench/bench_organ_segment.py
--update-card (through the tool) and the presence floors / refinement table from scripts/tune_organ_refine.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from train_organ_segmenter import sha256  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--expert", type=Path, required=True)
    ap.add_argument("--classes", default="liver,spleen")
    ap.add_argument("--out", type=Path, default=ROOT / "tools/models/organ_seg_slake")
    ap.add_argument("--version", default="1.3")
    args = ap.parse_args()
    base, expert = (yaml.safe_load((d / "card.yaml").read_text()) for d in (args.base, args.expert))
    if base["labels"] != expert["labels"]:
        raise SystemExit("the two cards' label lists differ: retrain them on the same data and class rule")
    classes = [c for c in args.classes.split(",") if c]
    unknown = set(classes) - set(base["labels"])
    if unknown:
        raise SystemExit(f"not labels of these cards: {sorted(unknown)}")
    state = {}
    for prefix, d, card in (("base", args.base, base), ("expert", args.expert, expert)):
        for k, v in torch.load(d / card["weights"], map_location="cpu", weights_only=True).items():
            state[f"{prefix}.{k}"] = v.half() if v.is_floating_point() else v
    vals = {name: json.loads((d / "validation.json").read_text()) for name, d in (("base", args.base),
                                                                                   ("expert", args.expert))}
    args.out.mkdir(parents=True, exist_ok=True)
    wpath = args.out / "weights.pt"
    torch.save(state, wpath)
    sha = sha256(wpath)
    inp = {k: v for k, v in base["input"].items() if k not in ("net", "tta", "orientation", "presence_floor")}
    inp["net"] = {"arch": "ClassOverride", "base": base["input"]["net"], "expert": expert["input"]["net"],
                  "classes": [base["labels"].index(c) + 1 for c in classes], "class_names": classes,
                  "base_tta": list(base["input"].get("tta") or [])}
    inp["tta"] = []
    inp["orientation"] = "radiological"
    inp["convention"] = (f"labels merged left/right; side from geometry (agent/analysis/organ_net.py: sides; image "
                         f"left = patient right); {', '.join(classes)} from a network trained without flips, which "
                         "expects image left = patient right (organ_segment mirrors a picture DICOM says is shown the "
                         "other way)")
    card = {**base, "input": inp, "weights": "weights.pt", "sha256": sha, "version": args.version,
            "validation": {"dataset": "SLAKE 1.0 validate (96 images, held out; the 61 CT/MR images with an annotated "
                                      "organ mask are scored), through the tool: see `tool` "
                                      "(bench/bench_organ_segment.py --update-card)",
                           "note": base["validation"].get("note", "")}}
    composition = {"base": f"recipe {vals['base']['train'].get('recipe')}, best held-out epoch "
                           f"{vals['base']['train'].get('best_epoch')}",
                   "expert": f"recipe {vals['expert']['train'].get('recipe')}, best held-out epoch "
                             f"{vals['expert']['train'].get('best_epoch')}",
                   "expert_classes": classes, "script": "scripts/compose_organ_segmenter.py"}
    card["input"]["composition"] = composition
    full = {"composition": composition,
            "held_out_train_slice": {n: v["held_out_train_slice"] for n, v in vals.items()},
            "networks": {n: {"summary_validate": v.get("summary"), "train": v.get("train")} for n, v in vals.items()},
            "labels": base["labels"], "dropped": vals["base"].get("dropped"),
            "definitions": vals["base"].get("definitions")}
    (args.out / "validation.json").write_text(json.dumps(full, indent=1) + "\n")
    (args.out / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False, width=120))
    print(f"wrote {args.out} ({wpath.stat().st_size / 1e6:.2f} MB, sha256 {sha[:12]}): {', '.join(classes)} from "
          f"{args.expert}, the rest from {args.base}")


if __name__ == "__main__":
    main()
