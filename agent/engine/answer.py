"""The answer step: the question's answer composed from the evidence about its subject, or an honest abstention.

1. Which tools *can* address the question (`can_address`, from each tool's `addresses(view)`): if no applicable
   tool names the subject, the agent abstains at once with `no_applicable_tool` and says what would be needed.
2. Which evidence *does* address it (`statements`): a finding whose label is the subject, a measurement of the
   quantity asked, a classifier's probability for that label, a study attribute (the modality) stated by a tool.
   A measurement of something else never answers the question. The critic reads the same function.
3. The value (`from_evidence`): evidence that states a yes/no, a probability, a count, a measurement, a location or
   the attribute is used directly, without the LLM. Otherwise the LLM makes a grammar-constrained choice over the
   allowed values (`yes | no | cannot_tell`, the question's choices) given only the addressing evidence lines, and
   the probability comes from its token probabilities (the embedded model) where the backend returns them.
4. Every answer cites evidence; "cannot_tell", no addressing evidence, or conflicting evidence is an abstention
   with a typed reason.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from agent.core.question import Question
from agent.core.state import Answer, CaseState, Evidence
from agent.core.tool import FindingDraft, Tool
from agent.core.vocab import GENERIC_FINDINGS, MODALITY_ANSWER, attribute_value_in, label_key, subject_of, words
from agent.engine.addressing import (  # noqa: F401 - the answer step's view of the question and its evidence
    MEASUREMENT_NAMES,
    QUANTITATIVE,
    Statement,
    addressed_by,
    addressing_tools,
    can_address,
    finding_matches,
    findings_of,
    needed,
    statements,
    understood,
)

CANNOT_TELL = "cannot_tell"
_RADIOGRAPH = {"DX", "CR"}


# -- the value ---------------------------------------------------------------------------------------------------
def _ids(stmts: list[Statement]) -> list[str]:
    return list(dict.fromkeys(s.eid for s in stmts))


def abstain(reason: str, basis: str, needed_text: str = "", ids: list[str] | None = None) -> Answer:
    return Answer(kind="abstain", reason=reason, basis=basis, needed=needed_text, evidence_ids=ids or [],
                  method="rules")


def _same_attr(attr: str, a: str, b: str) -> bool:
    if attr == "modality":
        return a == b or (a in _RADIOGRAPH and b in _RADIOGRAPH)
    if attr == "plane" and {a.lower(), b.lower()} == {"frontal", "coronal"}:
        return True  # a frontal (PA/AP) radiograph is a projection onto the coronal plane
    return a.lower() == b.lower()


def _attr_words(attr: str, value: str) -> str:
    return MODALITY_ANSWER.get(value, value) if attr == "modality" else value


def _stated(attr: str, s: Statement) -> str:
    """ "plane axial (classifier, confidence 1.00) per E1": a study attribute as a statement gives it."""
    a = s.attribute
    p = a.get("probability")
    return (f"{attr.replace('_', ' ')} {_attr_words(attr, str(a.get('value')))} ({a.get('source', '?')}"
            + (f", confidence {p:.2f})" if isinstance(p, int | float) else ")") + f" per {s.eid}")


def from_attribute(q: Question, stmts: list[Statement]) -> Answer:
    if q.kind == "attribute" and len(q.attributes) > 1:  # "the pixel spacing and intensity range": one value each
        first = {}
        for s in stmts:
            first.setdefault(s.attribute["name"], s)
        parts = [f"{n.replace('_', ' ')} {_attr_words(n, str(first[n].attribute['value']))}" for n in q.attributes
                 if n in first]
        ids = _ids(list(first.values()))
        return Answer(kind="phrase", value="; ".join(parts), evidence_ids=ids, method="evidence",
                      basis=f"stated by {', '.join(ids)}" + ("" if len(parts) == len(q.attributes) else
                                                           f" ({len(parts)} of {len(q.attributes)} attributes)"))
    if q.kind == "yes_no" and q.attribute_value and q.also:  # "Is this a chest CT?": every value it names
        return _all_of(q, stmts)
    stmts = [s for s in stmts if s.attribute.get("name") == q.attribute] or stmts
    s = stmts[0]  # the first tool that stated it (later calls on derived views repeat it)
    a = s.attribute
    value, p, how = str(a.get("value")), a.get("probability"), _stated(q.attribute, s)
    if q.kind == "yes_no" and q.attribute_value:
        same = _same_attr(q.attribute, value, q.attribute_value)
        return Answer(kind="yes_no", value="yes" if same else "no", probability=p, evidence_ids=[s.eid],
                      basis=f"asked {_attr_words(q.attribute, q.attribute_value)}; {how}", method="evidence")
    if q.kind == "choice" and q.attribute in ("largest_organ", "smallest_organ"):  # "Which is bigger, A or B?"
        areas = {label_key(k): v for k, v in (a.get("areas") or {}).items()}
        def area_key(c: str) -> str:  # "left kidney" is compared by the kidney's area when sides are not split
            k = label_key(c)
            return k if k in areas or k.split()[0] not in ("left", "right") else k.split(" ", 1)[-1]

        seen = {c: areas[area_key(c)] for c in q.choices if area_key(c) in areas}
        if not seen:
            return abstain("evidence_does_not_address", f"none of {q.choices} was found by {s.eid}", ids=[s.eid])
        pick = (max if q.attribute == "largest_organ" else min)(seen, key=seen.get)
        missing = [c for c in q.choices if c not in seen]
        return Answer(kind="choice", value=pick, evidence_ids=[s.eid], method="evidence",
                      basis=f"areas per {s.eid}: " + ", ".join(f"{c} {v:.4g}" for c, v in seen.items())
                      + (f"; not found: {', '.join(missing)}" if missing else ""))
    if q.kind == "choice":
        for c in q.choices:
            named = attribute_value_in(c, q.attribute)
            if named and _same_attr(q.attribute, value, named[1]):
                return Answer(kind="choice", value=c, probability=p, evidence_ids=[s.eid], basis=how, method="evidence")
        return abstain("evidence_does_not_address", f"{how}: none of the choices {q.choices}", ids=[s.eid])
    return Answer(kind="phrase", value=_attr_words(q.attribute, value), probability=p, evidence_ids=[s.eid], basis=how,
                  method="evidence")


def _all_of(q: Question, stmts: list[Statement]) -> Answer:
    """A yes/no that names several study attributes ("Was this CT taken sagittally?"): "no" as soon as one stated value
    differs (the surest such statement: one read from the data, else the most probable), "yes" only when each is stated
    and the same (at the smallest probability among them); an attribute no evidence stated leaves a "yes"
    unanswerable."""
    checks = {q.attribute: q.attribute_value, **q.also}
    said, missing = [], []
    for attr, want in checks.items():
        s = next((x for x in stmts if x.attribute.get("name") == attr), None)
        if s is None:
            missing.append(attr.replace("_", " "))
            continue
        value, p = str(s.attribute.get("value")), s.attribute.get("probability")
        said.append((_same_attr(attr, value, want), p, s.eid, _stated(attr, s)))
    asked = " ".join(_attr_words(a, v) for a, v in checks.items())
    if differ := sorted((x for x in said if not x[0]), key=lambda x: (x[1] is not None, -(x[1] or 0.0))):
        _, p, eid, how = differ[0]  # the surest: a value read from the data (no probability), else the most probable
        return Answer(kind="yes_no", value="no", probability=p, evidence_ids=[eid], method="evidence",
                      basis=f"asked {asked}; {how}")
    if missing:
        return abstain("evidence_does_not_address", f"asked {asked}; no evidence stated the {', '.join(missing)}",
                       ids=[x[2] for x in said])
    probs = [x[1] for x in said if x[1] is not None]  # a value read from the data (a DICOM tag) carries none
    return Answer(kind="yes_no", value="yes", evidence_ids=list(dict.fromkeys(x[2] for x in said)), method="evidence",
                  probability=min(probs) if probs else None,
                  basis=f"asked {asked}; " + "; ".join(x[3] for x in said))


def _flip(yes: bool, q: Question) -> str:
    return "no" if yes == q.negated else "yes"


@dataclass
class Places:
    """What a location answer needs beyond the statements: each evidence id's view, and the organs outlined per view."""

    views: dict[str, Any] = field(default_factory=dict)
    organs: dict[str, list[tuple[str, list[float]]]] = field(default_factory=dict)

    @classmethod
    def of(cls, state: CaseState, tools: dict[str, Tool]) -> Places:
        from agent.analysis.anatomy import organ_boxes

        out = cls()
        for e in state.evidence:
            try:
                v = state.view(e.args.get("view", "V1"))
            except KeyError:
                continue
            out.views[e.id] = v
            if e.status == "ok":
                out.organs.setdefault(v.id, []).extend(organ_boxes(findings_of(e, state, tools)))
        return out


