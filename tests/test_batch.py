"""Batch processing: manifests with bad rows, the real CLI with worker processes and the tiny planner, a kill -9
in the middle and the resume, reference-label agreement, and a batch over realcases."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import call
from pydicom.data import get_testdata_file

from agent.app.batch import ManifestError, agreement, read_manifest, run_batch

DX = [sys.executable, "-m", "agent.app.cli"]
CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
TISSUE_Q = "What is the tissue composition of this CT slice: how much fat and bone?"


def write_jsonl(path: Path, rows: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "study"
    (d / "imgs").mkdir(parents=True)
    shutil.copy(CT, d / "imgs" / "ct.dcm")
    shutil.copy(MR, d / "imgs" / "mr.dcm")
    (d / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return d


def test_manifest_rows_are_checked_one_by_one(images, tmp_path):
    (tmp_path / "outside.png").write_bytes(b"x")
    m = write_jsonl(images / "m.jsonl", [
        {"case_id": "a", "image": "imgs/ct.dcm", "labels": ["fat"]},
        {"case_id": "b", "images": ["imgs/mr.dcm"], "findings": "edema|mass", "modality": "mr"},
        {"case_id": "esc", "image": "../outside.png"},
        {"case_id": "abs", "image": str(tmp_path / "outside.png")},
        {"case_id": "gone", "image": "imgs/nope.png"},
        {"case_id": "a", "image": "imgs/ct.dcm"},
        {"case_id": "noimg"},
        [1, 2],
        {"case_id": "weird/id with spaces", "image": "imgs/ct.dcm"},
        {"case_id": "x/y", "image": "imgs/ct.dcm"},
        {"case_id": "x__y", "image": "imgs/ct.dcm"},
    ], extra="{not json\n")
    root, specs = read_manifest(m)
    assert root == images.resolve()
    by = {s.where: s for s in specs}
    assert by["line 1"].error is None and by["line 1"].paths == [str((images / "imgs/ct.dcm").resolve())]
    assert by["line 2"].labels == ["edema", "mass"] and by["line 2"].modality == "MR"
    assert "escapes the manifest's folder" in by["line 3"].error and "escapes" in by["line 4"].error
    assert by["line 5"].error.endswith("imgs/nope.png: no such file")
    assert "case id 'a' is repeated" in by["line 6"].error
    assert "no image path" in by["line 7"].error
    assert "a JSON object is needed" in by["line 8"].error
    assert by["line 9"].case_id.startswith("weird__id_with_spaces-") and by["line 9"].error is None
    # "x/y" and "x__y" would share a folder after sanitising: the altered one carries a hash of the original id
    assert by["line 11"].case_id == "x__y" and by["line 10"].case_id.startswith("x__y-")
    assert by["line 10"].error is None and by["line 11"].error is None
    assert by["line 12"].error.startswith("line 12: not JSON")
    assert all("\n" not in (s.error or "") for s in specs)

    bad_csv = images / "bad.csv"
    bad_csv.write_text("case,file\nx,imgs/ct.dcm\n")
    with pytest.raises(ManifestError, match="the header needs an image column"):
        read_manifest(bad_csv)
    good_csv = images / "good.csv"
    good_csv.write_text("case_id,image,labels\nc1,imgs/ct.dcm,fat;bone\nc2,imgs/mr.dcm,,extra\n")
    _, specs = read_manifest(good_csv)
    assert specs[0].labels == ["fat", "bone"] and "1 cell(s) more than the header" in specs[1].error
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(images / "missing.jsonl")
    # a folder: every image is a case; a folder of DICOM slices is one case (a series)
    series = images / "imgs" / "series1"
    series.mkdir()
    for i in range(3):
        shutil.copy(CT, series / f"slice{i}")  # DICOM without a suffix, found by its DICM magic
    _, specs = read_manifest(images / "imgs")
    assert sorted(s.case_id for s in specs) == ["broken", "ct", "mr", "series1"]


def test_batch_scripted_records_failures_and_agreement(images, tmp_path):
    m = write_jsonl(images / "m.jsonl", [
        {"case_id": "ct", "image": "imgs/ct.dcm", "labels": ["soft tissue"]},
        {"case_id": "broken", "image": "imgs/broken.png", "labels": ["x"]},
        {"case_id": "gone", "image": "imgs/gone.png"},
    ])
    seen = []
    out = tmp_path / "out"
    s = run_batch(m, out, workers=1, llm="scripted", script=[call("ct_tissue_composition")], question=TISSUE_Q,
                  on_case=seen.append)
    assert s.counts == {"done": 1, "failed": 1, "invalid": 1} and {r["case_id"] for r in seen} == {"ct", "broken", "gone"}
    rep = json.loads((out / "cases" / "ct" / "report.json").read_text())
    assert rep["findings"] and (out / "cases" / "ct" / "report.md").read_text().startswith("# dxagent report")
    failed = json.loads((out / "cases" / "broken" / "result.json").read_text())
    assert failed["status"] == "failed" and "broken.png" in failed["error"] and "\n" not in failed["error"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["case_id"] for r in rows] == ["ct", "broken", "gone"]
    assert {r["status"] for r in rows} == {"done", "failed", "invalid"}
    assert (out / "agreement.csv").exists()
    # the agreement table by hand: two cases, one label predicted right, one missed
    recs = [{"status": "done", "labels": ["Cardiomegaly"], "predicted": ["cardiomegaly"]},
            {"status": "done", "labels": ["effusion"], "predicted": []},
            {"status": "done", "labels": ["Pleural effusion"], "predicted": ["effusion", "cardiomegaly"]},
            {"status": "failed", "labels": ["effusion"]}]
    table = {r["label"]: r for r in agreement(recs)}
    assert table["effusion"]["tp"] == 1 and table["effusion"]["fn"] == 1 and table["effusion"]["cases"] == 3
    assert table["cardiomegaly"]["fp"] == 1 and table["cardiomegaly"]["sensitivity"] == 1.0
    # re-running skips the completed case and retries the failed one
    s2 = run_batch(m, out, workers=1, llm="scripted", script=[call("ct_tissue_composition")], question=TISSUE_Q)
    assert s2.skipped == 1 and s2.ran == 1


def test_cli_batch_survives_kill_9_and_resumes(images, tmp_path):
    """The real CLI with two worker processes and the tiny planner: kill -9 the whole process group once some cases
    are complete, then run the same command again."""
    rows = [{"case_id": f"c{i}", "image": "imgs/ct.dcm" if i % 2 else "imgs/mr.dcm"} for i in range(8)]
    m = write_jsonl(images / "m.jsonl", rows)
    out = tmp_path / "out"
    cmd = DX + ["batch", str(m), "--out", str(out), "--llm", "tiny", "-j", "2", "--max-steps", "2", "-q", TISSUE_Q]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = list((out / "cases").glob("*/result.json")) if (out / "cases").exists() else []
            if len(done) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name: json.loads(p.read_text()) for p in (out / "cases").glob("*/result.json")}
    assert len(finished) >= 2, "no case finished before the kill"
    assert len(finished) < 8 or proc.returncode == 0
    # nothing half-written: every report.json that exists parses, every complete case has its report
    for d in (out / "cases").iterdir():
        if (d / "report.json").exists():
            json.loads((d / "report.json").read_text())
    for cid, rec in finished.items():
        if rec["status"] == "done":
            assert json.loads((out / "cases" / cid / "report.json").read_text())["run_id"] == rec["run_id"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    latest = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        latest[rec["case_id"]] = rec
    assert {c for c, r in latest.items() if r["status"] == "done"} == {f"c{i}" for i in range(8)}
    for cid, rec in finished.items():  # complete before the kill: kept, not run again
        if rec["status"] == "done":
            assert latest[cid]["run_id"] == rec["run_id"]
    assert f"already complete in {out}" in res.stderr.replace("\n", "") or "skipped" in res.stderr
    assert len(list(csv.DictReader((out / "summary.csv").open()))) == 8


def test_batch_over_realcases(realcases, tmp_path):
    """Labelled realcases of three kinds, through the graph with the scripted planner's inspect call (the planner is
    not what this tests): every case completes and the agreement table is written."""
    rows = [json.loads(x) for x in (realcases / "cases.jsonl").read_text().splitlines()]
    pick = []
    for source in ("ham10000_dermoscopy", "covid_ct", "busi_ultrasound"):
        pick += [r for r in rows if r.get("source") == source][:2]
    if len(pick) < 2:
        pytest.skip("realcases has none of the chosen sources")
    m = write_jsonl(tmp_path / "real.jsonl", pick)  # image paths relative to realcases: --root
    s = run_batch(m, tmp_path / "out", root=realcases, workers=2, llm="scripted", script=[call("inspect_image")],
                  question="Describe the image.")
    recs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cases").glob("*/result.json")]
    assert s.counts.get("done", 0) + s.counts.get("invalid", 0) == len(pick), [r.get("error") for r in recs]
    assert s.counts.get("done", 0) >= 2


def test_ray_executor_on_a_local_instance(images, tmp_path):
    pytest.importorskip("ray")
    m = write_jsonl(images / "m.jsonl", [
        {"case_id": "ct", "image": "imgs/ct.dcm"},
        {"case_id": "mr", "image": "imgs/mr.dcm"},
        {"case_id": "broken", "image": "imgs/broken.png"},
        {"case_id": "gone", "image": "imgs/gone.png"},
    ])
    out = tmp_path / "out"
    s = run_batch(m, out, workers=2, executor="ray", llm="scripted", script=[call("inspect_image")],
                  question="What is the pixel spacing?")
    assert s.counts == {"done": 2, "failed": 1, "invalid": 1}
    recs = {p.parent.name: json.loads(p.read_text()) for p in (out / "cases").glob("*/result.json")}
    assert recs["ct"]["status"] == "done" and recs["mr"]["status"] == "done"
    assert recs["ct"]["worker"] != os.getpid()  # ran in a Ray worker process
    from agent.store.trace import TraceStore

    store = TraceStore(None, out / "traces")  # the workers' trace events landed in the one store, chains intact
    for cid in ("ct", "mr"):
        assert store.verify_chain(recs[cid]["run_id"]) is None and store.get_run(recs[cid]["run_id"]).status == "done"
    # resume on Ray: nothing left but the failed case
    s2 = run_batch(m, out, workers=2, executor="ray", llm="scripted", script=[call("inspect_image")])
    assert s2.skipped == 2 and s2.ran == 1


def test_a_huge_manifest_or_row_is_one_line_and_bounded(tmp_path, monkeypatch):
    """A manifest is read only up to its cap (DXAGENT_MAX_MANIFEST_BYTES), never whole; a row longer than a row may
    be is that row's error, not a parse of it (a 1 GB line once cost 3.2 GB of memory); the eval reader shares both."""
    import json as _json
    import shutil

    from agent.app.eval_data import read_eval_manifest

    shutil.copy(CT, tmp_path / "ct.dcm")  # a manifest's images lie under its folder
    shutil.copy(MR, tmp_path / "mr.dcm")
    rows = [{"image": "ct.dcm", "question": "What modality?", "answer": "CT"},
            {"image": "ct.dcm", "question": "x" * (2**20 + 10)},
            {"image": "mr.dcm", "question": "What modality?", "answer": "MR"}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    _, specs = read_manifest(m)
    assert [s.error is None for s in specs] == [True, False, True] and "longer than a manifest row" in specs[1].error
    _, items = read_eval_manifest(m)
    assert sum("longer than a manifest row" in (i.error or "") for i in items) == 1
    monkeypatch.setenv("DXAGENT_MAX_MANIFEST_BYTES", "1000")
    for reader in (read_manifest, read_eval_manifest):
        with pytest.raises(ManifestError, match="the cap for a manifest") as exc:
            reader(m)
        assert "\n" not in str(exc.value)
    monkeypatch.setenv("DXAGENT_MAX_MANIFEST_BYTES", "lots")  # a cap that is not a size is said, not ignored
    with pytest.raises(ManifestError, match="not a positive whole number"):
        read_manifest(m)
