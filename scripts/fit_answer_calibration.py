"""Fit the answer calibration table (agent/engine/answer_calibration.json) from `dxagent eval` runs on held-out data.

    DXAGENT_CALIBRATION=off .venv/bin/dxagent eval ../shared/data/slake_dev/train.jsonl --systems agent \
        --sample 1500 --seed 30 --out eval-train-cal
    .venv/bin/python scripts/fit_answer_calibration.py eval-train-cal [more eval dirs] [--target-error 0.10]

    # the threshold for questions worded anew (calibration.min_probability(new_wording=True)): an eval run on held-out
    # train reworded with the VQA expert's held-out card (scripts/train_vqa_expert.py --heldout-card) and nothing
    # withheld; updates only that entry of the table
    DXAGENT_MODELS=/tmp/models_heldout DXAGENT_MIN_PROBABILITY=0 .venv/bin/dxagent eval \
        bench/data/slake_train_heldout_reworded.jsonl --root ../shared/data/slake_dev --systems agent --out ev-rw
    DXAGENT_MODELS=/tmp/models_heldout .venv/bin/python scripts/fit_answer_calibration.py --new-wording ev-rw

    # open answers' routes (calibration.OPEN_PREFIX): an eval run on SLAKE train's OPEN questions about pictures outside
    # the 20 % held-out image split (scripts/train_vqa_expert.py split), the VQA expert off (so each answer is the
    # measured evidence's own, not the fused one) and nothing calibrated; updates only the open: entries
    DXAGENT_CALIBRATION=off DXAGENT_VQA_EXPERT=0 .venv/bin/dxagent eval OPEN_TRAIN.jsonl --root ../shared/data/slake_dev \
        --systems agent --answer-style-from ../shared/data/slake_dev/train.jsonl --out ev-open
    .venv/bin/python scripts/fit_answer_calibration.py --open ev-open

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
    ap.add_argument("--new-wording", action="store_true",
                    help="fit only min_probability_new_wording, from runs on reworded held-out questions (see above)")
    ap.add_argument("--open", action="store_true",
                    help="fit only the open answers' routes (open: entries), from runs on open questions (see above)")
    args = ap.parse_args()
    if args.open:
        return fit_open(args.dirs, args.out)
    if args.new_wording:
        return fit_new_wording(args.dirs, args.target_error, args.out)
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


def fit_open(dirs: list[Path], out: Path) -> None:
    """The open: routes of the table: per route of the measured evidence (not a question-answering tool's, not a value
    read from the data; answers of calibration.OPEN_KINDS) and raw-probability band, how many answered open questions
    were an exact match of the reference, as `dxagent eval` scores them (after the run's answer style)."""
    from agent.app.eval_metrics import exact_match
    from agent.core.state import Answer
    from agent.engine.answer import read_from_data
    from agent.engine.calibration import OPEN_KINDS, OPEN_PREFIX, keys, route_key

    routes: dict[str, dict[str, int]] = {}
    sources, n = [], 0
    for d in dirs:
        sources.append(Path(json.loads((d / "eval.json").read_text())["manifest"]).name)
        for line in (d / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            a = r.get("answer") or {}
            route = a.get("route") or ""
            if r.get("system") != "agent" or r.get("answer_type") != "OPEN" or r.get("status") != "done" or \
                    a.get("kind") not in OPEN_KINDS or not route or a.get("method") == "expert" or \
                    read_from_data(Answer(kind=a["kind"], route=route)):
                continue
            n += 1
            for key in keys(route_key(a["kind"], route), a.get("probability")):
                cell = routes.setdefault(key, {"n": 0, "right": 0})
                cell["n"] += 1
                cell["right"] += int(bool(exact_match(a.get("value"), r.get("gold", ""))))
    if not routes:
        sys.exit("no answered open agent items with a route in " + ", ".join(map(str, dirs)))
    table = json.loads(out.read_text())
    table["routes"] = {**{k: v for k, v in table["routes"].items() if not k.startswith(OPEN_PREFIX)}, **routes}
    table["open"] = {"fitted": time.strftime("%Y-%m-%d"), "fitted_on": sources, "answers": n,
                     "how": "open answers of the measured evidence, exact match with the reference after the answer "
                            "style, on SLAKE train questions about pictures outside the VQA expert's held-out split, "
                            "the expert off and nothing calibrated"}
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{n} open answers")
    for key, cell in sorted(routes.items(), key=lambda kv: -kv[1]["n"]):
        print(f"  {key:55} n={cell['n']:4d} right={cell['right'] / cell['n']:.3f}")
    print(f"written {out}")


def fit_new_wording(dirs: list[Path], target_error: float, out: Path) -> None:
    """min_probability_new_wording: the `careful` rule (calibration.target_threshold) over the answered closed items
    of these runs whose question is worded anew (the first applicable question-answering tool's similarity to its
    training questions under calibration.NEW_WORDING_BELOW, as the engine reads it: Tool.question_scope)."""
    from agent.app.eval_metrics import closed_correct
    from agent.engine.calibration import CLOSED, NEW_WORDING_BELOW, new_wording, target_threshold
    from agent.engine.registry import discover

    scopes = [t for t in discover().values() if t.available() is None]
    cal, sources = [], []
    for d in dirs:
        sources.append(Path(json.loads((d / "eval.json").read_text())["manifest"]).name)
        for line in (d / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            a = r.get("answer") or {}
            if r.get("system") != "agent" or r.get("answer_type") == "OPEN" or r.get("status") != "done" or \
                    a.get("kind") not in CLOSED or a.get("probability") is None:
                continue
            got = next((g for t in scopes if (g := t.question_scope(r["question"]))), None)
            if new_wording(got[0] if got else None):
                cal.append((float(a["probability"]), bool(closed_correct(a.get("value"), r.get("gold", ""),
                                                                          r.get("question")))))
    if not cal:
        sys.exit("no answered closed items worded anew in " + ", ".join(map(str, dirs)))
    floor = round(target_threshold(cal, target_error), 4)
    kept = [c for p, c in cal if p >= floor]
    table = json.loads(out.read_text())
    table["min_probability_new_wording"] = floor
    table["new_wording"] = {
        "below": NEW_WORDING_BELOW, "fitted": time.strftime("%Y-%m-%d"), "fitted_on": sources, "answers": len(cal),
        "wrong_at_default": round(sum(not c for p, c in cal if p >= table.get("min_probability", 0)) /
                                  max(1, sum(p >= table.get("min_probability", 0) for p, _ in cal)), 4),
        "kept": len(kept), "wrong_kept": round(sum(not c for c in kept) / max(1, len(kept)), 4),
        "how": "the lowest threshold at which the closed answers to questions worded anew are wrong at most "
               f"{target_error:.0%} of the time (the rule of min_probability_at_target_error), on held-out SLAKE train "
               "pictures' questions reworded as clinicians write them, with the VQA expert's held-out card "
               "(scripts/train_vqa_expert.py --heldout-card: its members never saw those pictures)"}
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(cal)} closed answers worded anew; threshold {floor}: {table['new_wording']}")


if __name__ == "__main__":
    main()
