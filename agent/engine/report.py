"""The structured report: findings that cite evidence ids, an impression, an explicit outcome.

With a local model the narrative is assembled from evidence by templates. An endpoint model may write
the impression (prompts/report.md); every sentence must cite an evidence id that exists, and an
uncited claim is dropped and the drop recorded — the same rule the findings obey.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from jinja2 import Environment, PackageLoader
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from agent.analysis.study import study_facts, study_notes
from agent.core.question import Question, parse_question
from agent.core.state import Answer, CaseState, Evidence
from agent.core.tool import Measurement, Tool
from agent.core.vocab import label_key
from agent.engine.answer import compose_answer, findings_of, grace_seconds
from agent.engine.planner import bounded_call, case_line, evidence_line, prompt_versions, render

DISCLAIMER = ("RESEARCH USE ONLY. dxagent is not a medical device and has not been cleared or approved for "
              "clinical use. This report is produced by automated tools and must not be used for diagnosis or "
              "treatment decisions; a qualified clinician must review the images.")


class Study(BaseModel):
    case_id: str
    modality: str
    modality_source: str
    modality_confidence: float | None = None  # set when the modality was inferred from the pixels
    modality_uncertain: bool = False  # inferred with a top probability under 0.6
    modality_probabilities: dict[str, float] = Field(default_factory=dict)  # the study classifier's, calibrated
    plane: str | None = None  # the study classifier's most likely plane / radiograph view, given the modality
    plane_probability: float | None = None
    body_region: str | None = None  # its most likely body region (radiology only)
    body_region_probability: float | None = None
    study_model: str | None = None  # the classifier's model card
    study_error: str | None = None  # why the classifier could not run (then the pixel rules guessed)
    body_part: str
    view_position: str = "unknown"
    dims: int
    shape: list[int]
    spacing_mm: list[float] | str


class Finding(BaseModel):
    label: str
    present: bool | None = None
    location: str = ""
    measurements: list[Measurement] = Field(default_factory=list)
    probability: float | None = None
    evidence_ids: list[str]
    note: str = ""


class EvidenceSummary(BaseModel):
    id: str
    tool: str
    status: str
    summary: str
    artifacts: list[str] = Field(default_factory=list)  # sha256


class ModelUsedLine(BaseModel):
    """A user's model card behind some evidence: which weights, under which licence and intended use."""

    name: str
    adapter: str
    version: str = ""
    sha256: str
    license: str
    intended_use: str
    validation: str = ""
    card: str = ""  # the card file (tools/models/... for dxagent's own)
    bundled: bool = False  # dxagent's own trained expert, not a user's card
    evidence_ids: list[str]


class Recommendation(BaseModel):
    outcome: Literal["report", "abstain", "refer"]
    text: str


class Report(BaseModel):
    run_id: str
    study: Study
    question: str
    question_info: Question | None = None  # the question as understood: kind, subject, choices
    answer: Answer
    findings: list[Finding]
    impression: str
    uncertainty: list[str]
    limitations: list[str]
    recommendation: Recommendation
    evidence: list[EvidenceSummary]
    dropped_claims: list[str] = Field(default_factory=list)
    models_used: list[ModelUsedLine] = Field(default_factory=list)
    versions: dict[str, Any]
    disclaimer: str = DISCLAIMER


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _fmt(m: Measurement) -> str:
    return f"{m.name} {m.value:.4g} {m.unit}"


def finding_line(f: Finding) -> str:
    head = f.label if f.present is None else f"{f.label}: {'present' if f.present else 'absent'}"
    meas = "; ".join(_fmt(m) for m in f.measurements)
    prob = f" (p={f.probability:.2f})" if f.probability is not None else ""
    return f"{head}{prob}" + (f" — {meas}" if meas else "") + f" [{', '.join(f.evidence_ids)}]"


def check_citations(findings: list[Finding], valid: set[str]) -> tuple[list[Finding], list[str]]:
    """Keep findings that cite at least one existing, successful evidence id; report the rest."""
    kept, dropped = [], []
    for f in findings:
        ids = [i for i in f.evidence_ids if i in valid]
        if ids:
            kept.append(f.model_copy(update={"evidence_ids": ids}))
        else:
            dropped.append(f"finding {f.label!r} cites no existing evidence ({f.evidence_ids or 'none'}): dropped")
    return kept, dropped


