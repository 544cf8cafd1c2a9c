"""Write prompts/question_shots.jsonl: the hand-labelled question readings the model reads in context
(agent/engine/reading.py ShotReader). A seeded sample of the labelled sets in tests/data (never the test split, which
stays the reported figure of bench/bench_question_reading.py); only question, kind and subject are kept.

    .venv/bin/python scripts/make_question_shots.py [--n 300] [--seed 0] [--exclude train2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SETS = {"devheldout": "question_readings.jsonl", "train": "question_readings_train.jsonl",
        "train2": "question_readings_train2.jsonl"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", nargs="*", default=[], choices=sorted(SETS))
    ap.add_argument("--out", type=Path, default=ROOT / "prompts" / "question_shots.jsonl")
    args = ap.parse_args()
    pool = [json.loads(line) for name, f in SETS.items() if name not in args.exclude
            for line in (DATA / f).read_text().splitlines() if line.strip()]
    random.Random(args.seed).shuffle(pool)
    rows = [{"question": " ".join(r["question"].split()), "kind": r["kind"], "subject": r["subject"]}
            for r in pool[: args.n]]
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} readings of {len(pool)} -> {args.out}")


if __name__ == "__main__":
    main()