def from_evidence(q: Question, stmts: list[Statement], places: Places | None = None) -> Answer | None:
    """The answer where the evidence states it directly; None where it needs reading (the LLM step)."""
    if q.attribute:
        return from_attribute(q, stmts)
    fs = [(s, s.finding) for s in stmts if s.finding is not None]
    if q.describe:
        lines = [s.line().split("] ", 1)[1] + f" [{s.eid}]" for s, _ in fs][:6]
        return Answer(kind="phrase", value="; ".join(lines), evidence_ids=_ids(stmts), method="evidence",
                      basis=f"findings of {len(_ids(stmts))} tool call(s)")
    if q.kind == "yes_no" and q.rule:  # "Is the cardiac silhouette less than half the chest width?" -> CTR < 0.5
        return from_rule(q, fs)
    if q.kind == "yes_no":
        claims = [(s, f) for s, f in fs if f.present is not None]
        if claims:
            yes = [s.eid for s, f in claims if f.present]
            no = [s.eid for s, f in claims if not f.present]
            if yes and no:
                return abstain("tools_conflict", f"{q.subject}: present per {', '.join(yes)}, absent per {', '.join(no)}",
                               ids=_ids(stmts))
            s, f = claims[0]
            # a presence's probability; an absence's is not used: the segmenter's sureness of an absence did not
            # separate right from wrong "no"s on SLAKE train (absence >= 0.9: 83 of 125 right; < 0.9: 16 of 19)
            p = f.probability if f.present and f.probability is not None else None
            return Answer(kind="yes_no", value=_flip(bool(yes), q), probability=p, evidence_ids=_ids([c for c, _ in claims]),
                          basis=f"{f.label} {'present' if yes else 'absent'} per {', '.join(yes or no)}"
                                + (f" ({f.note})" if f.note else ""), method="evidence")
        probs = [(s, f.probability) for s, f in fs if f.probability is not None]
        if probs:
            s, pr = probs[0]
            yes = pr >= 0.5
            return Answer(kind="yes_no", value=_flip(yes, q), probability=round(pr if yes else 1 - pr, 4),
                          evidence_ids=[s.eid], basis=f"{s.finding.label} probability {pr:.2f} per {s.eid} "
                                                      "(yes at >= 0.5)", method="evidence")
        return None
    if q.kind == "count":
        # instances: findings claimed present, or a detector's boxes; a segmenter's tissue class is not an instance
        inst = [(s, f) for s, f in fs if f.present or (f.bbox is not None and s.tool_kind == "detect")]
        if not inst:
            none = [s for s, f in fs if f.present is False]
            if none:
                return Answer(kind="count", value=0, evidence_ids=_ids(none), method="evidence",
                              basis=f"no {q.subject} found by {', '.join(_ids(none))}")
            return None
        return Answer(kind="count", value=len(inst), evidence_ids=_ids([s for s, _ in inst]), method="evidence",
                      basis=f"{len(inst)} {q.subject} instance(s) found by {', '.join(_ids([s for s, _ in inst]))}")
    if q.kind == "measurement" and len(q.organs) > 1:  # "how much fat, soft tissue and bone": one value each
        parts, ids, names = [], [], []
        for organ in q.organs:
            for s, f in fs:
                if organ in (subject_of(f.label).organ, label_key(f.label)):
                    m = next((m for name in q.quantities for m in f.measurements if m.name == name), None)
                    if m is not None:
                        parts.append(f"{organ} {m.value:.4g} {m.unit}")
                        ids.append(s.eid)
                        names.append(m.name.replace("_", " "))
                        break
        if parts:
            return Answer(kind="phrase", value="; ".join(parts), evidence_ids=list(dict.fromkeys(ids)), method="evidence",
                          basis=f"{' / '.join(dict.fromkeys(names))} per tissue from {', '.join(dict.fromkeys(ids))}")
    if q.kind == "measurement":
        for name in q.quantities:
            for s, f in fs:
                m = next((m for m in f.measurements if m.name == name), None)
                if m is not None:
                    return Answer(kind="measurement", value=m.value, unit=m.unit, evidence_ids=[s.eid], method="evidence",
                                  basis=f"{m.name.replace('_', ' ')} of {f.label} per {s.eid}")
        return None
    if q.kind in ("location", "choice"):
        for s, f in fs:
            where = f" {words(f.location + ' ' + f.label)} "
            if q.kind == "choice":
                hit = [c for c in q.choices if f" {words(c)} " in where]
                if len(hit) == 1:
                    return Answer(kind="choice", value=hit[0], evidence_ids=[s.eid], method="evidence",
                                  basis=f"{f.label} at {f.location or 'its label'} per {s.eid}")
            elif (f.present is not False or f.bbox is not None) and (where := place_of(f, s, places or Places())):
                text, how = where
                return Answer(kind="location", value=text, evidence_ids=[s.eid], method="evidence",
                              basis=f"{f.label} per {s.eid}: {how}")
        return None
    if q.kind == "open" and q.finding in GENERIC_FINDINGS:
        pos = [(s, f) for s, f in fs if f.present or (f.probability is not None and f.probability >= 0.5)]
        if pos:
            return Answer(kind="phrase", value=", ".join(dict.fromkeys(f.label for _, f in pos)),
                          evidence_ids=_ids([s for s, _ in pos]), method="evidence",
                          basis="labels stated present (or p >= 0.5) by " + ", ".join(_ids([s for s, _ in pos])))
    return None


