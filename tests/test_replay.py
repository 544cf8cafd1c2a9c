"""Trace replay and audit (issue 6): bit-identical replay, divergence at the right step, tamper evidence for
each kind of edit, exports, re-run and diff, and the golden traces in traces/golden/. Every test of a store runs on
SQLite and on PostgreSQL (the `store_kind` fixture; PostgreSQL tests skip where no server can be started)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Boom, StoreAt, call
from pydicom.data import get_testdata_file

from agent.engine.replay import replay, report_sha256, rerun
from agent.engine.session import run_case, tools
from agent.store.trace import TraceStore, load_dump, trajectories, verify_dump

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
GOLDEN = Path(__file__).resolve().parents[1] / "traces" / "golden"
DXAGENT = [sys.executable, "-m", "agent.app.cli"]
Q = "How much fat is in this slice?"  # only the last call (ct_tissue_composition) addresses it
SCRIPT = [call("inspect_image"), call("region_measure"), call("region_measure"),  # the repeat is "skipped"
          call("boom"), call("crop_zoom", bbox=[17, 24, 64, 64]),  # an invented box: rejected and re-asked
          call("crop_zoom", bbox=[0, 88, 68, 128]), call("ct_tissue_composition")]
TOOLS = {**tools(), "boom": Boom()}


@pytest.fixture(scope="module")
def recorded(store_kind, tmp_path_factory, request):
    """One scripted run that visits every act path: ok, skipped repeat, a throwing tool, a new view, a measurement."""
    d = tmp_path_factory.mktemp("trace")
    if store_kind == "sqlite":
        at = StoreAt(d)
    else:
        pg = request.getfixturevalue("pg")
        at = StoreAt(d, pg.new_database(), pg)
    res = run_case([CT], Q, llm="scripted", script=SCRIPT, **at.kw(), tool_set=TOOLS, max_steps=6, route=False)
    return at, res


def fresh_copy(recorded, tmp_path) -> tuple[StoreAt, str]:
    at, res = recorded
    return at.copy(tmp_path / "t"), res.run_id


def test_replay_is_verified_and_the_report_identical(recorded):
    at, res = recorded
    statuses = [e.status for e in res.state.evidence]
    assert statuses == ["ok", "ok", "skipped", "failed", "ok", "ok"]
    dump = at.store().dump(res.run_id)
    out = replay(dump, tools=TOOLS)
    assert out.verified, f"{out.divergence}\n{out.divergence and out.divergence.diff()}"
    assert out.events == len(dump["events"]) and out.llm_calls == 7 and out.tool_calls == 6
    assert res.state.evidence[4].new_views == ["V2"]
    assert out.report == res.report and out.report_sha256 == report_sha256(res.report)


def test_replay_loads_no_model_and_reads_no_pixels(recorded, monkeypatch):
    """Every tool and the LLM are served: a tool's run() or a pixel read would fail the replay."""
    at, res = recorded

    def no(*_a, **_k):
        raise AssertionError("replay ran a tool")

    for t in TOOLS.values():
        monkeypatch.setattr(t, "run", no)
    import agent.imaging.views as imaging

    monkeypatch.setattr(imaging, "load_views", no)
    assert replay(at.store().dump(res.run_id), tools=TOOLS).verified


def test_a_changed_tool_output_diverges_at_the_next_request(recorded):
    at, res = recorded
    dump = at.store().dump(res.run_id)
    tool_evs = [e for e in dump["events"] if e["kind"] == "tool" and e["name"] == "region_measure"]
    out0 = tool_evs[0]["payload"]["evidence"]["output"]
    area = out0["area"]
    out0["area"] = round(area * 1.5, 3)  # the recorded output says something else than the run saw
    rep = replay(dump, tools=TOOLS)
    assert not rep.verified
    nxt = next(e for e in dump["events"] if e["seq"] > tool_evs[0]["seq"] and e["kind"] == "llm")
    # the first thing built from the changed output is the next planner request, whose prompt now differs
    assert rep.divergence.seq == nxt["seq"] and "llm think decision" in rep.divergence.where
    diff = rep.divergence.diff()
    assert f"{round(area * 1.5, 3):g}"[:4] in diff and "request.messages[1].content" in diff


