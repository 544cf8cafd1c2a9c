"""The planner against OpenAI-compatible endpoints: a real llama-cpp-python server serving SmolLM2-135M
(native tool calling and JSON mode), and a loopback fake server that injects faults (see conftest.py)."""

from __future__ import annotations

import json
import time
from typing import Literal

import pytest
from conftest import FakeOpenAI
from helpers import serve_http
from pydantic import BaseModel, Field

from agent.core.state import ArtifactRef, Budget, CaseInput, CaseState, Decision, ImageView
from agent.core.tool import Tool, ToolContext, ToolInput
from agent.engine import planner as planner_mod
from agent.engine.planner import Planner, PlannerError
from agent.llm.backends import make_llm


class WindowIn(ToolInput):
    preset: Literal["lung", "mediastinum", "bone"] = Field("lung", description="CT window preset")


class ThresholdIn(ToolInput):
    threshold_hu: float = Field(-500.0, ge=-1024, le=3000, description="HU threshold")


class ValueOut(BaseModel):
    value: float


class CtWindow(Tool):
    name = "ct_window"
    description = "Apply a CT window preset; makes a new view."
    kind = "view"
    Input = WindowIn
    Output = ValueOut

    def run(self, ctx: ToolContext, inp: WindowIn) -> ValueOut:  # never run: the planner only chooses
        raise NotImplementedError


class ThresholdArea(Tool):
    name = "threshold_area"
    description = "Area of the pixels above an HU threshold."
    kind = "measure"
    Input = ThresholdIn
    Output = ValueOut

    def run(self, ctx: ToolContext, inp: ThresholdIn) -> ValueOut:
        raise NotImplementedError


TOOLS: dict[str, Tool] = {t.name: t for t in (CtWindow(), ThresholdArea())}
CANDIDATES = ["ct_window", "threshold_area"]


def case(max_invalid: int = 2) -> CaseState:
    ref = ArtifactRef(sha256="0" * 64, kind="pixels", media_type="application/x-npy", path="ab/cd.npy")
    view = ImageView(id="V1", pixels=ref, shape=(128, 128), dtype="int16", ndim_spatial=2, spacing_mm=(0.7, 0.7),
                     modality="CT", modality_source="dicom", body_part="CHEST")
    return CaseState(inputs=CaseInput(paths=["ct.dcm"]), question="How much of this CT slice is above -500 HU?",
                     views=[view], applicable_tools=CANDIDATES, budget=Budget(max_invalid_decisions=max_invalid))


def make_planner(base_url: str, mode: str, model: str = "fake", timeout_s: float = 5.0, max_retries: int = 0):
    chat, model_id, proto = make_llm("openai" if mode == "tools" else "openai-json", base_url=base_url, model=model,
                                     api_key="none", timeout_s=timeout_s, max_retries=max_retries)
    assert proto == mode
    records: list[dict] = []
    return Planner(chat, model_id, proto, record=lambda **kw: records.append(kw)), records


def assert_valid(decision: Decision) -> None:
    if decision.action == "call":
        assert decision.tool in CANDIDATES
        TOOLS[decision.tool].Input.model_validate(decision.args)
        assert decision.args["view"] == "V1"
    else:
        assert decision.action == "answer" and decision.tool is None


def user_text(request: dict) -> str:
    return next(m["content"] for m in request["body"]["messages"] if m["role"] == "user")


@pytest.fixture(autouse=True)
def _fresh_endpoint_memory():
    planner_mod._JSON_OBJECT_ENDPOINTS.clear()
    yield
    planner_mod._JSON_OBJECT_ENDPOINTS.clear()


# --- the real llama-cpp-python server ------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_real_server_native_tool_calling(llama_server):
    planner, records = make_planner(llama_server.base_url, "tools", llama_server.model, timeout_s=120, max_retries=1)
    t0 = time.perf_counter()
    decision = planner.decide(case(), TOOLS)
    elapsed = time.perf_counter() - t0
    assert_valid(decision)
    last = records[-1]
    assert (last["kind"], last["node"], last["name"]) == ("llm", "think", "decision")
    p = last["payload"]
    assert p["rejected"] is None and p["decision"] == decision.model_dump()
    assert [m["role"] for m in p["request"]["messages"]] == ["system", "user"]
    # the question reaches the planner as its reading (issue 32 item 6), its numbers included
    assert "a measurement question; subject: volume (quantity); numbers given: -500" in p["request"]["messages"][1]["content"]
    assert p["request"]["candidates"] == CANDIDATES and p["params"]["tool_choice"] == "auto"
    # a native tool call, not prose: without tool_choice="auto" the server ignores the tools entirely
    assert p["response"]["tool_calls"] and p["metadata"].get("finish_reason") == "tool_calls", p["response"]
    assert p["response"]["tool_calls"][0]["name"] in CANDIDATES + ["answer"]
    assert p["usage"]["input_tokens"] > 100 and p["usage"]["output_tokens"] > 0
    assert p["usage"]["total_tokens"] == p["usage"]["input_tokens"] + p["usage"]["output_tokens"]
    assert 0 < p["latency_s"] <= elapsed


