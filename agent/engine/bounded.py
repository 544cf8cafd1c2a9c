"""A call bounded by a wall clock and cancellable by the user: `within` and `cancellable`, shared by the LLM calls
(agent/engine/llm_calls.py) and the tool worker's thread mode (agent/engine/worker.py). It imports nothing else of the
engine, so any engine module may use it."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.core.errors import ControlSignal


class CallCancelled(ControlSignal):
    """The user cancelled (chat's Ctrl-C) while a bounded call was waiting: the call was abandoned."""


_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("dxagent_cancel", default=None)


@contextmanager
def cancellable(event: threading.Event | None) -> Iterator[None]:
    """While inside, a `within` call (an endpoint's reply awaited) ends within 0.1 s of `event` being set, raising
    CallCancelled: a chat turn's Ctrl-C does not wait for a silent endpoint. A context variable, so the graph's
    nodes see it in whichever thread LangGraph runs them."""
    token = _CANCEL.set(event)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def within(seconds: float, fn: Any, what: str = "the LLM") -> Any:
    """fn() if it returns within `seconds`, else TimeoutError. The call runs in a daemon thread that is abandoned on
    timeout (an HTTP request then ends at its own client timeout, in the background; the run does not wait for it),
    so a silent endpoint cannot hold a run past its wall-clock budget, whatever its timeout x retries would allow.
    Under `cancellable`, it is abandoned as soon as the cancel event is set (CallCancelled)."""
    if seconds <= 0:
        raise TimeoutError(f"no time left in the run's budget for {what}")
    cancel = _CANCEL.get()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name="dxagent-bounded-call", daemon=True)
    t.start()
    end = time.monotonic() + seconds
    while t.is_alive() and (left := end - time.monotonic()) > 0:
        t.join(left if cancel is None else min(left, 0.1))
        if cancel is not None and cancel.is_set() and t.is_alive():
            raise CallCancelled(f"cancelled while waiting for {what}")
    if t.is_alive():
        raise TimeoutError(f"{what} did not reply within the {seconds:.0f} s left in the run's budget")
    if "error" in box:
        raise box["error"]
    return box["value"]
