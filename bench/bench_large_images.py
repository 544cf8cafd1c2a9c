"""Every applicable tool on real-sized images: decode + view building once, then each tool with its default arguments.

    .venv/bin/python bench/bench_large_images.py [--n 4] [--synthetic 4096] [--skip knowledge_search,similar_cases]

Images: the N largest realcases pictures (../shared/data/realcases: chest radiographs up to 4280 x 3520) at their
native size, plus a synthetic CT slice of --synthetic px a side (a real 512 px CT tiled; 0 leaves it out). Prints, per
image, the decode time, each tool's wall time, status and the working size it reports, then the slowest tool calls.
Asserts nothing (issue 16: no tool O(pixels^2) or unbounded on a 2k x 2k image).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REALCASES = Path(__file__).resolve().parents[2] / "shared" / "data" / "realcases"


def largest(n: int) -> list[Path]:
    from PIL import Image

    rows = [json.loads(line) for line in (REALCASES / "cases.jsonl").open()]
    sized = []
    for r in rows:
        p = REALCASES / r["image"]
        try:
            with Image.open(p) as im:
                sized.append((im.size[0] * im.size[1], p))
        except Exception:  # DICOM or unreadable by Pillow: not among the large pictures
            continue
    return [p for _, p in sorted(sized, reverse=True)[:n]]


def synthetic_ct(side: int, folder: Path) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    tile = ds.pixel_array
    reps = -(-side // tile.shape[0])
    big = np.tile(tile, (reps, reps))[:side, :side].astype(tile.dtype)
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.tobytes()
    out = folder / f"ct_{side}.dcm"
    ds.save_as(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--synthetic", type=int, default=4096)
    ap.add_argument("--skip", default="", help="comma-separated tools to leave out")
    args = ap.parse_args()
    from agent.core.state import CaseInput, CaseState
    from agent.core.tool import ToolContext
    from agent.engine.session import tools
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore

    skip = {s for s in args.skip.split(",") if s}
    slow: list[tuple[float, str, str]] = []
    with tempfile.TemporaryDirectory() as td:
        paths = largest(args.n) if (REALCASES / "cases.jsonl").exists() else []
        if args.synthetic:
            paths.append(synthetic_ct(args.synthetic, Path(td)))
        store = ArtifactStore(Path(td) / "artifacts")
        for p in paths:
            t0 = time.perf_counter()
            views = load_views([str(p)], store)
            decode = time.perf_counter() - t0
            v1 = views[0]
            print(f"\n{p.name[:40]}: {v1.modality} {tuple(v1.shape)}, decode + views {decode:.2f} s")
            state = CaseState(inputs=CaseInput(paths=["input 1"]), views=views)
            for name, tool in tools().items():
                if name in skip or tool.applicable(v1):
                    continue
                try:
                    inp = tool.Input()
                except Exception:  # needs arguments (a box, a point): not a default call
                    continue
                ctx = ToolContext(state=state, store=store)
                t0 = time.perf_counter()
                try:
                    out = tool.run(ctx, inp).model_dump(mode="json")
                    status = "ok"
                except Exception as exc:
                    out, status = {}, f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                dt = time.perf_counter() - t0
                work = out.get("working_size") or out.get("image_size") or ""
                print(f"  {name:24s} {dt:7.2f} s  {status}  {work}")
                slow.append((dt, name, p.name[:30]))
    print("\nslowest calls:")
    for dt, name, img in sorted(slow, reverse=True)[:8]:
        print(f"  {dt:7.2f} s  {name} on {img}")


if __name__ == "__main__":
    main()
