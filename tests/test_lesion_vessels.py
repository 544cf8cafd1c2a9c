"""lesion_segment and fundus_vessels: synthetic phantoms with exact geometry (no data needed) and the
realcases quality checks (HAM10000, Kvasir-SEG, DRIVE expert masks; skipped where realcases is absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import dice, expert_box, make_ctx
from helpers import run_tool as call
from PIL import Image
from scipy import ndimage as ndi

from agent.core.tool import ToolContext, ToolError
from agent.engine.registry import discover
from agent.imaging.views import load_views
from agent.store.artifacts import ArtifactStore
from tools.fundus_vessels import field_of_view

TOOLS = discover()
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"

# Floors, from bench/bench_lesion_vessels.py and the per-case figures of the same code (measured 93 HAM,
# 5 Kvasir, 15 DRIVE cases). Each floor sits below the measured figure by about the spread of a case or two.
# HAM10000, the first 30 cases of cases.jsonl with a mask (a harder subset than all 93): unseeded Dice mean
# 0.813 (25 of 30 >= 0.7, worst 0.255), region_measure 0.754 on the first 10 / 0.725 on all 93; box +10 %
# mean 0.860 (worst 0.661). All 93: unseeded 0.864, expert box 0.917, box +10 % 0.892.
HAM_N = 30
HAM_UNSEEDED_MEAN, HAM_UNSEEDED_CASE, HAM_UNSEEDED_ABOVE = 0.77, 0.7, 23
HAM_BOX10_MEAN, HAM_BOX10_MIN = 0.82, 0.55
# Kvasir-SEG, 5 cases: expert box Dice 0.813 0.852 0.779 0.241 0.774 (mean 0.692; the 0.241 box holds two
# polyps), box +10 % mean 0.652, unseeded mean 0.395 (polyps match the mucosa's colour).
KVASIR_BOX_MEAN, KVASIR_BOX10_MEAN, KVASIR_BOX_CASES_ABOVE = 0.6, 0.55, 4
# DRIVE, 15 images, Dice inside the expert FOV: mean 0.764, min 0.729; estimated FOV vs expert 0.997.
DRIVE_MEAN, DRIVE_CASE, DRIVE_FOV = 0.73, 0.68, 0.98


def mask_of(ctx: ToolContext, store: ArtifactStore) -> np.ndarray:
    return store.get_array([a for a in ctx.artifacts if a.kind == "mask"][-1]).astype(bool)


def ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def skin(shape=(300, 400), seed=0) -> np.ndarray:
    """Skin-coloured noise with a gentle brightness gradient, float RGB 0..255."""
    rng = np.random.default_rng(seed)
    img = np.empty((*shape, 3))
    img[:] = (225.0, 180.0, 160.0)
    img *= (1.0 - 0.08 * np.linspace(0, 1, shape[1]))[None, :, None]
    return img + rng.normal(0, 6, img.shape)


def save_rgb(path: Path, img: np.ndarray) -> Path:
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- lesion_segment


def test_lesion_card_and_registry():
    tool = TOOLS["lesion_segment"]
    assert tool.kind == "segment" and tool.modalities is None and set(tool.dims) == {2}
    assert "lesion" in tool.topics and tool.limitations and "HAM10000" in tool.validation
    assert "\n" not in tool.description


def test_lesion_dark_ellipse_on_skin_geometry(store, tmp_path):
    img = skin()
    truth = ellipse(img.shape[:2], 150, 200, 50, 80)
    img[truth] = (120.0, 70.0, 50.0) + np.random.default_rng(1).normal(0, 6, (int(truth.sum()), 3))
    ctx = make_ctx(store, save_rgb(tmp_path / "lesion.png", img), modality="dermoscopy")
    assert ctx.state.views[0].modality == "XC"
    out = call(ctx, "lesion_segment")
    true_area = math.pi * 50 * 80
    assert out.area == pytest.approx(true_area, rel=0.04) and out.area_unit == "px2" and out.length_unit == "px"
    assert out.longest_diameter == pytest.approx(160, rel=0.03)
    assert out.equivalent_diameter == pytest.approx(2 * math.sqrt(50 * 80), rel=0.03)
    assert out.centroid == pytest.approx([150, 200], abs=1.5)
    assert out.bbox == pytest.approx([100, 120, 201, 281], abs=2)
    # an ellipse with semi-axes 80 and 50: Ramanujan perimeter 413.9, compactness 0.922, convex
    assert out.perimeter == pytest.approx(413.9, rel=0.08) and out.compactness == pytest.approx(0.922, abs=0.08)
    assert out.border_irregularity < 0.05 and out.solidity > 0.97 and out.contrast > 5
    assert out.seeded == "none" and not out.spacing_known and "pixels" in out.note and not out.touches_border
    pred = mask_of(ctx, store)
    assert pred.shape == truth.shape and dice(pred, truth) > 0.95 and int(pred.sum()) == out.pixels
    overlay = np.asarray(Image.open(store.path([a for a in ctx.artifacts if a.kind == "overlay"][-1])))
    assert overlay.shape == (300, 400, 3) and (overlay == [255, 0, 0]).all(-1).sum() >= 150  # the Feret line
    (finding,) = TOOLS["lesion_segment"].findings(out, ctx.state.views[0])
    assert finding.bbox == out.bbox and finding.present is None
    assert {m.name: m.unit for m in finding.measurements} == {
        "area": "px2", "longest_diameter": "px", "equivalent_diameter": "px", "compactness": "ratio",
        "border_irregularity": "ratio"}
    assert call(ctx, "lesion_segment") == out  # deterministic


def test_lesion_irregular_border_scores_higher(store, tmp_path):
    img = skin(seed=2)
    yy, xx = np.mgrid[:300, :400]
    ang = np.arctan2(yy - 150, xx - 200)
    star = np.hypot(yy - 150, xx - 200) <= 60 * (1 + 0.35 * np.cos(7 * ang))
    img[star] = (110.0, 60.0, 45.0)
    out = call(make_ctx(store, save_rgb(tmp_path / "star.png", img)), "lesion_segment")
    assert out.border_irregularity > 0.1 and out.compactness < 0.6 and out.solidity < 0.85
    # the smoothing, the closing and the box stage's ellipse prior partly fill the notches: measured +11 %
    assert out.area == pytest.approx(float(star.sum()), rel=0.15)


def test_lesion_seed_and_box_pick_the_asked_lesion(store, tmp_path):
    """A hard case for the unseeded call: the lesion asked about is not the dominant one."""
    img = skin(seed=3)
    big, small = ellipse((300, 400), 150, 200, 60, 70), ellipse((300, 400), 60, 330, 22, 22)
    img[big] = (115.0, 65.0, 50.0)
    img[small] = (150.0, 95.0, 80.0)
    ctx = make_ctx(store, save_rgb(tmp_path / "two.png", img), modality="dermoscopy")
    call(ctx, "lesion_segment")
    unseeded = dice(mask_of(ctx, store), small)
    out = call(ctx, "lesion_segment", seed_point=[60, 330])
    by_point = dice(mask_of(ctx, store), small)
    assert out.seeded == "point" and out.centroid == pytest.approx([60, 330], abs=2)
    out = call(ctx, "lesion_segment", bbox=[30, 300, 91, 361])
    by_box = dice(mask_of(ctx, store), small)
    assert out.seeded == "bbox" and "box" in out.method
    out = call(ctx, "lesion_segment", bbox=[0.1, 0.75, 0.3, 0.9])  # fractions
    assert out.centroid == pytest.approx([60, 330], abs=3)
    assert unseeded < 0.1 and by_point > 0.9 and by_box > 0.9


def test_lesion_bad_seeds_are_tool_errors(store, tmp_path):
    img = skin(seed=4)
    img[ellipse((300, 400), 150, 200, 40, 40)] = (120.0, 70.0, 50.0)
    ctx = make_ctx(store, save_rgb(tmp_path / "l.png", img))
    with pytest.raises(ToolError, match="outside"):
        call(ctx, "lesion_segment", seed_point=[500, 10])
    with pytest.raises(ToolError, match="outside"):
        call(ctx, "lesion_segment", seed_point=[-5, 10])
    with pytest.raises(ToolError):
        call(ctx, "lesion_segment", bbox=[400, 500, 600, 700])  # no overlap with the image
    with pytest.raises(ToolError, match="too small"):
        call(ctx, "lesion_segment", bbox=[100, 100, 104, 300])
    with pytest.raises(ToolError, match="outside the bbox"):
        call(ctx, "lesion_segment", bbox=[100, 150, 200, 250], seed_point=[20, 20])
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(ToolError, match="uniform"):
        call(make_ctx(store, tmp_path / "flat.png"), "lesion_segment")
    ser = make_ctx(store, CT_SMALL)  # 2D CT: runs; a volume would be refused by dims
    assert TOOLS["lesion_segment"].applicable(ser.state.views[0]) is None


def test_lesion_gray_ultrasound_dark_and_mm(store, tmp_path):
    rng = np.random.default_rng(5)
    us = ndi.gaussian_filter(rng.gamma(2.0, 50.0, (256, 256)), 1.0)  # speckle-like texture
    us[ellipse((256, 256), 120, 140, 30, 45)] *= 0.15  # a hypoechoic mass
    Image.fromarray(np.clip(us, 0, 255).astype(np.uint8)).save(tmp_path / "us.png")
    ctx = make_ctx(store, tmp_path / "us.png", modality="ultrasound")
    assert ctx.state.views[0].modality == "US"
    out = call(ctx, "lesion_segment")
    assert "dark" in out.method and out.area == pytest.approx(math.pi * 30 * 45, rel=0.08)
    # a gray image with a known spacing: sizes in mm
    vol = np.clip(us, 0, 255).astype(np.float32)[None]
    img = nib.Nifti1Image(np.ascontiguousarray(vol[:, ::-1, ::-1].transpose(2, 1, 0)), np.diag([0.5, 0.5, 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "us.nii"))
    ctx = make_ctx(store, tmp_path / "us.nii")
    out = call(ctx, "lesion_segment", polarity="dark")
    assert out.spacing_known and out.area_unit == "mm2" and out.length_unit == "mm"
    assert out.area == pytest.approx(math.pi * 15 * 22.5, rel=0.08) and out.longest_diameter == pytest.approx(45, rel=0.06)


# ---------------------------------------------------------------------------------------------- fundus_vessels

SEGMENTS = [((60, 200), (340, 200)), ((200, 200), (110, 320)), ((200, 200), (290, 80)), ((130, 200), (80, 120))]


def fundus_phantom(width: float = 5.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """A 400x400 fundus-like picture: an orange disc (radius 180) on black, a tree of four straight vessels
    `width` px wide darkening the green channel; with its true vessel mask and total centreline length."""
    n = 400
    yy, xx = np.mgrid[:n, :n]
    disc = np.hypot(yy - 200, xx - 200) <= 180
    dist = np.full((n, n), np.inf)
    for (r0, c0), (r1, c1) in SEGMENTS:
        d = np.array([r1 - r0, c1 - c0], float)
        t = np.clip(((yy - r0) * d[0] + (xx - c0) * d[1]) / (d @ d), 0, 1)
        dist = np.minimum(dist, np.hypot(yy - (r0 + t * d[0]), xx - (c0 + t * d[1])))
    vessels = (dist <= width / 2) & disc
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n, 3))
    img[disc] = (200.0, 100.0, 45.0)
    shade = 1.0 - 0.25 * (np.hypot(yy - 200, xx - 200) / 180) ** 2  # darker toward the rim
    img *= shade[..., None]
    img[..., 1] -= 45.0 * np.clip(1.5 - dist / (width / 2), 0, 1) * disc  # soft-edged dark vessels
    img[..., 0] -= 20.0 * np.clip(1.5 - dist / (width / 2), 0, 1) * disc
    img[disc] += rng.normal(0, 2.0, (int(disc.sum()), 3))
    length = sum(math.hypot(r1 - r0, c1 - c0) for (r0, c0), (r1, c1) in SEGMENTS)
    return np.clip(img, 0, 255).astype(np.uint8), vessels, length


def test_vessels_card_and_modality_refusal(store, tmp_path):
    tool = TOOLS["fundus_vessels"]
    assert tool.kind == "segment" and tool.modalities == frozenset({"OP"}) and set(tool.dims) == {2}
    assert "DRIVE" in tool.validation and tool.limitations
    ct = make_ctx(store, CT_SMALL)
    reason = tool.applicable(ct.state.views[0])
    assert reason and "OP" in reason and "CT" in reason
    with pytest.raises(ToolError, match="OP"):
        call(ct, "fundus_vessels")
    img, _, _ = fundus_phantom()
    Image.fromarray(img).save(tmp_path / "f.png")
    derm = make_ctx(store, tmp_path / "f.png", modality="dermoscopy")  # right pixels, wrong modality tag
    assert tool.applicable(derm.state.views[0]) is not None
    assert tool.applicable(make_ctx(store, tmp_path / "f.png", modality="fundus").state.views[0]) is None


def test_vessels_phantom_geometry(store, tmp_path):
    img, truth, length = fundus_phantom(width=5.0)
    Image.fromarray(img).save(tmp_path / "fundus.png")
    ctx = make_ctx(store, tmp_path / "fundus.png", modality="fundus")
    assert ctx.state.views[0].modality == "OP"
    out = call(ctx, "fundus_vessels")
    pred = mask_of(ctx, store)
    assert pred.shape == truth.shape and dice(pred, truth) > 0.8
    # FOV: the disc (pi 180^2 = 101788 px) less the rim erosion (~5 px)
    assert math.pi * 170**2 < out.fov_area < math.pi * 180**2 and out.area_unit == "px2"
    # measured 718 px for 674: the vessel ends' caps add a few px each; calibre measured 5.3 for 5
    assert out.total_length == pytest.approx(length, rel=0.15) and out.length_unit == "px"
    assert out.mean_calibre == pytest.approx(5.0, rel=0.35)
    assert out.vessel_density == pytest.approx(100 * truth.sum() / out.fov_area, rel=0.25)
    # 3 true junctions; measured 6 (noise specks and spurs that survive the pruning)
    assert 2 <= out.branch_points <= 10 and out.pieces <= 3 and not out.spacing_known and "pixels" in out.note
    (finding,) = TOOLS["fundus_vessels"].findings(out, ctx.state.views[0])
    assert {m.name for m in finding.measurements} >= {"vessel_density", "total_vessel_length", "mean_vessel_calibre"}
    overlay = np.asarray(Image.open(store.path([a for a in ctx.artifacts if a.kind == "overlay"][-1])))
    assert overlay.shape == (400, 400, 3) and ((overlay == [0, 255, 0]).all(-1) | (overlay == [255, 255, 0]).all(-1)).sum() > 0
    assert call(ctx, "fundus_vessels") == out  # deterministic


def test_vessels_wider_vessels_measure_wider(store, tmp_path):
    outs = []
    for w in (3.0, 7.0):
        img, _, _ = fundus_phantom(width=w, seed=1)
        Image.fromarray(img).save(tmp_path / f"f{w}.png")
        outs.append(call(make_ctx(store, tmp_path / f"f{w}.png", modality="fundus"), "fundus_vessels"))
    # true calibres 3 and 7 px measure 4.5 and 6.7: the filter widens thin vessels, so the ratio is compressed
    assert outs[1].mean_calibre > 1.3 * outs[0].mean_calibre and outs[1].vessel_density > outs[0].vessel_density


def test_vessels_refuse_a_black_image(store, tmp_path):
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(ToolError, match="field of view"):
        call(make_ctx(store, tmp_path / "black.png", modality="fundus"), "fundus_vessels")


# ---------------------------------------------------------------------------------------------- realcases


def real_cases(root: Path, source: str) -> list[dict]:
    cases = [json.loads(x) for x in (root / "cases.jsonl").read_text().splitlines() if x.strip()]
    return [c for c in cases if c["source"] == source and c.get("mask")]


def truth_of(root: Path, case: dict, key: str = "mask") -> np.ndarray:
    return np.asarray(Image.open(root / case[key]).convert("L")) > 127


@pytest.mark.realcases
def test_modality_codes_of_the_real_photographs(store, realcases):
    """The loader's codes for the realcases modalities, and which of the two tools each one admits."""
    cases = [json.loads(x) for x in (realcases / "cases.jsonl").read_text().splitlines() if x.strip()]
    expected = {"dermoscopy": "XC", "endoscopy": "ES", "fundus": "OP", "pathology": "SM", "ultrasound": "US"}
    for modality, code in expected.items():
        case = next(c for c in cases if c["modality"] == modality)
        view = load_views([str(realcases / case["image"])], store, modality=case["modality"])[0]
        assert view.modality == code, (modality, view.modality)
        assert TOOLS["lesion_segment"].applicable(view) is None
        assert (TOOLS["fundus_vessels"].applicable(view) is None) == (code == "OP")


