"""Load medical images into views: DICOM (file or series folder), NIfTI, PNG/JPEG/TIFF.

`load_views(paths, store)` gives one `ImageView` per input path, pixels in the artifact store:

* gray images are float32 in real units (DICOM Rescale Slope/Intercept applied, so CT is in HU;
  MONOCHROME1 inverted to the MONOCHROME2 convention), shaped (H, W) or (Z, H, W);
* colour images are uint8 (H, W, 3). A colour file whose three channels are the same picture
  (a radiograph saved as RGB) is stored as gray; metadata["gray_from_rgb"] says so.

The file's content decides its format, not its extension (a PNG named .dcm loads as PNG).

Every bad input raises `ImageLoadError` with one line naming the input and what is wrong (a file inside an input
folder by its place and sha256, never its name, which may name the patient): missing
path, 0-byte file, truncated DICOM, DICOM without pixel data (SR, RT plan), compressed DICOM with
no installed decoder, non-image file, 4D/5D NIfTI, images over `MAX_PIXELS`, and NaN/Inf pixels.
Non-finite pixels are tolerated only when fewer than `NONFINITE_MAX_FRACTION` (1 %) of them: they
are replaced by the smallest finite value and metadata["nonfinite_replaced"] holds their count.
Images whose longest in-plane side exceeds `MAX_SIDE` are shrunk by an integer factor (aspect
kept, spacing scaled) and metadata["downscaled_from"] holds the original [H, W].

Metadata is an allow-list of de-identified DICOM attributes plus loader keys ("format",
"spacing_source", "modality_confidence", ...): never names, IDs, dates, UIDs, institutions, or
the file's path or name (agent/imaging/deid.py).

This module reads files into `Loaded` (pixels, format, spacing, de-identified metadata); agent/imaging/views.py turns
them into views (the study classifier, the modality decision); agent/imaging/modality.py holds the pixel rules.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from agent.core.errors import UserError
from agent.core.files import sha256_file
from agent.imaging.deid import body_part_code, dicom_meta

MAX_PIXELS = 400_000_000  # refuse larger images (pixels per 2D image, voxels per volume)
MAX_SIDE = 4096  # shrink images whose longest in-plane side is larger
MAX_FILE_BYTES = int(float(os.environ.get("DXAGENT_MAX_FILE_MB", "4096")) * 2**20)  # refuse larger input files
# refuse a PNG/JPEG/TIFF whose decoded picture would be larger (checked from the header, before decoding: a 389 KB PNG
# can hold 400 megapixels of 16-bit gray, 808 MB once decoded and more as the tools copy it)
MAX_DECODED_BYTES = int(float(os.environ.get("DXAGENT_MAX_DECODED_MB", "512")) * 2**20)
NONFINITE_MAX_FRACTION = 0.01
# Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; our own check (same limit,
# clearer message) runs on the lazily opened header, so Pillow's only ever fires as a backstop.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageLoadError(UserError, ValueError):
    """An input could not be loaded; the message is one line naming the file and the problem."""


@dataclass
class Loaded:
    arr: np.ndarray
    fmt: str
    sha: str
    rgb: bool = False
    spacing: tuple[float, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None  # from the file
    body_part: str | None = None  # from the file


def regular_file(path: str | Path, name: str | None = None) -> int:
    """The size of `path` if it is a regular, non-empty file under MAX_FILE_BYTES; else ImageLoadError.

    Checked with one stat() before anything opens the file, so a named pipe, a socket or a device (/dev/zero) is
    refused instead of read until it blocks or fills memory."""
    p = Path(path)
    name = name or p.name or str(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        what = ("a named pipe" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise ImageLoadError(f"{name}: not a regular file ({what}); only image files and folders of them are read")
    if st.st_size == 0:
        raise ImageLoadError(f"{name}: 0-byte file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageLoadError(f"{name}: {st.st_size / 2**20:.0f} MB is over the {MAX_FILE_BYTES / 2**20:.0f} MB "
                             "input limit (DXAGENT_MAX_FILE_MB)")
    return st.st_size


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_file(path: str | Path) -> Loaded:
    p = Path(path)
    name = p.name or str(path)
    if not p.exists():
        raise ImageLoadError(f"{name}: no such file or folder")
    try:
        if p.is_dir():
            loaded = _load_dicom_series(p, name)
        else:
            regular_file(p, name)
            with open(p, "rb") as fh:
                head = fh.read(1024)
            kind = _sniff(head, p)
            if kind is None:
                raise ImageLoadError(f"{name}: not an image (no DICOM preamble, not PNG/JPEG/TIFF/NIfTI)")
            sha = sha256_file(p)
            if kind.startswith("dicom"):
                loaded = _load_dicom_file(p, name, sha, force=kind == "dicom-nopreamble")
            elif kind.startswith("nifti"):
                loaded = _load_nifti(p, name, sha, gz=kind == "nifti-gz")
            else:
                loaded = _load_pillow(p, name, sha)
        return _finish(loaded, name)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(f"{name}: out of memory while decoding") from None
    except Exception as exc:  # a decoder failed in a way not foreseen above: still one line
        detail = _one_line(exc)
        if p.is_dir():  # the text of an error may quote a file's path: no file name inside the folder passes
            detail = _without_member_names(detail, p)
        raise ImageLoadError(f"{name}: could not read image ({type(exc).__name__}: {detail})") from None


def file_kind(path: str | Path) -> str | None:
    """What `load_file` would read a regular file as, from its content ("dicom", "png", "nifti-gz", ...), or None
    when it is not an image it reads; nothing is decoded (a server checks an upload with it before keeping it)."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(1024)
    return _sniff(head, p)