def test_changed_code_diverges_where_it_acts(recorded, monkeypatch):
    """A behaviour change in the graph (here: the critic) shows up at the first event it changes."""
    at, res = recorded
    import agent.engine.critic as critic

    real = critic.critique

    def louder(state, tools, now=None):
        c = real(state, tools, now)
        return c.model_copy(update={"suggestions": c.suggestions + ["look again"]})

    monkeypatch.setattr(critic, "critique", louder)
    rep = replay(at.store().dump(res.run_id), tools=TOOLS)
    assert not rep.verified and "node rethink critique" in rep.divergence.where
    assert "look again" in rep.divergence.diff()


def test_a_different_llm_reply_diverges(recorded):
    at, res = recorded
    dump = at.store().dump(res.run_id)
    llm = [e for e in dump["events"] if e["kind"] == "llm"]
    llm[1]["payload"]["response"]["content"] = call("texture_features")
    rep = replay(dump, tools=TOOLS)
    assert not rep.verified and rep.divergence.seq == llm[1]["seq"]


# -- tamper evidence ----------------------------------------------------------------------------------------------

def _problems(at: StoreAt, run_id: str) -> list[str]:
    return verify_dump(at.store().dump(run_id), at.artifacts)


def test_an_intact_run_verifies(recorded):
    at, res = recorded
    assert _problems(at, res.run_id) == []
    row = at.store().get_run(res.run_id)
    assert row.seal and row.n_events == len(at.store().events(res.run_id))


@pytest.mark.parametrize("edit, expect", [
    ("UPDATE event SET payload = replace(payload, '\"status\":\"ok\"', '\"status\":\"failed\"') "
     "WHERE run_id = ? AND seq = 3", "payload edited"),  # seq 3: E1, the first tool event
    ("UPDATE event SET payload = replace(payload, 'region_measure', 'regionXmeasure'), "
     "payload_sha256 = 'x' WHERE run_id = ? AND seq = 3", "payload edited"),
    ("UPDATE event SET t = t + 60 WHERE run_id = ? AND seq = 2", "hash chain broken"),
    ("DELETE FROM event WHERE run_id = ? AND seq = 5", "where 5 was expected"),
    ("DELETE FROM event WHERE run_id = ? AND seq = (SELECT max(seq) FROM event WHERE run_id = ?)", "deleted or appended"),
    ("UPDATE run SET report = replace(report, '\"impression\":\"', '\"impression\":\"No finding. ') WHERE id = ?",
     "run row edited"),
    ("UPDATE run SET question = 'something else' WHERE id = ?", "run row edited"),
])
def test_each_kind_of_edit_is_detected(recorded, tmp_path, edit, expect):
    at, run_id = fresh_copy(recorded, tmp_path)
    at.sql(edit, *[run_id] * edit.count("?"))
    problems = _problems(at, run_id)
    assert any(expect in p for p in problems), problems


def test_an_inserted_event_with_a_rewritten_chain_is_caught_by_the_seal(recorded, tmp_path):
    """Even a forger who inserts an event and recomputes every later hash is caught: the seal holds the head."""
    from agent.store.trace import canonical, event_hash, sha256_text

    at, run_id = fresh_copy(recorded, tmp_path)
    evs = at.store().events(run_id)
    # renumber in two steps: one unique (run, seq) at a time, as a forger with write access would
    at.sql("UPDATE event SET seq = seq + 100000 WHERE run_id = ? AND seq >= 3", run_id)
    at.sql("UPDATE event SET seq = seq - 99999 WHERE run_id = ? AND seq >= 100000", run_id)
    body = canonical({"note": "inserted"})
    at.sql("INSERT INTO event (run_id, seq, kind, node, name, payload, payload_sha256, prev_hash, hash, t) "
           "VALUES (?, 3, 'note', 'x', 'x', ?, ?, '', '', ?)", run_id, body, sha256_text(body), evs[2].t)
    prev = evs[2].hash
    for seq, kind, node, name, psha, t in at.sql(
            "SELECT seq, kind, node, name, payload_sha256, t FROM event WHERE run_id = ? AND seq >= 3 ORDER BY seq",
            run_id):
        h = event_hash(prev, run_id, seq, kind, node, name, psha, t)
        at.sql("UPDATE event SET prev_hash = ?, hash = ? WHERE run_id = ? AND seq = ?", prev, h, run_id, seq)
        prev = h
    problems = _problems(at, run_id)
    assert any("deleted or appended" in p for p in problems), problems


