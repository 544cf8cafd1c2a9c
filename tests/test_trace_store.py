"""The trace store as a shared database (issue 35): many writers at once, the versioned schema, a database that goes
away mid-run, and a batch whose workers write to PostgreSQL. The store tests run on SQLite and PostgreSQL (the
`where` fixture); a throwaway PostgreSQL server is started by the tests (tests/pgcluster.py) and they skip, saying
why, where none can be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import StoreAt, call, start_server, wait_for
from pydicom.data import get_testdata_file

from agent.store.trace import SCHEMA_VERSION, SchemaError, TraceStore, event_hash, sha256_text, verify_dump

CT = get_testdata_file("CT_small.dcm")
ROOT = Path(__file__).resolve().parents[1]
DXAGENT = [sys.executable, "-m", "agent.app.cli"]
TISSUE_Q = "How much fat is in this slice?"

WRITER = """
import sys, time
from pathlib import Path
from agent.core.state import ArtifactRef
from agent.store.trace import TraceStore

url, root, gate, me = sys.argv[1] or None, sys.argv[2], Path(sys.argv[3]), sys.argv[4]
s = TraceStore(url, root)
(gate / me).touch()
end = time.time() + 60
while len(list(gate.iterdir())) < 8 and time.time() < end:  # all eight start writing together
    time.sleep(0.01)
refs = [ArtifactRef(sha256=f"{i:02d}" * 32, kind="overlay", media_type="image/png", path=f"{i:02d}/x.png")
        for i in range(3)]
for n in range(5):
    rid = f"run-{me}-{n}"
    s.start_run(rid, "c", "q", "m", "json", "0" * 64, {})
    for ref in refs:  # every writer adds the same three artifacts
        s.add_artifact(ref, 10)
        s.record(rid, "tool", "act", "t", {"evidence": {"artifacts": [ref.model_dump()]}})
    report = {"writer": me, "n": n}
    s.record(rid, "node", "report", "report", {"report": report})
    s.finish_run(rid, "done", report=report)
