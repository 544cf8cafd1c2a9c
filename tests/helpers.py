"""Test helpers: extra tools that misbehave on purpose, and scripted decisions."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.core.state import CaseInput, CaseState
from agent.core.tool import Tool, ToolContext, ToolInput
from agent.engine.registry import discover
from agent.imaging.views import load_views
from agent.store.artifacts import ArtifactStore

REALCASES = Path(os.environ.get("DXAGENT_REALCASES", Path(__file__).resolve().parents[2] / "shared/data/realcases"))


def realcases_root() -> Path | None:
    """../shared/data/realcases (or $DXAGENT_REALCASES) when present, else None: tests then skip."""
    return REALCASES if (REALCASES / "cases.jsonl").exists() else None


def call(tool: str, reason: str = "scripted", **args) -> str:
    return json.dumps({"tool": tool, "args": {"view": "V1", **args}, "reason": reason})


def answer(reason: str = "done") -> str:
    return json.dumps({"tool": "answer", "args": {}, "reason": reason})


class CountOut(BaseModel):
    value: float


class Boom(Tool):
    name = "boom"
    description = "Always raises."
    kind = "measure"
    Output = CountOut

    def run(self, ctx: ToolContext, inp: ToolInput) -> CountOut:
        raise RuntimeError("kaboom inside the tool")


class Slow(Tool):
    name = "slow"
    description = "Sleeps longer than its timeout."
    kind = "measure"
    timeout_s = 0.5
    Output = CountOut

    def run(self, ctx: ToolContext, inp: ToolInput) -> CountOut:
        time.sleep(3)
        return CountOut(value=1)


class Gate(Tool):
    """Blocks while the file named by $DXAGENT_TEST_GATE exists (for kill/resume tests); on entering it writes
    `<gate>.entered`, so a test can wait for that event instead of guessing with the clock."""

    name = "gate"
    description = "Waits on a gate file."
    kind = "inspect"
    subjects = ("gate",)
    Output = CountOut

    def run(self, ctx: ToolContext, inp: ToolInput) -> CountOut:
        gate = os.environ.get("DXAGENT_TEST_GATE")
        if gate:
            Path(gate + ".entered").write_text("in")
        while gate and Path(gate).exists():
            time.sleep(0.1)
        return CountOut(value=2)


class Hang(Tool):
    """Writes its process id to $DXAGENT_TEST_PIDFILE, then never returns (for the worker-stop tests)."""

    name = "hang"
    description = "Hangs."
    kind = "measure"
    timeout_s = 1.0
    Output = CountOut

    def run(self, ctx: ToolContext, inp: ToolInput) -> CountOut:
        Path(os.environ["DXAGENT_TEST_PIDFILE"]).write_text(str(os.getpid()))
        time.sleep(600)
        return CountOut(value=0)


class Crash(Tool):
    """Kills the process it runs in, as a segfault in a native library would."""

    name = "crash"
    description = "Crashes its process."
    kind = "measure"
    Output = CountOut

    def run(self, ctx: ToolContext, inp: ToolInput) -> CountOut:
        os.kill(os.getpid(), signal.SIGKILL)
        return CountOut(value=0)


class WhoOut(BaseModel):
    pid: int
    mark: str
    overlay: str


class Who(Tool):
    """Reports the process it runs in and $DXAGENT_TEST_MARK, and saves an overlay (artifacts cross back)."""

    name = "who"
    description = "Says where it runs."
    kind = "inspect"
    Output = WhoOut

    def run(self, ctx: ToolContext, inp: ToolInput) -> WhoOut:
        import numpy as np

        ref = ctx.save_png(np.full((4, 4), os.getpid() % 251, np.uint8), "overlay", "who")
        return WhoOut(pid=os.getpid(), mark=os.environ.get("DXAGENT_TEST_MARK", ""), overlay=ref.sha256)


_TOOLS: dict[str, Tool] = {}


def make_ctx(store: ArtifactStore, *paths: Path | str, **kw) -> ToolContext:
    """A ToolContext over a case made of these image files, as intake makes it (kw: modality, body_part)."""
    paths = [str(p) for p in paths]
    state = CaseState(inputs=CaseInput(paths=paths, **kw), views=load_views(paths, store, **kw))
    return ToolContext(state=state, store=store)


def run_tool(ctx: ToolContext, tool_name: str, **args):
    """Run one discovered tool directly; its output must be its Output type with a one-line summary."""
    if not _TOOLS:
        _TOOLS.update(discover())
    tool = _TOOLS[tool_name]
    out = tool.run(ctx, tool.Input(**args))
    assert isinstance(out, tool.Output)
    summary = tool.summary(out)
    assert summary and "\n" not in summary and len(summary) < 300
    return out


def bare_view(modality: str, shape: tuple[int, ...] = (64, 64)):
    """An ImageView with only a modality and a shape, for tests of applicability and the critic."""
    from agent.core.state import ArtifactRef, ImageView

    ref = ArtifactRef(sha256="0" * 64, kind="pixels", media_type="application/x-npy", path="x.npy")
    return ImageView(id="V1", pixels=ref, shape=shape, dtype="uint8", ndim_spatial=len(shape), modality=modality)


def dice(a, b) -> float:
    """Dice of two boolean masks (0 when both are empty)."""
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def expert_box(truth, grow: float = 0.0) -> list[int]:
    """The bbox [row0, col0, row1, col1] (end exclusive) of an expert mask, each side moved out by `grow` of its size."""
    import numpy as np

    rows, cols = np.flatnonzero(truth.any(1)), np.flatnonzero(truth.any(0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    dr, dc = grow * (r1 - r0), grow * (c1 - c0)
    h, w = truth.shape
    return [max(0, round(r0 - dr)), max(0, round(c0 - dc)), min(h, round(r1 + dr)), min(w, round(c1 + dc))]


def wait_for(path: Path | str, timeout_s: float = 120.0) -> None:
    """Wait until `path` exists (an event a child process signals), polling; fails after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(0.05)


