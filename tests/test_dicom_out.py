"""Results as DICOM (agent/app/dicom_out.py): `dxagent run --out` writes a TID 1500 SR and one SEG per mask for a
DICOM input, `--push` stores them in a PACS with STOW-RS, and the trace links the run to their UIDs.

Every object written is checked with dciodvfy (Debian's dicom3tools; scripts/install.sh installs it) and read back with
highdicom: the SR's measurements equal the report's, the SEG's frames equal the tool's mask, the references resolve to
the source images. The round trip runs against a real Orthanc (tests/makers/orthanc.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from makers.orthanc import MISSING, free_port, make_series, start, upload
from pydicom import dcmread
from pydicom.data import get_testdata_file

from agent.app.dicom_out import label_codes, write_objects
from agent.core.state import ArtifactRef, Evidence
from agent.store.artifacts import ArtifactStore
from agent.store.trace import TraceStore

ROOT = Path(__file__).resolve().parents[1]
DCIODVFY = shutil.which("dciodvfy")
QUESTION = "What is the tissue composition of this CT slice?"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def dciodvfy_errors(path: Path) -> list[str]:
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; scripts/install.sh installs it")
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


def masks_of(trace_dir: Path, run_id: str) -> dict[str, tuple[Evidence, ArtifactRef]]:
    """{mask sha256: (evidence, ref)} of a recorded run."""
    out = {}
    for ev in TraceStore(None, trace_dir).dump(run_id)["events"]:
        if ev["kind"] == "tool":
            e = Evidence.model_validate(ev["payload"]["evidence"])
            out.update({a.sha256: (e, a) for a in e.artifacts if a.kind == "mask"})
    return out


def exports(trace_dir: Path, run_id: str) -> list[dict]:
    return [e["payload"] for e in TraceStore(None, trace_dir).dump(run_id)["events"] if e["kind"] == "export"]


def check_seg_equals_mask(seg_path: Path, mask_sha: str, trace_dir: Path, run_id: str, sources: list[str]) -> None:
    """The SEG's frames equal the tool's mask (each label value its own segment, named by the legend); `sources`: the
    source SOP instance UIDs in the view's slice order."""
    seg = hd.seg.segread(seg_path)
    ev, ref = masks_of(trace_dir, run_id)[mask_sha]
    mask = ArtifactStore(trace_dir / "artifacts").get_array(ref)
    values = [int(v) for v in np.unique(mask) if v]
    assert [seg.get_segment_description(i).SegmentLabel for i in range(1, seg.number_of_segments + 1)] \
        == [ref.legend[v] for v in values]
    uids = [u[2] for u in seg.get_source_image_uids()]
    assert uids and set(uids) <= set(sources)  # every referenced instance is a source image
    order = sorted(uids, key=sources.index)
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=order, combine_segments=True,
                                            skip_overlap_checks=True)
    want = mask[[sources.index(u) for u in order]] if mask.ndim == 3 else mask[None]
    remap = np.zeros(256, dtype=np.uint8)
    remap[values] = np.arange(1, len(values) + 1)
    assert np.array_equal(got, remap[want])


def texts(ds) -> list[str]:
    """Every TEXT value and algorithm parameter in an SR's content tree."""
    out = [str(ds.TextValue)] if "TextValue" in ds else []
    out += [str(ds.AlgorithmParameters)] if "AlgorithmParameters" in ds else []
    for item in ds.get("ContentSequence", []):
        out += texts(item)
    return out


def check_sr(sr_path: Path, report: dict, source_uids: set[str]) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(sr_path)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(report["findings"]) + 1  # the findings, then the answer
    for g, f in zip(groups, report["findings"], strict=False):
        assert g.tracking_identifier.startswith(report["run_id"]) and ",".join(f["evidence_ids"]) in g.tracking_identifier
        got = [(m.value, m.unit.meaning) for m in g.get_measurements()]
        assert got == [(float(m["value"]), m["unit"]) for m in f["measurements"]]  # values equal the report's
        refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in g.source_images}
        assert refs and refs <= source_uids
    answer = groups[-1]
    assert answer.tracking_identifier.startswith(report["run_id"]) and answer.finding_type.meaning == "Answer to the question"
    if report["answer"]["kind"] == "yes_no":
        assert answer.get_qualitative_evaluations()[0].value.meaning == report["answer"]["value"].capitalize()
    text = " ".join(texts(sr))
    for want in (report["run_id"], "RESEARCH USE ONLY", report["recommendation"]["outcome"]):
        assert want in text
    return sr


