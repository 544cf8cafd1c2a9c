"""The embedded planners really choosing among candidate tools, on real images.

`local` is the default Qwen2.5-Coder-1.5B GGUF (minutes for the module); `tiny` is SmolLM2-135M.
The grammar guarantees a valid action; the routing itself is the model's.
"""

from __future__ import annotations

import json

import pytest
from helpers import REALCASES
from pydicom.data import get_testdata_file

from agent.engine.session import run_case
from agent.store.trace import TraceStore

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def first_tool(tmp_path, path, question, llm="local"):
    res = run_case([path], question, llm=llm, trace_dir=tmp_path, max_steps=1, route=False)  # the planner's own choice
    llm_events = TraceStore(None, tmp_path).events(res.run_id, "llm")
    first = json.loads(llm_events[0].payload)
    # offered: the applicable tools, less those that need a region while no coordinates exist
    offered = set(first["request"]["candidates"]) | set(first["request"]["held_back"])
    assert offered == set(res.state.applicable_tools)
    assert "measure_roi" in first["request"]["held_back"] or "measure_roi" not in res.state.applicable_tools
    assert first["usage"]["output_tokens"] > 0 and first["latency_s"] > 0
    return first["decision"]["tool"], res


@pytest.mark.slow
@pytest.mark.parametrize("path,question,expected", [
    (CT, "What is the tissue composition of this CT slice: how much fat and bone?", "ct_tissue_composition"),
    (MR, "How large is the dominant bright region?", "region_measure"),
    (CT, "What is the pixel spacing and intensity range of this image?", "inspect_image"),
], ids=["ct-tissue", "mr-size", "metadata"])
def test_default_planner_routes_bundled_cases(tmp_path, path, question, expected, monkeypatch):
    # the planner's choice among the measuring tools: the VQA expert, which the loop routes first wherever its
    # question gate takes the question (tests/test_fusion.py), is left out here
    monkeypatch.setenv("DXAGENT_VQA_EXPERT", "0")
    tool, res = first_tool(tmp_path, path, question)
    assert tool == expected
    assert res.report["recommendation"]["outcome"] == "report"


@pytest.mark.slow
def test_default_planner_routes_a_real_dermoscopy_case(tmp_path):
    rows = [json.loads(x) for x in (REALCASES / "cases.jsonl").read_text().splitlines()] \
        if (REALCASES / "cases.jsonl").exists() else []
    ham = [r for r in rows if r["source"] == "ham10000_dermoscopy"]
    if not ham:
        pytest.skip("../shared/data/realcases is not here")
    tool, res = first_tool(tmp_path, str(REALCASES / ham[0]["image"]), "How large is the skin lesion?")
    assert tool in ("lesion_segment", "region_measure")  # both segment the lesion and measure it
    assert res.state.views[0].modality == "XC"  # guessed from the pixels: a dermoscopy photograph
    assert res.report["study"]["spacing_mm"] == "unknown"
    assert any("pixels" in x for x in res.report["limitations"])


def test_tiny_planner_always_produces_valid_actions(tmp_path):
    res = run_case([CT], "What is the tissue composition of this CT slice?", llm="tiny", trace_dir=tmp_path, route=False,
                   max_steps=3)
    events = TraceStore(None, tmp_path).events(res.run_id, "llm")
    assert events and all(json.loads(e.payload)["rejected"] is None for e in events)
    assert all(e.tool in res.state.applicable_tools for e in res.state.evidence)
    assert res.report is not None


@pytest.mark.slow
def test_default_planner_chains_a_detector_into_sam(tmp_path, monkeypatch, yolo_trained):
    """The user's detector finds the objects (the 1.5B planner's choice); its boxes go to sam_segment with
    boxes_from=E1 in the next act step (routed: the critic's chain, without another 6-8 s decision, which the 1.5B
    model got wrong once its prompt changed); the report lists both model cards."""
    import numpy as np
    from makers import sam as sam_maker
    from makers import yolo as yolo_maker
    from PIL import Image

    from agent.store.models import ModelStore

    monkeypatch.setenv("DXAGENT_MODELS", str(tmp_path / "models"))
    store = ModelStore()
    store.add(yolo_trained[0])
    store.add(sam_maker.make(tmp_path / "sam"))
    img, _ = yolo_maker.draw(np.random.default_rng(7), (240, 200), n=(3, 4))
    Image.fromarray(img).save(tmp_path / "objects.png")
    res = run_case([str(tmp_path / "objects.png")], "Segment the discs and measure their size.", modality="XC",
                   trace_dir=tmp_path / "traces", max_steps=3)
    ev = res.state.evidence
    assert [e.tool for e in ev[:2]] == ["yolo_detect", "sam_segment"], [(e.tool, e.args, e.error) for e in ev]
    assert ev[1].args["boxes_from"] == "E1" and ev[1].status == "ok"
    assert {m["name"] for m in res.report["models_used"]} - {"study_cnn_v1"} == {"yolo_tiny", "sam_tiny"}


def _first_decision(tmp_path, name):
    res = run_case([CT], "What is the tissue composition of this CT slice?", llm="tiny", trace_dir=tmp_path / name,
                   route=False, max_steps=1)
    first = json.loads(TraceStore(None, tmp_path / name).events(res.run_id, "llm")[0].payload)
    return first["decision"], first["metadata"].get("prefix_state") or {}


