"""dxagent serve (agent/app/serve.py): the REST API over real traced runs with the scripted planner.

One server in a thread on a real loopback socket (httpx) serves most tests; the token check uses FastAPI's TestClient
(no socket adds anything there); the kill -9 test drives `dxagent serve` as a subprocess, killed mid-run and started
again. No engine is mocked: every run goes through run_case into a trace store that `dxagent trace verify` reads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import call, free_port, start_server
from pydicom.data import get_testdata_file

from agent.app.serve import ServeConfig, create_app
from agent.app.serve_runs import ServeSettings

CT = get_testdata_file("CT_small.dcm")
TISSUE_Q = "What is the tissue composition of this CT slice?"
SCRIPT = [call("ct_tissue_composition")]
IDENTIFIERS = ("CompressedSamples", "1CT1", "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322")  # CT_small's name, ID, UID
LIMIT = 2 << 20


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`create_app` on uvicorn in a thread, 127.0.0.1, two workers, the scripted planner, a 2 MiB upload limit."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "root"
    (root / "case").mkdir(parents=True)
    shutil.copy(CT, root / "case" / "ct.dcm")
    settings = ServeSettings(trace_dir=base / "traces", llm="scripted", script=SCRIPT, workers=2)
    app = create_app(ServeConfig(settings=settings, roots=[root], max_upload_bytes=LIMIT, poll_s=0.05))
    server, t, url = start_server(app)
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        yield type("Live", (), {"client": client, "base": base, "root": root, "traces": base / "traces", "app": app})
    server.should_exit = True
    t.join(timeout=10)


def upload(client: httpx.Client, path: str | Path, question: str = TISSUE_Q, **fields) -> httpx.Response:
    with open(path, "rb") as fh:
        return client.post("/api/runs", files={"file": ("ct.dcm", fh.read())}, data={"question": question, **fields})


def wait(client: httpx.Client, run_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/api/runs/{run_id}").json()
        if r["status"] not in ("queued", "running"):
            return r
        assert time.monotonic() < deadline, f"run {run_id} still {r['status']}"
        time.sleep(0.05)


def sse(client: httpx.Client, run_id: str, last_id: str | None = None) -> list[dict]:
    """The event stream read to its `end`: [{id, event, data}]."""
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    out, cur = [], {}
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=headers, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                if cur.get("data") is not None:
                    out.append(cur)
                    if cur.get("event") == "end":
                        return out
                cur = {}
                continue
            key, _, value = line.partition(":")
            cur[key] = value[1:] if value.startswith(" ") else value
    return out


def uploads(live) -> list[Path]:
    d = live.traces / "uploads"
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


@pytest.fixture(scope="module")
def ct_run(live):
    """One upload of the bundled CT, created over the socket, with the event stream read while it runs."""
    r = upload(live.client, CT)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] in ("queued", "running") and r.headers["location"] == f"/api/runs/{body['id']}"
    events = sse(live.client, body["id"])
    return body["id"], events


def test_upload_streams_in_order_then_report_and_verify(live, ct_run):
    run_id, events = ct_run
    assert events[-1]["event"] == "end" and json.loads(events[-1]["data"])["status"] == "done"
    steps = [json.loads(e["data"]) for e in events[:-1]]
    assert [int(e["id"]) for e in events[:-1]] == [s["seq"] for s in steps] == list(range(len(steps)))
    names = [s["name"] for s in steps]
    assert names.index("intake") < names.index("ct_tissue_composition") < names.index("answer") < names.index("report")
    tool = next(s for s in steps if s["kind"] == "tool")
    assert tool["evidence"]["args"] == {"view": "V1"} and tool["evidence"]["status"] == "ok" and "\n" not in tool["summary"]

    run = live.client.get(f"/api/runs/{run_id}").json()
    assert run["status"] == "done" and run["outcome"] == "report" and "fat" in run["answer"]["value"]
    assert "probability" in run["answer"] and run["events"] == len(steps)
    report = live.client.get(f"/api/runs/{run_id}/report").json()
    assert report["run_id"] == run_id and report["answer"]["evidence_ids"] == ["E1"]
    md = live.client.get(f"/api/runs/{run_id}/report", params={"format": "md"})
    from agent.engine.report import to_markdown

    assert md.headers["content-type"].startswith("text/markdown") and md.text == to_markdown(report)
    verdict = live.client.post(f"/api/runs/{run_id}/verify").json()
    assert verdict["verdict"] == "intact" and verdict["problems"] == [] and verdict["events"] == len(steps)

    arts = live.client.get(f"/api/runs/{run_id}/artifacts").json()
    assert arts and all("_path" not in a for a in arts)
    import hashlib

    blob = live.client.get(arts[0]["url"])
    assert blob.status_code == 200 and hashlib.sha256(blob.content).hexdigest() == arts[0]["sha256"]
    assert live.client.get(f"/api/runs/{run_id}/artifacts/{'0' * 64}.npy").status_code == 404

    # the CLI sees the API's run in the same store, exactly like its own
    from typer.testing import CliRunner

    from agent.app.cli import app

    res = CliRunner().invoke(app, ["trace", "verify", run_id, "--trace-dir", str(live.traces)])
    assert res.exit_code == 0 and "intact" in res.output
    res = CliRunner().invoke(app, ["replay", run_id, "--trace-dir", str(live.traces)])
    assert res.exit_code == 0 and "verified" in res.output, res.output

    # nothing the API says names the patient (CT_small's name, ID and study UID), nor where the upload was kept
    said = json.dumps([run, report, md.text, verdict, arts, steps, live.client.get("/api/runs").json()])
    assert not [x for x in IDENTIFIERS if x in said]
    assert str(live.traces) not in said and "ct.dcm" not in said


def test_reconnect_with_last_event_id_continues_without_repeats(live, ct_run):
    run_id, first = ct_run
    ids = [e["id"] for e in first if e.get("event") != "end"]
    again = sse(live.client, run_id, last_id=ids[2])
    rest = [e["id"] for e in again if e.get("event") != "end"]
    assert rest == ids[3:] and again[-1]["event"] == "end"
    assert [e["id"] for e in sse(live.client, run_id, last_id=ids[-1]) if e.get("event") != "end"] == []


def test_path_inside_the_root_runs_and_outside_is_refused(live, tmp_path):
    c = live.client
    r = c.post("/api/runs", json={"path": "case/ct.dcm", "question": TISSUE_Q})
    assert r.status_code == 202, r.text
    assert r.json()["source"] == "path" and wait(c, r.json()["id"])["status"] == "done"

    outside = tmp_path / "outside.dcm"
    shutil.copy(CT, outside)
    (live.root / "link.dcm").symlink_to(outside)
    (live.root / "linkdir").mkdir()
    (live.root / "linkdir" / "a.dcm").symlink_to(outside)
    before = len(c.get("/api/runs").json())
    for path in (str(outside), "../outside.dcm", "link.dcm", "linkdir", "/etc/passwd"):
        r = c.post("/api/runs", json={"path": path})
        assert r.status_code == 403, (path, r.text)
        assert set(r.json()) == {"detail"} and "outside the served roots" in r.json()["detail"]
        assert str(outside) not in r.text
    assert c.post("/api/runs", json={"path": "case/none.dcm"}).status_code == 404
    (live.root / "case" / "notes.txt").write_text("not an image at all\n" * 10)
    (live.root / "empty").mkdir()
    for path, why in (("case/notes.txt", "not an image"), ("empty", "holds no image")):
        r = c.post("/api/runs", json={"path": path})  # refused up front, like a non-image upload: nothing queued
        assert r.status_code == 400 and why in r.json()["detail"], (path, r.text)
    assert c.post("/api/runs", json={"question": "no path"}).status_code == 400
    bad = c.post("/api/runs", json={"path": "case/ct.dcm", "max_steps": 0})
    assert bad.status_code == 422 and "max_steps" in bad.json()["detail"] and "\n" not in bad.json()["detail"]
    assert c.post("/api/runs", json={"path": "dicomweb://pacs.example/x?study=not-a-uid"}).status_code == 400
    assert len(c.get("/api/runs").json()) == before  # nothing accepted


def test_uploads_that_are_refused_keep_nothing(live, tmp_path):
    c = live.client
    kept = uploads(live)
    big = tmp_path / "big.dcm"
    big.write_bytes(b"\0" * (LIMIT + 1))
    r = c.post("/api/runs", files={"file": ("big.dcm", big.read_bytes())})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the server counts the stream and stops reading at the limit
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.dcm\"\r\n\r\n"
        for _ in range(LIMIT // 65536 + 2):
            yield b"\0" * 65536

    r = c.post("/api/runs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n" * 10)
    r = c.post("/api/runs", files={"file": ("notes.txt", text.read_bytes())})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    r = c.post("/api/runs", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed upload")
    r = c.post("/api/runs", data={"question": "no file"}, files={"other": (None, "x")})
    assert r.status_code == 400
    assert c.post("/api/runs", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    zf = tmp_path / "bad.zip"
    with zipfile.ZipFile(zf, "w") as z:
        z.writestr("a.txt", "hello")
    assert c.post("/api/runs", files={"file": ("s.zip", zf.read_bytes())}).status_code == 400
    assert uploads(live) == kept and not list((live.traces / "uploads" / ".incoming").glob("*"))


def test_a_truncated_image_fails_its_run_in_one_line(live, tmp_path):
    png = tmp_path / "broken.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # passes the upload check (its magic), fails to decode
    r = live.client.post("/api/runs", files={"file": ("patient_DOE.png", png.read_bytes())}, data={"question": "?"})
    assert r.status_code == 202
    run = wait(live.client, r.json()["id"])
    assert run["status"] == "failed" and run["error"] and "\n" not in run["error"] and "DOE" not in run["error"]


def test_a_zipped_series_runs(live, tmp_path):
    zf = tmp_path / "series.zip"
    with zipfile.ZipFile(zf, "w") as z:
        z.write(CT, "MRN123_DOE/slice1.dcm")
        z.writestr("__MACOSX/._slice1.dcm", b"junk")
    r = live.client.post("/api/runs", files={"file": ("series.zip", zf.read_bytes())}, data={"question": TISSUE_Q})
    assert r.status_code == 202, r.text
    assert wait(live.client, r.json()["id"])["status"] == "done"
    assert not [p for p in uploads(live) if "DOE" in str(p) or "slice1" in str(p)]


def test_twenty_concurrent_runs_none_lost(live):
    def post(_):
        with httpx.Client(base_url=str(live.client.base_url), timeout=60, trust_env=False) as c:
            return upload(c, CT)

    with ThreadPoolExecutor(20) as pool:
        resp = list(pool.map(post, range(20)))
    assert [r.status_code for r in resp] == [202] * 20
    ids = [r.json()["id"] for r in resp]
    assert len(set(ids)) == 20
    runs = [wait(live.client, i, timeout=120) for i in ids]
    assert [r["status"] for r in runs] == ["done"] * 20
    spans = sorted((r["started_at"], r["finished_at"]) for r in runs)
    most = max(sum(1 for s, f in spans if s <= t < f) for t, _ in spans)
    assert most <= 2  # --workers 2: never more at once
    from agent.store.trace import TraceStore

    store = TraceStore(None, live.traces)
    assert all(store.get_run(i).status == "done" and store.verify_chain(i) is None for i in ids)


def batch_events(client: httpx.Client, batch_id: str) -> list[tuple[str, dict]]:
    """A batch's event stream read to its `end`: [(event, data)]."""
    out, event = [], None
    with client.stream("GET", f"/api/batches/{batch_id}/events", timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                out.append((event, json.loads(line.partition(":")[2])))
                if event == "end":
                    return out
    return out


def test_a_batch_runs_each_row_in_the_queue_and_a_bad_row_fails_alone(live, tmp_path):
    c = live.client
    (live.root / "case" / "broken_DOE.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # queued; fails when run
    (live.root / "batch.csv").write_text(f"case_id,image,question,labels\nMRN1,case/ct.dcm,{TISSUE_Q},fat\n"
                                         f"MRN2,case/MRN42.dcm,,\nMRN3,../outside.dcm,,\n"
                                         f"MRN4,case/broken_DOE.png,{TISSUE_Q},\nMRN5,case/ct.dcm,,\n"
                                         "MRN1,case/ct.dcm,,\n")
    r = c.post("/api/batches", json={"manifest": "batch.csv", "question": TISSUE_Q})
    assert r.status_code == 202, r.text
    b = r.json()
    assert r.headers["location"] == f"/api/batches/{b['id']}" and b["source"] == "path"
    assert [x["status"] for x in b["rows"]][1:3] == ["invalid", "invalid"] and b["counts"]["invalid"] == 3
    assert "no such file" in b["rows"][1]["error"] and "escapes" in b["rows"][2]["error"]
    assert b["rows"][5]["error"] == "row 7: its case id repeats an earlier row's"
    ids = [x["run_id"] for x in b["rows"] if x["run_id"]]
    assert len(ids) == 3 and all(c.get(f"/api/runs/{i}").json()["batch"] == b["id"] for i in ids)  # ordinary runs

    events = batch_events(c, b["id"])
    kinds = [e for e, _ in events]
    assert kinds[0] in ("progress", "row") and kinds[-1] == "end" and "row" in kinds
    finals = {d["n"]: d["status"] for e, d in events if e == "row"}
    assert finals == {1: "done", 4: "failed", 5: "done"}  # each row's last move, streamed
    summary = events[-1][1]["summary"]
    assert summary["counts"] == {"queued": 0, "running": 0, "done": 2, "failed": 1, "cancelled": 0, "interrupted": 0,
                                 "invalid": 3}
    assert summary["outcomes"] == {"report": 2} and summary["agreement"][0]["label"] == "fat"

    got = c.get(f"/api/batches/{b['id']}").json()
    assert got["status"] == "finished" and got["summary"] == summary
    failed = got["rows"][3]
    assert failed["status"] == "failed" and failed["error"] and "\n" not in failed["error"]
    assert c.post(f"/api/runs/{ids[0]}/verify").json()["verdict"] == "intact"
    assert c.get("/api/batches").json()[0]["id"] == b["id"]
    said = json.dumps([b, events, got, c.get("/api/batches").json()])
    for leak in ("ct.dcm", "MRN", "DOE", "outside.dcm", str(live.root), *IDENTIFIERS):
        assert leak not in said, leak

    # an uploaded manifest (JSONL; relative to the first root), a bad line is that row's; cancel drops queued rows
    manifest = b"\n".join([b'{"image": "case/ct.dcm"}', b"not json"]
                           + [b'{"image": "case/ct.dcm", "case_id": "c%d"}' % i for i in range(8)])
    r = c.post("/api/batches", files={"manifest": ("m.jsonl", manifest)}, data={"question": TISSUE_Q})
    assert r.status_code == 202, r.text
    up = r.json()
    assert up["source"] == "upload" and up["rows"][1] == {"n": 2, "where": "line 2", "run_id": None,
                                                          "status": "invalid", "error": up["rows"][1]["error"]}
    cancelled = c.post(f"/api/batches/{up['id']}/cancel").json()
    assert cancelled["cancelled"] + cancelled["cancelling"] >= 7
    end = batch_events(c, up["id"])[-1][1]["summary"]["counts"]
    assert end["cancelled"] + end["done"] == 9 and end["cancelled"] >= 7
    assert c.post(f"/api/batches/{up['id']}/resume").status_code == 202  # the dropped rows queued again, from the start
    assert batch_events(c, up["id"])[-1][1]["summary"]["counts"]["done"] == 9


def test_a_malformed_batch_is_one_line_and_queues_nothing(live):
    c = live.client
    before = len(c.get("/api/runs").json())
    (live.root / "nocol.csv").write_text("foo,bar\n1,2\n")
    (live.root / "norun.csv").write_text("image\ncase/none.dcm\n")
    for body, status, why in (({"manifest": "nocol.csv"}, 400, "image column"),
                              ({"manifest": "norun.csv"}, 400, "no row that can run"),
                              ({"manifest": "none.csv"}, 404, "no such file"),
                              ({"manifest": "/etc"}, 403, "outside the served roots"),
                              ({"manifest": "dicomweb://pacs.example/x?bogus=1"}, 400, "unknown query parameter"),
                              ({}, 422, "manifest")):
        r = c.post("/api/batches", json=body)
        assert r.status_code == status and why in r.json()["detail"], (body, r.text)
        assert set(r.json()) == {"detail"} and "\n" not in r.json()["detail"] and str(live.root) not in r.text
    r = c.post("/api/batches", files={"manifest": ("m.csv", b"foo\n1\n")})
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed manifest") and ".incoming" not in r.text
    assert c.post("/api/batches", data={"question": "x"}, files={"other": (None, "x")}).status_code == 400
    assert c.get("/api/batches/batch-nope").status_code == 404
    assert len(c.get("/api/runs").json()) == before


def test_token_is_required_and_checked(tmp_path):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from agent.app.cli import app as cli

    token = "t0k3n-" + "x" * 20
    settings = ServeSettings(trace_dir=tmp_path / "traces", llm="scripted", script=SCRIPT)
    with TestClient(create_app(ServeConfig(settings=settings, roots=[tmp_path], token=token))) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}, {"Authorization": f"Basic {token}"}):
            r = c.get("/api/runs", headers=headers)
            assert r.status_code == 401 and set(r.json()) == {"detail"} and "\n" not in r.json()["detail"]
        assert c.post("/api/runs", files={"file": ("x", b"y")}).status_code == 401
        assert c.get("/openapi.json").status_code == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert c.get("/api/runs", headers=ok).json() == []
        schema = c.get("/openapi.json", headers=ok).json()
        assert {"/api/runs/{run_id}/events", "/api/batches", "/api/batches/{batch_id}/events"} <= set(schema["paths"])
    env = {k: v for k, v in os.environ.items() if k != "DXAGENT_SERVE_TOKEN"}
    res = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--trace-dir", str(tmp_path)], env=env)
    assert res.exit_code == 2 and "DXAGENT_SERVE_TOKEN" in res.output and res.output.strip().count("\n") == 0
    res = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"], env={**env, "DXAGENT_SERVE_TOKEN": "short"})
    assert res.exit_code == 2 and "16" in res.output
    res = CliRunner().invoke(cli, ["serve", "--workers", "2", "--llm", "local"], env=env)
    assert res.exit_code == 2 and "--workers" in res.output


