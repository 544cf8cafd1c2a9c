"""`dxagent eval` end to end (issue 13): SLAKE items through the agent and the baselines with the scripted and the tiny
planner, a fresh state per question checked through the trace, kill -9 and resume, a realcases label manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.app.eval import run_eval
from agent.app.eval_data import ManifestError
from agent.app.eval_metrics import closed_correct
from agent.store.trace import TraceStore

DX = [sys.executable, "-m", "agent.app.cli"]
SLAKE = Path(os.environ.get("DXAGENT_SLAKE") or Path(__file__).resolve().parents[2] / "shared" / "data" / "slake_dev")
# One scripted reply serves every LLM call: the planner reads "tool"/"args" (inspect_image), the answer step and the
# baselines read "answer".
REPLY = json.dumps({"tool": "inspect_image", "args": {}, "answer": "yes"})


def _slice(tmp_path: Path, n: int = 6) -> Path:
    """A small manifest of real SLAKE validate questions: modality, closed yes/no and open ones, two images."""
    if not (SLAKE / "validate.jsonl").exists():
        pytest.skip(f"no SLAKE data at {SLAKE} (set DXAGENT_SLAKE)")
    rows = [json.loads(line) for line in (SLAKE / "validate.jsonl").read_text().splitlines()]
    pick = [r for r in rows if r["image"] == rows[0]["image"]][:n // 2] + \
        [r for r in rows if r["content_type"] == "Modality" and r["answer_type"] == "CLOSED"][:1] + \
        [r for r in rows if r["answer_type"] == "CLOSED" and r["content_type"] == "Organ"][: n - n // 2 - 1]
    m = tmp_path / "slice.jsonl"  # image paths stay relative to SLAKE: run with root=SLAKE
    m.write_text("".join(json.dumps(r) + "\n" for r in pick))
    return m


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_eval_scripted_fresh_state_per_question(tmp_path, where):
    """On SQLite and on PostgreSQL (`where`: the eval's records, runs and checkpoints in that store)."""
    m = _slice(tmp_path, 4)  # two questions on one image (a fresh state each), a closed modality and a closed organ one
    out = tmp_path / "out"
    res = run_eval(m, out, root=SLAKE, prior_from=SLAKE / "train.jsonl", llm="scripted", script=[REPLY, REPLY],
                   db_url=where.url)
    rows = _rows(out)
    n = len(m.read_text().splitlines())
    assert res.items == n and len(rows) == n * 5 and res.skipped == 0
    assert {r["system"] for r in rows} == {"agent", "no-tools", "blind", "prior", "majority"}
    agent = [r for r in rows if r["system"] == "agent"]
    assert len({r["run_id"] for r in agent}) == n  # one thread per question
    store = TraceStore(where.url, out / "traces")
    for r in agent:
        dump = store.dump(r["run_id"])
        assert dump["run"]["question"] == r["question"]
        intake = next(e["payload"] for e in dump["events"] if e["name"] == "intake")
        assert intake["question"]["text"] == r["question"]
        ids = [e["payload"]["evidence"]["id"] for e in dump["events"] if e["kind"] == "tool"]
        assert ids == [f"E{i}" for i in range(1, len(ids) + 1)]  # evidence starts afresh at E1
        for e in dump["events"]:
            if e["kind"] == "llm" and e["node"] == "think":
                assert "Earlier in this conversation" not in e["payload"]["request"]["messages"][1]["content"]
        a = r["answer"]
        assert a["kind"] == "abstain" or a["evidence_ids"], a  # no answer without evidence
        if a["kind"] == "abstain":
            assert a["reason"] in ("no_applicable_tool", "evidence_does_not_address", "budget_spent", "planner_failed",
                                   "low_confidence", "tools_conflict")
    modality = next(r for r in agent if r["content_type"] == "Modality" and r["answer_type"] == "CLOSED")
    inspect = [e["payload"]["evidence"]["id"] for e in store.dump(modality["run_id"])["events"]
               if e["kind"] == "tool" and e["payload"]["evidence"]["tool"] == "inspect_image"]
    # the VQA expert, routed first, may be cited beside it; the modality itself is read from the inspect_image call
    assert modality["answer"]["kind"] in ("yes_no", "choice") and inspect and inspect[0] in modality["answer"]["evidence_ids"]
    assert "classifier" in modality["answer"]["basis"]  # a JPEG: the study classifier's modality, with its probability
    for sysname in ("no-tools", "blind"):  # the baselines asked the model once each; their runs are in the trace
        for r in (r for r in rows if r["system"] == sysname):
            ev = store.dump(r["run_id"])["events"]
            assert [e["kind"] for e in ev] == ["llm"] and ("Case:" in ev[0]["payload"]["request"]["messages"][1]["content"]) \
                == (sysname == "no-tools")
    # the summary's figures follow from the rows (a hand recount of the agent's closed accuracy over all items)
    closed = [r for r in agent if r["answer_type"] == "CLOSED"]
    hits = sum(r["answer"]["kind"] != "abstain" and closed_correct(r["answer"]["value"], r["gold"]) for r in closed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["systems"]["agent"]["closed"]["accuracy_all"]["value"] == pytest.approx(hits / len(closed))
    assert "agent - prior" in summary["paired"]
    assert (out / "summary.md").read_text().count("| agent") >= 1 and (out / "eval.html").stat().st_size > 2000
    # the same command again computes nothing
    again = run_eval(m, out, root=SLAKE, prior_from=SLAKE / "train.jsonl", llm="scripted", script=[REPLY, REPLY],
                     db_url=where.url)
    assert again.ran == 0 and again.skipped == n * 5 and _rows(out) == rows


def test_eval_refuses_what_cannot_be_fair(tmp_path):
    m = _slice(tmp_path, 2)
    with pytest.raises(ManifestError, match="--prior-from"):
        run_eval(m, tmp_path / "o", root=SLAKE, systems=["prior"], llm="scripted")
    with pytest.raises(ManifestError, match="unknown system"):
        run_eval(m, tmp_path / "o", root=SLAKE, systems=["oracle"], llm="scripted")
    res = run_eval(m, tmp_path / "o2", root=SLAKE, systems=["majority"], prior_from=m)
    assert any("in-sample" in n for n in res.summary["notes"])


def test_eval_with_the_tiny_planner(tmp_path):
    """The embedded runtime (SmolLM2-135M on llama.cpp): the agent and the blind baseline on real SLAKE questions."""
    m = _slice(tmp_path, 4)
    out = tmp_path / "out"
    res = run_eval(m, out, root=SLAKE, systems=["agent", "blind"], llm="tiny", max_steps=2)
    rows = _rows(out)
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows), [r.get("error") for r in rows]
    blind = [r for r in rows if r["system"] == "blind"]
    assert all(r["answer"]["kind"] in ("yes_no", "choice", "phrase", "count", "abstain") for r in blind)
    for r in blind:  # the embedded model's token probabilities give closed answers a probability
        if r["answer"]["kind"] == "yes_no":
            assert 0.0 < r["answer"]["probability"] <= 1.0
    assert res.summary["systems"]["agent"]["seconds"]["mean"] > 0


def _results(out: Path) -> list[Path]:
    """The items' finished results (items/<id>/<system>.json), not the attempt records written as a run starts."""
    return [p for p in (out / "items").glob("*/*.json") if not p.name.endswith(".attempt.json")]


def test_cli_eval_survives_kill_9_and_resumes(tmp_path):
    m = _slice(tmp_path, 4)  # 8 rows (agent, blind): killed after 3, the resume has 5 left
    out = tmp_path / "out"
    cmd = DX + ["eval", str(m), "--out", str(out), "--llm", "tiny", "--systems", "agent,blind", "--max-steps", "2",
                "--root", str(SLAKE)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = _results(out) if (out / "items").exists() else []
            if len(done) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p: json.loads(p.read_text()) for p in _results(out)}  # every file parses
    assert 3 <= len(before) < 8  # killed in the middle: the resume has work left
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = _rows(out)
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows)
    for p, row in before.items():  # complete before the kill: kept, not run again
        assert json.loads(p.read_text())["run_id"] == row["run_id"]
    assert "closed acc" in res.stdout and (out / "eval.html").exists()


@pytest.mark.realcases
def test_eval_over_a_realcases_label_manifest(realcases, tmp_path):
    res = run_eval(realcases / "cases.jsonl", tmp_path / "out", systems=["agent"], llm="scripted", script=[REPLY],
                   limit=4)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4 and all(r["question"].startswith("Is there ") for r in rows)
    assert all(r["answer"]["kind"] == "abstain" or r["answer"]["evidence_ids"] for r in rows)
    assert res.summary["systems"]["agent"]["closed"]["n"] == 4
