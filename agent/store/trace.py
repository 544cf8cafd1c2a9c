"""Trace store (sqlmodel): a run row, a hash-chained event per node step / LLM call / tool call,
and an artifact row per file. A SQLite file by default, or PostgreSQL (`--db-url postgresql://...`, psycopg 3; the
`postgres` extra), shared by many writers on many machines.

The schema is versioned (SCHEMA_VERSION, a row in `dxagent_schema`, upgraded by the steps in `_UPGRADES` when a store
is opened, under a lock: an advisory lock on PostgreSQL, the write lock on SQLite); `dxagent trace upgrade` does the
same explicitly. Concurrency is the database's: an event's sequence number is taken under a lock on its run's row,
an artifact row is inserted with ON CONFLICT DO NOTHING, a seal is written in one transaction with the status. A
database that cannot be reached is a one-line `StoreUnavailable` (never a hang: connect and pool timeouts).

Enough is recorded to replay a run without any model: every LLM request and response (messages,
parameters, model id, token counts, latency, candidate scores) and every tool input and output.

No one text in an event is stored past DXAGENT_MAX_STORED_REPLY_BYTES (256 KiB; `stored_json`): a longer one keeps
its head and a note of its full size and sha256. An endpoint's reply is refused past the same cap while it is read
(agent/llm/replies.py), so a reply is stored whole, once, in its call's event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import UniqueConstraint, inspect, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlmodel import Field, Session, SQLModel, create_engine, select

from agent.core.errors import SettingError, UserError
from agent.core.files import sha256_text, stored_text_cap
from agent.core.state import ArtifactRef

GENESIS = "0" * 64
CHAIN_VERSION = 2  # 2: an event's hash also covers its timestamp; rows written before have chain NULL (= 1)
KEY_ENV = "DXAGENT_TRACE_KEY"  # set it to seal runs with HMAC-SHA256 instead of plain SHA-256


def canonical(obj: Any) -> str:
    """The stored form of a payload: compact JSON that keeps key order. Order is part of what happened (a tool's
    dict of classes is reported in its order), so replay must see it as the run did; json.loads keeps it, so
    re-serialising a parsed payload gives back the same text and hash."""
    return json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False)


def bounded_text(text: str, cap: int) -> str:
    """`text` if its UTF-8 is at most `cap` bytes, else its head (cut on a character) and a note of what was cut, the
    two together at most `cap` bytes (so bounding again changes nothing)."""
    raw = text.encode()
    if len(raw) <= cap:
        return text
    note = f" …[truncated: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}]"
    return raw[: max(0, cap - len(note.encode()))].decode("utf-8", "ignore") + note


def _bounded(obj: Any, cap: int) -> Any:
    if isinstance(obj, str):
        return bounded_text(obj, cap)
    if isinstance(obj, dict):
        return {k: _bounded(v, cap) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_bounded(v, cap) for v in obj]
    return obj


def stored_json(payload: Any, cap: int | None = None) -> str:
    """The stored form of an event's payload: `canonical`, with every text in it over `cap` bytes (default
    DXAGENT_MAX_STORED_REPLY_BYTES) bounded by `bounded_text`. A replay compares what it recomputes in this form."""
    cap = stored_text_cap() if cap is None else cap
    body = canonical(payload)
    if len(body) <= cap // 4 or len(body.encode()) <= cap:  # no text in it can be longer than the whole
        return body
    return canonical(_bounded(json.loads(body), cap))


class Run(SQLModel, table=True):
    id: str = Field(primary_key=True)
    case_id: str = Field(index=True)
    created_at: str
    finished_at: str | None = None
    status: str = "running"  # running | done | failed | cancelled | idle (chat) | interrupted (its process died)
    question: str = ""
    llm: str = ""  # model id
    planner_mode: str = ""
    inputs_sha256: str = ""  # sha256 of the input files, never their paths
    versions: str = "{}"  # JSON
    report: str | None = None  # JSON
    error: str | None = None
    settings: str = "{}"  # JSON: what --rerun needs (budget, hints, llm kind); never the input paths
    # the seal, written when the run finishes: the chain head and length, and a digest over the whole row, so a
    # deleted last event, an appended event or an edited report is caught (with DXAGENT_TRACE_KEY: an HMAC)
    chain: int | None = None
    n_events: int | None = None
    head_hash: str | None = None
    seal_alg: str | None = None
    seal: str | None = None
    owner: str | None = None  # "host:pid" of the process writing the run while it runs (not sealed)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class Event(SQLModel, table=True):
    # one event per (run, seq): a second writer of a run fails loudly instead of interleaving duplicate numbers
    __table_args__ = (UniqueConstraint("run_id", "seq", name="ux_event_run_seq"),)
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


class RunBusy(RuntimeError):
    """The run has a live writer (or just got one): a run is written by one process at a time."""


def event_hash(prev_hash: str, run_id: str, seq: int, kind: str, node: str, name: str, payload_sha256: str,
               t: float | None = None) -> str:
    fields: list[Any] = [prev_hash, run_id, seq, kind, node, name, payload_sha256]
    return sha256_text(canonical(fields if t is None else fields + [repr(float(t))]))


SEALED_FIELDS = ("id", "case_id", "created_at", "finished_at", "status", "question", "llm", "planner_mode",
                 "inputs_sha256", "versions", "report", "error", "settings", "chain", "n_events", "head_hash")


def seal_of(run: dict[str, Any], alg: str, key: str | None = None) -> str:
    """The digest over a run row's fields (SEALED_FIELDS); alg is "sha256" or "hmac-sha256" (needs the key)."""
    body = canonical([run.get(f) for f in SEALED_FIELDS]).encode()
    if alg == "hmac-sha256":
        if not key:
            raise KeyError(f"this run is sealed with a key: set {KEY_ENV} to check its seal")
        return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


