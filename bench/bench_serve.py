"""dxagent serve: latency to the first streamed event, API overhead over the CLI, idle memory, queued throughput.

    .venv/bin/python bench/bench_serve.py [--llm scripted|tiny|local] [--runs 10] [--workers 1,2] [--repeat 5]
                                          [--cli-llm tiny|local|none]

Starts the real `dxagent serve` (a subprocess on a free loopback port, a fresh trace folder) and, on the bundled CT
slice (pydicom's CT_small.dcm) with the tissue question:

- idle server memory: RSS of the server process after start-up, and again idle after all runs;
- time from POST /api/runs (an upload) to the first event on GET /api/runs/{id}/events (the intake), first run (cold:
  the engine's imports, the tool worker) and the median of --repeat warm runs;
- API overhead: POST to the stream's `end` event for the same case, against `run_case` called in this process (warm,
  median of --repeat), as a ratio (the event stream polls the store every 0.2 s, which is part of what is measured);
- API vs CLI: the same case with the same planner (--cli-llm; `dxagent run` has no scripted planner): `dxagent run` as
  a user runs it (a fresh process each time) against POST -> `end` on a warm server, medians, as a ratio;
- throughput: --runs runs posted at once to the bounded queue, runs per minute until the last is done, for each
  --workers count (a fresh server each);
- page load: the reading room at / in the system's chromium (Playwright): first contentful paint and load, and the
  time to open a finished run to its drawn image and report (skipped without playwright or chromium).

Prints figures (and the machine's load average: it may be shared); asserts nothing. --llm scripted (default) measures
the server, not a model; tiny/local add the model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QUESTION = "What is the tissue composition of this CT slice?"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(client: httpx.Client, ct: bytes) -> str:
    r = client.post("/api/runs", files={"file": ("ct.dcm", ct)}, data={"question": QUESTION})
    r.raise_for_status()
    return r.json()["id"]


def follow(client: httpx.Client, run_id: str, t0: float) -> tuple[float, float]:
    """(seconds from t0 to the first event, seconds from t0 to `end`)."""
    first = None
    with client.stream("GET", f"/api/runs/{run_id}/events", timeout=900) as resp:
        for line in resp.iter_lines():
            if line.startswith("id:") and first is None:
                first = time.perf_counter() - t0
            if line.startswith("event: end"):
                return first or float("nan"), time.perf_counter() - t0
    return first or float("nan"), float("nan")


def page_load(base: str, run_id: str, repeat: int) -> str:
    """The reading room in the system's chromium (Playwright; the browser's start-up not counted), medians of
    `repeat` fresh pages: first contentful paint and load of `/`, and `/#run=ID` until a finished run's image is drawn
    and its report shown (its events replayed, the viewer's model, the slice PNG)."""
    try:
        from conftest import _chromium
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "page load: skipped (playwright is not installed)"
    exe = _chromium()
    if exe is None:
        return "page load: skipped (no chromium on PATH)"
    paint, load, shown = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        for _ in range(repeat):
            page = browser.new_page()
            page.goto(base + "/", wait_until="load")
            t = page.evaluate("() => [performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? NaN, "
                              "performance.getEntriesByType('navigation')[0].loadEventEnd]")
            paint.append(t[0])
            load.append(t[1])
            page.close()
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(f"{base}/#run={run_id}")
            page.wait_for_selector("#report:not(.hidden)")
            page.wait_for_function("() => !document.getElementById('stage-empty').offsetParent")
            shown.append((time.perf_counter() - t0) * 1000)
            page.close()
        browser.close()
    med = statistics.median
    return (f"page load (reading room, chromium, median of {repeat}): first contentful paint {med(paint):.0f} ms, "
            f"load {med(load):.0f} ms; a finished run opened to its image and report {med(shown):.0f} ms")


def one(client: httpx.Client, ct: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    return follow(client, post(client, ct), t0)


def start_server(llm: str, workers: int, work: Path, script: Path) -> tuple[subprocess.Popen, httpx.Client, float]:
    """`dxagent serve` as a subprocess on a free loopback port, its own trace folder: (process, client, start-up s)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "agent.app.cli", "serve", "--llm", llm, "--port", str(port), "--trace-dir",
           str(work / f"traces-{llm}-{workers}"), "--workers", str(workers), "--root", str(work)]
    if llm == "scripted":
        cmd += ["--script", str(script)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False)
    while True:
        try:
            if c.get("/api/runs").status_code == 200:
                return proc, c, time.perf_counter() - t0
        except httpx.TransportError:
            time.sleep(0.1)


def stop(proc: subprocess.Popen, c: httpx.Client) -> None:
    c.close()
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def throughput(c: httpx.Client, ct: bytes, runs: int, workers: int) -> str:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(min(runs, 20)) as pool:
        ids = list(pool.map(lambda _: post(c, ct), range(runs)))
    while True:
        states = [c.get(f"/api/runs/{i}").json()["status"] for i in ids]
        if all(s not in ("queued", "running") for s in states):
            break
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    return (f"throughput: {runs} runs posted at once, all finished in {wall:.1f} s: {runs / wall * 60:.1f} runs/min "
            f"with --workers {workers}; {states.count('done')} done, {runs - states.count('done')} not")


def versus_cli(ct_path: str, ct: bytes, llm: str, repeat: int, work: Path, script: Path) -> str:
    """The same case, the same planner: `dxagent run` as a user runs it (a fresh process each time: imports, model
    load, the run) against POST + the event stream to `end` on a warm server (median of `repeat` each)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cli = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "agent.app.cli", "run", ct_path, "-q", QUESTION, "--llm", llm,
                        "--trace-dir", str(work / "cli")], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        cli.append(time.perf_counter() - t0)
    proc, c, _ = start_server(llm, 1, work, script)
    try:
        one(c, ct)  # warm: the model loaded, the tool worker started
        api = [one(c, ct)[1] for _ in range(repeat)]
    finally:
        stop(proc, c)
    a, r = statistics.median(api), statistics.median(cli)
    return (f"API vs CLI, --llm {llm}, medians of {repeat}: `dxagent run` (fresh process) {r:.2f} s, POST -> end on a "
            f"warm server {a:.2f} s: ratio {a / r:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="scripted")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workers", default="1,2", help="worker counts to measure throughput with (comma-separated)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cli-llm", default="tiny", help="planner of the API-vs-`dxagent run` comparison (the CLI has no "
                                                      "scripted planner); 'none' skips it")
    a = ap.parse_args()
    workers = [int(w) for w in a.workers.split(",")]

    from helpers import call
    from pydicom.data import get_testdata_file

    ct_path = get_testdata_file("CT_small.dcm")
    ct = Path(ct_path).read_bytes()
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    script = work / "script.jsonl"
    script.write_text(call("ct_tissue_composition") + "\n")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start (shared with other jobs)")
    try:
        proc, c, started = start_server(a.llm, workers[0], work, script)
        try:
            time.sleep(1.0)
            print(f"server: --llm {a.llm}, --workers {workers[0]}, up in {started:.1f} s; idle RSS {rss_mb(proc.pid):.0f} MB")
            cold_first, cold_end = one(c, ct)
            print(page_load(str(c.base_url).rstrip("/"), c.get("/api/runs").json()[0]["id"], a.repeat))
            warm = [one(c, ct) for _ in range(a.repeat)]
            print(f"POST -> first streamed event: cold {cold_first * 1000:.0f} ms; warm median "
                  f"{statistics.median(w[0] for w in warm) * 1000:.0f} ms (n={a.repeat})")

            from agent.engine.session import run_case

            kw = {"llm": a.llm, "trace_dir": work / "direct", "script": [call("ct_tissue_composition")]}
            run_case([ct_path], QUESTION, **kw)  # warm this process like the server is warm
            direct = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                run_case([ct_path], QUESTION, **kw)
                direct.append(time.perf_counter() - t0)
            api = statistics.median(w[1] for w in warm)
            rc = statistics.median(direct)
            print(f"same case, warm medians: API POST -> end {api:.3f} s, run_case in-process {rc:.3f} s: ratio "
                  f"{api / rc:.2f} (+{(api - rc) * 1000:.0f} ms; the stream polls every 0.2 s)")
            print(throughput(c, ct, a.runs, workers[0]))
            time.sleep(1.0)
            print(f"idle RSS after {a.runs + a.repeat + 1} runs: {rss_mb(proc.pid):.0f} MB")
        finally:
            stop(proc, c)
        for w in workers[1:]:
            proc, c, _ = start_server(a.llm, w, work, script)
            try:
                one(c, ct)  # warm
                print(throughput(c, ct, a.runs, w))
            finally:
                stop(proc, c)
        if a.cli_llm != "none":
            print(versus_cli(ct_path, ct, a.cli_llm, min(a.repeat, 3), work, script))
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
