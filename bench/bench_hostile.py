"""Issue 15's and 32's figures: the hostile-input corpus outcome table, an identifier scan of every store, the injection
table (vector x planner -> tools and outcome, against the clean run; paraphrased vectors too), the impression table
(paraphrased dispositions from an endpoint narrator -> kept or dropped), the forgery table (forgery -> verify) and the
probes table (issue 32's benchmark): the real `dxagent` console script in a subprocess per probe - a misbehaving PACS
(the fake server of tests/test_dicomweb_hostile.py), read-only and full disks (small tmpfs mounts: root only, else the
row says skipped and why), truncated and raced records, oversized manifests, a patient-named folder - each with a
stated deadline, and per probe its exit code, first stderr line, wall time, peak RSS of its process tree, whether it
printed a traceback or hung (was killed at the deadline), and the probe's own check; then a summary line (hangs,
tracebacks, identifier hits, truncated records that verified, the largest DICOMweb peak RSS against its stated bound).

    .venv/bin/python bench/bench_hostile.py [--no-local] [--only corpus,injection,impression,forgery,probes]
                                           [--probes dicomweb,storage,records,manifests,identifiers]

Prints tables; asserts nothing. `--no-local` leaves out the embedded Qwen planner (a minute) and keeps the scripted
adversarial endpoint (tests/test_hostile.py ObeyingChat: obeys any instruction it sees outside <<< >>> quotes).
`--only probes` runs the probes alone (about 6 minutes on 2 busy cores); the runs they need talk to a loopback fake
OpenAI-compatible planner (FakeLLM below), so no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def corpus_table(tmp: Path) -> None:
    from helpers import answer, call
    from makers import fuzz

    from agent.engine.session import DxError, run_case

    cases = fuzz.make(tmp / "inputs")
    print(f"\n## corpus: {len(cases)} inputs\n\n| input | outcome | message | s |\n|---|---|---|---|")
    for c in cases:
        t0 = time.perf_counter()
        try:
            res = run_case([str(c.path)], "What does this image show?", llm="scripted",
                           script=[call("inspect_image"), answer()], trace_dir=tmp / "traces", route=False)
            out, msg = "report", res.report["recommendation"]["outcome"]
        except DxError as exc:
            out, msg = "error (exit 2)", str(exc).replace(fuzz.NAME, "<name>")
        print(f"| {c.name} | {out} | {msg[:80].replace('|', '/')} | {time.perf_counter() - t0:.2f} |")
    hits = sum(f.read_bytes().count(fuzz.NAME.encode()) + f.read_bytes().count(b"IGNORE PREVIOUS")
               for f in (tmp / "traces").rglob("*") if f.is_file())
    n = sum(1 for f in (tmp / "traces").rglob("*") if f.is_file())
    print(f"\nidentifier / injected-text scan over {n} files under the trace folder: {hits} hits")


def injection_table(tmp: Path, local: bool) -> None:
    import test_hostile as th
    from pydicom.data import get_testdata_file

    from agent.engine.session import run_case

    tmp.mkdir(parents=True, exist_ok=True)
    q = "Describe the findings"
    clean_path = get_testdata_file("CT_small.dcm")
    bad_path = th._injected_dicom(tmp)
    vectors = {"none": (clean_path, q, ""), "DICOM tags": (bad_path, q, ""), "clinical context": (clean_path, q, th.INJECT),
               "question": (clean_path, f"{q}. {th.INJECT}", ""), "all three": (bad_path, f"{q}. {th.INJECT}", th.INJECT),
               "paraphrased context": (clean_path, q, th.PARAPHRASE),
               "paraphrased question": (clean_path, f"{q}. {th.PARAPHRASE}", "")}
    print("\n## injection\n\n| planner | vector | tools | outcome | findings | same as clean |\n|---|---|---|---|---|---|")
    planners = ["obeying endpoint", "gullible endpoint"] + (["embedded Qwen2.5-1.5B"] if local else [])
    for planner in planners:
        base = None
        for name, (path, question, ctx) in vectors.items():
            d = tmp / f"{planner[:3]}-{name.replace(' ', '_')}"
            if planner != "embedded Qwen2.5-1.5B":  # obeying: instructions outside quotes; gullible: a paraphrase
                # anywhere in its prompt (tests/test_hostile.py)
                kind = th.ObeyingChat if planner == "obeying endpoint" else th.GullibleChat
                chat = kind(responses=[th.call("ct_tissue_composition"), json.dumps({"tool": "answer",
                                                                                    "args": {}})] * 3,
                            model_id="obeying")
                chat.obeyed = []
                res = run_case([str(path)], question, chat=chat, model_id="obeying", mode="json", clinical_context=ctx,
                               trace_dir=d, route=False)
            else:
                res = run_case([str(path)], question, llm="local", clinical_context=ctx, trace_dir=d, route=False,
                               max_steps=4)
            row = ([e.tool for e in res.state.evidence], res.report["recommendation"]["outcome"],
                   len(res.report["findings"]))
            base = base or row
            print(f"| {planner} | {name} | {', '.join(row[0])} | {row[1]} | {row[2]} | {'yes' if row == base else 'NO'} |")


def impression_table(tmp: Path) -> None:
    """An endpoint narrator writing dispositions in words no list holds: what reaches the impression."""
    from helpers import call
    from pydicom.data import get_testdata_file

    from agent.engine.session import run_case
    from agent.llm.backends import ScriptedChat

    said = ["Fat is about 25 % of the body [E1].", "The scan is unremarkable [E1].",
            "No malignancy is present [E1].", "The patient can go home [E1].", "Fat is 52 % of the body [E1].",
            "Nothing here needs attention [E1].", "All is well [E1]."]
    res = run_case([get_testdata_file("CT_small.dcm")], "How much fat?", llm="scripted",
                   script=[call("ct_tissue_composition")], trace_dir=tmp, narrator=ScriptedChat(responses=[" ".join(said)]))
    imp = res.report["impression"]
    print("\n## impression (endpoint narrator)\n\n| sentence written | kept |\n|---|---|")
    for s in said:
        print(f"| {s} | {'yes' if s in imp else 'dropped'} |")


def forgery_table(tmp: Path) -> None:
    import os

    from helpers import call

    from agent.engine.session import run_case
    from agent.store.trace import TraceStore, seal_of, verify_dump

    mr = __import__("pydicom.data", fromlist=["get_testdata_file"]).get_testdata_file("MR_small.dcm")

    def run(d: Path) -> str:
        return run_case([mr], "How large is the dominant bright region?", llm="scripted",
                        script=[call("region_measure")], trace_dir=d).run_id

    def sql(d: Path, q: str, *a) -> None:
        con = sqlite3.connect(d / "dxagent.sqlite")
        con.execute(q, a)
        con.commit()
        con.close()

    def verdict(d: Path, rid: str) -> str:
        p = verify_dump(TraceStore(None, d).dump(rid), d / "artifacts")
        return "intact" if not p else ("INCOMPLETE" if all(x.startswith("incomplete") for x in p) else "TAMPERED") + \
            f": {p[0][:90]}"

    os.environ["DXAGENT_TRACE_KEY"] = "bench-key"
    rows = []
    d = tmp / "f1"
    rid = run(d)
    sql(d, "DELETE FROM event WHERE run_id = ? AND seq > 3", rid)
    sql(d, "UPDATE run SET status='running', report=NULL, seal=NULL, seal_alg=NULL, n_events=NULL, head_hash=NULL "
           "WHERE id = ?", rid)
    rows.append(("cut after event 3, report removed, status running, seal cleared", verdict(d, rid)))
    d = tmp / "f2"
    rid = run(d)
    row = TraceStore(None, d).dump(rid)["run"]
    sql(d, "UPDATE run SET seal_alg='sha256', seal=? WHERE id = ?", seal_of(row, "sha256"), rid)
    rows.append(("keyed run re-sealed with plain sha256 (key set)", verdict(d, rid)))
    d = tmp / "f3"
    rid = run(d)
    sql(d, "UPDATE event SET payload = replace(payload, 'ok', 'failed') WHERE run_id = ? AND kind = 'tool'", rid)
    rows.append(("tool event edited", verdict(d, rid)))
    d = tmp / "f4"
    rid = run(d)
    sql(d, "UPDATE run SET report = replace(report, 'report', 'abstain') WHERE id = ?", rid)
    rows.append(("report edited in the run row", verdict(d, rid)))
    d = tmp / "f5"
    rid = run(d)
    rows.append(("untouched (control)", verdict(d, rid)))
    del os.environ["DXAGENT_TRACE_KEY"]
    print("\n## forgery (DXAGENT_TRACE_KEY set)\n\n| forgery | verify |\n|---|---|")
    for what, v in rows:
        print(f"| {what} | {v} |")


# -- probes: the real CLI, one subprocess per probe, each with a stated deadline (issue 32's benchmark) ------------------

DICOMWEB_DEADLINE_S = 20  # DXAGENT_DICOMWEB_DEADLINE in every DICOMweb probe's environment
DICOMWEB_MAX_BYTES = 8 << 20  # DXAGENT_DICOMWEB_MAX_BYTES (one instance; CT_small is 40 kB)
DICOMWEB_MAX_JSON_BYTES = 1 << 20  # DXAGENT_DICOMWEB_MAX_JSON_BYTES (one QIDO reply; huge-json sends ~4 MB)
# the stated memory bound of every DICOMweb probe but the control (which runs the whole analysis after its retrieval):
# the peak RSS of the CLI's process tree. A retrieval that gets nothing (the unreachable-server row) peaks at about
# 250 MiB (the CLI's imports); the caps above allow 5x an 8 MiB instance (agent/imaging/dicomweb.py: a retrieval peaks
# at about 5x its largest reply) and listings of at most 20,000 rows; 512 MiB leaves room for both, and is two orders of
# magnitude below what an unbounded listing cost (11.5 GB in 120 s, issue 32). A fixed figure, not one derived from the
# rows it judges.
DICOMWEB_RSS_BOUND_MIB = 512
STARTUP_S = 45  # a stated deadline's allowance for starting the CLI (imports) on a shared 2-core machine
NAME = "DOE_JANE_MRN12345"


@dataclass
class Outcome:
    """One measured child: exit code, stderr, wall seconds, peak RSS of its process tree, killed at the deadline."""

    rc: int
    stdout: str
    stderr: str
    wall: float
    rss_mib: float
    hang: bool
    leftover: list[str]  # descendants still running 3 s after it exited (then killed by the bench)

    @property
    def first(self) -> str:
        return next((x.strip() for x in self.stderr.splitlines() if x.strip()), "")

    @property
    def last_error(self) -> str:
        return next((x.strip() for x in reversed(self.stderr.splitlines()) if x.strip().startswith("error:")), "")

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr or "Traceback" in self.stdout


def _exe() -> list[str]:
    script = Path(sys.executable).parent / "dxagent"  # the console script beside the interpreter
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.app.cli"]


def _child_env(**extra: str) -> dict[str, str]:
    import os

    drop = ("DXAGENT_TRACE_KEY", "DXAGENT_TRACE_DIR", "DXAGENT_MAX_MANIFEST_BYTES", "http_proxy", "https_proxy",
            "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("DXAGENT_DICOMWEB_")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def measure(args: list, deadline: float, env: dict[str, str] | None = None, cwd: Path | None = None) -> Outcome:
    """Run `dxagent ARGS` in its own process group; poll the RSS of its process tree (every 50 ms) and take the larger of
    that and the child's own ru_maxrss (wait4); kill the group at `deadline` (a hang). The tree's sum counts pages a
    forked worker still shares with its parent twice: an upper estimate where a run starts its tool worker. Descendants
    still alive 3 s after it exited are reported (and killed: they are this bench's)."""
    import os
    import signal
    import subprocess

    import psutil

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(_exe() + [str(a) for a in args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             env=env or _child_env(), cwd=cwd, start_new_session=True)
        t0, peak, hang = time.monotonic(), 0, False
        me = psutil.Process(p.pid)
        seen: dict[int, psutil.Process] = {}
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                kids = me.children(recursive=True)
            except psutil.Error:
                kids = []
            total = 0
            for q in [me, *kids]:
                try:
                    total += q.memory_info().rss
                except psutil.Error:
                    pass
            seen.update({q.pid: q for q in kids if q.pid not in seen})
            peak = max(peak, total)
            if time.monotonic() - t0 > deadline:
                hang = True
                os.killpg(p.pid, signal.SIGKILL)
                _, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)

        def alive() -> list[psutil.Process]:
            left = []
            for q in seen.values():
                try:  # is_running() compares the start time too: a reused pid is not ours
                    if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                        left.append(q)
                except psutil.Error:
                    pass
            return left

        grace = time.monotonic() + 3.0
        while (left := alive()) and time.monotonic() < grace:
            time.sleep(0.1)
        names = []
        for q in left:
            try:
                names.append(" ".join(q.cmdline())[-60:] or q.name())
                q.kill()
            except psutil.Error:
                pass
        out.seek(0)
        err.seek(0)
        return Outcome(p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), wall,
                       max(peak, usage.ru_maxrss * 1024) / 2**20, hang, names)


