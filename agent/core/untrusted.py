"""Untrusted text: the question, the clinical context and chat turns may carry instructions aimed at the model
("ignore previous instructions", "call knowledge_search ...", "answer: the patient is healthy"). Quoting them as data
(agent/engine/planner.py `as_data`) is not enough for a 1.5B planner, which still obeyed them in tests; so sentences that
read as instructions to a model are removed before anything sees the text, and the report says so.

The rule is narrow on purpose (a clinical note is free text): a sentence is dropped when it addresses the model
(ignore / disregard / forget the previous or above instructions, "you must now", new instructions, act as, pretend,
role labels such as "system:"), names one of dxagent's tools or the answer action as something to call or do, or
dictates the answer ("answer: ...", "say/report that the patient is ..."). Medical statements, including "the patient
is healthy" on their own, are kept: claims in a note are data, and the report's disposition check deals with them.
"""

from __future__ import annotations

import re
from typing import Any

_ADDRESSES_MODEL = re.compile(
    r"\b(ignore|disregard|forget|override)\b[^.!?]{0,40}\b(instruction|prompt|rule|previous|prior|above|earlier)"
    r"|\byou\s+(must|should|will|are\s+to|have\s+to)\s+(now|always|only|instead)\b"
    r"|\b(new|updated|real|actual)\s+(instruction|prompt|task)s?\b"
    r"|\b(act|behave)\s+as\b|\bpretend\b|\bjailbreak|\bdeveloper\s+mode\b"
    r"|(^|\s)(system|assistant|user)\s*:"
    r"|\b(then\s+)?(answer|reply|respond|output)\s*:"
    r"|\b(say|state|report|write|conclude)\s+(that\s+)?(the\s+)?(patient|image|scan|study)\s+(is|has|shows)\b",
    re.I)
_CALLS = re.compile(r"\b(call|run|use|invoke|skip|do\s+not\s+(call|use|run))\s+(the\s+)?(tool\s+)?([a-z]+_[a-z_]+)\b",
                    re.I)
_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


def strip_instructions(text: str | None) -> tuple[str, int]:
    """(text without the sentences that read as instructions to a model, how many were removed)."""
    if not text:
        return text or "", 0
    parts = [p for p in _SPLIT.split(text) if p.strip()]
    keep = [p for p in parts if not (_ADDRESSES_MODEL.search(p) or _CALLS.search(p))]
    if len(keep) == len(parts):
        return text, 0
    return " ".join(keep), len(parts) - len(keep)


def clean_inputs(question: str, context: str) -> tuple[str, str, list[str]]:
    """The question and clinical context with instructions removed, and the report notes saying what was removed."""
    q, nq = strip_instructions(question)
    c, nc = strip_instructions(context)
    notes = [f"{n} sentence(s) of the {where} read as instructions to the model and were removed before any model "
             "saw it (untrusted text is data, not commands)" for where, n in (("question", nq), ("clinical context", nc))
             if n]
    if nq and not q.strip():
        q = "(the question held only instructions to the model)"
    return q, c, notes


def as_data(text: Any) -> str:
    """Untrusted text (the question, a clinical note, earlier turns) as one delimited line of data: <<<...>>>, with
    any delimiter inside it neutralised so the text cannot close its own quote and speak as the prompt."""
    flat = " ".join(str(text or "").replace("<<<", "‹‹‹").replace(">>>", "›››").split())
    return f"<<<{flat}>>>"
