"""Choose the answer step's fusion rule (agent/engine/answer.py: fuse) on held-out SLAKE train: never on validate.

Inputs, both on the same held-out part of SLAKE train (scripts/train_vqa_expert.py's seeded 20 % image split, the
part none of the expert's choices were fitted on):

- the expert's held-out logits, written by scripts/train_vqa_expert.py to <cache>/vqa_expert_features/
  held_out_logits.npz (its members trained on the other 80 %, so these answers are out of sample; the shipped weights
  are refitted on all of train and would be in sample here);
- `dxagent eval` rows of the agent *without* the expert on those items (`--systems agent`, DXAGENT_VQA_EXPERT unset,
  DXAGENT_MIN_PROBABILITY=0 so that no measured answer is withheld and each rule can withhold its own), e.g.

      python scripts/choose_fusion.py --write-manifest /tmp/held.jsonl
      DXAGENT_MIN_PROBABILITY=0 dxagent eval /tmp/held.jsonl --root ../shared/data/slake_dev --out /tmp/ev_held \
          --systems agent
      python scripts/choose_fusion.py --rows /tmp/ev_held/results.jsonl

Each candidate rule is run through the real `fuse` with its parameters, the answers are rendered in SLAKE's words as
`dxagent eval --answer-style-from train` does, and scored as the eval scores them: closed accuracy and open exact
match over all items (an abstention is wrong), coverage, accuracy of the answered, ECE of the closed answers, and
how often the tools conflicted. The expert's question gate is applied with the fit part's questions as its bank
(the image gate is not: it needs the pictures' features; it keeps 97.5 % of held-out pictures by construction).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SLAKE = ROOT.parent / "shared" / "data" / "slake_dev"


def held_rows(seed: int, fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(fit rows, held rows) of SLAKE train, split by image as scripts/train_vqa_expert.py splits it."""
    train = [json.loads(x) for x in (SLAKE / "train.jsonl").read_text().splitlines() if x.strip()]
    order = sorted({r["image"] for r in train})
    random.Random(seed).shuffle(order)
    held = set(order[:round(fraction * len(order))])
    return [r for r in train if r["image"] not in held], [r for r in train if r["image"] in held]


