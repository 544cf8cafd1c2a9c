"""Trace-store write throughput: runs sealed per second and write latency (p50, p95), SQLite vs PostgreSQL, with 1, 4
and 8 writer processes at once.

    .venv/bin/python bench/bench_store.py [--runs 12] [--writers 1 4 8]

Each writer writes what a real run writes: one scripted demo run (the bundled CT, three tool calls, the scripted
planner) is recorded once, and every writer then writes its events again - the same kinds, nodes and payloads (full
prompts, tool outputs, the report) - for `--runs` runs each: start_run, every event, its artifact rows (the same
sha256s in every run: the content-addressed race), finish_run (the seal). A "write" is one of those store calls;
its latency is timed in the writer. Only the store is timed: no tool, no model, no graph.

SQLite: one file in WAL mode (the default store; synchronous=FULL, busy timeout 30 s). PostgreSQL: a throwaway
server that tests/pgcluster.py starts with durable defaults (fsync and synchronous_commit on), on loopback,
each writer with the default pool (DXAGENT_DB_POOL=2). The machine's cores are shared by the writers and the server,
so the figures say how the two stores scale against each other here, not what a dedicated server does.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def sample_run(tmp: Path) -> tuple[list[tuple[str, str, str, dict]], list[tuple[dict, int]], dict]:
    """The events, artifact rows and report of one scripted demo run."""
    import json

    from helpers import call
    from pydicom.data import get_testdata_file

    from agent.engine.session import run_case
    from agent.store.trace import TraceStore

    res = run_case([get_testdata_file("CT_small.dcm")], "What is the tissue composition?", llm="scripted",
                   script=[call("inspect_image"), call("region_measure"), call("ct_tissue_composition")],
                   trace_dir=tmp, route=False)
    dump = TraceStore(None, tmp).dump(res.run_id)
    events = [(e["kind"], e["node"], e["name"], e["payload"]) for e in dump["events"]]
    arts = [({k: a[k] for k in ("sha256", "kind", "media_type", "path")}, a["bytes"]) for a in dump["artifacts"]]
    size = sum(len(json.dumps(p)) for *_, p in events)
    print(f"one run: {len(events)} events ({size / 1024:.0f} KiB of payload), {len(arts)} artifact rows, "
          f"{len(events) + len(arts) + 2} writes")
    return events, arts, res.report or {}


def writer(url: str | None, root: str, sample: tuple, runs: int, wid: int, barrier, out) -> None:
    from agent.core.state import ArtifactRef
    from agent.store.trace import TraceStore

    events, arts, report = sample
    refs = [(ArtifactRef(**a), n) for a, n in arts]
    store = TraceStore(url, root)
    lat: list[float] = []

    def timed(fn, *a, **kw):
        t = time.perf_counter()
        fn(*a, **kw)
        lat.append(time.perf_counter() - t)

    barrier.wait()
    t0 = time.time()
    for n in range(runs):
        rid = f"bench-{wid}-{n}-{time.time_ns()}"
        timed(store.start_run, rid, "case", "q", "scripted", "json", "0" * 64, {})
        for kind, node, name, payload in events:
            timed(store.record, rid, kind, node, name, payload)
        for ref, nbytes in refs:
            timed(store.add_artifact, ref, nbytes)
        timed(store.finish_run, rid, "done", report=report)
    out.put((t0, time.time(), lat))


def measure(url: str | None, root: Path, sample: tuple, writers: int, runs: int) -> dict[str, float]:
    from agent.store.trace import TraceStore

    TraceStore(url, root)  # the schema, before the writers start
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(url, str(root), sample, runs, w, barrier, out)) for w in range(writers)]
    for p in procs:
        p.start()
    got = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    start, end = min(g[0] for g in got), max(g[1] for g in got)
    lat = sorted(x for g in got for x in g[2])
    store = TraceStore(url, root)
    sealed = [r for r in store.runs(100_000) if r.seal]
    assert len(sealed) == writers * runs, (len(sealed), writers * runs)
    return {"runs_s": writers * runs / (end - start), "p50": statistics.median(lat) * 1000,
            "p95": lat[int(0.95 * (len(lat) - 1))] * 1000, "writes": len(lat)}


def main() -> None:
    from pgcluster import PgCluster

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=12, help="runs per writer")
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sample = sample_run(Path(tmp) / "sample")
        why = PgCluster.why_not()
        pg = None if why else PgCluster(durable=True).start()
        if why:
            print(f"PostgreSQL skipped: {why}")
        try:
            print(f"{'store':<11} {'writers':>7} {'runs sealed/s':>14} {'p50 write ms':>13} {'p95 write ms':>13}")
            for kind in ("sqlite", "postgresql"):
                if kind == "postgresql" and pg is None:
                    continue
                for w in args.writers:
                    root = Path(tmp) / f"{kind}-{w}"
                    url = None if kind == "sqlite" else pg.new_database("bench")
                    r = measure(url, root, sample, w, args.runs)
                    print(f"{kind:<11} {w:>7} {r['runs_s']:>14.1f} {r['p50']:>13.2f} {r['p95']:>13.2f}", flush=True)
        finally:
            if pg is not None:
                pg.destroy()


if __name__ == "__main__":
    main()
