"""The model's reading of a question: the planner's LLM fills a grammar-constrained schema (kind, subject, its type,
location, options, negation), and the result is mapped into the same `Question` the rules produce (agent/core/
question.py), so everything downstream reads one structure. `reading` says which reading the state holds.

The deterministic rules are the default and the fast path (under a millisecond a question); `read_hybrid` keeps the
rules' reading where they are sure and asks the model where they are not. Measured against the hand-labelled
questions by bench/bench_question_reading.py (--model, --hybrid): the figures are in the README. Unknown words stay
unknown: the model's subject goes through the same vocabulary as the rules' (an unrecognised finding is a subject no
tool addresses).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from agent.core.question import ANSWER_KIND, Question, classify_np, location_organ, parse_question
from agent.core.vocab import ATTRIBUTE_VALUES, normalise_text

KINDS = ["yes_no", "choice", "count", "measurement", "location", "attribute", "open"]
TYPES = ["finding", "structure", "device", "attribute", "quantity", "findings"]
ATTRS = {"modality": "modality", "plane": "plane", "body region": "body_region", "mr weighting": "mr_weighting",
         "organ": "organ", "abnormal organ": "abnormal_organ", "largest organ": "largest_organ", "contrast": "contrast",
         "appearance": "appearance", "gender": "gender", "other": "other"}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": KINDS},
        "subject": {"type": "string", "maxLength": 40},
        "subject_type": {"enum": TYPES},
        "location": {"type": "string", "maxLength": 40},
        "options": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
        "negated": {"type": "boolean"},
    },
    "required": ["kind", "subject", "subject_type", "location", "options", "negated"],
    "additionalProperties": False,
}

SYSTEM = """You read a clinician's question about one medical image and fill a JSON form. Fields:
kind: yes_no (answered yes/no) | choice (names alternatives with "or") | count | measurement | location (where/which
side/lobe) | attribute (modality, plane, body region, MR weighting, which organ) | open.
subject: what is asked about, lower case, singular, no location words: a finding ("free air", "pneumothorax",
"small bowel obstruction"), a structure ("heart", "lateral ventricle"), a device ("chest tube"), or for attribute
questions one of: modality, plane, body region, mr weighting, organ, abnormal organ, largest organ, contrast,
appearance, gender, other. Normality questions ("is the liver normal?") have subject "abnormality" and negated true.
subject_type: finding | structure | device | attribute | quantity | findings.
location: the place the question restricts to ("under the diaphragm", "left lung", "abdomen") or "".
options: the alternatives of a choice question, else []. negated: true when yes means the subject is absent.
A body region, modality or view word used as a place is the location, never the subject."""

EXAMPLES = [
    ("Is there free air in the abdomen?", {"kind": "yes_no", "subject": "free air", "subject_type": "finding",
                                           "location": "abdomen", "options": [], "negated": False}),
    ("Are the lungs clear?", {"kind": "yes_no", "subject": "abnormality", "subject_type": "finding",
                              "location": "lung", "options": [], "negated": True}),
    ("Was this taken with CT or MRI?", {"kind": "choice", "subject": "modality", "subject_type": "attribute",
                                        "location": "", "options": ["ct", "mri"], "negated": False}),
    ("What lobe is the nodule in?", {"kind": "location", "subject": "nodule", "subject_type": "finding",
                                     "location": "", "options": [], "negated": False}),
]


SHOTS = Path(__file__).resolve().parents[2] / "prompts" / "question_shots.jsonl"
SHOT_HEAD = (
    "Each question about a medical image is followed by its reading: the kind of answer it expects (yes_no, choice, "
    "count, measurement, location, attribute, open), then its subject: the one thing asked about, as a short standard "
    "clinical term, lower case, singular, without location words; a finding is named as a noun (\"Is the liver "
    "cirrhotic?\" -> cirrhosis). Study-level questions take one of: modality, plane, body region, mr weighting, organ, "
    "abnormal organ, largest organ, contrast, appearance, gender, other; normality questions take abnormality.\n\n")


class ShotReader:
    """Kind and subject read in context by the embedded model: it sees hand-labelled readings of other questions
    (prompts/question_shots.jsonl, made by scripts/make_question_shots.py from tests/data's labelled sets, never the
    test split), one "Question: ... / Reading: <kind>; <subject>" pair each, and continues the pattern for the question
    asked (greedy, one line, no grammar: a schema-constrained JSON reply cost 5-6 s a question against about 1 s).
    The subject is always the model's: on the 400 questions of question_readings_train2.jsonl, with 300 shots drawn
    without them (`make_question_shots.py --exclude train2`), 0.843 against the rules' 0.662, and 0.842 against 0.804
    where the rules call themselves sure. The kind is the rules' where they are sure, else the model's (0.935 there;
    the model's alone 0.890, the rules' 0.925). Location, options, negation, comparisons and stated rules come from the
    rules, which read those well (bench/bench_question_reading.py). The shots are one fixed prefix (~5,900 tokens):
    its llama.cpp state is kept on disk after the first question (agent/llm/backends.py), so a question costs only its
    own tokens. The model runs in a context of its own (n_ctx 8192), so the planner's cached prompt is not evicted."""

    N_CTX = 8192
    _shared: ShotReader | None = None

    def __init__(self, shots: list[dict[str, Any]] | None = None, max_tokens: int = 24):
        from agent.llm.backends import QWEN_FILE, QWEN_SHA256, qwen_gguf

        rows = shots if shots is not None else [json.loads(line) for line in SHOTS.read_text().splitlines() if line.strip()]
        self.prefix = SHOT_HEAD + "".join(f"Question: {' '.join(r['question'].split())}\nReading: {r['kind']}; "
                                          f"{r['subject']}\n\n" for r in rows)
        self.path, self.model_id = str(qwen_gguf()), f"{QWEN_FILE}@sha256:{QWEN_SHA256[:12]}"
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._primed = False

    @classmethod
    def shared(cls) -> ShotReader:
        """One reader a process (the model's context and its prompt state are kept)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def raw(self, text: str) -> tuple[str, str]:
        """(kind, subject) as the model continues the pattern; raises on a reply that is not one."""
        import os

        from agent.llm.backends import _llama, _restore_state, _save_state, _state_key, threads

        llm = _llama(self.path, self.N_CTX, threads(), 0)
        with self._lock:
            first = not self._primed and os.environ.get("DXAGENT_LLAMA_STATE_CACHE", "1") != "0"
            key = _state_key(self.model_id, self.path, self.N_CTX, False, self.prefix) if first else ""
            restored = _restore_state(llm, key) if first else 0
            out = llm.create_completion(self.prefix + f"Question: {' '.join(text.split())[:400]}\nReading:",
                                        max_tokens=self.max_tokens, temperature=0.0, stop=["\n"], seed=0)
            if first and not restored:
                _save_state(llm, key, self.prefix, leading=True)
            self._primed = True
        kind, _, subject = str(out["choices"][0]["text"]).strip().partition(";")
        kind, subject = kind.strip(), subject.strip()
        if kind not in KINDS or not subject:
            raise ValueError(f"not a reading: {out['choices'][0]['text'][:80]!r}")
        return kind, subject

    def read(self, text: str) -> Question:
        """The model's kind and subject with the rules' other fields; the rules' reading, marked unsure, when the model
        fails."""
        q = parse_question(text)
        try:
            kind, subject = self.raw(text)
        except Exception as exc:  # a reply that is not a reading, a model that cannot load: the rules' reading stands
            return q.model_copy(update={"sure": False, "unsure_why": f"{q.unsure_why}; the model's reading failed: "
                                                                    f"{type(exc).__name__}"[:200].lstrip("; ")})
        if q.sure:  # the rules' kind where they account for every word (train2: 0.935 so, the model's alone 0.890)
            kind = q.kind
        subject = normalise_text(subject)
        if took_place(subject, q):
            from agent.engine.learned_reading import core_subject

            subject = core_subject(q)  # "Are the lesions in the cerebellum?" asks about the lesions
        return with_rules(text, q, kind, subject, "attribute" if subject in ATTRS else "", "model")


def with_rules(text: str, q: Question, kind: str, subject: str, subject_type: str, reading: str) -> Question:
    """The kind and subject another reader chose, with the rules' (`q`) location, options, negation and comparison; a
    choice the rules found no options for is open; the rules' stated rule and quantities where the kinds agree."""
    if kind == "choice" and len(q.choices) < 2:
        kind = "open"
    form = {"kind": kind, "subject": subject, "subject_type": subject_type, "location": q.location or "",
            "options": q.choices, "negated": q.negated}
    out = to_question(text, form)
    keep: dict[str, Any] = {"comparison": q.comparison, "reading": reading}
    if out.kind == q.kind and not out.quantities:  # the rules' stated rule and quantities belong to their kind
        keep.update(rule=q.rule, quantities=q.quantities)
    return out.model_copy(update=keep)