@pytest.mark.timeout(300)
def test_real_server_json_mode(llama_server):
    planner, records = make_planner(llama_server.base_url, "json", llama_server.model, timeout_s=120, max_retries=0)
    decision = planner.decide(case(), TOOLS)
    assert_valid(decision)
    first = records[0]["payload"]
    # llama-cpp-python's server refuses response_format json_schema; the planner falls back to json_object+schema
    assert "json_schema" in first["params"]["json_schema_rejected"]
    for rec in records:
        p = rec["payload"]
        fmt = p["params"]["response_format"]
        assert fmt["type"] == "json_object" and "anyOf" in fmt["schema"]
        assert p["params"]["extra_body"] == {"max_tokens": planner.max_tokens}
        assert isinstance(json.loads(p["response"]["content"]), dict)  # the schema became a grammar
        assert p["usage"]["input_tokens"] > 100 and p["usage"]["output_tokens"] > 0 and p["latency_s"] > 0
    assert records[-1]["payload"]["decision"] == decision.model_dump()
    # the endpoint is remembered: the next decision goes straight to json_object
    planner.decide(case(), TOOLS)
    assert "json_schema_rejected" not in records[-1]["payload"]["params"]


# --- faults injected by the fake server ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_timeout_is_a_quick_planner_error(fake_openai):
    fake_openai.reset(FakeOpenAI.slow(8))
    planner, records = make_planner(fake_openai.base_url, "tools", timeout_s=1.0, max_retries=0)
    t0 = time.perf_counter()
    with pytest.raises(PlannerError, match="LLM call failed: .*Timeout"):
        planner.decide(case(), TOOLS)
    assert time.perf_counter() - t0 < 4
    assert len(fake_openai.requests) == 1
    assert [r["name"] for r in records] == ["error"]
    assert "Timeout" in records[0]["payload"]["error"] and records[0]["payload"]["latency_s"] >= 0.9
    assert records[0]["payload"]["request"]["messages"][0]["role"] == "system"


@pytest.mark.timeout(30)
def test_a_silent_endpoint_cannot_outlast_the_run_budget(fake_openai):
    """Issue 15: a silent endpoint overran --max-seconds 60 (each request could use the client timeout x 3 tries).
    With 1.5 s left in the run's budget, a 5 s client timeout and 2 retries, the decision fails within ~1.5 s."""
    fake_openai.reset(FakeOpenAI.slow(8), FakeOpenAI.slow(8), FakeOpenAI.slow(8))
    planner, records = make_planner(fake_openai.base_url, "tools", timeout_s=5.0, max_retries=2)
    st = case()
    st.budget.max_wall_s, st.budget.started_at = 60.0, time.time() - 58.5
    t0 = time.perf_counter()
    with pytest.raises(PlannerError, match="did not reply within the 1 s left"):
        planner.decide(st, TOOLS)
    assert time.perf_counter() - t0 < 3
    assert [r["name"] for r in records] == ["error"] and "budget" in records[0]["payload"]["error"]
    import threading

    fake_openai.release()  # the abandoned request gets its (late) reply now instead of at its client timeout, so
    for t in threading.enumerate():  # that it ends without retries that would take the next test's scripted replies
        if t.name == "dxagent-bounded-call":
            t.join(25)


@pytest.mark.timeout(30)
def test_a_huge_reply_is_refused_while_read_and_not_retried(fake_openai):
    """Issue 32 item 7: a 50 MB endpoint reply was read whole, re-asked, and stored three times (157 MB of trace).
    A reply over DXAGENT_MAX_STORED_REPLY_BYTES (256 KiB) is refused while it is read - a one-line error, no
    retry (it would only be as large again) - and the record keeps that line, not the reply."""
    fake_openai.reset(*[FakeOpenAI.text("A" * 3_000_000)] * 3)
    planner, records = make_planner(fake_openai.base_url, "json", max_retries=2)
    with pytest.raises(PlannerError, match="over 256 KiB"):
        planner.decide(case(), TOOLS)
    assert len(fake_openai.requests) == 1 and [r["name"] for r in records] == ["error"]
    assert len(json.dumps(records[0]["payload"])) < 20_000
    sent = {k.lower(): v for k, v in fake_openai.requests[0]["headers"].items()}
    assert sent["accept-encoding"] == "identity"  # so the size read is the size


