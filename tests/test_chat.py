"""`dxagent chat` driven as a person would, through a pseudo-terminal (pexpect): a conversation of several turns,
every slash command, resume of a saved thread, Ctrl-C during a tool call, EOF, and an endpoint whose uncited
claim is flagged. The planner is scripted (deterministic choices) or a loopback OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pexpect
import pytest
from helpers import answer, call, wait_for
from pydicom.data import get_testdata_file

from agent.store.trace import TraceStore, verify_dump

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
TESTS = Path(__file__).resolve().parent
PROMPT = "you> "


def script_file(tmp_path: Path, name: str, replies: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(replies) + "\n")
    return p


def spawn(tmp_path: Path, *args: str, env: dict | None = None, sigint_ignored: bool = False) -> pexpect.spawn:
    """`sigint_ignored`: the child starts with SIGINT ignored, as a shell's background job (or a parent process that
    ignores it) hands it on."""
    child = pexpect.spawn(sys.executable, ["-m", "agent.app.cli", "chat", *args, "--trace-dir", str(tmp_path / "tr"),
                                           "--no-route"],  # the scripted planner's own loop
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", **(env or {})},
                          encoding="utf-8", timeout=90,
                          dimensions=(50, 200),
                          preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
    child.logfile_read = open(tmp_path / "transcript.txt", "a")  # noqa: SIM115 - closed with the process
    return child


def thread_id(child: pexpect.spawn) -> str:
    child.expect(r"thread (run-[0-9]{8}-[0-9]{6}-[0-9a-f]{6})")
    return child.match.group(1)


def test_conversation_with_every_command_then_resume(tmp_path):
    # an answered question goes straight to the report (the critic routes), so no "answer" reply follows it
    s1 = script_file(tmp_path, "s1", [call("inspect_image"), call("ct_tissue_composition"), call("region_measure")])
    child = spawn(tmp_path, CT, "--llm", "scripted", "--script", str(s1))
    tid = thread_id(child)
    child.expect_exact(PROMPT)
    child.sendline("What is the tissue composition of this CT slice?")
    child.expect(r"act +\[E1\] inspect_image ok")
    child.expect(r"act +\[E2\] ct_tissue_composition ok: body [0-9.]+ mm2")
    child.expect(r"rethink report: evidence about amount of fat, soft tissue, bone, lung: E2")
    child.expect(r"dxagent: fat [0-9.]+ mm2; soft tissue [0-9.]+ mm2; bone [0-9.]+ mm2; lung [0-9.]+ mm2 .*\[E2\]")
    child.expect(r"outcome: report")
    child.expect_exact(PROMPT)
    child.sendline("How large is the dominant bright region?")
    child.expect(r"act +\[E3\] region_measure ok: .*mm2")
    child.expect(r"dxagent: [0-9.]+ mm.*dominant region.*\[E3\]")
    child.expect_exact(PROMPT)
    child.sendline("/tools")
    child.expect(r"ct_tissue_composition +Lung, fat")
    child.expect_exact(PROMPT)
    child.sendline("/evidence E3")
    child.expect(r"\[E3\] region_measure ok")
    child.expect(r"artifact overlay: (\S+\.png)")
    assert Path(child.match.group(1)).is_file()
    child.expect_exact(PROMPT)
    child.sendline("/evidence E9")
    child.expect(r"no evidence 'E9'; there are E1, E2, E3")
    child.expect_exact(PROMPT)
    child.sendline("/report")
    child.expect_exact(PROMPT)
    assert "Findings" in child.before and "RESEARCH USE ONLY" in child.before and "E3" in child.before
    child.sendline("/trace")
    child.expect(rf"trace {tid}: (\d+) events, \d+ steps, 3 evidence item")
    child.expect_exact(PROMPT)
    child.sendline(f"/image {MR}")
    child.expect(r"added V2: MR 2D \[64, 64\] \(note: V1 is CT\)")
    child.expect_exact(PROMPT)
    child.sendline("/image /no/such/file.dcm")
    child.expect("cannot add file.dcm")
    child.expect_exact(PROMPT)
    child.sendline(f"/save {tmp_path / 'chat.md'}")
    child.expect("saved")
    child.expect_exact(PROMPT)
    child.sendline(f"/save {tmp_path / 'chat.json'}")
    child.expect("saved")
    child.expect_exact(PROMPT)
    child.sendline("/bogus")
    child.expect("unknown command /bogus")
    child.expect_exact(PROMPT)
    child.sendline("/quit")
    child.expect(rf"dxagent chat --resume {tid}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    md = (tmp_path / "chat.md").read_text()
    assert "**Q1:** What is the tissue composition" in md and "**Q2:** How large" in md and "[E3]" in md
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [t["evidence_ids"] for t in saved["turns"]] == [["E2"], ["E3"]]

    # resume: the conversation and its evidence are back; the next answer can build on them
    s2 = script_file(tmp_path, "s2", [call("measure_roi", bbox=_bbox(tmp_path, tid)), answer()])
    child = spawn(tmp_path, "--resume", tid, "--llm", "scripted", "--script", str(s2))
    child.expect(rf"resumed thread {tid}: 2 answered question\(s\), evidence E1, E2, E3")
    child.expect_exact(PROMPT)
    child.sendline("/evidence E2")
    child.expect(r"\[E2\] ct_tissue_composition ok")
    child.expect_exact(PROMPT)
    child.sendline("What is the mean intensity inside that region?")
    child.expect(r"act +\[E4\] measure_roi ok")
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D ends the session
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    store = TraceStore(None, tmp_path / "tr")
    dump = store.dump(tid)
    assert verify_dump(dump, tmp_path / "tr" / "artifacts") == []
    asks = [e["payload"]["request"]["messages"][1]["content"] for e in dump["events"] if e["kind"] == "llm"]
    assert "Earlier in this conversation" not in asks[0]
    # earlier turns reach the planner as their readings, never as their words (issue 32 item 6)
    assert "- Q (as read): <<<a measurement question; subject: amount of fat, soft tissue, bone, lung" in asks[-1]
    assert "- Q (as read): <<<a measurement question; subject: longest diameter (quantity)>>>" in asks[-1]
    assert "How large is the dominant" not in asks[-1]
    turns = [e["payload"] for e in dump["events"] if e["kind"] == "note" and e["name"] == "turn"]
    assert [t["turn"] for t in turns] == [1, 2, 3]


def _bbox(tmp_path: Path, tid: str) -> list[int]:
    dump = TraceStore(None, tmp_path / "tr").dump(tid)
    return next(e["payload"]["evidence"]["output"]["bbox"] for e in dump["events"]
                if e["kind"] == "tool" and e["name"] == "region_measure")


def _plugin(tmp_path: Path) -> Path:
    """The test's Gate tool installed the way a third-party tool is: a distribution with a dxagent.tools entry point."""
    site = tmp_path / "site"
    dist = site / "dxagent_testtools-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dxagent-testtools\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dxagent.tools]\ngate = helpers:Gate\n")
    return site


