"""A run's results as DICOM objects a viewer and a PACS take, built with highdicom: one Comprehensive 3D SR holding a
TID 1500 measurement report, and one DICOM SEG per segmentation mask. Both reference the source images.

* SR (TID 1500 "Imaging Measurement Report"): one measurement group (TID 1501) per report finding, with its
  measurements in UCUM units, a "finding present" yes/no where the finding is a yes/no claim, a tracking identifier
  (`<run> <evidence ids> <label>`, and a UID derived from the run, so the same run gives the same identifiers) and the
  tool as algorithm identification, whose parameters name the run id and the evidence id(s): the observation context
  that lets a reader go from a measurement in a viewer back to the trace (`dxagent trace show RUN`). The question, the
  answer, the outcome and the research-use disclaimer are TEXT items of the report's Qualitative Evaluations. The SR is
  marked PARTIAL and UNVERIFIED: nobody has signed it.
* SEG (binary, one segment per label value present): labels named by the mask's legend and coded with SNOMED CT where
  one fits (SCT_TYPES), else with a local code (scheme 99DXA) that says the name only. A mask on a derived view (a
  crop, a zoom, a window) is put back on the source grid first; one it cannot be put back on is left out, and the
  manifest says why.

Only a DICOM input can be referenced: for a PNG or NIfTI input `write_objects` writes nothing and says why. The patient
and study modules are copied from the source files by highdicom (that is what attaches the objects to the study in a
PACS): these files therefore carry the identifiers the source carried, never the trace or the LLM. What is copied is
made to fit first (`clean_copied`): a PatientSex other than M, F or O and a date or time that does not parse are left
empty, a value longer than its VR allows is cut to it - each noted (attribute and length, never the value) - so an odd
source cannot fail the export after a complete report; warnings highdicom and pydicom raise while building (which may quote
a 10,000-character name) become one note. `write_objects` returns a manifest of what was written (SOP class, SOP
instance and series UIDs, file, evidence), what was not, and these notes.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.state import ArtifactRef, CaseState, Evidence, ImageView

LOCAL = "99DXA"  # private coding scheme for names no standard code fits
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2)
# label name (agent/core/vocab.py words) -> (SNOMED CT code, meaning, category: "organ" | "tissue" | "abnormal")
SCT_TYPES: dict[str, tuple[str, str, str]] = {
    "liver": ("10200004", "Liver", "organ"), "lung": ("39607008", "Lung", "organ"),
    "right lung": ("3341006", "Right lung", "organ"), "left lung": ("44029006", "Left lung", "organ"),
    "heart": ("80891009", "Heart", "organ"), "kidney": ("64033007", "Kidney", "organ"),
    "spleen": ("78961009", "Spleen", "organ"), "colon": ("71854001", "Colon", "organ"),
    "small bowel": ("30315005", "Small intestine", "organ"), "rectum": ("34402009", "Rectum", "organ"),
    "esophagus": ("32849002", "Esophagus", "organ"), "stomach": ("69695003", "Stomach", "organ"),
    "duodenum": ("38848004", "Duodenum", "organ"), "bladder": ("89837001", "Urinary bladder", "organ"),
    "mandible": ("91609006", "Mandible", "organ"), "brain stem": ("119238007", "Brain stem", "organ"),
    "parotid": ("45289007", "Parotid gland", "organ"), "temporal lobe": ("78277001", "Temporal lobe", "organ"),
    "spinal cord": ("2748008", "Spinal cord", "organ"), "femoral head": ("2812003", "Head of femur", "organ"),
    "body": ("38266002", "Entire body", "organ"), "fat": ("256674009", "Fat", "tissue"),
    "soft tissue": ("87784001", "Soft tissue", "tissue"), "bone": ("272673000", "Bone", "tissue"),
    "retinal vessel": ("59820001", "Blood vessel", "organ"), "lesion": ("52988006", "Lesion", "abnormal"),
    "segmented lesion": ("52988006", "Lesion", "abnormal"), "nodule": ("27925004", "Nodule", "abnormal"),
    "liver cancer": ("108369006", "Neoplasm", "abnormal"), "lung cancer": ("108369006", "Neoplasm", "abnormal"),
    "brain enhancing tumor": ("108369006", "Neoplasm", "abnormal"),
    "brain non enhancing tumor": ("108369006", "Neoplasm", "abnormal"),
    "brain edema": ("79654002", "Edema", "abnormal"), "mass": ("4147007", "Mass", "abnormal"),
}
CATEGORIES = {"organ": ("91723000", "Anatomical Structure"), "tissue": ("85756007", "Tissue"),
              "abnormal": ("49755003", "Morphologically Abnormal Structure"),
              "other": ("309825002", "Spatial and Relational Concept")}
# measurement name -> SNOMED CT concept; others get a local code with the name
SCT_MEASUREMENTS = {"area": ("42798000", "Area"), "volume": ("118565006", "Volume"),
                    "longest_diameter": ("81827009", "Diameter"), "diameter": ("81827009", "Diameter"),
                    "length": ("410668003", "Length")}
UCUM = {"mm": "mm", "mm2": "mm2", "mm3": "mm3", "mL": "ml", "HU": "[hnsf'U]", "px": "{pixels}", "px2": "{pixels}",
        "voxels": "{voxels}", "ratio": "1", "%": "%", "cm": "cm", "cm2": "cm2"}


@dataclass
class Written:
    """What `write_objects` did: the objects written (a row each) and what it left out, with the reason."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # source attributes changed for the copy, library warnings
    datasets: list[Any] = field(default_factory=list)  # the pydicom datasets, for --push
    pushed_to: str | None = None  # the DICOMweb server they were stored to
    push_error: str | None = None  # why storing them failed (one line)


