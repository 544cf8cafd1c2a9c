"""study_classify: what a picture shows (modality, plane/view, body region), with calibrated probabilities.

Runs the cards with `adapter: study_cnn` (the project's own `study_cnn_v1` in tools/models/, trained by
scripts/train_study_classifier.py; network and input normalisation in tools/_study_net.py). It runs at intake on
every loaded view (tools/imaging.py calls `intake_study`), so the study block, the trace (the intake event's views)
and the report carry its probabilities; the planner may call it again on a derived view. DICOM tags win: a file's
Modality is never replaced, and then the plane and region probabilities are those of the views that modality allows
(a CT or MR: axial / coronal / sagittal; a radiograph: frontal / lateral), renormalised.

Probabilities are temperature-scaled on held-out data (the card's `input.temperatures`); the card's validation block
states accuracy and expected calibration error on SLAKE validate and a case-id split of realcases. A top modality
probability under UNCERTAIN makes the view's modality "uncertain": the report says so, and tools routed on the
modality say why they do or do not apply (tools/base.py).

Limitations: 2D only (a volume's middle slice along axis 0); trained on 1,200 images from about a dozen sources, so a
picture unlike them (another scanner's export, a burned-in overlay, a limb) may be misread - the calibration holds for
data like the held-out sets only; there is no limb region class (no training images); plane of an ultrasound or a
photograph is not stated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from agent.models import ModelCard, ModelStore
from agent.state import ImageView
from tools._learned import LearnedInput, LearnedTool, ModelUsed, model_used
from tools._study_net import HEADS, build_net, predict, preprocess
from tools.base import ToolContext, ToolError

ADAPTER = "study_cnn"
UNCERTAIN = 0.6  # a top modality probability below this makes the modality uncertain
CROSS_SECTIONAL = ("CT", "MR")
RADIOLOGY = ("CT", "MR", "DX", "CR", "US")
PLANES_OF = {"CT": ("axial", "coronal", "sagittal"), "MR": ("axial", "coronal", "sagittal"),
             "DX": ("frontal", "lateral"), "CR": ("frontal", "lateral")}


class StudyOutput(BaseModel):
    view: str
    slice_index: int | None = None
    modality: dict[str, float]
    plane: dict[str, float]  # restricted to the planes the (file's or top) modality allows; {} if none applies
    region: dict[str, float]  # {} for non-radiological pictures (a skin photo has no body region here)
    top: dict[str, str]
    modality_from: str  # "classifier", or "dicom" / "user" when the file or the user set the modality
    model_card: ModelUsed


def _restrict(probs: dict[str, float], keep: tuple[str, ...]) -> dict[str, float]:
    sub = {k: probs[k] for k in keep if k in probs}
    total = sum(sub.values())
    return {k: round(v / total, 4) for k, v in sub.items()} if total > 0 else {}


def conditioned(raw: dict[str, dict[str, float]], modality: str) -> tuple[dict[str, float], dict[str, float]]:
    """(plane, region) probabilities given the modality: the planes it allows, and a region only for radiology."""
    plane = _restrict(raw.get("plane") or {}, PLANES_OF[modality]) if modality in PLANES_OF else {}
    region = dict(raw.get("region") or {}) if modality in RADIOLOGY else {}
    return plane, region


class StudyClassify(LearnedTool):
    name = "study_classify"
    description = ("What the picture shows: calibrated probabilities of modality, plane/view and body region "
                   "(the project's CNN trained on SLAKE and realcases; already run at intake on V1).")
    kind = "classify"
    adapter = ADAPTER
    card_kinds = frozenset({"classify"})
    requires = ("torch",)
    dims = frozenset({2, 3})
    topics = ("modality", "plane", "view", "region", "body part")
    subjects = ("attribute:modality", "attribute:plane", "attribute:body_region")
    limitations = ("2D (a volume's middle slice); trained on about 1,200 images from a dozen sources; no limb class; "
                   "a DICOM Modality tag always wins over it")
    validation = "see the card study_cnn_v1 (held-out SLAKE validate and realcases split)"
    Input = LearnedInput
    Output = StudyOutput

    def build(self, card: ModelCard, path: Path) -> Any:
        import torch

        net = build_net(int(card.input.get("width", 16)))
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return net.eval()

    def classify(self, arr: np.ndarray, rgb: bool, hu: bool, card: ModelCard | None = None
                 ) -> tuple[dict[str, dict[str, float]], ModelCard]:
        """Calibrated probabilities of every head for one 2D picture, and the card that gave them."""
        if card is None:
            fits = self.cards(None)
            if not fits:
                raise ToolError(f"no usable {ADAPTER} model card in the model store "
                                f"({'; '.join(self._why_unusable()) or 'none found'})")
            card = fits[0]
        net = self.load(card)
        size = int(card.input.get("size", 128))
        temps = {h: float(card.input.get("temperatures", {}).get(h, 1.0)) for h in HEADS}
        return predict(net, preprocess(arr, rgb, hu, size)[None], temps)[0], card

    def _why_unusable(self) -> list[str]:
        store = ModelStore()
        return [f"{c.name}: {store.verify_card(c).message()}" for c in store.cards() if c.adapter == ADAPTER]

    def run(self, ctx: ToolContext, inp: LearnedInput) -> StudyOutput:
        from tools.imaging import display_slice, is_rgb, looks_like_hu

        view = self.usable_view(ctx, inp.view)
        arr = ctx.pixels(inp.view)
        rgb = is_rgb(view)
        pic = display_slice(arr, rgb)
        k = None if rgb or arr.ndim == 2 else arr.shape[0] // 2
        card = self.pick(view, inp.model) if inp.model else None
        raw, card = self.classify(pic, rgb, (not rgb) and looks_like_hu(pic), card)
        return summarise(view.id, raw, view, card, k)

    def attributes(self, output: BaseModel, view: ImageView) -> dict[str, dict[str, Any]]:
        assert isinstance(output, StudyOutput)
        out: dict[str, dict[str, Any]] = {}
        if output.modality_from == "classifier":
            top = output.top["modality"]
            out["modality"] = {"value": top, "probability": output.modality[top], "source": "classifier"}
        if output.plane:
            top = max(output.plane, key=output.plane.get)
            out["plane"] = {"value": top, "probability": output.plane[top], "source": "classifier"}
        if output.region:
            top = max(output.region, key=output.region.get)
            out["body_region"] = {"value": top, "probability": output.region[top], "source": "classifier"}
        return out

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, StudyOutput)
        parts = []
        for head, probs in (("modality", output.modality), ("plane", output.plane), ("region", output.region)):
            if probs and not (head == "modality" and output.modality_from != "classifier"):
                top = sorted(probs.items(), key=lambda kv: -kv[1])[:2]
                parts.append(f"{head} " + ", ".join(f"{k} {v:.2f}" for k, v in top))
        if output.modality_from != "classifier":
            parts.insert(0, f"modality from {output.modality_from}")
        return f"{output.view}: " + "; ".join(parts) + f" ({output.model_card.name})"


def summarise(view_id: str, raw: dict[str, dict[str, float]], view: ImageView | None, card: ModelCard,
              slice_index: int | None) -> StudyOutput:
    from_file = view is not None and view.modality_source in ("dicom", "user")
    modality = view.modality if from_file else max(raw["modality"], key=raw["modality"].get)
    plane, region = conditioned(raw, modality)
    top = {"modality": modality}
    if plane:
        top["plane"] = max(plane, key=plane.get)
    if region:
        top["region"] = max(region, key=region.get)
    return StudyOutput(view=view_id, slice_index=slice_index, modality=raw["modality"], plane=plane, region=region,
                       top=top, modality_from=view.modality_source if from_file else "classifier",
                       model_card=model_used(card))


def intake_study(arr: np.ndarray, rgb: bool, hu: bool) -> dict[str, Any]:
    """The study block a freshly loaded view carries (tools/imaging.py): the raw calibrated probabilities and the
    card; raises ToolError (one line, naming the card) when the classifier cannot run."""
    try:
        raw, card = StudyClassify().classify(arr, rgb, hu)
    except ToolError:
        raise
    except Exception as exc:  # torch missing or broken: the caller falls back to the pixel rules and says why
        raise ToolError(f"study classifier: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}") from None
    top = max(raw["modality"], key=raw["modality"].get)
    return {"model": card.name, "sha256": card.sha256, "probabilities": raw, "modality": top,
            "modality_probability": raw["modality"][top]}


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
