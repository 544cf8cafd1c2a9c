"""The graph on the scripted backend: loop, budget stop, rethink both ways, failing tools, resume, trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import Boom, Gate, Slow, answer, call, wait_for
from pydicom.data import get_testdata_file

from agent.engine.session import run_case, tools
from agent.store.trace import TraceStore

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
TISSUE_Q = "What is the tissue composition of this CT slice: how much fat and bone?"


def scripted(tmp_path, script, paths=(CT,), question=TISSUE_Q, route=False, **kw):
    """The planner's own loop (route=False: no call is routed past it; test_organ_segment tests routing)."""
    return run_case(list(paths), question, llm="scripted", script=script, trace_dir=tmp_path, route=route, **kw)


def test_loop_inspect_then_measure_then_report(tmp_path):
    res = scripted(tmp_path, [call("inspect_image"), call("ct_tissue_composition")])
    st = res.state
    assert [e.tool for e in st.evidence] == ["inspect_image", "ct_tissue_composition"]
    assert all(e.status == "ok" for e in st.evidence)
    # rethink: after inspect the question was not answered -> think; after the measurement -> report
    assert [c.route for c in st.critiques] == ["think", "report"]
    assert st.critiques[-1].answered and st.critiques[-1].answered_by == ["E2"]
    rep = res.report
    assert rep["findings"] and all(f["evidence_ids"] == ["E2"] for f in rep["findings"])
    assert rep["recommendation"]["outcome"] == "report"
    assert "RESEARCH USE ONLY" in rep["disclaimer"]
    assert any(m["unit"] in ("mm2", "mL") for f in rep["findings"] for m in f["measurements"])


def test_trace_is_complete_and_chained(tmp_path):
    res = scripted(tmp_path, [call("inspect_image"), call("ct_tissue_composition")])
    store = TraceStore(None, tmp_path)
    llm = store.events(res.run_id, "llm")
    tool = store.events(res.run_id, "tool")
    assert len(llm) == 2 and len(tool) == 2
    for ev in llm:
        body = json.loads(ev.payload)
        assert body["request"]["messages"][0]["role"] == "system" and body["response"]["content"]
        assert body["decision"]["tool"] in ("inspect_image", "ct_tissue_composition")
    for ev, e in zip(tool, res.state.evidence, strict=True):
        body = json.loads(ev.payload)["evidence"]
        assert body["id"] == e.id and body["output"] == e.output and body["args"] == e.args
        for a in body["artifacts"]:
            assert (tmp_path / "artifacts" / a["path"]).exists()
    assert store.verify_chain(res.run_id) is None
    assert store.get_run(res.run_id).status == "done"
    assert json.loads(store.get_run(res.run_id).report)["run_id"] == res.run_id
    # patient identifiers and paths never reach the trace
    everything = " ".join(e.payload for e in store.events(res.run_id))
    assert "CT_small" not in everything and "CompressedSamples" not in everything


def test_budget_stops_the_loop(tmp_path):
    res = scripted(tmp_path, [call("inspect_image"), call("window_level", preset="lung"), call("inspect_image", view="V2")],
                   question="How much fat is there?", max_steps=2)
    assert res.state.tool_steps == 2
    assert res.state.critiques[-1].route == "report" and "budget" in res.state.critiques[-1].why
    assert len(TraceStore(None, tmp_path).events(res.run_id, "llm")) == 2  # the third decision was never asked


def test_planner_answer_goes_straight_to_report_and_abstains(tmp_path):
    res = scripted(tmp_path, [answer("nothing to do")])
    assert res.state.evidence == []
    assert res.report["recommendation"]["outcome"] == "abstain"


def test_throwing_and_slow_tools_become_failed_evidence(tmp_path):
    ts = {**tools(), "boom": Boom(), "slow": Slow()}
    res = scripted(tmp_path, [call("boom"), call("slow"), call("ct_tissue_composition")], tool_set=ts)
    e1, e2, e3 = res.state.evidence
    assert e1.status == "failed" and "kaboom" in e1.error
    assert e2.status == "failed" and "timed out" in e2.error
    assert e3.status == "ok"
    # the critic saw the failure and sent the planner back to think
    assert res.state.critiques[0].route == "think" and "boom failed" in res.state.critiques[0].suggestions[0]
    assert any("kaboom" in u for u in res.report["uncertainty"])


