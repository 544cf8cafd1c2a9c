"""The rethink step's rules that involve learned tools: a classifier's probability against a measurement's yes/no,
and a detector's boxes suggesting a box-prompted segmenter."""

from __future__ import annotations

import numpy as np
from helpers import bare_view
from pydantic import BaseModel

from agent.core.state import CaseInput, CaseState, Evidence
from agent.core.tool import FindingDraft, Tool, ToolInput
from agent.engine.critic import critique, label_key


class ProbOut(BaseModel):
    probabilities: dict[str, float]


class Classifier(Tool):
    name, description, kind = "clf", "a classifier", "classify"
    Output = ProbOut

    def run(self, ctx, inp):  # pragma: no cover - evidence is given
        raise AssertionError

    def findings(self, output, view):
        return [FindingDraft(label=k, probability=p) for k, p in output.probabilities.items()]


class ClaimOut(BaseModel):
    label: str
    present: bool


class Measurer(Tool):
    name, description, kind = "ctr", "a measurement with a threshold", "measure"
    subjects = ("cardiomegaly",)
    Output = ClaimOut

    def run(self, ctx, inp):  # pragma: no cover
        raise AssertionError

    def findings(self, output, view):
        return [FindingDraft(label=output.label, present=output.present)]


class BoxOut(BaseModel):
    boxes: list[list[float]]


class Detector(Tool):
    name, description, kind = "det", "a detector", "detect"
    Output = BoxOut

    def run(self, ctx, inp):  # pragma: no cover
        raise AssertionError

    def findings(self, output, view):
        return [FindingDraft(label="nodule", present=True, bbox=b) for b in output.boxes]


class Segmenter(Tool):
    name, description, kind = "sam_segment", "a box-prompted segmenter", "segment"
    Input = ToolInput
    Output = BoxOut

    def run(self, ctx, inp):  # pragma: no cover
        raise AssertionError


TOOLS = {t.name: t for t in (Classifier(), Measurer(), Detector(), Segmenter())}


def state(*evidence: Evidence) -> CaseState:
    return CaseState(inputs=CaseInput(paths=["x"]), views=[bare_view("DX")], applicable_tools=sorted(TOOLS),
                     evidence=list(evidence), question="Is the heart enlarged?", tool_steps=len(evidence))


def ev(i: int, tool: str, output: dict, **args) -> Evidence:
    return Evidence(id=f"E{i}", tool=tool, tool_version="1", args=args, status="ok", output=output)


def test_classifier_probability_against_a_measurement_is_a_conflict():
    assert label_key("Enlarged  heart") == "cardiomegaly" and label_key("Pleural-Effusion") == "effusion"
    st = state(ev(1, "ctr", {"label": "cardiomegaly", "present": True}),
               ev(2, "clf", {"probabilities": {"Cardiomegaly": 0.05, "Effusion": 0.9}}))
    c = critique(st, TOOLS)
    assert c.conflicts == ["cardiomegaly: present per E1, but E2 gives it probability 0.05 (< 0.2)"]
    assert c.route == "think"  # a new conflict goes back to the planner
    # measured absent but the classifier is confident: also a conflict; an agreeing pair is not
    st2 = state(ev(1, "ctr", {"label": "enlarged heart", "present": False}),
                ev(2, "clf", {"probabilities": {"Cardiomegaly": 0.7}}))
    assert critique(st2, TOOLS).conflicts == ["cardiomegaly: absent per E1, but E2 gives it probability 0.70 (>= 0.5)"]
    st3 = state(ev(1, "ctr", {"label": "cardiomegaly", "present": True}),
                ev(2, "clf", {"probabilities": {"Cardiomegaly": 0.35}}))
    assert critique(st3, TOOLS).conflicts == []  # 0.35 is undecided, not a contradiction