@pytest.fixture(scope="module")
def file_run(tmp_path_factory):
    """`dxagent run CT_small.dcm --out DIR --push <a PACS that is down>`: the push fails in one line, nothing is lost."""
    tmp = tmp_path_factory.mktemp("dicom_out")
    dead = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    r = cli("run", get_testdata_file("CT_small.dcm"), "-q", QUESTION, "--llm", "tiny", "--trace-dir", str(tmp / "tr"),
            "--out", str(tmp / "out"), "--push", dead)
    return r, tmp


def test_sr_and_seg_validate_and_carry_the_report(file_run):
    r, tmp = file_run
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: storing to")
    assert "cannot reach the PACS" in r.stderr and "Traceback" not in r.stderr
    report = json.loads((tmp / "out" / "report.json").read_text())  # the report files were written before the push
    assert (tmp / "out" / "report.fhir.json").is_file()
    src = dcmread(get_testdata_file("CT_small.dcm"))
    files = sorted((tmp / "out").glob("*.dcm"))
    assert [f.name for f in files if f.name == "report.sr.dcm"] and len(files) >= 3  # SR + body + tissue SEGs
    for f in files:
        assert dciodvfy_errors(f) == [], f.name
        ds = dcmread(f)
        assert ds.StudyInstanceUID == src.StudyInstanceUID  # attached to the source study
    check_sr(tmp / "out" / "report.sr.dcm", report, {str(src.SOPInstanceUID)})
    (exp,) = exports(tmp / "tr", report["run_id"])  # the trace links the run to the objects written, and says why
    for o in exp["objects"][1:]:
        check_seg_equals_mask(tmp / "out" / o["file"], o["mask"], tmp / "tr", report["run_id"], [str(src.SOPInstanceUID)])
    assert exp["pushed_to"] is None and "cannot reach the PACS" in exp["push_error"]
    assert {o["file"] for o in exp["objects"]} == {f.name for f in files}
    assert "Patient" not in json.dumps(exp) and str(src.PatientID) not in json.dumps(exp)
    show = cli("trace", "show", report["run_id"], "--trace-dir", str(tmp / "tr"))
    assert show.returncode == 0 and "record: intact" in show.stdout
    assert exp["objects"][0]["sop_instance_uid"] in show.stdout
    page = cli("trace", "html", report["run_id"], "--trace-dir", str(tmp / "tr"), "--out", str(tmp / "audit.html"))
    html = (tmp / "audit.html").read_text()
    assert page.returncode == 0 and f"export · {len(files)} DICOM object(s)" in html and "push: " in html
    assert all(o["sop_instance_uid"] in html for o in exp["objects"])  # the audit page lists what was written
    seg = next(o for o in exp["objects"] if o["kind"] == "SEG")
    found = cli("trace", "uid", seg["sop_instance_uid"], "--trace-dir", str(tmp / "tr"))
    assert found.returncode == 0 and report["run_id"] in found.stdout and seg["evidence"] in found.stdout


def test_label_codes_use_snomed_where_one_fits():
    cat, typ, std = label_codes("liver")
    assert (typ.value, typ.scheme_designator, cat.value, std) == ("10200004", "SCT", "91723000", True)
    assert label_codes("left lung")[1].value == "44029006" and label_codes("soft tissue")[0].meaning == "Tissue"
    cat, typ, std = label_codes("dominant region")
    assert typ.scheme_designator == "99DXA" and typ.meaning == "dominant region" and not std


