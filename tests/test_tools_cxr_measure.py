"""cxr_lung_fields, cardiothoracic_ratio, detect_candidates and measure_roi on synthetic images with exact
answers and on real radiographs from ../shared/data/realcases (skipped where absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import make_ctx
from helpers import run_tool as call
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from agent.core.tool import ToolError
from agent.engine.registry import discover

TOOLS = discover()
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def png(path: Path, img: np.ndarray) -> Path:
    Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(path)
    return path


def nifti(path: Path, arr: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    """A NIfTI the loader reads back as `arr` ((H, W) or (Z, H, W)), zooms given as (x, y, z) mm."""
    vol = arr[None] if arr.ndim == 2 else arr
    img = nib.Nifti1Image(np.ascontiguousarray(vol[:, ::-1, ::-1].transpose(2, 1, 0), dtype=np.float32),
                          np.diag([*zooms, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def dx_dicom(path: Path, img: np.ndarray, spacing: float, view_position: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.PixelSpacing = "DX", view_position, [spacing, spacing]
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.clip(img * 4000, 0, 65535).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def cxr_phantom(heart_rx: float, n: int = 512, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A frontal chest radiograph phantom: body, two half-elliptic lungs with straight medial borders,
    a heart ellipse (width 2*heart_rx+1) overlapping them and a spine; with its true masks and widths."""
    yy, xx = np.mgrid[:n, :n]

    def ell(cy, cx, ry, rx):
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    img = np.full((n, n), 0.1, np.float32)
    img[ell(256, 256, 250, 235)] = 0.75
    right, left = ell(240, 216, 170, 180) & (xx <= 216), ell(240, 296, 170, 180) & (xx >= 296)
    img[right | left] = 0.3
    heart = ell(330, 256, 70, heart_rx)
    img[heart] = 0.8
    spine = img[:, 246:267]
    spine[spine > 0.5] = 0.85
    img += np.random.default_rng(seed).normal(0, 0.02, img.shape).astype(np.float32)
    cols = np.flatnonzero((right | left).any(axis=0))
    truth = {"right": right & ~heart, "left": left & ~heart, "thoracic": int(cols[-1] - cols[0] + 1),
             "cardiac": int(heart.any(axis=0).sum())}
    return img, truth


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def realcase(root: Path, case_id: str) -> dict:
    for line in (root / "cases.jsonl").read_text().splitlines():
        case = json.loads(line)
        if case["case_id"] == case_id:
            return case
    pytest.skip(f"{case_id} is not among the real cases")


# ---------------------------------------------------------------------------------------------- registry, refusals


def test_the_four_tools_are_discovered_with_their_cards():
    expected = {"cxr_lung_fields": ("segment", {"DX", "CR"}, {2}), "cardiothoracic_ratio": ("measure", {"DX", "CR"}, {2}),
                "detect_candidates": ("detect", None, {2, 3}), "measure_roi": ("measure", None, {2, 3})}
    for name, (kind, mods, dims) in expected.items():
        tool = TOOLS[name]
        assert tool.kind == kind and tool.modalities == (frozenset(mods) if mods else None) and set(tool.dims) == dims
        assert tool.topics and tool.limitations and tool.validation and "\n" not in tool.description
    assert "cardiomegaly" in TOOLS["cardiothoracic_ratio"].topics and "nodule" in TOOLS["detect_candidates"].topics


def test_wrong_modality_is_refused(store, tmp_path):
    ct = make_ctx(store, CT_SMALL).state.views[0]
    for name in ("cxr_lung_fields", "cardiothoracic_ratio"):
        reason = TOOLS[name].applicable(ct)
        assert reason and "DX" in reason and "CT" in reason
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "derm.png")
    derm = make_ctx(store, tmp_path / "derm.png", modality="dermoscopy")
    assert "colour" in TOOLS["detect_candidates"].applicable(derm.state.views[0])
    assert TOOLS["measure_roi"].applicable(derm.state.views[0]) is None
    with pytest.raises(ToolError, match="DX"):
        call(make_ctx(store, CT_SMALL), "cardiothoracic_ratio")


# ---------------------------------------------------------------------------------------------- lung fields and CTR


