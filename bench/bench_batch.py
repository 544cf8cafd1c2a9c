"""Batch throughput: cases per minute with 1 and 2 worker processes over realcases, and peak RSS per worker.

    .venv/bin/python bench/bench_batch.py [--cases 12] [--llm local|tiny] [--workers 1 2] [--source S] [--question Q]

Takes `--cases` labelled realcases, spread over the sources (dermoscopy, CT, MRI, ultrasound, radiographs,
pathology, fundus), with one question each, and runs `agent.app.batch.run_batch` (the code `dxagent batch` runs) into a
fresh output folder for each worker count. Reports the wall time including worker start-up (spawn, imports, loading
the planner and prefilling its system prompt), the steady rate (cases finished after the first one, over the time
since the first one finished), the median case time, the speed-up of N workers over one, and the peak RSS of each
worker process. The target of the batch issue: 2 workers >= 1.8x one worker's throughput. Prints figures; asserts
nothing. Needs ../shared/data/realcases (or $DXAGENT_REALCASES).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QUESTIONS = {"ham10000_dermoscopy": "How large is the skin lesion?", "covid_ct": "Describe the main findings.",
             "brain_tumor_mri": "How large is the dominant bright region?", "busi_ultrasound": "How large is the lesion?",
             "covid_chestxray": "Is the heart enlarged?", "lc25000_lung_pathology": "Describe the tissue texture.",
             "drive_fundus": "Measure the retinal vessels."}


def main() -> None:
    from helpers import realcases_root

    from agent.app.batch import run_batch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--llm", default="local")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--source", help="only this realcases source (e.g. busi_ultrasound: issue 33's 8-case batch)")
    ap.add_argument("--question", help="this question for every case (e.g. 'Describe the findings')")
    args = ap.parse_args()
    root = realcases_root()
    if root is None:
        sys.exit("realcases not found (../shared/data/realcases or $DXAGENT_REALCASES)")
    rows = [json.loads(x) for x in (root / "cases.jsonl").read_text().splitlines()]
    sources = [args.source] if args.source else list(QUESTIONS)
    by_source = {s: [r for r in rows if r.get("source") == s] for s in sources}
    pick, i = [], 0
    while len(pick) < args.cases and any(by_source.values()):
        for s in sources:
            if by_source[s] and len(pick) < args.cases:
                r = by_source[s].pop(0)
                pick.append({**r, "question": args.question or QUESTIONS.get(s, "Describe the findings")})
        i += 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="dxagent-bench-batch-") as tmp:
        manifest = Path(tmp) / "cases.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in pick))
        for w in args.workers:
            finished: list[float] = []
            t0 = time.perf_counter()
            s = run_batch(manifest, Path(tmp) / f"out-{w}", root=root, workers=w, llm=args.llm,
                          on_case=lambda rec, f=finished: f.append(time.perf_counter()))
            wall = time.perf_counter() - t0
            recs = [json.loads(p.read_text()) for p in (Path(tmp) / f"out-{w}" / "cases").glob("*/result.json")]
            rss = {}
            for r in recs:
                rss[r.get("worker")] = max(rss.get(r.get("worker"), 0), r.get("worker_peak_rss_mb") or 0)
            steady = (len(finished) - 1) / (finished[-1] - finished[0]) * 60 if len(finished) > 2 else float("nan")
            results[w] = {"workers": w, "cases": s.total, "done": s.counts.get("done", 0),
                          "failed": s.counts.get("failed", 0), "wall_s": round(wall, 1),
                          "cases_per_min_wall": round(s.total / wall * 60, 2), "cases_per_min_steady": round(steady, 2),
                          "median_case_s": round(statistics.median(s.seconds), 2) if s.seconds else None,
                          "peak_rss_mb_per_worker": sorted(rss.values())}
            print(json.dumps(results[w]), flush=True)
    base = results.get(min(results))
    print()
    print(f"{'workers':>7} {'cases':>5} {'done':>4} {'wall s':>7} {'cases/min (wall)':>16} {'cases/min (steady)':>18} "
          f"{'speed-up':>8} {'median case s':>13}  peak RSS per worker MB")
    for w, r in results.items():
        up = r["cases_per_min_steady"] / base["cases_per_min_steady"] if base and base["cases_per_min_steady"] else float("nan")
        print(f"{w:>7} {r['cases']:>5} {r['done']:>4} {r['wall_s']:>7} {r['cases_per_min_wall']:>16} "
              f"{r['cases_per_min_steady']:>18} {up:>8.2f} {r['median_case_s']!s:>13}  {r['peak_rss_mb_per_worker']}")


if __name__ == "__main__":
    main()
