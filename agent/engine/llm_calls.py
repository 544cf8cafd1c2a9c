"""Calls to the LLM that every engine step shares: the prompt files rendered (Jinja2, untrusted text as data), a call
bounded by the run's wall clock, and one JSON object asked for under a schema. The planner, the answer step, the
report and the question reader import these from here, so the engine's modules import in one direction."""

from __future__ import annotations

import contextvars
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

from jinja2 import Environment, StrictUndefined
from langchain_core.language_models import BaseChatModel

from agent.core.errors import ControlSignal, DxagentError
from agent.core.untrusted import as_data

_ENV = Environment(undefined=StrictUndefined, keep_trailing_newline=False, trim_blocks=False)


_ENV.filters["data"] = as_data


def prompt_text(name: str) -> str:
    return resources.files("prompts").joinpath(f"{name}.md").read_text()


def render(name: str, **values: Any) -> str:
    return _ENV.from_string(prompt_text(name)).render(**values).strip() + "\n"


def prompt_versions() -> dict[str, str]:
    names = ("system", "think", "rethink", "report", "answer_system", "answer", "answer_baseline")
    return {n: hashlib.sha256(prompt_text(n).encode()).hexdigest()[:12] for n in names}


class PlannerError(DxagentError, RuntimeError):
    """The planner produced no valid decision within its bounds."""


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


def bounded_call(chat: Any, seconds: float, fn: Any, what: str = "the LLM") -> Any:
    """`within` for HTTP endpoints; the embedded llama.cpp model runs inline (it cannot be abandoned safely - the next
    call would share its context - and its output is bounded by max_tokens)."""
    if getattr(chat, "_llm_type", "") == "llama-cpp":
        return fn()
    return within(seconds, fn, what)


_JSON_OBJECT_ENDPOINTS: set[str] = set()  # model ids whose server rejected response_format `json_schema`


def structured_invoke(chat: BaseChatModel, model_id: str, messages: list, schema: dict[str, Any],
                      max_tokens: int) -> tuple[Any, dict[str, Any]]:
    """Ask for one JSON object that follows `schema`: (reply, the parameters sent). The local model gets it as a
    llama.cpp grammar; an endpoint as `json_schema`, or as `json_object` + `schema` once it refused `json_schema`."""
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if chat._llm_type == "llama-cpp":
        params["response_format"] = {"type": "json_object", "schema": schema}
    elif chat._llm_type != "scripted":
        note: dict[str, Any] = {}
        if model_id not in _JSON_OBJECT_ENDPOINTS:
            params["response_format"] = {"type": "json_schema", "json_schema": {"name": "decision", "schema": schema}}
            try:
                return chat.invoke(messages, **params), params
            except Exception as exc:
                if "json_schema" not in str(exc) or getattr(exc, "status_code", None) not in (400, 422, 500):
                    raise
                _JSON_OBJECT_ENDPOINTS.add(model_id)
                note = {"json_schema_rejected": str(exc)[:200]}
        # llama-cpp-python's server rejects `json_schema` but turns `json_object` + `schema` into a grammar;
        # it also ignores `max_completion_tokens` (langchain-openai's name for max_tokens): send `max_tokens`.
        params = {"response_format": {"type": "json_object", "schema": schema}, "extra_body": {"max_tokens": max_tokens}}
        return chat.invoke(messages, **params), {**params, **note}
    return chat.invoke(messages, **params), params
