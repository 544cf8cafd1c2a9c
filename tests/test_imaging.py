"""agent/imaging/loaders.py: loading DICOM files and series, NIfTI, PNG/JPEG/TIFF into views, and refusing bad inputs."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import random
import re
import struct
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image, features
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from agent.core.files import sha256_file
from agent.imaging.loaders import MAX_SIDE, ImageLoadError
from agent.imaging.modality import guess_modality
from agent.imaging.views import load_views
from agent.store.artifacts import ArtifactStore

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ALLOWED_META = {
    "Modality", "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "ViewPosition",
    "PhotometricInterpretation", "BitsStored", "Rows", "Columns", "NumberOfFrames", "SliceThickness", "KVP",
    "WindowCenter", "WindowWidth", "PatientSex", "PatientAge",
    "format", "spacing_source", "modality_confidence", "modality_guess", "modality_note", "modality_user",
    "downscaled_from", "nonfinite_replaced", "inverted_monochrome1", "frames_total", "frame_used", "gray_from_rgb",
    "slices", "slice_order", "slice_spacing_irregular", "files_skipped", "spacing_inplane_mm", "orientation",
    "ImageOrientationPatient", "PatientOrientation", "study", "study_error", "secondary_capture",
}


def bundled(name: str) -> Path:
    """A file shipped inside the pydicom wheel (never downloaded)."""
    p = TEST_FILES / name
    if not p.exists():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return p




def load1(path: Path | str, store: ArtifactStore, **kw):
    (view,) = load_views([str(path)], store, **kw)
    return view, store.get_array(view.pixels)


def load_error(path: Path | str, store: ArtifactStore) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_views([str(path)], store)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(Path(path).name + ":"), msg
    return msg


# ---------------------------------------------------------------------------------------------- DICOM


def test_ct_small_in_hounsfield_units(store):
    path = bundled("CT_small.dcm")
    view, arr = load1(path, store)
    ds = pydicom.dcmread(path)
    assert view.id == "V1" and view.shape == (128, 128) and view.dtype == "float32" and view.ndim_spatial == 2
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr, apply_modality_lut(ds.pixel_array, ds))
    assert float(ds.RescaleIntercept) == -1024 and arr.min() < -800 and arr.max() > 1000  # HU: air and bone
    assert view.modality == "CT" and view.modality_source == "dicom" and view.photometric == "MONOCHROME2"
    assert view.spacing_mm == pytest.approx((0.661468, 0.661468))
    assert view.metadata["spacing_source"] == "PixelSpacing" and view.metadata["format"] == "dicom"
    assert view.metadata["KVP"] == 120.0 and view.metadata["modality_confidence"] == 1.0
    assert view.source_sha256 == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.verify(view.pixels)


def test_metadata_is_de_identified(store, tmp_path):
    src = bundled("CT_small.dcm")
    path = tmp_path / "Doe_John_1CT1.dcm"
    path.write_bytes(src.read_bytes())
    view, _ = load1(path, store)
    text = json.dumps(view.model_dump(mode="json"))
    ds = pydicom.dcmread(path)
    assert set(view.metadata) <= ALLOWED_META
    for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName", "StudyDescription"):
        assert key not in view.metadata
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.StudyDate), str(ds.SOPInstanceUID),
               str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "Doe_John", str(tmp_path)]
    for elem in ds.iterall():  # every name, date, time, UID and ID in the file
        if elem.VR in ("PN", "DA", "DT", "UI") or "ID" in elem.keyword or "Institution" in elem.keyword:
            if elem.value not in (None, "") and len(str(elem.value)) >= 4:
                secrets.append(str(elem.value))
    for s in secrets:
        assert s not in text, s
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", json.dumps(view.metadata))  # no UID-like strings


@pytest.mark.parametrize(("age", "expected"), [("095Y", "90+"), ("090Y", "90+"), ("045Y", "45Y"), ("006M", "6M")])
def test_patient_age_over_89_is_capped(store, tmp_path, age, expected):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.PatientAge = age
    ds.save_as(tmp_path / "a.dcm")
    view, _ = load1(tmp_path / "a.dcm", store)
    assert view.metadata["PatientAge"] == expected


def test_mr_small_and_rle_compressed_copy_match(store):
    mr, a = load1(bundled("MR_small.dcm"), store)
    rle, b = load1(bundled("MR_small_RLE.dcm"), store)
    assert mr.modality == rle.modality == "MR" and mr.spacing_mm == pytest.approx((0.3125, 0.3125))
    np.testing.assert_array_equal(a, b)
    assert mr.metadata["WindowCenter"] == 600.0 and mr.metadata["WindowWidth"] == 1600.0


def _decoder_installed(*modules: str) -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in modules)


def test_jpeg_ls_without_decoder_names_the_missing_handler(store):
    path = bundled("MR_small_jpeg_ls_lossless.dcm")
    if _decoder_installed("gdcm", "pylibjpeg", "jpeg_ls"):
        view, _ = load1(path, store)
        assert view.shape == (64, 64)
    else:
        msg = load_error(path, store)
        assert "no decoder installed" in msg and "JPEG-LS" in msg and "pylibjpeg" in msg


def test_jpeg2000_decodes_through_pillow_or_names_the_handler(store):
    path = bundled("JPEG2000.dcm")
    if features.check("jpg_2000"):
        view, arr = load1(path, store)
        assert view.shape == (1024, 256) and view.modality == "NM" and np.isfinite(arr).all()
    else:
        assert "decoder" in load_error(path, store)


def test_multiframe_gray_is_a_volume(store):
    view, arr = load1(bundled("rtdose.dcm"), store)
    assert view.shape == (15, 10, 10) and view.ndim_spatial == 3 and arr.dtype == np.float32
    assert view.spacing_mm == pytest.approx((5.0, 10.0, 10.0))  # z from GridFrameOffsetVector
    assert "GridFrameOffsetVector" in view.metadata["spacing_source"]


def test_multiframe_colour_keeps_the_first_frame(store):
    view, arr = load1(bundled("SC_rgb_rle_2frame.dcm"), store)
    assert view.shape == (100, 100, 3) and arr.dtype == np.uint8 and view.photometric == "RGB"
    assert view.ndim_spatial == 2 and view.metadata["frames_total"] == 2 and view.metadata["frame_used"] == 0


def test_palette_colour_becomes_rgb(store):
    view, arr = load1(bundled("examples_palette.dcm"), store)
    assert view.photometric == "RGB" and arr.shape == (350, 800, 3) and arr.dtype == np.uint8
    assert view.spacing_mm == "unknown" and view.modality == "US"


def test_monochrome1_is_inverted(store, tmp_path):
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    _, orig = load1(bundled("MR_small.dcm"), store)
    view, inv = load1(tmp_path / "m1.dcm", store)
    np.testing.assert_allclose(inv, orig.min() + orig.max() - orig)
    assert view.metadata["inverted_monochrome1"] is True and view.photometric == "MONOCHROME2"
    assert view.metadata["WindowCenter"] == pytest.approx(orig.min() + orig.max() - 600.0)


def _write_series(folder: Path, n: int = 4, dz: float = 2.5, positions: bool = True, seed: int = 0) -> list[Path]:
    """n slices made from CT_small; slice k (by position) holds raw values + 10*k; written in shuffled order."""
    src = pydicom.dcmread(bundled("CT_small.dcm"))
    folder.mkdir()
    order = list(range(n))
    random.Random(seed).shuffle(order)
    series_uid = generate_uid()
    paths = []
    for i, k in enumerate(order):
        ds = copy.deepcopy(src)
        ds.PixelData = (src.pixel_array + 10 * k).astype(src.pixel_array.dtype).tobytes()
        x, y, z = (float(v) for v in src.ImagePositionPatient)
        if positions:
            ds.ImagePositionPatient = [x, y, z + dz * k]
        else:
            del ds.ImagePositionPatient
        ds.InstanceNumber = k + 1 if not positions else n - k  # reversed: positions must win
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        path = folder / f"img{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    (folder / "README.txt").write_text("not dicom")
    return paths


@pytest.mark.parametrize("positions", [True, False])
def test_dicom_series_folder_is_sorted_into_a_volume(store, tmp_path, positions):
    paths = _write_series(tmp_path / "series", positions=positions)
    view, vol = load1(tmp_path / "series", store)
    base = apply_modality_lut(pydicom.dcmread(bundled("CT_small.dcm")).pixel_array, pydicom.dcmread(paths[0]))
    assert view.shape == (4, 128, 128) and view.ndim_spatial == 3 and view.modality == "CT"
    for k in range(4):
        np.testing.assert_allclose(vol[k], base + 10 * k)
    assert view.metadata["slice_order"] == ("ImagePositionPatient" if positions else "InstanceNumber")
    assert view.metadata["slices"] == 4 and view.metadata["files_skipped"] == 1
    if positions:
        assert view.spacing_mm == pytest.approx((2.5, 0.661468, 0.661468))
    else:
        assert view.spacing_mm == pytest.approx((5.0, 0.661468, 0.661468))  # SliceThickness
    per_file = sorted(sha256_file(p) for p in paths)
    assert view.source_sha256 == hashlib.sha256("".join(per_file).encode()).hexdigest()


def test_dicom_series_refuses_mixed_series_and_duplicate_positions(store, tmp_path):
    paths = _write_series(tmp_path / "mixed")
    ds = pydicom.dcmread(paths[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(paths[0])
    assert "several DICOM series" in load_error(tmp_path / "mixed", store)
    paths = _write_series(tmp_path / "dup", dz=0.0)
    assert "share one position" in load_error(tmp_path / "dup", store)
    (tmp_path / "empty").mkdir()
    assert "no DICOM image files" in load_error(tmp_path / "empty", store)


# ---------------------------------------------------------------------------------------------- NIfTI


def _nifti(path: Path, data: np.ndarray, zooms=(0.8, 0.9, 2.5)) -> Path:
    affine = np.diag([*zooms[: min(3, data.ndim)], *([1.0] * (3 - min(3, data.ndim))), 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_3d_becomes_z_h_w_with_header_spacing(store, tmp_path, suffix):
    data = np.arange(20 * 30 * 10, dtype=np.float32).reshape(20, 30, 10)  # (x, y, z)
    view, arr = load1(_nifti(tmp_path / f"vol{suffix}", data), store)
    assert view.shape == (10, 30, 20) and view.ndim_spatial == 3 and view.metadata["format"] == "nifti"
    assert view.spacing_mm == pytest.approx((2.5, 0.9, 0.8))
    # rows run anterior -> posterior (y flipped), columns patient right -> left (x flipped)
    assert arr[3, 0, 0] == data[19, 29, 3] and arr[3, 29, 19] == data[0, 0, 3]
    assert view.modality_inferred and view.metadata["study"]["slice_index"] == 5


def test_nifti_2d_and_trailing_singletons(store, tmp_path):
    view, _ = load1(_nifti(tmp_path / "flat.nii", np.ones((20, 30, 1), np.float32) * np.arange(30)[None, :, None]),
                    store)
    assert view.shape == (30, 20) and view.ndim_spatial == 2 and view.spacing_mm == pytest.approx((0.9, 0.8))
    view, _ = load1(_nifti(tmp_path / "t1.nii.gz", np.zeros((8, 9, 5, 1), np.float32)), store)
    assert view.shape == (5, 9, 8)


def test_nifti_4d_and_5d_are_refused(store, tmp_path):
    msg = load_error(_nifti(tmp_path / "v.nii.gz", np.zeros((64, 64, 30, 5), np.int16)), store)
    assert msg == "v.nii.gz: 4D volume (64, 64, 30, 5) is not supported; pass a single 3D volume"
    assert "5D" in load_error(_nifti(tmp_path / "w.nii", np.zeros((4, 4, 4, 2, 2), np.int16)), store)


def test_nonfinite_voxels_replaced_below_one_percent_else_refused(store, tmp_path):
    data = np.random.default_rng(0).normal(100, 10, (40, 40, 10)).astype(np.float32)
    few = data.copy()
    few.reshape(-1)[:50] = np.nan  # 0.3 %
    few.reshape(-1)[50:60] = np.inf
    view, arr = load1(_nifti(tmp_path / "few.nii", few), store)
    assert np.isfinite(arr).all() and view.metadata["nonfinite_replaced"] == 60
    assert arr.min() == pytest.approx(np.nanmin(few[np.isfinite(few)]))
    many = data.copy()
    many[:, :4] = np.nan  # 10 %
    assert "NaN/Inf" in load_error(_nifti(tmp_path / "many.nii", many), store)


# ---------------------------------------------------------------------------------------------- PNG / JPEG / TIFF


def test_png_8bit_16bit_rgb_rgba_palette_and_tiff(store, tmp_path):
    rng = np.random.default_rng(1)
    g8 = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    g16 = rng.integers(0, 60000, (40, 50)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g16).save(tmp_path / "g16.tif")
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 50), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)

    v, a = load1(tmp_path / "g8.png", store)
    assert a.dtype == np.float32 and np.array_equal(a, g8) and v.photometric == "MONOCHROME2"
    assert v.spacing_mm == "unknown" and v.metadata["format"] == "png" and v.ndim_spatial == 2
    for name in ("g16.png", "g16.tif"):
        v, a = load1(tmp_path / name, store)
        assert np.array_equal(a, g16.astype(np.float32)), name
    assert load1(tmp_path / "g16.tif", store)[0].metadata["format"] == "tiff"
    for name in ("rgb.png", "rgba.png"):
        v, a = load1(tmp_path / name, store)
        assert a.dtype == np.uint8 and np.array_equal(a, rgb) and v.photometric == "RGB" and v.ndim_spatial == 2
        assert v.modality_source == "classifier" and v.metadata["study"]["model"] == "study_cnn_v1"
    v, a = load1(tmp_path / "pal.png", store)
    assert a.shape == (40, 50, 3) and a.dtype == np.uint8
    v, a = load1(tmp_path / "photo.jpg", store)
    assert v.metadata["format"] == "jpeg" and a.shape == (40, 50, 3)


def test_gray_picture_saved_as_rgb_is_gray(store, tmp_path):
    g = np.random.default_rng(2).integers(0, 256, (30, 30), dtype=np.uint8)
    Image.fromarray(np.dstack([g, g, g])).save(tmp_path / "cxr.png")
    v, a = load1(tmp_path / "cxr.png", store)
    assert v.photometric == "MONOCHROME2" and a.shape == (30, 30) and v.metadata["gray_from_rgb"] is True
    assert v.modality_source == "classifier" and v.metadata["study"]["probabilities"]["modality"]


def test_content_wins_over_extension(store, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "scan.dcm").write_bytes((tmp_path / "x.png").read_bytes())
    v, _ = load1(tmp_path / "scan.dcm", store)
    assert v.metadata["format"] == "png"
    (tmp_path / "ct.png").write_bytes(bundled("CT_small.dcm").read_bytes())
    v, _ = load1(tmp_path / "ct.png", store)
    assert v.metadata["format"] == "dicom" and v.modality == "CT"


def test_long_images_are_downscaled_with_spacing(store, tmp_path):
    Image.fromarray(np.zeros((300, 5000), np.uint8)).save(tmp_path / "wide.png")
    v, a = load1(tmp_path / "wide.png", store)
    assert max(a.shape) <= MAX_SIDE and v.metadata["downscaled_from"] == [300, 5000]
    assert a.shape == (150, 2500)
    data = np.zeros((5000, 100, 1), np.float32)  # x = 5000 columns at 0.5 mm
    v, a = load1(_nifti(tmp_path / "long.nii", data, zooms=(0.5, 0.7, 1.0)), store)
    assert a.shape == (50, 2500) and v.metadata["downscaled_from"] == [100, 5000]
    assert v.spacing_mm == pytest.approx((1.4, 1.0))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(("w", "h"), [(50000, 50000), (25000, 20000)])
def test_huge_image_refused_from_header_alone(store, tmp_path, w, h):
    path = _png_header_only(tmp_path / "huge.png", w, h)
    assert path.stat().st_size < 200
    t0 = time.perf_counter()
    msg = load_error(path, store)
    assert time.perf_counter() - t0 < 2.0
    assert "megapixel" in msg


def test_a_picture_that_would_decode_past_the_memory_cap_is_refused_before_decoding(store, tmp_path):
    """Issue 15: a 389 KB PNG just under the pixel limit decoded to 808 MB. A 16-bit 20000x20000 PNG (400 megapixels,
    under MAX_PIXELS) is refused from its header by the decoded-size cap, with the figure and the env var."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    msg = load_error(path, store)
    assert "would decode to 1526 MB" in msg and "DXAGENT_MAX_DECODED_MB" in msg, msg