@pytest.mark.realcases
def test_lesion_ham10000_dice(store, realcases):
    ham = real_cases(realcases, "ham10000_dermoscopy")[:HAM_N]
    if len(ham) < HAM_N:
        pytest.skip("fewer HAM10000 cases with masks than expected")
    unseeded, box10, otsu = [], [], []
    for case in ham:
        ctx = make_ctx(store, realcases / case["image"], modality=case["modality"])
        truth = truth_of(realcases, case)
        out = call(ctx, "lesion_segment")
        assert out.area_unit == "px2" and not out.spacing_known
        unseeded.append(dice(mask_of(ctx, store), truth))
        call(ctx, "lesion_segment", bbox=expert_box(truth, 0.1))
        box10.append(dice(mask_of(ctx, store), truth))
        call(ctx, "region_measure")
        otsu.append(dice(mask_of(ctx, store), truth))
    assert np.mean(unseeded) >= HAM_UNSEEDED_MEAN, np.round(unseeded, 3)
    assert sum(d >= HAM_UNSEEDED_CASE for d in unseeded) >= HAM_UNSEEDED_ABOVE, np.round(unseeded, 3)
    assert np.mean(unseeded) > np.mean(otsu) + 0.03, (np.mean(unseeded), np.mean(otsu))
    assert np.mean(box10) >= HAM_BOX10_MEAN and min(box10) >= HAM_BOX10_MIN, np.round(box10, 3)
    # the hardest unseeded case of the subset: a box from a detector does at least as well
    worst = int(np.argmin(unseeded))
    assert box10[worst] >= unseeded[worst], (ham[worst]["case_id"], unseeded[worst], box10[worst])


