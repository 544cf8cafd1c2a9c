"""`dxagent` driven as a user would: a real process, real files, the tiny embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

DX = [sys.executable, "-m", "agent.app.cli"]
CT = get_testdata_file("CT_small.dcm")


def dx(*args, cwd=None, timeout=600):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*DX, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_run_end_to_end_on_bundled_ct_with_tiny_model(tmp_path):
    r = dx("run", CT, "-q", "What is the tissue composition of this CT slice?", "--llm", "tiny", "--json",
           "--trace-dir", tmp_path, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert "trace id: " + report["run_id"] in r.stderr
    assert report["disclaimer"].startswith("RESEARCH USE ONLY")
    assert report["study"]["modality"] == "CT" and report["study"]["spacing_mm"] != "unknown"
    ids = {e["id"] for e in report["evidence"] if e["status"] == "ok"}
    assert all(set(f["evidence_ids"]) <= ids and f["evidence_ids"] for f in report["findings"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "RESEARCH USE ONLY" in md and "## Findings" in md
    shown = dx("trace", "show", report["run_id"], "--trace-dir", tmp_path)
    assert shown.returncode == 0 and "record: intact" in shown.stdout
    # a run with a real (tiny) LLM replays from its record, loading no model
    replayed = dx("replay", report["run_id"], "--trace-dir", tmp_path)
    assert replayed.returncode == 0 and "verified" in replayed.stdout and "identical" in replayed.stdout, \
        replayed.stdout + replayed.stderr


def test_tools_lists_the_tools():
    r = dx("tools")
    assert r.returncode == 0
    for name in ("inspect_image", "window_level", "crop_zoom", "ct_tissue_composition", "region_measure"):
        assert name in r.stdout
    cards = {c["name"]: c for c in json.loads(dx("tools", "--json").stdout)}
    assert {"litemedsam", "similar_cases", "texture_features", "cxr_lung_fields"} <= set(cards)
    # every learned or validated tool states its limits and its figure on real data
    assert cards["litemedsam"]["limitations"] and "Dice" in cards["litemedsam"]["validation"]
    assert cards["cardiothoracic_ratio"]["modalities"] == ["CR", "DX"]


@pytest.mark.parametrize("kind", ["empty", "text", "missing", "truncated"])
def test_bad_input_gives_one_line_error(tmp_path, kind):
    path = tmp_path / f"{kind}.dcm"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n" * 20)
    elif kind == "truncated":
        path.write_bytes(Path(CT).read_bytes()[:3000])
    r = dx("run", path, "--llm", "tiny", "--trace-dir", tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr


def test_unknown_llm_is_one_line_error(tmp_path):
    r = dx("run", CT, "--llm", "nonsense", "--trace-dir", tmp_path)
    assert r.returncode == 2 and "unknown --llm" in r.stderr and "Traceback" not in r.stderr


# -- storage faults: one line, exit 2, no broken file (issue 32) ------------------------------------------------------

@pytest.fixture
def mount(tmp_path):
    """mount(name, options) -> a small tmpfs folder under tmp_path (unmounted afterwards); root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (full or read-only disk) needs root")
    made = []

    def _mount(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:120]}")
        made.append(where)
        return where

    yield _mount
    for where in reversed(made):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _one_line_exit_2(r) -> str:
    """The failure is one `error:` line, the last on stderr (a run's live steps may precede it), and exit 2."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert r.returncode == 2 and errors == lines[-1:] and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    return lines[-1]


def test_an_out_that_cannot_take_the_reports_fails_before_the_run(tmp_path, mount):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    line = _one_line_exit_2(dx("run", CT, "--llm", "tiny", "--trace-dir", tmp_path / "t", "--out", a_file))
    assert "is a file, not a folder" in line
    assert not (tmp_path / "t" / "dxagent.sqlite").exists()  # refused before any run started
    ro = mount("ro", "ro,size=64k")
    line = _one_line_exit_2(dx("run", CT, "--llm", "tiny", "--trace-dir", tmp_path / "t", "--out", ro / "out"))
    assert "cannot be written" in line and "Read-only" in line


def test_a_trace_store_on_a_read_only_or_full_disk_is_one_line(tmp_path, mount):
    ro = mount("ro", "ro,size=64k")
    for args in (["trace", "list"], ["trace", "verify", "--all"], ["run", CT, "--llm", "tiny"]):
        line = _one_line_exit_2(dx(*args, "--trace-dir", ro / "traces"))
        assert "Read-only file system" in line, line
    full = mount("full", "size=48k")
    line = _one_line_exit_2(dx("run", CT, "--llm", "tiny", "--trace-dir", full / "traces"))
    assert "full" in line.lower() or "space" in line.lower(), line


def test_a_full_disk_under_out_leaves_no_half_written_report(tmp_path, mount):
    full = mount("fullout", "size=64k")
    (full / "ballast").write_bytes(b"\0" * (60 * 1024))  # room for the check's empty file, not for a report
    r = dx("run", CT, "-q", "What is the tissue composition of this CT slice?", "--llm", "tiny",
           "--trace-dir", tmp_path / "t", "--out", full / "out")
    line = _one_line_exit_2(r)
    assert "No space left on device" in line, line
    left = [p.name for p in (full / "out").iterdir()]
    assert "report.json" not in left and not [n for n in left if n.endswith(".tmp")], left


def test_the_careful_operating_point_withholds_and_its_run_replays_under_it(tmp_path, monkeypatch):
    """Issue 30: 'careful' withholds answers under the threshold fitted for at most 10 % wrong answers (the organ
    segmenter's "absent", right 0.69 of the time); the run records the threshold, so its replay (with none set)
    answers under it too and verifies; --min-probability refuses a value that is not a probability in one line."""
    from agent.engine.replay import replay
    from agent.engine.session import run_case
    from agent.store.trace import TraceStore

    got = {}
    for mp in ("careful", "0.5"):
        monkeypatch.setenv("DXAGENT_MIN_PROBABILITY", mp)
        got[mp] = run_case([CT], "Does the picture contain a kidney?", llm="tiny", trace_dir=tmp_path)
    monkeypatch.delenv("DXAGENT_MIN_PROBABILITY")
    assert got["careful"].report["answer"]["reason"] == "low_confidence"
    assert got["0.5"].report["answer"]["value"] == "no" and got["0.5"].report["answer"]["probability"] < 0.77
    assert replay(TraceStore(None, tmp_path).dump(got["careful"].run_id)).verified
    bad = dx("run", CT, "--min-probability", "1.5", "--trace-dir", tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "between 0 and 1" in bad.stderr