def took_place(subject: str, q: Question) -> bool:
    """Whether the model took the place the question names for its subject where the rules read a known finding (or
    normality) there: "What lesions are present in the lungs?" -> "lung" against the rules' "lesion" - the misreading
    issue 30 names. The rules' subject stands then."""
    from agent.engine.learned_reading import _FINDING_WORDS, core_subject, norm

    core = norm(core_subject(q))
    return bool(q.location and core and norm(subject) == norm(q.location) != core
                and (core in _FINDING_WORDS or core == "abnormality"))


class ModelReader:
    """Reads questions with a chat model (the embedded GGUF model, or an endpoint that takes a JSON schema)."""

    def __init__(self, chat: Any, model_id: str, max_tokens: int = 90):
        self.chat, self.model_id, self.max_tokens = chat, model_id, max_tokens

    @classmethod
    def local(cls) -> ModelReader:
        from agent.llm.backends import make_llm

        chat, model_id, _ = make_llm("local")
        return cls(chat, model_id)

    def messages(self, text: str) -> list:
        shots = "\n".join(f"Q: {q}\nA: {json.dumps(a)}" for q, a in EXAMPLES)
        return [SystemMessage(SYSTEM + "\n\nExamples:\n" + shots), HumanMessage(f"Q: {text.strip()[:400]}\nA:")]

    def raw(self, text: str) -> dict[str, Any]:
        """The model's filled form (raises on a reply that is not one)."""
        from agent.engine.llm_calls import structured_invoke

        reply, _ = structured_invoke(self.chat, self.model_id, self.messages(text), SCHEMA, self.max_tokens)
        obj = json.loads(str(reply.content).strip().strip("`").removeprefix("json").strip())
        if not isinstance(obj, dict) or obj.get("kind") not in KINDS:
            raise ValueError(f"not a reading: {str(reply.content)[:80]!r}")
        return obj

    def read(self, text: str) -> Question:
        """The model's reading as a Question; the rules' reading, marked unsure, when the model fails."""
        try:
            form = self.raw(text)
        except Exception as exc:  # a reply that is not JSON, a timeout: the rules' reading stands, flagged
            q = parse_question(text)
            return q.model_copy(update={"sure": False, "unsure_why": f"{q.unsure_why}; the model's reading failed: "
                                                                    f"{type(exc).__name__}"[:200].lstrip("; ")})
        return to_question(text, form)

    def read_hybrid(self, text: str) -> Question:
        q = parse_question(text)
        return q if q.sure else self.read(text)