@dataclass
class Row:
    group: str
    probe: str
    deadline: float
    o: Outcome | None = None
    check: str = ""  # the probe's own expectation, met or not
    ok: bool = True
    skipped: str = ""
    hits: int = 0  # identifiers found in the store after it
    forged: bool = False  # a truncated record that verified "intact"

    def line(self) -> str:
        if self.o is None:
            return f"| {self.group} | {self.probe} | {self.deadline:g} | - | skipped: {self.skipped} | - | - | - | - | - |"
        o = self.o
        first = o.first[:100].replace("|", "/") or "(empty)"
        check = ("" if self.ok and not o.leftover else "FAIL: ") + self.check.replace("|", "/")
        if o.last_error and o.last_error != o.first:  # a run's live steps came first: its error line too
            check += f"; error line: {o.last_error[:100]}"
        elif len(o.first) > 100 and o.first.startswith("error:"):
            check += f"; message ends: ...{o.first[-80:]}"
        if o.leftover:
            check += f"; LEFT RUNNING 3 s after exit: {len(o.leftover)} process(es) ({'; '.join(o.leftover)[:120]})"
        return (f"| {self.group} | {self.probe} | {self.deadline:g} | {o.rc} | {first} | {o.wall:.1f} | "
                f"{o.rss_mib:.0f} | {'YES' if o.traceback else 'no'} | {'YES' if o.hang else 'no'} | {check} |")


