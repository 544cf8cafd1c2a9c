"""Issue 14: the organ segmenter the project trains on SLAKE masks (tools/models/organ_seg_slake) as a planner tool.

Dice on a few held-out SLAKE validate slices (skipped where ../shared/data is absent); sides follow the radiological
convention and swap on a flipped picture; a DICOM orientation overrides the convention; organ presence, side, size,
largest-organ and count questions are answered from its evidence (and an organ it looked for and did not find is a
"no" / 0), routed to it without the planner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import dice, make_ctx, run_tool
from PIL import Image

from agent.core.state import CaseInput, CaseState, Evidence
from agent.engine.answer import compose_answer
from agent.engine.session import run_case, tools
from agent.store.models import ModelStore
from tools.organ_segment import patient_side, side_rule

SLAKE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "slake_dev"
needs_slake = pytest.mark.skipif(not (SLAKE / "validate.jsonl").is_file(), reason="../shared/data/slake_dev is absent")


def _validate_case(image: str) -> tuple[Path, dict[str, np.ndarray]]:
    """A validate image and its truth masks per merged organ label ("lung" = left + right lung)."""
    names: dict[int, str] = {}
    for line in (SLAKE / "mask.txt").read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            names[int(k)] = v.strip()
    raw = np.asarray(Image.open(SLAKE / "imgs" / image / "mask.png"))
    truth: dict[str, np.ndarray] = {}
    for value, name in names.items():
        merged = name.lower().replace("left ", "").replace("right ", "").replace(" ", "_").replace("-", "_")
        m = raw == value
        if m.any():
            truth[merged] = truth.get(merged, np.zeros_like(m)) | m
    return SLAKE / "imgs" / image / "source.jpg", truth


def _pick(modality: str, organ: str, n: int) -> list[str]:
    seen, out = set(), []
    for line in (SLAKE / "validate.jsonl").read_text().splitlines():
        r = json.loads(line)
        img = r["image"].split("/")[1]
        if {"MRI": "MR"}.get(r["modality"], r["modality"]) != modality or img in seen:
            continue
        seen.add(img)
        if organ in _validate_case(img)[1]:
            out.append(img)
    return out[:n]


def _mask_of(store, out, label: str) -> np.ndarray:
    from tools.organ_segment import OrganSegment

    card = next(c for c in OrganSegment().cards(None) if c.name == out.model_card.name)
    return store.get_array(out.mask) == card.labels.index(label) + 1


@needs_slake
@pytest.mark.parametrize("modality, organ, floor", [("CT", "liver", 0.7), ("CT", "lung", 0.8), ("CT", "kidney", 0.85)])
def test_dice_on_held_out_validate_slices(store, modality, organ, floor):
    """Floors under the tool's per-organ validate Dice (card `validation.tool.refined`, images with the organ in the
    truth: liver 0.87, lung 0.94, kidney 0.94), over the first 3 validate slices with the organ (measured 2026-12-03,
    organ_seg_slake 1.3: liver 0.82 / 0.98 / 0.79 - 1.2 missed the first, a small liver tip: 0.00 / 0.98 / 0.62 -,
    lung 0.89 / 0.89 / 0.97, kidney 0.89 / 0.96 / 0.95): a broken preprocessing, label order, composition,
    refinement or checkpoint fails them."""
    scores = []
    for img in _pick(modality, organ, 3):
        path, truth = _validate_case(img)
        ctx = make_ctx(store, path, modality=modality)
        out = run_tool(ctx, "organ_segment")
        scores.append(dice(_mask_of(store, out, organ), truth[organ]))
    assert scores and np.mean(scores) >= floor, scores


@needs_slake
def test_sides_swap_on_a_flipped_picture(store, tmp_path):
    """Each kidney's side comes from where it lies: mirrored, the component at the mirrored place gets the other side.
    (The liver is not used: since 1.3 it comes from a network trained without flips, which expects the liver on the
    picture's left as the radiological convention displays it, and misses it on an untagged mirrored picture - the
    documented cost; a DICOM orientation tag makes the tool mirror the picture back, see the test below.)"""
    img = _pick("CT", "kidney", 1)[0]
    path, _ = _validate_case(img)
    gray = np.asarray(Image.open(path).convert("L"))
    flipped = tmp_path / "flipped.png"
    Image.fromarray(gray[:, ::-1].copy()).save(flipped)
    kidneys = {}
    for name, p in (("orig", path), ("flip", flipped)):
        out = run_tool(make_ctx(store, p, modality="CT"), "organ_segment")
        kidneys[name] = next(o for o in out.organs if o.label == "kidney").components
        assert "radiological convention" in out.side_convention
    assert {c.side for c in kidneys["orig"]} == {"left", "right"}
    width = gray.shape[1]
    for c in kidneys["orig"]:
        mirrored = np.array([c.centroid[0], width - 1 - c.centroid[1]])
        near = min(kidneys["flip"], key=lambda f: float(np.hypot(*(np.array(f.centroid) - mirrored))))
        assert float(np.hypot(*(np.array(near.centroid) - mirrored))) < 0.05 * width
        assert {c.side, near.side} == {"left", "right"}, (c, near)


def test_dicom_orientation_overrides_the_convention():
    from helpers import bare_view

    v = bare_view("CT")
    assert side_rule(v)[0] == "left"  # image right = patient left
    flipped = v.model_copy(update={"metadata": {"ImageOrientationPatient": [-1, 0, 0, 0, 1, 0]}})
    assert side_rule(flipped)[0] == "right" and patient_side("left", "right") == "left"
    sag = v.model_copy(update={"metadata": {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}})
    assert side_rule(sag)[0] is None and patient_side("left", None) == "undefined"
    lat = v.model_copy(update={"metadata": {"PatientOrientation": ["A", "F"]}})
    assert side_rule(lat)[0] is None


def test_the_bundled_card_is_usable_and_hashed():
    card = ModelStore().get("organ_seg_slake")
    assert ModelStore().verify_card(card, fresh=True).ok and card.adapter == "organ_unet"
    assert {"liver", "lung", "kidney", "heart", "spleen"} <= set(card.labels)


@needs_slake
def test_organ_questions_are_answered_from_its_evidence_without_the_planner(tmp_path):
    ct = _pick("CT", "kidney", 1)[0]
    mr_brain = next(img for img in _pick("MR", "brain_edema", 3))
    path, _ = _validate_case(ct)
    cases = [("How many kidneys are there in this image?", path, "count", 2),
             ("Does the picture contain kidney?", path, "yes_no", "yes"),
             ("Where is the liver?", path, "location", "right"),
             ("Which is bigger in this image, liver or kidney?", path, "choice", "liver"),
             ("Does the picture contain kidney?", _validate_case(mr_brain)[0], "yes_no", "no"),
             ("How many kidneys are there in this image?", _validate_case(mr_brain)[0], "count", 0)]
    for question, p, kind, value in cases:
        res = run_case([str(p)], question, llm="scripted", script=[], trace_dir=tmp_path,
                       modality="MR" if p != path else "CT")
        a = res.report["answer"]
        if kind == "yes_no" and value == "no" and a["kind"] == "abstain":  # the segmenter's "absent" route is
            assert a["reason"] == "low_confidence" and "organ_segment:absent" in a["basis"], a  # withheld (calibration)
            continue
        assert (a["kind"], a["value"]) == (kind, value), (question, a)
        # the VQA expert (routed first where its gate takes the question) may be cited beside the segmenter
        assert [e.tool for e in res.state.evidence if e.tool != "vqa_expert"] == ["organ_segment"] and a["evidence_ids"]
        assert res.report["recommendation"]["outcome"] == "report"


def test_absent_organs_answer_no_only_for_what_it_looked_for(store):
    from pydicom.data import get_testdata_file

    ctx = make_ctx(store, get_testdata_file("CT_small.dcm"))
    out = run_tool(ctx, "organ_segment")
    ev = Evidence(id="E1", tool="organ_segment", tool_version="1", args={"view": "V1"}, status="ok",
                  output=out.model_dump(mode="json"))
    st = CaseState(inputs=CaseInput(paths=["x"]), views=ctx.state.views, evidence=[ev],
                   question="Is there a pneumothorax?", applicable_tools=list(tools()))
    assert compose_answer(st, tools()).kind == "abstain"  # not a label it looks for: no "no" from it


def test_refine_redraws_only_its_classes_inside_their_boxes():
    """tools/_organ_net.refine: the box-prompted segmenter re-draws class 1 from a box around each component (plus the
    margin); class 2's pixels stay class 2 although the prompt's probability covers them, and a piece of the prompt's
    mask that does not touch the component's box is dropped."""
    from agent.analysis.organ_net import refine

    labels = np.zeros((60, 60), np.int64)
    labels[10:20, 10:20] = 1  # the U-Net's square "organ"
    labels[30:40, 30:40] = 2  # another organ, not refined
    boxes = []

    def segment(box):
        boxes.append(box)
        p = np.zeros((60, 60), np.float32)
        p[8:22, 8:22] = 0.9  # the "true" outline: a bit larger
        p[30:35, 30:35] = 0.9  # overlaps class 2: must not take it
        p[50:55, 50:55] = 0.9  # detached, outside the box: dropped
        return p

    out, changed = refine(labels, {1: 0.2}, segment)
    assert boxes == [(8, 8, 22, 22)]  # 10..20 grown by 0.2 x 10 px on each side
    assert (out == 1).sum() == 14 * 14 and (out[8:22, 8:22] == 1).all()
    assert (out == 2).sum() == 100 and not (out[50:55, 50:55]).any()
    assert changed == {1: 14 * 14 - 100}


