"""Issue 31 item 3: the knowledge_graph tool (tools/knowledge_graph.py) over SLAKE's KG, read where it lies.

Skips when ../shared/data/slake_dev/KG (or $DXAGENT_SLAKE_KG) is absent. `slake_kg_figures` measures the tool on SLAKE
train's KG questions (never validate) with evidence made from each item's own organ/disease annotations; it is a
helper, not a test (about 2 s): python -c "from tests.test_knowledge_graph import slake_kg_figures as f; print(f())".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.core.state import ArtifactRef, CaseInput, CaseState, Evidence, ImageView
from agent.core.tool import FindingDraft, Measurement, Tool, ToolContext, ToolInput
from tools.knowledge_graph import FILES, KnowledgeGraph, kg_folder

SLAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slake_dev"
needs_kg = pytest.mark.skipif(not all((kg_folder() / f).is_file() for f in FILES.values()),
                              reason="SLAKE's KG is absent (set DXAGENT_SLAKE_KG)")


class StatedOut(BaseModel):
    findings: list[FindingDraft]


class Stated(Tool):
    """Evidence stand-in: states the findings it is given (as organ_segment states organs with their areas)."""

    name = "stated"
    description = "States given findings."
    kind = "segment"
    Output = StatedOut

    def run(self, ctx: ToolContext, inp: ToolInput) -> StatedOut:
        raise NotImplementedError

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, StatedOut)
        return output.findings


def _view() -> ImageView:
    ref = ArtifactRef(sha256="0" * 64, kind="pixels", media_type="application/x-npy", path="x.npy")
    return ImageView(id="V1", pixels=ref, shape=(64, 64), dtype="uint8", ndim_spatial=2, modality="CT")


def _ctx(question: str, findings: list[FindingDraft] = ()) -> ToolContext:
    state = CaseState(inputs=CaseInput(paths=[]), question=question, views=[_view()])
    if findings:
        state.evidence.append(Evidence(id="E1", tool="stated", tool_version="1", args={"view": "V1"}, status="ok",
                                       output=StatedOut(findings=list(findings)).model_dump()))
    # what the engine would fill in (agent/engine/graph.py stated_findings), read back through the stand-in tool
    from agent.engine.graph import stated_findings

    return ToolContext(state=state, store=None,  # type: ignore[arg-type]  # the tool reads no pixels
                       findings=stated_findings(state, {"stated": Stated()}))


def _tool() -> KnowledgeGraph:
    return KnowledgeGraph()


def _organ(label: str, area: float, p: float | None = None) -> FindingDraft:
    return FindingDraft(label=label, present=True, probability=p, measurements=[Measurement(name="area", value=area,
                                                                                               unit="px2")])


def _ask(question: str, findings: list[FindingDraft] = (), **args):
    tool, ctx = _tool(), _ctx(question, findings)
    out = tool.run(ctx, tool.Input(**args))
    summary = tool.summary(out)
    assert summary and "\n" not in summary and len(summary) < 300
    return tool, out


@needs_kg
def test_function_of_the_heart_cites_its_triple():
    q = "What is the function of the heart?"
    tool, out = _ask(q)
    assert out.answer == "promote blood flow" and out.entity == "Heart" and out.entity_source == "question"
    (t,) = out.triples
    assert (t.subject, t.relation, t.file) == ("Heart", "function", "en_organ.csv")
    line = (kg_folder() / t.file).read_text().splitlines()[t.line - 1]
    assert line == "Heart#function#promote blood flow"
    assert "en_organ.csv:" in tool.summary(out)
    assert tool.answer_to(out, _view(), "what is the function of the heart") == [("promote blood flow", 1.0)]
    assert tool.findings(out, _view()) == []
    _, lungs = _ask("What is the function of the lungs?")
    assert lungs.entity == "Lung" and lungs.answer


@needs_kg
def test_main_organ_from_evidence_carries_its_probability():
    q = "What is the effect of the main organ in this picture?"
    tool, out = _ask(q, [_organ("Left Lung", 900, 0.8), _organ("Right Lung", 1000, 0.9), _organ("Heart", 1200, 0.95)])
    assert out.entity == "Lung" and out.entity_source == "E1"  # the lungs together are the largest organ
    assert tool.answer_to(out, _view(), q) == [(out.answer, 0.9)]
    _, picked = _ask("What is the function of the rightmost organ in this picture?",
                     [_organ("Liver", 900), _organ("Spleen", 100)])
    assert picked.answer is None and "position or colour" in picked.reason


@needs_kg
def test_membership_with_organs_given_and_from_evidence():
    q = "Which organs belong to the respiratory system?"
    tool, out = _ask(q, organs=["Left Lung", "Right Lung", "Heart", "Trachea"])
    assert out.entity == "Respiratory System" and out.answer == "Lung, Trachea"
    assert {(t.subject, t.object, t.file) for t in out.triples} == {
        ("Lung", "Respiratory System", "en_organ_rel.csv"), ("Trachea", "Respiratory System", "en_organ_rel.csv")}
    assert tool.answer_to(out, _view(), q) == [("Lung, Trachea", 1.0)]
    q2 = "Which organs/organ in the picture belong to the digestive system?"
    tool, out2 = _ask(q2, [_organ("Small Bowel", 500, 0.7), _organ("Colon", 300, 0.6), _organ("Bladder", 200)])
    assert out2.answer == "Small Bowel, Colon" and out2.entity_source == "E1"
    assert tool.answer_to(out2, _view(), q2) == [("Small Bowel, Colon", 0.6)]


@needs_kg
def test_unknown_entity_gives_no_answer_with_a_reason():
    tool, out = _ask("What is the function of the flurbo?", entity="flurbo")
    assert out.answer is None and "not an organ, body system or disease" in out.reason
    assert tool.answer_to(out, _view(), "What is the function of the flurbo?") is None
    _, bare = _ask("What is the function of the flurbo?")
    assert bare.answer is None and "no organ or disease named" in bare.reason


@needs_kg
def test_ambiguous_disease_gives_no_answer():
    q = "How to treat the disease on the lower left of the lung?"
    tool, out = _ask(q)
    assert out.answer is None and "ambiguous" in out.reason and 1 < len(out.candidates) <= 5
    assert tool.answer_to(out, _view(), q) is None
    brain = [FindingDraft(label="Brain Edema", present=True), FindingDraft(label="Brain Enhancing Tumor", present=True)]
    _, two = _ask("What kind of symptoms will the disease on the brain cause?", brain)
    assert two.answer is None and "ambiguous" in two.reason and set(two.candidates) == {"Brain Edema", "Brain Tumour"}
    _, one = _ask("How to treat the disease in this image?", [FindingDraft(label="Pneumonia", present=True, probability=0.7)])
    assert one.entity == "Pneumonia" and one.probability == 0.7 and one.unambiguous


@needs_kg
def test_answer_to_is_none_for_another_question():
    tool, out = _ask("What is the function of the heart?")
    assert tool.answer_to(out, _view(), "What is the function of the liver?") is None
    assert tool.takes_question("How to treat pneumonia?") and not tool.takes_question("Is this a CT?")


@needs_kg
def test_where_and_shape_ask_about_this_image_not_the_textbook():
    """The KG's location and shape triples are cited when read, but never answer "where is the edema?" or "what shape
    is the kidney?" (the image's answer: "Left Lobe", "Irregular"; the KG's: "Brain", "Faba bean")."""
    for q in ("Where is the brain edema located?", "What is the shape of the kidney in the picture?"):
        assert not KnowledgeGraph().takes_question(q)
        tool, out = _ask(q)
        assert out.triples, out  # read and cited
        assert tool.answer_to(out, _view(), q) is None


