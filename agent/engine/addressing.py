"""What the question is and which evidence addresses it: the one home of the pieces the critic, the planner and the
answer step share (so the engine's modules import in one direction: graph -> planner -> critic -> addressing, and
answer -> addressing).

1. Which tools *can* address the question (`can_address`, from each tool's `addresses(view)`; a tool that answers
   questions itself counts when it `takes_question`). A tool whose evidence such a tool reads first (`reads_first`:
   the organ segmenter's organs, which the knowledge graph checks against a system's members) is its input, not an
   answer: for that question it addresses nothing ("Which organs here belong to the digestive system?" is not
   answered with every organ the segmenter found).
2. Which evidence *does* address it (`statements`): a finding whose label is the subject, a measurement of the
   quantity asked, a classifier's probability for that label, a study attribute (the modality) stated by a tool.
   A measurement of something else never answers the question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.core.question import Question, parse_question
from agent.core.state import CaseState, Evidence
from agent.core.tool import FindingDraft, Tool
from agent.core.vocab import GENERIC_FINDINGS, QUANTITIES, label_key, subject_of

QUANTITATIVE = {"segment", "detect", "classify", "measure"}
MEASUREMENT_NAMES = {n for names in QUANTITIES.values() for n in names} | {"area", "volume", "height", "width", "diameter"}


# -- what can address the question ------------------------------------------------------------------------------
def _finding_subjects(subs: frozenset[str]) -> set[str]:
    return {s for s in subs if not s.startswith("attribute:") and s not in MEASUREMENT_NAMES and s != "blob candidate"}


def can_address(q: Question, tool: Tool, view: Any) -> bool:
    """Whether this tool's evidence could state the question's subject on this view (before running it)."""
    if tool.answers_questions:  # a VQA expert answers the question asked, whatever its subject, if it takes it
        from agent.engine.worker import ask  # in the tool worker where the tool's models load (Tool.questions_in_worker)

        return not q.describe and bool(ask(tool, "takes_question", q.text))
    subs = tool.addresses(view)
    if q.attribute:
        return f"attribute:{q.attribute}" in subs
    if q.describe:
        return tool.kind in QUANTITATIVE
    keys = {label_key(s) for s in subs}
    if q.finding in GENERIC_FINDINGS and q.finding != "lesion":
        return tool.kind in ("classify", "detect") and bool(_finding_subjects(subs))
    if q.finding:
        return q.finding in keys or any(subject_of(s).finding == q.finding for s in keys)
    organ_ok = bool(q.organ) and (q.organ in keys or (q.side is not None and f"{q.side} {q.organ}" in keys))
    if q.quantities:
        return bool(set(q.quantities) & subs) and (organ_ok or not q.organ)
    return organ_ok


def addressing_tools(q: Question, state: CaseState, tools: dict[str, Tool]) -> list[str]:
    v1 = state.views[0]
    names = [n for n in state.applicable_tools if n in tools and can_address(q, tools[n], v1)]
    inputs = read_first(q, names, tools)
    return [n for n in names if n not in inputs]


def read_first(q: Question, names: list[str], tools: dict[str, Tool]) -> set[str]:
    """The tools whose evidence a question-answering tool among `names` reads to answer q (`Tool.reads_first`): their
    evidence is that tool's input, not an answer to q."""
    return {f for n in names if (t := tools.get(n)) is not None and t.answers_questions for f in t.reads_first(q.text)}


def understood(state: CaseState, tools: dict[str, Tool]) -> tuple[Question, list[str]]:
    """The question as intake understood it and the tools that can address it; worked out here for a state that did
    not pass through intake (tests, a hand-made state)."""
    if state.question_info is not None:
        return state.question_info, state.addressing_tools
    q = parse_question(state.question)
    return q, addressing_tools(q, state, tools)


def needed(q: Question) -> str:
    """What a user would have to add for the question to be answerable."""
    if q.attribute == "modality":
        return "a tool that states the modality (DICOM tags, --modality, or a study classifier)"
    if q.attribute:
        return (f"a tool that states the study's {q.attribute.replace('_', ' ')} (a DICOM tag or a study classifier "
                "trained for it)")
    what = q.finding or (f"{q.side + ' ' if q.side else ''}{q.organ}" if q.organ else "") or q.subject or "this subject"
    kinds = "a measuring or segmenting tool" if q.quantities else "a classifier, detector or segmenter"
    return (f"{kinds} whose labels include {what!r} for this modality (add one with a model card: "
            "`dxagent models add CARD.yaml`)")