def test_a_refiner_that_cannot_load_is_stated_and_the_unet_outline_kept(store, tmp_path, monkeypatch):
    """LiteMedSAM weights with the wrong sha256: organ_segment still answers with the U-Net's outlines and says why
    they were not refined (no silent fallback)."""
    from pydicom.data import get_testdata_file

    from agent.analysis import medsam
    from tools import organ_segment

    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setenv(medsam.WEIGHTS_ENV, str(bad))
    from agent.analysis import organ_net

    monkeypatch.setattr(organ_segment, "REFINE", {"liver": 0.2, "spinal_cord": 0.2, "kidney": 0.2})
    liver = ModelStore().get("organ_seg_slake").labels.index("liver") + 1
    real = organ_net.predict

    def predict_with_a_liver(*a, **kw):  # the demo slice need not show an organ: give the refiner one to touch
        lab, probs = real(*a, **kw)
        lab[20:60, 20:60] = liver
        return lab, probs

    monkeypatch.setattr(organ_net, "predict", predict_with_a_liver)
    out = run_tool(make_ctx(store, get_testdata_file("CT_small.dcm")), "organ_segment")
    assert any(o.label == "liver" for o in out.organs), out.organs
    assert out.refined == [] and any("outlines not refined" in n and "sha256" in n for n in out.notes), out.notes