print("ok")
"""


def test_eight_processes_seal_runs_with_identical_artifacts(where):
    """Eight writer processes at once, each sealing five runs that add the same three artifacts: every run is there
    and intact, each artifact has one row, no writer failed."""
    gate = where.dir / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, where.url or "", str(where.dir), str(gate), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 and o.strip() == "ok" for p, (o, _) in zip(procs, outs, strict=True)), outs
    store = where.store()
    runs = store.runs(1000)
    assert sorted(r.id for r in runs) == sorted(f"run-{i}-{n}" for i in range(8) for n in range(5))
    for r in runs:
        dump = store.dump(r.id)
        assert verify_dump(dump, None) == [], r.id
        assert len(dump["events"]) == 4 and not any(a.get("missing_row") for a in dump["artifacts"])
    assert where.sql("SELECT count(*) FROM artifact")[0][0] == 3
    assert where.sql("SELECT count(*) FROM event")[0][0] == 40 * 4


def test_writers_of_one_run_take_its_numbers_in_turn(where):
    """Eight threads, each with its own store object (no lock shared in the process), append to one run: the
    database hands out the numbers one writer at a time, so the chain has no gap, no duplicate and verifies."""
    where.store().start_run("r", "c", "q", "m", "json", "0" * 64, {})
    stores = [where.store() for _ in range(8)]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: stores[i % 8].record("r", "note", "n", "n", {"i": i}), range(48)))
    store = where.store()
    store.finish_run("r", "failed", error="stopped by the test")
    assert [e.seq for e in store.events("r")] == list(range(48))
    assert sorted(json.loads(e.payload)["i"] for e in store.events("r")) == list(range(48))
    assert verify_dump(store.dump("r"), None) == []


# -- the versioned schema -----------------------------------------------------------------------------------------

def _old_store(at: StoreAt) -> str:
    """A store as dxagent wrote it before the schema was versioned: no dxagent_schema row, no settings, seal, chain
    or owner columns, no unique (run, seq) index; one finished run with a version-1 chain (hashes without t)."""
    serial = "SERIAL" if at.url else "INTEGER"
    for ddl in ("CREATE TABLE run (id VARCHAR NOT NULL PRIMARY KEY, case_id VARCHAR NOT NULL, created_at VARCHAR NOT "
                "NULL, finished_at VARCHAR, status VARCHAR NOT NULL, question VARCHAR NOT NULL, llm VARCHAR NOT NULL, "
                "planner_mode VARCHAR NOT NULL, inputs_sha256 VARCHAR NOT NULL, versions VARCHAR NOT NULL, report "
                "VARCHAR, error VARCHAR)",
                f"CREATE TABLE event (id {serial} PRIMARY KEY, run_id VARCHAR NOT NULL REFERENCES run (id), seq INTEGER "
                "NOT NULL, kind VARCHAR NOT NULL, node VARCHAR NOT NULL, name VARCHAR NOT NULL, payload VARCHAR NOT "
                "NULL, payload_sha256 VARCHAR NOT NULL, prev_hash VARCHAR NOT NULL, hash VARCHAR NOT NULL, t FLOAT "
                "NOT NULL)",
                "CREATE TABLE artifact (sha256 VARCHAR NOT NULL PRIMARY KEY, kind VARCHAR NOT NULL, media_type VARCHAR "
                "NOT NULL, path VARCHAR NOT NULL, bytes INTEGER NOT NULL)"):
        at.sql(ddl)
    at.sql("INSERT INTO run (id, case_id, created_at, finished_at, status, question, llm, planner_mode, "
           "inputs_sha256, versions, report) VALUES ('old', 'c', '2026-01-01', '2026-01-01', 'failed', 'q', 'm', "
           "'json', '', '{}', NULL)")
    prev = "0" * 64
    for seq in range(2):
        body = json.dumps({"i": seq}, separators=(",", ":"))
        h = event_hash(prev, "old", seq, "note", "n", "n", sha256_text(body))
        at.sql("INSERT INTO event (run_id, seq, kind, node, name, payload, payload_sha256, prev_hash, hash, t) "
               "VALUES ('old', ?, 'note', 'n', 'n', ?, ?, ?, ?, 0)", seq, body, sha256_text(body), prev, h)
        prev = h
    return "old"


def test_a_new_store_is_created_at_the_current_version(where):
    store = where.store()
    assert store.schema_from is None
    assert where.sql("SELECT id, version FROM dxagent_schema") == [(1, SCHEMA_VERSION)]
    assert where.store().schema_from == SCHEMA_VERSION  # opened again: nothing to do


def test_a_store_from_before_versioning_is_upgraded(where):
    """`dxagent trace upgrade` (opening does the same) adds what the old store lacks and stamps the version; the
    old run keeps its verdict (unsealed, its version-1 chain intact) and new runs are written and sealed."""
    old = _old_store(where)
    r = subprocess.run(DXAGENT + ["trace", "upgrade", *where.cli()], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "upgraded from an unversioned store (version 0)" in r.stdout, r.stdout + r.stderr
    assert where.sql("SELECT version FROM dxagent_schema") == [(SCHEMA_VERSION,)]
    store = where.store()
    assert store.schema_from == SCHEMA_VERSION
    problems = verify_dump(store.dump(old), None)
    assert problems == ["run is failed but not sealed (written by an older dxagent, or the seal removed)"], problems
    store.start_run("new", "c", "q", "m", "json", "0" * 64, {})
    store.record("new", "note", "n", "n", {})
    store.finish_run("new", "failed", error="x")
    assert verify_dump(store.dump("new"), None) == [] and store.get_run("new").owner
    with pytest.raises(Exception, match="(?i)unique|duplicate"):  # one event per (run, seq) now holds
        where.sql("INSERT INTO event (run_id, seq, kind, node, name, payload, payload_sha256, prev_hash, hash, t) "
                  "VALUES ('new', 0, 'note', 'n', 'n', '{}', '', '', '', 0)")


def test_a_store_from_a_newer_dxagent_is_refused_in_one_line(where):
    where.store()
    where.sql("UPDATE dxagent_schema SET version = ?", SCHEMA_VERSION + 1)
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this dxagent's"):
        where.store()
    r = subprocess.run(DXAGENT + ["trace", "list", *where.cli()], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "upgrade dxagent" in r.stderr, r.stderr


# -- PostgreSQL only ----------------------------------------------------------------------------------------------

def test_trace_uid_finds_the_run_on_postgresql(pg, tmp_path):
    at = StoreAt(tmp_path, pg.new_database(), pg)
    store = at.store()
    store.start_run("r", "c", "q", "m", "json", "0" * 64, {})
    store.finish_run("r", "failed", error="x")
    store.note_export("r", {"objects": [{"kind": "SEG", "sop_instance_uid": "1.2.3.4", "evidence": "E2",
                                         "tool": "ct_tissue_composition"}]})
    r = subprocess.run(DXAGENT + ["trace", "uid", "1.2.3.4", *at.cli()], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "run r" in r.stdout and "E2" in r.stdout, r.stdout + r.stderr
    assert verify_dump(store.dump("r"), None) == []  # resealed with its export event


def test_a_batch_of_two_workers_writes_to_postgresql(pg, tmp_path):
    """dxagent batch's own path (spawned worker processes) with the store and the checkpoints in PostgreSQL: every
    run sealed and intact there, no SQLite file written."""
    from agent.app.batch import run_batch

    url = pg.new_database()
    m = tmp_path / "m.jsonl"
    (tmp_path / "ct.dcm").write_bytes(Path(CT).read_bytes())
    m.write_text("".join(json.dumps({"case_id": f"c{i}", "image": "ct.dcm"}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    s = run_batch(m, out, workers=2, llm="scripted", script=[call("ct_tissue_composition")], question=TISSUE_Q,
                  db_url=url)
    assert s.counts == {"done": 2}, [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    store = TraceStore(url, out / "traces")
    runs = store.runs()
    assert len(runs) == 2 and all(verify_dump(store.dump(r.id), out / "traces" / "artifacts") == [] for r in runs)
    assert not list((out / "traces").glob("*.sqlite"))
    assert StoreAt(out, url, pg).sql("SELECT count(DISTINCT thread_id) FROM checkpoints")[0][0] == 2


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from helpers import Gate, call
from agent.engine.session import DxError, run_case, tools
try:
    run_case([{ct!r}], {q!r}, llm="scripted", trace_dir={td!r}, db_url={url!r}, run_id="run-stop", route=False,
             script=[call("inspect_image"), call("gate"), call("ct_tissue_composition")],
             tool_set={{**tools(), "gate": Gate()}})
except DxError as exc:
    print(f"error: {{exc}}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture
def pg_own(pg):
    """A PostgreSQL server of the test's own, to stop and start (the session's one stays up)."""
    from pgcluster import PgCluster

    cluster = PgCluster().start()
    yield cluster
    cluster.destroy()


def test_the_database_stopped_mid_run(pg_own, tmp_path):
    """The server stops while a run is inside a tool: the run fails within seconds with one line naming the
    database, and is not sealed; a batch case meeting the stopped server is a failed record with that line (the
    batch goes on); once the server is back the run reads as interrupted (verify: incomplete) and --resume finishes
    and seals it."""
    from helpers import Gate

    from agent.app.executors import CaseSpec, run_one
    from agent.engine.session import run_case, tools

    url = pg_own.new_database()
    gate = tmp_path / "gate"
    gate.write_text("closed")
    code = CHILD.format(tests=str(Path(__file__).parent), ct=CT, q=TISSUE_Q, td=str(tmp_path / "tr"), url=url)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "DXAGENT_TEST_GATE": str(gate)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        wait_for(str(gate) + ".entered")  # the run sits in the gate tool: E1 recorded, E2 running
        pg_own.stop("fast")
        gate.unlink()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.monotonic() - t0
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"the trace database {url.replace('postgresql://', 'postgresql+psycopg://')} is unavailable" in lines[0]
    assert "run-stop is left unsealed" in lines[0] and took < 30, (took, lines)

    # a batch case while the server is down: one failed record with the one line, in bounded time
    t0 = time.monotonic()
    rec = run_one(vars(CaseSpec("c1", [CT])), {"out": str(tmp_path / "batch"), "llm": "scripted", "db_url": url,
                                              "script": [call("ct_tissue_composition")], "question": TISSUE_Q})
    assert rec["status"] == "failed" and "is unavailable" in rec["error"] and "\n" not in rec["error"], rec
    assert time.monotonic() - t0 < 30

    pg_own.start_server()
    store = TraceStore(url, tmp_path / "tr")
    assert store.get_run("run-stop").status == "running" and store.mark_interrupted() == ["run-stop"]
    problems = verify_dump(store.dump("run-stop"), None)
    assert problems and problems[0].startswith("incomplete: the run was interrupted"), problems
    res = run_case(llm="scripted", script=[call("ct_tissue_composition")], trace_dir=tmp_path / "tr", db_url=url,
                   resume="run-stop", tool_set={**tools(), "gate": Gate()})
    assert [e.tool for e in res.state.evidence] == ["inspect_image", "gate", "ct_tissue_composition"]
    assert verify_dump(store.dump("run-stop"), tmp_path / "tr" / "artifacts") == []


def test_serve_runs_concurrent_runs_into_postgresql(pg, tmp_path):
    """`dxagent serve` with --db-url: six uploads at once on two workers, each run's engine sharing the process's
    pools (trace store and checkpointer): every run done, sealed and intact in PostgreSQL."""
    import httpx

    from agent.app.serve import ServeConfig, create_app
    from agent.app.serve_runs import ServeSettings

    url = pg.new_database()
    root = tmp_path / "root"
    root.mkdir()
    settings = ServeSettings(trace_dir=tmp_path / "traces", db_url=url, llm="scripted",
                             script=[call("ct_tissue_composition")], workers=2)
    app = create_app(ServeConfig(settings=settings, roots=[root], poll_s=0.05))
    server, t, base = start_server(app)
    try:
        def post(_):
            with httpx.Client(base_url=base, timeout=60, trust_env=False) as c:
                return c.post("/api/runs", files={"file": ("ct.dcm", Path(CT).read_bytes())},
                              data={"question": TISSUE_Q}).json()["id"]

        with ThreadPoolExecutor(6) as ex:
            ids = list(ex.map(post, range(6)))
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as c:
            end = time.monotonic() + 120
            while any(c.get(f"/api/runs/{i}").json()["status"] in ("queued", "running") for i in ids):
                assert time.monotonic() < end, "runs still going"
                time.sleep(0.1)
            assert [c.get(f"/api/runs/{i}").json()["status"] for i in ids] == ["done"] * 6
    finally:
        server.should_exit = True
        t.join(timeout=10)
    store = TraceStore(url, tmp_path / "traces")
    assert all(verify_dump(store.dump(i), tmp_path / "traces" / "artifacts") == [] for i in ids)
    assert not list((tmp_path / "traces").glob("*.sqlite"))
