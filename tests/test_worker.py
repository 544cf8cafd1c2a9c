"""Tools run in a worker process that can be stopped (agent/engine/worker.py): crashes, reuse, environment, artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Crash, Who, call
from pydicom.data import get_testdata_file

from agent.engine import worker
from agent.engine.session import run_case, tools

CT = get_testdata_file("CT_small.dcm")


@pytest.fixture(autouse=True)
def process_mode(monkeypatch):
    monkeypatch.delenv("DXAGENT_TOOL_WORKER", raising=False)


def _run(tmp_path, script, **tool_set):
    return run_case([CT], "What is the tissue composition?", llm="scripted", script=script, trace_dir=tmp_path,
                    route=False, tool_set={**tools(), **tool_set})


def test_a_tool_that_kills_its_process_is_a_failed_call_and_the_run_goes_on(tmp_path):
    res = _run(tmp_path, [call("crash"), call("ct_tissue_composition")], crash=Crash())
    e1, e2 = res.state.evidence
    assert e1.status == "failed" and "worker process died" in e1.error and "-9" in e1.error, e1.error
    assert e2.status == "ok"  # a fresh worker ran the next call
    assert res.report["recommendation"]["outcome"] in ("report", "refer", "abstain")


def test_one_worker_serves_the_calls_with_the_callers_environment_and_its_artifacts_come_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_TEST_MARK", "first")
    r1 = _run(tmp_path, [call("who")], who=Who())
    monkeypatch.setenv("DXAGENT_TEST_MARK", "second")  # set after the worker started: the call still sees it
    r2 = _run(tmp_path, [call("who")], who=Who())
    o1, o2 = r1.state.evidence[0].output, r2.state.evidence[0].output
    assert o1["pid"] != os.getpid() and o1["pid"] == o2["pid"]  # another process, reused (its models stay loaded)
    assert (o1["mark"], o2["mark"]) == ("first", "second")
    ref = r2.state.evidence[0].artifacts[0]
    assert ref.sha256 == o2["overlay"] and (tmp_path / "artifacts" / ref.path).exists()


def test_thread_mode_runs_tools_in_the_calling_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_TOOL_WORKER", "thread")
    res = _run(tmp_path, [call("who")], who=Who())
    assert res.state.evidence[0].output["pid"] == os.getpid()


KILLED = """
import sys
sys.path.insert(0, {tests!r})
from agent.engine import worker
w = worker.Worker(); w.wait_ready()
print(w.proc.pid, flush=True)
sys.stdin.read()
"""


def test_a_worker_exits_when_the_process_that_started_it_is_killed(tmp_path):
    code = KILLED.format(tests=str(Path(__file__).parent))
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert Path(f"/proc/{pid}").exists()
    parent.kill()
    parent.wait()
    end = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid), "the orphaned worker still runs"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "gone"


def test_mode_reads_the_environment(monkeypatch):
    assert worker.mode() == "process"
    monkeypatch.setenv("DXAGENT_TOOL_WORKER", "Thread")
    assert worker.mode() == "thread"


def test_the_artifact_cache_keeps_recent_arrays_within_its_budget(tmp_path, monkeypatch):
    """A long batch (or a worker serving many cases) must not hold every case's decoded pixels in memory."""
    import numpy as np

    from agent.store import artifacts

    monkeypatch.setattr(artifacts, "CACHE_BYTES", 3 * 8 * 1000)
    store = artifacts.ArtifactStore(tmp_path)
    refs = [store.put_array(np.full(1000, i, np.float64)) for i in range(5)]
    assert len(store._cache) == 3 and list(store._cache) == [r.sha256 for r in refs[2:]]
    assert store.get_array(refs[0])[0] == 0  # evicted: read back from disk, and now the most recent
    assert list(store._cache)[-1] == refs[0].sha256 and len(store._cache) == 3


def test_intake_classifies_in_the_worker_so_a_routed_run_never_imports_torch(tmp_path):
    """Cold start (issue 33): the study classifier runs in the tool worker, which imports torch beside the engine's own
    imports; the process that runs a routed CT case (no LLM call, a numpy tool) never imports torch itself, and the
    classifier's block still reaches the report. Nor does a closed question the VQA expert takes: its question scope
    (the wording score the answer's threshold depends on) is worked out in the worker too (Tool.questions_in_worker),
    and still reaches the question's reading."""
    script = (
        "import json, sys\n"
        "from agent.engine.session import run_case\n"
        f"res = run_case([{get_testdata_file('CT_small.dcm')!r}], 'What is the tissue composition of this CT slice?', "
        f"llm='scripted', script=[], trace_dir={str(tmp_path)!r})\n"
        "first = {'torch': 'torch' in sys.modules, 'study': res.report['study'].get('study_model'),"
        " 'error': res.report['study'].get('study_error'), 'tools': [e.tool for e in res.state.evidence]}\n"
        f"res = run_case([{get_testdata_file('CT_small.dcm')!r}], 'Does the picture contain liver?', "
        f"llm='scripted', script=[], trace_dir={str(tmp_path)!r})\n"
        "print(json.dumps({**first, 'then': {m: m in sys.modules for m in ('torch', 'timm', 'transformers')},"
        " 'wording': res.state.question_info.wording, 'tools2': [e.tool for e in res.state.evidence]}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DXAGENT_TOOL_WORKER": "process"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["study"] and not got["error"], got  # the classifier ran (in the worker) and its block is in the report
    assert got["tools"] == ["ct_tissue_composition"], got  # routed: no planner reply was needed
    assert got["torch"] is False, got
    assert "vqa_expert" in got["tools2"], got  # the expert took the question and ran (in the worker)
    assert got["wording"] is not None and got["wording"] > 0.99, got  # a SLAKE training question's own words
    assert got["then"] == {"torch": False, "timm": False, "transformers": False}, got
