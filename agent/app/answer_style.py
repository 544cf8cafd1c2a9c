"""Answers in a benchmark's words: the agent's value rendered in the vocabulary a benchmark's references use.

The agent says "axial", "head", "left"; SLAKE's references say "Transverse Plane", "Brain" or "Head", "Left Lung". Exact
match is the primary metric, so an eval that compares the two unrendered scores wording, not reading. `AnswerStyle.fit`
learns the mapping from a benchmark's *train* split alone (questions and reference answers, no images, no agent
runs):

- every reference answer that names a study attribute value the vocabulary knows (agent/core/vocab.py:
  `attribute_value_in`: "Transverse Plane" -> plane axial, "Pelvic Cavity" -> body region pelvis) is counted under
  (the attribute the question asks for, that value); a frontal radiograph's view counts as the coronal plane, as in
  the answer step;
- every reference answer that is a side, bare or with words after it ("Left", "Left Lung", "Right Lobe"), is
  counted under (the question's kind, the organ it names, the side);
- which frame its sides are named in: dxagent's tools state sides in the patient's frame (the DICOM orientation, or
  the radiological display assumed: image left = patient right); a benchmark whose "Where is the liver?" references
  mostly say "Left" names them as the picture shows them. `fit` counts, over "where is the <organ>" questions about
  an organ that lies on one side (`LATERAL_ORGANS`, textbook anatomy), references naming the other side against
  those naming its own; more of the other (at least `MIN_SUPPORT`) gives `sides = "image"` (SLAKE train: liver
  "Left" 38 times, "Right" once).

`render(question, value, measured)` first swaps left and right in a location measured by dxagent's tools
(`measured`: the answer came from the evidence, not from an expert trained on the benchmark's own words) when the
benchmark names image sides, then replaces the value with the reference wording most often used for the same key when that
wording was seen at least `MIN_SUPPORT` times and makes at least half of the key's answers; anything else (yes/no,
numbers, unknown values, keys never seen) is left alone. The eval applies it to the agent's answers when given
`--answer-style-from TRAIN.jsonl`, keeps the agent's own value beside it (`value_raw` in results.jsonl), and says so
in the summary. Research use only.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

MIN_SUPPORT = 3
_SIDES = ("left", "right")
LATERAL_ORGANS = {"liver": "right", "gallbladder": "right", "spleen": "left", "stomach": "left"}
_PLACE = {"left", "right", "upper", "lower", "top", "bottom", "side", "and"}
_VIEW_AS_PLANE = {"frontal": "coronal", "pa": "coronal", "ap": "coronal", "lateral": "sagittal"}


def _canonical(asked: str | None, text: str) -> tuple[str, str] | None:
    """(attribute, value) a wording names, frontal views as the coronal plane."""
    from agent.core.vocab import attribute_value_in, normalise_text

    t = normalise_text(text)
    if asked == "plane" and t in _VIEW_AS_PLANE:
        return "plane", _VIEW_AS_PLANE[t]
    named = attribute_value_in(t, asked) if asked else None
    named = named or attribute_value_in(t)
    if not named:
        return None
    attr, value = named
    if attr == "plane" and str(value) in _VIEW_AS_PLANE:
        value = _VIEW_AS_PLANE[str(value)]
    # a whole answer, not a word inside a longer one ("Brain Edema" is not the body region head)
    if len(t.split()) > 2 and asked != attr:
        return None
    return attr, str(value)


def _side_key(q: Any, text: str) -> tuple[str, str | None]:
    """(side, the words after it) of "Left Lung" / "right"; ("", None) when the wording is not a side."""
    from agent.core.vocab import normalise_text

    toks = normalise_text(text).split()
    if not toks or toks[0] not in _SIDES:
        return "", None
    return toks[0], " ".join(toks[1:]) or None


@dataclass
class AnswerStyle:
    table: dict[str, str] = field(default_factory=dict)  # key -> reference wording
    source: str = ""
    sides: str = "patient"  # the frame the benchmark names sides in: "patient" or "image"

    @staticmethod
    def _attr_key(q: Any, attr: str, value: str) -> str:
        return f"attr|{q.attribute or q.kind}|{attr}|{value}"

    @staticmethod
    def _side_key(q: Any, side: str) -> str:
        return f"side|{q.kind}|{q.organ or ''}|{side}"

    @classmethod
    def fit(cls, pairs: list[tuple[str, str]], source: str = "") -> AnswerStyle:
        """From (question, reference answer) pairs of a train split."""
        from agent.core.question import parse_question

        counts: dict[str, Counter] = defaultdict(Counter)
        frame: Counter = Counter()
        for question, answer in pairs:
            ans = " ".join(str(answer).split())
            if not ans or ans.lower() in ("yes", "no"):
                continue
            q = parse_question(question)
            own = LATERAL_ORGANS.get(q.organ or "") if q.kind == "location" else None
            named = {w for w in re.findall(r"[a-z]+", ans.lower()) if w in _SIDES}
            if own and len(named) == 1:
                frame["patient" if own in named else "image"] += 1
            canon = _canonical(q.attribute, ans) if q.attribute else None
            if canon:
                counts[cls._attr_key(q, *canon)][ans] += 1
            side, rest = _side_key(q, ans)
            if side:  # the bare side too: "Left" 20 times outweighs "Left and Top" 3 times for the liver
                counts[cls._side_key(q, side)][ans] += 1
        table = {}
        for key, c in counts.items():
            wording, n = c.most_common(1)[0]
            if n >= MIN_SUPPORT and n * 2 >= sum(c.values()):
                table[key] = wording
        sides = "image" if frame["image"] >= MIN_SUPPORT and frame["image"] > frame["patient"] else "patient"
        return cls(table=table, source=source, sides=sides)

    def render(self, question: str, value: Any, measured: bool = False) -> tuple[Any, str | None]:
        """(the value in the reference's words, the key used) or (value, None) when no rule applies."""
        from agent.core.question import parse_question
        from agent.core.vocab import normalise_text

        if not isinstance(value, str) or not value.strip() or normalise_text(value) in ("yes", "no"):
            return value, None
        q = parse_question(question)
        flipped = None
        # a position on the picture ("right", "upper left"), never an organ's name ("right lung": SLAKE names organs
        # anatomically, as its boxes show, and only positions as seen)
        if measured and self.sides == "image" and q.kind == "location" and set(normalise_text(value).split()) <= _PLACE:
            mirrored = re.sub(r"\b(left|right)\b", lambda m: _SIDES[m.group(1).lower() == "left"], value, flags=re.I)
            value, flipped = mirrored, ("sides|image" if mirrored != value else None)
        keys = []
        if q.attribute and (canon := _canonical(q.attribute, value)):
            keys.append(self._attr_key(q, *canon))
        t = normalise_text(value)
        if re.fullmatch(r"(left|right)( side)?", t):
            keys.append(self._side_key(q, t.split()[0]))
        for key in keys:
            if key in self.table:
                return self.table[key], f"{flipped}+{key}" if flipped else key
        return value, flipped

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "min_support": MIN_SUPPORT, "sides": self.sides, "table": self.table}


def style_from_manifest(path: Any) -> AnswerStyle:
    """The style of a benchmark split (an eval manifest: its questions and answers; images are not needed)."""
    from pathlib import Path

    from agent.app.eval_data import read_eval_manifest

    _, items = read_eval_manifest(path, None)
    return AnswerStyle.fit([(it.question, it.answer) for it in items if it.question and not it.error],
                           source=str(Path(path).resolve()))


__all__ = ["AnswerStyle", "style_from_manifest"]