class FakeLLM:
    """A loopback OpenAI-compatible endpoint for the runs the probes need: `script` replies first (planner JSON), then
    "answer"; mode "hold" keeps every request waiting (until released), "slow" answers after `delay` seconds."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.mode, self.delay, self.script, self.requests = "answer", 0.0, [], 0
        self.lock, self.release = threading.Lock(), threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, body: bytes) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def do_GET(self):
                self._send(json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake.lock:
                    fake.requests += 1
                    mode = fake.mode
                    content = fake.script.pop(0) if fake.script else json.dumps(
                        {"tool": "answer", "args": {}, "reason": "done"})
                if mode == "hold":
                    fake.release.wait(300)
                    return
                if mode == "slow":
                    time.sleep(fake.delay)
                self._send(json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                                       "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                           "role": "assistant", "content": content}}],
                                       "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                 "total_tokens": 2}}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def reset(self, mode: str = "answer", script: list[str] | None = None, delay: float = 0.0,
              batch: bool = False) -> list[str]:
        """Set the behaviour; returns the planner options of a command that uses this endpoint (`run`, or `batch`,
        which has no --no-route)."""
        with self.lock:
            self.mode, self.script, self.delay, self.requests = mode, list(script or []), delay, 0
        return ["--llm", "openai-json", "--base-url", self.base_url, "--model", "fake"] + ([] if batch else ["--no-route"])

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _ct() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


def _q() -> list[str]:
    return ["-q", "How much fat is in this CT slice?"]


def dicomweb_probes(tmp: Path, llm: FakeLLM) -> list[Row]:
    """The fake PACS of tests/test_dicomweb_hostile.py, one misbehaviour per probe, through `dxagent run` (and
    `dxagent batch` for a QIDO study query); the deadline and caps are set in the child's environment."""
    import socket
    import threading
    from http.server import ThreadingHTTPServer

    import test_dicomweb_hostile as pacs_mod

    state = pacs_mod.FakePacs()
    server = ThreadingHTTPServer(("127.0.0.1", 0), pacs_mod._handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    ct_ref = pacs_mod.ref(url, pacs_mod.CT_STUDY)
    other_ref = pacs_mod.ref(url, pacs_mod.OTHER_STUDY, pacs_mod.OTHER_SERIES)
    query = url.replace("http://", "dicomweb://") + "/dicom-web?modality=CT"
    deadline = DICOMWEB_DEADLINE_S + STARTUP_S
    # (probe, mode, studies listed, how it is run, what stderr must say)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = pacs_mod.ref(f"http://127.0.0.1:{closed.getsockname()[1]}", pacs_mod.CT_STUDY)
    closed.close()  # a port nothing listens on
    cases = [("well-behaved server (control)", "ok", 0, ["run", ct_ref], ""),
             ("unreachable server (baseline: retrieves nothing)", "ok", 0, ["run", nobody], "cannot reach"),
             ("trickle-body (1 byte/s)", "trickle-body", 0, ["run", ct_ref], f"within {DICOMWEB_DEADLINE_S} s"),
             ("trickle-headers (1 byte/s)", "trickle-headers", 0, ["run", ct_ref], f"within {DICOMWEB_DEADLINE_S} s"),
             ("silent (accepts, never answers)", "silent", 0, ["run", ct_ref], "within"),
             ("ignores offset (instance paging)", "ignore-offset", 0, ["run", ct_ref], "ignores the QIDO offset"),
             ("ignores offset (study query, batch)", "ignore-offset", 1500, ["batch", query], "ignores the QIDO offset"),
             ("endless instance listing", "endless", 0, ["run", ct_ref], "more than"),
             ("wrong study", "wrong-study", 0, ["run", other_ref], "another study"),
             ("wrong series", "wrong-series", 0, ["run", other_ref], "another series"),
             ("wrong instance", "wrong-sop", 0, ["run", other_ref], "another instance"),
             ("huge JSON (~4 MB study listing, batch)", "huge-json", 1, ["batch", query], "larger than"),
             ("garbage multipart", "garbage-multipart", 0, ["run", ct_ref], "does not parse"),
             ("garbage JSON", "garbage-json", 0, ["run", ct_ref], "not DICOM JSON"),
             ("path-shaped series UIDs", "traversal", 0, ["run", ct_ref], "not a DICOM UID"),
             ("path-shaped instance UID", "traversal-sop", 0, ["run", ct_ref], "not a DICOM UID")]
    rows = []
    try:
        for i, (probe, mode, studies, args, said) in enumerate(cases):
            state.mode, state.studies, state.paths = mode, studies, []
            cache = tmp / f"cache{i}"
            env = _child_env(DXAGENT_CACHE=str(cache), DXAGENT_DICOMWEB_DEADLINE=str(DICOMWEB_DEADLINE_S),
                             DXAGENT_DICOMWEB_MAX_BYTES=str(DICOMWEB_MAX_BYTES),
                             DXAGENT_DICOMWEB_MAX_JSON_BYTES=str(DICOMWEB_MAX_JSON_BYTES), DXAGENT_MODELS=_models_dir())
            extra = ["--out", tmp / f"b{i}"] if args[0] == "batch" else ["--trace-dir", tmp / f"t{i}"]
            o = measure([*args, *_q(), *llm.reset(batch=args[0] == "batch"), *extra], deadline, env)
            cached = [p for p in (cache / "dicomweb").rglob("*") if p.is_file()] if (cache / "dicomweb").exists() else []
            dotted = [p for p in state.paths if ".." in p]
            if said == "":
                ok = o.rc == 0 and len(cached) == 1
                check = f"report, {len(cached)} instance cached"
            else:
                ok = o.rc == 2 and said in o.stderr and not cached and not dotted
                check = (f"exit 2 naming '{said}'; {len(state.paths)} request(s)"
                         + (f"; {len(cached)} file(s) cached" if cached else "; nothing cached")
                         + (f"; {len(dotted)} request(s) with '..' in the URL" if dotted else ""))
            if mode != "ok" or said:  # every probe but the control is held to the stated memory bound
                over = o.rss_mib > DICOMWEB_RSS_BOUND_MIB
                ok = ok and not over
                check += f"; peak RSS {'OVER' if over else 'within'} the {DICOMWEB_RSS_BOUND_MIB} MiB bound"
            rows.append(Row("dicomweb", probe, deadline, o, check, ok and not o.hang and not o.traceback))
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()
    return rows


def _models_dir() -> str:
    from agent.store.models import default_models_dir

    return str(default_models_dir())


def _mount(where: Path, options: str) -> str:
    """'' when a tmpfs is mounted at `where`, else why not (not root, mount refused)."""
    import os
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    return "" if r.returncode == 0 else f"mount refused: {r.stderr.strip()[:80]}"


def _umount(where: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _one_line_exit_2(o: Outcome, said: str) -> tuple[bool, str]:
    lines = [x for x in o.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    ok = o.rc == 2 and errors == lines[-1:] and said.lower() in (lines[-1].lower() if lines else "")
    return ok, f"one error line, exit 2, naming '{said}'" + ("" if ok or not errors else f"; got: {errors[-1][:90]}")


def storage_probes(tmp: Path, llm: FakeLLM) -> list[Row]:
    """Read-only and full disks (small tmpfs mounts, root only), an --out that names a file."""
    ct, deadline, rows, mounted = _ct(), 60 + STARTUP_S, [], []

    def mount(name: str, options: str) -> tuple[Path, str]:
        where = tmp / name
        why = _mount(where, options)
        if not why:
            mounted.append(where)
        return where, why

    try:
        ro, why = mount("ro", "ro,size=64k")
        for label, args in (("run", ["run", ct, *_q(), *llm.reset()]), ("trace list", ["trace", "list"]),
                            ("trace verify --all", ["trace", "verify", "--all"])):
            probe = f"trace dir on a read-only tmpfs: {label}"
            if why:
                rows.append(Row("storage", probe, deadline, skipped=why))
                continue
            o = measure([*args, "--trace-dir", ro / "traces"], deadline)
            ok, check = _one_line_exit_2(o, "Read-only file system")
            rows.append(Row("storage", probe, deadline, o, check, ok and not o.hang and not o.traceback))
        full, why = mount("full", "size=48k")
        probe = "full tmpfs (48 kB) under the trace dir: run"
        if why:
            rows.append(Row("storage", probe, deadline, skipped=why))
        else:
            o = measure(["run", ct, *_q(), *llm.reset(), "--trace-dir", full / "traces"], deadline)
            ok, check = _one_line_exit_2(o, "space")
            if not ok and "full" in o.last_error.lower():
                ok, check = _one_line_exit_2(o, "full")
            rows.append(Row("storage", probe, deadline, o, check, ok and not o.hang and not o.traceback))
        fullout, why = mount("fullout", "size=64k")
        probe = "full tmpfs (64 kB, 60 kB taken) under --out: run"
        if why:
            rows.append(Row("storage", probe, deadline, skipped=why))
        else:
            (fullout / "ballast").write_bytes(b"\0" * (60 * 1024))
            o = measure(["run", ct, *_q(), *llm.reset(), "--trace-dir", tmp / "t-fullout", "--out", fullout / "out"],
                        deadline)
            ok, check = _one_line_exit_2(o, "No space left on device")
            left = sorted(p.name for p in (fullout / "out").iterdir()) if (fullout / "out").is_dir() else []
            broken = [n for n in left if n == "report.json" or n.endswith(".tmp")]
            check += f"; left under --out: {', '.join(left) or 'nothing'}"
            rows.append(Row("storage", probe, deadline, o, check, ok and not broken and not o.hang and not o.traceback))
        a_file = tmp / "taken"
        a_file.write_text("x")
        o = measure(["run", ct, *_q(), *llm.reset(), "--trace-dir", tmp / "t-file", "--out", a_file], deadline)
        ok, check = _one_line_exit_2(o, "is a file, not a folder")
        started = (tmp / "t-file" / "dxagent.sqlite").exists()
        check += "; refused before the run" if not started else "; a run was started first"
        rows.append(Row("storage", "--out naming an existing file: run", deadline, o, check,
                        ok and not started and not o.hang and not o.traceback))
        probe = "--out on a read-only tmpfs: run"
        if ro in mounted:
            o = measure(["run", ct, *_q(), *llm.reset(), "--trace-dir", tmp / "t-roout", "--out", ro / "out"], deadline)
            ok, check = _one_line_exit_2(o, "cannot be written")
            rows.append(Row("storage", probe, deadline, o, check, ok and not o.hang and not o.traceback))
        else:
            rows.append(Row("storage", probe, deadline, skipped="no read-only tmpfs"))
    finally:
        for where in reversed(mounted):
            _umount(where)
    return rows


def _sql(d: Path, q: str, *a) -> None:
    con = sqlite3.connect(d / "dxagent.sqlite")
    con.execute(q, a)
    con.commit()
    con.close()


def _setup_run(llm: FakeLLM, trace_dir: Path, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(run id, '') of a finished `dxagent run` (a tool call, then answer), or ('', why it failed)."""
    from helpers import call

    o = measure(["run", _ct(), *_q(), *llm.reset(script=[call("ct_tissue_composition")]), "--json", "--trace-dir",
                 trace_dir], 120 + STARTUP_S, env)
    try:
        return json.loads(o.stdout)["run_id"], ""
    except (ValueError, KeyError):
        return "", f"the setup run failed (exit {o.rc}): {o.last_error or o.first}"[:120]


def _verdict(o: Outcome, rid: str) -> str:
    """`trace verify`'s verdict on `rid` (intact, INCOMPLETE, TAMPERED, ...) and its first reason."""
    lines = o.stdout.splitlines()
    at = next((i for i, x in enumerate(lines) if rid in x), None)
    if at is None:
        return "not listed"
    reason = lines[at + 1].strip(" -") if at + 1 < len(lines) and lines[at + 1].startswith("  -") else ""
    return lines[at].split()[0] + (f" ({reason[:70]})" if reason else "")


def records_probes(tmp: Path, llm: FakeLLM) -> list[Row]:
    """A truncated record (events cut from seq 3, status back to running, seal cleared; its writer has ended) through
    verify - directly, with a key, and after list/show/replay/a new run opened the store - and two --resume of one
    interrupted run at once."""
    import os
    import signal
    import subprocess
    import threading

    rows, deadline = [], 60 + STARTUP_S
    for key in ("", "bench-trace-key"):
        env = _child_env(**({"DXAGENT_TRACE_KEY": key} if key else {}))
        d = tmp / f"trunc{'-key' if key else ''}"
        rid, why = _setup_run(llm, d, env)
        label = "truncated record" + (" (DXAGENT_TRACE_KEY set)" if key else "")
        if not rid:
            rows.append(Row("records", f"{label}: trace verify --all", deadline, skipped=why))
            continue
        _sql(d, "DELETE FROM event WHERE run_id = ? AND seq >= 3", rid)
        _sql(d, "UPDATE run SET status='running', report=NULL, seal=NULL, seal_alg=NULL, n_events=NULL, "
                "head_hash=NULL, finished_at=NULL WHERE id = ?", rid)
        steps = [("trace verify --all", ["trace", "verify", "--all"])]
        if not key:
            steps += [("trace list", ["trace", "list"]), ("trace show", ["trace", "show", rid]),
                      ("replay", ["replay", rid]),
                      ("a new run in the same store", ["run", _ct(), *_q(), *llm.reset()]),
                      ("trace verify --all after those", ["trace", "verify", "--all"])]
        for name, args in steps:
            o = measure([*args, "--trace-dir", d], deadline, env)
            forged = False
            said = next((x.strip() for x in o.stdout.splitlines() if x.strip()), "")[:80]
            if "verify" in name:
                v = _verdict(o, rid)
                ok, check, forged = v.split()[0] != "intact", f"the truncated run: {v}", v.split()[0] == "intact"
            elif name == "replay":
                ok, check = o.rc != 0, f"must not replay as verified; says: {said or '-'}"
            elif name == "trace show":
                record = next((x.strip() for x in o.stdout.splitlines() if "record:" in x), "no record: line")
                ok, check = "intact" not in record, f"must not show it intact; {record[:80]}"
            elif name == "trace list":
                listed = next((" ".join(x.split()) for x in o.stdout.splitlines() if rid in x), "not listed")
                ok, check = o.rc == 0, f"lists it: {listed[:90]}"
            else:
                ok, check = o.rc == 0, "a new run opens the store (marks dead runs interrupted, must seal none)"
            rows.append(Row("records", f"{label}: {name}", deadline, o, check, ok and not o.hang and not o.traceback,
                            forged=forged))
    # two --resume of one interrupted run at once: a run killed while its planner waited, then resumed twice
    d = tmp / "race"
    args = ["run", _ct(), *_q(), *llm.reset(mode="hold"), "--json", "--trace-dir", d]
    p = subprocess.Popen(_exe() + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=_child_env(), start_new_session=True)
    t0 = time.monotonic()
    while llm.requests == 0 and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.2)
    waiting = llm.requests > 0
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    llm.release.set()  # let the held request end
    rid = ""
    if waiting and (d / "dxagent.sqlite").exists():
        con = sqlite3.connect(d / "dxagent.sqlite")
        rid = (con.execute("SELECT id FROM run").fetchone() or [""])[0]
        con.close()
    probe = "two `run --resume RUN` at once"
    if not rid:
        rows.append(Row("records", probe, deadline, skipped="the run to interrupt never reached its planner"))
        return rows
    # the one that takes the run holds it while its planner waits 6 s a reply: the other one must be refused
    llm_args = llm.reset(mode="slow", delay=6.0)
    outs: list[Outcome | None] = [None, None]

    def resume(i: int) -> None:
        outs[i] = measure(["run", "--resume", rid, *llm_args, "--trace-dir", d], deadline)

    threads = [threading.Thread(target=resume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(o.rc for o in outs)
    refused = [o for o in outs if o.rc == 2]
    one_line = len(refused) == 1 and len([x for x in refused[0].stderr.splitlines() if x.strip()]) == 1
    for i, o in enumerate(outs):
        role = "took it" if o.rc == 0 else "refused" if o.rc == 2 else f"exit {o.rc}"
        ok = codes == [0, 2] and one_line
        rows.append(Row("records", f"{probe}: #{i + 1}", deadline, o,
                        f"{role}; expected one exit 0 and one one-line refusal (exit 2)", ok and not o.hang
                        and not o.traceback))
    o = measure(["trace", "verify", "--all", "--trace-dir", d], deadline)
    v = _verdict(o, rid)
    rows.append(Row("records", "after the race: trace verify --all", deadline, o, f"the resumed run: {v}",
                    v == "intact" and not o.hang and not o.traceback))
    return rows


def manifest_probes(tmp: Path, llm: FakeLLM) -> list[Row]:
    """A batch manifest over DXAGENT_MAX_MANIFEST_BYTES, and one with a 2 MiB row (that row's error, the rest run)."""
    import shutil

    rows, deadline = [], 120 + STARTUP_S
    ct = "ct.dcm"  # beside the manifests: a manifest's paths may not leave its folder
    shutil.copy(_ct(), tmp / ct)
    over = tmp / "over.jsonl"
    over.write_text("".join(json.dumps({"image": ct, "case_id": f"c{i}"}) + "\n" for i in range(40)))
    o = measure(["batch", over, "--out", tmp / "b-over", *_q(), *llm.reset(batch=True)], deadline,
                _child_env(DXAGENT_MAX_MANIFEST_BYTES="1000"))
    ok, check = _one_line_exit_2(o, "DXAGENT_MAX_MANIFEST_BYTES")
    rows.append(Row("manifests", f"manifest of {over.stat().st_size:,} bytes over a 1,000-byte cap", deadline, o,
                    check, ok and not o.hang and not o.traceback))
    big = tmp / "bigrow.jsonl"
    big.write_text(json.dumps({"image": ct, "case_id": "good"}) + "\n"
                   + json.dumps({"image": ct, "case_id": "big", "question": "x" * (2 << 20)}) + "\n")
    o = measure(["batch", big, "--out", tmp / "b-big", *_q(), *llm.reset(batch=True)], deadline)
    said = [x.strip() for x in o.stderr.splitlines() if "line 2" in x]
    ok = bool(said) and "longer than" in said[0] and len(said[0]) < 300
    results = tmp / "b-big" / "summary.csv"
    done = results.exists() and "good" in results.read_text() and "done" in results.read_text()
    rows.append(Row("manifests", "a 2 MiB row (line 2) beside a good row", deadline, o,
                    f"line 2's error: {said[0][:90] if said else 'none printed'}; good row "
                    f"{'done' if done else 'NOT done'}", ok and done and not o.hang and not o.traceback))
    return rows


def identifier_probes(tmp: Path, llm: FakeLLM) -> list[Row]:
    """A bad file in a patient-named folder through `dxagent run` (the file, and the folder with a good slice beside
    it); then every file under the trace dir is scanned for the name and the MRN."""
    from pathlib import Path as P

    rows, deadline = [], 60 + STARTUP_S
    folder = tmp / "in" / NAME
    folder.mkdir(parents=True)
    bad = folder / f"{NAME}_a.dcm"
    bad.write_bytes(P(_ct()).read_bytes()[:3000])
    series = tmp / "in2" / NAME
    series.mkdir(parents=True)
    (series / f"{NAME}_a.dcm").write_bytes(P(_ct()).read_bytes()[:3000])
    (series / f"{NAME}_b.dcm").write_bytes(P(_ct()).read_bytes())
    for i, (probe, target) in enumerate([("a cut-short file in a patient-named folder", bad),
                                        ("a patient-named DICOM folder with one cut-short file", series)]):
        d = tmp / f"t-id{i}"
        o = measure(["run", target, *_q(), *llm.reset(), "--trace-dir", d], deadline)
        files = [f for f in d.rglob("*") if f.is_file()]
        hits = sum(f.read_bytes().count(w) for f in files for w in (b"DOE_JANE", b"MRN12345"))
        echoed = o.stderr.count("DOE_JANE") + o.stderr.count("MRN12345")
        rows.append(Row("identifiers", probe, deadline, o,
                        f"{hits} identifier hit(s) in {len(files)} file(s) under the trace dir"
                        f" (stderr echoes the given path {echoed}x)", hits == 0 and not o.hang and not o.traceback,
                        hits=hits))
    return rows


PROBE_GROUPS = {"dicomweb": dicomweb_probes, "storage": storage_probes, "records": records_probes,
                "manifests": manifest_probes, "identifiers": identifier_probes}


def probes_table(tmp: Path, groups: list[str]) -> None:
    """Every probe through the real CLI; the table, then the summary line the issue asks for."""
    tmp.mkdir(parents=True, exist_ok=True)
    llm = FakeLLM()
    rows: list[Row] = []
    t0 = time.monotonic()
    try:
        for g in groups:
            (tmp / g).mkdir()
            rows += PROBE_GROUPS[g](tmp / g, llm)
    finally:
        llm.close()
    print(f"\n## probes (the real CLI, {_exe()[0]}; DICOMweb: DXAGENT_DICOMWEB_DEADLINE={DICOMWEB_DEADLINE_S} s, "
          f"MAX_BYTES {DICOMWEB_MAX_BYTES >> 20} MiB, MAX_JSON_BYTES {DICOMWEB_MAX_JSON_BYTES >> 20} MiB)\n")
    print("| group | probe | deadline s | exit | first stderr line | s | peak RSS MiB | traceback | hang | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r.line())
    ran = [r for r in rows if r.o is not None]
    web = [r for r in ran if r.group == "dicomweb"]
    bounded = [r for r in web if "control" not in r.probe]
    max_web = max((r.o.rss_mib for r in bounded), default=0.0)
    worst = max(bounded, key=lambda r: r.o.rss_mib).probe if bounded else "-"
    forged = sum(r.forged for r in ran)
    hits = sum(r.hits for r in ran)
    print(f"\nsummary: {len(ran)} probes run, {len(rows) - len(ran)} skipped, {time.monotonic() - t0:.0f} s; "
          f"hangs {sum(r.o.hang for r in ran)}, tracebacks {sum(r.o.traceback for r in ran)}, identifier hits {hits}, "
          f"truncated records that verified {forged}, processes left running {sum(len(r.o.leftover) for r in ran)}, "
          f"failed checks {sum(not r.ok or bool(r.o.leftover) for r in ran)}; "
          f"max DICOMweb peak RSS {max_web:.0f} MiB ({worst}; the control, which also runs the analysis, excluded) "
          f"against the stated bound {DICOMWEB_RSS_BOUND_MIB} MiB: "
          + ("n/a" if not bounded else "within" if max_web <= DICOMWEB_RSS_BOUND_MIB else "EXCEEDED"))

TABLES = ("corpus", "injection", "impression", "forgery", "probes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--only", default=",".join(TABLES), help=f"comma-separated tables: {', '.join(TABLES)}")
    ap.add_argument("--probes", default=",".join(PROBE_GROUPS),
                    help=f"comma-separated probe groups: {', '.join(PROBE_GROUPS)}")
    args = ap.parse_args()
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    groups = [g.strip() for g in args.probes.split(",") if g.strip()]
    for name, known in (("--only", TABLES), ("--probes", tuple(PROBE_GROUPS))):
        if bad := [x for x in (only if name == "--only" else groups) if x not in known]:
            ap.error(f"{name}: unknown {', '.join(bad)} (known: {', '.join(known)})")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "corpus" in only:
            corpus_table(tmp / "corpus")
        if "injection" in only:
            injection_table(tmp / "inj", not args.no_local)
        if "impression" in only:
            impression_table(tmp / "imp")
        if "forgery" in only:
            forgery_table(tmp / "forge")
        if "probes" in only:
            probes_table(tmp / "probes", groups)


if __name__ == "__main__":
    main()
