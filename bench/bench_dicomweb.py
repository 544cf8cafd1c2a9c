"""Retrieval of a 100-slice CT series from a PACS (Orthanc + DICOMweb plugin on loopback) against reading the same files
from disk, through the same loader.

    .venv/bin/python bench/bench_dicomweb.py [--slices 100]

The series is made from pydicom's bundled CT slice: N copies with their own SOP instance UIDs and slice positions (one
series, one study), uploaded through Orthanc's REST API. Prints: the upload time; the first retrieval (QIDO + WADO of
every instance, written to an empty cache) and a second one (all cached); loading the retrieved folder into a view
against loading the original files (after one warm-up load, so neither pays for loading the study classifier). Needs
Orthanc (scripts/install.sh installs it). Asserts nothing. Write-back (STOW-RS of SR/SEG) is not built yet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from agent.imaging import dicomweb  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def make_series(folder: Path, n: int) -> tuple[str, list[Path]]:
    base = dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [float(v) for v in base.ImagePositionPatient[:2]] + [float(i) * 5.0]
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return study, paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=100)
    args = ap.parse_args()
    orthanc = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if orthanc is None or not PLUGIN.is_file():
        print("Orthanc with its DICOMweb plugin is not installed (scripts/install.sh installs it): nothing measured")
        return
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        (tmp / "series").mkdir()
        study, paths = make_series(tmp / "series", args.slices)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = {"Name": "bench", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
               "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True}}
        (tmp / "o.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([orthanc, str(tmp / "o.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    if httpx.get(f"{url}/system", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            t0 = time.perf_counter()
            with httpx.Client() as c:
                for p in paths:
                    c.post(f"{url}/instances", content=p.read_bytes()).raise_for_status()
            upload = time.perf_counter() - t0
            ref = f"dicomweb://127.0.0.1:{port}/dicom-web?study={study}"
            t0 = time.perf_counter()
            folders = dicomweb.resolve([ref], cache=tmp / "cache")
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            dicomweb.resolve([ref], cache=tmp / "cache")
            cached = time.perf_counter() - t0
            store = ArtifactStore(tmp / "art")
            load_views([str(tmp / "series")], store)  # warm-up: torch and the study classifier load once
            t0 = time.perf_counter()
            remote = load_views(folders, store)[0]
            load_remote = time.perf_counter() - t0
            t0 = time.perf_counter()
            local = load_views([str(tmp / "series")], store)[0]
            load_local = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
    same = remote.pixels.sha256 == local.pixels.sha256
    print(f"{args.slices}-slice CT series ({remote.shape}), Orthanc on loopback:")
    print(f"  upload (REST, not dxagent): {upload:.2f} s")
    print(f"  first retrieval (QIDO + WADO-RS, into an empty cache): {first:.2f} s "
          f"({1000 * first / args.slices:.1f} ms per instance)")
    print(f"  second retrieval (all cached, QIDO only): {cached:.2f} s")
    print(f"  loading into a view: retrieved folder {load_remote:.2f} s, the original files {load_local:.2f} s; "
          f"same pixels: {same}")
    print(f"  first run from the PACS vs from disk: {first + load_remote:.2f} s vs {load_local:.2f} s")


if __name__ == "__main__":
    main()