def test_lung_fields_on_phantom(store, tmp_path):
    img, truth = cxr_phantom(heart_rx=115)
    ctx = make_ctx(store, png(tmp_path / "cxr.png", img), modality="CXR")
    out = call(ctx, "cxr_lung_fields")
    mask = ctx.store.get_array(next(a for a in ctx.artifacts if a.kind == "mask"))
    assert dice(mask == 1, truth["right"]) > 0.95 and dice(mask == 2, truth["left"]) > 0.95
    assert out.area_unit == "px2" and not out.spacing_known and "spacing unknown" in out.note
    assert out.right_lung.pixels == int((mask == 1).sum()) and 0.9 < out.right_to_left_area_ratio < 1.1
    assert out.right_lung.bbox[3] <= 256 <= out.left_lung.bbox[1]  # patient's right lung on the image left
    right, left = TOOLS["cxr_lung_fields"].findings(out, ctx.state.views[0])
    assert right.label == "right lung field" and right.bbox and right.measurements[0].unit == "px2"
    assert any(a.kind == "overlay" for a in ctx.artifacts)


def test_ctr_on_phantoms_within_5_percent(store, tmp_path):
    for rx, enlarged in ((115, True), (70, False)):
        img, truth = cxr_phantom(heart_rx=rx)
        ctx = make_ctx(store, png(tmp_path / f"cxr{rx}.png", img), modality="CXR")
        out = call(ctx, "cardiothoracic_ratio")
        assert out.cardiac_width == pytest.approx(truth["cardiac"], rel=0.05)
        assert out.thoracic_width == pytest.approx(truth["thoracic"], rel=0.05)
        assert out.ctr == pytest.approx(truth["cardiac"] / truth["thoracic"], rel=0.05)
        assert out.cardiomegaly_suggested is enlarged and out.length_unit == "px"
        assert out.projection == "unknown" and "assumes PA" in out.note
        f, heart = TOOLS["cardiothoracic_ratio"].findings(out, ctx.state.views[0])
        assert heart.label == "heart" and heart.present is None and heart.bbox[1] < heart.bbox[3]
        assert f.label == "cardiomegaly" and f.present is enlarged and "0.5" in f.note
        assert [m.name for m in f.measurements] == ["cardiothoracic_ratio", "cardiac_width", "thoracic_width"]
        png_ref = next(a for a in ctx.artifacts if a.kind == "overlay")
        over = np.asarray(Image.open(ctx.store.path(png_ref)))
        row = over[out.thorax_row, out.thorax_cols[0]:out.thorax_cols[1]]
        assert (row == (0, 200, 255)).all(axis=-1).mean() > 0.9  # the thoracic line is drawn where reported


def test_ctr_reads_spacing_and_ap_projection_from_dicom(store, tmp_path):
    img, truth = cxr_phantom(heart_rx=115)
    ctx = make_ctx(store, dx_dicom(tmp_path / "ap.dcm", img, 0.4, "AP"))
    out = call(ctx, "cardiothoracic_ratio", projection="PA")  # the file's ViewPosition wins
    assert (out.projection, out.projection_source, out.length_unit) == ("AP", "dicom ViewPosition", "mm")
    assert out.thoracic_width == pytest.approx(truth["thoracic"] * 0.4, rel=0.05) and "AP film" in out.note
    lungs = call(ctx, "cxr_lung_fields")
    assert lungs.area_unit == "mm2" and lungs.right_lung.area == pytest.approx(lungs.right_lung.pixels * 0.16, rel=1e-3)


def test_flat_or_non_chest_images_are_refused(store, tmp_path):
    ctx = make_ctx(store, png(tmp_path / "flat.png", np.full((128, 128), 0.5, np.float32)), modality="CXR")
    with pytest.raises(ToolError, match="flat"):
        call(ctx, "cxr_lung_fields")
    blob = np.zeros((256, 256), np.float32)
    blob[60:200, 60:200] = 0.8  # one bright square: no lungs
    with pytest.raises(ToolError, match="lung"):
        call(make_ctx(store, png(tmp_path / "sq.png", blob), modality="CXR"), "cardiothoracic_ratio")


@pytest.mark.realcases
def test_ctr_on_real_nih_radiographs(store, realcases):
    # measured with this implementation: Cardiomegaly case CTR 0.59, No Finding case 0.43
    for case_id, enlarged in (("nih14_00000001_000", True), ("nih14_00027426_000", False)):
        case = realcase(realcases, case_id)
        ctx = make_ctx(store, realcases / case["image"], modality="CXR")
        out = call(ctx, "cardiothoracic_ratio", projection=case.get("view", "auto"))
        assert out.cardiomegaly_suggested is enlarged, (case_id, out.ctr)
        assert out.projection == "PA" and out.projection_source == "input"
        r, c = out.heart_right_border, out.heart_left_border
        assert out.thorax_cols[0] < c[1] and r[1] < out.thorax_cols[1] and r[1] < c[1]