def _uid(run_id: str, what: str) -> str:
    """A UID derived from the run (the same run and object give the same UID)."""
    return UID_ROOT + str(uuid.uuid5(uuid.NAMESPACE_URL, f"dxagent/{run_id}/{what}").int)


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning[:64])


def _local_scheme():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = LOCAL
    item.CodingSchemeName = "dxagent local concepts (names no standard code fits)"
    item.CodingSchemeResponsibleOrganization = "dxagent"
    return item


def _local(name: str):
    text = " ".join(str(name).replace("_", " ").split()) or "unnamed"
    return _code(text.upper().replace(" ", "_")[:16], LOCAL, text)


def label_codes(name: str) -> tuple[Any, Any, bool]:
    """(category, type, standard) codes for a label name; `standard` False when no SNOMED CT code fits."""
    key = " ".join(str(name).lower().replace("_", " ").split())
    if key in SCT_TYPES:
        code, meaning, cat = SCT_TYPES[key]
        return _code(CATEGORIES[cat][0], "SCT", CATEGORIES[cat][1]), _code(code, "SCT", meaning), True
    return _code(CATEGORIES["other"][0], "SCT", CATEGORIES["other"][1]), _local(name), False


def _view_of(ev: Evidence, ref: ArtifactRef | None = None) -> str:
    """The view a result lies on: the mask's own record, else the view the tool call named."""
    return (ref.view if ref is not None else None) or str(ev.args.get("view", "V1"))


def _slice_of(ev: Evidence, n: int, ref: ArtifactRef | None = None) -> int | None:
    """The slice (of n) a 2D result on a volume lies in: the mask's record, else the tool output's slice_index."""
    k = ref.slice_index if ref is not None and ref.slice_index is not None else (ev.output or {}).get("slice_index")
    return k if isinstance(k, int) and 0 <= k < n else None


def _root_view(state: CaseState, view_id: str) -> ImageView:
    v = state.view(view_id)
    while v.parent:
        v = state.view(v.parent)
    return v


