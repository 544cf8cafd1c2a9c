"""Issue 17: pictures to vision-capable endpoints (planner and the vlm_ask tool), replay without them, and the faults.

The endpoint is the loopback fake OpenAI server (conftest.py): no vision model can be run here (no vision GGUF and
projector is installable from the package registries, and no GPU); the fake checks what a real one would receive."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
from conftest import FakeOpenAI, Reply
from helpers import answer, call
from PIL import Image
from pydicom.data import get_testdata_file

from agent.engine.replay import replay
from agent.engine.session import run_case
from agent.llm.endpoints import EndpointError, load, vision_settings
from agent.store.trace import TraceStore

CT = get_testdata_file("CT_small.dcm")


def images(request: dict) -> list[Image.Image]:
    user = next(m for m in request["body"]["messages"] if m["role"] == "user")
    parts = user["content"] if isinstance(user["content"], list) else []
    out = []
    for p in parts:
        if p.get("type") == "image_url":
            url = p["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


def vlm_reply(text: str, p_yes: float | None = None, refusal: str | None = None) -> Reply:
    lp = None if p_yes is None else {"content": [{"token": text.split()[0], "logprob": 0.0, "top_logprobs": [
        {"token": "Yes", "logprob": math.log(p_yes)}, {"token": "No", "logprob": math.log(1 - p_yes)}]}]}
    msg = {"role": "assistant", "content": text, **({"refusal": refusal} if refusal else {})}
    return Reply(body=json.dumps({"id": "x", "object": "chat.completion", "model": "fake-vl", "choices": [
        {"index": 0, "message": msg, "finish_reason": "stop", "logprobs": lp}],
        "usage": {"prompt_tokens": 300, "completion_tokens": 5, "total_tokens": 305}}).encode())


@pytest.fixture
def vision_planner(monkeypatch, fake_openai, tmp_path):
    monkeypatch.setenv("DXAGENT_ENDPOINTS", str(tmp_path / "none.toml"))
    monkeypatch.setenv("DXAGENT_PLANNER_VISION", "1")
    monkeypatch.setenv("DXAGENT_PLANNER_IMAGE_MAX_PX", "96")
    return fake_openai


def _run(tmp_path, fake, question, **kw):
    return run_case([CT], question, llm="openai-json", base_url=fake.base_url, model="fake", api_key="none",
                    trace_dir=tmp_path / "tr", route=False, **kw)


def test_a_vision_planner_gets_the_view_then_the_crop_and_replay_needs_neither(tmp_path, vision_planner):
    fake = vision_planner.reset(FakeOpenAI.text(call("crop_zoom", bbox=[20, 20, 84, 84])),
                                FakeOpenAI.text(call("ct_tissue_composition")), FakeOpenAI.text(answer()))
    res = _run(tmp_path, fake, "Look closer at the box [20, 20, 84, 84]: what is the tissue composition?",
               max_steps=3)
    assert [e.tool for e in res.state.evidence] == ["crop_zoom", "ct_tissue_composition"]
    think = [r for r in fake.requests if "Choose the next action" in json.dumps(r["body"])]
    first, second = images(think[0]), images(think[1])
    assert len(first) == 1 and len(second) == 2  # the study, then the study and the crop made in between
    assert all(max(im.size) <= 96 for im in first + second) and first[0].size == (96, 96)  # 128 px CT, downscaled
    assert second[1].size == (96, 96)  # the 2x crop (128 px) downscaled too
    store = TraceStore(None, tmp_path / "tr")
    parts = json.loads(store.events(res.run_id, "llm")[1].payload)["request"]["images"]
    assert [p["view"] for p in parts] == ["V1", "V2"] and "url" not in json.dumps(parts)
    assert parts[0]["window"].startswith("soft tissue")
    dump = store.dump(res.run_id)
    kept = {a["sha256"] for a in dump["artifacts"] if not a.get("missing_row")}
    assert {p["sha256"] for p in parts} <= kept  # the pictures sent are kept as the run's artifacts, by sha256
    rep = replay(dump)  # no server: the recorded replies and picture names serve
    assert rep.verified, rep.divergence


def test_an_endpoint_that_refuses_pictures_is_a_recorded_failure(tmp_path, vision_planner):
    fake = vision_planner.reset(*[FakeOpenAI.error(400, "image input is not supported by this model")] * 3)
    res = _run(tmp_path, fake, "What is the tissue composition?")
    assert res.report["recommendation"]["outcome"] == "refer"
    note = " ".join(res.report["limitations"])
    assert "pictures were sent: is the endpoint vision-capable?" in note, note


def test_the_embedded_planner_cannot_be_declared_vision_capable(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_PLANNER_VISION", "1")
    with pytest.raises(EndpointError, match="takes no pictures"):
        run_case([CT], "What is the tissue composition?", llm="scripted", script=[answer()], trace_dir=tmp_path)


# -- vlm_ask ------------------------------------------------------------------------------------------------------


@pytest.fixture
def vlm(monkeypatch, fake_openai, tmp_path):
    monkeypatch.delenv("DXAGENT_TOOL_WORKER", raising=False)
    (tmp_path / "endpoints.toml").write_text(
        f'[endpoints.vlm]\nbase_url = "{fake_openai.base_url}"\nmodel = "fake-vl"\napi_key_env = "VLM_KEY"\n'
        'vision = true\nimage_max_px = 64\nretries = 1\ntimeout_s = 5\nmax_tokens_per_run = 600\n'
        'intended_use = "test double"\n')
    monkeypatch.setenv("DXAGENT_ENDPOINTS", str(tmp_path / "endpoints.toml"))
    monkeypatch.setenv("VLM_KEY", "sekret-key")
    return fake_openai


def test_vlm_ask_answers_with_probability_and_the_model_named(tmp_path, vlm):
    fake = vlm.reset(vlm_reply("Yes, there is fat around the organs.", p_yes=0.8))
    res = run_case([CT], "Is there fat in the region [10, 10, 100, 100]?", llm="scripted",
                   script=[call("vlm_ask", question="Is there fat here?", finding="fat", bbox=[10, 10, 100, 100]),
                           answer()], trace_dir=tmp_path / "tr", route=False)
    e = res.state.evidence[0]
    assert e.status == "ok", e.error
    out = e.output
    assert out["yes_no"] is True and abs(out["probability"] - 0.8) < 1e-3 and out["region"] == [1, 1, 109, 109]
    assert out["model"] == "fake-vl" and out["endpoint"].startswith("http://127.0.0.1")
    req = fake.requests[0]
    assert req["headers"]["Authorization"] == "Bearer sekret-key" and req["body"]["logprobs"] is True
    (pic,) = images(req)
    assert max(pic.size) <= 64
    assert "<<<Is there fat here?>>>" in json.dumps(req["body"])
    dump = TraceStore(None, tmp_path / "tr").dump(res.run_id)
    assert "sekret-key" not in json.dumps(dump)
    assert any(m["name"] == "fake-vl" for m in res.report["models_used"])


@pytest.mark.parametrize("reply, message", [
    (vlm_reply("", refusal="I cannot help with medical images."), "the model refused"),
    (FakeOpenAI.garbage(), "not JSON"),
    (Reply(body=json.dumps({"object": "list"}).encode()), "not a chat completion"),
    (FakeOpenAI.error(400, "this model does not accept images"), "does it take pictures?"),
    (FakeOpenAI.error(503, "busy"), "HTTP 503"),
])
def test_vlm_ask_faults_are_failed_calls_with_the_reason(tmp_path, vlm, reply, message):
    vlm.reset(reply, reply)  # retries=1: a 503 is asked twice
    res = run_case([CT], "Is there fat?", llm="scripted", script=[call("vlm_ask", question="Is there fat?"), answer()],
                   trace_dir=tmp_path / "tr", route=False)
    e = res.state.evidence[0]
    assert e.status == "failed" and message in e.error, e.error


def test_vlm_ask_timeout_and_spent_token_budget(tmp_path, vlm):
    toml = tmp_path / "endpoints.toml"  # a 2 s endpoint timeout (the fixture's 5 s, asked twice, only waits longer)
    toml.write_text(toml.read_text().replace("timeout_s = 5\n", "timeout_s = 2\n"))
    vlm.reset(Reply(body=b"{}", delay=8.0), Reply(body=b"{}", delay=8.0))
    res = run_case([CT], "Is there fat?", llm="scripted", script=[call("vlm_ask", question="Is there fat?"), answer()],
                   trace_dir=tmp_path / "a", route=False)
    assert "did not answer within 2 s" in res.state.evidence[0].error
    vlm.reset(vlm_reply("No.", 0.2), vlm_reply("No.", 0.2), vlm_reply("No.", 0.2))
    res = run_case([CT], "Is there fat?", llm="scripted", trace_dir=tmp_path / "b", route=False, max_steps=3,
                   script=[call("vlm_ask", question=q) for q in ("Is there fat?", "Any fat?", "Fat seen?")] + [answer()])
    assert [e.status for e in res.state.evidence] == ["ok", "ok", "failed"]  # 305 + 305 tokens spent of 600
    assert "token budget" in res.state.evidence[2].error


def _refused(tmp_path, res) -> dict:
    intake = TraceStore(None, tmp_path).events(res.run_id, "node")[0]
    return json.loads(intake.payload)["not_applicable"]


def test_without_a_vision_endpoint_vlm_ask_does_not_apply_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_ENDPOINTS", str(tmp_path / "none.toml"))
    for k in ("DXAGENT_VLM_BASE_URL", "DXAGENT_VLM_MODEL", "DXAGENT_VLM_VISION"):
        monkeypatch.delenv(k, raising=False)
    res = run_case([CT], "Is there fat?", llm="scripted", script=[answer()], trace_dir=tmp_path, route=False)
    assert "no vision endpoint is configured" in _refused(tmp_path, res)["vlm_ask"]
    monkeypatch.setenv("DXAGENT_VLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("DXAGENT_VLM_MODEL", "text-only")
    assert load("vlm").vision is False and vision_settings("vlm") is None
    res = run_case([CT], "Is there fat?", llm="scripted", script=[answer()], trace_dir=tmp_path, route=False)
    assert "not declared vision-capable" in _refused(tmp_path, res)["vlm_ask"]


def test_endpoint_files_that_hold_a_key_or_bad_values_are_one_line_errors(tmp_path, monkeypatch):
    f = tmp_path / "endpoints.toml"
    monkeypatch.setenv("DXAGENT_ENDPOINTS", str(f))
    f.write_text('[endpoints.vlm]\nbase_url = "http://h/v1"\nmodel = "m"\napi_key = "sk-123"\n')
    with pytest.raises(EndpointError, match="api_key_env"):
        load("vlm")
    f.write_text('[endpoints.vlm]\nbase_url = "http://h/v1"\nmodel = "m"\nimage_max_px = 5\n')
    with pytest.raises(EndpointError, match="image_max_px"):
        load("vlm")
    f.write_text("[endpoints.vlm\n")
    with pytest.raises(EndpointError, match="not a readable TOML"):
        load("vlm")


def test_eval_compares_the_vlm_alone_with_the_agent(tmp_path, vlm):
    from test_eval import SLAKE, _rows, _slice

    from agent.app.eval import run_eval

    if not (SLAKE / "validate.jsonl").exists():
        pytest.skip(f"no SLAKE data at {SLAKE}")
    rows = [json.loads(line) for line in (SLAKE / "validate.jsonl").read_text().splitlines()]
    yes_no = [r for r in rows if r["answer"] in ("Yes", "No")][:1]
    m = _slice(tmp_path, 2)
    m.write_text(m.read_text() + "".join(json.dumps(r) + "\n" for r in yes_no))
    n = len(m.read_text().splitlines())
    vlm.reset(*[vlm_reply("Yes.", 0.9)] * n)
    run_eval(m, tmp_path / "out", root=SLAKE, systems=["agent", "vlm-only"], llm="scripted",
             script=['{"tool": "answer", "args": {}, "answer": "yes"}'] * 4)
    rows = [r for r in _rows(tmp_path / "out") if r["system"] == "vlm-only"]
    assert len(rows) == n and all(r["status"] == "done" for r in rows)
    closed = [r for r in rows if r["answer"]["kind"] == "yes_no"]
    assert closed and all(abs(r["answer"]["probability"] - 0.9) < 1e-3 for r in closed)
    assert len(vlm.requests) == n and all(len(images(q)) == 1 for q in vlm.requests)
    dump = TraceStore(None, tmp_path / "out" / "traces").dump(rows[0]["run_id"])
    assert dump["run"]["status"] == "done" and dump["artifacts"]


def test_eval_vlm_only_without_an_endpoint_is_a_one_line_error(tmp_path, monkeypatch):
    from agent.app.eval import run_eval
    from agent.app.eval_data import ManifestError

    monkeypatch.setenv("DXAGENT_ENDPOINTS", str(tmp_path / "none.toml"))
    with pytest.raises(ManifestError, match="no vision endpoint is configured"):
        run_eval(tmp_path / "m.jsonl", tmp_path / "out", systems=["vlm-only"])


def test_a_vlm_yes_against_a_measured_no_is_a_conflict():
    """The critic weighs a VLM's claim like any tool's: a contradiction is a conflict (and the answer is referred)."""
    from test_critic import TOOLS, ev, state

    from agent.engine.critic import critique
    from tools.vlm_ask import VlmAsk

    tools = {**TOOLS, "vlm_ask": VlmAsk()}
    out = {"answer": "Yes, the heart is enlarged.", "yes_no": True, "probability": 0.9, "finding": "cardiomegaly",
           "image_sha256": "0" * 64, "image_size": [64, 64], "model": "fake-vl", "endpoint": "http://h/v1",
           "model_card": {}}
    st = state(ev(1, "ctr", {"label": "cardiomegaly", "present": False}), ev(2, "vlm_ask", out, question="enlarged?"))
    assert critique(st, tools).conflicts == ["cardiomegaly: present per E2, absent per E1"]


def test_the_planner_endpoint_s_token_budget_ends_the_run_with_a_recorded_reason(tmp_path, fake_openai, monkeypatch):
    monkeypatch.setenv("DXAGENT_ENDPOINTS", str(tmp_path / "none.toml"))
    monkeypatch.setenv("DXAGENT_PLANNER_MAX_TOKENS_PER_RUN", "100")  # the fake's replies use 57 tokens each
    fake = fake_openai.reset(FakeOpenAI.text(call("inspect_image")), FakeOpenAI.text(call("ct_tissue_composition")),
                             FakeOpenAI.text(answer()))
    res = run_case([CT], "How large is the liver?", llm="openai-json", base_url=fake.base_url, model="fake",
                   api_key="none", trace_dir=tmp_path / "tr", route=False, narrative=False)
    assert [e.tool for e in res.state.evidence] == ["inspect_image", "ct_tissue_composition"]  # neither answers
    assert any("token budget for the planner endpoint is spent (114 of 100)" in n for n in res.report["limitations"])
    assert replay(TraceStore(None, tmp_path / "tr").dump(res.run_id)).verified


def test_a_named_narrator_endpoint_writes_the_impression(tmp_path, fake_openai, monkeypatch):
    (tmp_path / "e.toml").write_text(f'[endpoints.narrator]\nbase_url = "{fake_openai.base_url}"\nmodel = "narr"\n')
    monkeypatch.setenv("DXAGENT_ENDPOINTS", str(tmp_path / "e.toml"))
    fake = fake_openai.reset(*[FakeOpenAI.text("Soft tissue is 53 % of the body [E1].")] * 3)
    res = run_case([CT], "What is the tissue composition?", llm="scripted", script=[call("ct_tissue_composition")],
                   trace_dir=tmp_path / "tr", route=False)
    assert fake.requests and all(r["body"]["model"] == "narr" for r in fake.requests)
    assert "Soft tissue is 53 % of the body [E1]." in res.report["impression"]
