"""Issue 35: `dxagent batch --executor ray` on one vs two Ray nodes of this machine, and the per-case figures behind
the README's capacity estimate ("Running on a cluster").

A real cluster (tests/raycluster.py: `ray start` processes, one CPU each) and a real PostgreSQL trace store
(tests/pgcluster.py, fsync on). One driver job for the whole bench, so Ray's worker processes stay warm between its
batches; each measured batch is preceded by a warm-up batch that loads every node's worker (the first case of a
cold worker costs ~15 s of imports and tool loading, paid once per worker process, not per case).

1. Throughput: --cases scripted-planner cases (bundled CT and MR slices, one `inspect_image` call and the answer:
   the pipeline without LLM time) on node 0 alone, then with node 1 added: cases per second and the ratio.
2. Per case: seconds (median), database transactions and rows written (pg_stat_database over the measured batch).
3. The embedded planner (--local-cases, 0 to skip): a batch of that many cases on both nodes (seconds, planner
   calls, DB commits per case; the demo images are routed, so it makes no decision), then the bundled CT and MR in
   this process with every step decided by the planner (route=False): decisions, prompt and completion tokens
   (from the runs' `llm` events), seconds and DB commits per case.

    .venv/bin/python bench/bench_ray.py [--cases 24] [--local-cases 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def manifest(d: Path, n: int, question: str = "What is the pixel spacing?") -> Path:
    from pydicom.data import get_testdata_file

    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shutil.copy(get_testdata_file("CT_small.dcm" if i % 2 == 0 else "MR_small.dcm"), d / f"img{i}.dcm")
        rows.append({"case_id": f"c{i}", "image": f"img{i}.dcm", "question": question})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


def db_stats(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        time.sleep(1.5)  # backends report their counters at the end of a transaction, at most once a second
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
    return {"commits": row[0], "inserted": row[1], "updated": row[2], "deleted": row[3]}


def batch(tmp: Path, name: str, n: int, db: str | None, **kw) -> tuple[float, object]:
    from agent.app.batch import run_batch

    t0 = time.perf_counter()
    s = run_batch(manifest(tmp / name, n, kw.pop("question", "What is the pixel spacing?")), tmp / name / "out",
                  workers=2, executor="ray", db_url=db, **kw)
    wall = time.perf_counter() - t0
    assert s.counts.get("done") == n, (name, s.counts)
    return wall, s


def tokens(db: str, out: Path) -> list[dict[str, int]]:
    from agent.store.trace import TraceStore

    store, per = TraceStore(db, out / "traces"), []
    for p in sorted((out / "cases").glob("*/result.json")):
        run_id, t = json.loads(p.read_text())["run_id"], {"input": 0, "output": 0, "calls": 0}
        for e in store.events(run_id, kind="llm"):
            u = (json.loads(e.payload).get("usage") or {})
            t["input"] += int(u.get("input_tokens") or 0)
            t["output"] += int(u.get("output_tokens") or 0)
            t["calls"] += 1
        per.append(t)
    return per


QUESTION = "Describe the findings"


def no_route(pg, tmp: Path) -> list[dict]:
    """The embedded planner deciding every step (route=False, as `bench_spine.py --no-route`), in this process, on
    the bundled CT and MR: the LLM's share of a case that is not routed - decisions, tokens, seconds, DB commits."""
    from pydicom.data import get_testdata_file

    from agent.engine.session import run_case

    out = []
    db = pg.new_database()
    run_case([get_testdata_file("CT_small.dcm")], QUESTION, llm="local", trace_dir=tmp / "nr", db_url=db)  # loads
    for name in ("CT_small.dcm", "MR_small.dcm"):
        before = db_stats(db)
        t0 = time.perf_counter()
        r = run_case([get_testdata_file(name)], QUESTION, llm="local", trace_dir=tmp / "nr", db_url=db, route=False)
        secs = time.perf_counter() - t0
        after = db_stats(db)
        t = {"input": 0, "output": 0, "calls": 0}
        from agent.store.trace import TraceStore

        for e in TraceStore(db, tmp / "nr").events(r.run_id, kind="llm"):
            u = json.loads(e.payload).get("usage") or {}
            t["input"] += int(u.get("input_tokens") or 0)
            t["output"] += int(u.get("output_tokens") or 0)
            t["calls"] += 1
        out.append({"image": name, "seconds": round(secs, 1), "llm_calls": t["calls"], "prompt_tokens": t["input"],
                    "completion_tokens": t["output"], "db_commits": after["commits"] - before["commits"]})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--local-cases", type=int, default=2)
    args = ap.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # as the cluster's nodes run (loopback)
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from helpers import call
    from pgcluster import PgCluster
    from raycluster import RayCluster

    script = [call("inspect_image")]
    pg, cluster = PgCluster(durable=True).start(), RayCluster()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    res: dict = {"cases": args.cases, "load_average_at_start": os.getloadavg()[0]}
    try:
        cluster.add_node(cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        for nodes in (1, 2):
            if nodes == 2:
                cluster.add_node(cpus=1)
                while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                    time.sleep(0.5)
            batch(tmp, f"warm{nodes}", 2 * nodes, None, llm="scripted", script=script)
            db = pg.new_database()
            batch(tmp, f"init{nodes}", 1, db, llm="scripted", script=script)  # the schema, outside the figures
            before = db_stats(db)
            wall, s = batch(tmp, f"n{nodes}", args.cases, db, llm="scripted", script=script)
            after = db_stats(db)
            d = {k: (after[k] - before[k]) / args.cases for k in after}
            res[f"{nodes}_node"] = {"wall_s": round(wall, 2), "cases_per_s": round(args.cases / wall, 3),
                                    "per_case_median_s": round(statistics.median(s.seconds), 3),
                                    "by_node": {k[:8]: v for k, v in s.by_node.items()},
                                    "db_commits_per_case": round(d["commits"], 1),
                                    "db_rows_written_per_case": round(d["inserted"] + d["updated"] + d["deleted"], 1)}
            print(json.dumps({f"{nodes}_node": res[f"{nodes}_node"]}), flush=True)
        res["ratio_two_to_one"] = round(res["2_node"]["cases_per_s"] / res["1_node"]["cases_per_s"], 2)
        if args.local_cases:  # the embedded planner in a batch on both nodes: most cases are routed (no decision)
            db = pg.new_database()
            batch(tmp, "localinit", 1, db, llm="scripted", script=script)
            before = db_stats(db)
            t0 = time.perf_counter()
            wall, s = batch(tmp, "local", args.local_cases, db, llm="local", question=QUESTION)
            after = db_stats(db)
            per = tokens(db, tmp / "local" / "out")
            res["embedded_planner_batch"] = {
                "cases": args.local_cases, "wall_s_with_model_loads": round(time.perf_counter() - t0, 1),
                "per_case_s": [round(x, 1) for x in s.seconds], "llm_calls_per_case": [t["calls"] for t in per],
                "db_commits_per_case": round((after["commits"] - before["commits"]) / args.local_cases, 1)}
            res["embedded_planner_no_route"] = no_route(pg, tmp)
        res["load_average_at_end"] = os.getloadavg()[0]
    finally:
        ray.shutdown()
        cluster.stop()
        pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