def test_artifact_edits_and_deletions_are_detected(recorded, tmp_path):
    at, run_id = fresh_copy(recorded, tmp_path)
    arts = at.store().dump(run_id)["artifacts"]
    kinds = {a["kind"] for a in arts}
    assert {"pixels", "mask", "overlay"} <= kinds
    edited, deleted = arts[0], arts[1]
    p = at.artifacts / edited["path"]
    p.write_bytes(p.read_bytes()[:-1] + b"\x00")
    (at.artifacts / deleted["path"]).unlink()
    problems = _problems(at, run_id)
    assert any(edited["sha256"][:12] in x and "edited" in x for x in problems), problems
    assert any(deleted["sha256"][:12] in x and "missing" in x for x in problems), problems


def test_hmac_seal_needs_the_key(where, monkeypatch):
    monkeypatch.setenv("DXAGENT_TRACE_KEY", "auditor-secret")
    res = run_case([MR], "How large is the dominant bright region?", llm="scripted", script=[call("region_measure")],
                   **where.kw())
    dump = where.store().dump(res.run_id)
    assert dump["run"]["seal_alg"] == "hmac-sha256" and verify_dump(dump, where.artifacts) == []
    monkeypatch.setenv("DXAGENT_TRACE_KEY", "wrong")
    assert any("run row edited" in p for p in verify_dump(dump, None))
    monkeypatch.delenv("DXAGENT_TRACE_KEY")
    assert any("DXAGENT_TRACE_KEY" in p for p in verify_dump(dump, None))


def test_forged_records_do_not_verify(where, monkeypatch):
    """Issue 15's forgeries: (a) events cut after event 3, report removed, status set back to running and seal
    cleared -> incomplete, not intact; (b) a keyed run re-sealed with plain sha256 (anyone can compute it) -> refused
    while DXAGENT_TRACE_KEY is set; (c) a run marked done without its report event -> truncated."""
    from agent.store.trace import SEALED_FIELDS, seal_of

    monkeypatch.setenv("DXAGENT_TRACE_KEY", "auditor-secret")
    res = run_case([MR], "How large is the dominant bright region?", llm="scripted", script=[call("region_measure")],
                   **where.kw())
    where.sql("DELETE FROM event WHERE run_id = ? AND seq > 3", res.run_id)
    where.sql("UPDATE run SET status = 'running', report = NULL, seal = NULL, seal_alg = NULL, n_events = NULL, "
                   "head_hash = NULL WHERE id = ?", res.run_id)
    assert [p for p in _problems(where, res.run_id) if p.startswith("incomplete")], _problems(where, res.run_id)

    res2 = run_case([MR], "How large is the dominant bright region?", llm="scripted", script=[call("region_measure")],
                    **where.kw())
    row = where.store().dump(res2.run_id)["run"]
    forged = seal_of(row, "sha256")
    where.sql("UPDATE run SET seal_alg = 'sha256', seal = ? WHERE id = ?", forged, res2.run_id)
    assert any("only keyed" in p for p in _problems(where, res2.run_id))
    monkeypatch.delenv("DXAGENT_TRACE_KEY")  # without a key a sha256 seal proves integrity, not authorship
    assert _problems(where, res2.run_id) == []

    where.sql("DELETE FROM event WHERE run_id = ? AND name = 'report'", res2.run_id)
    dump = where.store().dump(res2.run_id)
    run = dump["run"]
    run["n_events"], run["head_hash"] = len(dump["events"]), dump["events"][-1]["hash"]
    run["seal"] = seal_of({k: run[k] for k in SEALED_FIELDS}, "sha256")
    assert any("no report event" in p for p in verify_dump(dump, None))


