"""Tool calls in a worker process that can be stopped: a tool stuck past its timeout is killed, not left spinning.

`call(tool, ctx, inp)` runs `tool.run` in a persistent worker process (`python -m agent.engine.worker`: a clean interpreter
that inherits no threads or locks from the caller and never re-imports the caller's main script; requests and replies
are pickles over a socket pair, multiprocessing's Connection) and returns its output; artifacts and new views the tool makes land
in `ctx` as if it had run here. A worker keeps the models its tools loaded between calls. A call that overruns the
tool's timeout kills its worker (the next call starts a fresh one) and raises TimeoutError; a worker that dies in a
call (a segfault in a native library, the OOM killer) is a failed call, not a dead run. Idle workers wait in a pool,
so a chat session, a batch and its worker threads reuse them; they exit with the process that started them (and on
their own when it is killed: their pipe closes).

The worker receives the tool's class by module and name (it imports it), the case state, the artifact store's folder,
the validated input and the caller's environment and sys.path at the time of the call. A tool class it cannot import
(defined inside a function) runs in a daemon thread of the caller instead, as all tools do with
DXAGENT_TOOL_WORKER=thread: abandoned on timeout, not stopped (the timeout error says "abandoned"; a stopped worker's
says "stopped"). Workers ignore Ctrl-C: in chat the step under way finishes and is kept.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, ClassVar

from pydantic import BaseModel

from agent.core.errors import DxagentError
from agent.store.artifacts import ArtifactStore

STARTUP_S = 180.0  # a worker that is not ready by then (a machine under heavy load) is a failed call
# imported by every worker as soon as it has said it is ready, while the caller goes on with its own start-up: the
# study classifier that intake runs here (and torch with it), so a cold `dxagent run` pays for torch beside the
# engine's imports instead of after them
PRELOAD = ("agent.analysis.study", "torch")


class WorkerDied(DxagentError, RuntimeError):
    """The tool's worker process ended in the middle of a call."""


class ToolCrashed(DxagentError, RuntimeError):
    """The tool raised an exception other than ToolError in the worker: its message is 'Type: text'."""


def mode() -> str:
    """'process' (default) or 'thread' (DXAGENT_TOOL_WORKER)."""
    return "thread" if os.environ.get("DXAGENT_TOOL_WORKER", "process").strip().lower() == "thread" else "process"


def importable(tool: Any) -> bool:
    cls = type(tool)
    return "<locals>" not in cls.__qualname__ and cls.__module__ != "__main__"


class Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.engine.worker", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), env=_env(), stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno()
                                     if _has_fd(sys.stderr) else subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.ready = False

    def wait_ready(self) -> None:
        if not self.ready:
            if not self.conn.poll(STARTUP_S):
                self.stop()
                raise WorkerDied(f"the tool worker did not start within {STARTUP_S:.0f} s")
            self._recv()
            self.ready = True

    def _recv(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait(5)
            raise WorkerDied(f"the tool's worker process died (exit code {code})") from None

    def run(self, request: dict[str, Any], timeout_s: float) -> Any:
        self.wait_ready()
        self.conn.send(request)
        if not self.conn.poll(timeout_s):
            if self.alive():  # no reply in time: stop it (a died worker is reported as such below)
                self.stop()
                raise TimeoutError(f"timed out after {timeout_s:.0f} s (its worker process was stopped)")
        return self._recv()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.conn.close()


def _env() -> dict[str, str]:
    """The caller's environment, with its sys.path as PYTHONPATH: the worker imports the same `agent` and tools."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _has_fd(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):  # pytest's captured streams have none
        return False


_POOL: list[Worker] = []
_LOCK = threading.Lock()


def _take() -> Worker:
    with _LOCK:
        while _POOL:
            w = _POOL.pop()
            if w.alive():
                return w
    return Worker()


def _give(w: Worker) -> None:
    if w.alive():
        with _LOCK:
            _POOL.append(w)


def warm() -> None:
    """Start a worker now (it imports in the background, e.g. while the planner thinks) unless one is idle."""
    if mode() == "process":
        with _LOCK:
            if _POOL:
                return
        _give(Worker())


@atexit.register
def _shutdown() -> None:
    with _LOCK:
        for w in _POOL:
            w.stop()
        _POOL.clear()


def call(tool: Any, ctx: Any, inp: Any) -> dict[str, Any]:
    """tool.run(ctx, inp) in a worker process (with DXAGENT_TOOL_WORKER=thread, or a tool class the worker cannot
    import, in a daemon thread): its output as a JSON-ready dict. Raises what the tool raised (a ToolError keeps its
    type; another exception arrives as ToolCrashed 'Type: message'), TimeoutError (its message is the evidence's
    error), or WorkerDied."""
    from agent.engine.bounded import within

    if mode() == "thread" or not importable(tool):
        try:
            out = within(tool.timeout_s, lambda: tool.run(ctx, inp), f"tool {tool.name}")
        except TimeoutError:
            raise TimeoutError(f"timed out after {tool.timeout_s:.0f} s (abandoned)") from None
        return out.model_dump(mode="json")
    cls = type(tool)
    request = {"module": cls.__module__, "qualname": cls.__qualname__, "state": ctx.state,
               "new_views": ctx.new_views, "findings": ctx.findings, "store": str(ctx.store.root), "input": inp,
               "env": dict(os.environ),
               "path": list(sys.path)}
    w = _take()
    try:
        reply = w.run(request, tool.timeout_s)
    except BaseException:
        if w.alive():  # interrupted while waiting (not the worker's fault): it may still be busy, so not reused
            w.stop()
        raise
    _give(w)
    if reply["status"] == "ok":
        ctx.artifacts.extend(reply["artifacts"])
        ctx.new_views.extend(reply["new_views"])
        return reply["output"]
    from agent.core.tool import ToolError

    raise (ToolError if reply["status"] == "tool_error" else ToolCrashed)(reply["error"])


def study_classifier(store: ArtifactStore) -> Any:
    """The study classifier for the engine's intake (agent/imaging/views.py `load_views(classify=...)`), run in a
    worker like a tool call (agent/analysis/study.py `IntakeStudy`); a worker that dies or overruns is the classifier's
    one-line ToolError, so intake falls back to the pixel rules and says why."""

    def classify(picture: Any, rgb: bool, hu: bool) -> dict[str, Any]:
        from agent.analysis.study import IntakeStudy, IntakeStudyInput
        from agent.core.tool import ToolContext, ToolError

        try:
            out = call(IntakeStudy(), ToolContext(state=None, store=store),  # type: ignore[arg-type]
                       IntakeStudyInput(picture=picture, rgb=rgb, hu=hu))
        except (TimeoutError, WorkerDied, ToolCrashed) as exc:
            raise ToolError(f"study classifier: {' '.join(str(exc).split())[:160]}") from None
        return out["block"]

    return classify


class _Asked(BaseModel):
    module: str
    qualname: str
    method: str  # "takes_question" or "question_scope"
    question: str


class _Answer(BaseModel):
    value: Any = None


class ToolQuestion:
    """A tool's `takes_question` or `question_scope` worked out here, in the shape `call` runs (as IntakeStudy)."""

    name = "tool_question"
    timeout_s = 120.0
    _tools: ClassVar[dict[tuple[str, str], Any]] = {}

    def run(self, ctx: Any, inp: _Asked) -> _Answer:
        key = (inp.module, inp.qualname)
        if key not in self._tools:
            self._tools[key] = _class(*key)()
        return _Answer(value=getattr(self._tools[key], inp.method)(inp.question))


def _class(module: str, qualname: str) -> Any:
    """The class named by its module and qualified name (imported here)."""
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


_ASKED: dict[tuple[str, str, str, str], Any] = {}
_ASK_LOCK = threading.Lock()
_ASK_METHODS = {"takes_question": True, "question_scope": None}  # -> what a tool that cannot tell answers


def ask(tool: Any, method: str, question: str) -> Any:
    """tool.takes_question(question) or tool.question_scope(question): in the tool worker for a tool whose
    `questions_in_worker` is set (its models load there, where its own call will use them: a cold `dxagent run` with a
    closed question took 19 s when the engine's process loaded the VQA expert as well, 12 s now), else here. Worked out
    once per process and question. A worker that fails or overruns gives what a tool that cannot tell gives (True:
    the tool is offered and its own call records why it could not answer; None: no wording score)."""
    if method not in _ASK_METHODS:
        raise ValueError(f"ask: {method!r} is not one of {sorted(_ASK_METHODS)}")
    if not getattr(tool, "questions_in_worker", False) or mode() == "thread" or not importable(tool):
        return getattr(tool, method)(question)
    cls = type(tool)
    key = (cls.__module__, cls.__qualname__, method, question)
    if key in _ASKED:
        return _ASKED[key]
    from agent.core.files import cache_root
    from agent.core.tool import ToolContext, ToolError

    try:  # the worker's protocol needs an artifact store; nothing is written to it
        out = call(ToolQuestion(), ToolContext(state=None, store=ArtifactStore(cache_root())),  # type: ignore[arg-type]
                   _Asked(module=cls.__module__, qualname=cls.__qualname__, method=method, question=question))
    except (ToolError, TimeoutError, WorkerDied, ToolCrashed):
        return _ASK_METHODS[method]
    value = out["value"]
    value = tuple(value) if isinstance(value, list) else value  # question_scope's pair, as JSON sent it
    with _ASK_LOCK:
        if len(_ASKED) >= 1024:
            _ASKED.clear()
        _ASKED[key] = value
    return value


# -- the worker's side ------------------------------------------------------------------------------------------


def _serve(conn: Any) -> None:
    """The worker's loop: one request at a time until the parent's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    from agent.core.tool import ToolContext, ToolError

    tools: dict[tuple[str, str], Any] = {}
    stores: dict[str, ArtifactStore] = {}
    conn.send("ready")
    for name in PRELOAD:  # a request sent meanwhile waits in the pipe; a module that fails here fails in its call
        try:
            importlib.import_module(name)
        except Exception:  # noqa: S112 (reported by the call that needs it)
            continue
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        os.environ.clear()
        os.environ.update(req["env"])
        sys.path[:] = req["path"]
        key = (req["module"], req["qualname"])
        try:
            if key not in tools:
                tools[key] = _class(*key)()
            store = stores.setdefault(req["store"], ArtifactStore(req["store"]))
            ctx = ToolContext(state=req["state"], store=store, new_views=list(req["new_views"]),
                              findings=req.get("findings") or {})
            n_views = len(ctx.new_views)
            out = tools[key].run(ctx, req["input"])
            reply = {"status": "ok", "output": out.model_dump(mode="json"), "artifacts": ctx.artifacts,
                     "new_views": ctx.new_views[n_views:]}
        except ToolError as exc:
            reply = {"status": "tool_error", "error": str(exc)}
        except Exception as exc:
            reply = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        try:
            conn.send(reply)
        except Exception as exc:  # an output that cannot be sent back
            conn.send({"status": "error", "error": f"the tool's output could not be returned: {type(exc).__name__}: "
                                                    f"{exc}"})


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