def _nifti_kind(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] == b"n+1\x00":
        return int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    return len(head) >= 540 and head[4:8] == b"n+2\x00"


def _sniff(head: bytes, p: Path) -> str | None:
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(p, "rb") as fh:
                inner = fh.read(544)
        except (OSError, EOFError):
            return None
        return "nifti-gz" if _nifti_kind(inner) else None
    if _nifti_kind(head):
        return "nifti"
    # DICOM written without the 128-byte preamble: accept only if it parses to an image header
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
        if "Rows" in ds and "Columns" in ds:
            return "dicom-nopreamble"
    except Exception:
        pass
    return None


def _is_image_sop(ds: Any) -> bool:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    try:
        return uid is not None and "Image Storage" in uid.name
    except Exception:
        return False


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files written without file meta: tell the decoder how the dataset was encoded."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _missing_decoder(msg: str) -> str | None:
    if "missing dependencies" not in msg and "plugins are missing" not in msg:
        return None
    names = [ln.strip().split(" - ")[0] for ln in msg.splitlines()[1:] if " - " in ln]
    return ", ".join(names) or "a pixel data plugin"


def _dicom_pixels(ds: Any, name: str, invert: bool = True) -> tuple[np.ndarray, bool, dict[str, Any]]:
    """(array, is_rgb, extra metadata) for one dataset; gray in real units, colour uint8.
    MONOCHROME1 is inverted (max + min - value) unless `invert` is False (a series inverts the whole stack)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        mod = str(ds.get("Modality", "") or "DICOM")
        if "Rows" in ds or _is_image_sop(ds):
            raise ImageLoadError(f"{name}: truncated DICOM (image header present but the pixel data is missing)")
        raise ImageLoadError(f"{name}: {mod} object has no pixel data (e.g. a structured report or RT plan)")
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageLoadError(f"{name}: DICOM pixel data without Rows/Columns")
    _ensure_transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if rows * cols * frames > MAX_PIXELS:
        raise ImageLoadError(
            f"{name}: {frames}×{rows}×{cols} DICOM ({rows * cols * frames / 1e6:.0f} megapixels) "
            f"is over the {MAX_PIXELS // 1_000_000}-megapixel limit"
        )
    ts = ds.file_meta.TransferSyntaxUID
    if "PixelData" in ds and not ts.is_compressed:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        expected = math.ceil(rows * cols * frames * samples * bits / 8)
        if len(ds.PixelData) < expected:
            raise ImageLoadError(f"{name}: truncated DICOM (pixel data shorter than Rows×Columns×frames)")
    try:
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        missing = _missing_decoder(str(exc))
        if missing:
            raise ImageLoadError(
                f"{name}: no decoder installed for '{ts.name}' pixel data (needs one of: {missing})"
            ) from None
        raise ImageLoadError(f"{name}: cannot decode '{ts.name}' pixel data ({_one_line(exc)})") from None
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise ImageLoadError(f"{name}: truncated DICOM (pixel data shorter than Rows×Columns×frames)") from None
        raise ImageLoadError(f"{name}: cannot decode '{ts.name}' pixel data ({_one_line(exc)})") from None

    extra: dict[str, Any] = {}
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if pi == "PALETTE COLOR" or samples == 3:
        if frames > 1:
            arr, extra["frames_total"], extra["frame_used"] = arr[0], frames, 0
        if arr.dtype != np.uint8:
            top = float(arr.max()) if arr.size else 0.0
            arr = (arr.astype(np.float32) * (255.0 / top if top > 255 else 1.0)).round().clip(0, 255)
        return np.asarray(arr, dtype=np.uint8), True, extra
    if samples != 1:
        raise ImageLoadError(f"{name}: {samples} samples per pixel is not supported")
    arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if arr.ndim == 3 and "RescaleSlope" not in ds:  # enhanced multi-frame: rescale in a functional group
        try:
            pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
            arr = arr * np.float32(pvt.RescaleSlope) + np.float32(pvt.RescaleIntercept)
        except (AttributeError, IndexError, KeyError):
            pass
    if pi == "MONOCHROME1" and invert:
        arr, extra["_invert_sum"] = _invert(arr)
        extra["inverted_monochrome1"] = True
    return arr, False, extra


def _invert(arr: np.ndarray) -> tuple[np.ndarray, float]:
    finite = arr[np.isfinite(arr)]
    total = float(finite.min() + finite.max()) if finite.size else 0.0
    return np.float32(total) - arr, total


def _dicom_spacing(ds: Any, ndim: int) -> tuple[tuple[float, ...] | None, str, dict[str, Any]]:
    inplane, source = None, "none"
    pm = None
    try:
        pm = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    except (AttributeError, IndexError, KeyError):
        pass
    if ds.get("PixelSpacing"):
        inplane, source = ds.PixelSpacing, "PixelSpacing"
    elif ds.get("ImagerPixelSpacing"):
        inplane, source = ds.ImagerPixelSpacing, "ImagerPixelSpacing (detector plane, not corrected for magnification)"
    elif pm is not None and pm.get("PixelSpacing"):
        inplane, source = pm.PixelSpacing, "PixelMeasuresSequence.PixelSpacing"
    if inplane is None:
        return None, "unknown (no PixelSpacing)", {}
    rc = tuple(float(x) for x in inplane[:2])
    if ndim == 2:
        return rc, source, {}
    dz, zsrc = None, ""
    gfov = ds.get("GridFrameOffsetVector")
    for value, src in (
        (ds.get("SpacingBetweenSlices"), "SpacingBetweenSlices"),
        (float(np.median(np.abs(np.diff([float(x) for x in gfov])))) if gfov and len(gfov) > 1 else None,
         "GridFrameOffsetVector"),
        (pm.get("SpacingBetweenSlices") if pm is not None else None, "PixelMeasuresSequence.SpacingBetweenSlices"),
        (ds.get("SliceThickness"), "SliceThickness"),
        (pm.get("SliceThickness") if pm is not None else None, "PixelMeasuresSequence.SliceThickness"),
    ):
        if value is not None and float(value) > 0:
            dz, zsrc = float(value), src
            break
    if dz is None:
        return None, "unknown (no slice spacing)", {"spacing_inplane_mm": list(rc)}
    return (dz, *rc), f"{source}; z from {zsrc}", {}


def _load_dicom_file(p: Path, name: str, sha: str, force: bool) -> Loaded:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, force=force)
    except Exception as exc:
        raise ImageLoadError(f"{name}: unreadable DICOM ({_one_line(exc)})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr, rgb, extra = _dicom_pixels(ds, name)
    meta = dicom_meta(ds)
    spacing, src, sp_extra = _dicom_spacing(ds, 2 if rgb else arr.ndim)
    meta.update(extra, **sp_extra, spacing_source=src)
    return Loaded(arr, "dicom", sha, rgb, spacing, meta, _modality_of(ds), _body_part_of(ds))


def _modality_of(ds: Any) -> str | None:
    return str(ds.get("Modality", "") or "").strip().upper() or None


def _body_part_of(ds: Any) -> str | None:
    return body_part_code(ds.get("BodyPartExamined", ""))


def _folder_files(folder: Path) -> list[Path]:
    """The files of a series folder that are read, in name order (the order `_member` counts in)."""
    return sorted(x for x in folder.iterdir() if x.is_file() and not x.name.startswith("."))


def _member(name: str, files: list[Path], f: Path, sha: str) -> str:
    """How an error names a file inside an input folder: by its place in the folder and a short sha256, never by its
    name. The folder is the input the user named (the trace stores it as "input N"); the names inside it are not,
    and a folder of one patient's files is often named after the patient (DOE_JANE_MRN12345_3.dcm)."""
    return f"{name}, file {files.index(f) + 1} of {len(files)} (sha256 {sha[:12]})"