def main() -> None:
    import scripts.train_vqa_expert as tv
    from agent.app.answer_style import style_from_manifest
    from agent.app.eval_metrics import closed_correct, ece
    from agent.core.question import parse_question
    from agent.core.state import Answer, Evidence
    from agent.engine import answer as A
    from agent.engine import calibration
    from tools import vqa_expert as vx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=Path, nargs="*", default=[],
                    help="results.jsonl of the agent without the expert on the held-out part (calibration on)")
    ap.add_argument("--write-manifest", type=Path, help="write the held-out part as an eval manifest and stop")
    ap.add_argument("--rows-uncalibrated", type=Path, nargs="*", default=[],
                    help="rows made with DXAGENT_CALIBRATION=off (any sample of train): their closed answers are "
                         "calibrated here; an item in both keeps the calibrated run's row")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    fit, held = held_rows(tv.SEED, tv.HOLDOUT)
    if args.write_manifest:
        args.write_manifest.write_text("".join(json.dumps(r) + "\n" for r in held))
        print(f"{len(held)} held-out questions -> {args.write_manifest}")
        return

    card = next(p for p in (ROOT / "tools" / "models" / "vqa_expert_slake").glob("*.yaml"))
    import yaml

    meta = yaml.safe_load(card.read_text())["input"]
    answers = tv.vocabulary(fit + held)
    logits = np.load(tv.cache_dir() / "held_out_logits.npz")
    probs = tv.ensemble_probs([logits[m["name"]] for m in meta["members"]], meta["temperatures"]["ensemble"])
    q_thr = float(meta["gate"]["question_min_cosine"])
    q_fit = vx.embed_questions(sorted({r["question"] for r in fit}))
    q_score = vx.nearest_cosine(vx.embed_questions([r["question"] for r in held]), q_fit)
    style = style_from_manifest(SLAKE / "train.jsonl")

    got: dict[tuple[str, str], tuple[dict[str, Any], bool]] = {}
    for off, paths in ((True, args.rows_uncalibrated), (False, args.rows)):
        for path in paths:  # results.jsonl, or an eval folder still running (its items/*/agent.json)
            lines = [p.read_text() for p in sorted(path.glob("items/*/agent.json"))] if path.is_dir() else \
                path.read_text().splitlines()
            for line in lines:
                r = json.loads(line)
                if r.get("system") == "agent" and r.get("status") == "done":
                    got[(r["question"], r["image_id"])] = (r, off)
    items = []
    for i, r in enumerate(held):
        if (r["question"], r["image"]) not in got:
            continue
        row, off = got[(r["question"], r["image"])]
        a = Answer.model_validate({k: v for k, v in row["answer"].items() if k != "text"})
        if off and a.kind in calibration.CLOSED and a.route:
            p, _, _ = calibration.lookup(a.route, a.probability)
            a = a.model_copy(update={"probability": p if p is not None else a.probability})
        top = np.argsort(-probs[i])[:vx.TOP_K]
        ranked = [(answers[j], float(probs[i, j])) for j in top]
        items.append({"row": r, "q": parse_question(r["question"]), "measured": a,
                      "ranked": ranked if q_score[i] >= q_thr else None})
    print(f"{len(items)} held-out items with an agent row ({len(held)} held out; question gate refuses "
          f"{sum(it['ranked'] is None for it in items)})")
    routes: dict[str, list[int]] = {}  # measured open answers: the route's accuracy on these items (in sample)
    for it in items:
        a = it["measured"]
        if a.kind != "abstain" and a.kind not in calibration.CLOSED:
            routes.setdefault(a.route or "?", []).append(int(closed_correct(style.render(it["row"]["question"],
                                                                                          a.value)[0], it["row"]["answer"])))

    def score(rule: str, margin: float, threshold: float) -> dict[str, Any]:
        closed, open_, conf, right, conflicts, by_source = [], [], [], [], 0, {"measured": 0, "expert": 0}
        for it in items:
            q, a = it["q"], it["measured"]
            if a.kind != "abstain" and a.probability is None and rule == "route-accuracy":
                hits = routes.get(a.route or "?", [])
                if len(hits) >= calibration.MIN_N:
                    a = a.model_copy(update={"probability": round((sum(hits) + 1) / (len(hits) + 2), 4)})
            if a.kind in calibration.CLOSED and a.probability is not None and a.probability < threshold:
                a = A.abstain("low_confidence", "under the threshold")
            experts = []
            if it["ranked"] is not None and rule != "measured-only":
                experts = [(Evidence.model_construct(id="E9", tool="vqa_expert"), it["ranked"])]
            if rule == "expert-first" and experts:
                f = A.fuse(q, A.abstain("evidence_does_not_address", "-"), experts, margin=margin, min_p=threshold)
                if f.kind == "abstain":
                    f = a
            else:
                f = A.fuse(q, a, experts, margin=margin, min_p=threshold,
                           measured_stands=(rule in ("current", "route-accuracy")))
            f = A.finish(f, q)
            if f.kind == "abstain" and f.reason == "tools_conflict":
                conflicts += 1
            ok = f.kind != "abstain" and closed_correct(style.render(it["row"]["question"], f.value)[0],
                                                         it["row"]["answer"])
            (closed if it["row"]["answer_type"] == "CLOSED" else open_).append(ok)
            if f.kind != "abstain":
                right.append(ok)
                by_source["expert" if f.method == "expert" else "measured"] += 1
                if it["row"]["answer_type"] == "CLOSED" and f.probability is not None:
                    conf.append((f.probability, ok))
        n = len(closed) + len(open_)
        return {"rule": rule, "margin": margin, "threshold": threshold,
                "closed_all": round(float(np.mean(closed)), 4), "open_em_all": round(float(np.mean(open_)), 4),
                "overall": round((sum(closed) + sum(open_)) / n, 4), "coverage": round(len(right) / n, 4),
                "answered_accuracy": round(float(np.mean(right)), 4) if right else None,
                "ece_closed": ece([p for p, _ in conf], [c for _, c in conf]), "conflicts": conflicts,
                "answers_from": by_source, "n": n}

    table = []
    for rule in ("measured-only", "current", "compare", "route-accuracy", "expert-first"):
        for margin in ((0.0, 0.05, 0.1, 0.2) if rule in ("current", "compare", "route-accuracy") else (0.15,)):
            for threshold in (0.0, 0.5, 0.6, 0.7, 0.777, 0.85):
                table.append(score(rule, margin, threshold))
    cols = ["rule", "margin", "threshold", "closed_all", "open_em_all", "overall", "coverage", "answered_accuracy",
            "ece_closed", "conflicts"]
    print(" | ".join(cols))
    for t in table:
        print(" | ".join(str(t[c]) for c in cols))
    if args.out:
        args.out.write_text(json.dumps({"items": len(items), "open_route_accuracy": {k: [sum(v), len(v)] for k, v in
                                                                                      routes.items()},
                                        "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