def test_flip_averaging_is_mirror_equivariant_and_checked():
    """organ_net.predict(tta=("hflip",)) averages the softmax of the picture and of its mirror, so the labels of a
    mirrored picture are the mirrored labels exactly (left/right organs are one class); without it they need not be.
    An unknown augmentation is refused, not ignored."""
    from agent.analysis.organ_net import load_net, predict

    card = ModelStore().get("organ_seg_slake")
    net = load_net(card.input, card.weights_path)
    rng = np.random.default_rng(0)
    img = rng.random((97, 130)).astype(np.float32)
    img[20:70, 10:60] += 2.0  # something asymmetric
    lab, probs = predict(net, img, False, 64, tta=("hflip",))
    lab_m, probs_m = predict(net, img[:, ::-1].copy(), False, 64, tta=("hflip",))
    assert (lab_m == lab[:, ::-1]).all() and np.allclose(probs_m, probs[:, :, ::-1], atol=1e-5)
    assert np.allclose(probs.sum(0), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        predict(net, img, False, 64, tta=("vflip",))


def test_presence_floors_set_small_classes_to_background():
    """agent/analysis/organ_net.apply_floors (the card's input.presence_floor): a class under its floor becomes
    background and is named; one above it, and a class without a floor, stay; a floor for an unknown class is refused."""
    from agent.analysis.organ_net import apply_floors

    labels = np.zeros((100, 100), np.int64)
    labels[:5, :5] = 1  # 0.25 % of the picture
    labels[50:80, 50:80] = 2  # 9 %
    labels[90:92, 90:92] = 3  # 0.04 %, no floor of its own
    out, dropped = apply_floors(labels, ["lung", "liver", "kidney"], {"lung": 0.003, "liver": 0.003})
    assert dropped == ["lung"] and not (out == 1).any() and (out == 2).sum() == 900 and (out == 3).sum() == 4
    assert (labels == 1).sum() == 25  # the caller's map is not changed in place
    with pytest.raises(ValueError, match="not one of the card's labels"):
        apply_floors(labels, ["lung"], {"spleen": 0.01})


def test_a_net_trained_on_the_radiological_convention_sees_a_mirrored_picture(store, tmp_path, monkeypatch):
    """A card with input.orientation: radiological (trained without flips, so it knows the liver's side) given a DICOM
    slice whose ImageOrientationPatient says image right = patient right: the network gets the mirror image, its labels
    are mirrored back, and the liver it finds on the mirror's left lies on the picture's right = the patient's right."""
    import pydicom
    from pydicom.data import get_testdata_file

    from agent.analysis import organ_net
    from tools.organ_segment import OrganSegment

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]  # rows run towards the patient's right
    path = tmp_path / "patient_right_on_the_right.dcm"
    ds.save_as(path)
    card = ModelStore().get("organ_seg_slake")
    liver = card.labels.index("liver") + 1
    radiological = card.model_copy(update={"input": {**card.input, "orientation": "radiological", "tta": []}})
    seen = []

    def liver_on_the_left_of_what_it_sees(net, img, rgb, size, with_probs=True, tta=()):
        seen.append(np.array(img))
        lab = np.zeros(np.shape(img)[:2], np.int64)
        lab[40:90, 5:45] = liver
        probs = np.zeros((len(card.labels) + 1, *lab.shape), np.float32)
        probs[0], probs[liver] = lab != liver, lab == liver
        return lab, probs

    monkeypatch.setattr(organ_net, "predict", liver_on_the_left_of_what_it_sees)
    outs = []
    plain = card.model_copy(update={"input": {k: v for k, v in card.input.items() if k != "orientation"}})
    for c in (plain, radiological):  # a card trained with flips (no orientation), then a radiological one
        monkeypatch.setattr(OrganSegment, "pick", lambda self, view, name, c=c: c)
        outs.append(run_tool(make_ctx(store, path, modality="CT"), "organ_segment", refine=False))
    assert np.array_equal(seen[1], seen[0][:, ::-1])
    assert not any("mirrored for the network" in n for n in outs[0].notes)
    organ = next(o for o in outs[1].organs if o.label == "liver")
    assert organ.components[0].image_side == "right" and organ.components[0].side == "right", organ
    assert (_mask_of(store, outs[1], "liver")[40:90, -45:-5]).all()
    assert any("mirrored for the network" in n for n in outs[1].notes), outs[1].notes


