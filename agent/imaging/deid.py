"""De-identification at the loader: the allow-list of DICOM attributes that leave it (DICOM PS3.15 basic profile,
Retain Patient Characteristics for sex and age), with defined terms checked so that free text never passes."""

from __future__ import annotations

from typing import Any

_DICOM_KEEP = (
    "Modality", "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "ViewPosition",
    "PhotometricInterpretation", "BitsStored", "Rows", "Columns", "NumberOfFrames", "SliceThickness",
    "KVP", "WindowCenter", "WindowWidth", "PatientSex", "PatientAge",
    "ImageOrientationPatient", "PatientOrientation",  # which image side is the patient's left (organ_segment)
)


def _dicom_value(v: Any) -> Any:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat

    if isinstance(v, MultiValue | list | tuple):
        return [_dicom_value(x) for x in v]
    if isinstance(v, DSfloat | float):
        return float(v)
    if isinstance(v, IS | int):
        return int(v)
    if v is None or isinstance(v, bytes):
        return None
    return str(v).strip()


def _age(v: str) -> str:
    digits = "".join(c for c in v if c.isdigit())
    unit = v[-1:].upper() if v[-1:].isalpha() else "Y"
    if not digits:
        return v
    n = int(digits)
    return "90+" if unit == "Y" and n >= 90 else f"{n}{unit}"


def dicom_meta(ds: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    if uid is not None and "Secondary Capture" in str(getattr(uid, "name", "")):
        meta["secondary_capture"] = True  # often carries burned-in text (report limitation)
    for key in _DICOM_KEEP:
        if key not in ds:
            continue
        val = _dicom_value(ds[key].value)
        if val in (None, "", []):
            continue
        if key in ("WindowCenter", "WindowWidth") and isinstance(val, list):
            val = [float(x) for x in val]
        if key == "PatientAge":
            val = _age(str(val))
        if key == "BodyPartExamined":
            val = body_part_code(val) or "withheld (not a DICOM defined term)"
        elif key in _CODE_TAGS:
            val = val if str(val).upper() in _CODE_TAGS[key] else "withheld (not a defined term)"
        elif key in ("Manufacturer", "ManufacturerModelName"):
            val = _short_name(val)
        meta[key] = val
    return meta


_CODE_TAGS = {"ViewPosition": {"AP", "PA", "LL", "RL", "LAT", "RLD", "LLD", "RLO", "LLO", "RAO", "LAO", "AP AXIAL",
                               "PA AXIAL", "CC", "MLO", "ML", "LM", "XCC", "SIO", "FB", "LMO"},
              "PatientSex": {"M", "F", "O"}}


def _short_name(val: Any) -> str:
    """A vendor or model name as such (up to 3 words of letters, digits and . _ - /, 40 characters); anything else
    is free text that could carry instructions to a model, so it is withheld."""
    text = " ".join(str(val).split())
    ok = len(text) <= 40 and len(text.split()) <= 3 and all(ch.isalnum() or ch in " ._-/" for ch in text)
    return text if ok else "withheld (free text)"


# DICOM PS3.16 Annex L body part defined terms (the common ones): BodyPartExamined and --body-part must be one of
# these (spaces, hyphens and case ignored), so a free-text tag never reaches a prompt or a report word for word
BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS ADRENAL ANKLE AORTA ARM AXILLA BACK BLADDER BRAIN BREAST BRONCHUS BUTTOCK CALCANEUS CALF
    CAROTID CEREBELLUM CERVIX CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CSPINE
    CTSPINE DUODENUM EAR ELBOW ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER FOOT GALLBLADDER HAND HEAD HEADNECK
    HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG MAXILLA
    MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS
    PENIS PHARYNX PROSTATE RECTUM RIB SACRUM SCROTUM SHOULDER SIGMOID SKULL SPINE SPLEEN SSPINE STERNUM STOMACH
    TESTIS THIGH THUMB THYMUS THYROID TIBIA TOE TONGUE TRACHEA TSPINE TLSPINE UTERUS VAGINA WHOLEBODY WRIST ZYGOMA
""".split())


def body_part_code(text: Any) -> str | None:
    """The PS3.16 defined term for a body part text ("Chest", "chest-abdomen" -> CHEST, CHESTABDOMEN), else None."""
    code = "".join(ch for ch in str(text or "").upper() if ch.isalnum())
    return code if code in BODY_PARTS else None
