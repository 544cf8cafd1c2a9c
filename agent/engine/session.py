"""Run one case end to end: build the runtime, run (or resume) the graph, return the report.

This is the one entry point the CLI, the tests and the benchmarks share.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.errors import UserError
from agent.core.state import Budget, CaseInput, CaseState
from agent.core.tool import Tool
from agent.core.untrusted import clean_inputs
from agent.engine import calibration
from agent.engine.graph import Runtime, build_graph, checkpointer, new_run_id, redact_paths, stored_inputs
from agent.engine.planner import Planner, prompt_versions
from agent.engine.registry import discover
from agent.llm.backends import make_llm
from agent.store.artifacts import ArtifactStore
from agent.store.trace import TraceStore, unavailable


class DxError(UserError, RuntimeError):
    """A user-facing failure: one line, no traceback."""


def default_trace_dir() -> Path:
    return Path(os.environ.get("DXAGENT_TRACE_DIR", "traces"))


def resolve_inputs(paths: list[str]) -> list[str]:
    """Files and folders as given; each DICOMweb reference (dicomweb://HOST/PATH?study=UID[&series=UID]) retrieved
    into the cache, one folder per series (agent/imaging/dicomweb.py); a failure is a one-line DxError."""
    from agent.imaging.dicomweb import resolve

    return resolve([str(p) for p in paths])


def inputs_sha256(paths: list[str]) -> str:
    """sha256 over the input files' own sha256s (a folder: its regular files, sorted); only regular files under the
    size limit are opened (a pipe or a device is refused with one line before anything reads it)."""
    from agent.core.files import sha256_file
    from agent.imaging.loaders import ImageLoadError, regular_file

    h = hashlib.sha256()
    for p in map(Path, paths):
        if not p.exists():
            raise DxError(f"{p.name or p}: no such file or folder")
        files = sorted(x for x in p.rglob("*") if x.is_file() and not x.is_symlink()) if p.is_dir() else [p]
        for f in files:
            try:
                if f is p or f.stat().st_size:  # an empty file in a folder is skipped by the series reader
                    regular_file(f)
                h.update(bytes.fromhex(sha256_file(f)))
            except ImageLoadError as exc:
                raise DxError(str(exc)) from None
            except OSError as exc:
                raise DxError(f"{f.name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return h.hexdigest()


@dataclass
class Result:
    run_id: str
    report: dict[str, Any] | None
    state: CaseState
    inputs: list[str] = field(default_factory=list)  # the resolved input paths (a PACS study: its cached folders)
    store: ArtifactStore | None = None  # where the run's masks and pictures are


_TOOLS: dict[str, Tool] | None = None


def tools() -> dict[str, Tool]:
    global _TOOLS
    if _TOOLS is None:
        _TOOLS = discover()
    return _TOOLS


def user_error(exc: BaseException) -> bool:
    from agent.imaging.loaders import ImageLoadError
    from agent.llm.endpoints import EndpointError

    return isinstance(exc, ImageLoadError | DxError | EndpointError)


def error_message(exc: BaseException) -> str:
    """How a run's failure is recorded: the one-line message of a user error, else the exception's type and text."""
    return str(exc) if user_error(exc) else f"{type(exc).__name__}: {exc}"


def answer_chat(chat: Any) -> Any:
    """The answer step's model: the planner's, and for the embedded model a twin that returns token log-probabilities
    (the answer's probability); llama.cpp needs logits for every position for that, which would slow the planner."""
    from agent.llm.backends import LocalLlamaChat

    if isinstance(chat, LocalLlamaChat) and chat.top_logprobs <= 0:
        return chat.model_copy(update={"top_logprobs": 10})
    return chat


@dataclass
class Engine:
    """The runtime and compiled graph for one planner backend and trace store (run_case and chat share it)."""

    rt: Runtime
    graph: Any
    trace: TraceStore
    llm: str

    def invoke(self, payload: Any, config: dict[str, Any], **kw: Any) -> CaseState:
        """Run the graph; a failure is recorded in the trace (note + failed run) and re-raised (a user error as
        DxError, one line). A trace or checkpoint database that went away fails the run with one line too: it is
        recorded as failed if the store still answers, else left unsealed ("running" until this process ends, then
        "interrupted" - `trace verify` calls it incomplete, --resume continues it); never a hang, never half a seal."""
        try:
            final = self.graph.invoke(payload, config, **kw)
        except Exception as exc:
            gone = unavailable(exc, self.trace.url)
            msg = str(gone) if gone is not None else error_message(exc)
            stored = redact_paths(msg, self.rt.input_paths.get(self.rt.run_id, []))  # the terminal may show names
            try:
                self.rt.record("note", "error", "error", {"error": stored})
                self.trace.finish_run(self.rt.run_id, "failed", error=stored)
            except Exception as exc2:
                if unavailable(exc2, self.trace.url) is None:
                    raise
                raise DxError(f"{unavailable(exc2, self.trace.url) if gone is None else gone} - run {self.rt.run_id} "
                              "is left unsealed (trace verify: incomplete; --resume continues it)") from None
            if gone is not None:
                raise DxError(msg) from None
            if user_error(exc):
                raise DxError(getattr(exc, "local_message", None) or msg) from None
            raise
        return CaseState.model_validate(final)


def engine(*, llm: str = "local", chat: Any = None, model_id: str | None = None, mode: str | None = None,
           base_url: str | None = None, model: str | None = None, api_key: str | None = None,
           llm_timeout_s: float = 120.0, script: list[Any] | None = None, narrative: bool | None = None,
           narrator: Any = None, trace_dir: str | Path | None = None, db_url: str | None = None,
           on_step: Any = None, tool_set: dict[str, Tool] | None = None) -> Engine:
    from agent.engine import worker

    worker.warm()  # the tool worker imports torch and the study classifier while the engine is built and intake loads
    trace_dir = Path(trace_dir or default_trace_dir())
    trace = TraceStore(db_url, trace_dir)
    trace.mark_interrupted()
    store = ArtifactStore(trace_dir / "artifacts")
    if chat is None:
        chat, model_id, mode = make_llm(llm, base_url=base_url, model=model, api_key=api_key,
                                        timeout_s=llm_timeout_s, script=script)
    planner = Planner(chat, model_id or "custom", mode or "json")
    planner.vision = _vision(llm)
    if llm.startswith("openai"):
        from agent.llm.endpoints import token_budget

        planner.token_budget = token_budget("planner")
    if narrator is None:
        narrator = _narrator()
    use_narrative = narrative if narrative is not None else llm.startswith("openai")
    rt = Runtime(tools=tool_set or tools(), planner=planner, store=store, trace=trace,
                 narrative_llm=(narrator or chat) if use_narrative or narrator else None, on_step=on_step,
                 answer_llm=answer_chat(chat))
    planner.record = lambda kind, node, name, payload: rt.record(kind, node, name, payload)
    return Engine(rt, build_graph(rt, checkpointer(db_url, trace_dir)), trace, llm)


def _narrator() -> Any:
    """The endpoint named `narrator` (it writes the impression from the evidence), when one is configured."""
    from agent.llm.endpoints import load

    ep = load("narrator")
    if ep is None:
        return None
    return make_llm("openai", base_url=ep.base_url, model=ep.model, api_key=ep.api_key, timeout_s=ep.timeout_s,
                    max_retries=ep.retries)[0]


def _vision(llm: str) -> Any:
    """The planner endpoint's picture settings when it is declared vision-capable ([endpoints.planner] vision = true
    or DXAGENT_PLANNER_VISION=1); the embedded models take no pictures."""
    from agent.llm.endpoints import EndpointError, vision_settings

    v = vision_settings("planner")
    if v is not None and not llm.startswith("openai"):
        raise EndpointError(f"the planner endpoint is declared vision-capable, but --llm {llm} takes no pictures "
                            "(use --llm openai or openai-json with a vision model)")
    return v


def run_case(paths: list[str] | None = None, question: str | None = None, *, llm: str = "local",
             max_steps: int = 6, max_wall_s: float = 300.0, modality: str | None = None,
             body_part: str | None = None, clinical_context: str = "", run_id: str | None = None,
             resume: str | None = None, eng: Engine | None = None, route: bool = True, **engine_kw: Any) -> Result:
    """One case end to end (or `resume` an interrupted one). `engine_kw` build the Engine (see `engine`)."""
    eng = eng or engine(llm=llm, **engine_kw)
    rt, graph, trace, planner = eng.rt, eng.graph, eng.trace, eng.rt.planner
    if resume:
        prior_run = trace.get_run(resume)
        if prior_run is None:
            raise DxError(f"no run {resume!r} in {trace.shown_url}")
        run_id = resume
        if prior_run.status != "done":
            from agent.store.trace import RunBusy

            try:
                trace.reopen(run_id)  # its one writer: running again (and unsealed) until it finishes
            except RunBusy as exc:
                raise DxError(str(exc)) from None
    if resume:
        rt.run_id = run_id
        if paths:  # only needed when the run stopped before its intake had loaded the images
            rt.input_paths[run_id] = [str(p) for p in resolve_inputs(paths)]
        config = {"configurable": {"thread_id": run_id}, "recursion_limit": 1000}
        snap = graph.get_state(config)
        if not snap.values:
            raise DxError(f"run {run_id} has no checkpoint to resume from")
        if not snap.next:
            return Result(run_id, snap.values.get("report"), CaseState.model_validate(snap.values),
                          rt.input_paths.get(run_id, []), rt.store)
        prior = CaseState.model_validate(snap.values)
        paused = 0.0
        if prior.budget.started_at is not None and prior.steps:
            # the wall-clock budget counts working time: the pause since the last completed step is not spent
            paused = max(0.0, time.time() - prior.steps[-1].t)
            budget = prior.budget.model_copy(update={"started_at": prior.budget.started_at + paused})
            graph.update_state(config, {"budget": budget})
            snap = graph.get_state(config)
        rt.record("note", "resume", "resume", {"next": list(snap.next), "paused_s": paused})
        payload = None
    else:
        if not paths:
            raise DxError("no image given")
        paths = resolve_inputs(paths)
        digest = inputs_sha256(paths)
        run_id = run_id or new_run_id(digest)
        rt.run_id = run_id
        config = {"configurable": {"thread_id": run_id}, "recursion_limit": 4 * max_steps + 12}
        rt.input_paths[run_id] = [str(p) for p in paths]
        question, clinical_context, removed = clean_inputs(question or "", clinical_context)
        state = CaseState(case_id=digest[:12], run_id=run_id, inputs=CaseInput(paths=stored_inputs(paths),
                          modality=modality, body_part=body_part), clinical_context=clinical_context,
                          budget=Budget(max_steps=max_steps, max_wall_s=max_wall_s, route=route),
                          notes=removed, **({"question": question} if question else {}))
        trace.start_run(run_id, state.case_id, state.question, planner.model_id, planner.mode, digest,
                        {"prompts": prompt_versions(), "tools": {n: t.version for n, t in rt.tools.items()}},
                        settings={"llm": eng.llm, "llm_type": getattr(planner.chat, "_llm_type", ""), "max_steps": max_steps,
                                  "max_wall_s": max_wall_s, "modality": modality, "body_part": body_part,
                                  "clinical_context": clinical_context, "narrative": rt.narrative_llm is not None,
                                  "with_reason": planner.with_reason, "optional_args": planner.optional_args,
                                  "route": route,
                                  "vision": planner.vision.model_dump() if planner.vision else None,
                                  "token_budget": planner.token_budget,
                                  "min_probability": calibration.min_probability(),
                                  "min_probability_new_wording": calibration.min_probability(True)})
        payload = state
    state = eng.invoke(payload, config)
    return Result(run_id, state.report, state, rt.input_paths.get(run_id, []), rt.store)