STUCK = """
import sys
sys.path.insert(0, {tests!r})
from helpers import Hang, call
from agent.engine.session import run_case, tools

res = run_case([{ct!r}], "What is the tissue composition?", llm="scripted", script=[call("hang")],
               trace_dir={td!r}, route=False, tool_set={{**tools(), "hang": Hang()}})
print([(e.status, e.error) for e in res.state.evidence], res.report["recommendation"]["outcome"])
"""


def test_a_stuck_tool_is_stopped_and_the_process_still_exits(tmp_path):
    """Issue 15: a tool past its timeout runs in a worker process that is killed (not a thread left spinning), so the
    run ends with a report, the process exits at once, and nothing of the stuck tool runs on."""
    code = STUCK.format(tests=str(Path(__file__).parent), ct=CT, td=str(tmp_path))
    pidfile = tmp_path / "pid"
    env = {k: v for k, v in os.environ.items() if k != "DXAGENT_TOOL_WORKER"} | {"DXAGENT_TEST_PIDFILE": str(pidfile)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, env=env)
    assert r.returncode == 0, r.stderr[-800:]
    assert "('failed', 'timed out after 1 s (its worker process was stopped)')" in r.stdout, r.stdout
    assert time.monotonic() - t0 < 60
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the stuck tool's process still runs"


def test_invalid_decisions_are_reasked_then_give_up(tmp_path):
    res = scripted(tmp_path, ["not json at all", json.dumps({"tool": "nope", "args": {}}), call("ct_tissue_composition")])
    assert res.state.evidence[0].tool == "ct_tissue_composition"
    rejected = [json.loads(e.payload)["rejected"] for e in TraceStore(None, tmp_path).events(res.run_id, "llm")]
    assert "not JSON" in rejected[0] and "unknown tool" in rejected[1] and rejected[2] is None
    res2 = scripted(tmp_path, ["garbage"] * 3)
    assert res2.state.planner_failures == 1
    assert res2.report["recommendation"]["outcome"] == "refer"
    assert any("Planner failed" in x for x in res2.report["limitations"])


def test_refused_when_tool_not_for_modality(tmp_path):
    res = scripted(tmp_path, [call("ct_tissue_composition"), call("region_measure")], paths=(MR,),
                   question="How large is the bright region?")
    assert "ct_tissue_composition" not in res.state.applicable_tools
    # the planner is never offered it; picking it anyway is rejected with the reason, then re-asked
    first = json.loads(TraceStore(None, tmp_path).events(res.run_id, "llm")[0].payload)
    assert "does not apply to this case" in first["rejected"]
    assert [(e.tool, e.status) for e in res.state.evidence] == [("region_measure", "ok")]


def test_bad_input_is_one_line_error(tmp_path):
    from agent.engine.session import DxError

    bad = tmp_path / "notes.dcm"
    bad.write_bytes(b"a text file, not an image\n" * 40)
    with pytest.raises(DxError) as exc:
        scripted(tmp_path, [answer()], paths=(bad,))
    assert "\n" not in str(exc.value) and "not an image" in str(exc.value)
    failed = [r for r in TraceStore(None, tmp_path).runs() if r.status == "failed"]
    assert failed and failed[0].error


def test_what_is_not_a_regular_file_is_refused_before_any_read(tmp_path):
    """A 0-byte file, a named pipe (which would block a reader for ever) and a device (/dev/zero, endless) are
    refused with one line from one stat() before a run starts: no run row, nothing read."""
    from agent.engine.session import DxError

    empty, pipe = tmp_path / "empty.dcm", tmp_path / "pipe.dcm"
    empty.write_bytes(b"")
    os.mkfifo(pipe)
    for path, words in ((empty, "0-byte"), (pipe, "named pipe"), (Path("/dev/zero"), "device")):
        with pytest.raises(DxError) as exc:
            scripted(tmp_path, [answer()], paths=(path,))
        assert "\n" not in str(exc.value) and words in str(exc.value), str(exc.value)
    assert TraceStore(None, tmp_path).runs() == []


