"""`dxagent eval` on SLAKE validate with the embedded default: every system's closed accuracy, coverage, open recall
(95 % bootstrap intervals), time per question, and the checks of issue 13.

    .venv/bin/python bench/bench_eval.py [--sample N] [--seed 0] [--limit K] [--systems agent,prior] [--workers 1]
                                         [--llm local] [--out DIR] [--raw-words]

Runs `agent.app.eval.run_eval` (the code `dxagent eval` runs) on `../shared/data/slake_dev/validate.jsonl` (or
$DXAGENT_SLAKE) with the prior and majority fitted on `train.jsonl`, and the agent's answers rendered in train's
answer words ("axial" -> "Transverse Plane"; agent/app/answer_style.py; `--raw-words`: its own words). `--sample`
evaluates a seeded random sample (the full split is 1,053 questions). Prints the figures and the targets: the
agent's closed accuracy over all items minus the prior's, with its paired interval (target: the interval excludes
zero, above); no false "answered" (every agent answer cites evidence); >= 20 questions/min for the agent. Asserts
nothing. Resumable: the same --out again continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N sampled items (in file order)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--llm", default="local")
    ap.add_argument("--systems", default=None, help="comma-separated (default: all five)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--raw-words", action="store_true", help="score the agent's own words, not rendered in SLAKE "
                                                              "train's answer vocabulary (agent/app/answer_style.py)")
    args = ap.parse_args()
    data = Path(os.environ.get("DXAGENT_SLAKE") or ROOT.parent / "shared" / "data" / "slake_dev")
    if not (data / "validate.jsonl").exists():
        sys.exit(f"no SLAKE data at {data} (set DXAGENT_SLAKE)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent.app.eval import run_eval

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    systems = [s.strip() for s in args.systems.split(",")] if args.systems else None
    res = run_eval(data / "validate.jsonl", out, systems=systems, prior_from=data / "train.jsonl", llm=args.llm,
                   workers=args.workers,
                   sample=args.sample, seed=args.seed, limit=args.limit,
                   answer_style_from=None if args.raw_words else data / "train.jsonl")
    s = res.summary
    print(f"SLAKE validate, {res.items} questions{f' (sample {args.sample}, seed {args.seed})' if args.sample else ''}, "
          f"llm {args.llm}, {args.workers} worker(s); wall {res.wall_s:.0f} s for {res.ran} new result(s)")
    print(f"{'system':10} {'closed acc all [95% CI]':28} {'acc answered':13} {'coverage':9} {'open EM':8} "
          f"{'open recall':12} {'s/q':6} {'q/min':6}")
    for name in res.systems:
        m = s["systems"][name]
        c, o = m["closed"], m["open"]
        f = lambda x: "-" if x is None or x.get("value") is None else f"{x['value']:.3f}"  # noqa: E731
        ci = c["accuracy_all"]
        sec = (m.get("seconds") or {}).get("mean")
        print(f"{name:10} {f(ci)} [{ci.get('lo') or 0:.3f}, {ci.get('hi') or 0:.3f}]{'':8} {f(c['accuracy_answered']):13} "
              f"{f(m['coverage']):9} {f(o['exact_match_all']):8} {f(o['token_recall_all']):12} "
              f"{'-' if sec is None else f'{sec:.2f}':6} {m.get('questions_per_min') or '-'}")
        if m.get("abstentions"):
            print(f"{'':10} abstentions: {json.dumps(m['abstentions'])}")
    for k, v in s.get("paired", {}).items():
        d = v["closed_accuracy"]
        if d.get("mean") is not None:
            print(f"paired closed accuracy {k}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (n={d['n']})")
    rows = [json.loads(line) for line in (res.out / "results.jsonl").read_text().splitlines()]
    agent = [r for r in rows if r["system"] == "agent"]
    uncited = [r["item_id"] for r in agent if r.get("answer") and r["answer"]["kind"] != "abstain"
               and not r["answer"].get("evidence_ids")]
    print(f"agent answers without evidence (false 'answered'): {len(uncited)} {uncited[:5]}")
    ece = s["systems"].get("agent", {}).get("ece")
    print(f"agent ECE of answer probabilities: {ece}; outputs in {res.out}")


if __name__ == "__main__":
    main()