def test_the_system_prompt_state_is_saved_once_and_restored_by_a_fresh_model(tmp_path, monkeypatch):
    """Issue 16: the planner's static system prompt is prefilled once; its llama.cpp state is saved under the cache
    and a freshly loaded model restores it (same decision), a broken state file is ignored and replaced."""
    from agent.llm import backends as llm_mod

    monkeypatch.setenv("DXAGENT_CACHE", str(tmp_path / "cache"))

    def fresh():  # as a new process: no loaded model, nothing restored yet
        llm_mod._LOADED.clear()
        llm_mod._RESTORED.clear()

    fresh()
    d1, s1 = _first_decision(tmp_path, "a")
    files = list((tmp_path / "cache" / "llama-state").glob("*.npz"))
    assert s1.get("saved_tokens", 0) > 500 and len(files) == 1
    fresh()
    d2, s2 = _first_decision(tmp_path, "b")
    assert s2 == {"restored_tokens": s1["saved_tokens"]} and d2 == d1
    files[0].write_bytes(b"not a state")
    fresh()
    d3, s3 = _first_decision(tmp_path, "c")
    assert s3.get("saved_tokens") == s1["saved_tokens"] and d3 == d1
    fresh()


def _decision_schema(names, optional=False):
    from agent.engine.planner import decision_schema
    from agent.engine.registry import discover

    registry = discover()
    return decision_schema([registry[n] for n in names], ["V1"], coordinates=False, reason=False, optional=optional)


def test_the_planner_schema_is_a_tagged_choice_and_other_schemas_are_not():
    from agent.llm.backends import tagged_options

    opts = tagged_options(_decision_schema(["inspect_image", "knowledge_search"]))
    assert [(t, v, k) for t, v, k, _ in opts] == [("tool", "inspect_image", "args"), ("tool", "knowledge_search", "args"),
                                                 ("tool", "answer", "args")]
    assert opts[0][3]["properties"] == {} and opts[1][3]["required"] == ["query"]
    # the local planner sets no optional argument: only the required query is left in the schema
    assert set(opts[1][3]["properties"]) == {"query"}
    assert set(tagged_options(_decision_schema(["knowledge_search"], optional=True))[0][3]["properties"]) == {"query", "k"}
    assert tagged_options({"type": "object", "properties": {"a": {"type": "string"}}}) is None
    assert tagged_options({"anyOf": [{"type": "object", "properties": {"tool": {"type": "string"}, "args": {}},
                                      "required": ["tool", "args"]}]}) is None


TOOL_PROMPTS = [
    "Case: CT slice. Question: how much fat and bone is in this CT slice? Evidence so far: none yet.",
    "Case: MR slice. Question: what does the literature say about gliomas? Evidence so far: none yet.",
    "Case: CT slice. Question: what is the pixel spacing of this image?\nEvidence so far:\n- [E1] inspect_image -> ok: "
    "spacing 0.66 mm, range -1024..1500. Budget left: 1 tool call(s).",
]


def test_the_tool_is_chosen_from_the_logits_as_the_grammar_would_choose_it():
    """Issue 33: the embedded planner's tool is read off the logits (backends.choose_tagged: 1-3 model steps instead of
    ~15-50 grammar-constrained tokens). On the tiny model: the same tool as grammar-constrained greedy decoding on a
    cleared context (without the chat handler's default repeat penalty, which the logit choice does not apply), a
    reply that is the schema's JSON, arguments generated only where the tool requires them; and the KV state reused
    from the previous prompt gives the same choice as a cleared context, evaluating fewer tokens."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.messages.utils import convert_to_openai_messages

    from agent.engine.planner import validate
    from agent.engine.registry import discover
    from agent.llm.backends import _llama, make_llm

    chat, _, _ = make_llm("tiny")
    llm = _llama(chat.model_path, chat.n_ctx, chat.n_threads, chat.seed)
    names = ["inspect_image", "ct_tissue_composition", "knowledge_search"]
    schema = _decision_schema(names)
    fmt = {"type": "json_object", "schema": schema}
    system = "You are a planner. Tools: " + ", ".join(names) + '. Reply with one JSON object {"tool": ..., "args": {...}}.'
    registry = discover()
    tools = {n: registry[n] for n in names}
    for text in TOOL_PROMPTS:
        msgs = [SystemMessage(system), HumanMessage(text)]
        reused = chat.invoke(msgs, response_format=fmt, max_tokens=40)  # the KV cache holds the previous prompt
        llm.reset()
        fast = chat.invoke(msgs, response_format=fmt, max_tokens=40)
        llm.reset()
        slow = llm.create_chat_completion(messages=convert_to_openai_messages(msgs), response_format=fmt,
                                          temperature=0.0, max_tokens=40, repeat_penalty=1.0)
        got, want = json.loads(fast.content), json.loads(slow["choices"][0]["message"]["content"])
        assert got["tool"] == want["tool"] == json.loads(reused.content)["tool"], (text, fast.content, slow)
        scores = fast.response_metadata["choice_scores"]
        assert max(scores, key=scores.get) == got["tool"] and set(scores) == {*names, "answer"}
        if got["tool"] == "answer" or not schema["anyOf"][[*names, "answer"].index(got["tool"])]["properties"]["args"][
                "properties"]:
            assert got["args"] == {}
        decision = validate(tools, got["tool"], got["args"], "", ["V1"])  # a valid action
        assert decision.action in ("call", "answer")
        if text != TOOL_PROMPTS[0]:  # the system prompt's KV state was kept from the prompt before
            assert reused.response_metadata["evaluated_tokens"] < fast.response_metadata["evaluated_tokens"]
    # the last prompt after a cleared context evaluates all of it; asked again right away, almost nothing
    again = chat.invoke(msgs, response_format=fmt, max_tokens=40)
    assert again.response_metadata["evaluated_tokens"] < 10 < fast.response_metadata["evaluated_tokens"]
    assert json.loads(again.content) == got