class StoreUnavailable(UserError, RuntimeError):
    """The trace database cannot be reached, or stopped answering (refused, closed, timed out, locked): one line says
    which database and why. A run that meets it fails; what it had recorded stays unsealed, so `trace verify` calls it
    incomplete and --resume continues it."""


class SchemaError(UserError, RuntimeError):
    """The store's schema is not one this dxagent can use as it is: one line says what to run."""


SCHEMA_VERSION = 1  # the row in dxagent_schema; a store without it was made before versioning (= 0)
_UPGRADE_LOCK = 0x6478_6167  # "dxag": the PostgreSQL advisory lock held while a store's schema is created or upgraded
POOL_ENV = "DXAGENT_DB_POOL"  # connections a process keeps open to a PostgreSQL store (and as many more under load)
POOL_DEFAULT = 2
CONNECT_TIMEOUT_S = 10  # a server that does not answer a connection in this long is unavailable
POOL_TIMEOUT_S = 30  # the longest a writer waits for a free pooled connection


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for a --db-url: `postgresql://` and `postgres://` mean psycopg 3 (`postgresql+psycopg://`)."""
    try:
        u = make_url(url)
    except Exception:
        raise SettingError(f"--db-url {url!r} is not a database URL (sqlite:///PATH or "
                           "postgresql://USER@HOST:PORT/DATABASE)") from None
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The same PostgreSQL database as a libpq connection URI (psycopg's own connections: the checkpointer's)."""
    return make_url(engine_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    """A store's URL as messages show it: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def pool_size() -> int:
    raw = os.environ.get(POOL_ENV, "").strip()
    if not raw:
        return POOL_DEFAULT
    if not raw.isdigit() or int(raw) < 1:
        raise SettingError(f"{POOL_ENV}={raw!r}: a number of connections (1 or more) is expected")
    return int(raw)


def unavailable(exc: BaseException, url: str) -> StoreUnavailable | None:
    """The one-line StoreUnavailable for an error that means the database cannot be used now (gone, refused, closed,
    timed out, locked) - from SQLAlchemy, psycopg (the checkpointer) or sqlite3 - else None."""
    import sqlite3

    from sqlalchemy.exc import TimeoutError as PoolTimeout

    kinds: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, PoolTimeout, sqlite3.OperationalError)
    try:
        import psycopg
        import psycopg_pool

        kinds += (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)
    except ImportError:
        pass
    if isinstance(exc, StoreUnavailable):
        return exc
    if not isinstance(exc, kinds):
        return None
    orig = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else None
    lines = [x.strip() for x in str(orig if orig is not None else exc).splitlines() if x.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if reason.startswith("(") and ") " in reason:  # SQLAlchemy's "(psycopg.OperationalError) ..." prefix
        reason = reason.split(") ", 1)[1]
    return StoreUnavailable(f"the trace database {shown_url(url)} is unavailable: {reason[:240]}")


F = TypeVar("F", bound=Callable[..., Any])


def _db(fn: F) -> F:
    """A store method whose database errors that mean "unavailable" become one-line StoreUnavailable."""
    @wraps(fn)
    def inner(self: TraceStore, *a: Any, **kw: Any) -> Any:
        try:
            return fn(self, *a, **kw)
        except Exception as exc:
            err = unavailable(exc, self.url)
            if err is None or err is exc:
                raise
            raise err from None
    return inner  # type: ignore[return-value]


_ENGINES: dict[tuple[int, str], Engine] = {}  # (pid, url) -> the process's one pool per PostgreSQL store
_ENGINES_LOCK = threading.Lock()  # guards the dict only; the data's concurrency is the database's


def _pg_engine(url: str) -> Engine:
    """The process's engine (pool) for a PostgreSQL store: POOL_ENV connections kept, as many more under load,
    checked before use (a restarted server's dead connections are replaced), bounded waits everywhere."""
    key = (os.getpid(), url)
    with _ENGINES_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            given = make_url(url).query
            args = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "dxagent",
                    # a peer that vanishes without closing (a node lost) is noticed in about a minute
                    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                    "tcp_user_timeout": 60_000}
            n = pool_size()
            try:
                eng = create_engine(url, pool_size=n, max_overflow=n, pool_timeout=POOL_TIMEOUT_S, pool_pre_ping=True,
                                    pool_recycle=1800, connect_args={k: v for k, v in args.items() if k not in given})
            except ModuleNotFoundError as exc:
                raise SettingError(f"--db-url {shown_url(url)} needs the PostgreSQL driver ({exc.name} is not "
                                   "installed): pip install 'dxagent[postgres]'") from None
            _ENGINES[key] = eng
        return eng


def _schema_version(conn: Any) -> int | None:
    """The store's schema version: its dxagent_schema row, 0 for a store made before versioning, None for none."""
    insp = inspect(conn)
    if insp.has_table("dxagent_schema"):
        row = conn.execute(text("SELECT version FROM dxagent_schema WHERE id = 1")).first()
        if row is not None:
            return int(row[0])
    return 0 if insp.has_table("run") else None


def _upgrade_0_to_1(conn: Any) -> None:
    """A store made before the schema was versioned: the run columns added since (owner, seal, chain, ...), and one
    event per (run, seq) as a unique index (a store whose events already hold duplicate numbers keeps them: verify
    names the runs they broke)."""
    have = {c["name"] for c in inspect(conn).get_columns("run")}
    for col in Run.__table__.columns:
        if col.name not in have:
            conn.execute(text(f"ALTER TABLE run ADD COLUMN {col.name} {col.type.compile(conn.dialect)}"))
    index = text("CREATE UNIQUE INDEX IF NOT EXISTS ux_event_run_seq ON event (run_id, seq)")
    try:
        if conn.dialect.name == "postgresql":  # a failed statement ends a PostgreSQL transaction: a savepoint keeps it
            with conn.begin_nested():
                conn.execute(index)
        else:
            conn.execute(index)
    except IntegrityError:
        pass


# version N's step: what turns a store of version N-1 into one of version N (one transaction, under the lock)
_UPGRADES: dict[int, Callable[[Any], None]] = {1: _upgrade_0_to_1}


def _not_newer(found: int | None, url: str) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaError(f"the trace store {shown_url(url)} has schema version {found}, newer than this dxagent's "
                          f"({SCHEMA_VERSION}): upgrade dxagent to use it")


def open_schema(engine: Engine, url: str) -> int | None:
    """Create or upgrade the store's schema to SCHEMA_VERSION; returns the version it had (None: a new store). Many
    processes may open one store at once: one of them does the work, under PostgreSQL's advisory lock or SQLite's
    write lock, and the others find it done."""
    with engine.connect() as conn:  # the usual case, without a lock: already current
        found = _schema_version(conn)
    if found == SCHEMA_VERSION:
        return found
    _not_newer(found, url)
    pg = engine.dialect.name == "postgresql"
    try:
        with engine.begin() as conn:
            if pg:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK})
            conn.execute(text("CREATE TABLE IF NOT EXISTS dxagent_schema (id INTEGER PRIMARY KEY, "
                              "version INTEGER NOT NULL, upgraded_at VARCHAR NOT NULL)"))
            if not pg:  # a write first: SQLite's write lock, held to the commit
                conn.execute(text("UPDATE dxagent_schema SET version = version"))
            found = _schema_version(conn)
            _not_newer(found, url)
            if found == SCHEMA_VERSION:
                return found
            SQLModel.metadata.create_all(conn, tables=[Run.__table__, Event.__table__, Artifact.__table__])
            for v in range(found + 1, SCHEMA_VERSION + 1) if found is not None else ():
                _UPGRADES[v](conn)
            conn.execute(text("DELETE FROM dxagent_schema"))
            conn.execute(text("INSERT INTO dxagent_schema (id, version, upgraded_at) VALUES (1, :v, :t)"),
                         {"v": SCHEMA_VERSION, "t": datetime.now(UTC).isoformat()})
            return found
    except SchemaError:
        raise
    except DBAPIError as exc:
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
        reason = " ".join(lines[0].split())[:200]
        err = unavailable(exc, url)
        if err is not None and not any(w in reason.lower() for w in ("permission", "readonly", "read-only")):
            raise err from None
        raise SchemaError(f"the trace store {shown_url(url)} needs its schema created or upgraded to version "
                          f"{SCHEMA_VERSION} and that failed ({reason}): run `dxagent trace upgrade --db-url URL` "
                          "as a database user that may create and alter its tables") from None