class _Endless:
    """A loopback endpoint whose 200 reply never ends: without a length, `chunk` bytes every `every` seconds."""

    def __init__(self, chunk: bytes, every: float):
        import threading
        from http.server import BaseHTTPRequestHandler

        self.stop, self.sent = threading.Event(), 0
        endless = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no Content-Length: the body ends when the connection closes

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                try:
                    self.wfile.write(b'{"id": "x", "choices": [{"message": {"content": "')
                    while not endless.stop.wait(every) and endless.sent < 64 * 2**20:  # "never" in a test's terms
                        self.wfile.write(chunk)
                        endless.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd, self.base_url, self.thread = serve_http(Handler)

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("chunk", "every", "why"), [(b"A" * 65536, 0.0, "over 256 KiB"),
                                                     (b" ", 0.05, "not finished within 2 s")])
def test_a_never_ending_reply_is_cut_by_size_or_by_time(_loopback_without_proxy, chunk, every, why):
    """A reply that never ends - fast (size grows for ever) or a trickle (each read is in time, so the client's
    read timeout never fires) - ends the call within the cap and the client timeout, and is not retried."""
    server = _Endless(chunk, every)
    try:
        planner, records = make_planner(server.base_url, "json", timeout_s=2.0, max_retries=2)
        t0 = time.perf_counter()
        with pytest.raises(PlannerError, match=why):
            planner.decide(case(), TOOLS)
        assert time.perf_counter() - t0 < 6
        assert server.sent < 4 * 2**20 and [r["name"] for r in records] == ["error"]
    finally:
        server.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content_type", ["application/json", "text/html"])
def test_non_json_http_body_is_a_planner_error(fake_openai, content_type):
    fake_openai.reset(FakeOpenAI.garbage(content_type))
    planner, records = make_planner(fake_openai.base_url, "json", max_retries=2)
    with pytest.raises(PlannerError, match="LLM call failed"):
        planner.decide(case(), TOOLS)
    assert len(fake_openai.requests) == 1  # a 200 is not retried
    assert [r["name"] for r in records] == ["error"] and records[0]["payload"]["error"]


