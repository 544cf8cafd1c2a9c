"""A learned reading of the question (issue 30): two small linear models over MiniLM sentence vectors, trained on the
hand-labelled readings (tests/data/question_readings.jsonl dev + heldout and question_readings_train.jsonl; the test
split is never trained on) by scripts/train_question_reader.py, weights in question_reader.npz beside this file.

- **kind**: multinomial logistic regression over the question's vector and the rules' kind (one-hot).
- **subject**: every contiguous phrase of up to five words of the question (articles and prepositions dropped, as the
  labels' convention) and the study-attribute names ("modality", "plane", "abnormality", ...) are candidates; a
  logistic regression scores each from its vector, its product with the question's vector and a few cues (where it
  sits, whether it is the rules' subject, a vocabulary finding/organ/device, made of function words); the best wins.

The chosen subject goes through the same vocabulary as the rules' (`reading.to_question`): an unrecognised phrase stays
an unknown finding that no tool addresses. Location, options, negation and any stated rule come from the rules, which
read them well (bench/bench_question_reading.py). `DXAGENT_READING=learned` uses it; the rules stay the default until
the learned reading is measured end to end on SLAKE validate and the free-form sets.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.question import Question, parse_question
from agent.core.vocab import ALIASES, DEVICES, FINDINGS, ORGAN_ADJECTIVES, ORGANS, REGIONS, normalise_text

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "question_reader.npz"
CARD = HERE / "question_reader.json"

KINDS = ["yes_no", "choice", "count", "measurement", "location", "attribute", "open"]
CANON = ["modality", "plane", "body region", "mr weighting", "organ", "abnormal organ", "largest organ",
         "smallest organ", "contrast", "appearance", "other", "abnormality", "findings", "gender", "age", "window",
         "position"]
MAX_WORDS = 5
_DROP = {"a", "an", "the", "of", "in", "on", "at", "under", "within", "to", "from", "s", "this", "image", "patient"}
_SPELLING = {"dilatation": "dilation", "oedema": "edema", "haemorrhage": "hemorrhage", "grey": "gray",
             "tumour": "tumor", "distention": "distension"}
_FUNCTION = {"is", "are", "be", "been", "was", "were", "present", "located", "seen", "visible", "pictured", "shown",
             "there", "any", "what", "which", "how", "does", "do", "did", "can", "you", "see", "this", "that", "these",
             "those", "or", "and", "with", "for", "by", "as", "well", "where", "why", "evidence"}


def norm(text: str | None) -> str:
    """Lower case, no articles/prepositions, British spellings and plural s folded: the labels' convention."""
    if not text:
        return ""
    toks = [_SPELLING.get(t, t) for t in normalise_text(text).split() if t not in _DROP]
    return " ".join(t[:-1] if len(t) > 3 and t.endswith("s") and not t.endswith("ss") else t for t in toks)


_FINDING_WORDS = {norm(f) for f in FINDINGS} | {norm(a) for a in ALIASES}
_PLACE_WORDS = {norm(o) for o in ORGANS} | {norm(a) for a in ORGAN_ADJECTIVES} | {norm(r) for r in REGIONS}
_DEVICE_WORDS = {norm(d) for d in DEVICES}


def core_subject(q: Question) -> str:
    """The one thing a reading says the question is about (the bench's measure)."""
    names = {"body_region": "body region", "mr_weighting": "mr weighting", "largest_organ": "largest organ",
             "smallest_organ": "smallest organ", "abnormal_organ": "abnormal organ"}
    if q.attribute:
        return names.get(q.attribute, q.attribute.replace("_", " "))
    if q.rule and q.quantities:
        return q.quantities[0].replace("_", " ")
    if q.describe and not q.finding:
        return "findings"
    return q.finding or q.organ or (q.quantities[0].replace("_", " ") if q.quantities else "")