_RULE = re.compile(r"^(\w+) ([<>]) ([0-9.]+)$")


def from_rule(q: Question, fs: list[tuple[Statement, FindingDraft]]) -> Answer | None:
    """A yes/no decided by a stated rule on a measurement ("cardiothoracic_ratio < 0.5"), quoted in the basis."""
    m = _RULE.match(q.rule or "")
    if not m:
        return None
    name, op, limit = m.group(1), m.group(2), float(m.group(3))
    for s, f in fs:
        meas = next((x for x in f.measurements if x.name == name), None)
        if meas is None:
            continue
        holds = meas.value < limit if op == "<" else meas.value > limit
        return Answer(kind="yes_no", value="yes" if holds else "no", evidence_ids=[s.eid], method="evidence",
                      basis=f"rule: yes if {name.replace('_', ' ')} {op} {limit:g}; measured {meas.value:.3g} per {s.eid}"
                            + (f" ({f.note.split(';')[0]})" if f.note else ""))
    return None


def place_of(f: FindingDraft, s: Statement, places: Places) -> tuple[str, str] | None:
    """A finding's location in anatomical words (agent/analysis/anatomy.py), never pixel coordinates; None when the
    finding has no position on a known view. A tool's own anatomical location ("right hemithorax") is kept."""
    from agent.analysis.anatomy import describe, point_of

    view = places.views.get(s.eid)
    if f.location and not _PIXELS.search(f.location) and f.location not in ("heart borders", "body"):
        return f.location, "as the tool located it"  # already anatomical (organ_segment's patient side)
    point = point_of(f.bbox, f.location)
    if point is None or view is None:
        return None
    organs = [(n, b) for n, b in places.organs.get(view.id, []) if words(n) != words(f.label)]
    return describe(point, view, bbox=f.bbox, organs=organs)


