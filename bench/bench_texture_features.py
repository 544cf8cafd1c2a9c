"""texture_features benchmark: time per call and feature count on 2D and 3D ROIs of several sizes.

    .venv/bin/python bench/bench_texture_features.py [--repeat N] [--max-3d VOXELS] [--original-moran]

Runs the `texture_features` tool through a ToolContext as the graph runs it on:

* synthetic 2D ROIs (textured noise, square boxes of 16 x 16 up to 512 x 512 px) and 3D ROIs (cubes of
  8^3 up to 67^3 voxels on 2.5 x 0.7 x 0.7 mm voxels, HU-like values so the CT path with 25 HU bins runs;
  67^3 is just over the tool's limit and shows the refusal), plus two irregular 3D ROIs (the voxels above
  40 HU in a box: ragged surface, many zones);
* real images when ../shared/data/realcases is present: a BUSI ultrasound (central half box), a
  COVID-CT slice (PNG, so no HU: fixed bin number) and pydicom's CT_small.dcm (HU, box + [-100, 200]
  HU range), which is always available.

Prints, per ROI: voxels, feature count, the first call and the median of the next `--repeat` calls
(the first call in the process also pays MIRP's import, ~1 s). `--original-moran` times one 2D ROI
with MIRP's own per-pair Moran's I / Geary's C loop (what the tool's vectorised routine replaces).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import realcases_root  # noqa: E402

from agent.core.state import CaseInput, CaseState, ImageView  # noqa: E402
from agent.core.tool import ToolContext, ToolError  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402
from tools import texture_features as tf  # noqa: E402

TOOL = tf.TextureFeatures()
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def ctx_for(store: ArtifactStore, arr: np.ndarray, spacing, modality: str) -> ToolContext:
    ref = store.put_array(arr)
    view = ImageView(id="V1", pixels=ref, shape=arr.shape, dtype=str(arr.dtype), ndim_spatial=arr.ndim,
                     spacing_mm=spacing, modality=modality)
    return ToolContext(state=CaseState(inputs=CaseInput(paths=[]), views=[view]), store=store)


def timed(ctx: ToolContext, repeat: int, **args) -> tuple[tf.TextureOutput | str, float, float]:
    times, out = [], None
    for _ in range(1 + repeat):
        ctx.artifacts.clear()
        t0 = time.perf_counter()
        try:
            out = TOOL.run(ctx, TOOL.Input(**args))
        except ToolError as exc:
            return str(exc), time.perf_counter() - t0, float("nan")
        times.append(time.perf_counter() - t0)
    return out, times[0], statistics.median(times[1:]) if repeat else float("nan")


def row(label: str, out, first: float, rest: float) -> dict:
    if isinstance(out, str):
        print(f"{label:<44} refused: {out}")
        return {"roi": label, "refused": out}
    print(f"{label:<44} {out.roi_voxels:>8} vox  {out.feature_count:>4} features  first {first:6.2f} s  "
          f"next {rest:6.2f} s  {tf.TextureFeatures._disc_text(out.discretisation)}")
    return {"roi": label, "voxels": out.roi_voxels, "features": out.feature_count, "first_s": round(first, 3),
            "median_s": round(rest, 3), "discretisation": out.discretisation.model_dump()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="timed calls after the first")
    ap.add_argument("--max-3d", type=int, default=tf.MAX_ROI_VOXELS, help="largest 3D cube to try (voxels)")
    ap.add_argument("--original-moran", action="store_true", help="also time MIRP's own Moran's I loop once")
    args = ap.parse_args()
    store = ArtifactStore(tempfile.mkdtemp(prefix="bench-texture-"))
    rng = np.random.default_rng(0)
    rows = []

    print(f"MIRP {tf.mirp_version()}; limit {tf.MAX_ROI_VOXELS:,} voxels")
    print("-- 2D synthetic (smoothed noise, spacing 0.5 mm, generic image: 32 bins)")
    img2 = ndi.gaussian_filter(rng.normal(size=(600, 600)), 2).astype(np.float32) * 100 + 500
    ctx2 = ctx_for(store, img2, (0.5, 0.5), "MR")
    for side in (16, 32, 64, 128, 256, 512):
        out, first, rest = timed(ctx2, args.repeat, bbox=[20, 20, 20 + side, 20 + side])
        rows.append(row(f"2D box {side}x{side}", out, first, rest))

    print("-- 3D synthetic (HU-like, 2.5 x 0.7 x 0.7 mm, CT: 25 HU bins)")
    vol = (ndi.gaussian_filter(rng.normal(size=(80, 160, 160)), 1.5) * 300 + 40).astype(np.float32)
    vol[0, 0, 0], vol[0, 0, 1] = -1000, 400  # looks like HU
    ctx3 = ctx_for(store, vol, (2.5, 0.7, 0.7), "CT")
    for side in (8, 16, 24, 32, 48, 64, 67):
        n = side**3
        if n > args.max_3d + 10_000:
            break
        nz = min(side, 80)
        out, first, rest = timed(ctx3, args.repeat, bbox=[10, 10, 10 + side, 10 + side], slices=[0, nz])
        rows.append(row(f"3D cube {nz}x{side}x{side}", out, first, rest))

    for nz, side in ((40, 64), (40, 86)):  # irregular ROIs (mesh, hull and zones get costly): the box above 40 HU
        out, first, rest = timed(ctx3, args.repeat, bbox=[10, 10, 10 + side, 10 + side], slices=[0, nz],
                                 threshold=[40, 5000])
        rows.append(row(f"3D irregular {nz}x{side}x{side} box > 40 HU", out, first, rest))

    print("-- real images")
    ct = load_views([str(CT_SMALL)], store)
    cctx = ToolContext(state=CaseState(inputs=CaseInput(paths=[str(CT_SMALL)]), views=ct), store=store)
    out, first, rest = timed(cctx, args.repeat, bbox=[0.25, 0.25, 0.75, 0.75], threshold=[-100, 200])
    rows.append(row("CT_small.dcm box + [-100, 200] HU", out, first, rest))
    root = realcases_root()
    if root is None:
        print("realcases absent: BUSI / COVID-CT skipped")
    else:
        cases = [json.loads(x) for x in (root / "cases.jsonl").read_text().splitlines() if x.strip()]
        for source, label in (("busi_ultrasound", "BUSI ultrasound"), ("covid_ct", "COVID-CT slice (PNG)")):
            case = next(c for c in cases if c["source"] == source)
            path = str(root / case["image"])
            views = load_views([path], store, modality=case["modality"])
            rctx = ToolContext(state=CaseState(inputs=CaseInput(paths=[path]), views=views), store=store)
            out, first, rest = timed(rctx, args.repeat, bbox=[0.25, 0.25, 0.75, 0.75])
            rows.append(row(f"{label} {case['case_id'][:20]} {list(views[0].shape)}", out, first, rest))

    if args.original_moran:
        from mirp._features import morph_3d_data

        patched = morph_3d_data.Data3DSpatial._spatial_distribution
        morph_3d_data.Data3DSpatial._spatial_distribution = patched.mirp_original
        try:
            out, first, _ = timed(ctx2, 0, bbox=[20, 20, 84, 84])
            rows.append(row("2D box 64x64, MIRP's own Moran loop", out, first, float("nan")))
        finally:
            morph_3d_data.Data3DSpatial._spatial_distribution = patched
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