def test_available_says_why_when_the_folder_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_SLAKE_KG", str(tmp_path))
    reason = KnowledgeGraph().available()
    assert reason and "DXAGENT_SLAKE_KG" in reason and "\n" not in reason
    assert KnowledgeGraph().applicable(_view()) == reason  # nor is it routed to
    for f in FILES.values():
        (tmp_path / f).write_text("organ#attribute#value\nHeart#function#pump\n")
    assert KnowledgeGraph().available() is None


# -- the figures on SLAKE train (not a test) -------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def slake_kg_figures(split: str = "train") -> dict:
    """On `split`'s KG questions: how many the tool answers (answer_to not None) and how many of those match the
    reference exactly (lower case, punctuation stripped), (a) from the question text alone and (b) with evidence made
    of the item's own annotated organ/disease labels (detection.json: labels and box areas, an oracle stand-in for
    organ_segment; the reference answer is never read before scoring)."""
    assert split == "train", "figures are measured on train only"
    rows = [json.loads(line) for line in (SLAKE / "train.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["content_type"] == "KG"]
    tool = _tool()
    figures = {}
    for setting in ("question_only", "annotated_evidence"):
        answered = exact = 0
        for r in rows:
            findings = []
            if setting == "annotated_evidence" and r.get("detection"):
                for box in json.loads((SLAKE / r["detection"]).read_text()):
                    for label, (x, y, w, h) in box.items():
                        findings.append(FindingDraft(label=label, present=True, bbox=[y, x, y + h, x + w],
                                                     measurements=[Measurement(name="area", value=w * h, unit="px2")]))
            ctx = _ctx(r["question"], findings)
            got = tool.answer_to(tool.run(ctx, tool.Input()), _view(), r["question"])
            if got:
                answered += 1
                exact += _norm(got[0][0]) == _norm(r["answer"])
        figures[setting] = {"n": len(rows), "answered": answered, "exact_of_answered": exact}
    return figures


@needs_kg
def test_membership_question_routes_the_organ_segmenter_first():
    """"Do any of the organs here belong to the X system?" is answered from the organs stated present: the router calls
    the organ segmenter before the knowledge graph (once it ran, the graph); a question naming its organ does not."""
    from agent.core.question import parse_question
    from agent.engine.graph import route

    tools = {"knowledge_graph": _tool(), "organ_segment": Stated()}
    tools["organ_segment"].name = "organ_segment"
    q = "Do any of the organs in the picture belong to the circulatory system?"
    state = _ctx(q).state.model_copy(update={"question_info": parse_question(q), "addressing_tools": ["knowledge_graph"],
                                             "applicable_tools": ["knowledge_graph", "organ_segment"]})
    d = route(state, tools)
    assert d is not None and d.tool == "organ_segment" and "knowledge_graph" in d.reason, d
    seg = Evidence(id="E1", tool="organ_segment", tool_version="1", args={"view": "V1"}, status="ok",
                   output=StatedOut(findings=[_organ("heart", 900.0, 0.9)]).model_dump())
    d = route(state.model_copy(update={"evidence": [seg]}), tools)
    assert d is not None and d.tool == "knowledge_graph", d
    named = "Which system does the heart belong to?"
    d = route(state.model_copy(update={"question": named, "question_info": parse_question(named)}), tools)
    assert d is not None and d.tool == "knowledge_graph", d


def test_belong_to_is_membership_only_with_what_it_belongs_to():
    """"Which part of the body / What scanning plane does this image belong to?" ask for the body region or the plane:
    read as system membership, each ran the organ segmenter and the knowledge graph before the study classifier's
    answer (56 SLAKE validate questions: 206 tool calls instead of 111, two left unanswered)."""
    from tools.knowledge_graph import relation_of

    assert relation_of("Which part of the body does this image belong to?") is None
    assert relation_of("What scanning plane does this image belong to?") is None
    for q in ("Which organs/organ in the picture belong to sensory organs?", "Which system does the heart belong to?",
              "Do any of the organs in the picture belong to the circulatory system?"):
        assert relation_of(q)[0] == "membership", q


class OrganList(Stated):
    """Stand-in for the organ segmenter's study attribute: the organs it found, as one value."""

    name = "organ_segment"

    def addresses(self, view: ImageView) -> frozenset[str]:
        return frozenset({"attribute:organ"})

    def attributes(self, output: BaseModel, view: ImageView) -> dict:
        return {"organ": {"value": ", ".join(f.label for f in output.findings), "probability": 0.9}}


@needs_kg
def test_organs_the_graph_reads_first_do_not_answer_its_question():
    """"Which organs here belong to the digestive system?" was answered with every organ the segmenter found (liver,
    kidney, spleen, ...; 12 of the 20 system questions on held-out train pictures): the organs are the knowledge graph's
    input for that question, not its answer. "Which organs are shown?" is still the segmenter's to answer."""
    from agent.core.question import parse_question
    from agent.engine.addressing import addressing_tools, statements

    tools = {"knowledge_graph": _tool(), "organ_segment": OrganList()}
    seg = Evidence(id="E1", tool="organ_segment", tool_version="1", args={"view": "V1"}, status="ok",
                   output=StatedOut(findings=[_organ("Liver", 900.0, 0.9), _organ("Kidney", 300.0, 0.8)]).model_dump())
    for text, want in (("Which organs/organ in the picture belong to the digestive system?", ["knowledge_graph"]),
                       ("Which organs are shown in this picture?", ["organ_segment"])):
        q = parse_question(text)
        state = _ctx(text).state.model_copy(update={"applicable_tools": list(tools), "evidence": [seg]})
        names = addressing_tools(q, state, tools)
        assert names == want, (text, names)
        said = statements(q, state.model_copy(update={"question_info": q, "addressing_tools": names}), tools)
        assert [s.tool for s in said] == ([] if want == ["knowledge_graph"] else ["organ_segment"]), (text, said)