def to_question(text: str, form: dict[str, Any]) -> Question:
    """A filled form as a Question, its subject through the shared vocabulary."""
    kind = form["kind"]
    subject = normalise_text(str(form.get("subject") or ""))
    stype = form.get("subject_type") or ""
    location = str(form.get("location") or "").strip() or None
    options = [normalise_text(str(o)) for o in form.get("options") or [] if str(o).strip()]
    if kind == "choice" and len(options) < 2:
        kind = "open"
    fields: dict[str, Any] = {"negated": bool(form.get("negated")), "location": location, "subject_type": stype}
    attr = ATTRS.get(subject) if stype == "attribute" or subject in ATTRS else None
    if attr:
        fields["attribute"] = attr
        fields["attributes"] = [attr]
        fields["subject_type"] = "attribute"
        if kind == "yes_no":  # "Is this a CT?": the value the question names
            for key, canon in ATTRIBUTE_VALUES.get(attr, {}).items():
                if f" {key} " in f" {normalise_text(text)} ":
                    fields["attribute_value"] = canon
                    break
    elif subject:
        ph = classify_np(subject)
        organ, side = location_organ(location)
        if ph.kind == "structure":
            fields.update(organ=ph.name, side=ph.side or side)
        else:
            fields.update(finding=ph.name or None, organ=ph.organ or organ, side=ph.side or side)
    allowed = ["yes", "no"] if kind == "yes_no" else options if kind == "choice" else []
    q = Question(text=text, kind=kind, answer_kind=ANSWER_KIND[kind], choices=options if kind == "choice" else [],
                 allowed=allowed, reading="model", **fields)
    q.subject = q.subject_obj().text
    return q