def _dead_owner(store: TraceStore, at: StoreAt, run_id: str) -> None:
    """Make `run_id` look written by a process of this host that has ended."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = store.get_run(run_id).owner.rpartition(":")[0]
    at.sql("UPDATE run SET owner = ? WHERE id = ?", f"{host}:{child.stdout.strip()}", run_id)


def test_a_run_whose_process_died_is_marked_interrupted_but_never_sealed(where):
    """A run left "running" by a process of this host that no longer exists becomes "interrupted" when the engine
    opens the store - unsealed, so verify calls it incomplete, not intact; a live process's run is left alone; reading
    commands (list, verify) write nothing."""
    import os

    store = where.store()
    store.start_run("dead", "c", "q", "m", "json", "0" * 64, {})
    store.start_run("live", "c", "q", "m", "json", "0" * 64, {})
    for i in range(3):
        store.record("dead", "note", "n", "n", {"i": i})
    _dead_owner(store, where, "dead")
    assert store.get_run("live").owner.endswith(f":{os.getpid()}")
    r = subprocess.run(DXAGENT + ["trace", "list", *where.cli()], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "process ended" in r.stdout and store.get_run("dead").status == "running"
    assert store.mark_interrupted() == ["dead"]
    dead = store.get_run("dead")
    assert dead.status == "interrupted" and "--resume" in dead.error and not dead.seal
    assert store.get_run("live").status == "running"
    problems = verify_dump(store.dump("dead"), None)
    assert problems and problems[0].startswith("incomplete: the run was interrupted"), problems
    r = subprocess.run(DXAGENT + ["trace", "verify", "--all", *where.cli()], capture_output=True, text=True)
    assert r.returncode == 1 and "intact" not in r.stdout and r.stdout.count("INCOMPLETE") == 2, r.stdout


def test_a_truncated_record_never_verifies_intact(recorded, tmp_path, monkeypatch):
    """The forgery: delete a finished run's events from seq 3 on, clear its status, report and seal back to
    "running" under a process that has ended. Opening the store (engine or CLI) and verifying must not end in
    "intact", with or without a key."""
    at, res = recorded
    work = at.copy(tmp_path / "tr")
    work.sql("DELETE FROM event WHERE run_id = ? AND seq >= 3", res.run_id)
    work.sql("UPDATE run SET status = 'running', report = NULL, seal = NULL, seal_alg = NULL, n_events = NULL, "
               "head_hash = NULL, finished_at = NULL WHERE id = ?", res.run_id)
    store = work.store()
    _dead_owner(store, work, res.run_id)
    for key in (None, "k" * 32):
        if key:
            monkeypatch.setenv("DXAGENT_TRACE_KEY", key)
        store.mark_interrupted()  # what the engine does when it opens a store
        assert verify_dump(store.dump(res.run_id), None), key
        r = subprocess.run(DXAGENT + ["trace", "verify", "--all", *work.cli()], capture_output=True, text=True)
        line = next(x for x in r.stdout.splitlines() if res.run_id in x)
        assert r.returncode == 1 and "intact" not in line and "INCOMPLETE" in line, r.stdout


def test_a_run_has_one_writer(where):
    """Two --resume of one run at once: the lease (owner, compare-and-set) lets exactly one take it; a run that a
    live process writes is refused in one line; duplicate event numbers cannot be stored."""
    import sqlalchemy

    from agent.store.trace import Event, RunBusy

    store = where.store()
    store.start_run("r", "c", "q", "m", "json", "0" * 64, {})
    store.record("r", "note", "n", "n", {})
    _dead_owner(store, where, "r")
    store.mark_interrupted()
    # Both processes meet at a barrier (files in `gate`) once imported, so their reopen calls race; the one that takes
    # the run stays alive (holds the lease) until the other has tried - events, not guesses with the clock.
    code = ("import os, sys, time; from pathlib import Path; from agent.store.trace import TraceStore, RunBusy\n"
            "s, gate = TraceStore(sys.argv[3] or None, sys.argv[1]), Path(sys.argv[2])\n"
            "def meet(name):\n"
            "    (gate / f'{name}.{os.getpid()}').touch(); end = time.time() + 60\n"
            "    while len(list(gate.glob(name + '.*'))) < 2 and time.time() < end:\n"
            "        time.sleep(0.01)\n"
            "meet('ready')\n"
            "try:\n    s.reopen('r'); print('took')\nexcept RunBusy as e:\n    print('busy', e)\n"
            "meet('tried')\n")
    gate = where.dir / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(where.dir), str(gate), where.url or ""],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["busy", "took"], outs
    where.sql("UPDATE run SET status = 'running', owner = ? WHERE id = 'r'",
         store.get_run("r").owner.rpartition(":")[0] + ":1")  # pid 1 is alive: a live writer
    with pytest.raises(RunBusy, match="being written by process 1"):
        store.reopen("r")
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        from sqlmodel import Session

        with Session(store.engine) as s:
            s.add(Event(run_id="r", seq=0, kind="note", node="n", name="n", payload="{}", payload_sha256="",
                        prev_hash="", hash="", t=0.0))
            s.commit()


# -- exports ------------------------------------------------------------------------------------------------------

def test_export_json_verifies_and_replays_on_its_own(recorded, tmp_path):
    at, res = recorded
    out = tmp_path / "export" / "run.json"
    r = subprocess.run(DXAGENT + ["trace", "export", res.run_id, "--out", str(out), "--with-artifacts", *at.cli()],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dump = load_dump(out)
    assert verify_dump(dump, out.parent / "artifacts") == []
    assert replay(dump, tools=TOOLS).verified
    # edit the exported file: verify and replay both object
    dump["events"][3]["payload"]["evidence"]["status"] = "failed"
    assert any("payload edited" in p for p in verify_dump(dump, None))
    with pytest.raises(ValueError, match="not a dxagent trace export"):
        bad = tmp_path / "bad.json"
        bad.write_text("[1, 2]")
        load_dump(bad)


def test_trajectories_hold_each_planner_step_with_its_result(recorded):
    at, res = recorded
    recs = trajectories(at.store().dump(res.run_id))
    assert len(recs) == 7 and [r["accepted"] for r in recs].count(False) == 1
    assert "not from the evidence" in recs[4]["rejected"] and recs[4]["observation"] is None
    assert recs[5]["attempt"] == 1 and recs[5]["step"] == 5
    first = recs[0]
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert json.loads(first["messages"][2]["content"])["tool"] == "inspect_image"
    assert first["observation"]["id"] == "E1" and first["observation"]["status"] == "ok"
    assert first["critique"]["route"] == "think"
    assert recs[3]["observation"]["status"] == "failed" and "kaboom" in recs[3]["observation"]["error"]
    assert recs[5]["observation"]["id"] == "E5" and recs[5]["observation"]["tool"] == "crop_zoom"
    assert recs[-1]["critique"]["route"] == "report" and recs[-1]["outcome"] in ("report", "refer", "abstain")


def test_cli_replay_and_verify(recorded, tmp_path):
    at, run_id = fresh_copy(recorded, tmp_path)
    # the CLI discovers the standard tools only: record a run without the test's extra tool
    res = run_case([CT], Q, llm="scripted", script=[call("inspect_image"), call("ct_tissue_composition")], **at.kw(),
                   route=False)
    r = subprocess.run(DXAGENT + ["replay", res.run_id, *at.cli()], capture_output=True, text=True)
    assert r.returncode == 0 and "verified" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(DXAGENT + ["trace", "verify", "--all", *at.cli()], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("intact") == 2, r.stdout
    at.sql("UPDATE event SET payload = replace(payload, 'inspect_image', 'inspect_imagX') WHERE run_id = ? AND seq = 1",
           res.run_id)
    r = subprocess.run(DXAGENT + ["trace", "verify", res.run_id, *at.cli()], capture_output=True, text=True)
    assert r.returncode == 1 and "TAMPERED" in r.stdout and "payload edited" in r.stdout
    r = subprocess.run(DXAGENT + ["replay", "no-such-run", *at.cli()], capture_output=True, text=True)
    assert r.returncode == 2 and "no run 'no-such-run'" in r.stderr and "Traceback" not in r.stderr
    # an empty store: --all has nothing to check, and says so (it asked for --all, which it was given)
    r = subprocess.run(DXAGENT + ["trace", "verify", "--all", *at.empty(tmp_path / "empty").cli()],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "no runs in the trace store" in r.stdout, r.stdout + r.stderr


# -- re-run and diff ----------------------------------------------------------------------------------------------

def test_rerun_with_the_same_behaviour_shows_no_change(recorded, tmp_path):
    at, res = recorded
    dump = at.store().dump(res.run_id)
    new_id, _, rows = rerun(dump, [CT], llm="scripted", script=SCRIPT, tool_set=TOOLS, **at.empty(tmp_path).kw())
    assert new_id != res.run_id and rows == []


def test_rerun_lists_changed_choices_outputs_and_report_fields(recorded, tmp_path):
    at, res = recorded
    dump = at.store().dump(res.run_id)
    _, _, rows = rerun(dump, [CT], llm="scripted", script=[call("inspect_image"), call("ct_tissue_composition")],
                       tool_set=TOOLS, **(other := at.empty(tmp_path)).kw())
    areas = {a for a, *_ in rows}
    assert areas == {"llm", "tool", "report"}
    assert ("llm", "step 2.tool", '"region_measure"', '"ct_tissue_composition"') in rows
    assert ("tool", "E2.tool", '"region_measure"', '"ct_tissue_composition"') in rows
    assert any(a == "report" and p.startswith("findings") for a, p, *_ in rows)
    with pytest.raises(Exception, match="not this run's inputs"):
        rerun(dump, [MR], llm="scripted", script=[], **other.kw())


# -- golden traces ------------------------------------------------------------------------------------------------

GOLDEN_FILES = sorted(GOLDEN.glob("*.json"))


def test_golden_traces_exist():
    assert len(GOLDEN_FILES) >= 2, "record them with scripts/record_golden.py"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_trace_does_not_depend_on_where_the_project_lives(path):
    """A trace names dxagent's own model cards relative to the project: replay of a clone in another folder (CI's)
    must produce the same report, and no install path goes into a trace."""
    root = str(Path(__file__).resolve().parent.parent)
    assert root not in path.read_text(), "an absolute project path in a golden trace"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_trace_replays_and_verifies(path):
    """Recorded from the bundled demo cases with the embedded planner: a change in prompts, tools, critic or report
    shows up here as a divergence (re-record with scripts/record_golden.py when the change is intended)."""
    dump = load_dump(path)
    assert verify_dump(dump, path.parent / "artifacts") == []
    rep = replay(dump)
    assert rep.verified, f"{rep.divergence}\n{rep.divergence and rep.divergence.diff()}"


def test_two_stores_adding_the_same_artifact_keep_one_row(where):
    """Content-addressed rows: the insert is ON CONFLICT DO NOTHING, so a second writer (another store, process or
    machine) adding the same sha256 - at once or later - leaves one row and no error (tests/test_trace_store.py runs
    eight processes at once)."""
    from agent.core.state import ArtifactRef

    a, b = where.store(), where.store()
    ref = ArtifactRef(sha256="ab" * 32, kind="overlay", media_type="image/png", path="ab/x.png")
    a.add_artifact(ref, 10)
    b.add_artifact(ref, 10)
    a.add_artifact(ref, 10)
    assert list(a.artifacts([ref.sha256])) == [ref.sha256]
    assert where.sql("SELECT count(*) FROM artifact")[0][0] == 1