def serve_http(handler: type) -> tuple[Any, str, Any]:
    """A loopback HTTP server for `handler` in a daemon thread: (server, its OpenAI-style base URL, the thread)."""
    import threading
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1", thread



class StoreAt:
    """One trace store for the tests that run on SQLite and PostgreSQL alike (the `store_kind` fixture): its folder
    (artifacts, and the SQLite file) and its URL (None: SQLite in the folder)."""

    def __init__(self, dir: Path, url: str | None = None, pg: Any = None):
        self.dir, self.url, self.pg = Path(dir), url, pg
        self.dir.mkdir(parents=True, exist_ok=True)

    def store(self):
        from agent.store.trace import TraceStore

        return TraceStore(self.url, self.dir)

    def kw(self) -> dict[str, Any]:
        """run_case's and rerun's store arguments."""
        return {"trace_dir": self.dir, "db_url": self.url}

    def cli(self) -> list[str]:
        return ["--trace-dir", str(self.dir)] + (["--db-url", self.url] if self.url else [])

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"

    def sql(self, q: str, *args: Any) -> list[tuple]:
        """Run one statement as a person with write access to the database would (`?` placeholders)."""
        if self.url is None:
            import sqlite3

            con = sqlite3.connect(self.dir / "dxagent.sqlite")
            try:
                rows = con.execute(q, args).fetchall()
                con.commit()
            finally:
                con.close()
            return rows
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as con:
            cur = con.execute(q.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []

    def empty(self, dest: Path) -> StoreAt:
        """A new, empty store of the same kind."""
        return StoreAt(dest) if self.url is None else StoreAt(dest, self.pg.new_database(), self.pg)

    def copy(self, dest: Path) -> StoreAt:
        """Another store holding the same rows and artifact files (a SQLite copy: the folder; PostgreSQL: a new
        database, the rows copied table by table)."""
        import shutil

        shutil.copytree(self.dir, dest)
        if self.url is None:
            return StoreAt(dest)
        from sqlalchemy import select, text

        from agent.store.trace import Artifact, Event, Run

        new = StoreAt(dest, self.pg.new_database(), self.pg)
        src, dst = self.store(), new.store()
        with src.engine.connect() as a, dst.engine.begin() as b:
            for table in (Run.__table__, Event.__table__, Artifact.__table__):
                rows = [dict(r) for r in a.execute(select(table)).mappings()]
                if rows:
                    b.execute(table.insert(), rows)
            b.execute(text("SELECT setval(pg_get_serial_sequence('event', 'id'), coalesce(max(id), 1)) FROM event"))
        return new


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Any) -> tuple[Any, Any, str]:
    """An ASGI `app` on uvicorn in a daemon thread on a free loopback port: (server, thread, base url). Stop it with
    `server.should_exit = True; thread.join()`."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return server, t, f"http://127.0.0.1:{port}"

