"""Real-sized cases end to end with the default planner: where a case's wall time goes, cold and warm.

    .venv/bin/python bench/bench_real_cases.py [--per-source 3] [--llm local] [--max-seconds 300] [--no-route]

--no-route lets the planner choose every call (routed steps cost no decision): with it the bench measures the planner's
decisions over many cases - the median decision, and the first decision of a case (which prefills the case's own
prompt) apart from the later ones (which reuse the case's KV state and prefill only the new evidence).

Cases: up to --per-source images of every realcases source (../shared/data/realcases; CXR, CT, MRI, ultrasound,
dermoscopy, fundus, endoscopy, pathology) at their native size, plus the two bundled demo slices; the question is the
case's own where it has one, else "Describe the findings". The first case also runs cold, in a fresh process
(`dxagent run`): its time to the intake event is import + planner load + decode.

Per case: wall, intake (decode, views, study classifier), LLM (every planner/answer call's latency, from the trace),
tools (their recorded durations), the rest (critic, answer, report, trace writes: the orchestration overhead), and
wall / floor where floor = tools + LLM. Prints medians and the worst case. Asserts nothing.
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
REALCASES = Path(__file__).resolve().parents[2] / "shared" / "data" / "realcases"
DEFAULT_Q = "Describe the findings"


def cases(per_source: int) -> list[tuple[str, str, str]]:
    from agent.app.cli.cases import demo_cases

    out = [(name, path, q) for name, path, q in demo_cases()]
    if (REALCASES / "cases.jsonl").exists():
        seen: dict[str, int] = {}
        for line in (REALCASES / "cases.jsonl").open():
            r = json.loads(line)
            if seen.get(r["source"], 0) >= per_source:
                continue
            seen[r["source"]] = seen.get(r["source"], 0) + 1
            out.append((f"{r['source']}/{r['case_id']}", str(REALCASES / r["image"]), r.get("question") or DEFAULT_Q))
    return out


def split(trace_dir: str, run_id: str, wall: float, t_start: float) -> dict:
    from agent.store.trace import TraceStore

    store = TraceStore(None, trace_dir)
    events = list(store.events(run_id))
    payload = [json.loads(e.payload) for e in events]
    llm = sum(p.get("latency_s", 0.0) for e, p in zip(events, payload, strict=True) if e.kind == "llm")
    tools = sum((p.get("evidence") or {}).get("duration_s") or 0.0
                for e, p in zip(events, payload, strict=True) if e.kind == "tool")
    intake = next((e.t for e in events if e.node == "intake"), t_start) - t_start
    floor = llm + tools
    return {"wall": wall, "intake": intake, "llm": llm, "tools": tools, "rest": max(0.0, wall - intake - floor),
            "ratio": wall / floor if floor > 0 else float("nan"), "llm_calls": sum(e.kind == "llm" for e in events),
            "tool_names": [p["evidence"]["tool"] for e, p in zip(events, payload, strict=True) if e.kind == "tool"],
            "decisions": [p.get("latency_s", 0.0) for e, p in zip(events, payload, strict=True)
                          if e.kind == "llm" and e.name == "decision"]}


def intake_compute(path: str) -> tuple[float, float]:
    """(decode s, study classifier s) of one image, measured alone: the compute intake cannot skip, counted in the
    floor of the second overhead figure."""
    from agent.analysis.display import looks_like_hu
    from agent.analysis.study import intake_study
    from agent.imaging.loaders import load_file

    t0 = time.perf_counter()
    ld = load_file(path)
    t1 = time.perf_counter()
    pic = ld.arr if ld.rgb or ld.arr.ndim == 2 else ld.arr[ld.arr.shape[0] // 2]
    intake_study(pic, ld.rgb, (not ld.rgb) and looks_like_hu(ld.arr))
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-source", type=int, default=3)
    ap.add_argument("--llm", default="local")
    ap.add_argument("--max-seconds", type=float, default=300)
    ap.add_argument("--no-route", action="store_true")
    args = ap.parse_args()
    route = not args.no_route
    todo = cases(args.per_source)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        name, path, q = todo[0]
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "agent.app.cli", "run", path, "-q", q, "--llm", args.llm,
                            "--trace-dir", td, "--json"] + ([] if route else ["--no-route"]),
                           capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode != 0:
            print(f"cold run failed ({r.returncode}): {r.stderr.strip()[-300:]}")
        else:
            cold = split(td, json.loads(r.stdout)["run_id"], wall, t0)
            print(f"cold {name}: wall {wall:.1f} s; to the intake event (import, planner load, decode) "
                  f"{cold['intake']:.1f} s; LLM {cold['llm']:.1f} s in {cold['llm_calls']} call(s); tools "
                  f"{cold['tools']:.2f} s")
        from agent.engine.session import run_case

        run_case([todo[0][1]], todo[0][2], llm=args.llm, trace_dir=td, route=route)  # load the model into this process
        print(f"\n{'case':44s} {'wall':>6s} {'intake':>6s} {'llm':>6s} {'calls':>5s} {'tools':>6s} {'rest':>5s} "
              f"{'ratio':>5s}  outcome / tools")
        for name, path, q in todo:
            t0 = time.time()
            try:
                res = run_case([path], q, llm=args.llm, trace_dir=td, max_wall_s=args.max_seconds, route=route)
            except Exception as exc:  # a case that cannot load is a row, not the end of the bench
                print(f"{name[:44]:44s} error: {str(exc)[:80]}")
                continue
            s = split(td, res.run_id, time.time() - t0, t0)
            s["case"] = name
            s["decode"], s["classify"] = intake_compute(path)
            rows.append(s)
            outcome = res.report["recommendation"]["outcome"] if res.report else "no report"
            print(f"{name[:44]:44s} {s['wall']:6.1f} {s['intake']:6.2f} {s['llm']:6.1f} {s['llm_calls']:5d} "
                  f"{s['tools']:6.2f} {s['rest']:5.2f} {s['ratio']:5.2f}  {outcome} {','.join(s['tool_names'])}")
    if rows:
        med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "intake", "llm", "tools", "rest", "ratio")}
        worst = max(rows, key=lambda r: r["wall"])
        overhead = sum(r["rest"] + r["intake"] for r in rows) / sum(r["wall"] for r in rows)
        print(f"\n{len(rows)} warm cases: median wall {med['wall']:.1f} s (intake {med['intake']:.2f}, LLM "
              f"{med['llm']:.1f}, tools {med['tools']:.2f}, rest {med['rest']:.2f}); median wall/floor "
              f"{med['ratio']:.2f}; orchestration share (intake + rest) {overhead:.1%}")
        total = sum(r["wall"] for r in rows)
        decode, classify = sum(r["decode"] for r in rows), sum(r["classify"] for r in rows)
        glue = sum(r["rest"] + max(0.0, r["intake"] - r["decode"] - r["classify"]) for r in rows)
        print(f"intake's own compute (decode {decode:.1f} s + study classifier {classify:.1f} s over all cases, "
              f"{(decode + classify) / total:.1%} of wall) counted in the floor: orchestration share {glue / total:.1%} "
              f"(the rest alone {sum(r['rest'] for r in rows) / total:.1%})")
        print(f"worst: {worst['case']} {worst['wall']:.1f} s (LLM {worst['llm']:.1f} s in {worst['llm_calls']} "
              f"call(s), tools {worst['tools']:.2f} s)")
        # issue 33's targets per modality: median <= 3 s and worst <= 8 s warm; planner decisions per case
        print(f"\n{'source':28s} {'cases':>5s} {'median s':>8s} {'worst s':>7s} {'LLM calls/case':>14s} "
              f"{'s/LLM call':>10s}")
        by: dict[str, list[dict]] = {}
        for r in rows:
            by.setdefault(r["case"].split("/")[0] if "/" in r["case"] else "demo", []).append(r)
        for src, rs in sorted(by.items()):
            calls = sum(r["llm_calls"] for r in rs)
            per = f"{sum(r['llm'] for r in rs) / calls:.1f}" if calls else "-"
            print(f"{src:28s} {len(rs):5d} {statistics.median(r['wall'] for r in rs):8.1f} "
                  f"{max(r['wall'] for r in rs):7.1f} {calls / len(rs):14.1f} {per:>10s}")
        dec = [d for r in rows for d in r["decisions"]]
        if dec:  # issue 33: planner decisions <= 1 s median
            first = [r["decisions"][0] for r in rows if r["decisions"]]
            later = [d for r in rows for d in r["decisions"][1:]]
            print(f"\nplanner decisions: {len(dec)} over {len(rows)} cases, median {statistics.median(dec):.2f} s "
                  f"(max {max(dec):.2f}); a case's first decision median {statistics.median(first):.2f} s; later "
                  + (f"decisions median {statistics.median(later):.2f} s (n={len(later)})" if later else "decisions: none"))


if __name__ == "__main__":
    main()
