"""Issue 13: question understanding, "answered" means addressed, the answer step, abstentions with their reasons."""

from __future__ import annotations

import math

import pytest
from helpers import call, make_ctx, realcases_root, run_tool
from pydicom.data import get_testdata_file

from agent.core.question import parse_question
from agent.core.state import CaseInput, CaseState, Evidence
from agent.engine.answer import answer_text, choice_probability, compose_answer, statements
from agent.engine.critic import critique
from agent.engine.session import run_case, tools

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
ANEURYSM = "Is there evidence of an aortic aneurysm?"


@pytest.mark.parametrize("text, kind, subject, extra", [
    (ANEURYSM, "yes_no", "aortic aneurysm", {"finding": "aortic aneurysm"}),
    ("Is the heart enlarged?", "yes_no", "cardiomegaly", {"finding": "cardiomegaly"}),
    ("Does the lung look healthy?", "yes_no", "lung abnormality", {"negated": True, "organ": "lung"}),
    ("Which side of lung is abnormal in this image?", "location", "lung abnormality", {"finding": "abnormality"}),
    ("Is there bronchiectasis?", "yes_no", "bronchiectasis", {"finding": "bronchiectasis"}),
    ("Is this a X-Ray?", "yes_no", "modality = DX", {"attribute": "modality", "attribute_value": "DX"}),
    ("Is this a CT or an MRI?", "choice", "modality", {"choices": ["ct", "mri"], "attribute": "modality"}),
    ("Is the lesion on the left or right?", "choice", "lesion", {"choices": ["left", "right"]}),
    ("How many nodules are there?", "count", "nodule", {"finding": "nodule"}),
    ("How large is the lesion?", "measurement", "longest diameter of lesion", {"finding": "lesion"}),
    ("What is the cardiothoracic ratio?", "measurement", "cardiothoracic ratio", {"quantities": ["cardiothoracic_ratio"]}),
    ("Where is the mass?", "location", "mass", {"finding": "mass"}),
    ("Which side is the effusion on?", "location", "effusion", {"finding": "effusion"}),
    ("What modality is used to take this image?", "attribute", "modality", {"attribute": "modality"}),
    ("Which plane is this image taken?", "attribute", "plane", {"attribute": "plane"}),
    ("Which part of the body does this image belong to?", "attribute", "body region", {"attribute": "body_region"}),
    ("What is the largest organ in the picture?", "attribute", "largest organ", {"attribute": "largest_organ"}),
    ("Which is the biggest in this image,lung,liver or heart?", "choice", "largest organ",
     {"attribute": "largest_organ", "choices": ["lung", "liver", "heart"]}),
    ("Which is smaller in this image, liver or kidney?", "choice", "smallest organ",
     {"attribute": "smallest_organ", "choices": ["liver", "kidney"]}),
    ("Which organ is bigger, the liver or the spleen?", "choice", "largest organ", {"choices": ["liver", "spleen"]}),
    ("Which organs appear in the image?", "attribute", "organ", {"attribute": "organ"}),
    ("How many kidneys are there in this image?", "count", "kidney", {"organ": "kidney"}),
    ("Does the picture contain liver?", "yes_no", "liver", {"organ": "liver"}),
    ("Describe the main findings and quantify them.", "open", "the findings", {"describe": True}),
    ("What diseases are included in the picture?", "open", "abnormality", {"describe": False}),
    ("Segment the nodules and measure them.", "open", "nodule", {"describe": True}),
    ("What color does the left lung show in the picture?", "open", "appearance", {"attribute": "appearance"}),
    ("What type of medical image is this?", "attribute", "modality", {"attribute": "modality"}),  # a task: what the tools find
    ("What is the mean intensity inside the box?", "measurement", "mean intensity", {"quantities": ["mean_intensity"]}),
    ("What is the pixel spacing and intensity range of this image?", "attribute", "spacing and intensity range",
     {"attributes": ["spacing", "intensity_range"]}),
    ("What is the tissue composition of this CT slice?", "measurement", "amount of fat, soft tissue, bone, lung",
     {"organs": ["fat", "soft tissue", "bone", "lung"]}),
])
def test_each_question_kind_parses(text, kind, subject, extra):
    q = parse_question(text)
    assert (q.kind, q.subject) == (kind, subject), q
    for k, v in extra.items():
        assert getattr(q, k) == v, (k, q)
    assert q.allowed == (["yes", "no"] if kind == "yes_no" else q.choices)


def _state(question: str, evidence: list[Evidence], ctx) -> CaseState:
    return CaseState(inputs=CaseInput(paths=[CT]), views=ctx.state.views, question=question, evidence=evidence,
                     applicable_tools=sorted(n for n, t in tools().items() if t.applicable(ctx.state.views[0]) is None),
                     tool_steps=len(evidence))


def _evidence(ctx, tool: str, eid: str = "E1", **args) -> Evidence:
    out = run_tool(ctx, tool, **args)
    return Evidence(id=eid, tool=tool, tool_version="1", args={"view": "V1", **args}, status="ok",
                    output=out.model_dump(mode="json"))


