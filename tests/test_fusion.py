"""The answer step weighs a question-answering tool (a VQA expert) against the measured evidence (issue 31, fusion in
agent/engine/answer.py): a stand-in expert here, so the rule is tested apart from any trained model."""

from __future__ import annotations

from typing import Any

from helpers import make_ctx, run_tool
from pydantic import BaseModel
from pydicom.data import get_testdata_file

from agent.core.question import parse_question
from agent.core.state import Answer, CaseInput, CaseState, Evidence
from agent.core.tool import Tool, ToolContext, ToolInput
from agent.engine.answer import FUSION_MARGIN, compose_answer, fuse
from agent.engine.session import tools

CT = get_testdata_file("CT_small.dcm")


class StandInOutput(BaseModel):
    question: str
    answers: list[tuple[str, float]]


class StandInExpert(Tool):
    """Answers what it is told to (its output), for the question it was asked only."""

    name = "stand_in_expert"
    description = "test stand-in for a VQA expert"
    kind = "classify"
    answers_questions = True
    Output = StandInOutput

    def run(self, ctx: ToolContext, inp: ToolInput) -> BaseModel:  # never run: the evidence is written by the test
        raise NotImplementedError

    def answer_to(self, output: BaseModel, view: Any, question: str) -> list[tuple[str, float]] | None:
        assert isinstance(output, StandInOutput)
        return [tuple(a) for a in output.answers] if output.question == question else None


TOOLS = tools() | {"stand_in_expert": StandInExpert()}


def _state(ctx, question: str, answers: list[tuple[str, float]], measured: bool = True, asked: str | None = None):
    ev = []
    if measured:
        out = run_tool(ctx, "inspect_image")
        ev.append(Evidence(id="E1", tool="inspect_image", tool_version="1", args={"view": "V1"}, status="ok",
                           output=out.model_dump(mode="json")))
    ev.append(Evidence(id=f"E{len(ev) + 1}", tool="stand_in_expert", tool_version="1", args={"view": "V1"},
                       status="ok", output={"question": asked or question, "answers": answers}))
    applicable = sorted(n for n, t in TOOLS.items() if t.applicable(ctx.state.views[0]) is None)
    return CaseState(inputs=CaseInput(paths=[CT]), views=ctx.state.views, question=question, evidence=ev,
                     applicable_tools=applicable, tool_steps=len(ev))


def test_the_measured_dicom_modality_outweighs_a_contradicting_expert(store):
    ctx = make_ctx(store, CT)
    a = compose_answer(_state(ctx, "What modality is this?", [("MRI", 0.9), ("CT", 0.1)]), TOOLS)
    assert (a.kind, a.value, a.evidence_ids) == ("phrase", "CT", ["E1"]), a
    assert "stand_in_expert said MRI" in a.basis and "outweighed" in a.basis


def test_an_agreeing_expert_is_cited_beside_the_measurement(store):
    ctx = make_ctx(store, CT)
    a = compose_answer(_state(ctx, "Is this a CT scan?", [("Yes", 0.97), ("No", 0.03)]), TOOLS)
    assert (a.value, a.evidence_ids) == ("yes", ["E1", "E2"]) and "agrees" in a.basis


def test_the_expert_answers_what_no_measurement_addresses_only_above_the_threshold(store):
    ctx = make_ctx(store, CT)
    q = "What is the function of the liver?"  # knowledge: no measuring tool addresses it
    a = compose_answer(_state(ctx, q, [("Detoxification", 0.93), ("Digestion", 0.05)], measured=False), TOOLS)
    assert (a.kind, a.value, a.method, a.evidence_ids) == ("phrase", "Detoxification", "expert", ["E1"]), a
    low = compose_answer(_state(ctx, q, [("Detoxification", 0.4), ("Digestion", 0.3)], measured=False), TOOLS)
    assert low.kind == "abstain" and "under the" in low.basis and low.evidence_ids == ["E1"]
    other = compose_answer(_state(ctx, q, [("Detoxification", 0.99)], measured=False, asked="Another question?"),
                           TOOLS)
    assert other.kind == "abstain"  # an answer to another question is not an answer to this one


def test_a_close_disagreement_is_a_tools_conflict_and_the_form_asked_is_kept(store):
    q = parse_question("Is this a CT scan?")
    classifier = Answer(kind="yes_no", value="yes", probability=0.9, evidence_ids=["E1"], method="evidence",
                        basis="modality CT (classifier, confidence 0.90) per E1")
    ev = Evidence(id="E2", tool="stand_in_expert", tool_version="1", args={"view": "V1"}, status="ok")
    close = fuse(q, classifier, [(ev, [("No", 0.9 + FUSION_MARGIN / 2), ("Yes", 0.02)])])
    assert close.kind == "abstain" and close.reason == "tools_conflict" and close.evidence_ids == ["E1", "E2"]
    far = fuse(q, classifier.model_copy(update={"probability": 0.6}), [(ev, [("No", 0.97)])])
    assert (far.value, far.method, far.evidence_ids) == ("no", "expert", ["E2"]) and "outweighs yes" in far.basis
    # a yes/no question never takes a phrase from the expert: its best yes/no answer, or nothing
    ctx = make_ctx(store, CT)
    b = compose_answer(_state(ctx, "Is there a kidney stone?", [("Left Lung", 0.9), ("Yes", 0.08)],
                              measured=False), TOOLS)
    assert b.kind == "abstain" and b.value is None
