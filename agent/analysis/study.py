"""The study classifier: what a picture shows (modality, plane/view, body region), with calibrated probabilities.

Runs the cards with `adapter: study_cnn` (the project's own `study_cnn_v1` in tools/models/, trained by
scripts/train_study_classifier.py; network and input normalisation in agent/analysis/study_net.py), loaded lazily through the
learned-tool base (sha256 checked). It runs at intake on every loaded view (agent/imaging/loaders.py calls `intake_study`),
so the view's study block (recorded in the trace's intake event), the report's Study block and the planner's case
line carry its probabilities; inspect_image states them as attributes (modality, plane, body region) that the answer
step cites. It is not a planner tool of its own (it lives in agent/analysis, not tools/): it has already run.

DICOM tags win: a file's Modality is never replaced, and the plane and region probabilities are then those of the
views that modality allows (a CT or MR: axial / coronal / sagittal; a radiograph: frontal / lateral), renormalised.
Probabilities are temperature-scaled on held-out data (the card's `input.temperatures`); the card's validation block
states accuracy and expected calibration error on SLAKE validate and a case-id split of realcases. A top modality
probability under UNCERTAIN makes the modality "uncertain": the report says so, and tools routed on the modality say
why they do or do not apply (agent/core/tool.py).

Limitations: 2D only (a volume's middle slice along axis 0); trained on about 1,300 images from about a dozen sources,
so a picture unlike them (another scanner's export, burned-in overlays, a limb, a non-medical drawing) may be misread
- the calibration holds for data like the held-out sets only; there is no limb region class (no training images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from agent.analysis.learned import LearnedTool, model_used
from agent.analysis.study_net import HEADS, build_net, predict, preprocess
from agent.core.state import ImageView
from agent.core.tool import ToolContext, ToolError
from agent.store.models import ModelCard, ModelStore

ADAPTER = "study_cnn"
UNCERTAIN = 0.6  # a top modality probability below this makes the modality uncertain (agent/core/state.py mirrors it)
RADIOLOGY = ("CT", "MR", "DX", "CR", "US")
PLANES_OF = {"CT": ("axial", "coronal", "sagittal"), "MR": ("axial", "coronal", "sagittal"),
             "DX": ("frontal", "lateral"), "CR": ("frontal", "lateral")}


def _restrict(probs: dict[str, float], keep: tuple[str, ...]) -> dict[str, float]:
    sub = {k: probs[k] for k in keep if k in probs}
    total = sum(sub.values())
    return {k: round(v / total, 4) for k, v in sub.items()} if total > 0 else {}


def conditioned(raw: dict[str, dict[str, float]], modality: str) -> tuple[dict[str, float], dict[str, float]]:
    """(plane, region) probabilities given the modality: the planes it allows, and a region only for radiology."""
    plane = _restrict(raw.get("plane") or {}, PLANES_OF[modality]) if modality in PLANES_OF else {}
    region = dict(raw.get("region") or {}) if modality in RADIOLOGY else {}
    return plane, region


class StudyClassifier(LearnedTool):
    """Loads and runs `study_cnn` cards (the learned-tool base gives the lazy, sha256-checked, once-per-process load).
    Not discovered as a planner tool: it runs at intake."""

    name = "study_classifier"
    description = "intake study classifier (runs at intake; not offered to the planner)"
    kind = "classify"
    adapter = ADAPTER
    card_kinds = frozenset({"classify"})
    requires = ("torch",)

    def build(self, card: ModelCard, path: Path) -> Any:
        import torch

        net = build_net(int(card.input.get("width", 16)))
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return net.eval()

    def classify(self, arr: np.ndarray, rgb: bool, hu: bool) -> tuple[dict[str, dict[str, float]], ModelCard]:
        """Calibrated probabilities of every head for one 2D picture, and the card that gave them."""
        fits = self.cards(None)
        if not fits:
            store = ModelStore()
            why = [f"{c.name}: {store.verify_card(c).message()}" for c in store.cards() if c.adapter == ADAPTER]
            raise ToolError(f"no usable {ADAPTER} model card in the model store ({'; '.join(why) or 'none found'})")
        card = fits[0]
        net = self.load(card)
        temps = {h: float(card.input.get("temperatures", {}).get(h, 1.0)) for h in HEADS}
        return predict(net, preprocess(arr, rgb, hu, int(card.input.get("size", 128)))[None], temps)[0], card

    def run(self, ctx: ToolContext, inp: Any) -> BaseModel:
        raise ToolError("the study classifier runs at intake; inspect_image states what it found")


def intake_study(arr: np.ndarray, rgb: bool, hu: bool) -> dict[str, Any]:
    """The study block a freshly loaded view carries (agent/imaging/loaders.py): the raw calibrated probabilities and the
    card; raises ToolError (one line, naming the card) when the classifier cannot run."""
    try:
        raw, card = StudyClassifier().classify(arr, rgb, hu)
    except ToolError:
        raise
    except Exception as exc:  # torch missing or broken: the caller falls back to the pixel rules and says why
        raise ToolError(f"study classifier: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}") from None
    top = max(raw["modality"], key=raw["modality"].get)
    return {"model": card.name, "sha256": card.sha256, "probabilities": raw, "modality": top,
            "modality_probability": raw["modality"][top], "model_card": model_used(card).model_dump()}


class IntakeStudyInput(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    picture: Any  # the 2D picture (or RGB) as loaded
    rgb: bool
    hu: bool


class IntakeStudyOutput(BaseModel):
    block: dict[str, Any]


class IntakeStudy:
    """`intake_study` in the shape the tool worker runs (agent/engine/worker.py `call`): the engine's intake classifies
    there, so a `dxagent run` process that calls no torch tool never imports torch (about 2.4 s of a cold start), and the
    worker - started when the engine is built, importing torch and this module at once - does it beside the engine's
    own imports (issue 33: cold start)."""

    name = "study_classifier"
    timeout_s = 120.0

    def run(self, ctx: Any, inp: IntakeStudyInput) -> IntakeStudyOutput:
        return IntakeStudyOutput(block=intake_study(inp.picture, inp.rgb, inp.hu))


def study_facts(view: ImageView) -> dict[str, Any]:
    """What a view's study block says, for the report's study block, the planner's case line and the notes:
    model, error, modality probabilities, plane and region (conditioned on the view's modality) with probabilities,
    whether the modality is uncertain, and the likely alternatives."""
    block = view.metadata.get("study") or {}
    raw = block.get("probabilities") or {}
    facts: dict[str, Any] = {"model": block.get("model"), "error": view.metadata.get("study_error") or None,
                             "modality_probabilities": dict(raw.get("modality") or {}), "plane": None,
                             "plane_probability": None, "body_region": None, "body_region_probability": None,
                             "uncertain": view.modality_uncertain, "alternatives": view.modality_alternatives()[:3]}
    if raw:
        plane, region = conditioned(raw, view.modality)
        if plane:
            facts["plane"] = max(plane, key=plane.get)
            facts["plane_probability"] = plane[facts["plane"]]
        if region:
            facts["body_region"] = max(region, key=region.get)
            facts["body_region_probability"] = region[facts["body_region"]]
    return facts


def study_notes(view: ImageView) -> list[str]:
    """The notes (report limitations, planner context) about how the modality was found."""
    f = study_facts(view)
    conf = view.metadata.get("modality_confidence")
    alts = ", ".join(f"{m} {p:.2f}" for m, p in f["alternatives"])
    notes = []
    if f["error"]:
        notes.append(f"The study classifier could not run ({f['error']}); the modality was guessed by pixel rules.")
    if view.modality_source == "classifier":
        notes.append(f"Modality {view.modality} was inferred by the study classifier {f['model']} "
                     f"(probability {conf:.2f}; {alts}), not read from the file; pass --modality to set it.")
    elif view.modality_source == "guess":
        how = f" with confidence {conf:.2f}" if isinstance(conf, int | float) else ""
        notes.append(f"Modality {view.modality} was guessed from the pixels by rules{how}, not read from the file; "
                     "pass --modality to set it.")
    if f["uncertain"]:
        notes.append(f"The modality is uncertain ({alts or view.modality}): tools were chosen for {view.modality}, "
                     "the most likely; tools for the other candidates say why they do not apply.")
    return notes