def test_a_mask_on_a_crop_lands_on_the_source_grid_and_png_input_writes_nothing(tmp_path):
    """A SEG of a mask on a zoomed crop (V2) is put back where the crop came from on the source image; a PNG input has
    nothing to reference, and says so."""
    from helpers import make_ctx
    from PIL import Image

    store = ArtifactStore(tmp_path / "art")
    path = get_testdata_file("CT_small.dcm")
    ctx = make_ctx(store, path)
    v1 = ctx.state.views[0]
    pix = ctx.pixels("V1")
    r0, c0, r1, c1 = 20, 30, 60, 90
    crop = np.repeat(np.repeat(pix[r0:r1, c0:c1], 2, 0), 2, 1)
    v2 = ctx.add_view(crop, v1, {"tool": "crop_zoom", "bbox_px": [r0, c0, r1, c1], "zoom": 2.0, "parent": "V1"})
    on_crop = np.zeros(crop.shape, dtype=np.uint8)
    on_crop[10:30, 40:80] = 1  # source rows 25..35, cols 50..70
    ref = ctx.save_mask(on_crop, "test mask", legend={1: "lesion"}, view=v2.id)
    state = ctx.state.model_copy(update={"views": [v1, v2], "evidence": [Evidence(
        id="E1", tool="litemedsam", tool_version="1", args={"view": "V2"}, status="ok", artifacts=[ref])]})
    report = {"run_id": "run-test", "findings": [], "question": "q", "answer": {}, "recommendation": {"outcome": "report"},
              "disclaimer": "RESEARCH USE ONLY", "versions": {"dxagent": "0"}}
    written = write_objects(report, state, store, [path], tmp_path / "out")
    assert [o["kind"] for o in written.objects] == ["SR", "SEG"] and not written.skipped
    seg = hd.seg.segread(tmp_path / "out" / written.objects[1]["file"])
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=[str(dcmread(path).SOPInstanceUID)],
                                            combine_segments=True)[0]
    want = np.zeros(pix.shape, dtype=np.uint8)
    want[25:35, 50:70] = 1
    assert np.array_equal(got, want)
    assert seg.get_segment_description(1).SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # Lesion
    assert dciodvfy_errors(tmp_path / "out" / written.objects[1]["file"]) == []

    png = tmp_path / "ct.png"
    Image.fromarray((pix - pix.min()) * 255 // max(1, int(pix.max() - pix.min()))).convert("L").save(png)
    pctx = make_ctx(store, png)
    nothing = write_objects(report, pctx.state, store, [str(png)], tmp_path / "png_out")
    assert not nothing.objects and "no DICOM input" in nothing.skipped[0] and not (tmp_path / "png_out").exists()


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_round_trip_through_orthanc(tmp_path):
    """Upload a 4-slice CT series, `dxagent run dicomweb://... --push source`, and read the SR and SEG back from the
    PACS: the same objects, their references resolve to the study's instances, the SEG frames equal the 3D mask."""
    import httpx

    proc, url = start(tmp_path / "pacs")
    try:
        study, series, paths = make_series(tmp_path / "series", 4)
        for p in paths:
            upload(url, p)
        ref = url.replace("http://", "dicomweb://") + f"/dicom-web?study={study}"
        r = cli("run", ref, "-q", QUESTION, "--llm", "tiny", "--trace-dir", str(tmp_path / "tr"), "--out",
                str(tmp_path / "out"), "--push", "source", "--json", env={"DXAGENT_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stderr[-800:]
        report = json.loads(r.stdout)
        (exp,) = exports(tmp_path / "tr", report["run_id"])
        assert exp["pushed_to"] == url.replace("http://", "dicomweb://") + "/dicom-web" and not exp.get("push_error")
        series_found = httpx.get(f"{url}/dicom-web/studies/{study}/series", timeout=10).json()
        by_modality = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in series_found}
        assert {"CT", "SR", "SEG"} <= set(by_modality)  # written back into the same study
        from agent.imaging.dicomweb import client

        c = client(f"{url}/dicom-web")
        pushed = {str(ds.SOPInstanceUID): ds for o in exp["objects"]
                  for ds in [c.retrieve_instance(study, o["series_instance_uid"], o["sop_instance_uid"])]}
        assert set(pushed) == {o["sop_instance_uid"] for o in exp["objects"]}
        for o in exp["objects"]:  # the PACS holds exactly what was written to disk, and each validates
            assert dciodvfy_errors(tmp_path / "out" / o["file"]) == [], o["file"]
            local = dcmread(tmp_path / "out" / o["file"])
            assert pushed[o["sop_instance_uid"]].SOPClassUID == local.SOPClassUID
            (tmp_path / "back").mkdir(exist_ok=True)
            pushed[o["sop_instance_uid"]].save_as(tmp_path / "back" / o["file"], enforce_file_format=True)
        sources = [str(dcmread(p).SOPInstanceUID) for p in sorted(paths)]  # slice order = position order here
        in_pacs = {i["00080018"]["Value"][0] for i in
                   httpx.get(f"{url}/dicom-web/studies/{study}/series/{series}/instances", timeout=10).json()}
        assert set(sources) == in_pacs
        check_sr(tmp_path / "back" / "report.sr.dcm", report, in_pacs)  # the copies read back from the PACS
        segs = [o for o in exp["objects"] if o["kind"] == "SEG"]
        assert segs and any(o["frames"] > 1 for o in segs)
        for o in segs:
            check_seg_equals_mask(tmp_path / "back" / o["file"], o["mask"], tmp_path / "tr", report["run_id"], sources)
    finally:
        proc.terminate()
        proc.wait(10)


def test_push_arguments_are_checked_before_the_run(tmp_path):
    """A --push that cannot work fails in one line before any analysis: 'source' for a file, a server with a query."""
    ct = get_testdata_file("CT_small.dcm")
    for push, why in (("source", "needs an input from a PACS"), ("dicomweb://h/x?study=1.2", "with no query")):
        r = cli("run", ct, "--push", push, "--llm", "tiny", "--trace-dir", str(tmp_path / "tr"))
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tr").exists() or not TraceStore(None, tmp_path / "tr").runs()  # no run was started


_ODD_PATIENT = '''
import json, sys
import numpy as np
from helpers import make_ctx
from agent.app.dicom_out import write_objects
from agent.core.state import Evidence
from agent.store.artifacts import ArtifactStore

src, tmp = sys.argv[1], sys.argv[2]
store = ArtifactStore(tmp + "/art")
ctx = make_ctx(store, src)
mask = np.zeros(ctx.state.views[0].shape, dtype=np.uint8)
mask[10:30, 40:80] = 1
ref = ctx.save_mask(mask, "test mask", legend={1: "lesion"}, view="V1")
state = ctx.state.model_copy(update={"evidence": [Evidence(id="E1", tool="litemedsam", tool_version="1",
                                                           args={"view": "V1"}, status="ok", artifacts=[ref])]})
report = {"run_id": "run-test", "findings": [], "question": "q", "answer": {}, "recommendation": {"outcome": "report"},
          "disclaimer": "RESEARCH USE ONLY", "versions": {"dxagent": "0"}}
w = write_objects(report, state, store, [src], tmp + "/out")
print(json.dumps({"objects": w.objects, "skipped": w.skipped, "notes": w.notes}))
'''


def test_odd_patient_attributes_neither_break_export_nor_flood_stderr(tmp_path):
    """Issue 32 item 7: a PatientSex outside M/F/O made SR/SEG export fail after a complete report (highdicom refuses
    it), and highdicom's warning printed a 10,000-character PatientName to stderr. The attributes copied into the
    SR/SEG are made valid (PatientSex empty, the name cut to DICOM's 64 characters), the manifest notes it without the
    values, and library warnings become one bounded note: the objects are written, valid, in the source's study."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    src = tmp_path / "odd.dcm"
    with pytest.warns(UserWarning):  # pydicom warns about the values it is given, and writes them
        ds.PatientSex = "UNKNOWN-XYZ"
        ds.PatientName = "X" * 10_000  # no caret: highdicom's check warns, quoting the whole name
        ds.save_as(src)
    r = subprocess.run([sys.executable, "-c", _ODD_PATIENT, str(src), str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    assert r.returncode == 0, r.stderr[-1500:]
    assert max(map(len, r.stderr.splitlines()), default=0) < 500 and "XXXXXXXXXX" not in r.stderr, r.stderr[:600]
    out = json.loads(r.stdout)
    assert [o["kind"] for o in out["objects"]] == ["SR", "SEG"] and not out["skipped"]
    notes = " ".join(out["notes"])
    assert "PatientSex" in notes and "PatientName" in notes and "UNKNOWN-XYZ" not in notes and "XXX" not in notes
    assert len(notes) < 1000
    for o in out["objects"]:
        f = tmp_path / "out" / o["file"]
        assert dciodvfy_errors(f) == [], o["file"]
        got = dcmread(f)
        assert got.PatientSex == "" and str(got.PatientName) == "X" * 64
        assert (got.PatientID, got.StudyInstanceUID) == (ds.PatientID, ds.StudyInstanceUID)
