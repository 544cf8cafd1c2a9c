"""A real PACS for the tests and benches: Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`; scripts/install.sh
installs them) started on a free loopback port with a temporary storage folder, and a CT series made from pydicom's
bundled CT slice. `start` returns the process and the base URL; the caller terminates the process."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC = shutil.which("Orthanc") or (shutil.which("Orthanc", path="/usr/sbin") if Path("/usr/sbin").is_dir() else None)
MISSING = None if ORTHANC and PLUGIN.is_file() else ("Orthanc with its DICOMweb plugin is not installed (apt-get install "
                                                     "orthanc orthanc-dicomweb; scripts/install.sh does it where it can)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, users: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Orthanc with DICOMweb at <url>/dicom-web, storing under tmp; basic auth when `users` is given."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = {"Name": "dxagent-test", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
           "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
           "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([ORTHANC, str(tmp / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    auth = next(iter(users.items())) if users else None
    for _ in range(100):
        try:
            if httpx.get(f"{url}/system", auth=auth, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("Orthanc did not start")


def upload(url: str, path: str | Path, auth: tuple[str, str] | None = None) -> None:
    r = httpx.post(f"{url}/instances", content=Path(path).read_bytes(), auth=auth, timeout=10)
    r.raise_for_status()


def make_series(folder: Path, n: int) -> tuple[str, str, list[Path]]:
    """(study UID, series UID, files) of an n-slice CT series: copies of pydicom's CT slice with their own SOP instance
    UIDs, instance numbers and slice positions 5 mm apart."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
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
    return study, series, paths