def _without_member_names(text: str, folder: Path) -> str:
    """`text` with the name of every file in `folder` replaced by "a file in the folder" (error paths only)."""
    try:
        names = sorted({x.name for x in folder.iterdir()} - {""}, key=len, reverse=True)
    except OSError:
        return text
    for n in names:
        text = text.replace(n, "a file in the folder")
    return text


def _read_series(folder: Path, name: str, defer: str | None = "64 KB") -> tuple[list, int, list[float] | None, dict]:
    """The image slices of a one-series folder in patient order: ([(file, dataset)], files skipped, positions along
    the slice normal or None, {"slice_order": how}). The order of a loaded volume's slices and of `dicom_sources`."""
    import pydicom

    slices, skipped = [], 0
    for f in _folder_files(folder):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, defer_size=defer)
        except Exception:
            skipped += 1
            continue
        if "Rows" not in ds or not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            skipped += 1
            continue
        slices.append((f, ds))
    if not slices:
        raise ImageLoadError(f"{name}: folder holds no DICOM image files")
    if len({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}) > 1:
        raise ImageLoadError(f"{name}: folder mixes several DICOM series; pass one series per folder")
    if len({(int(ds.Rows), int(ds.Columns)) for _, ds in slices}) > 1:
        raise ImageLoadError(f"{name}: slices in the folder differ in Rows×Columns")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in slices):
        raise ImageLoadError(f"{name}: folder holds multi-frame files; pass a multi-frame file on its own")
    meta: dict[str, Any] = {}
    positions = None
    try:
        iop = np.array([float(x) for x in slices[0][1].ImageOrientationPatient], dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        positions = [float(np.dot(normal, [float(x) for x in ds.ImagePositionPatient])) for _, ds in slices]
        order, meta["slice_order"] = np.argsort(positions, kind="stable"), "ImagePositionPatient"
    except (AttributeError, TypeError, ValueError, IndexError):
        positions = None
        if all("InstanceNumber" in ds for _, ds in slices):
            order, meta["slice_order"] = np.argsort([int(ds.InstanceNumber) for _, ds in slices], kind="stable"), \
                "InstanceNumber"
        else:
            order, meta["slice_order"] = np.arange(len(slices)), "file name"
    slices = [slices[i] for i in order]
    return slices, skipped, positions, meta


def dicom_sources(path: str | Path) -> list[Any] | None:
    """The DICOM datasets (pixels included) behind a loaded input, in the order of the view's slices: one for a file,
    the slices of a series folder in patient order; None when the input is not DICOM (PNG, NIfTI, ...). DICOM SEG and
    SR (agent/app/dicom_out.py) reference these and copy their patient and study modules."""
    import pydicom

    p = Path(path)
    if p.is_dir():
        slices, _, _, _ = _read_series(p, p.name, defer=None)
        return [ds for _, ds in slices]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p)
    except Exception:
        return None
    return [ds] if "Rows" in ds else None