def _on_source_grid(state: CaseState, mask: np.ndarray, view_id: str) -> tuple[np.ndarray, str | None]:
    """The mask carried back through derived views (window: same grid; crop/zoom: resized by nearest and pasted)
    onto its root view's grid, or (mask, the reason it cannot be)."""
    v = state.view(view_id)
    while v.parent:
        parent = state.view(v.parent)
        prov = v.provenance or {}
        spatial = tuple(parent.shape[:2] if parent.photometric == "RGB" else parent.shape)
        if "bbox_px" in prov and mask.ndim == 2 and len(spatial) == 2:
            r0, c0, r1, c1 = (int(x) for x in prov["bbox_px"])
            rows = (np.arange(r1 - r0) * mask.shape[0] // max(1, r1 - r0)).clip(0, mask.shape[0] - 1)
            cols = (np.arange(c1 - c0) * mask.shape[1] // max(1, c1 - c0)).clip(0, mask.shape[1] - 1)
            full = np.zeros(spatial, dtype=mask.dtype)
            full[r0:r1, c0:c1] = mask[np.ix_(rows, cols)]
            mask = full
        elif mask.shape != spatial and mask.shape != spatial[1:]:
            return mask, f"the mask is on derived view {v.id}, whose grid cannot be mapped back to {parent.id}"
        v = parent
    return mask, None


def _frames(state: CaseState, ref: ArtifactRef, ev: Evidence, mask: np.ndarray, sources: list[Any]
            ) -> tuple[np.ndarray, list[Any], str | None]:
    """(label frames (n, rows, cols), the source datasets they lie on) for a mask, or a reason it has none."""
    mask, why = _on_source_grid(state, mask, _view_of(ev, ref))
    if why:
        return mask, [], why
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if mask.ndim == 3 and mask.shape == (len(sources), rows, cols):
        return mask, sources, None
    if mask.shape == (rows, cols):
        if len(sources) == 1:
            return mask[None], sources, None
        if (k := _slice_of(ev, len(sources), ref)) is not None:
            return mask[None], [sources[k]], None
        return mask, [], "a 2D mask of a volume without the slice it lies in"
    return mask, [], f"mask shape {list(mask.shape)} does not match the source's {len(sources)}x{rows}x{cols}"


def _algorithm(ev: Evidence, run_id: str):
    from highdicom.content import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    return AlgorithmIdentificationSequence(name=f"dxagent {ev.tool}", version=ev.tool_version or "1",
                                           family=codes.cid7162.ArtificialIntelligence,
                                           parameters={"run": run_id, "evidence": ev.id})


def build_segs(state: CaseState, store: Any, sources: dict[str, list[Any]], run_id: str, software: str, out: Written
               ) -> None:
    """One SEG per mask artifact of a successful tool call whose view lies on a DICOM source."""
    import highdicom as hd

    n = 0
    for ev in state.evidence:
        if ev.status != "ok":
            continue
        for ref in ev.artifacts:
            if ref.kind != "mask":
                continue
            root = _root_view(state, _view_of(ev, ref))
            src = sources.get(root.id)
            if not src:
                out.skipped.append(f"{ev.id} mask: view {root.id} is not a DICOM image (nothing to reference)")
                continue
            frames, refs, why = _frames(state, ref, ev, store.get_array(ref), src)
            if why:
                out.skipped.append(f"{ev.id} mask: {why}")
                continue
            values = [int(v) for v in np.unique(frames) if v]
            if not values:
                out.skipped.append(f"{ev.id} mask: empty (nothing segmented)")
                continue
            descriptions, numbered = [], np.zeros(frames.shape, dtype=np.uint8)
            for number, v in enumerate(values, 1):
                name = ref.legend.get(v) or f"segment {v}"
                category, prop, _ = label_codes(name)
                numbered[frames == v] = number
                descriptions.append(hd.seg.SegmentDescription(
                    segment_number=number, segment_label=name[:64], segmented_property_category=category,
                    segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                    algorithm_identification=_algorithm(ev, run_id), tracking_id=f"{run_id} {ev.id} {name}"[:64],
                    tracking_uid=_uid(run_id, f"{ev.id}/{ref.sha256}/{v}")))
            n += 1
            seg = hd.seg.Segmentation(
                source_images=refs, pixel_array=numbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions, series_instance_uid=_uid(run_id, f"seg-series/{ev.id}/{n}"),
                series_number=900 + n, sop_instance_uid=_uid(run_id, f"seg/{ev.id}/{ref.sha256}"), instance_number=1,
                manufacturer="dxagent (research use only)", manufacturer_model_name=f"dxagent {ev.tool}",
                software_versions=software, device_serial_number="0", content_label="DXAGENT",
                content_description=f"{ev.tool} mask, run {run_id} {ev.id} (research use only)"[:64],
                series_description=f"dxagent {ev.tool} SEG (research use only)"[:64])
            out.datasets.append(seg)
            out.objects.append({"kind": "SEG", "evidence": ev.id, "tool": ev.tool, "mask": ref.sha256,
                                "sop_class_uid": str(seg.SOPClassUID),
                                "sop_instance_uid": str(seg.SOPInstanceUID),
                                "series_instance_uid": str(seg.SeriesInstanceUID), "segments":
                                [d.SegmentLabel for d in descriptions], "frames": int(seg.NumberOfFrames)})


def _measurement(name: str, value: float, unit: str):
    import highdicom as hd

    code = SCT_MEASUREMENTS.get(name)
    concept = _code(code[0], "SCT", code[1]) if code else _local(name)
    ucum = UCUM.get(unit, "{" + unit + "}")
    return hd.sr.Measurement(name=concept, value=float(value), unit=_code(ucum, "UCUM", unit or "no unit"))


def build_sr(report: dict[str, Any], state: CaseState, sources: dict[str, list[Any]], run_id: str, software: str,
             out: Written) -> None:
    """The TID 1500 measurement report of a run (needs at least one DICOM source to reference)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    evidence_of = {e.id: e for e in state.evidence}
    all_sources = [ds for v in sorted(sources) for ds in sources[v]]

    def group(key: str, label: str, finding_type: Any, eids: list[str], measurements: list[dict[str, Any]],
              present: bool | None) -> Any:
        ev = evidence_of.get(eids[0]) if eids else None
        refs = sources.get(_root_view(state, _view_of(ev)).id, []) if ev else all_sources
        if ev and (k := _slice_of(ev, len(refs))) is not None:
            refs = [refs[k]]
        qualitative = [] if present is None else [hd.sr.QualitativeEvaluation(
            name=_code("PRESENT", LOCAL, "Finding present"), value=codes.SCT.Yes if present else codes.SCT.No)]
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(run_id, key),
                                                          identifier=f"{run_id} {','.join(eids)} {label}"[:64]),
            finding_type=finding_type,
            algorithm_id=hd.sr.AlgorithmIdentification(
                name=f"dxagent {ev.tool}" if ev else "dxagent", version=(ev.tool_version if ev else software) or "1",
                parameters=[f"run {run_id}", f"evidence {','.join(eids) or 'none'}"]),
            measurements=[_measurement(m["name"], m["value"], m["unit"]) for m in measurements] or None,
            qualitative_evaluations=qualitative or None,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in refs] or None)

    groups = []
    for i, f in enumerate(report.get("findings", []), 1):
        label = str(f.get("label") or "finding")
        groups.append(group(f"finding/{i}", label, label_codes(label)[1], list(f.get("evidence_ids") or []),
                            f.get("measurements", []), f.get("present")))
    # the answer as its own group, last: yes/no as "finding present", a measured answer as its measurement
    answer = report.get("answer") or {}
    kind, value = answer.get("kind"), answer.get("value")
    measured = [{"name": "answer", "value": float(value), "unit": answer.get("unit") or "1"}] \
        if kind in ("measurement", "count") and isinstance(value, int | float) else []
    groups.append(group("answer", "answer", _code("ANSWER", LOCAL, "Answer to the question"),
                        list(answer.get("evidence_ids") or []), measured,
                        (str(value).lower() == "yes") if kind == "yes_no" else None))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(run_id, "device"), name="dxagent", manufacturer_name="dxagent (research use only)",
            model_name=str((report.get("versions") or {}).get("planner_model") or "dxagent")[:64]))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    texts = [("QUESTION", "Question", report.get("question") or ""),
             ("ANSWER", "Answer", answer.get("text") or str(answer.get("value") or "")),
             ("OUTCOME", "Outcome", (report.get("recommendation") or {}).get("outcome", "")),
             ("RUN", "dxagent run", run_id), ("DISCLAIMER", "Disclaimer", report.get("disclaimer", ""))]
    evaluations = hd.sr.ContainerContentItem(name=_code("C0034375", "UMLS", "Qualitative Evaluations"),
                                             relationship_type="CONTAINS")
    evaluations.ContentSequence = [hd.sr.TextContentItem(name=_code(c, LOCAL, m), value=" ".join(v.split())[:1024],
                                                         relationship_type="CONTAINS") for c, m, v in texts if v]
    content[0].ContentSequence.append(evaluations)
    sr = hd.sr.Comprehensive3DSR(
        evidence=all_sources, content=content[0], series_instance_uid=_uid(run_id, "sr-series"), series_number=899,
        sop_instance_uid=_uid(run_id, "sr"), instance_number=1, manufacturer="dxagent (research use only)",
        is_complete=False, is_final=False, is_verified=False,
        series_description="dxagent measurement report (research use only)")
    out.datasets.insert(0, sr)
    out.objects.insert(0, {"kind": "SR", "evidence": ",".join(sorted({e for f in report.get("findings", [])
                                                                       for e in f.get("evidence_ids") or []})),
                           "sop_class_uid": str(sr.SOPClassUID), "sop_instance_uid": str(sr.SOPInstanceUID),
                           "series_instance_uid": str(sr.SeriesInstanceUID), "groups": len(groups)})  # findings + the answer


# the General Study attributes highdicom copies (besides the Patient, Patient Study and Clinical Trial Subject ones:
# groups 0010 and 0012); UIDs, dates as numbers and sequences are left as they are
STUDY_KEYWORDS = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
                  "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription")
DATE_VRS = {"DA", "TM", "DT"}  # highdicom parses a study's date and time (pydicom's DA/TM): one it cannot, it refuses
CUT_VRS = {"PN", "LO", "SH", "LT", "ST", "CS", "AS"}  # text VRs with a length limit (PS3.5 6.2)


def _bounded(vr: str, value: str) -> str:
    """`value` cut to what its VR allows (a PN to 64 characters in each of at most 3 component groups)."""
    from pydicom.valuerep import MAX_VALUE_LEN

    if vr == "PN":
        return "=".join(g[:64] for g in value.split("=")[:3])
    return value[: {"AS": 4, **MAX_VALUE_LEN}.get(vr, 64)]


def _parses(vr: str, value: str) -> bool:
    from pydicom.valuerep import DA, DT, TM

    try:
        {"DA": DA, "TM": TM, "DT": DT}[vr](value)
        return True
    except (ValueError, TypeError, OverflowError):
        return False


def clean_copied(ds: Any, notes: list[str]) -> None:
    """Make the patient and study attributes highdicom copies from a source dataset (in memory, never the file) fit
    the SR/SEG: PatientSex M, F, O or empty (highdicom refuses anything else); a date or time pydicom cannot parse
    empty (highdicom refuses it too); a text value longer than its VR allows cut to it. Each change is noted by
    attribute and length, never by value (the notes go to the trace and the terminal)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.multival import MultiValue

    tags = [t for t in ds.keys() if t.group in (0x0010, 0x0012)] + \
        [tag_for_keyword(k) for k in STUDY_KEYWORDS if k in ds]
    with warnings.catch_warnings():  # reading an invalid value warns, quoting it: the note says what is wrong
        warnings.simplefilter("ignore")
        for tag in tags:
            elem = ds[tag]
            if elem.VR not in CUT_VRS | DATE_VRS or elem.value in (None, ""):
                continue
            kw = elem.keyword or str(tag)
            raw = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
            if any(isinstance(v, bytes) for v in raw):  # not decoded: copied as it is
                continue
            values = [str(v) for v in raw]
            size = max(map(len, values))
            if kw == "PatientSex":
                sex = values[0].strip().upper()
                if sex not in ("M", "F", "O"):
                    notes.append(f"PatientSex of the source is not M, F or O ({size} characters): left empty in the "
                                 "SR/SEG")
                    elem.value = ""
                continue
            if elem.VR in DATE_VRS:
                if not all(_parses(elem.VR, v) for v in values):
                    notes.append(f"{kw} of the source is not a valid {elem.VR} ({size} characters): left empty in the "
                                 "SR/SEG")
                    elem.value = ""
                continue
            cut = [_bounded(elem.VR, v) for v in values]
            if cut != values:
                notes.append(f"{kw} of the source is longer than a {elem.VR} may be ({size} characters): cut to fit "
                             "in the SR/SEG")
                elem.value = cut if len(cut) > 1 else cut[0]


@contextmanager
def _library_warnings(notes: list[str]) -> Iterator[None]:
    """Warnings and log records (WARNING and up) of highdicom and pydicom while the objects are built become one note:
    their texts may quote patient attributes (highdicom printed a 10,000-character PatientName to stderr), so the note
    counts them without their text."""
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.name)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("highdicom", "pydicom")]
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, propagate in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.propagate = propagate
    kept += [w.category.__name__ for w in caught]
    if kept:
        kinds = ", ".join(sorted(set(kept)))[:200]
        notes.append(f"{len(kept)} warning(s) from the DICOM libraries while building the objects ({kinds}); their "
                     "texts are withheld (they may quote patient attributes)")


