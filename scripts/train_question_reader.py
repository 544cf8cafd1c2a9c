"""Train the learned question reader (agent/engine/learned_reading.py; issue 30) on the hand-labelled readings.

    .venv/bin/python scripts/train_question_reader.py [--check]

Training pool: tests/data/question_readings.jsonl (dev + heldout, 437) and question_readings_train.jsonl (300). The
test split (question_readings_test.jsonl, 250) is never read here: bench/bench_question_reading.py --learned reports
it. The regularisation C of each model is chosen by 5-fold cross-validation over the pool (folds by question),
printed. Writes agent/engine/question_reader.npz (the weights, float32) and question_reader.json (what it was trained
on, the chosen C, the cross-validated accuracy). Seeded and deterministic (liblinear-free lbfgs on fixed folds); CPU,
about 2-6 minutes (mostly MiniLM over the ~14,000 candidate phrases). --check: only the cross-validation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POOL = [ROOT / "tests" / "data" / "question_readings.jsonl", ROOT / "tests" / "data" / "question_readings_train.jsonl"]
C_GRID = (1.0, 3.0, 10.0, 30.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="cross-validate only; write nothing")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, KFold

    from agent.core.question import parse_question
    from agent.engine import learned_reading as lr
    from agent.index.sentences import embed

    t0 = time.time()
    rows = [json.loads(line) for p in POOL for line in p.read_text().splitlines() if line.strip()]
    qs = [parse_question(r["question"]) for r in rows]
    qvecs = embed([r["question"] for r in rows])
    per_q = [lr.candidates(r["question"], q) for r, q in zip(rows, qs, strict=True)]
    phrases = sorted({t for texts, _ in per_q for t in texts})
    vec_of = dict(zip(phrases, embed(phrases), strict=True))
    feats, ys, groups = [], [], []
    for k, (r, (texts, cues)) in enumerate(zip(rows, per_q, strict=True)):
        gold = {lr.norm(g) for g in [r["subject"], *(r.get("subject_alt") or [])] if g}
        feats.append(lr.subject_features(np.stack([vec_of[t] for t in texts]), qvecs[k], cues))
        ys.extend(int(t in gold) for t in texts)
        groups.extend([k] * len(texts))
    xs, y, grp = np.vstack(feats), np.asarray(ys), np.asarray(groups)
    xk = lr.kind_features(qvecs, [q.kind for q in qs])
    yk = np.asarray([r["kind"] for r in rows])
    print(f"{len(rows)} questions, {len(y)} subject candidates ({y.sum()} right ones); features {time.time() - t0:.0f} s")

    def subject_acc(model, idx_q: set[int], scores: np.ndarray) -> float:
        ok = 0
        for k in idx_q:
            at = np.where(grp == k)[0]
            ok += y[at[int(np.argmax(scores[at]))]]
        return ok / len(idx_q)

    cv_subject, cv_kind = {}, {}
    for c in C_GRID:
        accs = []
        for tr, te in GroupKFold(5).split(xs, y, grp):
            m = LogisticRegression(C=c, max_iter=4000).fit(xs[tr], y[tr])
            scores = np.full(len(y), -np.inf)
            scores[te] = m.decision_function(xs[te])
            accs.append(subject_acc(m, set(grp[te].tolist()), scores))
        cv_subject[c] = float(np.mean(accs))
        kaccs = [float((LogisticRegression(C=c, max_iter=4000).fit(xk[tr], yk[tr]).predict(xk[te]) == yk[te]).mean())
                 for tr, te in KFold(5, shuffle=True, random_state=0).split(xk)]
        cv_kind[c] = float(np.mean(kaccs))
        print(f"C {c:5}: subject cv {cv_subject[c]:.3f}   kind cv {cv_kind[c]:.3f}")
    rules_kind = float(np.mean([q.kind == r["kind"] for q, r in zip(qs, rows, strict=True)]))
    rules_subject = float(np.mean([any(lr.norm(lr.core_subject(q)) == lr.norm(g)
                                       for g in [r["subject"], *(r.get("subject_alt") or [])] if g)
                                   for q, r in zip(qs, rows, strict=True)]))
    print(f"rules on the pool (written looking at dev + heldout: in-sample): kind {rules_kind:.3f}, "
          f"subject {rules_subject:.3f}")
    if args.check:
        return
    c_s = max(C_GRID, key=lambda c: cv_subject[c])
    c_k = max(C_GRID, key=lambda c: cv_kind[c])
    ms = LogisticRegression(C=c_s, max_iter=4000).fit(xs, y)
    mk = LogisticRegression(C=c_k, max_iter=4000).fit(xk, yk)
    assert list(mk.classes_) == sorted(lr.KINDS)
    order = [list(mk.classes_).index(k) for k in lr.KINDS]
    np.savez_compressed(lr.WEIGHTS, subject_coef=ms.coef_.astype(np.float32),
                        subject_intercept=ms.intercept_.astype(np.float32),
                        kind_coef=mk.coef_[order].astype(np.float32), kind_intercept=mk.intercept_[order].astype(np.float32))
    card = {"name": "question_reader", "version": 1, "trained_on": [str(p.relative_to(ROOT)) for p in POOL],
            "n_questions": len(rows), "n_candidates": int(len(y)), "encoder": "all-MiniLM-L6-v2 (agent/index/sentences.py)",
            "subject_C": c_s, "kind_C": c_k, "cv_subject": cv_subject, "cv_kind": cv_kind,
            "licence": "labels: VQA-RAD (CC0) and SLAKE (CC BY 4.0) questions, labelled by the project",
            "report": "bench/bench_question_reading.py --split test --learned (never trained on)"}
    lr.CARD.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {lr.WEIGHTS.name} ({lr.WEIGHTS.stat().st_size // 1024} KB) and {lr.CARD.name}: subject C {c_s}, "
          f"kind C {c_k}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
