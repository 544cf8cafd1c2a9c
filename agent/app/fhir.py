"""A report as FHIR: a Bundle (type collection) holding a DiagnosticReport and one Observation per measurement or
yes/no finding, built and validated with fhir.resources (the maintained pydantic FHIR models).

FHIR release: R4B (4.3.0), the R4-series release that fhir.resources 8 ships (`fhir.resources.R4B`); DiagnosticReport,
Observation and Bundle use no element here that differs from R4 (4.0.1).

* DiagnosticReport: status `preliminary` (research use, never a final clinical report), category RAD
  (HL7 v2-0074), code LOINC 18748-4 "Diagnostic imaging study", identifier the dxagent run id, conclusion the
  answer, the impression and the research-use disclaimer, `result` the Observations, `imagingStudy` the study when the
  input came from a PACS (by its Study Instance UID: a logical reference, `urn:dicom:uid`); no `subject`: dxagent never
  holds the patient's identity.
* Observation: status `preliminary`, code the measurement or finding name (text: no standard code is claimed),
  `valueQuantity` in UCUM (mm, mm2, mL, HU as [hnsf'U], px as {px}, ratio as 1, %), or `valueBoolean` for a yes/no
  finding, a note citing the evidence id(s) and the run.

Every resource is validated by its fhir.resources model when it is built; `write_bundle` raises ValueError (one line)
if anything does not validate.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from agent.core.files import write_atomic

UCUM = {"mm": "mm", "mm2": "mm2", "mm3": "mm3", "mL": "mL", "HU": "[hnsf'U]", "px": "{px}", "px2": "{px2}",
        "voxels": "{voxels}", "ratio": "1", "%": "%", "cm": "cm", "cm2": "cm2", "s": "s"}
RUN_SYSTEM = "urn:dxagent:run"


def _ucum(unit: str) -> dict[str, str]:
    code = UCUM.get(unit)
    return {"unit": unit, "system": "http://unitsofmeasure.org", "code": code} if code else {"unit": unit}


def _urn(run: str, rid: str) -> str:
    """A stable urn:uuid for a resource of a run (the same report gives the same bundle)."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, run + '/' + rid)}"


def _observation(oid: str, name: str, value: dict[str, Any], note: str, issued: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "preliminary",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "imaging", "display": "Imaging"}]}],
            "code": {"text": name}, "issued": issued, **value, "note": [{"text": note}]}


def report_bundle(report: dict[str, Any], issued: str, study_uid: str | None = None) -> dict[str, Any]:
    """The FHIR Bundle (as JSON-ready dict, validated) of a dxagent report. `issued`: an ISO 8601 instant."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    run = report["run_id"]
    observations = []
    for f in report.get("findings", []):
        cite = f"dxagent run {run}, evidence {', '.join(f.get('evidence_ids') or [])}"
        for m in f.get("measurements", []):
            value = {"valueQuantity": {"value": float(m["value"]), **_ucum(m["unit"])}}
            observations.append(_observation(f"obs-{len(observations) + 1}", f"{f['label']}: {m['name']}", value,
                                             cite, issued))
        if f.get("present") is not None and not f.get("measurements"):
            observations.append(_observation(f"obs-{len(observations) + 1}", f["label"],
                                             {"valueBoolean": bool(f["present"])}, cite, issued))
    answer = report.get("answer") or {}
    conclusion = " ".join(x for x in (f"Question: {report.get('question', '')}" if report.get("question") else "",
                                      f"Answer: {answer.get('text') or answer.get('value')}" if answer else "",
                                      report.get("impression", ""), report.get("disclaimer", "")) if x)
    urls = {o["id"]: _urn(run, o["id"]) for o in observations}
    dr: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": "report", "status": "preliminary",
        "identifier": [{"system": RUN_SYSTEM, "value": run}],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "dxagent research report (not for clinical use)"},
        "issued": issued, "conclusion": conclusion, "result": [{"reference": urls[o["id"]]} for o in observations],
    }
    if study_uid:
        dr["imagingStudy"] = [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
                               "type": "ImagingStudy"}]
    bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": issued,
              "identifier": {"system": RUN_SYSTEM, "value": run},
              "entry": [{"fullUrl": _urn(run, "report"), "resource": dr}]
              + [{"fullUrl": urls[o["id"]], "resource": o} for o in observations]}
    try:
        Bundle.model_validate(bundle)
        DiagnosticReport.model_validate(dr)  # and each resource by its own model, whatever Bundle checks of entries
        for o in observations:
            Observation.model_validate(o)
    except Exception as exc:
        raise ValueError(f"the FHIR bundle does not validate: {' '.join(str(exc).split())[:300]}") from None
    return bundle


def write_bundle(report: dict[str, Any], path: str | Path, issued: str, study_uid: str | None = None) -> Path:
    path = Path(path)
    write_atomic(path, json.dumps(report_bundle(report, issued, study_uid), indent=2))
    return path