def test_ctrl_c_during_a_tool_call_cancels_the_turn_and_keeps_the_evidence(tmp_path):
    gate = tmp_path / "gate"
    gate.write_text("closed")
    env = {"PYTHONPATH": f"{_plugin(tmp_path)}:{TESTS}", "DXAGENT_TEST_GATE": str(gate)}
    s = script_file(tmp_path, "s", [call("inspect_image"), call("gate"), call("texture_features")])
    # started with SIGINT ignored (as after a test that ran Ray, or from a shell's background job): the chat must
    # take Ctrl-C back
    child = spawn(tmp_path, CT, "--llm", "scripted", "--script", str(s), env=env, sigint_ignored=True)
    tid = thread_id(child)
    child.expect_exact(PROMPT)
    child.sendline("Is there a gate?")  # Gate's subject: the loop goes on until Ctrl-C
    child.expect(r"act +\[E1\] inspect_image ok")
    child.expect(r"think +→ gate")
    wait_for(str(gate) + ".entered")  # the event, not a guess: the gate tool is running now
    child.sendintr()  # Ctrl-C while the gate tool blocks
    child.expect("cancelling this turn")
    gate.unlink()  # the tool returns; its result is kept, and the turn stops before its next step
    child.expect(r"turn cancelled; the evidence so far \(E1, E2\) is kept")
    child.expect_exact(PROMPT)
    child.sendline("/evidence E2")
    child.expect(r"\[E2\] gate ok")
    child.expect_exact(PROMPT)
    child.sendintr()  # Ctrl-C at the prompt does not leave
    child.expect("Ctrl-C cancels a running turn")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    dump = TraceStore(None, tmp_path / "tr").dump(tid)
    assert dump["run"]["status"] == "cancelled" and verify_dump(dump, None) == []
    tools = [e["name"] for e in dump["events"] if e["kind"] == "tool"]
    assert tools == ["inspect_image", "gate"]  # texture_features never ran