CHILD = """
import sys, json
sys.path.insert(0, {tests!r})
from helpers import Gate, call
from agent.engine.session import run_case, tools
run_case([{ct!r}], {q!r}, llm="scripted", trace_dir={td!r}, run_id="run-resume", route=False,
         script=[call("inspect_image"), call("gate"), call("ct_tissue_composition")],
         tool_set={{**tools(), "gate": Gate()}})
"""


def test_resume_after_kill(tmp_path):
    gate = tmp_path / "gate"
    gate.write_text("closed")
    env = {**os.environ, "DXAGENT_TEST_GATE": str(gate)}
    code = CHILD.format(tests=str(Path(__file__).parent), ct=CT, q=TISSUE_Q, td=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    store = TraceStore(None, tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run sits inside the gate tool (E1 done, E2 running)
        evs = store.events("run-resume") if store.get_run("run-resume") else []
        if any(e.kind == "llm" and json.loads(e.payload).get("decision", {}) and
               json.loads(e.payload)["decision"]["tool"] == "gate" for e in evs):
            break
        assert proc.poll() is None, "child exited early"
        time.sleep(0.2)
    wait_for(str(gate) + ".entered")  # the gate tool itself signals that it runs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [json.loads(e.payload)["evidence"]["id"] for e in store.events("run-resume", "tool")] == ["E1"]
    gate.unlink()
    time.sleep(2)  # a pause while nothing runs: it must not count against the wall-clock budget
    # resume: the checkpoint is after the think step that chose "gate"; E1 is not re-run
    res = run_case(llm="scripted", script=[call("ct_tissue_composition")], trace_dir=tmp_path, resume="run-resume",
                   tool_set={**tools(), "gate": Gate()})
    assert res.state.budget.elapsed() < time.time() - res.state.steps[0].t - 1.5
    assert [e.tool for e in res.state.evidence] == ["inspect_image", "gate", "ct_tissue_composition"]
    tool_ids = [json.loads(e.payload)["evidence"]["id"] for e in store.events("run-resume", "tool")]
    assert tool_ids == ["E1", "E2", "E3"]
    assert res.report and res.report["recommendation"]["outcome"] == "report"
    assert store.verify_chain("run-resume") is None
    # the resumed run replays: the pause is served from the resume note, the budget arithmetic comes out the same
    from agent.engine.replay import replay

    rep = replay(store.dump("run-resume"), tools={**tools(), "gate": Gate()})
    assert rep.verified, f"{rep.divergence}\n{rep.divergence and rep.divergence.diff()}"


def test_planner_may_not_invent_coordinates(tmp_path):
    """The planner never sees pixels: a region tool is held back until coordinates exist, and a box that comes from
    neither the evidence nor the question is rejected and re-asked."""
    script = [call("measure_roi", bbox=[10, 10, 40, 40]), call("region_measure", seed_point=[33, 77]),
              call("region_measure")]
    res = scripted(tmp_path, script, paths=(MR,), question="How large is the dominant bright region?")
    events = [json.loads(e.payload) for e in TraceStore(None, tmp_path).events(res.run_id, "llm")]
    first = events[0]["request"]
    assert "measure_roi" in first["held_back"] and "measure_roi" not in first["candidates"]
    assert "needs a region" in events[0]["rejected"]
    assert "seed_point=[33, 77] is not from the evidence" in events[1]["rejected"]
    assert events[2]["rejected"] is None and res.state.evidence[0].tool == "region_measure"

    from agent.engine.planner import check_grounded, grounded_coordinates

    st = res.state
    grounded = grounded_coordinates(st)
    box = st.evidence[0].output["bbox"]
    check_grounded({"bbox": box}, grounded)  # a box a tool returned
    check_grounded({"bbox": [0, 0, 0.5, 0.5]}, grounded)  # "the upper-left quarter"
    with pytest.raises(ValueError, match="not from the evidence"):
        check_grounded({"bbox": [box[0] + 17, box[1], box[2], box[3]]}, grounded)
    st.question = "Measure the box 12, 20, 60, 90."
    check_grounded({"bbox": [12, 20, 60, 90]}, grounded_coordinates(st))


def test_describe_runs_the_modality_s_own_tools_before_the_planner(tmp_path):
    """Issue 16: "Describe the findings" on a CT goes to a CT tool without a planner decision (the 1.5B planner
    called knowledge_search three times on radiographs instead); once quantitative evidence describes the study the
    critic ends the loop. A generic tool, or one that needs a region, is left to the planner."""
    res = scripted(tmp_path, [call("knowledge_search", query="findings"), answer()], question="Describe the findings",
                   route=True)
    assert [e.tool for e in res.state.evidence] == ["ct_tissue_composition"]
    assert not [e for e in TraceStore(None, tmp_path).events(res.run_id, "llm") if e.node == "think"]
    assert res.report["recommendation"]["outcome"] == "report"


@pytest.mark.parametrize(("modality", "rgb", "first"), [("US", False, "lesion_segment"), ("XC", True, "lesion_segment"),
                                                        ("ES", True, "lesion_segment"),
                                                        ("SM", True, "texture_features")])
def test_describe_is_routed_on_every_modality(tmp_path, modality, rgb, first):
    """Issue 33: "Describe the findings" on ultrasound, dermoscopy, endoscopy and pathology went through the planner
    (3-4 decisions at ~11 s each; a batch of 8 breast ultrasounds did not finish in 280 s). Each now starts with the
    tools that declare they start that modality's description (`describes`), with no planner decision."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:160, :160]
    pic = 150 + 20 * rng.standard_normal((160, 160))
    pic[(yy - 80) ** 2 + (xx - 70) ** 2 < 30 ** 2] = 40  # a dark round lesion
    pic = np.clip(pic, 0, 255).astype(np.uint8)
    path = tmp_path / "case.png"
    Image.fromarray(np.stack([pic, pic // 2, pic], -1) if rgb else pic).save(path)
    res = run_case([str(path)], "Describe the findings", llm="scripted", modality=modality,
                   script=[call("knowledge_search", query="findings"), answer()], trace_dir=tmp_path / "tr")
    assert [e.tool for e in res.state.evidence][:1] == [first]
    assert "knowledge_search" not in [e.tool for e in res.state.evidence]
    assert not [e for e in TraceStore(None, tmp_path / "tr").events(res.run_id, "llm") if e.node == "think"]
    assert res.report["recommendation"]["outcome"] == "report" and res.report["findings"]


def test_a_retrieval_tool_is_not_offered_again(tmp_path):
    """Issue 33: the planner paid a decision for a second knowledge_search that the critic then skipped as a repeat.
    Once a retrieval tool has answered in a case it is no longer among the planner's candidates."""
    res = scripted(tmp_path, [call("knowledge_search", query="steatosis"), call("knowledge_search", query="steatosis"),
                              call("ct_tissue_composition"), answer()], question="What is hepatic steatosis?")
    assert [e.tool for e in res.state.evidence].count("knowledge_search") == 1
    offered = [json.loads(e.payload)["request"]["candidates"]
               for e in TraceStore(None, tmp_path).events(res.run_id, "llm") if e.node == "think"]
    assert "knowledge_search" in offered[0]
    assert all("knowledge_search" not in names for names in offered[1:]), offered


def test_a_failed_call_with_nothing_to_vary_is_not_offered_again(tmp_path):
    """Issue 33: on an exported CT slice (no Hounsfield units) the local planner called ct_tissue_composition three
    times, each failing the same way. A tool whose arguments the planner cannot vary fails again on the same input, so
    after one failure it is no longer a candidate; a second call of it is rejected and re-asked."""
    from PIL import Image

    pic = (np.arange(64 * 64).reshape(64, 64) % 200 + 30).astype(np.uint8)
    Image.fromarray(pic).save(tmp_path / "exported_ct.png")
    res = run_case([str(tmp_path / "exported_ct.png")], "Describe the findings", llm="scripted", modality="CT",
                   script=[call("ct_tissue_composition"), call("ct_tissue_composition"), answer()],
                   trace_dir=tmp_path / "tr", route=False)
    assert [(e.tool, e.status) for e in res.state.evidence] == [("ct_tissue_composition", "failed")]
    asks = [json.loads(e.payload) for e in TraceStore(None, tmp_path / "tr").events(res.run_id, "llm")
            if e.node == "think"]
    assert "ct_tissue_composition" in asks[0]["request"]["candidates"]
    assert "ct_tissue_composition" in asks[1]["request"]["exhausted"]
    assert "already ran" in asks[1]["rejected"]
    assert asks[2]["decision"]["action"] == "answer"
