"""lesion_segment and fundus_vessels benchmark: Dice against the expert masks of realcases.

    .venv/bin/python bench/bench_lesion_vessels.py [--limit N] [--skip-vessels] [--skip-lesions]

lesion_segment runs through a ToolContext, as the graph runs it, on every realcases image with an
expert mask of HAM10000 (dermoscopy) and Kvasir-SEG (colonoscopy polyps), in four modes:

* unseeded: no seed at all;
* point: `seed_point` at the expert mask's innermost pixel (maximum of its distance transform);
* expert box: `bbox` = the expert mask's own bounding box (a perfect detector);
* box +10 %: that box with each side moved out by 10 % of the box's height / width (a loose detector),
  clipped to the image.

region_measure (the Otsu tool) runs unseeded on the same images for comparison. fundus_vessels runs
on the 15 DRIVE images (realcases drive_fundus) and is scored inside the expert field-of-view mask;
the estimated FOV is scored against that mask too. Prints Dice mean / median / min per source and
mode and the time per call (wall clock, one process; the machine is shared, so times are rough).
Asserts nothing. Needs ../shared/data/realcases (or $DXAGENT_REALCASES).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import dice, expert_box, realcases_root  # noqa: E402

from agent.core.state import CaseInput, CaseState  # noqa: E402
from agent.core.tool import ToolContext, ToolError  # noqa: E402
from agent.engine.registry import discover  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402
from tools.fundus_vessels import field_of_view  # noqa: E402


def run_tool(tool, state: CaseState, store: ArtifactStore, **args) -> tuple[object, np.ndarray, float]:
    ctx = ToolContext(state=state, store=store)
    t0 = time.perf_counter()
    out = tool.run(ctx, tool.Input(**args))
    dt = time.perf_counter() - t0
    ref = next(a for a in ctx.artifacts if a.kind == "mask")
    return out, store.get_array(ref).astype(bool), dt


def line(name: str, values: list[float], times: list[float]) -> str:
    if not values:
        return f"  {name:<24} no results"
    return (f"  {name:<24} n={len(values):3d}  Dice mean {statistics.mean(values):.3f}  median "
            f"{statistics.median(values):.3f}  min {min(values):.3f}  <0.5: {sum(v < 0.5 for v in values):2d}"
            f"  {statistics.mean(times):.3f} s/call")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="cases per source (0: all)")
    ap.add_argument("--skip-vessels", action="store_true")
    ap.add_argument("--skip-lesions", action="store_true")
    args = ap.parse_args()
    root = realcases_root()
    if root is None:
        sys.exit("../shared/data/realcases is absent (set DXAGENT_REALCASES)")
    warnings.simplefilter("ignore")
    cases = [json.loads(x) for x in (root / "cases.jsonl").read_text().splitlines() if x.strip()]
    tools = discover()
    store = ArtifactStore(Path(tempfile.mkdtemp(prefix="bench_lv_")))

    if not args.skip_lesions:
        ls, rm = tools["lesion_segment"], tools["region_measure"]
        for source in ("ham10000_dermoscopy", "kvasir_seg"):
            sel = [c for c in cases if c["source"] == source and c.get("mask")]
            sel = sel[: args.limit] if args.limit else sel
            dices: dict[str, list[float]] = defaultdict(list)
            times: dict[str, list[float]] = defaultdict(list)
            for case in sel:
                path = str(root / case["image"])
                state = CaseState(inputs=CaseInput(paths=[path], modality=case["modality"]),
                                  views=load_views([path], store, modality=case["modality"]))
                truth = np.asarray(Image.open(root / case["mask"]).convert("L")) > 127
                dt = ndi.distance_transform_edt(truth)
                inner = [int(v) for v in np.unravel_index(int(np.argmax(dt)), dt.shape)]
                modes = {
                    "lesion_segment unseeded": {},
                    "lesion_segment point": {"seed_point": inner},
                    "lesion_segment expert box": {"bbox": expert_box(truth)},
                    "lesion_segment box +10 %": {"bbox": expert_box(truth, 0.1)},
                }
                for mode, kw in modes.items():
                    try:
                        _, mask, sec = run_tool(ls, state, store, **kw)
                    except ToolError as exc:
                        print(f"    {case['case_id']} {mode}: ToolError {exc}")
                        mask, sec = np.zeros_like(truth), 0.0
                    dices[mode].append(dice(mask, truth))
                    times[mode].append(sec)
                try:
                    _, mask, sec = run_tool(rm, state, store)
                except ToolError as exc:
                    print(f"    {case['case_id']} region_measure: ToolError {exc}")
                    mask, sec = np.zeros_like(truth), 0.0
                dices["region_measure (Otsu)"].append(dice(mask, truth))
                times["region_measure (Otsu)"].append(sec)
            shape = Image.open(root / sel[0]["image"]).size if sel else None
            print(f"\n{source}: {len(sel)} cases with an expert mask (first image {shape[1]}x{shape[0]} px)"
                  if shape else f"\n{source}: none")
            for mode in dices:
                print(line(mode, dices[mode], times[mode]))
            if source == "kvasir_seg":
                for mode in dices:
                    print(f"    {mode}: " + " ".join(f"{v:.3f}" for v in dices[mode]))

    if not args.skip_vessels:
        fv = tools["fundus_vessels"]
        sel = [c for c in cases if c["source"] == "drive_fundus" and c.get("mask") and c.get("fov_mask")]
        sel = sel[: args.limit] if args.limit else sel
        d_ves, d_fov, secs, dens, dens_true = [], [], [], [], []
        for case in sel:
            path = str(root / case["image"])
            state = CaseState(inputs=CaseInput(paths=[path], modality=case["modality"]),
                              views=load_views([path], store, modality=case["modality"]))
            truth = np.asarray(Image.open(root / case["mask"]).convert("L")) > 127
            fov = np.asarray(Image.open(root / case["fov_mask"]).convert("L")) > 127
            out, mask, sec = run_tool(fv, state, store)
            d_ves.append(dice(mask & fov, truth & fov))
            img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
            d_fov.append(dice(field_of_view(img), fov))
            secs.append(sec)
            dens.append(out.vessel_density)
            dens_true.append(100.0 * float((truth & fov).sum()) / float(fov.sum()))
        print(f"\ndrive_fundus: {len(sel)} images")
        print(line("fundus_vessels (in FOV)", d_ves, secs))
        print(f"  estimated FOV vs expert FOV: Dice mean {statistics.mean(d_fov):.3f}, min {min(d_fov):.3f}")
        r = float(np.corrcoef(dens, dens_true)[0, 1]) if len(dens) > 2 else float("nan")
        print(f"  vessel density %: measured mean {statistics.mean(dens):.1f} (range {min(dens):.1f}-{max(dens):.1f}), "
              f"expert mean {statistics.mean(dens_true):.1f} (range {min(dens_true):.1f}-{max(dens_true):.1f}), r = {r:.2f}")


if __name__ == "__main__":
    main()
