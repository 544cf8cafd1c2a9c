"""The MCP server (agent/app/mcp_server.py) driven by the MCP SDK's own client, as an LLM client would drive it.

Over stdio: `python -m agent.app.cli mcp --llm scripted` is a real subprocess; one session (module fixture) lists the
tools, analyses the bundled CT, reads its report, verdict and resources, asks follow-ups and is refused, and the tests
check what came back (its progress notifications too). Over streamable HTTP: a real `dxagent serve --host 0.0.0.0`
subprocess with a bearer token, its REST API and /mcp endpoint with and without the token. No engine is mocked: every
run goes through run_case into a trace store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from helpers import call, free_port
from pydicom.data import get_testdata_file

CT = get_testdata_file("CT_small.dcm")
TISSUE_Q = "What is the tissue composition of this CT slice?"
FAT_Q = "What is the mean HU of the fat?"  # answered from the first question's evidence (E1): no new tool call
MODALITY_Q = "What is the modality of this image?"
IDENTIFIERS = ("CompressedSamples", "1CT1", "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322")  # CT_small's name, ID, UID
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def _text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def _said(result: Any) -> str:
    """Everything a tool result carries, as one string (its text blocks and its structured content)."""
    return _text(result) + json.dumps(result.structured_content or {})


def _case_folder(base: Path) -> tuple[Path, Path]:
    """(root, outside): the served root holds the CT under a name like a patient's; the rest lies outside it."""
    root, outside = base / "root", base / "outside"
    (root / "DOE_JOHN").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(CT, root / "DOE_JOHN" / "ct.dcm")
    shutil.copy(CT, outside / "secret.dcm")
    (root / "link.dcm").symlink_to(outside / "secret.dcm")
    (root / "linkdir").mkdir()
    (root / "linkdir" / "a.dcm").symlink_to(outside / "secret.dcm")
    (root / "notes.txt").write_text("not an image at all\n" * 10)
    (root / "empty").mkdir()
    return root, outside