def write_objects(report: dict[str, Any], state: CaseState, store: Any, inputs: list[str],
                  out_dir: str | Path | None) -> Written:
    """Build the SR and SEGs of a finished run whose input views are DICOM, and write them under out_dir (None: only
    build them, for --push) as report.sr.dcm and seg-<evidence>-<uid tail>.dcm; the manifest says what was written
    and what was not (and why)."""
    from agent.imaging.loaders import dicom_sources

    out, run_id = Written(), report["run_id"]
    roots = [v for v in state.views if not v.parent]
    sources: dict[str, list[Any]] = {}
    for view, path in zip(roots, inputs, strict=False):
        if (src := dicom_sources(path)) is not None:
            sources[view.id] = src
    if not sources:
        out.skipped.append("no DICOM input: a DICOM SR or SEG must reference DICOM source images (the FHIR "
                           "report is written)")
        return out
    software = str((report.get("versions") or {}).get("dxagent") or "unknown")
    changed: list[str] = []
    for src in sources.values():
        for ds in src:
            clean_copied(ds, changed)
    out.notes += list(dict.fromkeys(changed))  # once per attribute and length, not once per slice
    with _library_warnings(out.notes):
        build_segs(state, store, sources, run_id, software, out)
        build_sr(report, state, sources, run_id, software, out)
        out.datasets[0].SpecificCharacterSet = "ISO_IR 192"  # the SR's texts (answer, disclaimer) are UTF-8
        for ds in out.datasets:  # declare the private scheme of the names no standard code fits (PS3.3 C.12.1.1.3.1)
            ds.CodingSchemeIdentificationSequence = [_local_scheme()]
        if out_dir is None:
            return out
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for row, ds in zip(out.objects, out.datasets, strict=True):
            name = "report.sr.dcm" if row["kind"] == "SR" else \
                f"seg-{row['evidence']}-{row['sop_instance_uid'][-6:]}.dcm"
            ds.save_as(out_dir / name, enforce_file_format=True)
            row["file"] = name
    return out