# -- what the evidence says about it -----------------------------------------------------------------------------
@dataclass
class Statement:
    """One piece of evidence about the subject: a finding of a tool, or a study attribute it states."""

    eid: str
    tool: str
    tool_kind: str
    finding: FindingDraft | None = None
    attribute: dict[str, Any] = field(default_factory=dict)  # {"value", "probability", "source"}

    def line(self) -> str:
        if self.finding is None:
            a = self.attribute
            p = f", confidence {a['probability']:.2f}" if isinstance(a.get("probability"), int | float) else ""
            return f"[{self.eid}] {self.tool}: {a.get('name')} {a.get('value')} ({a.get('source')}{p})"
        f = self.finding
        head = f.label if f.present is None else f"{f.label}: {'present' if f.present else 'absent'}"
        prob = f" (p={f.probability:.2f})" if f.probability is not None else ""
        meas = "; ".join(f"{m.name} {m.value:.4g} {m.unit}" for m in f.measurements)
        loc = f" at {f.location}" if f.location else ""
        return f"[{self.eid}] {self.tool}: {head}{prob}{loc}" + (f" — {meas}" if meas else "")


def findings_of(e: Evidence, state: CaseState, tools: dict[str, Tool]) -> list[FindingDraft]:
    tool = tools.get(e.tool)
    if e.status != "ok" or tool is None or e.output is None:
        return []
    try:
        view = state.view(e.args.get("view", "V1"))
    except KeyError:
        return []
    return tool.findings(tool.Output.model_validate(e.output), view)


def finding_matches(q: Question, f: FindingDraft, tool_kind: str) -> bool:
    key, s = label_key(f.label), subject_of(f.label)
    if q.describe:
        return True
    if q.finding in GENERIC_FINDINGS and q.finding != "lesion":
        return tool_kind in ("classify", "detect") and key != "blob candidate" and \
            (f.present is not None or f.probability is not None)
    if q.finding:
        return key == q.finding or s.finding == q.finding
    if q.organ:
        return (s.organ in (q.organ, *q.organs) or key in (q.organ, *q.organs)) and (q.side is None or s.side in (None, q.side))
    if q.quantities:
        return any(m.name in q.quantities for m in f.measurements)
    return False


def statements(q: Question, state: CaseState, tools: dict[str, Tool]) -> list[Statement]:
    """The successful evidence that addresses the question's subject, one statement per finding or attribute."""
    out: list[Statement] = []
    inputs = read_first(q, state.addressing_tools, tools)
    for e in state.evidence:
        tool = tools.get(e.tool)
        if e.status != "ok" or tool is None or e.output is None or e.tool in inputs:
            continue
        if q.attribute:
            try:
                view = state.view(e.args.get("view", "V1"))
            except KeyError:
                continue
            attrs = tool.attributes(tool.Output.model_validate(e.output), view)
            for name in q.attributes or [q.attribute]:
                if name in attrs:
                    out.append(Statement(e.id, e.tool, tool.kind, attribute={"name": name, **attrs[name]}))
            continue
        if q.describe and tool.kind not in QUANTITATIVE:
            continue
        if q.kind in ("yes_no", "count") and (q.finding or q.organ):  # looked for and not found: a "no" / 0
            try:
                view = state.view(e.args.get("view", "V1"))
                parsed = tool.Output.model_validate(e.output)
                absent, sure = tool.absent_labels(parsed, view), tool.absence_probabilities(parsed, view)
            except KeyError:
                absent, sure = [], {}
            # only the very label asked about: "liver cancer" absent says nothing of the liver, and an organ the
            # segmenter did not find says nothing of a disease of it ("small-bowel obstruction")
            for lab in absent:
                if label_key(lab) == (q.finding or q.organ):
                    f = FindingDraft(label=lab, present=False, probability=sure.get(lab),
                                     note=f"{e.tool} looked for it and found none")
                    out.append(Statement(e.id, e.tool, tool.kind, finding=f))
        for f in findings_of(e, state, tools):
            if finding_matches(q, f, tool.kind):
                if q.quantities and not q.describe and not any(m.name in q.quantities for m in f.measurements) \
                        and q.kind == "measurement":
                    continue
                out.append(Statement(e.id, e.tool, tool.kind, finding=f))
    return out


def addressed_by(q: Question, state: CaseState, tools: dict[str, Tool]) -> list[str]:
    return list(dict.fromkeys(s.eid for s in statements(q, state, tools)))
