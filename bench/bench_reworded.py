"""`dxagent eval` (the agent, embedded default) on free-form wording (issue 30): the 240 SLAKE validate questions
reworded as a clinician would write them (bench/data/slake_validate_reworded.jsonl) against the same items in their
original wording, and the free-form questions about realcases images (bench/data/realcases_freeform.jsonl).

    .venv/bin/python bench/bench_reworded.py [--sets reworded,original,realcases] [--out DIR] [--limit N]

Prints per set: closed accuracy over all items and over answered ones, coverage, wrong answers among answered closed
ones, answers wrong at probability > 0.9, ECE over the closed answers that carry a probability, open exact match.
Targets: reworded closed accuracy over answered within 3 points of the original wording; <= 10 % of answered closed
wrong; no wrong answer above 0.9. The rules were never tuned on these sets. Asserts nothing; resumable (same --out).
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
DATA = ROOT / "bench" / "data"
SHARED = ROOT.parent / "shared" / "data"


def figures(results: Path, system: str = "agent") -> dict:
    from agent.app.eval_metrics import closed_correct, ece

    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("system") == system]
    closed = [r for r in rows if r.get("answer_type") != "OPEN"]
    opened = [r for r in rows if r.get("answer_type") == "OPEN"]

    def answered(r):
        return r.get("status") == "done" and (r.get("answer") or {}).get("kind") != "abstain"

    def right(r):
        return answered(r) and closed_correct((r.get("answer") or {}).get("value"), r.get("gold", ""),
                                              r.get("question") if r.get("answer_type") != "OPEN" else None)

    ans = [r for r in closed if answered(r)]
    wrong = [r for r in ans if not right(r)]
    probs = [(r["answer"].get("probability"), right(r)) for r in ans]
    hi_wrong = [r for r in wrong if (r["answer"].get("probability") or 0) > 0.9]
    return {"n": len(rows), "closed": len(closed), "closed_acc_all": sum(map(right, closed)) / max(1, len(closed)),
            "closed_acc_answered": (len(ans) - len(wrong)) / len(ans) if ans else None,
            "coverage_closed": len(ans) / max(1, len(closed)), "wrong_answered": len(wrong), "answered": len(ans),
            "wrong_over_0.9": len(hi_wrong), "with_probability": sum(p is not None for p, _ in probs),
            "ece": ece([p for p, _ in probs], [c for _, c in probs]),
            "open_em": sum(right(r) for r in opened) / max(1, len(opened)), "open": len(opened),
            "wrong_examples": [(r.get("question"), r["answer"].get("value"), r.get("gold"),
                                r["answer"].get("probability")) for r in wrong][:12]}


def original_manifest(out: Path) -> Path:
    """The reworded items with their original SLAKE wording (same ids, images and answers)."""
    rows = [json.loads(x) for x in (DATA / "slake_validate_reworded.jsonl").read_text().splitlines() if x.strip()]
    path = out / "slake_validate_original.jsonl"
    path.write_text("".join(json.dumps({**r, "case_id": r["orig_case_id"], "question": r["orig_question"]}) + "\n"
                            for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="reworded,original,realcases")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--llm", default="local")
    ap.add_argument("--show-wrong", action="store_true")
    args = ap.parse_args()
    if not (SHARED / "slake_dev" / "validate.jsonl").exists():
        sys.exit(f"no data at {SHARED}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent.app.eval import run_eval

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-reworded-"))
    out.mkdir(parents=True, exist_ok=True)
    sets = {"reworded": (DATA / "slake_validate_reworded.jsonl", SHARED / "slake_dev"),
            "original": (None, SHARED / "slake_dev"),
            "realcases": (DATA / "realcases_freeform.jsonl", SHARED / "realcases")}
    print(f"{'set':10} {'n':>4} {'closed':>6} {'acc all':>8} {'acc ans':>8} {'cov':>6} {'wrong/ans':>10} "
          f"{'wrong>0.9':>9} {'ECE (n)':>12} {'open EM':>8}")
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        manifest, root = sets[name]
        manifest = manifest or original_manifest(out)
        res = run_eval(manifest, out / name, systems=["agent"], root=root, llm=args.llm, limit=args.limit)
        f = figures(out / name / "results.jsonl")
        ece = "-" if f["ece"] is None else f"{f['ece']:.3f} ({f['with_probability']})"
        acc_ans = "-" if f["closed_acc_answered"] is None else f"{f['closed_acc_answered']:.3f}"
        print(f"{name:10} {f['n']:4d} {f['closed']:6d} {f['closed_acc_all']:8.3f} {acc_ans:>8} "
              f"{f['coverage_closed']:6.3f} {f['wrong_answered']:4d}/{f['answered']:<5d} {f['wrong_over_0.9']:9d} "
              f"{ece:>12} {f['open_em']:8.3f}   ({res.wall_s:.0f} s)")
        if args.show_wrong:
            for q, v, g, p in f["wrong_examples"]:
                print(f"    wrong: {q!r} -> {v!r} (gold {g!r}, p={p})")
    print(f"results under {out}")


if __name__ == "__main__":
    main()