_PIXELS = re.compile(r"\b(row|col|column|px|pixel)\b\s*\d|\(\s*\d+\s*,\s*\d+\s*\)")


def conform(q: Question, a: Answer) -> Answer:
    """The answer in the form the question asks (issue 30): a yes/no question gets yes or no, a choice one of its
    options, a count a whole number, a location no pixel coordinates; anything else becomes an abstention."""
    if a.kind == "abstain":
        return a
    bad = None
    if q.kind == "yes_no" and (a.kind != "yes_no" or a.value not in ("yes", "no")):
        bad = f"a yes/no question got {a.kind} {a.value!r}"
    elif q.kind == "choice" and q.choices and a.value not in q.choices:
        named = [c for c in q.choices if words(c) == words(str(a.value))]
        if len(named) == 1:
            return a.model_copy(update={"kind": "choice", "value": named[0]})
        bad = f"{a.value!r} is not one of the options {q.choices}"
    elif q.kind == "count" and not (a.kind == "count" and isinstance(a.value, int)):
        bad = f"a count question got {a.kind} {a.value!r}"
    elif q.kind == "location" and _PIXELS.search(str(a.value)):
        bad = f"a location in pixel coordinates ({a.value}) is not an anatomical answer"
    if bad:
        return abstain("evidence_does_not_address", f"{bad}: not given", ids=a.evidence_ids)
    return a


# -- the LLM's constrained choice -------------------------------------------------------------------------------
def allowed_values(q: Question) -> list[str] | None:
    """The values the LLM may choose (closed questions), or None for a short free answer."""
    if q.kind == "yes_no":
        return ["yes", "no", CANNOT_TELL]
    if q.kind == "choice" and q.choices:
        return list(dict.fromkeys(q.choices)) + [CANNOT_TELL]
    if q.kind == "count":
        return [str(i) for i in range(21)] + [CANNOT_TELL]
    return None


def answer_schema(allowed: list[str] | None) -> dict[str, Any]:
    value = {"enum": allowed} if allowed else {"type": "string", "maxLength": 48}
    return {"type": "object", "properties": {"answer": value}, "required": ["answer"], "additionalProperties": False}


def choice_probability(tokens: list[dict[str, Any]], chosen: str, allowed: list[str]) -> float | None:
    """P(chosen | the allowed values) from per-token log-probabilities: at each token of the value, the chosen token's
    probability over the mass of the alternatives that still lead to an allowed value (the grammar's view)."""
    text, start = "", None
    for i, tok in enumerate(tokens):
        if re.search(r'"answer"\s*:\s*"$', text):
            start = i
            break
        text += tok["token"]
    if start is None:
        return None
    prob, prefix, live = 1.0, "", list(allowed)
    for tok in tokens[start:]:
        if len(live) <= 1:
            break
        top = dict(tok.get("top") or {})
        if "logprob" in tok:
            top.setdefault(tok["token"], tok["logprob"])
        if tok["token"] not in top:
            return None
        mass = sum(math.exp(lp) for alt, lp in top.items()
                   if any(v.startswith(prefix + alt) or (prefix + alt).startswith(v + '"') for v in live))
        if mass <= 0:
            return None
        prob *= math.exp(top[tok["token"]]) / mass
        prefix += tok["token"]
        live = [v for v in live if v.startswith(prefix) or prefix.startswith(v + '"') or prefix == v]
    return round(min(1.0, prob), 4)


def ask(chat: Any, model_id: str, prompt_name: str, q: Question, record: Any, node: str, *,
        case_line: str = "", evidence: list[str] | None = None, max_tokens: int = 24,
        seconds: float = 120.0) -> tuple[str | None, float | None, str]:
    """One constrained answer from `chat` within `seconds` (an endpoint that stays silent longer is abandoned):
    (value, probability, error). Records the call when `record` is given."""
    import functools

    from agent.engine.llm_calls import bounded_call, render, structured_invoke

    allowed = allowed_values(q)
    prompt = render(prompt_name, question=q.text, case_line=case_line, evidence=evidence or [], allowed=allowed)
    messages = [SystemMessage(render("answer_system")), HumanMessage(prompt)]
    request = {"model": model_id, "messages": [{"role": "system", "content": messages[0].content},
                                               {"role": "user", "content": prompt}], "allowed": allowed}
    t0 = time.perf_counter()
    try:
        reply, params = bounded_call(chat, seconds, functools.partial(
            structured_invoke, chat, model_id, messages, answer_schema(allowed), max_tokens), "the answer step's LLM")
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        if record:
            record(kind="llm", node=node, name="answer", payload={"request": request, "error": err,
                                                                   "latency_s": time.perf_counter() - t0})
        return None, None, err
    meta = dict(reply.response_metadata or {})
    tokens = meta.get("token_logprobs") or []
    if not tokens:
        meta.pop("token_logprobs", None)
    value, prob, err = None, None, ""
    try:
        text = str(reply.content).strip()
        if text.startswith("```"):
            text = text.strip("`").removeprefix("json").strip()
        obj = json.loads(text)
        value = str(obj["answer"]).strip() if isinstance(obj, dict) and "answer" in obj else None
        if value is None:
            err = "reply has no 'answer' field"
        elif allowed and value not in allowed:
            err, value = f"answer {value!r} is not one of {allowed}", None
    except (json.JSONDecodeError, TypeError) as exc:
        err = f"reply is not JSON ({exc}): {str(reply.content)[:80]!r}"
    if value is not None and allowed and tokens:
        prob = choice_probability(tokens, value, allowed)
    if record:
        record(kind="llm", node=node, name="answer", payload={
            "request": request, "params": params, "response": {"content": reply.content, "tool_calls": []},
            "usage": dict(reply.usage_metadata or {}), "latency_s": time.perf_counter() - t0, "metadata": meta,
            "value": value, "probability": prob, "rejected": err or None})
    return value, prob, err