@pytest.mark.timeout(30)
def test_garbage_content_is_reasked_then_gives_up(fake_openai):
    fake_openai.reset(*[FakeOpenAI.text(f"The liver looks fine {i}.") for i in range(3)])
    planner, records = make_planner(fake_openai.base_url, "json")
    with pytest.raises(PlannerError, match=r"no valid decision after 3 tries; last: reply is not JSON .*fine 2"):
        planner.decide(case(max_invalid=2), TOOLS)
    assert len(fake_openai.requests) == 3 and len(records) == 3
    assert all(r["payload"]["decision"] is None and "not JSON" in r["payload"]["rejected"] for r in records)
    assert [r["payload"]["request"]["attempt"] for r in records] == [0, 1, 2]
    assert "rejected" not in user_text(fake_openai.requests[0])
    for i in (1, 2):  # every re-ask carries the previous error
        assert "Your previous reply was rejected: reply is not JSON" in user_text(fake_openai.requests[i])
        assert f"fine {i - 1}" in user_text(fake_openai.requests[i])
    # an OpenAI/vLLM-style endpoint gets the standard json_schema and max_completion_tokens, never both token caps
    body = fake_openai.requests[0]["body"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "decision"
    assert body["max_completion_tokens"] == planner.max_tokens and "max_tokens" not in body


@pytest.mark.timeout(30)
def test_prose_without_a_tool_call_is_rejected_and_reasked(fake_openai):
    """Issue 15: on the tools protocol a reply with text and no function call was taken as "answer" with no failure
    recorded; now it is a rejected decision, re-asked like any other invalid reply."""
    fake_openai.reset(FakeOpenAI.text("Based on the image, the patient is healthy."),
                      FakeOpenAI.call("answer", {"reason": "done"}))
    planner, records = make_planner(fake_openai.base_url, "tools")
    assert planner.decide(case(), TOOLS) == Decision(action="answer", reason="done")
    assert "called no function" in records[0]["payload"]["rejected"] and records[0]["payload"]["decision"] is None
    assert "called no function" in user_text(fake_openai.requests[1])


@pytest.mark.timeout(30)
def test_unknown_tool_is_reasked_then_valid(fake_openai):
    fake_openai.reset(FakeOpenAI.call("segment_everything", {"view": "V1"}),
                      FakeOpenAI.call("threshold_area", {"view": "V1", "threshold_hu": -300}))
    planner, records = make_planner(fake_openai.base_url, "tools")
    decision = planner.decide(case(), TOOLS)
    assert decision == Decision(action="call", tool="threshold_area", args={"view": "V1", "threshold_hu": -300.0})
    assert [r["payload"]["rejected"] is not None for r in records] == [True, False]
    assert "unknown tool 'segment_everything'" in records[0]["payload"]["rejected"]
    first, second = (r["body"] for r in fake_openai.requests)
    assert [t["function"]["name"] for t in first["tools"]] == CANDIDATES + ["answer"]
    assert first["tool_choice"] == "auto"
    # one view: the view argument can only be V1, so the schema leaves it out (fewer tokens to write)
    assert "view" not in first["tools"][1]["function"]["parameters"]["properties"]
    assert "rejected: unknown tool 'segment_everything'" in user_text(fake_openai.requests[1])
    assert second["tools"] == first["tools"]


@pytest.mark.timeout(30)
def test_malformed_arguments_are_recorded_as_rejected(fake_openai):
    fake_openai.reset(FakeOpenAI.call("ct_window", '{"view": "V1", "preset": '),
                      FakeOpenAI.call("ct_window", {"view": "V1", "preset": "soft"}),
                      FakeOpenAI.call("answer", {"reason": "enough evidence"}))
    planner, records = make_planner(fake_openai.base_url, "tools")
    assert planner.decide(case(), TOOLS) == Decision(action="answer", reason="enough evidence")
    bad_json, bad_enum, ok = (r["payload"] for r in records)
    assert bad_json["rejected"].startswith("malformed tool call 'ct_window'")
    assert bad_json["response"]["invalid_tool_calls"] and bad_json["decision"] is None
    assert bad_enum["rejected"].startswith("bad arguments for ct_window: preset")
    assert ok["rejected"] is None and ok["decision"]["action"] == "answer"
    assert "malformed tool call" in user_text(fake_openai.requests[1])


@pytest.mark.timeout(30)
def test_http_500_then_success_is_retried_by_the_client(fake_openai):
    fake_openai.reset(FakeOpenAI.error(500, "overloaded"),
                      FakeOpenAI.call("ct_window", {"view": "V1", "preset": "bone"}))
    planner, records = make_planner(fake_openai.base_url, "tools", max_retries=2)
    assert planner.decide(case(), TOOLS) == Decision(action="call", tool="ct_window",
                                                     args={"view": "V1", "preset": "bone"})
    assert len(fake_openai.requests) == 2 and len(records) == 1  # the retry is inside the client
    assert fake_openai.requests[0]["body"] == fake_openai.requests[1]["body"]
    assert fake_openai.requests[1]["headers"].get("x-stainless-retry-count") == "1"


@pytest.mark.timeout(30)
def test_http_500_without_retries_is_a_planner_error(fake_openai):
    fake_openai.reset(FakeOpenAI.error(500, "overloaded"), FakeOpenAI.text("never read"))
    planner, records = make_planner(fake_openai.base_url, "tools", max_retries=0)
    with pytest.raises(PlannerError, match="overloaded"):
        planner.decide(case(), TOOLS)
    assert len(fake_openai.requests) == 1 and records[0]["name"] == "error"


@pytest.mark.timeout(30)
def test_json_schema_refusal_falls_back_to_json_object(fake_openai):
    refusal = "Input should be 'text' or 'json_object' (input: 'json_schema')"  # llama-cpp-python's wording
    ok = '{"tool": "threshold_area", "args": {"view": "V1", "threshold_hu": -500}, "reason": "measure it"}'
    fake_openai.reset(FakeOpenAI.error(500, refusal), FakeOpenAI.text(ok), FakeOpenAI.text(ok))
    planner, records = make_planner(fake_openai.base_url, "json")
    assert planner.decide(case(), TOOLS).tool == "threshold_area"
    assert planner.decide(case(), TOOLS).tool == "threshold_area"
    sent = [r["body"] for r in fake_openai.requests]
    assert [b["response_format"]["type"] for b in sent] == ["json_schema", "json_object", "json_object"]
    assert sent[1]["response_format"]["schema"] == sent[0]["response_format"]["json_schema"]["schema"]
    assert sent[1]["max_tokens"] == planner.max_tokens and "max_completion_tokens" not in sent[1]
    assert "json_schema" in records[0]["payload"]["params"]["json_schema_rejected"]
    assert "json_schema_rejected" not in records[1]["payload"]["params"]


@pytest.mark.timeout(30)
def test_other_errors_do_not_trigger_the_fallback(fake_openai):
    fake_openai.reset(FakeOpenAI.error(400, "model not found"), FakeOpenAI.text("never read"))
    planner, _ = make_planner(fake_openai.base_url, "json")
    with pytest.raises(PlannerError, match="model not found"):
        planner.decide(case(), TOOLS)
    assert len(fake_openai.requests) == 1 and not planner_mod._JSON_OBJECT_ENDPOINTS


@pytest.mark.timeout(600)
def test_cli_run_end_to_end_against_the_real_server(llama_server, tmp_path):
    """`dxagent run --llm openai` as a user runs it: the report comes back and the trace records the endpoint."""
    import subprocess
    import sys

    from pydicom.data import get_testdata_file

    r = subprocess.run([sys.executable, "-m", "agent.app.cli", "run", get_testdata_file("CT_small.dcm"),
                        "-q", "How much fat is in this CT slice?", "--llm", "openai", "--base-url", llama_server.base_url,
                        "--model", llama_server.model, "--max-steps", "2", "--json", "--trace-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["versions"]["planner_mode"] == "tools"
    assert report["versions"]["planner_model"].startswith("openai:")
    assert report["disclaimer"].startswith("RESEARCH USE ONLY")
    # the endpoint run (native tool calls, the model-written impression) replays from its record with no server
    r = subprocess.run([sys.executable, "-m", "agent.app.cli", "replay", report["run_id"], "--trace-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "verified" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(60)
def test_replay_of_an_endpoint_run_with_refusal_garbage_and_impression(fake_openai, tmp_path):
    """An endpoint that refuses json_schema, then answers garbage (re-asked), then two calls and a model-written
    impression: the replay serves each reply, the refusal included, and rebuilds the same report."""
    from helpers import call
    from pydicom.data import get_testdata_file

    from agent.engine.replay import replay
    from agent.engine.session import run_case
    from agent.store.trace import TraceStore

    refusal = "Input should be 'text' or 'json_object' (input: 'json_schema')"
    fake_openai.reset(FakeOpenAI.error(400, refusal), FakeOpenAI.text("not json at all"),
                      FakeOpenAI.text(call("inspect_image")), FakeOpenAI.text(call("ct_tissue_composition")),
                      FakeOpenAI.text("Fat and soft tissue were measured [E2]. The heart is enlarged."))
    res = run_case([get_testdata_file("CT_small.dcm")], "What is the tissue composition of this CT slice?",
                   llm="openai-json", base_url=fake_openai.base_url, model="fake", api_key="none", trace_dir=tmp_path,
                   max_steps=2, route=False)
    assert res.report["impression"] == "Fat and soft tissue were measured [E2]."  # the uncited sentence dropped
    dump = TraceStore(None, tmp_path).dump(res.run_id)
    assert any("json_schema_rejected" in (e["payload"].get("params") or {}) for e in dump["events"])
    planner_mod._JSON_OBJECT_ENDPOINTS.clear()
    rep = replay(dump)
    assert rep.verified, f"{rep.divergence}\n{rep.divergence and rep.divergence.diff()}"
    assert rep.report == res.report and len(fake_openai.requests) == 5  # nothing sent during the replay


def test_credentials_in_the_base_url_are_never_stored(fake_openai, tmp_path):
    """Issue 15: `--base-url https://user:pass@host/...` was stored in the trace, the checkpoints and the report."""
    from pydicom.data import get_testdata_file

    from agent.engine.session import run_case
    from agent.llm.backends import public_url

    host = fake_openai.base_url.split("://", 1)[1]
    url = f"http://alice:s3cret-pw@{host}?api_key=s3cret-key"
    assert public_url(url) == fake_openai.base_url.split("?")[0]
    fake_openai.reset(FakeOpenAI.call("answer", {"reason": "done"}))
    res = run_case([get_testdata_file("CT_small.dcm")], "How much fat?", llm="openai", base_url=url, model="m",
                   trace_dir=tmp_path, narrative=False)
    assert "alice" not in res.report["versions"]["planner_model"]
    for f in tmp_path.rglob("*.sqlite*"):
        data = f.read_bytes()
        assert b"s3cret" not in data and b"alice" not in data, f.name
