"""Loaded images to views: the study classifier's block, the modality decision (DICOM, then the user, then Hounsfield
units, then the classifier, then the pixel rules), the pixels into the artifact store. `load_views` is the entry point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.analysis.display import looks_like_hu
from agent.core.state import ImageView
from agent.imaging.deid import body_part_code
from agent.imaging.loaders import Loaded, load_file
from agent.imaging.modality import GUESS_RULES, RGB_GUESS_TEXT, guess_modality, normalise_modality
from agent.store.artifacts import ArtifactStore


def load_views(
    paths: list[str], store: ArtifactStore, modality: str | None = None, body_part: str | None = None,
    classify: Callable[[Any, bool, bool], dict[str, Any]] | None = None,
) -> list[ImageView]:
    """One view per path (ids V1, V2, ...); raises ImageLoadError on the first bad input. `classify(picture, rgb, hu)`
    gives the study classifier's block (default: agent/analysis/study.py `intake_study` in this process; the engine
    passes one that runs it in the tool worker) and raises ToolError when it cannot."""
    return [_to_view(f"V{i}", load_file(p), store, modality, body_part, classify) for i, p in enumerate(paths, 1)]


def _study(ld: Loaded, hu: bool, classify: Callable[[Any, bool, bool], dict[str, Any]] | None = None
           ) -> tuple[dict[str, Any] | None, str]:
    """The study classifier's block for a loaded image (agent/analysis/study.py), or (None, the one-line reason it
    could not run: then the pixel rules guess the modality, and the report says why)."""
    from agent.core.tool import ToolError

    if classify is None:
        from agent.analysis.study import intake_study as classify
    pic = ld.arr if ld.rgb or ld.arr.ndim == 2 else ld.arr[ld.arr.shape[0] // 2]
    try:
        block = classify(pic, ld.rgb, hu)
    except ToolError as exc:
        return None, str(exc)
    if pic is not ld.arr:
        block["slice_index"] = ld.arr.shape[0] // 2
    return block, ""


def _to_view(vid: str, ld: Loaded, store: ArtifactStore, modality: str | None, body_part: str | None,
             classify: Callable[[Any, bool, bool], dict[str, Any]] | None = None) -> ImageView:
    meta = {"format": ld.fmt, **ld.meta}
    user = normalise_modality(modality) if modality else None
    if user and user != (modality or "").strip().upper():
        meta["modality_user"] = modality
    if ld.modality and ld.modality != "OT":
        mod, src, conf = ld.modality, "dicom", 1.0
        if user and user != ld.modality:
            meta["modality_note"] = f"user said {user}, the file says {ld.modality}; the file's Modality is used"
    elif user:
        mod, src, conf = user, "user", 1.0
        if ld.modality == "OT":
            meta["modality_note"] = f"the file says OT (other); the user's {user} is used"
    elif ld.modality:
        mod, src, conf = ld.modality, "dicom", 1.0
    else:
        mod, src, conf = "", "", 0.0
    hu = (not ld.rgb) and looks_like_hu(ld.arr)  # once per view: the classifier's input and the CT rule
    study, why = _study(ld, hu, classify)
    if study is not None:
        meta["study"] = study
    else:
        meta["study_error"] = why
    if src:
        pass  # the file or the user said the modality
    elif hu:  # values in Hounsfield units: a CT whatever it looks like
        (mod, conf), src = GUESS_RULES["hu"], "guess"
        meta["modality_guess"] = "values in Hounsfield units"
    elif study is not None:
        mod, src, conf = study["modality"], "classifier", study["modality_probability"]
    else:  # the classifier could not run (meta["study_error"] says why): the pixel rules
        mod, conf = guess_modality(ld.arr, ld.rgb)
        src = "guess"
        if ld.rgb:
            meta["modality_guess"] = RGB_GUESS_TEXT.get(mod, "colour picture judged as gray (a tint or colour marks)")
    meta["modality_confidence"] = conf
    ref = store.put_array(ld.arr, kind="pixels", description=f"{ld.fmt} pixels of {vid}")
    return ImageView(
        id=vid, pixels=ref, shape=tuple(int(s) for s in ld.arr.shape), dtype=str(ld.arr.dtype),
        ndim_spatial=2 if ld.rgb else ld.arr.ndim,
        spacing_mm=tuple(float(s) for s in ld.spacing) if ld.spacing else "unknown",
        modality=mod, modality_source=src, body_part=ld.body_part or body_part_code(body_part) or "unknown",
        photometric="RGB" if ld.rgb else "MONOCHROME2", metadata=meta, source_sha256=ld.sha,
    )