def typed_value(q: Question, value: str) -> tuple[str, Any]:
    if q.kind == "count" and value.isdigit():
        return "count", int(value)
    return {"yes_no": "yes_no", "choice": "choice", "location": "location"}.get(q.kind, "phrase"), value


# -- the step ----------------------------------------------------------------------------------------------------
GRACE_S = 10.0  # the answer step and the written impression each get at least this long, even with the budget spent


def grace_seconds(state: CaseState) -> float:
    """Time an LLM call after the loop may take: what is left of the wall-clock budget, at least GRACE_S."""
    return max(GRACE_S, state.budget.max_wall_s - state.budget.elapsed())


def compose_answer(state: CaseState, tools: dict[str, Tool], chat: Any = None, model_id: str = "",
                   record: Any = None, case_line: str = "") -> Answer:
    """The answer: read from the measured evidence (or chosen by the LLM from it), calibrated, then weighed against
    the answers of tools that answer the question itself (`fuse`), in the form asked."""
    q, _ = understood(state, tools)
    a = fuse(q, from_tools(state, tools, chat, model_id, record, case_line), expert_answers(state, tools),
             outside=organ_outside(q, state))
    return finish(hold_for_wording(q, a), q)


REGION_SURE = 0.9  # the study classifier's body-region probability at which an organ's region is taken as settled


def organ_outside(q: Question, state: CaseState) -> str | None:
    """The study's body region when the question's organ never appears in it (vocab.ORGAN_REGIONS, from SLAKE train's
    organ boxes) and the study classifier names that region at p >= REGION_SURE: no kidney on a head MR is anatomy, not
    a segmenter's miss. None otherwise (the organ can be there, or the region is not known surely)."""
    from agent.analysis.study import study_facts
    from agent.core.vocab import ORGAN_REGIONS

    regions = ORGAN_REGIONS.get(q.organ or "")
    if not regions or not state.views:
        return None
    f = study_facts(state.views[0])
    region, p = f["body_region"], f["body_region_probability"] or 0.0
    return region if region and p >= REGION_SURE and region not in regions else None


def hold_for_wording(q: Question, a: Answer) -> Answer:
    """A closed answer to a question worded unlike those the answer probabilities were measured on (Question.wording,
    calibration.new_wording) is given only at the threshold fitted for such questions
    (calibration.min_probability(new_wording=True)): there the reading itself may be wrong in ways a route's accuracy
    on SLAKE's wording does not count. Others pass unchanged."""
    from agent.engine import calibration

    if a.kind not in calibration.CLOSED or a.probability is None or not calibration.new_wording(q.wording):
        return a
    floor = calibration.min_probability(new_wording=True)
    if a.probability >= floor:
        return a
    return abstain("low_confidence", f"{a.value} at p {a.probability:.2f} ({a.basis}), withheld: the question is "
                                     f"worded unlike those answer probabilities were measured on (similarity "
                                     f"{q.wording:.2f}), where an answer needs p {floor:.2f}",
                   "the question in plainer words, or a tool whose answers on it are surer", ids=a.evidence_ids)


