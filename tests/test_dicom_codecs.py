"""Compressed DICOM transfer syntaxes decode through the pixel-data handlers the project installs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.imaging.views import load_views

FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.mark.parametrize("name,syntax", [
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline"),
    ("JPGExtended.dcm", "JPEG Extended"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000"),
    ("MR_small_RLE.dcm", "RLE Lossless"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless"),
])
def test_compressed_syntaxes_load(store, name, syntax):
    ds = pydicom.dcmread(FILES / name, stop_before_pixels=True)
    assert syntax in ds.file_meta.TransferSyntaxUID.name
    (view,) = load_views([str(FILES / name)], store)
    arr = store.get_array(view.pixels)
    assert arr.size > 0 and np.isfinite(arr.astype(float)).all()


def test_lossless_codecs_match_the_uncompressed_original(store):
    ref = store.get_array(load_views([str(FILES / "MR_small.dcm")], store)[0].pixels)
    for name in ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"):
        np.testing.assert_array_equal(store.get_array(load_views([str(FILES / name)], store)[0].pixels), ref)
