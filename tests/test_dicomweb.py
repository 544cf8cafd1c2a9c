"""DICOMweb input (agent/imaging/dicomweb.py) against a real Orthanc with its DICOMweb plugin.

The fixture starts Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`; scripts/install.sh installs them) on a free
loopback port with a temporary storage folder, uploads pydicom's bundled CT and MR files through Orthanc's REST API,
and stops it afterwards. Skipped with a message where Orthanc or its plugin is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import call
from makers.orthanc import MISSING, free_port, start, upload
from pydicom import dcmread
from pydicom.data import get_testdata_file

from agent.imaging import dicomweb
from agent.imaging.dicomweb import DicomWebError

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "dx", "secret-pw"


def _start(tmp: Path, auth: bool) -> tuple[subprocess.Popen, str]:
    try:
        return start(tmp, {USER: PASSWORD} if auth else None)
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """(base URL, {name: (study UID, series UID)}) of an Orthanc holding the bundled CT and MR slices."""
    tmp = tmp_path_factory.mktemp("orthanc")
    proc, url = _start(tmp, auth=False)
    studies = {}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name)
        upload(url, path)
        ds = dcmread(path, stop_before_pixels=True)
        studies[name] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    yield url, studies
    proc.terminate()
    proc.wait(10)


def ref(url: str, study: str, series: str | None = None) -> str:
    return url.replace("http://", "dicomweb://") + f"/dicom-web?study={study}" + (f"&series={series}" if series else "")


def test_parse_references():
    r = dicomweb.parse("dicomweb://pacs.local:8042/dicom-web?study=1.2.3&series=1.2.3.4")
    assert (r.base_url, r.study, r.series) == ("http://pacs.local:8042/dicom-web", "1.2.3", "1.2.3.4")
    assert dicomweb.parse("dicomwebs://h/wado/?study=9.8").base_url == "https://h/wado"
    for bad, why in (("dicomweb://h/dicom-web", "study=UID"), ("dicomweb://u:p@h/x?study=1.2", "credentials"),
                     ("dicomweb://h/x?study=1.2;DROP", "not a DICOM UID"), ("dicomweb://h/x?study=1.2&bogus=1", "bogus")):
        with pytest.raises(DicomWebError, match=why):
            dicomweb.parse(bad)
    assert dicomweb.resolve(["a.png"]) == ["a.png"]


def test_retrieve_is_cached_by_instance_and_loads_like_the_file(pacs, tmp_path):
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore

    url, studies = pacs
    study, series = studies["CT_small.dcm"]
    folders = dicomweb.resolve([ref(url, study)], cache=tmp_path / "cache")
    assert len(folders) == 1 and study not in folders[0] and series not in folders[0]  # no UID in a file name
    files = list(Path(folders[0]).iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    assert dicomweb.resolve([ref(url, study, series)], cache=tmp_path / "cache") == folders
    assert files[0].stat().st_mtime_ns == mtime  # the second run retrieved nothing
    store = ArtifactStore(tmp_path / "art")
    remote = load_views(folders, store)[0]
    local = load_views([get_testdata_file("CT_small.dcm")], store)[0]
    assert remote.modality == "CT" and remote.pixels.sha256 == local.pixels.sha256
    assert remote.spacing_mm == local.spacing_mm


def test_dxagent_run_on_a_pacs_study(pacs, tmp_path):
    url, studies = pacs
    study, _ = studies["CT_small.dcm"]
    env = {**os.environ, "DXAGENT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "agent.app.cli", "run", ref(url, study), "-q",
                        "What is the tissue composition of this CT slice?", "--llm", "tiny", "--trace-dir",
                        str(tmp_path / "tr"), "--json", "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    report = json.loads(r.stdout)
    fhir = json.loads((tmp_path / "out" / "report.fhir.json").read_text())  # the FHIR report references the study
    assert fhir["entry"][0]["resource"]["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
    assert report["study"]["modality"] == "CT"
    from agent.store.trace import TraceStore

    trace = json.dumps(TraceStore(None, tmp_path / "tr").dump(report["run_id"]), default=str)
    for text in (json.dumps(report), trace):  # the study's UIDs (identifiers) reach neither the report nor the trace
        assert study not in text and studies["CT_small.dcm"][1] not in text


def test_bad_references_are_one_line_errors(pacs, tmp_path):
    url, studies = pacs
    cache = tmp_path / "c"
    with pytest.raises(DicomWebError, match="no such study|no series"):
        dicomweb.resolve([ref(url, "1.2.3.4.5.6.7")], cache=cache)
    with pytest.raises(DicomWebError, match="cannot reach the PACS"):
        dicomweb.resolve([ref(f"http://127.0.0.1:{free_port()}", "1.2.3")], cache=cache)
    env = {**os.environ, "DXAGENT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "agent.app.cli", "run", ref(url, "1.2.3.4.5.6.7"), "--llm", "tiny",
                        "--trace-dir", str(tmp_path / "tr")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


def test_refused_request_says_how_to_authenticate(tmp_path, monkeypatch):
    proc, url = _start(tmp_path, auth=True)
    try:
        path = get_testdata_file("MR_small.dcm")
        upload(url, path, auth=(USER, PASSWORD))
        study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        monkeypatch.delenv("DXAGENT_DICOMWEB_TOKEN", raising=False)
        monkeypatch.delenv("DXAGENT_DICOMWEB_USER", raising=False)
        with pytest.raises(DicomWebError, match=r"refused the request \(401\).*DXAGENT_DICOMWEB_USER"):
            dicomweb.resolve([ref(url, study)], cache=tmp_path / "c")
        target = dicomweb.push_target("source", [ref(url, study)])
        with pytest.raises(DicomWebError, match=r"storing to .*refused the request \(401\)") as refused:
            dicomweb.store(target, [dcmread(path)])  # a push without credentials: the same one line
        assert "\n" not in str(refused.value)
        monkeypatch.setenv("DXAGENT_DICOMWEB_USER", USER)
        monkeypatch.setenv("DXAGENT_DICOMWEB_PASSWORD", PASSWORD)
        assert len(dicomweb.resolve([ref(url, study)], cache=tmp_path / "c")) == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_batch_rows_from_the_pacs_each_fail_alone(pacs, tmp_path, monkeypatch):
    """A manifest with a good PACS study, one the PACS does not have, and a file: the missing study is that row's
    one-line failure, the others report."""
    from agent.app.batch import run_batch

    url, studies = pacs
    monkeypatch.setenv("DXAGENT_CACHE", str(tmp_path / "cache"))
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [
        {"case_id": "pacs_ct", "image": ref(url, studies["CT_small.dcm"][0])},
        {"case_id": "pacs_missing", "image": ref(url, "1.2.3.4.5.6.7.8")},
        {"case_id": "file_mr", "image": "mr.dcm"},
    ]) + "\n")
    # the scripted planner's inspect call: the rows' retrieval and failure are what this tests, not the planner (the
    # tiny planner's batch is tests/test_batch.py's kill -9 test; its run on a PACS study is test_dxagent_run_on_a_pacs_study)
    s = run_batch(m, tmp_path / "out", workers=1, llm="scripted", script=[call("inspect_image")],
                  question="Describe the findings", max_steps=2)
    assert s.counts == {"done": 2, "failed": 1}
    failed = json.loads((tmp_path / "out" / "cases" / "pacs_missing" / "result.json").read_text())
    assert "no such study" in failed["error"] or "no series" in failed["error"]
    assert "\n" not in failed["error"]
    assert json.loads((tmp_path / "out" / "cases" / "pacs_ct" / "report.json").read_text())["study"]["modality"] == "CT"


def test_a_damaged_cached_instance_is_one_line(pacs, tmp_path):
    """An instance damaged in the cache after retrieval (a disk fault): the loader says which file, in one line."""
    from agent.imaging.loaders import ImageLoadError
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore

    url, studies = pacs
    folder = Path(dicomweb.resolve([ref(url, *studies["MR_small.dcm"])], cache=tmp_path / "c")[0])
    f = next(folder.iterdir())
    f.write_bytes(f.read_bytes()[:600])
    with pytest.raises(ImageLoadError) as err:
        load_views([str(folder)], ArtifactStore(tmp_path / "a"))
    assert "\n" not in str(err.value)


def test_a_qido_query_is_a_batch_manifest(pacs):
    """`dxagent batch "dicomweb://HOST/PATH?modality=CT&date=..."`: one case per study the query finds, case ids without
    UIDs; a bad filter or an empty result is a one-line manifest error."""
    from agent.app.batch import ManifestError, read_manifest

    url, studies = pacs
    root = url.replace("http://", "dicomweb://") + "/dicom-web"
    _, specs = read_manifest(f"{root}?modality=CT")
    assert [s.paths for s in specs] == [[ref(url, studies["CT_small.dcm"][0])]]
    assert specs[0].case_id.startswith("study-") and studies["CT_small.dcm"][0] not in specs[0].case_id
    _, both = read_manifest(f"{root}?date=20040101-20041231")
    assert [s.paths[0] for s in both] == [ref(url, studies[n][0]) for n in ("CT_small.dcm", "MR_small.dcm")]  # by date
    assert len(read_manifest(f"{root}?date=20040801-&limit=5")[1]) == 1
    for bad, why in ((f"{root}?modality=CT&bogus=1", "unknown query parameter"), (f"{root}?date=2004", "not a DICOM date"),
                     (f"{root}?modality=US", "finds no study")):
        with pytest.raises(ManifestError, match=why) as err:
            read_manifest(bad)
        assert "\n" not in str(err.value)


def test_a_query_is_a_batch_over_the_rest_api(pacs, tmp_path, monkeypatch):
    """POST /api/batches {"manifest": QUERY} on `dxagent serve`'s app: one row per study found, each a run in the queue
    that retrieves its study; no UID in what the API says."""
    from fastapi.testclient import TestClient

    from agent.app.serve import ServeConfig, create_app
    from agent.app.serve_runs import ServeSettings

    url, studies = pacs
    monkeypatch.setenv("DXAGENT_CACHE", str(tmp_path / "cache"))
    settings = ServeSettings(trace_dir=tmp_path / "traces", llm="scripted", script=[call("ct_tissue_composition")])
    query = url.replace("http://", "dicomweb://") + "/dicom-web?modality=CT"
    with TestClient(create_app(ServeConfig(settings=settings, roots=[tmp_path], poll_s=0.05))) as c:
        r = c.post("/api/batches", json={"manifest": query, "question": "What is the tissue composition of this CT slice?"})
        assert r.status_code == 202, r.text
        b = r.json()
        assert b["source"] == "dicomweb" and [(x["n"], x["where"]) for x in b["rows"]] == [(1, "study 1")]
        with c.stream("GET", f"/api/batches/{b['id']}/events") as resp:
            end = [ln for ln in resp.iter_lines() if ln.startswith("data:")][-1]
        assert json.loads(end.partition(":")[2])["summary"]["counts"]["done"] == 1
        run = c.get(f"/api/runs/{b['rows'][0]['run_id']}").json()
        assert run["source"] == "dicomweb" and run["outcome"] == "report"
        said = json.dumps([b, end, run, c.get(f"/api/batches/{b['id']}").json()])
        assert studies["CT_small.dcm"][0] not in said and "1CT1" not in said
        from helpers import free_port

        gone = f"dicomweb://127.0.0.1:{free_port()}/dicom-web?modality=CT"  # no PACS listens there
        r = c.post("/api/batches", json={"manifest": gone})
        assert r.status_code == 502 and "PACS did not answer" in r.json()["detail"], r.text
        assert len(c.get("/api/batches").json()) == 1  # nothing queued


def test_batch_over_a_query_writes_back_to_the_pacs(pacs, tmp_path, monkeypatch):
    """`dxagent batch QUERY --dicom --push source`: each study found is a case, and its SR (and SEGs) go back into that
    study on the PACS, recorded in the case's record and the trace."""
    import httpx

    from agent.app.batch import run_batch

    url, studies = pacs
    monkeypatch.setenv("DXAGENT_CACHE", str(tmp_path / "cache"))
    study = studies["MR_small.dcm"][0]
    s = run_batch(url.replace("http://", "dicomweb://") + "/dicom-web?modality=MR", tmp_path / "out", workers=1,
                  llm="scripted", script=[call("region_measure")],  # the query, the SR and the push are tested here
                  question="How large is the dominant bright region?", max_steps=2, dicom=True, push="source")
    assert s.counts == {"done": 1}
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cases").glob("*/result.json")]
    assert rec["dicom"][0] == "SR" and rec["pushed_to"].endswith("/dicom-web")
    assert (tmp_path / "out" / "cases" / rec["case_id"] / "dicom" / "report.sr.dcm").is_file()
    modalities = {x["00080060"]["Value"][0] for x in httpx.get(f"{url}/dicom-web/studies/{study}/series", timeout=10).json()}
    assert {"MR", "SR"} <= modalities