def from_tools(state: CaseState, tools: dict[str, Tool], chat: Any = None, model_id: str = "", record: Any = None,
               case_line: str = "") -> Answer:
    """The answer from the evidence that states the subject (not yet finished)."""
    q, addressing = understood(state, tools)
    addressing = [n for n in addressing if n not in tools or not tools[n].answers_questions]
    if not addressing:
        return abstain("no_applicable_tool", f"no applicable tool can address {q.subject or 'the question'}", needed(q))
    stmts = statements(q, state, tools)
    if not stmts:
        spent = state.tool_steps >= state.budget.max_steps
        reason = "planner_failed" if state.planner_failures else "budget_spent" if spent else "evidence_does_not_address"
        why = {"planner_failed": "the planner failed before any evidence addressed",
               "budget_spent": "the tool budget was spent before any evidence addressed",
               "evidence_does_not_address": "no evidence gathered addresses"}[reason]
        ran = {e.tool: e.id for e in state.evidence if e.status == "ok"}
        todo = [n for n in addressing if n not in ran]
        need = f"a call of {', '.join(todo)}" if todo else \
            (f"{', '.join(f'{n} ran ({ran[n]})' for n in addressing if n in ran)} but stated nothing about "
             f"{q.subject or 'the question'} here; a tool that states it")
        return abstain(reason, f"{why} {q.subject or 'the question'}", need)
    a = from_evidence(q, stmts, Places.of(state, tools) if q.kind == "location" else None)
    if a is not None:
        return calibrate(q, conform(q, a), stmts)
    if chat is None:
        return abstain("evidence_does_not_address", "the evidence needs reading and no LLM is available",
                       ids=_ids(stmts))
    value, prob, err = ask(chat, model_id, "answer", q, record, "answer", case_line=case_line,
                           evidence=[s.line() for s in stmts], seconds=grace_seconds(state))
    if value is None:
        return abstain("planner_failed", f"the answer step failed: {err[:160]}", ids=_ids(stmts))
    if value == CANNOT_TELL:
        return abstain("evidence_does_not_address", "the model could not tell from the evidence lines",
                       ids=_ids(stmts))
    kind, typed = typed_value(q, value)
    return calibrate(q, conform(q, Answer(kind=kind, value=typed, probability=prob, evidence_ids=_ids(stmts),
                                          method="llm", basis=f"chosen by the model from {len(stmts)} evidence "
                                                              f"line(s) about {q.subject}")), stmts)


# -- fusion with tools that answer the question itself -------------------------------------------------------------
# how much more probable one side must be to outweigh the other; closer is a tools_conflict. Chosen with the rule on
# held-out SLAKE train (scripts/choose_fusion.py, 961 items, threshold 0.5): margins 0 / 0.05 / 0.1 / 0.2 answered
# 0.923 / 0.916 / 0.905 / 0.889 of the items, right 0.866 / 0.872 / 0.876 / 0.879 of the time, 0.799 / 0.798 / 0.793 /
# 0.782 right over all items; 0.05 sends the 0.7 % near-ties (7 of 961) to an abstention at no cost over all items
FUSION_MARGIN = 0.05


def expert_answers(state: CaseState, tools: dict[str, Tool]) -> list[tuple[Evidence, list[tuple[str, float]]]]:
    """The ranked answers of every successful call of a tool that answers the case's question itself."""
    out = []
    for e in state.evidence:
        tool = tools.get(e.tool)
        if e.status != "ok" or tool is None or not tool.answers_questions or e.output is None:
            continue
        try:
            ranked = tool.answer_to(tool.Output.model_validate(e.output), state.view(e.args.get("view", "V1")),
                                    state.question)
        except KeyError:
            continue
        if ranked:
            out.append((e, ranked))
    return out


def same_answer(q: Question, a: Any, b: Any) -> bool:
    """Two values that say the same thing: equal words, or the same study attribute value in other words
    ("axial" and "Transverse Plane"; a frontal radiograph and the coronal plane)."""
    wa, wb = words(str(a)), words(str(b))
    if wa == wb:
        return True
    if q.attribute:
        na, nb = attribute_value_in(wa, q.attribute), attribute_value_in(wb, q.attribute)
        if na and nb and na[0] == nb[0]:
            return _same_attr(na[0], str(na[1]), str(nb[1]))
    return False


def expert_value(q: Question, ranked: list[tuple[str, float]]) -> tuple[str, Any, float] | None:
    """(answer kind, value, probability) of the best-ranked answer in the form the question asks."""
    for value, p in ranked:
        v = words(value)
        if q.kind == "yes_no":
            if v in ("yes", "no"):
                return "yes_no", v, p
        elif q.kind == "choice":
            named = [c for c in q.choices if same_answer(q, c, value)]
            if len(named) == 1:
                return "choice", named[0], p
        elif q.kind == "count":
            if v.isdigit():
                return "count", int(v), p
        else:
            return ("location" if q.kind == "location" else "phrase"), value, p
    return None