def test_an_unrelated_measurement_never_answers_a_topicless_question(store):
    """The aneurysm case's shape: a candidate detector and a measurement succeeded, the question names a finding no
    tool can state; the critic must not call it answered, and the answer is an abstention that says what is needed."""
    ctx = make_ctx(store, CT)
    ev = [_evidence(ctx, "detect_candidates"), _evidence(ctx, "region_measure", "E2")]
    st = _state(ANEURYSM, ev, ctx)
    c = critique(st, tools())
    assert not c.answered and c.answered_by == []
    assert c.route == "report" and "no applicable tool can address aortic aneurysm" in c.why
    a = compose_answer(st, tools())
    assert a.kind == "abstain" and a.reason == "no_applicable_tool" and a.evidence_ids == []
    assert "aortic aneurysm" in a.needed and "model card" in a.needed
    assert a.text.startswith("Cannot answer (no_applicable_tool)")


def test_a_vague_quantity_of_an_unknown_subject_is_not_answered_by_an_area(store):
    """SLAKE's "How much damage will be caused to the body taking such an image?" was once answered with an area."""
    ctx = make_ctx(store, CT)
    st = _state("How much damage will be caused to the body taking such an image?",
                [_evidence(ctx, "region_measure"), _evidence(ctx, "ct_tissue_composition", "E2")], ctx)
    q = parse_question(st.question)
    assert q.kind == "open" and q.quantities == [] and statements(q, st, tools()) == []  # knowledge, not a size
    assert compose_answer(st, tools()).reason == "no_applicable_tool"


def test_a_tissue_class_is_not_an_organ_count(store):
    """SLAKE's "How many lungs are shown in this image?" on CT was once answered 1 from the lung tissue class."""
    ctx = make_ctx(store, CT)
    st = _state("How many lungs are shown in this image?", [_evidence(ctx, "ct_tissue_composition")], ctx)
    assert compose_answer(st, tools()).kind == "abstain"


def test_a_measurement_answers_only_the_quantity_it_measures(store):
    ctx = make_ctx(store, CT)
    ev = [_evidence(ctx, "region_measure"), _evidence(ctx, "ct_tissue_composition", "E2")]
    st = _state("How much fat is in this slice?", ev, ctx)
    assert [s.eid for s in statements(st.question_info or parse_question(st.question), st, tools())] == ["E2"]
    a = compose_answer(st, tools())
    assert a.kind == "measurement" and a.evidence_ids == ["E2"] and a.unit == "mm2" and a.value > 0
    assert critique(st, tools()).answered_by == ["E2"]


def test_modality_questions_are_answered_from_the_stated_attribute(store):
    ctx = make_ctx(store, CT)
    ev = [_evidence(ctx, "inspect_image")]
    for question, kind, value in [("What modality is this?", "phrase", "CT"), ("Is this an MRI?", "yes_no", "no"),
                                  ("Is this a CT or an MRI?", "choice", "ct"), ("Is this a CT scan?", "yes_no", "yes")]:
        a = compose_answer(_state(question, ev, ctx), tools())
        assert (a.kind, a.value, a.evidence_ids) == (kind, value, ["E1"]), (question, a)
        assert a.probability is None and "dicom" in a.basis  # read from the tag, not guessed: no invented confidence


def test_several_attributes_or_tissues_get_one_value_each(store):
    ctx = make_ctx(store, CT)
    a = compose_answer(_state("What is the pixel spacing and intensity range of this image?",
                              [_evidence(ctx, "inspect_image")], ctx), tools())
    assert a.kind == "phrase" and a.value.startswith("spacing 0.6615 x 0.6615 mm; intensity range gray ")
    a = compose_answer(_state("What is the tissue composition of this CT slice?",
                              [_evidence(ctx, "ct_tissue_composition")], ctx), tools())
    assert [p.split()[0] for p in a.value.split("; ")] == ["fat", "soft", "bone", "lung"] and a.evidence_ids == ["E1"]


def test_run_abstains_early_without_calling_a_tool(tmp_path):
    res = run_case([CT], ANEURYSM, llm="scripted", script=[], trace_dir=tmp_path)
    rep = res.report
    assert res.state.evidence == [] and rep["answer"]["kind"] == "abstain"
    assert rep["answer"]["reason"] == "no_applicable_tool" and rep["recommendation"]["outcome"] == "abstain"
    assert rep["question_info"]["kind"] == "yes_no" and rep["question_info"]["subject"] == "aortic aneurysm"


