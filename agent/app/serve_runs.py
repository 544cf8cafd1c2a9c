"""The run queue behind `dxagent serve` (agent/app/serve.py is the HTTP side).

A run asked for over the API becomes a `RunRecord`: one JSON file under `<trace dir>/serve/runs/`, written atomically,
so a server that is killed and started again finds every run it had accepted. `RunQueue` keeps those records, runs
them on `workers` threads with the same engine the CLI uses (`agent/engine/session.py`: `engine()` + `run_case`), in
the same trace store, and answers what the API asks: a run's status, its events after a sequence number, cancel,
resume.

Where the truth lives: once a run has started, its row in the trace store says its status (running, done, failed,
cancelled, interrupted); the record only adds what the store cannot know - that a run is still queued, or that it was
cancelled before it started. The record holds the input paths (uploads are content-addressed files under the trace
folder; a `path` run names a file under a served root) until the run is done, then drops them: they are needed only to
start or resume it (an upload's stay - content-addressed files that name nothing - and so does a PACS study's
reference: the reading room's DICOM SR/SEG reference their files and can be stored back to that PACS; the API never
returns a record's inputs).

Cancel: a queued run is dropped; a running one gets the chat's cancel event (`Runtime.cancel`, and
`llm_calls.cancellable` so an endpoint call under way is abandoned): the graph stops before its next node, a tool under
way finishes, and the run is sealed `cancelled` with the evidence so far (it can be resumed). Research use only.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.core.files import write_atomic

FINISHED = ("done", "failed", "cancelled", "interrupted")  # a run in one of these writes nothing more (until resumed)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ServeSettings:
    """What every run of one server shares (the `dxagent serve` options)."""

    trace_dir: Path
    db_url: str | None = None
    llm: str = "local"
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    llm_timeout_s: float = 120.0
    script: list[str] | None = None  # --llm scripted: the planner's replies, the same list for every run
    workers: int = 1
    max_steps: int = 6
    max_wall_s: float = 300.0


class RunRecord(BaseModel):
    """One run as the server accepted it (serve/runs/<id>.json)."""

    id: str
    created_at: str
    status: str = "queued"  # queued | running | done | failed | cancelled | interrupted (as this server last saw it)
    source: str = "upload"  # upload | path | dicomweb | resume (a run this server did not start)
    inputs: list[str] = []  # paths or dicomweb:// references; [] once a path run is done (uploads and PACS studies keep
    # theirs)
    n_inputs: int = 0
    question: str | None = None
    clinical_context: str = ""
    modality: str | None = None
    body_part: str | None = None
    max_steps: int = 6
    max_wall_s: float = 300.0
    min_probability: float | None = None
    route: bool = True
    resume: bool = False  # the next start continues the run from its checkpoint (engine's resume=)
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    batch: str | None = None  # the batch (POST /api/batches) this run is a row of


class RunQueue:
    """Accepted runs, the threads that run them (at most `workers` at once), and what the API reads about them."""

    def __init__(self, settings: ServeSettings):
        from agent.store.trace import TraceStore

        self.settings = settings
        self.dir = Path(settings.trace_dir) / "serve" / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace = TraceStore(settings.db_url, settings.trace_dir)
        self._lock = threading.Lock()
        self._records: dict[str, RunRecord] = {}
        self._pending: queue.Queue[str | None] = queue.Queue()
        self._cancels: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._recover()

    # -- records ---------------------------------------------------------------------------------------------------
    def _save(self, rec: RunRecord) -> None:
        write_atomic(self.dir / f"{rec.id}.json", rec.model_dump_json(indent=1))

    def _recover(self) -> None:
        """After a restart: runs left running by a dead process are interrupted (the trace store's mark_interrupted,
        never sealed); a run that died before its trace row was written starts again; queued runs are queued again,
        oldest first."""
        self.trace.mark_interrupted()
        for f in sorted(self.dir.glob("run-*.json")):
            try:
                rec = RunRecord.model_validate_json(f.read_text())
            except ValueError:  # a damaged record is left where it is and not served
                continue
            self._records[rec.id] = rec
        for rec in sorted(self._records.values(), key=lambda r: r.created_at):
            if rec.status == "running":
                row = self.trace.get_run(rec.id)
                if row is None:
                    rec.status = "queued"  # it never reached the trace store: nothing of it was recorded
                else:
                    rec.status = "interrupted" if row.status == "running" else row.status
                    rec.error = row.error
                self._save(rec)
            if rec.status == "queued":
                self._pending.put(rec.id)

    def submit(self, rec: RunRecord) -> RunRecord:
        with self._lock:
            self._records[rec.id] = rec
            self._save(rec)
        self._pending.put(rec.id)
        return rec

    def add(self, recs: list[RunRecord]) -> None:
        """Save runs without queueing them yet (a batch saves its own record in between; `enqueue` then queues them).
        A server killed before `enqueue` finds them queued on its next start."""
        with self._lock:
            for rec in recs:
                self._records[rec.id] = rec
                self._save(rec)

    def enqueue(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            self._pending.put(run_id)

    def requeue(self, run_id: str) -> bool:
        """Queue again, from its start, a run that ended (cancelled or failed) before it reached the trace store (it
        has no checkpoint to resume from). False when it did reach it, or its inputs are gone."""
        with self._lock:
            rec = self._records.get(run_id)
            if rec is None or rec.status not in ("cancelled", "failed") or not rec.inputs:
                return False
            if self.trace.get_run(run_id) is not None:
                return False
            rec.status, rec.resume, rec.error, rec.finished_at, rec.started_at = "queued", False, None, None, None
            self._save(rec)
        self._pending.put(run_id)
        return True

    def record(self, run_id: str) -> RunRecord | None:
        with self._lock:
            return self._records.get(run_id)

    def records(self) -> list[RunRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)

    def status(self, run_id: str) -> tuple[str | None, Any, RunRecord | None]:
        """(status, trace row or None, record or None); status None: no such run here or in the trace store."""
        rec = self.record(run_id)
        row = self.trace.get_run(run_id)
        if rec is not None and rec.status in ("queued", "running"):  # waiting here, or a worker of this server has it
            return rec.status, row, rec  # (a resumed run's row says interrupted until the engine takes it again)
        if row is None:
            return (rec.status if rec else None), None, rec
        status = "interrupted" if row.status == "running" and self.trace.process_ended(row) else row.status
        return status, row, rec

    # -- cancel and resume -----------------------------------------------------------------------------------------
    def cancel(self, run_id: str) -> str:
        """'cancelled' (a queued run, dropped), 'cancelling' (a running run stops before its next step), or the
        status of a run that is not queued or running (nothing is done)."""
        with self._lock:
            rec = self._records.get(run_id)
            if rec is not None and rec.status == "queued":
                rec.status, rec.finished_at, rec.error = "cancelled", now(), "cancelled before it started"
                self._save(rec)
                return "cancelled"
            event = self._cancels.get(run_id)
            if event is not None:
                event.set()
                return "cancelling"
        return self.status(run_id)[0] or "unknown"

    def resume(self, run_id: str) -> RunRecord:
        """Queue an interrupted, cancelled or failed run to continue from its checkpoint (the engine's resume=)."""
        status, row, rec = self.status(run_id)
        if status not in ("interrupted", "cancelled", "failed") or row is None:
            raise ValueError(f"run {run_id} is {status or 'unknown'}: only an interrupted, cancelled or failed run "
                             "that reached the trace store can be resumed")
        with self._lock:
            if rec is None:  # a run made by the CLI, in the same store
                rec = RunRecord(id=run_id, created_at=row.created_at, source="resume", question=row.question)
            rec.status, rec.resume, rec.error, rec.finished_at = "queued", True, None, None
            self._records[run_id] = rec
            self._save(rec)
        self._pending.put(run_id)
        return rec

    # -- workers ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._work, name=f"dxagent-serve-worker-{i + 1}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, wait_s: float = 0.0) -> None:
        """No new run starts. Runs under way are not cancelled (nobody asked for that): a server that exits before
        they end leaves them running in the store, and the next start reports them interrupted (resumable)."""
        for _ in self._threads:
            self._pending.put(None)
        for t in self._threads:
            t.join(timeout=wait_s)

    def _work(self) -> None:
        while True:
            run_id = self._pending.get()
            if run_id is None:
                return
            with self._lock:
                rec = self._records.get(run_id)
                if rec is None or rec.status != "queued":  # cancelled while it waited
                    continue
                rec.status, rec.started_at, rec.finished_at = "running", now(), None
                self._save(rec)
                cancel = self._cancels[run_id] = threading.Event()
            try:
                status, error = self._execute(rec, cancel)
            except BaseException as exc:  # never lose the thread: the run is failed and the next one starts
                status, error = "failed", one_line(f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._cancels.pop(run_id, None)
                rec.status, rec.error, rec.finished_at = status, error, now()
                if status == "done" and rec.source not in ("upload", "dicomweb"):
                    rec.inputs = []  # no longer needed; a path may name the patient's folder (kept: an upload's, a
                    # sha256 under the trace folder, and a PACS study's reference - the reading room's DICOM SR/SEG
                    # reference their files, and go back to that PACS)
                self._save(rec)

    def _execute(self, rec: RunRecord, cancel: threading.Event) -> tuple[str, str | None]:
        return execute(self.settings, self.trace, rec, cancel)

    # -- events ----------------------------------------------------------------------------------------------------
    def count_events(self, run_id: str) -> int:
        from sqlalchemy import func
        from sqlmodel import Session, select

        from agent.store.trace import Event

        with Session(self.trace.engine) as db:
            return int(db.exec(select(func.count()).select_from(Event).where(Event.run_id == run_id)).one())

    def events_after(self, run_id: str, after: int, limit: int = 500) -> list[Any]:
        return events_after(self.trace, run_id, after, limit)


def events_after(trace: Any, run_id: str, after: int, limit: int = 500) -> list[Any]:
    """The run's trace events with a sequence number above `after`, in order (what the event stream and the MCP
    server's progress notifications poll)."""
    from sqlmodel import Session, select

    from agent.store.trace import Event

    with Session(trace.engine) as db:
        q = select(Event).where(Event.run_id == run_id, Event.seq > after).order_by(Event.seq).limit(limit)
        return list(db.exec(q))


def last_seq(trace: Any, run_id: str) -> int:
    """The sequence number of the run's latest trace event (-1: none yet)."""
    from sqlalchemy import func
    from sqlmodel import Session, select

    from agent.store.trace import Event

    with Session(trace.engine) as db:
        n = db.exec(select(func.max(Event.seq)).where(Event.run_id == run_id)).one()
    return -1 if n is None else int(n)


def execute(settings: ServeSettings, trace: Any, rec: RunRecord, cancel: threading.Event) -> tuple[str, str | None]:
    """One run (or its resumption) through run_case, in the trace store: (final status, one-line error). The queue's
    workers run it, and `dxagent mcp` (agent/app/mcp_server.py) without a queue."""
    from agent.engine import calibration
    from agent.engine.graph import TurnCancelled, redact_paths
    from agent.engine.llm_calls import CallCancelled, cancellable
    from agent.engine.session import engine, error_message, run_case

    s = settings
    eng = None
    try:
        eng = engine(llm=s.llm, base_url=s.base_url, model=s.model, api_key=s.api_key, llm_timeout_s=s.llm_timeout_s,
                     script=list(s.script) if s.script is not None else None, trace_dir=s.trace_dir, db_url=s.db_url)
        eng.rt.cancel = cancel
        with cancellable(cancel), calibration.threshold(rec.min_probability):
            run_case(rec.inputs or None, rec.question, eng=eng, run_id=rec.id, resume=rec.id if rec.resume else None,
                     max_steps=rec.max_steps, max_wall_s=rec.max_wall_s, modality=rec.modality,
                     body_part=rec.body_part, clinical_context=rec.clinical_context, route=rec.route)
        return "done", None
    except (TurnCancelled, CallCancelled):
        eng.rt.now = time.time()
        eng.rt.record("note", "serve", "cancelled", {"reason": "cancelled over the API"})
        eng.trace.finish_run(rec.id, "cancelled")  # sealed with the evidence so far; resumable
        return "cancelled", None
    except Exception as exc:
        row = trace.get_run(rec.id)
        if row is not None and row.error:  # the engine recorded it, paths already replaced by "input N"
            return "failed", one_line(row.error)
        return "failed", one_line(redact_paths(error_message(exc), rec.inputs))  # failed before its trace row
    finally:
        if eng is not None:
            _close(eng)


def _close(eng: Any) -> None:
    """Close what one run's engine opened (its checkpoint connection, its database pool): a server makes many."""
    from agent.engine.graph import close_checkpointer

    try:
        close_checkpointer(eng.graph.checkpointer)
    except Exception:
        pass
    try:
        if not eng.trace.postgres:  # a PostgreSQL pool is the process's, shared by its runs
            eng.trace.engine.dispose()
    except Exception:
        pass


# -- what the event stream says about each trace event ---------------------------------------------------------------
def _brief(obj: Any, limit: int = 160) -> str:
    return one_line(obj if isinstance(obj, str) else json.dumps(obj, default=str, ensure_ascii=False), limit)


def event_view(ev: Any) -> dict[str, Any]:
    """One trace event as the stream sends it: its sequence number, kind, node and name, a one-line summary, and for
    the steps a client draws (a decision, a tool call, a critique, the answer, the report) their typed fields. Full
    LLM prompts stay in the trace (`dxagent trace show`); nothing here is more than the report and trace hold."""
    p = json.loads(ev.payload)
    out: dict[str, Any] = {"seq": ev.seq, "kind": ev.kind, "node": ev.node, "name": ev.name, "t": ev.t}
    if ev.kind == "node" and ev.name == "intake":
        views = [{"id": v.get("id"), "modality": v.get("modality"), "shape": v.get("shape")} for v in p.get("views") or []]
        q = p.get("question") or {}
        out.update(views=views, applicable=p.get("applicable") or [], question={"kind": q.get("kind"),
                                                                                "subject": q.get("subject")})
        out["summary"] = (", ".join(f"{v['id']} {v['modality']} {'x'.join(map(str, v['shape'] or []))}" for v in views)
                          + f"; {len(out['applicable'])} tools apply; question: {q.get('kind')} about {q.get('subject')}")
    elif ev.kind == "node" and ev.name == "question":
        out["summary"] = "question read: " + _brief({k: p.get(k) for k in ("kind", "subject") if k in p})
    elif ev.name == "decision" and "decision" in p:
        d = p.get("decision") or {}
        out["decision"] = d
        if ev.kind == "llm":
            out.update(latency_s=p.get("latency_s"), rejected=p.get("rejected"))
            out["summary"] = (f"planner replied in {p.get('latency_s') or 0:.2f} s: "
                              + (f"{d.get('tool') or d.get('action')}" if d else f"rejected ({p.get('rejected')})"))
        else:
            what = d.get("tool") if d.get("action") == "call" else d.get("action")
            out["summary"] = f"{what} {_brief(d.get('args') or {}, 80)} - {_brief(d.get('reason') or '', 120)}"
    elif ev.kind == "tool":
        e = p.get("evidence") or {}
        out["evidence"] = {k: e.get(k) for k in ("id", "tool", "args", "status", "error", "duration_s")}
        result = e.get("error") if e.get("status") != "ok" else e.get("output")
        out["summary"] = f"{e.get('id')} {e.get('tool')}({_brief(e.get('args') or {}, 80)}) {e.get('status')}: " \
                         f"{_brief(result, 160)}"
    elif ev.name == "critique":
        out.update(route=p.get("route"), answered=p.get("answered"))
        out["summary"] = f"route {p.get('route')}: {_brief(p.get('why') or '', 160)}"
    elif ev.name == "answer" and "answer" in p:
        out["answer"] = p["answer"]
        out["summary"] = _brief((p["answer"] or {}).get("text") or p["answer"], 200)
    elif ev.name == "report" and "report" in p:
        r = p["report"] or {}
        out.update(outcome=(r.get("recommendation") or {}).get("outcome"), findings=len(r.get("findings") or []))
        out["summary"] = f"report: {out['outcome']}, {out['findings']} finding(s)"
    elif ev.kind == "llm":
        out["summary"] = f"planner call: {_brief(p.get('error') or p.get('rejected') or '', 160)}"
    else:
        out["summary"] = _brief(p.get("error") or p.get("reason") or {k: v for k, v in p.items() if k != "now"}, 160)
    return out