def fuse(q: Question, a: Answer, experts: list[tuple[Evidence, list[tuple[str, float]]]], *,
         margin: float | None = None, min_p: float | None = None, measured_stands: bool = False,
         outside: str | None = None) -> Answer:
    """The answer from the measured evidence (`a`) weighed against a question-answering tool's (the most probable
    answer in the form asked when several such tools answered; those that agree are cited with it),
    both as calibrated probabilities (the expert's from its temperature, a measured answer's from its route's
    held-out accuracy, agent/engine/calibration.py):

    - agreeing: `a`, citing both;
    - `a` abstained (nothing measured addresses the subject, or its route is too often wrong): the expert's answer
      when its probability reaches `min_p` (the answer threshold), else `a`;
    - disagreeing: the side whose probability is higher by `margin` (FUSION_MARGIN), else a `tools_conflict`
      abstention naming both. A statement read from the data without a probability (a DICOM tag, the user's word, a
      stated rule over a measurement) stands: no expert outweighs it. A tool's reading with neither a
      probability nor a calibrated route (one seen fewer than calibration.MIN_N times; an organ the segmenter names
      has had an open route of its own since 2026-12-08, and at 0.22 it is withheld before it gets here) weighs
      nothing against a calibrated expert (`measured_stands=True` lets it stand too, the rule before this one).

    A count of none (the segmenter found no instance of the organ) is the segmenter's "absent" and weighs as that
    route's calibrated probability (organ_segment:absent, 0.68 on held-out train), as a yes/no "is there a kidney?"
    does - unless the organ is `outside` the study's region (organ_outside: no kidney on a head MR), where it stands.
    On the 37 count questions of held-out train pictures (the expert's held-out card, members that never saw them;
    the segmenter in sample), a count of none that stood against the expert was wrong 4 of 5 times (the segmenter
    missed kidneys the expert counted at 0.91-1.00); weighed, the expert outweighed it 3 times (right each time) and
    it stood twice (once wrong): 27 -> 30 of 37 right (2026-12-07).

    Agreeing answers carry the higher of the two probabilities (a measured "absent" kept its route's 0.67 where the
    expert agreed, and was right 0.92 of the time).

    Chosen on held-out SLAKE train (scripts/choose_fusion.py: the expert's out-of-sample answers on its 20 % held-out
    image split against the agent's measured answers, 961 items; in-sample for the choice, validate never read for
    it), closed accuracy / open exact match over all items at threshold 0.5: this rule ("compare", margin 0.05)
    0.879 / 0.740 (answered 0.916, right 0.872 of the time, closed ECE 0.018, 7 conflicts); the measured evidence
    alone 0.448 / 0.382; the rule before (a reading without probability stands) 0.881 / 0.659; the expert first, the
    measured evidence only where it steps aside, 0.869 / 0.747 (ECE 0.028, and a DICOM tag would lose to it).
    """
    from agent.engine import calibration

    margin = FUSION_MARGIN if margin is None else margin
    min_p = calibration.min_probability() if min_p is None else min_p
    if not experts or q.describe:
        return a
    answers = [(e, ranked, got) for e, ranked in experts if (got := expert_value(q, ranked)) is not None]
    if not answers:
        return a
    e, ranked, (kind, value, p) = max(answers, key=lambda x: x[2][2])  # several such tools: the most probable answer
    agree = [x[0].id for x in answers if x[0].id != e.id and same_answer(q, x[2][1], value)]
    others = "; ".join(f"{v} {pr:.2f}" for v, pr in ranked[:3])
    ea = conform(q, Answer(kind=kind, value=value, probability=round(float(p), 4), evidence_ids=[e.id, *agree],
                           method="expert", route=f"{e.tool}:{q.kind}",
                           basis=f"{e.tool} answered {value} at p {p:.2f} per {e.id} (its top answers: {others})"
                                 + (f"; {', '.join(agree)} agree" if agree else "")))
    if ea.kind == "abstain":
        return a
    if a.kind == "abstain":
        if p >= min_p:
            return ea.model_copy(update={"basis": f"{ea.basis}; the measured evidence did not answer ({a.reason}: "
                                                  f"{a.basis[:120]})"})
        return a.model_copy(update={"basis": f"{a.basis}; {e.tool} said {value} at p {p:.2f}, under the "
                                             f"{min_p:.2f} an answer needs",
                                    # a tool did address it: what is missing is confidence, not a tool
                                    "reason": "low_confidence" if a.reason == "no_applicable_tool" else a.reason,
                                    "evidence_ids": list(dict.fromkeys([*a.evidence_ids, e.id]))})
    if a.kind == "count" and a.value == 0 and a.probability is None and not read_from_data(a) and not outside:
        tool = (a.route or "").split(":", 1)[0]
        pt, n, key = calibration.lookup(f"{tool}:absent", None)
        if pt is not None:  # none counted where the organ can be: the tool's calibrated "absent"
            a = a.model_copy(update={"probability": pt, "basis": f"{a.basis}; calibrated: none counted -> {pt:.2f} "
                                                                  f"(route {key}, {n} held-out answers)"})
    if same_answer(q, a.value, value):  # agreeing: the better-supported of the two probabilities (held-out train:
        # a measured "absent" kept its route's 0.67 where it agreed with the expert, and was right 0.92 of the time)
        both = None if a.probability is None else round(max(a.probability, float(p)), 4)
        return a.model_copy(update={"evidence_ids": list(dict.fromkeys([*a.evidence_ids, e.id])), "probability": both,
                                    "basis": f"{a.basis}; {e.tool} agrees ({value}, p {p:.2f}, {e.id})"})
    if a.probability is not None:
        pt = a.probability
    elif measured_stands or read_from_data(a) or a.kind == "count":  # read from the data, or counted from a
        # segmentation: some instances found, or none of an organ outside the study's region (the expert said "2"
        # kidneys at 0.74 on a brain MR where the segmenter counted none): it stands, the disagreement is noted. A count
        # of none where the organ can be weighed above as the calibrated "absent" (held-out train, choose_fusion
        # "compare" 0.05 at 0.5: open exact match 0.7361 -> 0.7415 for that alone, before the region exception)
        why = f"no {q.organ} in a {outside} study (organ regions of SLAKE train)" if outside and a.value == 0 else \
            "a value read from the data"
        return a.model_copy(update={"basis": f"{a.basis}; {e.tool} said {value} at p {p:.2f} ({e.id}), outweighed "
                                             f"by {why}"})
    else:  # a tool's reading with no probability and no calibrated route: no weight against a calibrated expert
        if p >= min_p:
            return ea.model_copy(update={"basis": f"{ea.basis}; outweighs {a.value} from "
                                                  f"{', '.join(a.evidence_ids)} (no probability, route not calibrated)"})
        return a.model_copy(update={"basis": f"{a.basis}; {e.tool} said {value} at p {p:.2f} ({e.id}), under the "
                                             f"{min_p:.2f} an answer needs"})
    if pt - p >= margin:
        return a.model_copy(update={"basis": f"{a.basis}; {e.tool} said {value} at p {p:.2f} ({e.id}), outweighed"})
    if p - pt >= margin and p >= min_p:
        return ea.model_copy(update={"basis": f"{ea.basis}; outweighs {a.value} at p {pt:.2f} from "
                                              f"{', '.join(a.evidence_ids)}"})
    return abstain("tools_conflict", f"{a.value} (p {pt:.2f}, {', '.join(a.evidence_ids)}) against {e.tool}'s {value} "
                                     f"(p {p:.2f}, {e.id}): closer than {margin}",
                   "a measurement that settles it", ids=list(dict.fromkeys([*a.evidence_ids, e.id])))