# ---------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_one_line_errors(store, tmp_path):
    assert "no such file" in load_error(tmp_path / "missing.dcm", store)
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert load_error(tmp_path / "empty.dcm", store) == "empty.dcm: 0-byte file"
    (tmp_path / "notes.txt").write_text("patient notes\n" * 50)
    assert load_error(tmp_path / "notes.txt", store) == \
        "notes.txt: not an image (no DICOM preamble, not PNG/JPEG/TIFF/NIfTI)"
    ct = bundled("CT_small.dcm").read_bytes()
    (tmp_path / "cut_pixels.dcm").write_bytes(ct[:20000])
    assert "truncated DICOM (pixel data shorter" in load_error(tmp_path / "cut_pixels.dcm", store)
    (tmp_path / "cut_header.dcm").write_bytes(ct[:3000])
    assert "truncated DICOM" in load_error(tmp_path / "cut_header.dcm", store)
    assert "truncated DICOM" in load_error(bundled("MR_truncated.dcm"), store)
    assert "no pixel data" in load_error(bundled("rtplan.dcm"), store)
    assert "SR object has no pixel data" in load_error(bundled("test-SR.dcm"), store)
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    load_error(tmp_path / "cut.png", store)
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"\x00" * 400))
    assert "not an image" in load_error(tmp_path / "junk.nii.gz", store)
    full = _nifti(tmp_path / "full.nii", np.ones((20, 20, 20), np.float32)).read_bytes()
    (tmp_path / "cut.nii").write_bytes(full[: len(full) // 2])
    assert "truncated NIfTI" in load_error(tmp_path / "cut.nii", store)


def test_views_are_numbered_and_a_bad_path_fails_the_call(store, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    views = load_views([str(bundled("CT_small.dcm")), str(tmp_path / "a.png")], store)
    assert [v.id for v in views] == ["V1", "V2"]
    with pytest.raises(ImageLoadError):
        load_views([str(tmp_path / "a.png"), str(tmp_path / "nope.png")], store)


# ---------------------------------------------------------------------------------------------- modality


def test_modality_user_flag_and_mismatch_note(store, tmp_path):
    Image.fromarray((np.indices((8, 8)).sum(0) * 9).astype(np.uint8)).save(tmp_path / "slice.png")
    v, _ = load1(tmp_path / "slice.png", store, modality="MRI", body_part="brain")
    assert (v.modality, v.modality_source, v.body_part) == ("MR", "user", "BRAIN")
    assert v.metadata["modality_user"] == "MRI"
    v, _ = load1(bundled("CT_small.dcm"), store, modality="MR")
    assert v.modality == "CT" and v.modality_source == "dicom" and "user said MR" in v.metadata["modality_note"]
    v, _ = load1(bundled("CT_small.dcm"), store, modality="ct")
    assert "modality_note" not in v.metadata
    v, _ = load1(bundled("SC_rgb_rle_2frame.dcm"), store, modality="dermoscopy")  # the file says OT (other)
    assert (v.modality, v.modality_source, v.metadata["modality_user"]) == ("XC", "user", "dermoscopy")
    assert "OT" in v.metadata["modality_note"]


def test_guess_modality_heuristic():
    rng = np.random.default_rng(3)
    hu = rng.normal(40, 30, (64, 64)).astype(np.float32)
    hu[:8] = -1000
    hu[30:34, 30:34] = 900
    assert guess_modality(hu) == ("CT", 0.7)
    hu[:4, :4] = -32768  # padding outside the reconstruction circle is ignored
    assert guess_modality(hu) == ("CT", 0.7)
    assert guess_modality(rng.random((64, 64)).astype(np.float32) * 255) == ("OT", 0.3)  # noise: no rule fits
    assert guess_modality(rng.random((5, 64, 64)).astype(np.float32) * 900) == ("MR", 0.4)
    assert guess_modality(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) == ("OT", 0.5)


# ---------------------------------------------------------------------------------------------- real cases


@pytest.mark.realcases
def test_realcases_one_of_each_source_loads(store, realcases):
    cases = [json.loads(line) for line in (realcases / "cases.jsonl").read_text().splitlines() if line.strip()]
    first = {}
    for c in cases:
        first.setdefault(c["source"], c)
    assert len(first) >= 5
    for source, case in first.items():
        path = realcases / case["image"]
        view, arr = load1(path, store)
        assert arr.ndim in (2, 3) and np.isfinite(arr.astype(np.float32)).all(), source
        assert path.name not in json.dumps(view.metadata) and path.stem not in json.dumps(view.metadata)
        if view.metadata["format"] != "dicom":
            assert view.spacing_mm == "unknown", source


@pytest.mark.realcases
def test_realcases_dicom_radiograph(store, realcases):
    dicoms = sorted(realcases.glob("*/images/*.dcm"))
    if not dicoms:
        pytest.skip("no DICOM among the real cases")
    view, arr = load1(dicoms[0], store)
    assert view.modality_source == "dicom" and view.spacing_known and arr.ndim == 2
    text = json.dumps(view.metadata)
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text) and dicoms[0].stem not in text
    assert set(view.metadata) <= ALLOWED_META
