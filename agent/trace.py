"""Trace store (sqlmodel): a run row, a hash-chained event per node step / LLM call / tool call,
and an artifact row per file. A SQLite file by default; any SQLAlchemy database URL works.

Enough is recorded to replay a run without any model: every LLM request and response (messages,
parameters, model id, token counts, latency, candidate scores) and every tool input and output.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlmodel import Field, Session, SQLModel, create_engine, select

from agent.state import ArtifactRef

GENESIS = "0" * 64


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Run(SQLModel, table=True):
    id: str = Field(primary_key=True)
    case_id: str = Field(index=True)
    created_at: str
    finished_at: str | None = None
    status: str = "running"  # running | done | failed
    question: str = ""
    llm: str = ""  # model id
    planner_mode: str = ""
    inputs_sha256: str = ""  # sha256 of the input files, never their paths
    versions: str = "{}"  # JSON
    report: str | None = None  # JSON
    error: str | None = None


class Event(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True, foreign_key="run.id")
    seq: int
    kind: str  # node | llm | tool | note
    node: str
    name: str
    payload: str  # canonical JSON
    payload_sha256: str
    prev_hash: str
    hash: str
    t: float


class Artifact(SQLModel, table=True):
    sha256: str = Field(primary_key=True)
    kind: str
    media_type: str
    path: str  # relative to the artifact root
    bytes: int


def event_hash(prev_hash: str, run_id: str, seq: int, kind: str, node: str, name: str, payload_sha256: str) -> str:
    return sha256_text(canonical([prev_hash, run_id, seq, kind, node, name, payload_sha256]))


class TraceStore:
    """Writes one run's events; each event's hash chains the previous one."""

    def __init__(self, url: str | None = None, root: str | Path = "traces"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = url or f"sqlite:///{self.root / 'dxagent.sqlite'}"
        self.engine = create_engine(self.url)
        if self.url.startswith("sqlite"):
            @sa_event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _):  # concurrent readers while a run writes
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA busy_timeout=30000")
        SQLModel.metadata.create_all(self.engine)
        self._lock = threading.Lock()

    # -- runs -------------------------------------------------------------------------------
    def start_run(self, run_id: str, case_id: str, question: str, llm: str, planner_mode: str,
                  inputs_sha256: str, versions: dict[str, Any]) -> None:
        with Session(self.engine) as s:
            if s.get(Run, run_id) is not None:
                return  # resuming: keep the original row
            s.add(Run(id=run_id, case_id=case_id, created_at=datetime.now(UTC).isoformat(), question=question,
                      llm=llm, planner_mode=planner_mode, inputs_sha256=inputs_sha256,
                      versions=canonical(versions)))
            s.commit()

    def finish_run(self, run_id: str, status: str, report: dict | None = None, error: str | None = None) -> None:
        with Session(self.engine) as s:
            run = s.get(Run, run_id)
            if run is None:
                return
            run.status, run.error = status, error
            run.finished_at = datetime.now(UTC).isoformat()
            if report is not None:
                run.report = canonical(report)
            s.add(run)
            s.commit()

    def get_run(self, run_id: str) -> Run | None:
        with Session(self.engine) as s:
            return s.get(Run, run_id)

    def runs(self, limit: int = 50) -> list[Run]:
        with Session(self.engine) as s:
            return list(s.exec(select(Run).order_by(Run.created_at.desc()).limit(limit)))

    # -- events -----------------------------------------------------------------------------
    def record(self, run_id: str, kind: str, node: str, name: str, payload: dict[str, Any]) -> Event:
        body = canonical(payload)
        psha = sha256_text(body)
        with self._lock, Session(self.engine) as s:
            last = s.exec(select(Event).where(Event.run_id == run_id).order_by(Event.seq.desc()).limit(1)).first()
            seq = 0 if last is None else last.seq + 1
            prev = GENESIS if last is None else last.hash
            ev = Event(run_id=run_id, seq=seq, kind=kind, node=node, name=name, payload=body, payload_sha256=psha,
                       prev_hash=prev, hash=event_hash(prev, run_id, seq, kind, node, name, psha), t=time.time())
            s.add(ev)
            s.commit()
            s.refresh(ev)
            return ev

    def events(self, run_id: str, kind: str | None = None) -> list[Event]:
        with Session(self.engine) as s:
            q = select(Event).where(Event.run_id == run_id)
            if kind:
                q = q.where(Event.kind == kind)
            return list(s.exec(q.order_by(Event.seq)))

    def add_artifact(self, ref: ArtifactRef, nbytes: int) -> None:
        with self._lock, Session(self.engine) as s:
            if s.get(Artifact, ref.sha256) is None:
                s.add(Artifact(sha256=ref.sha256, kind=ref.kind, media_type=ref.media_type, path=ref.path,
                               bytes=nbytes))
                s.commit()

    def verify_chain(self, run_id: str) -> str | None:
        """None if the event chain is intact, else the first broken event."""
        prev = GENESIS
        for i, ev in enumerate(self.events(run_id)):
            if ev.seq != i:
                return f"event seq {ev.seq} where {i} was expected (inserted or deleted event)"
            if sha256_text(ev.payload) != ev.payload_sha256:
                return f"event {ev.seq} ({ev.kind} {ev.name}): payload edited"
            if ev.prev_hash != prev or ev.hash != event_hash(prev, run_id, ev.seq, ev.kind, ev.node, ev.name,
                                                              ev.payload_sha256):
                return f"event {ev.seq} ({ev.kind} {ev.name}): hash chain broken"
            prev = ev.hash
        return None