_CITE = re.compile(r"\[(E\d+(?:\s*,\s*E\d+)*)\]")


# a clinical disposition or a clean bill of health: no tool states one, so a sentence claiming it cannot be supported
# by the evidence it cites (an instruction hidden in a question or a DICOM tag would try exactly this)
_DISPOSITION = re.compile(
    r"\b(healthy|no (?:further |clinical )?(?:follow[- ]?up|work[- ]?up|action|treatment|imaging)|needs? no|"
    r"requires? no|nothing (?:abnormal|to worry)|no (?:abnormalit|patholog|disease)\w*|(?:entirely |completely )?"
    r"normal (?:study|scan|exam\w*|patient)|ruled? out|benign and|reassur\w*|can be discharged|discharge)\b", re.I)


# words a sentence may use without the cited evidence saying them: grammar, and the plain verbs and nouns of
# restating a tool's result. Everything else - every finding, organ, adjective, negation and number - must be in
# the evidence the sentence cites (issue 32 item 6: a disposition paraphrased past _DISPOSITION, "the scan is
# unremarkable", "the patient can go home", is a claim no evidence states)
_PHRASING = frozenset("""
a an the this that these those there it its is are was were be been being has have had of in on at to for from by with
and or as per than into within across over under between about approximately around roughly nearly almost which
whose what where when while also both each either all other another some any more less most least same overall total
only image images study scan slice section view case measured measure measures measurement measurements shows show
showed shown found finds finding findings detected detects segmented segments estimated estimates reported reports
identified seen visible evidence tool tools value values result results gives give gave given returns returned
computed calculated mean average percent mm mm2 mm3 cm hu px pixel pixels probability confidence p may might could
possibly likely uncertain uncertainty appears appear suggests suggest consistent indicates indicate here make makes
made up contains contain includes include located lies but while whereas
""".split())
_NEGATIONS = frozenset("no not without absent negative none neither nor".split())
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z][a-z0-9]*")


def _key(word: str) -> str:
    """A crude stem: a word's first five letters (plural and tense endings fall away: "segmented" ~ "segment")."""
    return word[:5]


def grounding_text(e: Evidence, tools: dict[str, Tool], findings: list[Finding]) -> str:
    """What evidence `e` states, as text a sentence citing it may restate: the tool, its one-line summary and the
    findings (labels, presence, measurements, notes) drawn from it."""
    lines = [e.tool.replace("_", " "), evidence_line(e, tools)["summary"]]
    lines += [finding_line(f) + (f" {f.note}" if f.note else "") + (f" {f.location}" if f.location else "")
              for f in findings if e.id in f.evidence_ids]
    return " ".join(lines)


def ungrounded(sentence: str, ground: str, findings: list[Finding]) -> str | None:
    """Why `sentence` says more than `ground` (the text of the evidence it cites) states, or None when every word
    is grammar, plain restating vocabulary (_PHRASING) or in the evidence, every number is one of the evidence's
    (to the precision written), and no finding the evidence calls absent is stated without a negation."""
    body = _CITE.sub(" ", sentence).lower()
    have = _TOKEN.findall(ground.lower())
    keys = {_key(w) for w in have if not w[0].isdigit()}
    nums = [float(w) for w in have if w[0].isdigit()]
    toks = _TOKEN.findall(body)
    said_no = any(w in _NEGATIONS for w in have)  # "absent" in the evidence grounds "not found" in the sentence
    extra = [w for w in toks if not w[0].isdigit() and w not in _PHRASING and _key(w) not in keys
             and not (said_no and w in _NEGATIONS)]
    if extra:
        return f"says {', '.join(repr(w) for w in dict.fromkeys(extra))}, which the cited evidence does not"
    for w in (w for w in toks if w[0].isdigit()):
        half = 0.5 * 10.0 ** -(len(w.split(".")[1]) if "." in w else 0) + 1e-9  # rounded as written
        if not any(abs(float(w) - n) <= half for n in nums):
            return f"gives the number {w}, which the cited evidence does not"
    negated, said = any(w in _NEGATIONS for w in toks), f" {' '.join(toks)} "
    named = [(f.present, lab) for f in findings if (lab := label_key(f.label)) and f" {lab} " in said]
    for present, label in named:
        if present is False and not negated:
            return f"states {label} without the absence the cited evidence gives"
        if present is True and negated and not any(p is False for p, _ in named):
            return f"negates {label}, which the cited evidence gives as present"
    return None