def _load_dicom_series(folder: Path, name: str) -> Loaded:
    slices, skipped, positions, meta = _read_series(folder, name)
    rows, cols = int(slices[0][1].Rows), int(slices[0][1].Columns)
    if rows * cols * len(slices) > MAX_PIXELS:
        raise ImageLoadError(f"{name}: series of {len(slices)}×{rows}×{cols} is over the voxel limit")

    arrays, files, shas = [], _folder_files(folder), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f, ds in slices:
            shas[f] = sha256_file(f)
            member = _member(name, files, f, shas[f])
            try:
                arr, rgb, _ = _dicom_pixels(ds, member, invert=False)
            except (ImageLoadError, MemoryError):
                raise
            except Exception as exc:  # its text may quote the file's path
                raise ImageLoadError(f"{member}: could not read image ({type(exc).__name__}: "
                                     f"{_without_member_names(_one_line(exc), folder)})") from None
            if rgb:
                raise ImageLoadError(f"{name}: colour DICOM series are not supported")
            arrays.append(arr)
    vol = np.stack(arrays) if len(arrays) > 1 else arrays[0]
    first = slices[0][1]
    meta.update(dicom_meta(first), slices=len(slices))
    if skipped:
        meta["files_skipped"] = skipped
    if str(first.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        vol, meta["_invert_sum"] = _invert(vol)
        meta["inverted_monochrome1"] = True
    spacing, src, sp_extra = _dicom_spacing(first, 2)
    meta.update(sp_extra)
    if vol.ndim == 3 and spacing is not None:
        dz, zsrc = None, ""
        if positions is not None:
            diffs = np.diff(sorted(positions))
            if np.any(diffs < 1e-3):
                raise ImageLoadError(f"{name}: several slices share one position; the folder holds more than one stack")
            dz, zsrc = float(np.median(diffs)), "ImagePositionPatient"
            if diffs.max() - diffs.min() > 0.1 * dz:
                meta["slice_spacing_irregular"] = True
        else:
            for key in ("SpacingBetweenSlices", "SliceThickness"):
                if first.get(key) and float(first.get(key)) > 0:
                    dz, zsrc = float(first.get(key)), key
                    break
        if dz is None:
            spacing, src, meta["spacing_inplane_mm"] = None, "unknown (no slice spacing)", list(spacing)
        else:
            spacing, src = (dz, *spacing), f"{src}; z from {zsrc}"
    meta["spacing_source"] = src
    sha = hashlib.sha256("".join(sorted(shas.values())).encode()).hexdigest()
    return Loaded(vol, "dicom", sha, False, spacing, meta, _modality_of(first), _body_part_of(first))


def _load_nifti(p: Path, name: str, sha: str, gz: bool) -> Loaded:
    import nibabel as nib

    opener = gzip.open if gz else open
    with opener(p, "rb") as fh:
        head = fh.read(544)
    two = head[4:8] == b"n+2\x00"
    header_cls, image_cls = (nib.Nifti2Header, nib.Nifti2Image) if two else (nib.Nifti1Header, nib.Nifti1Image)
    hdr = header_cls.from_fileobj(io.BytesIO(head))
    shape = tuple(int(s) for s in hdr.get_data_shape())
    eff = list(shape)
    while len(eff) > 2 and eff[-1] == 1:
        eff.pop()
    if len(eff) >= 4:
        what = "4D" if len(eff) == 4 else f"{len(eff)}D"
        raise ImageLoadError(f"{name}: {what} volume {shape} is not supported; pass a single 3D volume")
    if len(eff) < 2 or math.prod(eff) == 0:
        raise ImageLoadError(f"{name}: NIfTI with shape {shape} holds no image")
    if math.prod(eff) > MAX_PIXELS:
        raise ImageLoadError(f"{name}: NIfTI {shape} is over the {MAX_PIXELS // 1_000_000}-megavoxel limit")
    nbytes = int(hdr.get_data_offset()) + math.prod(shape) * hdr.get_data_dtype().itemsize
    with opener(p, "rb") as fh:
        raw = fh.read(nbytes + 1)
    if len(raw) < nbytes:
        raise ImageLoadError(f"{name}: truncated NIfTI (data shorter than the header's shape {shape})")
    img = image_cls.from_bytes(raw)
    if len(shape) > 3:  # trailing singleton dimensions only (checked above)
        img = img.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
    meta: dict[str, Any] = {}
    try:
        img = nib.as_closest_canonical(img)
        meta["orientation"] = "RAS canonical; rows anterior to posterior, columns patient right to left"
    except Exception:
        meta["orientation"] = "as stored (could not reorient)"
    data = np.asarray(img.get_fdata(dtype=np.float32))
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    data = data.reshape(data.shape[:3] if data.ndim >= 3 else data.shape)
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = zooms[:2] + [1.0]
    arr = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])  # (Z, Y, X), anterior up, radiological
    unit = hdr.get_xyzt_units()[0]
    scale = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}.get(unit, 1.0)
    spacing = (zooms[2] * scale, zooms[1] * scale, zooms[0] * scale)
    known_unit = unit in ("meter", "mm", "micron")
    meta["spacing_source"] = "NIfTI pixdim" + ("" if known_unit else " (units unset; mm assumed)")
    if arr.shape[0] == 1:
        arr, spacing = arr[0], spacing[1:]
    if any(s <= 0 or not math.isfinite(s) for s in spacing):
        spacing, meta["spacing_source"] = None, "unknown (NIfTI pixdim not positive)"
    return Loaded(arr, "nifti", sha, False, spacing, meta)