@pytest.mark.realcases
def test_lesion_kvasir_boxes(store, realcases):
    kv = real_cases(realcases, "kvasir_seg")
    if len(kv) < 5:
        pytest.skip("fewer Kvasir-SEG cases with masks than expected")
    box, box10, unseeded = [], [], []
    for case in kv:
        ctx = make_ctx(store, realcases / case["image"], modality=case["modality"])
        assert ctx.state.views[0].modality == "ES"
        truth = truth_of(realcases, case)
        call(ctx, "lesion_segment", bbox=expert_box(truth))
        box.append(dice(mask_of(ctx, store), truth))
        call(ctx, "lesion_segment", bbox=expert_box(truth, 0.1))
        box10.append(dice(mask_of(ctx, store), truth))
        call(ctx, "lesion_segment")
        unseeded.append(dice(mask_of(ctx, store), truth))
    assert np.mean(box) >= KVASIR_BOX_MEAN and sum(d >= 0.7 for d in box) >= KVASIR_BOX_CASES_ABOVE, np.round(box, 3)
    assert np.mean(box10) >= KVASIR_BOX10_MEAN, np.round(box10, 3)
    assert np.mean(box) > np.mean(unseeded), (np.round(box, 3), np.round(unseeded, 3))  # seeding helps on polyps


@pytest.mark.realcases
def test_vessels_drive_dice(store, realcases):
    drive = [c for c in real_cases(realcases, "drive_fundus") if c.get("fov_mask")]
    if len(drive) < 15:
        pytest.skip("fewer DRIVE cases with vessel and FOV masks than expected")
    scores, fov_scores = [], []
    for case in drive:
        ctx = make_ctx(store, realcases / case["image"], modality=case["modality"])
        out = call(ctx, "fundus_vessels")
        truth, fov = truth_of(realcases, case), truth_of(realcases, case, "fov_mask")
        pred = mask_of(ctx, store)
        scores.append(dice(pred & fov, truth & fov))
        assert 0.9 * fov.sum() < out.fov_area <= 1.01 * fov.sum()  # the expert FOV less the eroded rim
        rgb = store.get_array(ctx.state.views[0].pixels).astype(np.float64) / 255.0
        fov_scores.append(dice(field_of_view(rgb), fov))
        assert 8.0 < out.vessel_density < 20.0 and out.branch_points > 20
    assert np.mean(scores) >= DRIVE_MEAN and min(scores) >= DRIVE_CASE, np.round(scores, 3)
    assert min(fov_scores) >= DRIVE_FOV, np.round(fov_scores, 3)
