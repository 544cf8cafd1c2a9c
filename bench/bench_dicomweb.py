"""Retrieval of a 100-slice CT series from a PACS (Orthanc + DICOMweb plugin on loopback) against reading the same files
from disk, through the same loader.

    .venv/bin/python bench/bench_dicomweb.py [--slices 100]

The series is made from pydicom's bundled CT slice: N copies with their own SOP instance UIDs and slice positions (one
series, one study), uploaded through Orthanc's REST API. Prints: the upload time; the first retrieval (QIDO + WADO of
every instance, written to an empty cache) and a second one (all cached); loading the retrieved folder into a view
against loading the original files (after one warm-up load, so neither pays for loading the study classifier); then
write-back: one real run on the retrieved series, its SR and SEGs built, written to disk, and stored to the PACS with
STOW-RS. Needs Orthanc (scripts/install.sh installs it). Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/makers/orthanc.py: the PACS and the series the tests use too

import httpx  # noqa: E402
from makers.orthanc import MISSING, make_series, start  # noqa: E402

from agent.imaging import dicomweb  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=100)
    args = ap.parse_args()
    if MISSING:
        print(f"{MISSING}: nothing measured")
        return
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        study, _, paths = make_series(tmp / "series", args.slices)
        proc, url = start(tmp / "pacs")
        try:
            t0 = time.perf_counter()
            with httpx.Client() as c:
                for p in paths:
                    c.post(f"{url}/instances", content=p.read_bytes()).raise_for_status()
            upload = time.perf_counter() - t0
            ref = url.replace("http://", "dicomweb://") + f"/dicom-web?study={study}"
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
            back = write_back(folders, tmp, ref)
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
    print(f"  write-back of the run ({back['what']}): building the SR and SEG {back['build']:.2f} s, writing them to "
          f"disk {back['disk']:.2f} s ({back['mb']:.1f} MB), STOW-RS to the PACS {back['stow']:.2f} s")


def write_back(folders: list[str], tmp: Path, ref: str) -> dict:
    """One real run on the retrieved series (tissue composition: ct_tissue's 3D masks, the 135M planner), then its SR
    and SEGs built in memory, written to disk, and stored to the PACS."""
    from agent.app.dicom_out import write_objects
    from agent.engine.session import run_case

    res = run_case(folders, "What is the tissue composition of this CT?", llm="tiny", trace_dir=tmp / "tr")
    t0 = time.perf_counter()
    built = write_objects(res.report, res.state, res.store, res.inputs, None)
    build = time.perf_counter() - t0
    (tmp / "objs").mkdir()
    t0 = time.perf_counter()
    for i, ds in enumerate(built.datasets):
        ds.save_as(tmp / "objs" / f"{i}.dcm", enforce_file_format=True)
    disk = time.perf_counter() - t0
    t0 = time.perf_counter()
    dicomweb.store(dicomweb.parse(ref.split("?")[0], need_study=False), built.datasets)
    stow = time.perf_counter() - t0
    mb = sum(f.stat().st_size for f in (tmp / "objs").iterdir()) / 1e6
    what = ", ".join(f"{o['kind']}" + (f" {o['frames']} frames" if "frames" in o else "") for o in built.objects)
    return {"build": build, "disk": disk, "stow": stow, "mb": mb, "what": what}


if __name__ == "__main__":
    main()