def _arun(fn, *args):
    """anyio.run(fn, *args) on a thread of its own: another test's session fixture (Playwright's sync API, for the
    HTML pages) keeps an event loop running on the main thread for the rest of the session."""
    out: dict = {}

    def target():
        try:
            out["value"] = anyio.run(fn, *args)
        except BaseException as exc:  # re-raised on the test's thread
            out["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _runs(traces: Path) -> int:
    db = traces / "dxagent.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("select count(*) from run").fetchone()[0]


async def _session(root: Path, outside: Path, traces: Path, script: Path) -> dict[str, Any]:
    from mcp import Client, StdioServerParameters
    from mcp.shared.exceptions import MCPError

    params = StdioServerParameters(command=sys.executable, env=ENV, cwd=str(root),
                                   args=["-m", "agent.app.cli", "mcp", "--llm", "scripted", "--script", str(script),
                                         "--trace-dir", str(traces)])  # --root: the folder it starts in
    got: dict[str, Any] = {"said": [], "not_protocol": []}

    def keep(name: str, result: Any) -> Any:
        got[name] = result
        got["said"].append(_said(result))
        return result

    async def on_message(message: Any) -> None:  # a line on the server's stdout that is not MCP arrives as an Exception
        if isinstance(message, Exception):
            got["not_protocol"].append(repr(message)[:300])

    async with Client(params, read_timeout_seconds=120, message_handler=on_message) as c:
        got["tools"] = (await c.list_tools()).tools
        got["templates"] = (await c.list_resource_templates()).resource_templates
        keep("expert_tools", await c.call_tool("list_expert_tools", {}))
        def progress(into: list) -> Any:
            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                into.append((done, total, message))
                got["said"].append(message or "")

            return on_progress

        got["progress"], got["followup_progress"] = [], []  # the SDK's progress notifications, as they arrive
        a = keep("analysis", await c.call_tool("analyze_image", {"image": "DOE_JOHN/ct.dcm", "question": TISSUE_Q},
                                               progress_callback=progress(got["progress"])))
        rid = a.structured_content["run_id"]
        keep("report_json", await c.call_tool("get_report", {"run_id": rid, "format": "json"}))
        keep("report_md", await c.call_tool("get_report", {"run_id": rid, "format": "md"}))
        keep("verdict", await c.call_tool("verify_trace", {"run_id": rid}))
        got["res_report"] = (await c.read_resource(f"dxagent://runs/{rid}/report")).contents[0]
        got["res_artifacts"] = json.loads((await c.read_resource(f"dxagent://runs/{rid}/artifacts")).contents[0].text)
        png = next(x for x in got["res_artifacts"] if x["media_type"] == "image/png")
        got["res_png"] = (await c.read_resource(png["uri"])).contents[0]
        got["said"] += [got["res_report"].text, json.dumps(got["res_artifacts"])]
        from typer.testing import CliRunner

        from agent.app.cli import app

        got["replay"] = CliRunner().invoke(app, ["replay", rid, "--trace-dir", str(traces)])  # before any follow-up
        keep("fat", await c.call_tool("ask_followup", {"thread_id": a.structured_content["thread_id"], "question": FAT_Q},
                                      progress_callback=progress(got["followup_progress"])))
        keep("modality", await c.call_tool("ask_followup", {"thread_id": rid, "question": MODALITY_Q}))
        keep("verdict_after", await c.call_tool("verify_trace", {"run_id": rid}))

        n = _runs(traces)
        refusals = {}
        for image in (str(outside / "secret.dcm"), "../outside/secret.dcm", "link.dcm", "linkdir", "/etc/passwd",
                      "DOE_JOHN/none.dcm", "notes.txt", "empty", "dicomweb://pacs.example/x?study=not-a-uid"):
            refusals[image] = keep(f"refused {image}", await c.call_tool("analyze_image", {"image": image}))
        for tool, args in (("get_report", {"run_id": "run-nope"}), ("verify_trace", {"run_id": "run-nope"}),
                           ("ask_followup", {"thread_id": "run-nope", "question": "why?"})):
            refusals[tool] = keep(f"refused {tool}", await c.call_tool(tool, args))
        got["refusals"], got["runs_before"], got["runs_after"] = refusals, n, _runs(traces)
        try:
            await c.read_resource("dxagent://runs/run-nope/report")
            got["unknown_resource"] = None
        except MCPError as exc:
            got["unknown_resource"] = str(exc)
        got["run_id"] = rid
    # the server ends with its client; a new one resumes the thread from the trace store and its checkpoints
    async with Client(params, read_timeout_seconds=120, message_handler=on_message) as c:
        keep("after_restart", await c.call_tool("ask_followup", {"thread_id": rid, "question": FAT_Q}))
        keep("verdict_restart", await c.call_tool("verify_trace", {"run_id": rid}))
    return got


@pytest.fixture(scope="module")
def stdio(tmp_path_factory):
    base = tmp_path_factory.mktemp("mcp")
    root, outside = _case_folder(base)
    script = base / "script.jsonl"
    script.write_text(call("ct_tissue_composition") + "\n")
    traces = base / "traces"
    t0 = time.monotonic()
    got = _arun(_session, root, outside, traces, script)
    got.update(root=root, outside=outside, traces=traces, seconds=time.monotonic() - t0)
    return got


def test_stdio_lists_the_tools_and_the_resource_templates(stdio):
    names = {t.name for t in stdio["tools"]}
    assert names == {"analyze_image", "ask_followup", "list_expert_tools", "get_report", "verify_trace"}
    analyze = next(t for t in stdio["tools"] if t.name == "analyze_image")
    assert set(analyze.input_schema["properties"]) == {"image", "question", "clinical_context"}
    assert {"run_id", "thread_id", "answer", "findings"} <= set(analyze.output_schema["properties"])
    assert {t.uri_template for t in stdio["templates"]} == {
        "dxagent://runs/{run_id}/report", "dxagent://runs/{run_id}/report.json", "dxagent://runs/{run_id}/artifacts",
        "dxagent://runs/{run_id}/artifacts/{name}"}
    experts = stdio["expert_tools"].structured_content["result"]
    ct = next(t for t in experts if t["name"] == "ct_tissue_composition")
    assert ct["modalities"] == ["CT"] and "fat" in ct["addresses"] and ct["description"]


def test_analyze_image_returns_the_typed_answer_findings_and_run(stdio):
    a = stdio["analysis"]
    assert not a.is_error
    s = a.structured_content
    assert s["run_id"].startswith("run-") and s["thread_id"] == s["run_id"] and s["status"] == "done"
    assert s["outcome"] == "report" and s["answer"]["kind"] == "phrase" and "fat" in s["answer"]["value"]
    assert s["answer"]["evidence_ids"] == ["E1"] and not s["answer"]["abstained"]
    assert s["findings"] and all(f["evidence_ids"] == ["E1"] for f in s["findings"])
    assert any(f["label"].startswith("fat") for f in s["findings"]) and "[E1]" in s["impression"]
    assert s["report_uri"] == f"dxagent://runs/{s['run_id']}/report"
    text = _text(a)
    assert "fat" in text and s["run_id"] in text and "RESEARCH USE ONLY" in text and len(text) < 1000


def test_progress_notifications_follow_the_run_as_it_happens(stdio):
    """analyze_image and ask_followup, called with a progress callback (the SDK sends a progress token): one
    notification per trace event, in order - intake, the tool call, the answer - each a one-line summary."""
    got = stdio["progress"]
    assert [n for n, _, _ in got] == list(range(1, len(got) + 1)) and all(total is None for _, total, _ in got)
    names = [m.split(":")[0] for _, _, m in got]
    assert names.index("intake") < names.index("ct_tissue_composition") < names.index("answer") < names.index("report")
    tool = got[names.index("ct_tissue_composition")][2]
    assert "E1 ct_tissue_composition" in tool and " ok: " in tool and all("\n" not in m for _, _, m in got)
    assert len(got) == stdio["verdict"].structured_content["events"]  # every event of the run, none twice
    follow = [m.split(":")[0] for _, _, m in stdio["followup_progress"]]
    assert follow and "intake" not in follow and follow.index("answer") < follow.index("report")  # this turn only


def test_report_verdict_and_resources_are_the_clis(stdio):
    from agent.engine.report import to_markdown

    report = json.loads(_text(stdio["report_json"]))
    assert report["run_id"] == stdio["run_id"] and report["answer"]["evidence_ids"] == ["E1"]
    assert _text(stdio["report_md"]) == to_markdown(report)
    assert stdio["res_report"].mime_type == "text/markdown" and stdio["res_report"].text == to_markdown(report)
    v = stdio["verdict"].structured_content
    assert v["verdict"] == "intact" and v["problems"] == [] and v["events"] > 0
    assert stdio["replay"].exit_code == 0 and "verified" in stdio["replay"].output, stdio["replay"].output[-2000:]
    kinds = {x["kind"] for x in stdio["res_artifacts"]}
    assert {"mask", "overlay"} <= kinds
    png = stdio["res_png"]
    import base64

    assert png.mime_type == "image/png" and base64.b64decode(png.blob).startswith(b"\x89PNG\r\n\x1a\n")


def test_followups_keep_the_evidence_and_the_record_stays_intact(stdio):
    fat = stdio["fat"]
    assert not fat.is_error, _text(fat)
    f = fat.structured_content
    assert f["thread_id"] == stdio["run_id"] and f["turn"] == 2
    assert f["answer"]["kind"] == "measurement" and f["answer"]["unit"] == "HU"
    assert f["answer"]["evidence_ids"] == ["E1"] and f["evidence"] == ["E1"]  # the first question's evidence, kept
    m = stdio["modality"].structured_content
    assert m["turn"] == 3 and m["answer"]["value"] == "CT" and m["evidence"][0] == "E1" and len(m["evidence"]) > 1
    assert stdio["verdict_after"].structured_content["verdict"] == "intact"  # re-sealed after each answer
    from agent.store.trace import TraceStore

    dump = TraceStore(None, stdio["traces"]).dump(stdio["run_id"])
    turns = [e["payload"]["turn"] for e in dump["events"] if e["kind"] == "note" and e["name"] == "turn"]
    assert turns == [2, 3, 4]


def test_a_thread_resumes_after_the_server_restarts(stdio):
    r = stdio["after_restart"]
    assert not r.is_error, _text(r)
    f = r.structured_content
    assert f["turn"] == 4 and f["answer"]["evidence_ids"] == ["E1"]
    assert f["evidence"] == stdio["modality"].structured_content["evidence"]  # all the evidence of the earlier server
    assert stdio["verdict_restart"].structured_content["verdict"] == "intact"


def test_nothing_but_the_protocol_on_stdout(stdio):
    assert stdio["not_protocol"] == []


def test_refusals_are_one_line_tool_errors_and_record_nothing(stdio):
    r = stdio["refusals"]
    for image in (str(stdio["outside"] / "secret.dcm"), "../outside/secret.dcm", "link.dcm", "linkdir", "/etc/passwd"):
        assert r[image].is_error and "outside the served roots" in _text(r[image]), (image, _text(r[image]))
    assert "no such file" in _text(r["DOE_JOHN/none.dcm"])
    assert "not an image" in _text(r["notes.txt"]) and "holds no image" in _text(r["empty"])
    assert r["dicomweb://pacs.example/x?study=not-a-uid"].is_error
    for tool in ("get_report", "verify_trace", "ask_followup"):
        assert r[tool].is_error and "run-nope" in _text(r[tool])
    for result in r.values():
        assert len(result.content) == 1 and "\n" not in _text(result) and "Traceback" not in _text(result)
    assert stdio["runs_after"] == stdio["runs_before"]  # nothing recorded
    assert stdio["unknown_resource"] and "run-nope" in stdio["unknown_resource"]


def test_no_identifier_path_or_file_name_leaves_in_a_result(stdio):
    said = "\n".join(stdio["said"])
    assert not [x for x in IDENTIFIERS if x in said]
    for leak in (str(stdio["root"]), str(stdio["outside"]), str(stdio["traces"]), "ct.dcm", "DOE", "secret.dcm"):
        assert leak not in said, leak


# -- streamable HTTP on `dxagent serve` ------------------------------------------------------------------------------
def _outward_address() -> str:
    """This machine's non-loopback IPv4 address (the one a route out would use; no packet is sent), else loopback."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def test_serve_beyond_loopback_with_the_token_rest_and_streamable_http(tmp_path):
    """`dxagent serve --host 0.0.0.0` with DXAGENT_SERVE_TOKEN: REST and /mcp refuse a missing or wrong token (401)
    and serve the right one, on loopback and on this machine's outward address."""
    import httpx2
    from mcp import Client

    root, _ = _case_folder(tmp_path)
    script = tmp_path / "script.jsonl"
    script.write_text(call("ct_tissue_composition") + "\n")
    token = "mcp-test-token-" + "x" * 16
    port, traces = free_port(), tmp_path / "traces"
    proc = subprocess.Popen([sys.executable, "-m", "agent.app.cli", "serve", "--llm", "scripted", "--script", str(script),
                             "--host", "0.0.0.0", "--port", str(port), "--trace-dir", str(traces), "--root", str(root)],
                            env={**ENV, "DXAGENT_SERVE_TOKEN": token}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{base}/api/runs", headers=auth, timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

        # listening beyond loopback (allowed: the token is set), reached at this machine's outward address
        outward = f"http://{_outward_address()}:{port}"
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
            r = httpx.get(f"{outward}/api/runs", headers=headers, timeout=10, trust_env=False)
            assert r.status_code == 401 and set(r.json()) == {"detail"} and "\n" not in r.json()["detail"]
        assert httpx.get(f"{outward}/api/runs", headers=auth, timeout=10, trust_env=False).json() == []

        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                 "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                            "clientInfo": {"name": "t", "version": "0"}}}
        r = httpx.post(f"{base}/mcp", json=hello, headers={"Accept": "application/json, text/event-stream"},
                       trust_env=False)
        assert r.status_code == 401 and set(r.json()) == {"detail"}  # no token: refused before MCP sees it

        async def without_token() -> None:
            async with Client(f"{base}/mcp"):
                pass

        with pytest.raises(ExceptionGroup) as refused:  # the SDK's client: its task group around the 401's MCPError
            _arun(without_token)
        assert "MCPError" in repr(refused.value) and "error response" in repr(refused.value)

        async def with_token() -> dict[str, Any]:
            from mcp.client.streamable_http import streamable_http_client

            async with httpx2.AsyncClient(headers=auth, timeout=120) as http:
                async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as c:
                    names = {t.name for t in (await c.list_tools()).tools}
                    seen: list[str] = []

                    async def on_progress(done: float, total: float | None, message: str | None) -> None:
                        seen.append(message or "")

                    a = await c.call_tool("analyze_image", {"image": "DOE_JOHN/ct.dcm", "question": TISSUE_Q},
                                          progress_callback=on_progress)  # the run waits in serve's queue
                    out = await c.call_tool("analyze_image", {"image": "link.dcm"})
                    v = await c.call_tool("verify_trace", {"run_id": a.structured_content["run_id"]})
                    return {"names": names, "analysis": a, "outside": out, "verdict": v, "progress": seen}

        got = _arun(with_token)
        assert "analyze_image" in got["names"]
        run_id = got["analysis"].structured_content["run_id"]
        assert not got["analysis"].is_error and got["verdict"].structured_content["verdict"] == "intact"
        steps = [m.split(":")[0] for m in got["progress"]]  # progress notifications over HTTP too
        assert steps.index("intake") < steps.index("ct_tissue_composition") < steps.index("answer")
        assert got["outside"].is_error and "outside the served roots" in _text(got["outside"])
        listed = httpx.get(f"{base}/api/runs", headers=auth, trust_env=False).json()  # the serve queue ran it
        assert [x["id"] for x in listed] == [run_id] and listed[0]["status"] == "done"
        said = _said(got["analysis"]) + _said(got["outside"]) + "\n".join(got["progress"])
        assert not [x for x in IDENTIFIERS if x in said] and str(root) not in said and "ct.dcm" not in said
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