class TraceStore:
    """Writes one run's events; each event's hash chains the previous one. On PostgreSQL the process shares one
    pool per database (POOL_ENV); on SQLite each store has its own connections (WAL, 30 s busy timeout)."""

    def __init__(self, url: str | None = None, root: str | Path = "traces"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = engine_url(url) if url else f"sqlite:///{self.root / 'dxagent.sqlite'}"
        if self.url.startswith("sqlite"):
            self.engine = create_engine(self.url)

            @sa_event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _):  # concurrent readers while a run writes
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA busy_timeout=30000")
        else:
            self.engine = _pg_engine(self.url)
        try:
            self.schema_from = open_schema(self.engine, self.url)
        except Exception as exc:
            err = unavailable(exc, self.url)
            if err is None or err is exc:
                raise
            raise err from None
        self.text_cap = stored_text_cap()

    @property
    def shown_url(self) -> str:
        return shown_url(self.url)

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _lock_run(self, s: Session, run_id: str) -> None:
        """Take the run's row for this transaction (a no-op UPDATE: PostgreSQL's row lock, SQLite's write lock), so
        that event numbers and seals of one run are taken one writer at a time by the database, across processes and
        machines."""
        s.connection().execute(update(Run).where(Run.id == run_id).values(owner=Run.owner))

    def _insert_new(self, conn: Any, model: type[SQLModel], key: str, **values: Any) -> None:
        """INSERT ... ON CONFLICT (key) DO NOTHING: a row another process inserted first is the same row."""
        insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(self.engine.dialect.name)
        if insert is not None:
            conn.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=[key]))
            return
        try:  # another database: the same rule through its primary key
            with conn.begin_nested():
                conn.execute(model.__table__.insert().values(**values))
        except IntegrityError:
            pass

    # -- runs -------------------------------------------------------------------------------
    @_db
    def start_run(self, run_id: str, case_id: str, question: str, llm: str, planner_mode: str,
                  inputs_sha256: str, versions: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
        """The run's row, once: a run that has one (resuming) keeps it."""
        with self.engine.begin() as conn:
            self._insert_new(conn, Run, "id", id=run_id, case_id=case_id, created_at=datetime.now(UTC).isoformat(),
                             status="running", question=question, llm=llm, planner_mode=planner_mode,
                             inputs_sha256=inputs_sha256, versions=canonical(versions),
                             settings=canonical(settings or {}), chain=CHAIN_VERSION, owner=_owner())

    @_db
    def finish_run(self, run_id: str, status: str, report: dict | None = None, error: str | None = None) -> None:
        """Mark the run finished and seal it: chain length and head, then a digest over the row - one transaction,
        so a run is either still running (unsealed) or finished and sealed, never half of it."""
        with Session(self.engine) as s:
            self._lock_run(s, run_id)
            run = s.get(Run, run_id)
            if run is None:
                return
            run.status, run.error = status, None if error is None else bounded_text(error, self.text_cap)
            run.finished_at = datetime.now(UTC).isoformat()
            if report is not None:
                run.report = stored_json(report, self.text_cap)  # as its report event stores it
            self._seal(s, run)

    @_db
    def reopen(self, run_id: str) -> None:
        """Take the run as its one writer (a resumed run, a chat thread's next turn): running and unsealed until it
        finishes. The lease is the row's `owner` (host:pid), taken with a compare-and-set on the owner it had, so of
        two processes resuming one run at once exactly one gets it; the other - and anyone while a live process of
        this host, or any process of another host, holds a running run - gets RunBusy (one line)."""
        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r} in {shown_url(self.url)}")
        me = _owner()
        if run.status == "running" and run.owner != me and not self.process_ended(run):
            host, _, pid = (run.owner or "").rpartition(":")
            raise RunBusy(f"run {run_id} is being written by process {pid} on this host: wait for it to end"
                          if host == socket.gethostname() else
                          f"run {run_id} is running on {host or 'another host'} (its owner): resume it there, or "
                          "after that process has ended")
        with self.engine.begin() as conn:
            same_owner = Run.owner.is_(None) if run.owner is None else Run.owner == run.owner
            taken = conn.execute(update(Run).where(Run.id == run_id, same_owner, Run.status == run.status)
                                 .values(status="running", owner=me, n_events=None, head_hash=None, seal_alg=None,
                                         seal=None)).rowcount
        if taken != 1:
            raise RunBusy(f"run {run_id} was taken by another process just now: it has one writer at a time")

    def process_ended(self, run: Run) -> bool:
        """A "running" run whose writer was a process of this host that no longer exists (killed, crashed)."""
        host, _, pid = (run.owner or "").rpartition(":")
        return run.status == "running" and host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))

    @_db
    def mark_interrupted(self) -> list[str]:
        """Runs left "running" by a process of this host that no longer exists become "interrupted" - status and
        reason only, never a seal: what is left was not recorded by this process, and a seal over it would vouch
        for a record that may have lost its end (`trace verify` calls such a run incomplete until a --resume
        finishes and seals it). The engine does this when it opens a store; reading commands write nothing.
        Returns the ids it changed; runs of other hosts or of live processes are left."""
        with Session(self.engine) as s:
            stale = [(r.id, r.owner) for r in s.exec(select(Run).where(Run.status == "running"))
                     if self.process_ended(r)]
        done = []
        for run_id, owner in stale:
            with self.engine.begin() as conn:
                if conn.execute(update(Run).where(Run.id == run_id, Run.owner == owner, Run.status == "running")
                                .values(status="interrupted", finished_at=datetime.now(UTC).isoformat(),
                                        error="the process running it ended before it finished (killed or "
                                              "crashed); resume it with --resume")).rowcount == 1:
                    done.append(run_id)
        return done

    @_db
    def abandon(self, run_id: str, reason: str) -> bool:
        """A run left "running" by a worker that is gone (a lost cluster node, whose processes this host cannot see)
        becomes "interrupted" with `reason` - status and reason only, never a seal, as mark_interrupted does. Only a
        run still running under the owner it had is changed; returns whether this call changed it."""
        run = self.get_run(run_id)
        if run is None or run.status != "running":
            return False
        with self.engine.begin() as conn:
            same_owner = Run.owner.is_(None) if run.owner is None else Run.owner == run.owner
            return conn.execute(update(Run).where(Run.id == run_id, same_owner, Run.status == "running")
                                .values(status="interrupted", finished_at=datetime.now(UTC).isoformat(),
                                        error=bounded_text(reason, self.text_cap))).rowcount == 1

    @_db
    def reseal(self, run_id: str) -> None:
        """Seal again after events were added to a finished run, keeping its status."""
        with Session(self.engine) as s:
            self._lock_run(s, run_id)
            run = s.get(Run, run_id)
            if run is not None and run.status != "running":
                self._seal(s, run)

    def _seal(self, s: Session, run: Run) -> None:
        last = s.exec(select(Event).where(Event.run_id == run.id).order_by(Event.seq.desc()).limit(1)).first()
        run.n_events = 0 if last is None else last.seq + 1
        run.head_hash = GENESIS if last is None else last.hash
        key = os.environ.get(KEY_ENV) or None
        run.seal_alg = "hmac-sha256" if key else "sha256"
        run.seal = seal_of(run.model_dump(), run.seal_alg, key)
        s.add(run)
        s.commit()

    @_db
    def get_run(self, run_id: str) -> Run | None:
        with Session(self.engine) as s:
            return s.get(Run, run_id)

    @_db
    def runs(self, limit: int = 50, status: str | None = None) -> list[Run]:
        with Session(self.engine) as s:
            q = select(Run) if status is None else select(Run).where(Run.status == status)
            return list(s.exec(q.order_by(Run.created_at.desc()).limit(limit)))

    # -- events -----------------------------------------------------------------------------
    @_db
    def record(self, run_id: str, kind: str, node: str, name: str, payload: dict[str, Any]) -> Event:
        body = stored_json(payload, self.text_cap)
        psha = sha256_text(body)
        with Session(self.engine) as s:
            self._lock_run(s, run_id)  # the next number is this writer's until it commits
            last = s.exec(select(Event).where(Event.run_id == run_id).order_by(Event.seq.desc()).limit(1)).first()
            seq = 0 if last is None else last.seq + 1
            prev = GENESIS if last is None else last.hash
            t = time.time()
            ev = Event(run_id=run_id, seq=seq, kind=kind, node=node, name=name, payload=body, payload_sha256=psha,
                       prev_hash=prev, hash=event_hash(prev, run_id, seq, kind, node, name, psha, t), t=t)
            s.add(ev)
            s.commit()
            s.refresh(ev)
            return ev

    def note_export(self, run_id: str, payload: dict[str, Any]) -> None:
        """Record the DICOM objects written for a finished run (an `export` event: their SOP instance UIDs, files
        and where they were stored) and seal the run again."""
        self.record(run_id, "export", "export", "dicom", payload)
        self.reseal(run_id)

    @_db
    def find_uid(self, uid: str) -> list[tuple[str, dict[str, Any]]]:
        """(run id, object) for each recorded DICOM object whose SOP instance or series UID is `uid`."""
        found = []
        with Session(self.engine) as s:
            for ev in s.exec(select(Event).where(Event.kind == "export")):
                for obj in json.loads(ev.payload).get("objects", []):
                    if uid in (obj.get("sop_instance_uid"), obj.get("series_instance_uid")):
                        found.append((ev.run_id, obj))
        return found

    @_db
    def events(self, run_id: str, kind: str | None = None) -> list[Event]:
        with Session(self.engine) as s:
            q = select(Event).where(Event.run_id == run_id)
            if kind:
                q = q.where(Event.kind == kind)
            return list(s.exec(q.order_by(Event.seq)))

    @_db
    def add_artifact(self, ref: ArtifactRef, nbytes: int) -> None:
        """One row per artifact (content-addressed). Writers on many processes and machines share the database: the
        insert is ON CONFLICT DO NOTHING, so of two that add the same sha256 at once one row stays and neither fails."""
        with self.engine.begin() as conn:
            self._insert_new(conn, Artifact, "sha256", sha256=ref.sha256, kind=ref.kind, media_type=ref.media_type,
                             path=ref.path, bytes=nbytes)

    @_db
    def artifacts(self, shas: list[str]) -> dict[str, Artifact]:
        with Session(self.engine) as s:
            return {a.sha256: a for a in s.exec(select(Artifact).where(Artifact.sha256.in_(shas)))}

    @_db
    def dump(self, run_id: str) -> dict[str, Any]:
        """One run as a self-describing dict (the `trace export` JSON): the run row, every event with its hashes
        and parsed payload, and the artifact rows the events refer to."""
        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r} in {shown_url(self.url)}")
        events = [{"seq": e.seq, "kind": e.kind, "node": e.node, "name": e.name, "t": e.t,
                   "payload_sha256": e.payload_sha256, "prev_hash": e.prev_hash, "hash": e.hash,
                   "payload": json.loads(e.payload)} for e in self.events(run_id)]
        refs = artifact_refs(events)
        rows = self.artifacts(sorted(refs))
        arts = [rows[s].model_dump() if s in rows else {**refs[s], "missing_row": True} for s in sorted(refs)]
        return {"format": EXPORT_FORMAT, "run": run.model_dump(), "events": events, "artifacts": arts}

    def verify_chain(self, run_id: str) -> str | None:
        """None if the run's events and seal are intact, else the first problem (artifacts not checked)."""
        problems = verify_dump(self.dump(run_id), None)
        return problems[0] if problems else None


