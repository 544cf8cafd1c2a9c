"""dxagent serve: latency to the first streamed event, API overhead over run_case, idle memory, queued throughput.

    .venv/bin/python bench/bench_serve.py [--llm scripted|tiny|local] [--runs 10] [--workers 1] [--repeat 5]

Starts the real `dxagent serve` (a subprocess on a free loopback port, a fresh trace folder) and, on the bundled CT
slice (pydicom's CT_small.dcm) with the tissue question:

- idle server memory: RSS of the server process after start-up, and again idle after all runs;
- time from POST /api/runs (an upload) to the first event on GET /api/runs/{id}/events (the intake), first run (cold:
  the engine's imports, the tool worker) and the median of --repeat warm runs;
- API overhead: POST to the stream's `end` event for the same case, against `run_case` called in this process (warm,
  median of --repeat), as a ratio (the event stream polls the store every 0.2 s, which is part of what is measured);
- throughput: --runs runs posted at once to the bounded queue (--workers), runs per minute until the last is done;
- page load: the reading room at / in the system's chromium (Playwright): first contentful paint and load, and the
  time to open a finished run to its drawn image and report (skipped without playwright or chromium).

Prints figures; asserts nothing. --llm scripted (default) measures the server, not a model; tiny/local add the model.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="scripted")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    from helpers import call
    from pydicom.data import get_testdata_file

    ct_path = get_testdata_file("CT_small.dcm")
    ct = Path(ct_path).read_bytes()
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    script = work / "script.jsonl"
    script.write_text(call("ct_tissue_composition") + "\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "agent.app.cli", "serve", "--llm", a.llm, "--port", str(port), "--trace-dir",
           str(work / "traces"), "--workers", str(a.workers), "--root", str(work)]
    if a.llm == "scripted":
        cmd += ["--script", str(script)]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as c:
            while True:
                try:
                    if c.get("/api/runs").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            started = time.perf_counter() - t_start
            time.sleep(1.0)
            idle = rss_mb(proc.pid)
            print(f"server: --llm {a.llm}, --workers {a.workers}, up in {started:.1f} s; idle RSS {idle:.0f} MB")

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
            print(f"same case, warm medians: API POST -> end {api:.3f} s, run_case {rc:.3f} s: ratio {api / rc:.2f} "
                  f"(+{(api - rc) * 1000:.0f} ms; the stream polls every 0.2 s)")

            t0 = time.perf_counter()
            with ThreadPoolExecutor(min(a.runs, 20)) as pool:
                ids = list(pool.map(lambda _: post(c, ct), range(a.runs)))
            while True:
                states = [c.get(f"/api/runs/{i}").json()["status"] for i in ids]
                if all(s not in ("queued", "running") for s in states):
                    break
                time.sleep(0.1)
            wall = time.perf_counter() - t0
            print(f"throughput: {a.runs} runs posted at once, all finished in {wall:.1f} s: {a.runs / wall * 60:.1f} "
                  f"runs/min with {a.workers} worker(s); {states.count('done')} done, "
                  f"{a.runs - states.count('done')} not")
            time.sleep(1.0)
            print(f"idle RSS after {a.runs + a.repeat + 1} runs: {rss_mb(proc.pid):.0f} MB")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
