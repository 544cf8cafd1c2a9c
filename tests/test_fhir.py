"""The report as FHIR (agent/app/fhir.py): `dxagent run --out DIR` writes report.fhir.json, a Bundle that the FHIR
models of fhir.resources (R4B) accept, whose Observations carry the report's measurements in UCUM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.data import get_testdata_file

from agent.app.fhir import report_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fhir")
    r = subprocess.run([sys.executable, "-m", "agent.app.cli", "run", get_testdata_file("CT_small.dcm"), "-q",
                        "What is the tissue composition of this CT slice?", "--llm", "tiny", "--trace-dir",
                        str(tmp / "tr"), "--out", str(tmp / "out")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-600:]
    return json.loads((tmp / "out" / "report.json").read_text()), json.loads((tmp / "out" / "report.fhir.json").read_text())


def test_the_bundle_validates_and_carries_the_measurements(ct_run):
    report, bundle = ct_run
    Bundle.model_validate(bundle)  # raises on anything FHIR R4B does not allow
    dr = bundle["entry"][0]["resource"]
    assert dr["resourceType"] == "DiagnosticReport" and dr["status"] == "preliminary" and "subject" not in dr
    assert dr["identifier"][0]["value"] == report["run_id"] and "RESEARCH USE ONLY" in dr["conclusion"]
    obs = [e["resource"] for e in bundle["entry"][1:]]
    assert [r["reference"] for r in dr["result"]] == [e["fullUrl"] for e in bundle["entry"][1:]]
    want = [(f"{f['label']}: {m['name']}", m["value"], m["unit"]) for f in report["findings"] for m in f["measurements"]]
    got = [(o["code"]["text"], o["valueQuantity"]["value"], o["valueQuantity"]["unit"]) for o in obs
           if "valueQuantity" in o]
    assert got == want and want  # every measurement, in order, with its value and unit
    assert all(o["valueQuantity"].get("system") == "http://unitsofmeasure.org" for o in obs if "valueQuantity" in o)
    assert "imagingStudy" not in dr  # a file, not a PACS study: nothing to reference


def test_invalid_values_are_refused_in_one_line(ct_run):
    report, _ = ct_run
    bad = {**report, "findings": [{"label": "x", "evidence_ids": ["E1"],
                                   "measurements": [{"name": "a", "value": float("nan"), "unit": "mm"}]}]}
    with pytest.raises(ValueError, match="does not validate") as err:
        report_bundle(bad, "2026-12-02T00:00:00+00:00")
    assert "\n" not in str(err.value)
    b = report_bundle(report, "2026-12-02T00:00:00+00:00", study_uid="1.2.840.1")
    assert b["entry"][0]["resource"]["imagingStudy"][0]["identifier"]["value"] == "urn:oid:1.2.840.1"
    assert report_bundle(report, "2026-12-02T00:00:00+00:00") == report_bundle(report, "2026-12-02T00:00:00+00:00")
