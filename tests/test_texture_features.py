"""texture_features: MIRP radiomics checked against analytic values on phantoms, the ROI inputs and errors.

Phantoms (each must fail if the tool is wrong): a disc's area and diameter, a sphere's volume on anisotropic
voxels (wrong or ignored spacing gives a volume off by 2x or more), exact mean/variance of constant and
two-level ROIs, the GLCM contrast of a 1-px checkerboard for two bin numbers, and the CT path's fixed 25 HU
bins on pydicom's CT_small.dcm against numpy on the same voxels. About 20 MIRP calls of ~0.3-1.5 s each.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

pytest.importorskip("mirp")

from agent.core.state import CaseInput, CaseState, Evidence, ImageView  # noqa: E402
from agent.core.tool import ToolContext, ToolError  # noqa: E402
from agent.engine.registry import discover  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402
from tools import texture_features as tf  # noqa: E402

TOOL = tf.TextureFeatures()
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def make_ctx(store: ArtifactStore, arr: np.ndarray, spacing=(0.5, 0.5), modality: str = "MR",
             rgb: bool = False) -> ToolContext:
    ref = store.put_array(arr)
    view = ImageView(id="V1", pixels=ref, shape=arr.shape, dtype=str(arr.dtype), ndim_spatial=2 if rgb else arr.ndim,
                     spacing_mm=spacing, modality=modality, photometric="RGB" if rgb else "MONOCHROME2")
    return ToolContext(state=CaseState(inputs=CaseInput(paths=[]), views=[view]), store=store)


def run(ctx: ToolContext, **args) -> tf.TextureOutput:
    out = TOOL.run(ctx, TOOL.Input(**args))
    line = TOOL.summary(out)
    assert line.startswith("texture of ") and "\n" not in line
    assert out.feature_count == len(out.all_features) >= 90 and 18 <= len(out.features) <= 25
    assert set(out.features) <= set(out.all_features) and out.mirp_version.startswith("2.")
    assert [a.kind for a in ctx.artifacts][-1] == "overlay"
    return out


def feat(out: tf.TextureOutput, base: str) -> float:
    hits = [v for k, v in out.all_features.items() if tf.feature_base(k) == base]
    assert len(hits) == 1 and hits[0] is not None, f"{base}: {hits}"
    return hits[0]


def test_registered_and_card():
    tool = discover()["texture_features"]
    assert tool.kind == "measure" and tool.requires_region() and tool.dims == frozenset({2, 3})
    assert "MIRP" in tool.description or "IBSI" in tool.description
    assert tool.limitations and tool.validation


def test_disc_area_diameter_and_constant_intensity(store):
    # r = 40 px at 0.5 mm: area pi*20^2 = 1256.6 mm2, diameter 40 mm. Measured: pixel-count area 1256.25 (-0.03 %),
    # mesh diameter 40.5 (+1.25 %: marching squares puts the edge half a pixel out). Ignored spacing would give 4x.
    yy, xx = np.mgrid[:200, :200]
    img = np.where((yy - 100) ** 2 + (xx - 100) ** 2 <= 40**2, 100.0, 0.0).astype(np.float32)
    out = run(make_ctx(store, img), bbox=[40, 40, 160, 160], threshold=[50, 150])
    assert out.dims == 2 and out.size_unit == "mm2" and out.spacing_used == [1.0, 0.5, 0.5]
    assert out.size == pytest.approx(math.pi * 20**2, rel=0.005)
    assert feat(out, "morph_vol_approx") == out.size
    assert feat(out, "morph_diam") == pytest.approx(40.0, rel=0.02)
    assert feat(out, "morph_pca_elongation") == pytest.approx(1.0, abs=0.01)
    assert feat(out, "stat_mean") == pytest.approx(100.0) and feat(out, "stat_var") == pytest.approx(0.0, abs=1e-9)
    assert out.discretisation.method == "fixed_bin_number" and out.discretisation.bins == 32
    assert out.roi_bbox == [60, 60, 141, 141] and "threshold [50, 150]" in out.roi


def test_two_level_mean_and_variance(store):
    # left half 50, right half 150 in a 40x40 box: mean 100, variance 50^2 = 2500, p10 50, p90 150, skewness 0
    img = np.zeros((64, 64), np.float32)
    img[:, :32], img[:, 32:] = 50.0, 150.0
    out = run(make_ctx(store, img, spacing="unknown"), bbox=[12, 12, 52, 52])
    assert out.roi_voxels == 1600 and out.spacing_unit.startswith("px") and out.size_unit == "px2"
    assert any("spacing unknown" in n for n in out.notes)
    assert feat(out, "stat_mean") == pytest.approx(100.0)
    assert feat(out, "stat_var") == pytest.approx(2500.0, rel=1e-6)
    assert feat(out, "stat_skew") == pytest.approx(0.0, abs=1e-6)
    assert (feat(out, "stat_p10"), feat(out, "stat_p90")) == (pytest.approx(50.0), pytest.approx(150.0))
    assert out.size == 1600.0  # px2


@pytest.mark.parametrize("bins", [32, 8])
def test_checkerboard_glcm_contrast(store, bins):
    # 1-px checkerboard of two values in an n x n box, fixed bin number N: the levels are bins 1 and N. Of the 4
    # in-plane directions (merged, 2d_slice_merge) the horizontal and vertical pairs differ and the diagonal ones
    # match: contrast = (N-1)^2 * 2n(n-1) / (2n(n-1) + 2(n-1)^2) = (N-1)^2 n / (2n-1), exactly.
    n = 32
    yy, xx = np.mgrid[:48, :48]
    img = ((yy + xx) % 2).astype(np.float32) * 10.0
    out = run(make_ctx(store, img), bbox=[8, 8, 8 + n, 8 + n], bins=bins)
    assert feat(out, "cm_contrast") == pytest.approx((bins - 1) ** 2 * n / (2 * n - 1), rel=1e-5)
    assert feat(out, "stat_mean") == pytest.approx(5.0)
    assert any(k.endswith(f"_fbn_n{bins}") for k in out.features)


def test_sphere_volume_anisotropic_3d(store):
    # sphere r = 9 mm on 2.0 x 0.5 x 0.5 mm voxels: V = 4/3 pi r^3 = 3053.6 mm3. Measured: mesh volume +0.7 %, voxel
    # volume +1.1 %, max diameter 19.8 mm (+10 %: the mesh reaches about half a 2-mm slice beyond the sphere),
    # sphericity 0.835 (the staircase surface reads ~20 % too large). Spacing ignored (1 mm cubes) would give 2x.
    sp = (2.0, 0.5, 0.5)
    zz, yy, xx = np.mgrid[:16, :64, :64]
    ball = ((zz - 8) * sp[0]) ** 2 + ((yy - 32) * sp[1]) ** 2 + ((xx - 32) * sp[2]) ** 2 <= 9.0**2
    vol = np.where(ball, 40.0, -1000.0).astype(np.float32)
    vol[0, 0, 0] = 400.0  # HU-like range: CT path
    ctx = make_ctx(store, vol, spacing=sp, modality="CT")
    out = run(ctx, bbox=[0, 0, 64, 64], slices=[1, 15], threshold=[-100, 200])
    exact = 4 / 3 * math.pi * 9.0**3
    assert out.dims == 3 and out.size_unit == "mm3" and out.spacing_used == list(sp)
    assert out.roi_voxels == int(ball.sum()) and out.roi_slices == [4, 13]
    assert out.size == pytest.approx(exact, rel=0.02)
    assert feat(out, "morph_vol_approx") == pytest.approx(ball.sum() * 0.5, rel=1e-9)
    assert feat(out, "morph_vol_approx") == pytest.approx(exact, rel=0.02)
    assert 18.0 <= feat(out, "morph_diam") <= 18.0 + sp[0]
    assert 0.8 < feat(out, "morph_sphericity") < 0.9
    assert out.discretisation.method == "fixed_bin_size" and out.discretisation.bin_width == 25.0
    assert out.discretisation.lower_bound == -100.0 and out.intensity_unit == "HU"
    assert any(k.endswith("_3d_v_mrg_fbs_w25.0") for k in out.features)
    vol_ml = next(m for m in TOOL.findings(out, ctx.view("V1"))[0].measurements if m.name == "volume")
    assert vol_ml.unit == "mL" and vol_ml.value == pytest.approx(out.size / 1000, rel=1e-4)


def test_box_fractions_and_rgb(store):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)
    ctx = make_ctx(store, rgb, spacing="unknown", modality="XC", rgb=True)
    out = run(ctx, bbox=[0.25, 0.25, 0.75, 0.75])
    assert out.roi_bbox == [25, 30, 75, 90] and out.roi_voxels == 50 * 60
    assert out.intensity_unit.startswith("gray 0..1") and any("luminance" in n for n in out.notes)
    from skimage.color import rgb2gray

    assert feat(out, "stat_mean") == pytest.approx(float(rgb2gray(rgb)[25:75, 30:90].mean()), rel=1e-5)


def test_mask_from_earlier_evidence(store):
    img = np.random.default_rng(2).normal(100, 10, (80, 80)).astype(np.float32)
    ctx = make_ctx(store, img)
    labels = np.zeros((80, 80), np.uint8)
    labels[10:30, 10:40], labels[50:70, 20:60] = 1, 2
    ref = store.put_array(labels, kind="mask", description="V1: two labels")
    other = store.put_array(np.ones((40, 40), np.uint8), kind="mask", description="V2: a crop's mask")
    ctx.state.evidence = [Evidence(id="E1", tool="seg", tool_version="1", args={}, status="ok", artifacts=[ref]),
                          Evidence(id="E2", tool="seg", tool_version="1", args={}, status="ok", artifacts=[other])]
    out = run(ctx, mask_from="E1")
    assert out.roi_voxels == 600 + 800 and out.roi.startswith("mask E1")
    out = run(ctx, mask_from=ref.sha256[:10], mask_label=2, bbox=[0, 0, 80, 40])
    assert out.roi_voxels == 20 * 20 and feat(out, "stat_mean") == pytest.approx(float(img[50:70, 20:40].mean()), rel=1e-5)
    with pytest.raises(ToolError, match="40×40 but view V1 is 80×80"):
        TOOL.run(ctx, TOOL.Input(mask_from="E2"))
    with pytest.raises(ToolError, match="no such evidence"):
        TOOL.run(ctx, TOOL.Input(mask_from="E9"))
    with pytest.raises(ToolError, match="no mask with that sha256"):
        TOOL.run(ctx, TOOL.Input(mask_from="deadbeef00"))


def test_slice_mask_on_a_volume(store):
    # a 2D mask saved for one slice of a volume (litemedsam does that) needs `slices` to place it
    vol = np.random.default_rng(5).normal(0, 1, (6, 40, 40)).astype(np.float32)
    ctx = make_ctx(store, vol, spacing=(3.0, 0.8, 0.8))
    m = np.zeros((40, 40), np.uint8)
    m[10:30, 5:25] = 1
    ref = store.put_array(m, kind="mask", description="V1 slice 2: LiteMedSAM mask")
    ctx.state.evidence = [Evidence(id="E1", tool="litemedsam", tool_version="1", args={}, status="ok", artifacts=[ref])]
    with pytest.raises(ToolError, match=r"one 2D slice .* give slices \[k, k\+1\]"):
        TOOL.run(ctx, TOOL.Input(mask_from="E1"))
    out = run(ctx, mask_from="E1", slices=[2, 3])
    assert out.dims == 3 and out.roi_voxels == 400 and out.roi_slices == [2, 3]
    assert feat(out, "morph_vol_approx") == pytest.approx(400 * 3.0 * 0.8 * 0.8, rel=1e-5)
    assert feat(out, "stat_mean") == pytest.approx(float(vol[2, 10:30, 5:25].mean()), rel=1e-4)


def test_errors_tiny_nan_empty(store):
    img = np.random.default_rng(3).normal(size=(50, 50)).astype(np.float32)
    img[30, 30] = np.nan
    ctx = make_ctx(store, img)
    with pytest.raises(ToolError, match=r"ROI has 9 voxel\(s\); texture features need at least 16"):
        TOOL.run(ctx, TOOL.Input(bbox=[0, 0, 3, 3]))
    with pytest.raises(ToolError, match="1 NaN/Inf voxel") as exc:
        TOOL.run(ctx, TOOL.Input(bbox=[20, 20, 40, 40]))
    assert "\n" not in str(exc.value)
    with pytest.raises(ToolError, match="give a region"):
        TOOL.run(ctx, TOOL.Input())
    with pytest.raises(ToolError, match="slices applies to volumes only"):
        TOOL.run(ctx, TOOL.Input(bbox=[0, 0, 10, 10], slices=[0, 1]))


def test_ct_small_box_and_hu_range(store):
    views = load_views([str(CT_SMALL)], store)
    ctx = ToolContext(state=CaseState(inputs=CaseInput(paths=[str(CT_SMALL)]), views=views), store=store)
    root = logging.getLogger()
    handlers = list(root.handlers)
    out = run(ctx, bbox=[32, 32, 96, 96], threshold=[-100, 200])
    assert root.handlers == handlers  # MIRP's logging.basicConfig did not reconfigure the process
    ds = pydicom.dcmread(CT_SMALL)
    hu = (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))[32:96, 32:96]
    keep = hu[(hu >= -100) & (hu <= 200)]
    assert out.intensity_unit == "HU" and out.discretisation.method == "fixed_bin_size"
    assert (out.discretisation.bin_width, out.discretisation.lower_bound) == (25.0, -100.0)
    assert out.roi_voxels == keep.size > 1000
    assert feat(out, "stat_mean") == pytest.approx(float(keep.mean()), rel=1e-5)
    assert feat(out, "stat_var") == pytest.approx(float(keep.var()), rel=1e-5)
    sp = views[0].spacing_mm
    assert out.size == pytest.approx(keep.size * sp[0] * sp[1], rel=1e-5)
    # fixed bin size: bins = floor((HU + 100) / 25) + 1, so at most ceil(300 / 25) + 1 = 13 grey levels
    assert 1 <= feat(out, "cm_joint_avg") <= 13


def test_vectorised_moran_geary_matches_mirp():
    from mirp._features import morph_3d_data

    tf._patch_mirp()
    original = morph_3d_data.Data3DSpatial._spatial_distribution.mirp_original
    rng = np.random.default_rng(4)
    pts = np.unique(rng.integers(0, 12, (260, 3)), axis=0)
    data = pd.DataFrame({"z": pts[:, 0], "y": pts[:, 1], "x": pts[:, 2], "g": rng.normal(size=len(pts))})
    holder = morph_3d_data.Data3DSpatial()
    holder.spacing = (2.0, 0.7, 0.7)
    ref, fast = original(holder, data), tf._vectorised_spatial_distribution(holder, data)
    assert fast == pytest.approx(ref, rel=1e-9)
    data["g"] = 3.0  # one intensity: MIRP's convention (1, 1)
    assert tf._vectorised_spatial_distribution(holder, data) == original(holder, data) == (1.0, 1.0)


@pytest.mark.realcases
def test_realcase_busi(store, realcases):
    cases = [json.loads(x) for x in (realcases / "cases.jsonl").read_text().splitlines() if x.strip()]
    case = next(c for c in cases if c["source"] == "busi_ultrasound")
    views = load_views([str(realcases / case["image"])], store, modality=case["modality"])
    ctx = ToolContext(state=CaseState(inputs=CaseInput(paths=[case["image"]]), views=views), store=store)
    out = run(ctx, bbox=[0.25, 0.25, 0.75, 0.75])
    gray = store.get_array(views[0].pixels)
    h, w = gray.shape
    box = gray[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    assert out.roi_voxels == box.size and out.discretisation.method == "fixed_bin_number"
    assert feat(out, "stat_mean") == pytest.approx(float(box.mean()), rel=1e-5)
    assert all(v is not None and math.isfinite(v) for v in out.features.values())
    assert 0.0 < feat(out, "szm_z_perc") <= 1.0 and feat(out, "cm_contrast") > 0
