"""The body regions each organ appears in, from SLAKE train's organ boxes (detection.json) and its images' location
label: the table `agent/core/vocab.py` ORGAN_REGIONS holds (printed here to paste; the data is not in the repository).

    .venv/bin/python scripts/organ_regions.py [--min 2]

An organ counts in a region when at least --min training images of that region box it (one stray box is a label
slip). Organ names as the project reads them (vocab.canonical_organ: "Left Kidney" -> kidney); the location labels
mapped onto the study classifier's regions (Lung, Chest_* -> chest; Brain* -> head; Pelvic Cavity -> pelvis)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SLAKE = ROOT.parent / "shared" / "data" / "slake_dev"
LOCATION = {"Lung": "chest", "Chest_lung": "chest", "Chest_heart": "chest", "Chest_mediastinal": "chest",
            "Abdomen": "abdomen", "Brain": "head", "Brain_Tissue": "head", "Brain_Face": "head",
            "Pelvic Cavity": "pelvis", "Neck": "neck"}


def main() -> None:
    from agent.core.question import parse_question

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min", type=int, default=2)
    args = ap.parse_args()
    seen: dict[str, str] = {}
    for line in (SLAKE / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        seen[r["detection"]] = LOCATION[r["location"]]
    counts: dict[str, Counter] = defaultdict(Counter)
    for det, region in seen.items():
        for box in json.loads((SLAKE / det).read_text()):
            for name in box:
                organ = parse_question(f"Is there a {name.lower()}?").organ
                if organ:
                    counts[organ][region] += 1
    table = {o: sorted(r for r, n in c.items() if n >= args.min) for o, c in sorted(counts.items())}
    print(f"# {len(seen)} train images; organ -> regions with >= {args.min} boxed images")
    print("ORGAN_REGIONS = {")
    for o, regions in table.items():
        print(f"    {o!r}: {tuple(regions)!r},  # {dict(counts[o])}")
    print("}")


if __name__ == "__main__":
    main()