def candidates(text: str, q: Question) -> tuple[list[str], np.ndarray]:
    """The subject candidates of a question and their cue features (rows aligned)."""
    toks = norm(text).split()
    n = len(toks)
    core = norm(core_subject(q))
    where: dict[str, tuple[str, int, int]] = {}
    for i in range(n):
        for length in range(1, MAX_WORDS + 1):
            if i + length <= n:
                where.setdefault(" ".join(toks[i:i + length]), ("span", i, length))
    for c in CANON:
        where.setdefault(c, ("canon", 0, 0))
    if core:
        where.setdefault(core, ("rule", 0, 0))
    finding, organ, location = norm(q.finding), norm(q.organ), norm(q.location)
    texts, rows = [], []
    for c, (typ, i, length) in where.items():
        w = c.split()
        prev = toks[i - 1] if typ == "span" and i > 0 else ""
        nxt = toks[i + length] if typ == "span" and i + length < n else ""
        texts.append(c)
        rows.append([typ == "span", typ == "canon", typ == "rule", c == core, length / MAX_WORDS, i / max(n, 1),
                     (i + length) / max(n, 1), i == 0, i + length == n, q.sure, q.sure and c == core,
                     c == finding, c == organ, c == location, sum(t in _FUNCTION for t in w) / len(w),
                     w[0] in _FUNCTION, w[-1] in _FUNCTION, c in _FINDING_WORDS, c in _PLACE_WORDS,
                     c in _DEVICE_WORDS, any(t in _PLACE_WORDS for t in w),
                     any(f in c for f in _FINDING_WORDS if len(f) > 3), prev in _FUNCTION,
                     prev in ("there", "any", "of", "a"), nxt in _FUNCTION, len(w) == 1, q.attribute is not None,
                     *[q.kind == k for k in KINDS], *[typ == "canon" and q.kind == k for k in KINDS]])
    return texts, np.asarray(rows, dtype=np.float32)


def subject_features(cand_vecs: np.ndarray, question_vec: np.ndarray, cues: np.ndarray) -> np.ndarray:
    prod = cand_vecs * question_vec[None, :]
    return np.hstack([cand_vecs, prod, cues * 3.0, prod.sum(1, keepdims=True)])


def kind_features(question_vecs: np.ndarray, rule_kinds: list[str]) -> np.ndarray:
    onehot = np.asarray([[k == kk for kk in KINDS] for k in rule_kinds], dtype=np.float32)
    return np.hstack([question_vecs, onehot * 2.0])


class LearnedReader:
    """The trained models; `read(text)` gives a Question with reading "learned"."""

    _cached: LearnedReader | None = None
    _lock = threading.Lock()

    def __init__(self, weights: dict[str, np.ndarray], card: dict[str, Any]):
        self.w = weights
        self.card = card

    @classmethod
    def load(cls) -> LearnedReader:
        with cls._lock:
            if cls._cached is None:
                if not WEIGHTS.is_file():
                    raise FileNotFoundError(f"{WEIGHTS} is missing: run scripts/train_question_reader.py")
                with np.load(WEIGHTS) as z:
                    weights = {k: z[k] for k in z.files}
                card = json.loads(CARD.read_text()) if CARD.is_file() else {}
                cls._cached = cls(weights, card)
            return cls._cached

    def read(self, text: str) -> Question:
        from agent.engine.reading import to_question
        from agent.index.sentences import embed

        q = parse_question(text)
        texts, cues = candidates(text, q)
        vecs = embed([text, *texts], threads=1)  # ~20 short phrases: one thread is 3x faster on busy cores
        qv, cv = vecs[0], vecs[1:]
        kind_logits = kind_features(qv[None, :], [q.kind]) @ self.w["kind_coef"].T + self.w["kind_intercept"]
        kind = KINDS[int(np.argmax(kind_logits[0]))]
        scores = subject_features(cv, qv, cues) @ self.w["subject_coef"][0] + float(self.w["subject_intercept"][0])
        subject = texts[int(np.argmax(scores))]
        if subject == norm(core_subject(q)) and kind == q.kind:
            return q.model_copy(update={"reading": "learned"})
        if kind == "choice" and len(q.choices) < 2:
            kind = "open"
        form = {"kind": kind, "subject": subject, "subject_type": "attribute" if subject in CANON[:11] else "",
                "location": q.location or "", "options": q.choices, "negated": q.negated}
        out = to_question(text, form)
        keep = {"comparison": q.comparison, "reading": "learned"}
        if out.kind == q.kind and not out.quantities:  # the rules' stated rule and quantities belong to their kind
            keep.update(rule=q.rule, quantities=q.quantities)
        return out.model_copy(update=keep)
