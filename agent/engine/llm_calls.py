"""Calls to the LLM that every engine step shares: the prompt files rendered (Jinja2, untrusted text as data), a call
bounded by the run's wall clock, and one JSON object asked for under a schema. The planner, the answer step, the
report and the question reader import these from here, so the engine's modules import in one direction."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from jinja2 import Environment, StrictUndefined
from langchain_core.language_models import BaseChatModel

from agent.core.errors import DxagentError
from agent.core.untrusted import as_data
from agent.engine.bounded import CallCancelled, cancellable, within  # noqa: F401 - re-exported

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
