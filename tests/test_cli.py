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
