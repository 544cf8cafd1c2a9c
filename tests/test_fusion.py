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
    q = parse_question("Is this a CT scan?")
    weak = Answer(kind="yes_no", value="yes", probability=0.6, evidence_ids=["E1"], basis="measured")
    assert fuse(q, weak, [(_expert("E2"), [("Yes", 0.9)])]).probability == 0.9  # the better-supported of the two


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


def _expert(eid: str) -> Evidence:
    return Evidence(id=eid, tool="stand_in_expert", tool_version="1", args={"view": "V1"}, status="ok")


def test_a_reading_with_no_probability_yields_to_a_calibrated_expert_but_a_value_read_from_the_data_stands():
    q = parse_question("What is the main organ in this image?")
    organ = Answer(kind="phrase", value="liver", evidence_ids=["E1"], method="evidence",
                   route="organ_segment:organ:segmenter", basis="organ liver (segmenter) per E1")
    got = fuse(q, organ, [(_expert("E2"), [("Brain", 0.8), ("Liver", 0.1)])], min_p=0.5)
    assert (got.value, got.method, got.evidence_ids) == ("Brain", "expert", ["E2"]) and "no probability" in got.basis
    # under the answer threshold the expert does not replace it
    kept = fuse(q, organ, [(_expert("E2"), [("Brain", 0.4), ("Liver", 0.3)])], min_p=0.5)
    assert (kept.value, kept.evidence_ids) == ("liver", ["E1"]) and "under the 0.50" in kept.basis
    # the rule before this one (measured_stands) let any reading without a probability stand
    assert fuse(q, organ, [(_expert("E2"), [("Brain", 0.8)])], min_p=0.5, measured_stands=True).value == "liver"
    q = parse_question("What modality is this?")
    for source in ("dicom", "user"):
        told = Answer(kind="phrase", value="CT", evidence_ids=["E1"], method="evidence",
                      route=f"inspect_image:modality:{source}", basis=f"modality CT ({source}) per E1")
        assert fuse(q, told, [(_expert("E2"), [("MRI", 0.99)])], min_p=0.5).value == "CT"


def test_several_question_answering_tools_the_most_probable_answers_and_those_agreeing_are_cited():
    q = parse_question("What is the function of the heart?")
    none = Answer(kind="abstain", reason="evidence_does_not_address", basis="nothing measured addresses it")
    got = fuse(q, none, [(_expert("E1"), [("Breathe", 0.55), ("Promote blood flow", 0.4)]),
                         (_expert("E2"), [("Promote Blood Flow", 0.9)]),
                         (_expert("E3"), [("promote blood flow", 0.7)])], min_p=0.5)
    assert (got.value, got.evidence_ids) == ("Promote Blood Flow", ["E2", "E3"]) and "E3 agree" in got.basis