def test_detector_boxes_suggest_the_segmenter_once():
    st = state(ev(1, "det", {"boxes": [[1, 2, 10, 12], [20, 20, 30, 30]]}))
    c = critique(st, TOOLS)
    assert ('E1 det found 2 box(es) on V1; to segment and measure them call {"tool": "sam_segment", "args": '
            '{"boxes_from": "E1"}}') in c.suggestions
    st.critiques.append(c)
    used = state(ev(1, "det", {"boxes": [[1, 2, 10, 12]]}), ev(2, "sam_segment", {"boxes": []}, boxes_from="E1"))
    assert not any("boxes_from" in s for s in critique(used, TOOLS).suggestions)
    no_boxes = state(ev(1, "det", {"boxes": []}))
    assert not any("boxes_from" in s for s in critique(no_boxes, TOOLS).suggestions)
    assert np.isfinite(c.budget_left["tool_calls"])


class PassagesOut(BaseModel):
    passages: list[dict]


class Retriever(Tool):
    name = "ret"
    description = "Finds passages."
    kind = "retrieve"
    Output = PassagesOut

    def run(self, ctx, inp: ToolInput) -> PassagesOut:
        return PassagesOut(passages=[])


def test_a_repeated_call_or_retrieval_that_finds_nothing_new_ends_the_loop():
    """Issue 16: no further planner step when nothing new can be learned (each would cost seconds of decoding)."""
    tools = {**TOOLS, "ret": Retriever()}

    def passages(*ids):
        return {"passages": [{"source_id": i, "score": 0.5, "snippet": "..."} for i in ids]}

    def st(*evidence):
        s = state(*evidence)
        s.applicable_tools = sorted(tools)
        return s

    same = st(ev(1, "ret", passages("a", "b"), query="heart"), ev(2, "ret", passages("b"), query="cardiac size"))
    c = critique(same, tools)
    assert c.route == "report" and "retrieved nothing that earlier retrieval had not" in c.why, c.why
    new = st(ev(1, "ret", passages("a", "b"), query="heart"), ev(2, "ret", passages("b", "c"), query="cardiac"))
    assert "retrieved nothing" not in critique(new, tools).why
    def skip(i):
        return ev(i, "ret", {}, query="heart").model_copy(update={"status": "skipped", "output": None})

    once = st(ev(1, "ret", passages("a"), query="heart"), skip(2))
    c1 = critique(once, tools)  # a first repeat: told so, and asked again
    assert c1.route == "think" and any("E2 repeated an earlier call" in x for x in c1.suggestions), c1
    once.critiques.append(c1)
    twice = st(ev(1, "ret", passages("a"), query="heart"), skip(2), skip(3))
    twice.critiques.append(c1)
    c2 = critique(twice, tools)
    assert c2.route == "report" and "E3 repeated an earlier call again" in c2.why, c2.why


def test_a_third_call_of_the_same_tool_that_still_does_not_answer_ends_the_loop():
    tools = {**TOOLS, "ret": Retriever()}

    def st(*evidence):
        s = state(*evidence)
        s.applicable_tools = sorted(tools)
        return s

    calls = [ev(i, "ret", {"passages": [{"source_id": f"p{i}"}]}, query=f"q{i}") for i in (1, 2, 3)]
    assert critique(st(*calls[:2]), tools).route == "think"
    c = critique(st(*calls), tools)
    assert c.route == "report" and "call no. 3" in c.why, c.why


def test_small_findings_suggest_at_most_a_few_crops():
    """Issue 33: a blob detector's 30 small candidates made 30 crop suggestions (~550 prompt tokens, ~8 s of the
    embedded planner's next decision); the critique names the first few and counts the rest."""
    boxes = [[10 * i, 10 * i, 10 * i + 4, 10 * i + 4] for i in range(10)]
    st = state(ev(1, "det", {"boxes": boxes}))
    st.applicable_tools = ["crop_zoom", "det"]  # no box-prompted segmenter to take the boxes
    crops = [s for s in critique(st, TOOLS).suggestions if "crop" in s]
    assert len(crops) == 4 and crops[0].endswith("bbox=[0, 0, 4, 4]") and crops[3].startswith("7 more small findings")
    st.evidence[0].output["boxes"] = boxes[:2]
    assert len([s for s in critique(st, TOOLS).suggestions if "crop" in s]) == 2