EXPORT_FORMAT = "dxagent-trace/1"


def artifact_refs(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every artifact a run's events refer to: view pixels (intake and derived views), evidence artifacts and the
    pictures sent to a vision-capable planner."""
    refs: dict[str, dict[str, Any]] = {}
    for e in events:
        p = e["payload"]
        views = list(p.get("views") or []) + list(p.get("new_views") or [])
        items = [v.get("pixels") for v in views if isinstance(v, dict)]
        items += list((p.get("evidence") or {}).get("artifacts") or []) if isinstance(p.get("evidence"), dict) else []
        request = p.get("request") if isinstance(p.get("request"), dict) else {}
        items += [i.get("ref") for i in request.get("images") or [] if isinstance(i, dict)]
        for a in items:
            if isinstance(a, dict) and a.get("sha256"):
                refs.setdefault(a["sha256"], {k: a.get(k) for k in ("sha256", "kind", "media_type", "path")})
    return refs


def write_export(dump: dict[str, Any], out_path: str | Path, artifact_root: str | Path | None = None) -> Path:
    """Write a run's dump as the export JSON; with `artifact_root`, copy its artifact files to artifacts/ beside
    it, so the file verifies (and renders) on its own."""
    import shutil

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if artifact_root is not None:
        for a in dump["artifacts"]:
            src, dest = Path(artifact_root) / a["path"], out_path.parent / "artifacts" / a["path"]
            if not src.is_file():
                raise FileNotFoundError(f"artifact {a['path']} is missing from {artifact_root}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
    out_path.write_text(json.dumps(dump, indent=1, ensure_ascii=False) + "\n")
    return out_path


def run_report(run: dict[str, Any]) -> dict[str, Any] | None:
    """A dumped run row's report (stored as JSON text), parsed."""
    raw = run.get("report")
    return json.loads(raw) if isinstance(raw, str) else raw


def load_dump(path: str | Path) -> dict[str, Any]:
    """A trace exported as JSON (`dxagent trace export`); refuses anything else with one line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable trace export ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a dxagent trace export (format {EXPORT_FORMAT!r} expected)")
    return data


def verify_dump(dump: dict[str, Any], artifact_root: str | Path | None) -> list[str]:
    """Every problem with one run's record, in order: an edited, inserted, reordered or deleted event (hash chain
    plus the seal's length and head), an edited run row (seal), and with `artifact_root` a missing or edited
    artifact file. An empty list means intact."""
    run = dump["run"]
    run_id = run["id"]
    v1 = run.get("chain") in (None, 1)
    problems: list[str] = []
    prev = GENESIS
    events = dump["events"]
    for i, ev in enumerate(events):
        where = f"event {ev.get('seq')} ({ev.get('kind')} {ev.get('name')})"
        if ev["seq"] != i:
            problems.append(f"event seq {ev['seq']} where {i} was expected (inserted, deleted or reordered event)")
            break
        if sha256_text(canonical(ev["payload"])) != ev["payload_sha256"]:
            problems.append(f"{where}: payload edited")
            break
        want = event_hash(prev, run_id, ev["seq"], ev["kind"], ev["node"], ev["name"], ev["payload_sha256"],
                          None if v1 else ev["t"])
        if ev["prev_hash"] != prev or ev["hash"] != want:
            problems.append(f"{where}: hash chain broken (edited or inserted event)")
            break
        prev = ev["hash"]
    key = os.environ.get(KEY_ENV) or None
    if run.get("seal") and key and run.get("seal_alg") != "hmac-sha256":
        problems.append(f"sealed with {run.get('seal_alg')!r}, which anyone can recompute, while {KEY_ENV} is set: "
                        "only keyed (hmac-sha256) seals are accepted")
    if run.get("seal"):
        if run.get("n_events") != len(events) or run.get("head_hash") != prev:
            problems.append(f"the run was sealed with {run.get('n_events')} events (head {str(run.get('head_hash'))[:12]}) "
                            f"but {len(events)} are recorded (head {prev[:12]}): events deleted or appended")
        try:
            if seal_of(run, run["seal_alg"], key) != run["seal"]:
                problems.append("run row edited (report, status, question or settings differ from the seal)")
        except KeyError as exc:
            problems.append(str(exc.args[0]))
    elif run.get("status") == "interrupted":
        problems.append(f"incomplete: the run was interrupted (its process ended) before it was sealed; its {len(events)} "
                        "events chain correctly, but an unsealed record cannot show that none were removed from its "
                        "end - finish it with --resume")
    elif run.get("status") != "running":
        problems.append(f"run is {run.get('status')} but not sealed (written by an older dxagent, or the seal removed)")
    else:  # a record without its seal proves nothing about its end: say so rather than "intact"
        problems.append(f"incomplete: the run is not sealed ({len(events)} events, no final report) - still running, "
                        "killed, or truncated")
    reports = [e["payload"].get("report") for e in events if e["kind"] == "node" and e["name"] == "report"]
    if run.get("status") == "done" and not reports:
        problems.append("the run is marked done but has no report event (truncated)")
    if reports and run.get("report") is not None and canonical(reports[-1]) != run["report"]:
        problems.append("the run's report differs from the report event")
    if artifact_root is not None:
        root = Path(artifact_root)
        for a in dump.get("artifacts", []):
            if a.get("missing_row"):
                problems.append(f"artifact {a['sha256'][:12]}: no row in the artifact table")
            f = root / a["path"]
            if not f.is_file():
                problems.append(f"artifact {a['sha256'][:12]} ({a.get('kind')}): file {a['path']} missing")
            elif hashlib.sha256(f.read_bytes()).hexdigest() != a["sha256"]:
                problems.append(f"artifact {a['sha256'][:12]} ({a.get('kind')}): file {a['path']} edited")
            elif a.get("bytes") is not None and f.stat().st_size != a["bytes"]:
                problems.append(f"artifact {a['sha256'][:12]}: size differs from its row")
    return problems


def trajectories(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """The planner's steps as training records (one per LLM decision): the chat messages it saw and what it
    answered, whether the reply was accepted, the tool result that followed and the critic's verdict after it."""
    run, events = dump["run"], dump["events"]
    report = run_report(run)
    out: list[dict[str, Any]] = []
    for i, ev in enumerate(events):
        if ev["kind"] != "llm" or ev["node"] != "think" or ev["name"] != "decision":
            continue
        p = ev["payload"]
        resp = p.get("response") or {}
        reply: dict[str, Any] = {"role": "assistant", "content": resp.get("content") or ""}
        if resp.get("tool_calls"):
            reply["tool_calls"] = [{"type": "function", "function": {"name": c["name"],
                                                                       "arguments": canonical(c["args"])}}
                                   for c in resp["tool_calls"]]
        rec: dict[str, Any] = {
            "run_id": run["id"], "case_id": run["case_id"], "step": sum(1 for x in out if x["accepted"]) + 1,
            "attempt": p.get("request", {}).get("attempt", 0), "model": run.get("llm"),
            "messages": list(p.get("request", {}).get("messages") or []) + [reply],
            "accepted": p.get("decision") is not None, "rejected": p.get("rejected"),
            "decision": p.get("decision"), "candidate_scores": p.get("candidate_scores") or {},
            "observation": None, "critique": None}
        if rec["accepted"] and (p["decision"] or {}).get("action") == "call":
            for nxt in events[i + 1:]:
                if nxt["kind"] == "llm" and nxt["node"] == "think":
                    break
                if nxt["kind"] == "tool" and rec["observation"] is None:
                    e = nxt["payload"]["evidence"]
                    rec["observation"] = {k: e.get(k) for k in ("id", "tool", "args", "status", "output", "error")}
                if nxt["kind"] == "node" and nxt["name"] == "critique":
                    c = nxt["payload"]
                    rec["critique"] = {k: c.get(k) for k in ("route", "why", "answered", "conflicts", "suggestions")}
                    break
        rec["outcome"] = (report or {}).get("recommendation", {}).get("outcome")
        out.append(rec)
    return out