@pytest.mark.timeout(120)
def test_endpoint_answers_cite_evidence_and_uncited_claims_are_flagged(tmp_path, fake_openai):
    from conftest import FakeOpenAI

    fake_openai.reset(FakeOpenAI.text(call("ct_tissue_composition")),
                      FakeOpenAI.text("Fat makes up about 25 % of the body area [E1]. The patient has cancer."))
    child = spawn(tmp_path, CT, "--llm", "openai-json", "--base-url", fake_openai.base_url, "--model", "fake",
                  "--api-key", "none", "-q", "How much fat is there?")
    child.expect(r"act +\[E1\] ct_tissue_composition ok")
    child.expect(r"dxagent: Fat makes up about 25 % of the body area \[E1\]\.")
    child.expect(r"flagged uncited or wrongly cited sentence dropped: 'The patient has cancer\.'")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.timeout(120)
def test_ctrl_c_during_a_silent_endpoint_cancels_the_call_at_once(tmp_path, fake_openai):
    """Issue 32 item 7: Ctrl-C while the endpoint stayed silent gave the prompt back only when the turn's budget
    ended (113 s). The call is abandoned at once; the thread goes on with its state (the next question is answered)."""
    import time

    from conftest import FakeOpenAI

    fake_openai.max_delay = 60.0  # silent for longer than the test waits
    try:
        fake_openai.reset(FakeOpenAI.slow(60), FakeOpenAI.text(call("ct_tissue_composition")),
                          FakeOpenAI.text("Fat is 25% of the body [E1]."))
        child = spawn(tmp_path, CT, "--llm", "openai-json", "--base-url", fake_openai.base_url, "--model", "fake",
                      "--api-key", "none", "--max-seconds", "300", "-q", "How much fat is there?")
        tid = thread_id(child)
        end = time.monotonic() + 60
        while not fake_openai.requests:  # the planner's request is at the endpoint, which stays silent
            assert time.monotonic() < end, "the planner never called the endpoint"
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        child.sendintr()
        child.expect(r"turn cancelled; the evidence so far \(none\) is kept", timeout=10)
        child.expect_exact(PROMPT)
        assert time.monotonic() - t0 < 3
        child.sendline("How much fat is there?")
        child.expect(r"act +\[E1\] ct_tissue_composition ok")
        child.expect(r"dxagent: .*25%.*\[E1\]")  # answered from the evidence of this turn
        child.expect_exact(PROMPT)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        dump = TraceStore(None, tmp_path / "tr").dump(tid)
        assert verify_dump(dump, None) == []
        notes = [e["name"] for e in dump["events"] if e["kind"] == "note" and e["node"] == "turn"]
        assert notes[:2] == ["turn", "cancelled"]
    finally:
        fake_openai.max_delay = FakeOpenAI.max_delay


def test_bad_image_and_unknown_thread_are_one_line_errors(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" * 10)
    for args in ([str(bad), "--llm", "tiny"], ["--resume", "run-nope", "--llm", "tiny"]):
        child = spawn(tmp_path, *args)
        child.expect(pexpect.EOF)
        child.close()
        out = child.before
        assert child.exitstatus == 2 and "error:" in out and "Traceback" not in out, out


@pytest.mark.timeout(300)
def test_embedded_tiny_planner_chooses_the_tools(tmp_path):
    """The embedded runtime (SmolLM2-135M on llama.cpp, no server): the model picks the tool; the answer is assembled
    from the evidence about the question's subject and cites it, or (the 135M model often picks a tool that does not
    measure the region) is an abstention that says why."""
    child = spawn(tmp_path, MR, "--llm", "tiny", "-q", "How large is the dominant bright region?")
    child.timeout = 240
    child.expect(r"think +→ (\w+)\(")
    child.expect(r"act +\[E1\] \w+ (ok|failed)")  # the 135M model's first call may carry bad arguments
    child.expect(r"dxagent: (.*\[E\d+\]|Cannot answer \((budget_spent|evidence_does_not_address)\): .*Needed: a call of .*"
                 r"region_measure)")
    child.expect_exact(PROMPT)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
