"""Fit the answer calibration table (agent/engine/answer_calibration.json) from `dxagent eval` runs on held-out data.

    DXAGENT_CALIBRATION=off .venv/bin/dxagent eval ../shared/data/slake_dev/train.jsonl --systems agent \
        --sample 1500 --seed 30 --out eval-train-cal
    .venv/bin/python scripts/fit_answer_calibration.py eval-train-cal [more eval dirs] [--target-error 0.10]

Reads each DIR/results.jsonl, keeps the agent's answered CLOSED items (yes/no, choice, count), scores them as
`dxagent eval` does, and counts right answers per route and raw-probability band (agent/engine/calibration.py). The
runs must be made with DXAGENT_CALIBRATION=off, so the raw probabilities are counted, not calibrated ones. Never fit
on the split you report (SLAKE validate, the reworded set): the table would then be in-sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--target-error", type=float, default=0.10)
    ap.add_argument("--threshold", type=float, default=None,
                    help="the answer threshold to write (default: calibration.ANSWER_THRESHOLD, the stated policy; "
                         "a negative value writes the target-error threshold instead)")
    ap.add_argument("--out", type=Path, default=ROOT / "agent" / "engine" / "answer_calibration.json")
    args = ap.parse_args()
    from agent.app.eval_metrics import closed_correct
    from agent.engine.calibration import ANSWER_THRESHOLD, CLOSED, fit

    rows, sources = [], []
    for d in args.dirs:
        meta = json.loads((d / "eval.json").read_text())
        sources.append({"manifest": Path(meta["manifest"]).name, "options": {k: meta["options"].get(k) for k in
                                                                               ("llm", "max_steps")}})
        for line in (d / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            a = r.get("answer") or {}
            if r.get("system") != "agent" or r.get("answer_type") == "OPEN" or r.get("status") != "done" or \
                    a.get("kind") not in CLOSED or not a.get("route"):
                continue
            rows.append({"route": a["route"], "raw_probability": a.get("probability"),
                         "correct": bool(closed_correct(a.get("value"), r.get("gold", "")))})
    if not rows:
        sys.exit("no answered closed agent items with a route in " + ", ".join(map(str, args.dirs)))
    chosen = ANSWER_THRESHOLD if args.threshold is None else (None if args.threshold < 0 else args.threshold)
    table = fit(rows, args.target_error, chosen)
    table["fitted_on"] = sources
    table["fitted"] = time.strftime("%Y-%m-%d")
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(rows)} closed answers; threshold {table['min_probability']}; on these rows: "
          f"{table['fit_figures']}")
    for key, cell in sorted(table["routes"].items(), key=lambda kv: -kv[1]["n"]):
        if "|" not in key:
            print(f"  {key:50} n={cell['n']:4d} right={cell['right'] / cell['n']:.3f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
