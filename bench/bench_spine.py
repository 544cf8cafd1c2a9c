"""Spine benchmark: cold start, warm wall time per demo case, time per planner decision, overhead share.

    .venv/bin/python bench/bench_spine.py [--llm local|tiny] [--repeats 2] [--no-route]

--no-route lets the planner choose every call (the routed steps cost no decision, so this is how the time per planner
decision is measured now); per decision it prints the prompt's length in tokens (system + user: llama.cpp evaluates
only what follows the restored system-prompt state and the previous decision's shared prefix) and the tokens written.
Prints figures; asserts nothing. Overhead = wall time outside tool calls and LLM calls (intake image loading counts as
overhead: it is the orchestrator's work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(llm: str, path: str, question: str, trace_dir: str, route: bool = True) -> dict:
    from agent.engine.session import run_case
    from agent.store.trace import TraceStore

    t0 = time.perf_counter()
    res = run_case([path], question, llm=llm, trace_dir=trace_dir, route=route)
    wall = time.perf_counter() - t0
    store = TraceStore(None, trace_dir)
    calls = [json.loads(e.payload) for e in store.events(res.run_id, "llm") if e.name == "decision"]
    llm_s = [c.get("latency_s", 0.0) for c in calls]
    tokens = [((c.get("usage") or {}).get("input_tokens", 0), (c.get("usage") or {}).get("output_tokens", 0))
              for c in calls]
    tool_s = sum(e.duration_s for e in res.state.evidence)
    return {"wall": wall, "decisions": llm_s, "tokens": tokens, "tool_s": tool_s, "steps": res.state.tool_steps,
            "outcome": res.report["recommendation"]["outcome"], "tools": [e.tool for e in res.state.evidence]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="local")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-route", action="store_true")
    args = ap.parse_args()
    route = not args.no_route
    from agent.app.cli.cases import demo_cases

    cases = demo_cases()
    with tempfile.TemporaryDirectory() as td:
        # cold start: a fresh process importing everything, loading the model and running the first case
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "agent.app.cli", "run", cases[0][1], "-q", cases[0][2], "--llm", args.llm,
                        "--trace-dir", td, "--json"], check=True, capture_output=True)
        cold = time.perf_counter() - t0
        print(f"cold start (new process, model load, first case): {cold:.1f} s")
        one(args.llm, cases[0][1], cases[0][2], td, route)  # warm the in-process model
        rows = []
        for name, path, q in cases:
            for _ in range(args.repeats):
                r = one(args.llm, path, q, td, route)
                r["case"] = name
                rows.append(r)
                llm_total = sum(r["decisions"])
                over = max(0.0, r["wall"] - llm_total - r["tool_s"])
                print(f"{name:<10} warm wall {r['wall']:.2f} s | decisions {len(r['decisions'])} "
                      f"({llm_total:.2f} s) | tools {r['tool_s']:.2f} s | overhead {over:.2f} s "
                      f"({100 * over / r['wall']:.1f} %) | {r['tools']} -> {r['outcome']}")
                for d, (tin, tout) in zip(r["decisions"], r["tokens"], strict=True):
                    print(f"           decision {d:.2f} s: prompt {tin} tokens, reply {tout} tokens")
        dec = [d for r in rows for d in r["decisions"]]
        walls = [r["wall"] for r in rows]
        over = [max(0.0, r["wall"] - sum(r["decisions"]) - r["tool_s"]) / r["wall"] for r in rows]
        print(f"\nplanner={args.llm}: warm wall per case median {statistics.median(walls):.2f} s (max {max(walls):.2f}); "
              + (f"per decision median {statistics.median(dec):.2f} s (max {max(dec):.2f}); " if dec else
                 "no planner decision (every step routed); ")
              + f"overhead median {100 * statistics.median(over):.1f} %")


if __name__ == "__main__":
    main()
