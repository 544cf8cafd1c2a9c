"""Benchmark of cxr_lung_fields, cardiothoracic_ratio, detect_candidates and measure_roi.

    .venv/bin/python bench/bench_cxr_measure.py [--realcases DIR] [--overlays OUT_DIR]

Prints figures; asserts nothing. On the real chest radiographs of ../shared/data/realcases (sources
xrv_tests, actualmed_covid_cxr, covid_chestxray): how often two lung fields and a CTR are found, the CTR
of the "Cardiomegaly" cases against the others (PA and AP apart), and the time per call; on the TBX11K
radiographs with expert boxes, the fraction of boxes holding the centre of at least one of the top-10
detect_candidates (within the lungs); on synthetic images with exact answers, the measurement errors.
`--overlays` writes each CTR overlay as a PNG there, to look at.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.state import CaseInput, CaseState  # noqa: E402
from agent.core.tool import ToolContext, ToolError  # noqa: E402
from agent.engine.registry import discover  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402

TOOLS = discover()
DEFAULT_ROOT = Path(os.environ.get("DXAGENT_REALCASES", Path(__file__).resolve().parents[2] / "shared/data/realcases"))


def context(store: ArtifactStore, path: Path, modality: str | None = None) -> ToolContext:
    state = CaseState(inputs=CaseInput(paths=[str(path)], modality=modality),
                      views=load_views([str(path)], store, modality=modality))
    return ToolContext(state=state, store=store)


def timed(ctx: ToolContext, name: str, **args):
    tool = TOOLS[name]
    t0 = time.perf_counter()
    try:
        return tool.run(ctx, tool.Input(**args)), time.perf_counter() - t0, None
    except ToolError as exc:
        return None, time.perf_counter() - t0, str(exc)


def spread(values: list[float]) -> str:
    if not values:
        return "n=0"
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"n={len(values)} median {q[1]:.3f} IQR {q[0]:.3f}-{q[2]:.3f} min {min(values):.3f} max {max(values):.3f}"


def real_cxr(root: Path, store: ArtifactStore, overlays: Path | None) -> None:
    cases = [json.loads(line) for line in (root / "cases.jsonl").read_text().splitlines()]
    cxr = [c for c in cases if c["modality"] == "CXR"]
    frontal = [c for c in cxr if c.get("view") not in ("L", "LL", "RL")]
    lateral = [c for c in cxr if c not in frontal]
    lung_ok, lat_refused, ctr_rows, t_lung, t_ctr, errors = 0, 0, [], [], [], {}
    for c in cxr:
        ctx = context(store, root / c["image"], "CXR")
        lungs, dt, err = timed(ctx, "cxr_lung_fields")
        t_lung.append(dt)
        if c in lateral:
            lat_refused += lungs is None
            continue
        lung_ok += lungs is not None
        view = c.get("view", "")
        proj = "AP" if view.startswith("AP") else "PA" if view == "PA" else "auto"
        out, dt, err2 = timed(ctx, "cardiothoracic_ratio", projection=proj)
        t_ctr.append(dt)
        if out is None:
            errors[c["case_id"]] = err2
            continue
        ctr_rows.append({"case": c["case_id"], "ctr": out.ctr, "view": proj, "findings": c["findings"]})
        if overlays is not None:
            ref = next(a for a in ctx.artifacts if a.kind == "overlay" and "CTR" in a.description)
            (overlays / f"{c['case_id']}_ctr{out.ctr:.2f}.png").write_bytes(store.path(ref).read_bytes())
    print(f"real CXR: {len(cxr)} ({len(frontal)} frontal, {len(lateral)} lateral)")
    print(f"  cxr_lung_fields: two lungs on {lung_ok}/{len(frontal)} frontal; laterals refused {lat_refused}/{len(lateral)}; "
          f"median {statistics.median(t_lung):.2f} s, max {max(t_lung):.2f} s per call")
    print(f"  cardiothoracic_ratio: CTR on {len(ctr_rows)}/{len(frontal)} frontal; median {statistics.median(t_ctr):.2f} s, "
          f"max {max(t_ctr):.2f} s per call")
    cardio = [r for r in ctr_rows if "Cardiomegaly" in r["findings"]]
    other = [r for r in ctr_rows if "Cardiomegaly" not in r["findings"]]
    for r in cardio:
        print(f"  Cardiomegaly {r['case']} ({r['view']}): CTR {r['ctr']:.3f}")
    print(f"  other labels, all: {spread([r['ctr'] for r in other])}; CTR > 0.5 in "
          f"{sum(r['ctr'] > 0.5 for r in other)}/{len(other)}")
    for v in ("PA", "AP", "auto"):
        sel = [r["ctr"] for r in other if r["view"] == v]
        print(f"  other labels, {v if v != 'auto' else 'view unknown'}: {spread(sel)}; > 0.5 in {sum(x > 0.5 for x in sel)}")
    healthy = [r["ctr"] for r in other if set(r["findings"]) & {"No Finding", "No finding", "Healthy", "No Pneumothorax"}]
    print(f"  'no finding' labels only: {spread(healthy)}")
    for case, err in errors.items():
        print(f"  refused {case}: {err}")


def tbx_hits(root: Path, store: ArtifactStore) -> None:
    cases = [json.loads(line) for line in (root / "cases.jsonl").read_text().splitlines()]
    boxed = [c for c in cases if c.get("bboxes")]
    hit, total, times = 0, 0, []
    for c in boxed:
        ctx = context(store, root / c["image"], "CXR")
        out, dt, err = timed(ctx, "detect_candidates", within="lungs")
        times.append(dt)
        for b in c["bboxes"]:
            x, y, w, h = b["xywh"]
            total += 1
            ranks = [i + 1 for i, cd in enumerate(out.candidates if out else [])
                     if y <= cd.center[0] <= y + h and x <= cd.center[1] <= x + w]
            hit += bool(ranks)
            print(f"  {c['case_id']} {b['label']} box {[round(v) for v in (y, x, y + h, x + w)]}: hit by candidates {ranks}"
                  + (f" (refused: {err})" if err else ""))
    if total:
        print(f"TBX11K boxes hit by >= 1 of the top-10 candidates within the lungs: {hit}/{total}; "
              f"{statistics.mean(times):.2f} s per call")


def synthetic(store: ArtifactStore, tmp: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    img = rng.normal(0.4, 0.01, (256, 320)).astype(np.float32)
    yy, xx = np.mgrid[:256, :320]
    planted = [(70, 80, 12), (150, 200, 20), (200, 90, 30)]
    for r, c, d in planted:
        img[(yy - r) ** 2 + (xx - c) ** 2 <= (d / 2) ** 2] = 0.8
    Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(tmp / "blobs.png")
    out, dt, _ = timed(context(store, tmp / "blobs.png", "MR"), "detect_candidates", min_diameter=8, max_diameter=40)
    errs = []
    for r, c, d in planted:
        best = min(out.candidates, key=lambda cd: math.hypot(cd.center[0] - r, cd.center[1] - c))
        errs.append(abs(best.diameter - d) / d)
    print(f"synthetic detect_candidates: 3 planted discs, diameter error max {100 * max(errs):.1f} %, {dt:.2f} s")
    disc = np.where((yy - 128) ** 2 + (xx - 160) ** 2 <= 60**2, 0.8, 0.2).astype(np.float32)
    Image.fromarray((disc * 255).astype(np.uint8)).save(tmp / "disc.png")
    errs = []
    for rad in (5, 10, 20, 40):
        out, dt, _ = timed(context(store, tmp / "disc.png", "US"), "measure_roi", center=[128, 160], radius=rad)
        errs.append(f"r={rad}: {100 * (out.area / (math.pi * rad**2) - 1):+.2f} %")
    print(f"synthetic measure_roi circle area vs pi r^2: {', '.join(errs)}; {dt * 1000:.0f} ms per call")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--realcases", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--overlays", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        store = ArtifactStore(Path(td) / "artifacts")
        synthetic(store, Path(td))
        if not (args.realcases / "cases.jsonl").exists():
            print(f"no real cases at {args.realcases}: real-image figures skipped")
            return
        if args.overlays is not None:
            args.overlays.mkdir(parents=True, exist_ok=True)
        real_cxr(args.realcases, store, args.overlays)
        tbx_hits(args.realcases, store)


if __name__ == "__main__":
    main()