def cited_sentences(text: str, grounds: dict[str, str],
                    findings: list[Finding] | None = None) -> tuple[str, list[str]]:
    """Keep the sentences that cite valid evidence ids (`grounds`: id -> what that evidence states, grounding_text)
    and restate only what that evidence states (`ungrounded`); a clinical disposition (healthy, no follow-up, ruled
    out, ...) is named as such. Return the kept text and the reason for each dropped sentence."""
    kept, dropped = [], []
    for sent in re.split(r"(?<=[.!?])\s+", text.strip()):
        if not sent:
            continue
        ids = {i.strip() for group in _CITE.findall(sent) for i in group.split(",")}
        if not (ids and ids <= set(grounds)):
            dropped.append(f"uncited or wrongly cited sentence dropped: {sent!r}")
        elif m := _DISPOSITION.search(sent):
            dropped.append(f"sentence claiming {m.group(0)!r}, which no cited evidence states, dropped: {sent!r}")
        elif why := ungrounded(sent, " ".join(grounds[i] for i in sorted(ids)),
                               [f for f in findings or [] if set(f.evidence_ids) & ids]):
            dropped.append(f"sentence that {why}, dropped: {sent!r}")
        else:
            kept.append(sent)
    return " ".join(kept), dropped


def compose(state: CaseState, tools: dict[str, Tool], planner_model: str, planner_mode: str,
            narrative_llm: Any = None, record: Any = None) -> tuple[Report, list[str]]:
    v1 = state.views[0]
    ok = [e for e in state.evidence if e.status == "ok"]
    valid = {e.id for e in ok}
    drafts = [Finding(**f.model_dump(exclude={"bbox"}), evidence_ids=[e.id]) for e in ok
              for f in findings_of(e, state, tools)]
    findings, dropped = check_citations(drafts, valid)
    crit = state.critiques[-1] if state.critiques else None

    uncertainty = [f"Tools disagree — {c}" for c in (crit.conflicts if crit else [])]
    for e in state.evidence:
        if e.status in ("failed", "refused"):
            uncertainty.append(f"{e.id} {e.tool} {e.status}: {e.error}")
    limitations = list(dict.fromkeys(state.notes))
    conf = v1.metadata.get("modality_confidence")
    limitations = list(dict.fromkeys(limitations + study_notes(v1)))
    if v1.modality == "US" or v1.metadata.get("secondary_capture"):
        limitations.append("Burned-in text (names, dates, IDs written into the pixels), common in ultrasound and "
                           "secondary captures, cannot be detected here: the pixels were used as they are.")

    answer = state.answer or compose_answer(state, tools)  # the answer step ran (graph); else rules only
    if answer.kind == "abstain" and answer.reason in ("tools_conflict", "planner_failed"):
        outcome = "refer"
        text = "Refer to a qualified reader: " + ("tools disagree about the question's subject"
                                                  if answer.reason == "tools_conflict" else "the planner failed") + \
            "; automated evidence is not conclusive."
    elif answer.kind == "abstain":
        outcome = "abstain"
        text = f"Abstain ({answer.reason}): {answer.basis}." + (f" Needed: {answer.needed}." if answer.needed else "")
    else:
        outcome = "report"
        text = "The answer and findings above are automated evidence for review by a qualified clinician."
        if crit and crit.conflicts:
            text += " Some tools disagree on other findings (see Uncertainty)."

    cited_ev = [e for e in ok if any(e.id in f.evidence_ids for f in findings)]
    impression = " ".join(f"{evidence_line(e, tools)['summary'].rstrip('.')} [{e.id}]." for e in cited_ev) \
        or "No quantitative finding was produced."
    if narrative_llm is not None and findings:
        prompt = render("report", question=state.question, case_line=case_line(state),
                        evidence=[evidence_line(e, tools) for e in state.evidence],
                        findings=[finding_line(f) for f in findings])
        try:
            reply = bounded_call(narrative_llm, grace_seconds(state), lambda: narrative_llm.invoke(
                [HumanMessage(prompt)], max_tokens=300), "the impression's LLM")
        except Exception as exc:
            reply = None
            if record:
                record(kind="llm", node="report", name="impression",
                       payload={"request": prompt, "error": f"{type(exc).__name__}: {exc}"})
            limitations.append(f"The model-written impression failed ({type(exc).__name__}); template used.")
        if reply is not None:
            case = case_line(state)
            grounds = {e.id: f"{grounding_text(e, tools, findings)} {case}" for e in ok}
            text_out, drops = cited_sentences(str(reply.content), grounds, findings)
            if record:
                record(kind="llm", node="report", name="impression",
                       payload={"request": prompt, "response": str(reply.content), "dropped": drops})
            dropped += drops
            if text_out:
                impression = text_out
            else:
                limitations.append("The model-written impression cited no evidence and was replaced by the template.")

    tools_used = {e.tool: e.tool_version for e in state.evidence}
    versions = {"dxagent": _pkg("dxagent"), "planner_model": planner_model, "planner_mode": planner_mode,
                "prompts": prompt_versions(), "tools": dict(sorted(tools_used.items())),
                "libraries": {n: _pkg(n) for n in ("langgraph", "pydicom", "nibabel", "scikit-image", "numpy")}}
    spacing = "unknown" if v1.spacing_mm == "unknown" else [round(float(s), 6) for s in v1.spacing_mm]
    sf = study_facts(v1)
    study = Study(case_id=state.case_id, modality=v1.modality, modality_source=v1.modality_source,
                  modality_confidence=conf if v1.modality_inferred and isinstance(conf, int | float) else None,
                  modality_uncertain=sf["uncertain"], modality_probabilities=sf["modality_probabilities"],
                  plane=sf["plane"], plane_probability=sf["plane_probability"], body_region=sf["body_region"],
                  body_region_probability=sf["body_region_probability"], study_model=sf["model"],
                  study_error=sf["error"],
                  body_part=v1.body_part, view_position=str(v1.metadata.get("ViewPosition") or "unknown"),
                  dims=v1.ndim_spatial, shape=list(v1.shape), spacing_mm=spacing)
    ev = [EvidenceSummary(id=e.id, tool=e.tool, status=e.status, summary=evidence_line(e, tools)["summary"],
                          artifacts=[a.sha256 for a in e.artifacts]) for e in state.evidence]
    used: dict[tuple[str, str], ModelUsedLine] = {}
    for e in ok:  # learned tools carry their card as `model_card` (agent/analysis/learned.py ModelUsed)
        card = (e.output or {}).get("model_card")
        if isinstance(card, dict) and card.get("name") and card.get("sha256"):
            key = (card["name"], card["sha256"])
            if key not in used:
                used[key] = ModelUsedLine(**{k: v for k, v in card.items() if k in ModelUsedLine.model_fields},
                                          evidence_ids=[])
            used[key].evidence_ids.append(e.id)
    intake_card = (v1.metadata.get("study") or {}).get("model_card")
    if isinstance(intake_card, dict) and (intake_card.get("name"), intake_card.get("sha256")) not in used:
        used[(intake_card["name"], intake_card["sha256"])] = ModelUsedLine(
            **{k: v for k, v in intake_card.items() if k in ModelUsedLine.model_fields}, evidence_ids=[])
    for m in used.values():
        whose = "dxagent's bundled model" if m.bundled else "the user's model"
        what = f"{', '.join(m.evidence_ids)} come(s) from" if m.evidence_ids else "The study block (intake) comes from"
        limitations.append(f"{what} {whose} {m.name} (intended use: {m.intended_use}); only as good as those weights "
                           "and their card's validation figures.")
    rep = Report(run_id=state.run_id, study=study, question=state.question,
                 question_info=state.question_info or parse_question(state.question), answer=answer, findings=findings,
                 impression=impression, uncertainty=uncertainty, limitations=limitations,
                 recommendation=Recommendation(outcome=outcome, text=text), evidence=ev, dropped_claims=dropped,
                 models_used=list(used.values()), versions=versions)
    return rep, dropped


_JINJA = Environment(loader=PackageLoader("agent", "templates"), trim_blocks=True, lstrip_blocks=True)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()!|<>~])")  # on one line after "**Question:**": no block markup to fear


def md_text(value: object) -> str:
    """User-given text (the question) as literal Markdown: one line, every Markdown/HTML character escaped, so a
    question cannot add a heading, a link, an image or markup to the report."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value or "").split()))


_JINJA.filters["md"] = md_text


def to_markdown(report: Report | dict) -> str:
    rep = report if isinstance(report, Report) else Report.model_validate(report)
    return _JINJA.get_template("report.md.j2").render(r=rep, line=finding_line)
