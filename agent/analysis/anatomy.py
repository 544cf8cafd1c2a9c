"""Where a finding lies, in the words a reader uses: the patient's side, the zone or region, and the organ it falls in.

Used by the answer step for "where?" questions (agent/engine/answer.py): the pixel centroid stays in the evidence, the
answer says "right lower zone" or "left side, within the liver". The image-to-patient side comes from DICOM
(ImageOrientationPatient, PatientOrientation); without them the radiological display is assumed (image left = patient
right, as for axial CT/MR and frontal radiographs viewed from the front), and the basis says so. Zones (frontal and
coronal pictures) are thirds of the picture's height.
"""

from __future__ import annotations

import re
from typing import Any

from agent.core.state import ImageView

_CENTROID = re.compile(r"(?:centroid|centre|center) row (\d+(?:\.\d+)?), col (\d+(?:\.\d+)?)")


def side_rule(view: ImageView) -> tuple[str | None, str]:
    """(patient side of the picture's right half, or None when sides are undefined; the convention in words)."""
    iop = view.metadata.get("ImageOrientationPatient")
    if isinstance(iop, list | tuple) and len(iop) == 6:
        row_x = float(iop[0])
        if abs(row_x) < 0.5:
            return None, "DICOM ImageOrientationPatient: rows run along A/P or H/F, so left/right is undefined"
        return ("left" if row_x > 0 else "right"), (f"DICOM ImageOrientationPatient (row direction x {row_x:+.2f}): "
                                                   f"image right = patient {'left' if row_x > 0 else 'right'}")
    po = view.metadata.get("PatientOrientation")
    first = (po[0] if isinstance(po, list | tuple) and po else str(po or "").split("\\")[0]).strip().upper()
    if first[:1] in ("L", "R"):
        return ("left" if first[0] == "L" else "right"), f"DICOM PatientOrientation {first}: image right = patient " \
            f"{'left' if first[0] == 'L' else 'right'}"
    if first[:1] in ("A", "P", "H", "F"):
        return None, f"DICOM PatientOrientation {first}: left/right is undefined on this projection"
    plane = ((view.metadata.get("study") or {}).get("probabilities") or {}).get("plane") or {}
    if plane and max(plane, key=plane.get) in ("sagittal", "lateral") and max(plane.values()) >= 0.6:
        return None, "the study classifier calls the picture sagittal/lateral: left/right is undefined"
    return "left", "radiological convention assumed (no orientation tag): image left = patient right"


def point_of(bbox: list[float] | None, location: str = "") -> tuple[float, float] | None:
    """(row, col) of a finding: its box's centre, else a "centroid row R, col C" in its location text."""
    if bbox is not None and len(bbox) == 4:
        r0, c0, r1, c1 = (float(v) for v in bbox)
        return (r0 + r1) / 2, (c0 + c1) / 2
    m = _CENTROID.search(location or "")
    return (float(m.group(1)), float(m.group(2))) if m else None


def _hw(view: ImageView) -> tuple[int, int]:
    if view.photometric == "RGB":
        return int(view.shape[0]), int(view.shape[1])
    return int(view.shape[-2]), int(view.shape[-1])


def describe(point: tuple[float, float], view: ImageView, bbox: list[float] | None = None,
             organs: list[tuple[str, list[float]]] | None = None) -> tuple[str, str]:
    """(the location in anatomical words, how it was worked out) for a point on `view`.

    organs: (name, bbox) of organs outlined on the same view; the smallest box holding the point names the organ."""
    h, w = _hw(view)
    row, col = point
    right_is, convention = side_rule(view)
    parts: list[str] = []
    basis = [f"pixel centroid row {row:.0f}, col {col:.0f} of a {h}x{w} picture"]
    side = None
    if bbox is not None and bbox[1] < w / 2 < bbox[3] and min(w / 2 - bbox[1], bbox[3] - w / 2) > 0.15 * (bbox[3] - bbox[1]):
        image_side = "right" if (bbox[3] - w / 2) > (w / 2 - bbox[1]) else "left"
        if right_is is not None:
            more = right_is if image_side == "right" else ("right" if right_is == "left" else "left")
            parts.append(f"midline, extending more to the patient's {more}")
        else:
            parts.append("midline")
    elif right_is is not None and abs(col - w / 2) > 0.04 * w:
        image_side = "right" if col > w / 2 else "left"
        side = right_is if image_side == "right" else ("right" if right_is == "left" else "left")
    elif abs(col - w / 2) <= 0.04 * w:
        parts.append("midline")
    basis.append(convention)
    modality = view.modality
    body = (view.body_part or "").lower()
    plane = _plane(view)
    zone = None
    if plane in ("frontal", "coronal") or (modality in ("DX", "CR") and plane != "lateral"):
        frac = row / max(1.0, float(h))
        zone = "upper" if frac < 1 / 3 else ("middle" if frac < 2 / 3 else "lower")
        basis.append("zone: thirds of the picture's height")
    organ = None
    if organs:
        inside = [(n, b) for n, b in organs if b[0] <= row <= b[2] and b[1] <= col <= b[3]]
        if inside:
            organ = min(inside, key=lambda nb: (nb[1][2] - nb[1][0]) * (nb[1][3] - nb[1][1]))[0]
            basis.append(f"within the {organ}'s outline box")
    chest = modality in ("DX", "CR") or "chest" in body
    if side:
        if zone and chest and not organ:
            parts.append(f"{side} {zone} zone")
        elif zone:
            parts.append(f"{side} side, {zone} {'zone' if chest else 'part'}")
        else:
            parts.append(f"{side} side")
    elif zone and not parts:
        parts.append(f"{zone} {'zone' if chest else 'part'}")
    if organ:
        parts.append(f"in the {organ}")
    if not parts:
        parts.append("undetermined side" if right_is is None else "central")
    return ", ".join(parts), "; ".join(basis)


def _plane(view: ImageView) -> str:
    probs = ((view.metadata.get("study") or {}).get("probabilities") or {}).get("plane") or {}
    if probs:
        return max(probs, key=probs.get)
    return str(view.metadata.get("plane") or "")


def organ_boxes(findings: list[Any]) -> list[tuple[str, list[float]]]:
    """(organ name, bbox) of findings that outline a structure (organ_segment's organs, the heart's borders)."""
    from agent.core.vocab import ORGANS, label_key

    out = []
    for f in findings:
        key = label_key(f.label)
        name = key.split(" ", 1)[1] if key.split()[0] in ("left", "right") and " " in key else key
        if f.bbox is not None and name in ORGANS:
            out.append((key, list(f.bbox)))
    return out