def test_class_override_takes_the_expert_s_classes_and_keeps_the_rest_proportional():
    """agent/analysis/organ_net.ClassOverride (organ_seg_slake 1.3): the override channels are the expert's
    probabilities, the others the base's rescaled so every pixel's probabilities still sum to 1; built from a card's
    `net` description."""
    import torch

    from agent.analysis.organ_net import build_net

    torch.manual_seed(0)
    unet = {"arch": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
            "strides": [2], "num_res_units": 0}
    net = build_net({"net": {"arch": "ClassOverride", "base": unet, "expert": unet, "classes": [1, 3],
                             "base_tta": ["hflip"]}}).eval()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        out = torch.exp(net(x))
        p = 0.5 * (torch.softmax(net.base(x), 1) + torch.softmax(net.base(x.flip(-1)), 1).flip(-1))
        q = torch.softmax(net.expert(x), 1)
    assert torch.allclose(out.sum(1), torch.ones(1, 16, 16), atol=1e-5)
    assert torch.allclose(out[:, [1, 3]], q[:, [1, 3]], atol=1e-6)
    ratio = out[:, [0, 2]] / p[:, [0, 2]]  # the base's other classes keep their proportions
    assert torch.allclose(ratio[:, 0], ratio[:, 1], atol=1e-4)