class ExportError(ValueError):
    """The DICOM objects could not be built or there was nothing to push; one line."""


def export_run(res: Any, out_dir: str | Path | None, target: Any, trace: Any) -> Written:
    """A finished run (agent.engine.session.Result) as DICOM SR + SEG: written under out_dir and/or stored to `target`
    (an agent.imaging.dicomweb.Reference) with STOW-RS, and recorded in the run's trace (an `export` event with the
    objects' UIDs and files, whether or not the push worked: `dxagent trace show RUN`, `dxagent trace uid UID`).
    A push that fails is `push_error` (the files are written and recorded first); ExportError when highdicom refuses
    an object or there is nothing to push."""
    from agent.imaging.dicomweb import DicomWebError, store

    try:
        written = write_objects(res.report, res.state, res.store, res.inputs, out_dir)
    except Exception as exc:
        raise ExportError(f"DICOM SR/SEG not written: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") \
            from None
    if target is not None and not written.datasets:
        raise ExportError(f"--push: nothing to store ({'; '.join(written.skipped) or 'no objects'})")
    if target is not None:
        try:
            store(target, written.datasets)
            written.pushed_to = target.public()
        except DicomWebError as exc:
            written.push_error = str(exc)
    if written.objects:
        trace.note_export(res.run_id, {"objects": written.objects, "skipped": written.skipped, "notes": written.notes,
                                       "pushed_to": written.pushed_to, "push_error": written.push_error})
    return written