@pytest.mark.realcases
def test_lung_fields_on_real_dicom_and_lateral_refused(store, realcases):
    ctx = make_ctx(store, realcases / realcase(realcases, "siim_ptx_6904")["image"])
    out = call(ctx, "cxr_lung_fields")
    assert out.spacing_known and out.area_unit == "mm2" and ctx.state.views[0].modality == "CR"
    sp = ctx.state.views[0].spacing_mm
    assert out.right_lung.area == pytest.approx(out.right_lung.pixels * sp[0] * sp[1], rel=1e-3)
    # SIIM keeps the original 0.168 mm PixelSpacing on its 1024 px copies: 17 cm across, too small for a chest
    assert "implausible" in out.note
    lateral = realcase(realcases, "covidcxr_covid-19-pneumonia-14-L")
    with pytest.raises(ToolError, match="lung field"):
        call(make_ctx(store, realcases / lateral["image"], modality="CXR"), "cxr_lung_fields")


# ---------------------------------------------------------------------------------------------- detect_candidates


def test_detect_finds_planted_blobs_of_known_size(store, tmp_path):
    rng = np.random.default_rng(1)
    img = rng.normal(0.4, 0.01, (256, 320)).astype(np.float32)
    yy, xx = np.mgrid[:256, :320]
    planted = [(70, 80, 12), (150, 200, 20), (200, 90, 30)]  # row, col, diameter px
    for r, c, d in planted:
        img[(yy - r) ** 2 + (xx - c) ** 2 <= (d / 2) ** 2] = 0.8
    ctx = make_ctx(store, png(tmp_path / "blobs.png", img), modality="MR")
    out = call(ctx, "detect_candidates", min_diameter=8, max_diameter=40, top_n=5)
    assert out.length_unit == "px" and "spacing unknown" in out.note and out.diameter_range == [8, 40]
    for r, c, d in planted:
        best = min(out.candidates[:3], key=lambda cd: math.hypot(cd.center[0] - r, cd.center[1] - c))
        assert math.hypot(best.center[0] - r, best.center[1] - c) < 2 and best.diameter == pytest.approx(d, rel=0.15)
        assert best.bbox[0] <= r < best.bbox[2] and best.bbox[1] <= c < best.bbox[3] and best.contrast > 0.3
    fs = TOOLS["detect_candidates"].findings(out, ctx.state.views[0])
    assert len(fs) == len(out.candidates) and fs[0].label == "candidate nodule/blob" and fs[0].present is None
    assert fs[0].bbox == [float(v) for v in out.candidates[0].bbox] and fs[0].measurements[0].name == "diameter"
    with pytest.raises(ToolError, match="lungs"):
        call(ctx, "detect_candidates", within="lungs")


def test_detect_in_ct_lungs_and_volume_in_mm(store, tmp_path):
    n = 128
    yy, xx = np.mgrid[:n, :n]
    hu = np.full((n, n), -1000.0, np.float32)
    hu[((yy - 64) / 56) ** 2 + ((xx - 64) / 60) ** 2 <= 1] = 40.0
    lung = ((yy - 60) / 36) ** 2 + ((xx - 36) / 20) ** 2 <= 1
    hu[lung] = -850.0
    hu[(yy - 60) ** 2 + (xx - 36) ** 2 <= 25] = 30.0  # a 10 mm nodule inside the lung
    hu[(yy - 100) ** 2 + (xx - 90) ** 2 <= 36] = 700.0  # bone outside the lung: brighter, must not count
    ctx = make_ctx(store, nifti(tmp_path / "ct.nii.gz", hu), modality="CT")
    out = call(ctx, "detect_candidates", within="lungs", top_n=3)
    assert out.length_unit == "mm" and out.intensity_unit == "HU" and out.candidates
    best = out.candidates[0]
    assert math.hypot(best.center[0] - 60, best.center[1] - 36) < 2 and best.diameter == pytest.approx(10, rel=0.2)
    assert all(math.hypot(cd.center[0] - 100, cd.center[1] - 90) > 10 for cd in out.candidates)
    vol = np.full((24, 64, 64), 0.1, np.float32)
    zz, yy, xx = np.mgrid[:24, :64, :64]
    vol[((zz - 12) * 2.0) ** 2 + (yy - 30) ** 2 + (xx - 34) ** 2 <= 36] = 0.9  # 12 mm sphere, 2 mm slices
    ctx = make_ctx(store, nifti(tmp_path / "mr.nii.gz", vol, zooms=(1.0, 1.0, 2.0)), modality="MR")
    out = call(ctx, "detect_candidates", min_diameter=6, max_diameter=20, top_n=2)
    best = out.candidates[0]
    assert np.allclose(best.center, [12, 30, 34], atol=1.5) and best.diameter == pytest.approx(12, rel=0.2)
    assert best.slices[0] <= 12 < best.slices[1] and out.spacing_known


