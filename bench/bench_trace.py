"""Trace audit speed: traces verified per second and replays per second, with no model loaded.

    .venv/bin/python bench/bench_trace.py [--runs 100]

Records `--runs` demo-sized runs (the bundled CT and MR, 2-3 tool calls each, the scripted planner: the records
have the same shape as the embedded planner's, with full prompts) into a fresh trace store, then times:
- verify: `verify_dump(store.dump(run), artifacts)`, i.e. read the run, check every event's payload hash and
  the hash chain, the seal, and sha256 every artifact file (the `dxagent trace verify` work);
- replay: re-execute the graph against the record (`agent.engine.replay.replay`);
- the golden traces in traces/golden/ (recorded with the embedded Qwen planner): verify and replay each.
Target of the replay issue: >= 50 demo-sized traces verified per second. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def rate(fn, items) -> tuple[float, float]:
    t0 = time.perf_counter()
    times = []
    for x in items:
        t1 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t1)
    return len(items) / (time.perf_counter() - t0), statistics.median(times) * 1000


def main() -> None:
    from helpers import call
    from pydicom.data import get_testdata_file

    from agent.engine.replay import replay
    from agent.engine.session import run_case
    from agent.store.trace import TraceStore, load_dump, verify_dump

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    cases = [([ct], "What is the tissue composition?", [call("inspect_image"), call("ct_tissue_composition")]),
             ([mr], "How large is the dominant bright region?", [call("inspect_image"), call("region_measure"),
                                                                 call("texture_features")])]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ids = []
        for i in range(args.runs):
            paths, q, script = cases[i % 2]
            ids.append(run_case(paths, q, llm="scripted", script=script, trace_dir=tmp).run_id)
        print(f"recorded {len(ids)} scripted demo-sized runs in {time.perf_counter() - t0:.1f} s")
        store = TraceStore(None, tmp)
        dumps = [store.dump(i) for i in ids]
        n_ev = statistics.mean(len(d["events"]) for d in dumps)
        kb = statistics.mean(sum(len(str(e["payload"])) for e in d["events"]) for d in dumps) / 1024
        print(f"per run: {n_ev:.1f} events, ~{kb:.0f} KB of payload, {statistics.mean(len(d['artifacts']) for d in dumps):.1f}"
              " artifacts")
        art = Path(tmp) / "artifacts"
        r, med = rate(lambda i: verify_dump(store.dump(i), art), ids)
        print(f"verify (read from SQLite + chain + seal + artifacts): {r:7.1f} traces/s  (median {med:.1f} ms)  "
              f"target >= 50/s")
        r, med = rate(lambda d: verify_dump(d, None), dumps)
        print(f"verify (in memory, chain + seal only):              {r:7.1f} traces/s  (median {med:.1f} ms)")
        r, med = rate(lambda d: replay(d), dumps)
        print(f"replay (graph re-executed against the record):      {r:7.1f} traces/s  (median {med:.1f} ms)")
    golden = sorted((ROOT / "traces" / "golden").glob("*.json"))
    if golden:
        gd = [load_dump(p) for p in golden]
        r, med = rate(lambda d: verify_dump(d, golden[0].parent / "artifacts"), gd * 25)
        print(f"golden traces ({len(golden)}, embedded Qwen planner): verify {r:.1f} traces/s (median {med:.1f} ms)")
        r, med = rate(lambda d: replay(d), gd * 10)
        print(f"golden traces: replay {r:.1f} traces/s (median {med:.1f} ms)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (no model loaded)")


if __name__ == "__main__":
    main()