def _load_pillow(p: Path, name: str, sha: str) -> Loaded:
    limit = MAX_PIXELS // 1_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(p)
        except Image.DecompressionBombError:
            raise ImageLoadError(f"{name}: image is over {2 * limit} megapixels; the limit is {limit}") from None
        except Exception as exc:
            raise ImageLoadError(f"{name}: unreadable or truncated image header ({_one_line(exc)})") from None
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ImageLoadError(
                f"{name}: {w}×{h} image ({w * h / 1e6:.0f} megapixels) is over the {limit}-megapixel limit"
            )
        fmt = {"MPO": "jpeg"}.get(im.format or "", (im.format or "image").lower())
        factor = math.ceil(max(w, h) / MAX_SIDE)
        per_px = 4 if im.mode.startswith(("I", "F")) else 1 if im.mode in ("1", "L", "P") else 3
        decoded = w * h * per_px // (factor * factor if fmt == "jpeg" else 1)
        if decoded > MAX_DECODED_BYTES:
            raise ImageLoadError(f"{name}: a {w}×{h} {im.mode} {fmt.upper()} would decode to {decoded / 2**20:.0f} MB, "
                                 f"over the {MAX_DECODED_BYTES / 2**20:.0f} MB limit (DXAGENT_MAX_DECODED_MB)")
        meta: dict[str, Any] = {}
        if getattr(im, "n_frames", 1) > 1:
            meta["frames_total"], meta["frame_used"] = int(im.n_frames), 0
        if factor > 1 and fmt == "jpeg":  # let the JPEG decoder shrink by 2/4/8 while decoding
            im.draft("RGB" if im.mode not in ("L", "RGB") else im.mode, (w // factor, h // factor))
        try:
            im = ImageOps.exif_transpose(im) or im
            mode = im.mode
            if mode in ("1", "L", "LA", "La"):
                im = im.convert("L")
            elif mode.startswith("I;16") or mode == "I":
                im = im.convert("I")
            elif mode != "F":
                im = im.convert("RGB")
            if max(im.size) > MAX_SIDE:
                im = im.reduce(math.ceil(max(im.size) / MAX_SIDE))
            arr = np.asarray(im)
        except OSError as exc:
            raise ImageLoadError(f"{name}: truncated or corrupt {fmt.upper()} ({_one_line(exc)})") from None
    if (arr.shape[0], arr.shape[1]) != (h, w):
        meta["downscaled_from"] = [h, w]
    rgb = arr.ndim == 3
    arr = arr if rgb else arr.astype(np.float32)
    meta["spacing_source"] = "unknown (no pixel spacing in PNG/JPEG/TIFF)"
    return Loaded(arr, fmt, sha, rgb, None, meta)


def _finish(ld: Loaded, name: str) -> Loaded:
    arr = ld.arr
    if ld.rgb:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageLoadError(f"{name}: colour image of shape {arr.shape} is not supported")
        spread = arr.max(axis=-1).astype(np.int16) - arr.min(axis=-1)
        if float((spread > 10).mean()) < 0.001:  # a gray picture stored as RGB (JPEG chroma noise allowed)
            arr, ld.rgb = arr.mean(axis=-1, dtype=np.float32), False
            ld.meta["gray_from_rgb"] = True
    else:
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
            if ld.spacing is not None and len(ld.spacing) == 3:
                ld.spacing = ld.spacing[1:]
        if arr.ndim not in (2, 3):
            raise ImageLoadError(f"{name}: {arr.ndim}D image {arr.shape} is not supported")
        finite = np.isfinite(arr)
        bad = int(arr.size - np.count_nonzero(finite))
        if bad:
            if bad >= NONFINITE_MAX_FRACTION * arr.size:
                raise ImageLoadError(
                    f"{name}: {100 * bad / arr.size:.1f}% of pixels are NaN/Inf (at most "
                    f"{100 * NONFINITE_MAX_FRACTION:.0f}% are tolerated)"
                )
            arr = np.where(finite, arr, np.float32(arr[finite].min()))
            ld.meta["nonfinite_replaced"] = bad
    h, w = arr.shape[:2] if ld.rgb else arr.shape[-2:]
    factor = math.ceil(max(h, w) / MAX_SIDE)
    if factor > 1:
        from skimage.measure import block_reduce

        block = (factor, factor, 1) if ld.rgb else (1,) * (arr.ndim - 2) + (factor, factor)
        small = block_reduce(arr, block, np.mean)
        arr = small.round().clip(0, 255).astype(np.uint8) if ld.rgb else small.astype(np.float32)
        ld.meta.setdefault("downscaled_from", [h, w])
        if ld.spacing is not None:
            nh, nw = arr.shape[:2] if ld.rgb else arr.shape[-2:]
            ld.spacing = (*ld.spacing[:-2], ld.spacing[-2] * h / nh, ld.spacing[-1] * w / nw)
    ld.arr = arr
    invert_sum = ld.meta.pop("_invert_sum", None)
    if invert_sum is not None:  # keep the DICOM window meaningful after the MONOCHROME1 inversion
        v = ld.meta.get("WindowCenter")
        if isinstance(v, list):
            ld.meta["WindowCenter"] = [invert_sum - x for x in v]
        elif isinstance(v, float | int):
            ld.meta["WindowCenter"] = invert_sum - float(v)
    return ld