@pytest.mark.realcases
def test_the_aneurysm_case_on_a_real_chest_radiograph(tmp_path):
    root = realcases_root()
    if root is None:
        pytest.skip("../shared/data/realcases is absent")
    cxr = root / "xrv_tests" / "images" / "00000001_000.png"
    script = [call("detect_candidates"), call("cardiothoracic_ratio")]  # what a planner might do anyway
    res = run_case([str(cxr)], ANEURYSM, llm="scripted", script=script, trace_dir=tmp_path, modality="DX")
    assert res.report["answer"]["reason"] == "no_applicable_tool" and not res.state.evidence
    res = run_case([str(cxr)], "Is the heart enlarged?", llm="scripted", script=[call("cardiothoracic_ratio")],
                   trace_dir=tmp_path, modality="DX")
    a = res.report["answer"]
    assert a["kind"] == "yes_no" and a["value"] in ("yes", "no") and a["evidence_ids"] == ["E1"]
    assert res.report["recommendation"]["outcome"] == "report" and "cardiomegaly" in a["basis"]


@pytest.mark.parametrize("reason, state_kw", [
    ("budget_spent", {"tool_steps": 6}),
    ("planner_failed", {"planner_failures": 1}),
    ("evidence_does_not_address", {}),
])
def test_each_abstention_carries_its_reason(store, reason, state_kw):
    ctx = make_ctx(store, CT)
    st = _state("How much fat is in this slice?", [_evidence(ctx, "region_measure")], ctx).model_copy(update=state_kw)
    a = compose_answer(st, tools())
    assert a.kind == "abstain" and a.reason == reason and "ct_tissue_composition" in a.needed


def test_conflicting_yes_no_evidence_is_an_abstention_and_refers(tmp_path):
    from helpers import CountOut, Gate

    from agent.core.tool import FindingDraft
    from agent.engine.report import compose

    class Says(Gate):
        name, kind, subjects = "says", "measure", ("gate",)

        def findings(self, output, view):
            return [FindingDraft(label="gate", present=output.value > 1)]

    ts = {**tools(), "says": Says()}
    res = run_case([CT], "Is there a gate?", llm="scripted", tool_set=ts, trace_dir=tmp_path, max_steps=2,
                   script=[call("says"), call("says", reason="again")])
    st = res.state.model_copy(update={"evidence": res.state.evidence[:1] + [res.state.evidence[0].model_copy(
        update={"id": "E2", "output": CountOut(value=0).model_dump()})]})
    a = compose_answer(st, ts)
    assert a.reason == "tools_conflict" and a.evidence_ids == ["E1", "E2"]
    rep, _ = compose(st.model_copy(update={"answer": a}), ts, "scripted", "json")
    assert rep.recommendation.outcome == "refer"


def test_answers_cite_evidence_and_the_llm_reads_only_addressing_lines(store):
    """Evidence that needs reading goes to the model with only the lines about the subject; its choice cites them."""
    from agent.llm.backends import ScriptedChat

    ctx = make_ctx(store, CT)
    ev = [_evidence(ctx, "region_measure"), _evidence(ctx, "ct_tissue_composition", "E2")]
    st = _state("Does the slice contain fat?", ev, ctx)
    seen = []
    chat = ScriptedChat(responses=['{"answer": "yes"}'])
    a = compose_answer(st, tools(), chat=chat, model_id="scripted",
                       record=lambda **kw: seen.append(kw["payload"]["request"]["messages"][1]["content"]))
    assert a.kind == "yes_no" and a.value == "yes" and a.evidence_ids == ["E2"] and a.method == "llm"
    assert "[E2]" in seen[0] and "[E1]" not in seen[0] and "Allowed answers: yes, no, cannot_tell" in seen[0]
    chat = ScriptedChat(responses=['{"answer": "cannot_tell"}'])
    a = compose_answer(st, tools(), chat=chat, model_id="scripted")
    assert a.kind == "abstain" and a.reason == "evidence_does_not_address"
    chat = ScriptedChat(responses=["not json at all"])
    a = compose_answer(st, tools(), chat=chat, model_id="scripted")
    assert a.kind == "abstain" and a.reason == "planner_failed"


def test_choice_probability_from_token_logprobs():
    lp = math.log
    toks = [{"token": '{"', "top": {}}, {"token": "answer", "top": {}}, {"token": '":', "top": {}},
            {"token": ' "', "top": {}},
            {"token": "yes", "logprob": lp(0.6), "top": {"yes": lp(0.6), "no": lp(0.2), "maybe": lp(0.1), "can": lp(0.1)}},
            {"token": '"}', "top": {'"}': 0.0}}]
    # mass over allowed first tokens: yes .6, no .2, can(not_tell) .1 -> .6 / .9
    assert choice_probability(toks, "yes", ["yes", "no", "cannot_tell"]) == pytest.approx(0.6 / 0.9, abs=1e-4)
    assert choice_probability(toks[:3], "yes", ["yes", "no"]) is None  # no value position: no probability


def test_answer_text_renders_values_and_abstentions():
    from agent.core.state import Answer

    assert answer_text(Answer(kind="measurement", value=41.234, unit="mm", evidence_ids=["E3"], basis="b")) == \
        "41.23 mm — b [E3]"
    assert answer_text(Answer(kind="yes_no", value="no", probability=0.91, evidence_ids=["E1"], basis="b")) == \
        "no (p=0.91) — b [E1]"