LAUNCHER = """
import os, sys, time
from agent.llm import backends
_generate = backends.ScriptedChat._generate
def slow(self, *a, **k):  # a planner that thinks for SLOW_PLANNER_S seconds
    time.sleep(float(os.environ.get("SLOW_PLANNER_S", "0")))
    return _generate(self, *a, **k)
backends.ScriptedChat._generate = slow
from agent.app.cli import app
app(sys.argv[1:], prog_name="dxagent")
"""


def test_kill_9_mid_run_then_restart_loses_nothing(tmp_path):
    script = tmp_path / "script.jsonl"
    script.write_text("\n".join(SCRIPT) + "\n")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    port, traces = free_port(), tmp_path / "traces"
    cmd = [sys.executable, str(launcher), "serve", "--llm", "scripted", "--script", str(script), "--port", str(port),
           "--trace-dir", str(traces), "--root", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}

    def start(slow: float) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env={**env, "SLOW_PLANNER_S": str(slow)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=1, trust_env=False).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    shutil.copy(CT, tmp_path / "ct.dcm")
    (tmp_path / "batch.csv").write_text("case_id,image\na,ct.dcm\nb,ct.dcm\n")
    ask = {"path": "ct.dcm", "question": TISSUE_Q, "route": False}  # not routed: the (slow) planner decides
    proc = start(slow=4)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as c:
            cancelled = c.post("/api/runs", json=ask).json()["id"]
            batch = c.post("/api/batches", json={"manifest": "batch.csv", **ask}).json()["id"]  # two rows, two runs
            killed, second = [row["run_id"] for row in c.get(f"/api/batches/{batch}").json()["rows"]]
            queued = c.post("/api/runs", json=ask).json()["id"]
            dropped = c.post("/api/runs", json=ask).json()["id"]
            assert c.post(f"/api/runs/{dropped}/cancel").json()["status"] == "cancelled"  # queued: dropped
            deadline = time.monotonic() + 30
            while c.get(f"/api/runs/{cancelled}").json()["events"] in (None, 0):  # running: thinking for 4 s
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.post(f"/api/runs/{cancelled}/cancel").json()["status"] == "cancelling"
            assert wait(c, cancelled, 20)["status"] == "cancelled"
            assert c.post(f"/api/runs/{cancelled}/verify").json()["verdict"] == "intact"  # sealed as cancelled
            while c.get(f"/api/runs/{killed}").json()["events"] in (None, 0):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.get(f"/api/runs/{queued}").json()["status"] == "queued"
            assert c.get(f"/api/batches/{batch}").json()["counts"] == {
                "queued": 1, "running": 1, "done": 0, "failed": 0, "cancelled": 0, "interrupted": 0, "invalid": 0}
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its tool worker, mid-run
        proc.wait(timeout=10)
        proc = start(slow=0)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as c:
            assert wait(c, queued)["status"] == "done"  # the queue survived the kill
            run = c.get(f"/api/runs/{killed}").json()
            assert run["status"] == "interrupted" and "\n" not in run["error"]
            assert c.post(f"/api/runs/{killed}/verify").json()["verdict"] == "INCOMPLETE"
            assert c.get(f"/api/runs/{dropped}").json()["status"] == "cancelled"
            assert wait(c, second)["status"] == "done"  # the batch's queued row started after the restart
            rows = c.get(f"/api/batches/{batch}").json()["rows"]
            assert [(r["run_id"], r["status"]) for r in rows] == [(killed, "interrupted"), (second, "done")]
            assert c.post(f"/api/batches/{batch}/resume").status_code == 202  # its interrupted row, from its checkpoint
            assert wait(c, killed)["status"] == "done"
            assert c.post(f"/api/runs/{killed}/verify").json()["verdict"] == "intact"
            assert c.get(f"/api/batches/{batch}").json()["summary"]["counts"]["done"] == 2
            assert c.post(f"/api/runs/{queued}/resume").status_code == 409
            assert c.post(f"/api/batches/{batch}/resume").status_code == 409  # nothing left to resume
            listed = {r["id"]: r["status"] for r in c.get("/api/runs").json()}
            assert listed == {cancelled: "cancelled", killed: "done", second: "done", queued: "done",
                              dropped: "cancelled"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
