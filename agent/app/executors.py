"""The unit of batch work and how it is run: `CaseSpec` (one case of a manifest), `run_one` (one case in a worker
process, its report and record written atomically), `init_worker` (the planner and the tools loaded once per worker),
and the local executor `run_local` (spawned worker processes, a dead worker's case retried once). agent/app/batch.py
(manifests, records, summaries) and agent/app/eval.py use it; agent/app/batch_ray.py runs the same `run_one` on Ray.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.core.files import write_atomic


@dataclass
class CaseSpec:
    case_id: str
    paths: list[str] = field(default_factory=list)
    question: str | None = None
    clinical_context: str = ""
    modality: str | None = None
    body_part: str | None = None
    labels: list[str] = field(default_factory=list)
    where: str = ""  # "line 3", "row 7", "file x.png": where in the manifest
    error: str | None = None  # why the case cannot run (invalid)


# -- one case (runs in a worker) --------------------------------------------------------------------------------------
def now() -> str:
    """UTC time with microseconds, always the same width: records of one case order by this string."""
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="microseconds")



def predicted_labels(report: dict[str, Any]) -> list[str]:
    """Labels the report calls present: a finding present=True, or with probability >= 0.5 (normalised keys)."""
    from agent.engine.critic import label_key

    out = set()
    for f in report.get("findings", []):
        p = f.get("probability")
        if f.get("present") is True or (isinstance(p, int | float) and p >= 0.5):
            out.add(label_key(f.get("label", "")))
    return sorted(x for x in out if x)



def node_info() -> dict[str, Any]:
    """Where this process runs: `node` (the host name) and, in a Ray worker, `ray_node` (the Ray node id)."""
    import socket
    import sys

    info: dict[str, Any] = {"node": socket.gethostname(), "ray_node": None}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        info["ray_node"] = ray.get_runtime_context().get_node_id()
    return info


def start_attempt(marker: Path, opts: dict[str, Any], info: dict[str, Any]) -> tuple[str, list[str]]:
    """A new run id for this attempt of the case, written to `marker` (the case's `attempt.json`) before the run
    starts. A previous attempt
    whose run is still "running" (its worker or its whole node was lost mid-run; the case is now run again, here or
    on another node) is marked "interrupted", saying which run replaced it: a case never has two runs that both look
    current. Returns (the new run id, the run ids so marked)."""
    from agent.engine.graph import new_run_id
    from agent.store.trace import TraceStore

    name = marker.parent.name
    run_id = new_run_id(name)
    replaced: list[str] = []
    try:
        prev = json.loads(marker.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        prev = None
    if prev:
        where = info.get("ray_node") or info["node"]
        if TraceStore(opts.get("db_url"), Path(opts["out"]) / "traces").abandon(
                prev, f"its worker was lost before the run finished (an attempt of case {name}); the case "
                      f"was run again as {run_id} on {where}"):
            replaced.append(prev)
    write_atomic(marker, json.dumps({"run_id": run_id, "started_at": now(), "worker": os.getpid(), **info}))
    return run_id, replaced


def run_one(spec: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Run one case and write its report and result.json; returns the record. Never raises for a case's failure."""
    from agent.engine.report import to_markdown
    from agent.engine.session import DxError, run_case
    from agent.llm.backends import LLMUnavailable

    s = CaseSpec(**spec)
    out = Path(opts["out"])
    case_dir = out / "cases" / s.case_id
    info = node_info()
    rec: dict[str, Any] = {"case_id": s.case_id, "status": "failed", "run_id": None, "modality": None,
                           "outcome": None, "findings": 0, "seconds": 0.0, "error": None, "labels": s.labels,
                           "predicted": [], "where": s.where, "worker": os.getpid(), **info}
    t0 = time.perf_counter()
    try:
        run_id, replaced = start_attempt(case_dir / "attempt.json", opts, info)
        rec["replaced_runs"] = replaced
        res = run_case(s.paths, s.question or opts.get("question"), llm=opts.get("llm", "local"),
                       base_url=opts.get("base_url"), model=opts.get("model"), api_key=opts.get("api_key"),
                       trace_dir=out / "traces", db_url=opts.get("db_url"), max_steps=opts.get("max_steps", 6),
                       max_wall_s=opts.get("max_wall_s", 300.0), modality=s.modality or opts.get("modality"),
                       body_part=s.body_part, clinical_context=s.clinical_context, script=opts.get("script"),
                       run_id=run_id)
        report = res.report or {}
        write_atomic(case_dir / "report.json", json.dumps(report, indent=2))
        write_atomic(case_dir / "report.md", to_markdown(report))
        rec.update(status="done", run_id=res.run_id, modality=report.get("study", {}).get("modality"),
                   outcome=report.get("recommendation", {}).get("outcome"), findings=len(report.get("findings", [])),
                   predicted=predicted_labels(report), report=f"cases/{s.case_id}/report.json",
                   answer_kind=(report.get("answer") or {}).get("kind"), answer=(report.get("answer") or {}).get("text"),
                   abstain_reason=(report.get("answer") or {}).get("reason"))
        if (opts.get("dicom") or opts.get("push")) and res.report:
            _export(res, s, opts, case_dir, out, rec)
    except (DxError, LLMUnavailable) as exc:
        rec["error"] = str(exc)
    except Exception as exc:  # a case never stops the batch
        rec["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["worker_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rec["finished_at"] = now()
    write_atomic(case_dir / "result.json", json.dumps(rec))
    return rec



def _export(res: Any, s: CaseSpec, opts: dict[str, Any], case_dir: Path, out: Path, rec: dict[str, Any]) -> None:
    """--dicom / --push for one batch case (agent/app/dicom_out.py); a push or build that fails fails the case, with
    its report and DICOM files kept."""
    from agent.app.dicom_out import ExportError, export_run
    from agent.imaging.dicomweb import DicomWebError, push_target
    from agent.store.trace import TraceStore

    try:
        target = push_target(opts["push"], s.paths) if opts.get("push") else None
        written = export_run(res, case_dir / "dicom" if opts.get("dicom") else None, target,
                             TraceStore(opts.get("db_url"), out / "traces"))
    except (DicomWebError, ExportError) as exc:
        rec.update(status="failed", error=str(exc))
        return
    rec.update(dicom=[o["kind"] for o in written.objects], dicom_skipped=written.skipped,
               pushed_to=written.pushed_to)
    if written.push_error:
        rec.update(status="failed", error=written.push_error)


def init_worker(threads: int, llm: str) -> None:
    """Per worker process: its share of the cores, and the planner model and tools loaded once."""
    os.environ["DXAGENT_THREADS"] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass
    from agent.engine.session import tools

    registry = tools()
    if llm in ("local", "tiny"):
        from langchain_core.messages import HumanMessage, SystemMessage

        from agent.engine.planner import Planner
        from agent.llm.backends import make_llm

        try:  # load the GGUF and prefill the (static) system prompt now, once per worker: llama.cpp reuses its KV
            chat, model_id, mode = make_llm(llm)
            system = Planner(chat, model_id, mode).system_prompt(list(registry.values()))
            chat.invoke([SystemMessage(system), HumanMessage("ok")], max_tokens=1)
        except Exception:  # the cases will report it, one line each
            pass



def prepare_stores(out: Path, db_url: str | None) -> None:
    """Create (or upgrade) the trace store and the checkpoint tables before the workers start, so that no two workers
    race to create them (on PostgreSQL they would also wait on each other's lock)."""
    from agent.engine.graph import checkpointer, close_checkpointer
    from agent.store.trace import TraceStore

    store = TraceStore(db_url, out / "traces")
    if not store.postgres:
        store.engine.dispose()
    saver = checkpointer(db_url, out / "traces")
    saver.setup()
    close_checkpointer(saver)



def run_local(specs: list[Any], opts: dict[str, Any], workers: int, finish: Callable[[dict], None],
               fn: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] = run_one) -> None:
    """Run `fn(asdict(spec), opts)` for every spec in `workers` spawned processes; `finish` gets each record (a
    worker that dies: its cases are retried once, then recorded as failed). `eval` passes its own `fn`."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    workers = max(1, min(workers, len(specs)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = list(specs)
    lost: Counter = Counter()  # cases in flight when a worker died: retried once, then recorded as failed
    ctx = mp.get_context("spawn")  # llama.cpp and torch do not survive fork
    while pending:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                   initargs=(threads, opts.get("llm", "local")))
        running: dict[Any, CaseSpec] = {}
        broken = False
        try:
            while (pending or running) and not broken:
                while pending and len(running) < workers * 2:  # a small queue keeps every worker busy
                    spec = pending.pop(0)
                    running[pool.submit(fn, asdict(spec), opts)] = spec
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    try:
                        rec = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as exc:  # pragma: no cover - run_one catches the case's own errors
                        rec = failed_record(running[fut], f"{type(exc).__name__}: {exc}")
                    finish(rec)
                    del running[fut]
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)
        if broken:  # a worker died (killed, out of memory, a crash in native code): which case did it is unknown
            for spec in running.values():
                retry_or_fail(spec, lost, pending, finish, "worker process")



def retry_or_fail(spec: CaseSpec, lost: Counter, pending: list[CaseSpec], finish: Callable[[dict], None],
                  who: str) -> None:
    """A case whose worker died: back to the front of the queue once; the second time, recorded as failed."""
    lost[spec.case_id] += 1
    if lost[spec.case_id] >= 2:
        finish(failed_record(spec, f"the {who} running this case died twice (killed, out of memory or a crash in native code)"))
    else:
        pending.insert(0, spec)



def failed_record(s: CaseSpec, error: str) -> dict[str, Any]:
    return {"case_id": s.case_id, "status": "failed", "error": " ".join(error.split())[:300], "where": s.where,
            "labels": s.labels, "seconds": 0.0, "finished_at": now()}
