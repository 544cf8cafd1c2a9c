"""inspect_image: shape, spacing, modality, intensity statistics and de-identified metadata of a view.

Inspection is context for the planner, not a finding, so `findings()` returns nothing. Statistics
on volumes over `_MAX_STAT_VOXELS` are taken on a regular subsample (every k-th voxel), which
keeps the tool fast and deterministic.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from agent.analysis.display import is_rgb, looks_like_hu
from agent.analysis.study import study_facts
from agent.core.tool import Tool, ToolContext, ToolInput

_MAX_STAT_VOXELS = 4_000_000


class IntensityStats(BaseModel):
    min: float
    max: float
    mean: float
    std: float
    p1: float
    p50: float
    p99: float


class InspectOutput(BaseModel):
    view: str
    shape: list[int]
    dtype: str
    ndim_spatial: int
    spacing_mm: list[float] | Literal["unknown"]
    modality: str
    modality_source: str
    modality_confidence: float | None = None
    body_part: str
    photometric: str
    intensity: dict[str, IntensityStats]  # "gray", or "R"/"G"/"B"
    fraction_nonzero: float
    looks_like_hu: bool
    subsampled: bool = False
    metadata: dict[str, Any]
    model_card: dict[str, Any] | None = None  # the study classifier's card, when it ran at intake (agent/analysis/study.py)


def _stats(values: np.ndarray) -> IntensityStats:
    v = values.astype(np.float64, copy=False)
    p1, p50, p99 = np.percentile(v, [1, 50, 99])
    return IntensityStats(
        min=float(v.min()), max=float(v.max()), mean=float(v.mean()), std=float(v.std()),
        p1=float(p1), p50=float(p50), p99=float(p99),
    )


class InspectImage(Tool):
    name = "inspect_image"
    description = ("File facts of an image view: array shape, pixel spacing, modality, intensity statistics, "
                   "de-identified tags. Does not find or measure anything in the image.")
    kind = "inspect"
    topics = ("metadata", "intensity", "quality", "spacing")
    subjects = ("attribute:modality", "attribute:spacing", "attribute:intensity_range", "attribute:image_size",
                "mean_intensity")

    def addresses(self, view) -> frozenset[str]:
        known = {"attribute:body_region"} if view.body_part not in ("", "unknown") else set()
        if view.metadata.get("ViewPosition"):
            known.add("attribute:plane")
        facts = study_facts(view)  # what the study classifier found at intake
        known |= {f"attribute:{k}" for k in ("plane", "body_region") if facts[k]}
        return frozenset(self.subjects) | known

    def attributes(self, output: BaseModel, view) -> dict[str, dict[str, Any]]:
        """The modality (with the classifier's or the rules' probability when it was inferred), spacing, intensity range
        and shape; the body region and the plane / radiograph view: from the file when it states them (BodyPartExamined,
        ViewPosition), else the study classifier's (agent/analysis/study.py), with its probability."""
        assert isinstance(output, InspectOutput)
        out: dict[str, dict[str, Any]] = {"modality": {
            "value": output.modality, "source": output.modality_source,
            "probability": output.modality_confidence if output.modality_source in ("guess", "classifier") else None}}
        sp = output.spacing_mm
        out["spacing"] = {"value": "unknown" if sp == "unknown" else " x ".join(f"{s:.4g}" for s in sp) + " mm",
                          "source": "file", "probability": None}
        rng = "; ".join(f"{k} {s.min:.6g}..{s.max:.6g}" for k, s in output.intensity.items())
        out["intensity_range"] = {"value": rng, "source": "pixels", "probability": None}
        out["image_size"] = {"value": " x ".join(map(str, output.shape)), "source": "pixels", "probability": None}
        if output.body_part not in ("", "unknown"):
            out["body_region"] = {"value": output.body_part.lower(), "source": "dicom", "probability": None}
        pos = str(output.metadata.get("ViewPosition") or "").upper()
        if pos:
            out["plane"] = {"value": "lateral" if pos in ("LL", "RL", "LAT", "LATERAL") else "frontal",
                            "source": "dicom", "probability": None}
        facts = study_facts(view)
        for key in ("plane", "body_region"):
            if key not in out and facts[key]:
                out[key] = {"value": facts[key], "source": "classifier", "probability": facts[f"{key}_probability"]}
        return out
    Input = ToolInput
    Output = InspectOutput

    def run(self, ctx: ToolContext, inp: ToolInput) -> InspectOutput:
        view = ctx.view(inp.view)
        arr = ctx.pixels(inp.view)
        rgb = is_rgb(view)
        flat = arr.reshape(-1, 3) if rgb else arr.reshape(-1)
        step = max(1, -(-flat.shape[0] // _MAX_STAT_VOXELS))
        sample = flat[::step]
        if rgb:
            intensity = {c: _stats(sample[:, i]) for i, c in enumerate("RGB")}
            nonzero = float(np.any(sample != 0, axis=1).mean())
        else:
            intensity = {"gray": _stats(sample)}
            nonzero = float(np.count_nonzero(sample) / sample.size)
        return InspectOutput(
            view=view.id, shape=list(view.shape), dtype=view.dtype, ndim_spatial=view.ndim_spatial,
            spacing_mm=list(view.spacing_mm) if view.spacing_known else "unknown",
            modality=view.modality, modality_source=view.modality_source,
            modality_confidence=view.metadata.get("modality_confidence"), body_part=view.body_part,
            photometric=view.photometric, intensity=intensity, fraction_nonzero=round(nonzero, 6),
            looks_like_hu=(not rgb) and looks_like_hu(arr), subsampled=step > 1, metadata=dict(view.metadata),
            model_card=(view.metadata.get("study") or {}).get("model_card"),
        )

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, InspectOutput)
        sp = "spacing unknown" if output.spacing_mm == "unknown" else \
            "spacing " + "×".join(f"{s:.3g}" for s in output.spacing_mm) + " mm"
        ranges = ", ".join(f"{k} {s.min:.4g}..{s.max:.4g}" for k, s in output.intensity.items())
        hu = ", HU-like" if output.looks_like_hu else ""
        shape = "×".join(map(str, output.shape))
        return f"{output.view}: {shape} {output.modality} ({output.modality_source}), {sp}, {ranges}{hu}"