_DATA_SOURCES = ("dicom", "file", "pixels", "rule", "user")


def read_from_data(a: Answer) -> bool:
    """An answer read from the data itself (a DICOM tag, the file, a stated rule over a measurement), not a model's
    reading: its route ends in the source (agent/engine/answer.py route_of)."""
    return (a.route or "").rsplit(":", 1)[-1] in _DATA_SOURCES


def route_of(q: Question, a: Answer, stmts: list[Statement]) -> str:
    """How the answer was reached: the tool and the kind of claim (the calibration key)."""
    if a.method == "llm":
        return f"llm:{q.kind}"
    if a.method == "expert" and a.route:
        return a.route
    cited = [s for s in stmts if s.eid in a.evidence_ids] or stmts
    s = cited[0] if cited else None
    tool = s.tool if s else "?"
    if q.rule:
        return f"{tool}:rule"
    if s is not None and s.finding is None:
        return f"{tool}:{s.attribute.get('name')}:{s.attribute.get('source', '?')}"
    if q.kind == "yes_no" and s is not None and s.finding is not None:
        f = s.finding
        claim = "probability" if f.present is None else ("present" if f.present else "absent")
        return f"{tool}:{claim}"
    return f"{tool}:{q.kind}"


def calibrate(q: Question, a: Answer, stmts: list[Statement]) -> Answer:
    """An answer's probability as the accuracy of its route on held-out questions (agent/engine/calibration.py; an open
    answer's route is counted apart from a closed one's); withheld as `low_confidence` under the fitted threshold."""
    from agent.engine import calibration

    if a.kind == "abstain":
        return a
    route = route_of(q, a, stmts)
    a = a.model_copy(update={"route": route})
    key = calibration.route_key(a.kind, route)
    if key is None or (a.kind not in calibration.CLOSED and read_from_data(a)):  # a value read from the data stands
        return a
    p, n, key = calibration.lookup(key, a.probability)
    if p is None:
        return a
    raw = "no probability" if a.probability is None else f"p={a.probability:.2f}"
    a = a.model_copy(update={"probability": p, "basis": f"{a.basis}; calibrated: {raw} -> {p:.2f} (route {key}, "
                                                        f"{n} held-out answers)"})
    if p < calibration.min_probability():
        return abstain("low_confidence", f"{a.value} per {', '.join(a.evidence_ids)}, but answers reached this way "
                                         f"({key}) were right {p:.0%} of the time on held-out questions",
                       "a tool whose answers on this kind of question are more often right", ids=a.evidence_ids)
    return a


READING_UNSURE = 0.8  # an answer's probability is scaled by this when the question's reading is uncertain


def finish(a: Answer, q: Question | None = None) -> Answer:
    """The answer with its plain-text rendering; an answer without evidence becomes an abstention; an answer to a
    question whose reading is uncertain says so, and its probability is lowered."""
    if a.kind != "abstain" and not a.evidence_ids:
        a = abstain("evidence_does_not_address", "an answer without citable evidence is not given: " + a.basis)
    if a.kind != "abstain" and q is not None and not q.sure:
        upd: dict[str, Any] = {"basis": f"{a.basis}; the question's reading is uncertain ({q.unsure_why})"}
        if a.probability is not None and a.method != "expert":  # an expert's was calibrated on the question's words
            upd["probability"] = round(a.probability * READING_UNSURE, 4)
        a = a.model_copy(update=upd)
    return a.model_copy(update={"text": answer_text(a)})


def answer_text(a: Answer) -> str:
    cites = f" [{', '.join(a.evidence_ids)}]" if a.evidence_ids else ""
    if a.kind == "abstain":
        need = f" Needed: {a.needed}." if a.needed else ""
        return f"Cannot answer ({a.reason}): {a.basis}.{need}{cites}"
    value = f"{a.value:.4g} {a.unit}" if isinstance(a.value, float) and a.unit else \
        f"{a.value} {a.unit}" if a.unit else str(a.value)
    prob = f" (p={a.probability:.2f})" if a.probability is not None else ""
    return f"{value}{prob} — {a.basis}{cites}"