@pytest.mark.realcases
def test_detect_within_lungs_on_tbx11k(store, realcases):
    case = realcase(realcases, "tbx11k_tb0007")
    ctx = make_ctx(store, realcases / case["image"], modality="CXR")
    out = call(ctx, "detect_candidates", within="lungs")
    assert 0 < len(out.candidates) <= 10 and out.within == "lungs"
    assert [cd.contrast for cd in out.candidates] == sorted((cd.contrast for cd in out.candidates), reverse=True)
    h, w = ctx.state.views[0].shape
    assert all(0 <= cd.bbox[0] < cd.bbox[2] <= h and 0 <= cd.bbox[1] < cd.bbox[3] <= w for cd in out.candidates)


# ---------------------------------------------------------------------------------------------- measure_roi


def test_measure_roi_disc_box_and_distance_2d(store, tmp_path):
    yy, xx = np.mgrid[:200, :240]
    img = np.full((200, 240), 0.2, np.float32)
    img[(yy - 100) ** 2 + (xx - 120) ** 2 <= 45**2] = 0.8
    ctx = make_ctx(store, png(tmp_path / "disc.png", img), modality="US")
    out = call(ctx, "measure_roi", center=[100, 120], radius=40, points=[[10, 10], [40, 50]])
    assert out.roi == "circle" and out.area == pytest.approx(math.pi * 40**2, rel=0.02) and out.area_unit == "px2"
    assert out.intensity.mean == pytest.approx(204) and out.intensity.std == 0 and out.intensity.unit == "image units"
    assert out.distance == 50.0 and out.distance_unit == "px" and not out.spacing_known
    out = call(ctx, "measure_roi", bbox=[10, 20, 30, 60])
    assert out.area == 800 and out.pixels == 800 and out.roi_bbox == [10, 20, 30, 60] and out.intensity.p50 == 51
    (f,) = TOOLS["measure_roi"].findings(out, ctx.state.views[0])
    assert f.bbox == [10, 20, 30, 60] and f.measurements[0].name == "area" and "spacing unknown" in f.note
    with pytest.raises(ToolError, match="region"):
        call(ctx, "measure_roi")
    with pytest.raises(ToolError, match="either"):
        call(ctx, "measure_roi", bbox=[0, 0, 5, 5], center=[3, 3], radius=2)
    with pytest.raises(ToolError, match="outside"):
        call(ctx, "measure_roi", points=[[0, 0], [500, 0]])


def test_measure_roi_mm_hu_and_3d_volume(store, tmp_path):
    ctx = make_ctx(store, CT_SMALL)
    out = call(ctx, "measure_roi", bbox=[40, 40, 60, 70], points=[[0, 0], [30, 40]])
    sp = ctx.state.views[0].spacing_mm
    assert out.intensity.unit == "HU" and out.area == pytest.approx(600 * sp[0] * sp[1], rel=1e-4)
    assert out.distance == pytest.approx(50 * sp[0], rel=1e-4) and out.distance_unit == "mm"
    vol = np.zeros((40, 64, 64), np.float32)
    ctx = make_ctx(store, nifti(tmp_path / "v.nii.gz", vol, zooms=(1.0, 1.0, 2.0)), modality="MR")
    out = call(ctx, "measure_roi", center=[20, 32, 32], radius=12, points=[[0, 0, 0], [3, 4, 0]])
    assert out.roi == "sphere" and out.volume_unit == "mL"
    assert out.volume == pytest.approx(4 / 3 * math.pi * 12**3 / 1000, rel=0.02)
    assert out.distance == pytest.approx(math.hypot(6, 4)) and out.roi_slices == [14, 27]
    out = call(ctx, "measure_roi", bbox=[0, 0, 10, 10], slices=[5, 8])
    assert out.pixels == 300 and out.volume == pytest.approx(0.6) and out.area == 100
