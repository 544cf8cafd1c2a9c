"""The LangGraph state machine: intake → think → act → rethink → (think | report) → END.

Nodes are plain functions over `CaseState`; the objects they need (tools, planner, stores) live in a
`Runtime` the nodes close over. A SQLite checkpointer keyed by thread id (= run id) persists the
state after every node, so an interrupted run resumes from its last completed step.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from pydantic import ValidationError

from agent import critic
from agent.artifacts import ArtifactStore
from agent.planner import Planner, PlannerError
from agent.state import ArtifactRef, Budget, CaseState, Critique, Decision, Evidence, ImageView, StepLog
from agent.trace import TraceStore
from tools.base import Tool, ToolContext, ToolError


@dataclass
class Runtime:
    tools: dict[str, Tool]
    planner: Planner
    store: ArtifactStore
    trace: TraceStore
    run_id: str = ""
    narrative_llm: Any = None  # an endpoint chat model that may write the impression
    on_step: Any = None  # callback(node, state_update) for live display
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=4))

    def record(self, kind: str, node: str, name: str, payload: dict[str, Any]) -> None:
        self.trace.record(self.run_id, kind, node, name, payload)


def _log(state: CaseState, node: str, summary: str) -> list[StepLog]:
    return state.steps + [StepLog(step=len(state.steps) + 1, node=node, summary=summary)]


def intake(rt: Runtime, state: CaseState) -> dict[str, Any]:
    from tools.imaging import load_views

    if state.views:  # resumed after intake
        return {}
    views = load_views(state.inputs.paths, rt.store, modality=state.inputs.modality,
                       body_part=state.inputs.body_part)
    v1 = views[0]
    applicable, refused = [], {}
    for name, tool in rt.tools.items():
        why = tool.applicable(v1)
        (refused.__setitem__(name, why) if why else applicable.append(name))
    notes = []
    if not v1.spacing_known:
        notes.append("Pixel spacing is unknown: measurements are in pixels, not mm.")
    if v1.modality_source == "guess":
        notes.append(f"Modality {v1.modality} was guessed from the pixels "
                     f"(confidence {v1.metadata.get('modality_confidence', 'n/a')}); pass --modality to set it.")
    # the user's model cards behind applicable learned tools: shown to the planner, recorded in the trace
    from tools._learned import LearnedTool, model_used

    model_lines = [line for n in applicable for line in rt.tools[n].prompt_lines(v1)]
    cards = [model_used(c).model_dump() | {"tool": n, "card_fields": c.model_dump(mode="json")}
             for n in applicable if isinstance(rt.tools[n], LearnedTool) for c in rt.tools[n].cards(v1)]
    budget = state.budget.model_copy(update={"started_at": time.time()})
    summary = f"{len(views)} view(s); {v1.modality} {v1.ndim_spatial}D {list(v1.shape)}; {len(applicable)} tools apply"
    rt.record("node", "intake", "intake", {
        "views": [v.model_dump(mode="json") for v in views], "applicable": applicable, "not_applicable": refused,
        "notes": notes, "models": cards})
    return {"views": views, "applicable_tools": applicable, "model_lines": model_lines,
            "notes": state.notes + notes, "budget": budget,
            "steps": _log(state, "intake", summary)}


def think(rt: Runtime, state: CaseState) -> dict[str, Any]:
    left = state.budget.max_steps - state.tool_steps
    if left <= 0 or state.budget.elapsed() >= state.budget.max_wall_s:
        decision = Decision(action="answer", reason="budget spent")
        update: dict[str, Any] = {}
    else:
        try:
            decision = rt.planner.decide(state, rt.tools)
            update = {}
        except PlannerError as exc:
            decision = Decision(action="answer", reason="planner failed")
            update = {"planner_failures": state.planner_failures + 1,
                      "notes": state.notes + [f"Planner failed at step {state.tool_steps + 1}: {exc}"]}
    what = f"answer ({decision.reason})" if decision.action == "answer" else f"{decision.tool} {decision.args}"
    rt.record("node", "think", "decision", {"decision": decision.model_dump()})
    return {**update, "pending": decision, "steps": _log(state, "think", what)}


def _run_tool(rt: Runtime, state: CaseState, d: Decision, eid: str) -> tuple[Evidence, list[ImageView]]:
    tool = rt.tools.get(d.tool or "")
    base = {"id": eid, "tool": d.tool or "?", "tool_version": getattr(tool, "version", "?"), "args": d.args,
            "step": state.tool_steps + 1}
    if tool is None or d.tool not in state.applicable_tools:
        return Evidence(**base, status="refused", error=f"{d.tool} is not applicable to this case"), []
    try:
        view = state.view(d.args.get("view", "V1"))
    except KeyError as exc:
        return Evidence(**base, status="refused", error=str(exc.args[0])), []
    why = tool.applicable(view)
    if why:
        return Evidence(**base, status="refused", error=why), []
    for e in state.evidence:
        if e.status == "ok" and e.tool == d.tool and e.args == d.args:
            return Evidence(**base, status="skipped", error=f"same call already made as {e.id}; see its result"), []
    try:
        inp = tool.Input.model_validate(d.args)
    except ValidationError as exc:
        return Evidence(**base, status="failed", error=f"bad arguments: {exc.errors()[0]['msg']}"), []
    ctx = ToolContext(state=state, store=rt.store)
    t0 = time.perf_counter()
    future = rt._pool.submit(tool.run, ctx, inp)
    try:
        out = future.result(timeout=tool.timeout_s)
        status, error, output = "ok", None, out.model_dump(mode="json")
    except FutureTimeout:
        status, error, output = "failed", f"timed out after {tool.timeout_s:.0f} s", None
    except ToolError as exc:
        status, error, output = "failed", str(exc), None
    except Exception as exc:  # a tool never crashes the graph
        status, error, output = "failed", f"{type(exc).__name__}: {exc}", None
    dur = time.perf_counter() - t0
    conf = output.get("confidence") if isinstance(output, dict) else None
    ev = Evidence(**base, status=status, output=output, artifacts=list(ctx.artifacts) if status == "ok" else [],
                  new_views=[v.id for v in ctx.new_views] if status == "ok" else [], duration_s=round(dur, 4),
                  error=error, confidence=conf if isinstance(conf, int | float) else None)
    return ev, (ctx.new_views if status == "ok" else [])


def act(rt: Runtime, state: CaseState) -> dict[str, Any]:
    d = state.pending
    assert d is not None and d.action == "call"
    eid = f"E{len(state.evidence) + 1}"
    ev, new_views = _run_tool(rt, state, d, eid)
    refs: list[ArtifactRef] = list(ev.artifacts) + [v.pixels for v in new_views]
    for ref in refs:
        rt.trace.add_artifact(ref, rt.store.path(ref).stat().st_size)
    rt.record("tool", "act", ev.tool, {"evidence": ev.model_dump(mode="json"),
                                       "new_views": [v.model_dump(mode="json") for v in new_views]})
    line = f"[{eid}] {ev.tool} -> {ev.status}" + (f": {ev.error}" if ev.error else "")
    return {"evidence": state.evidence + [ev], "views": state.views + new_views, "pending": None,
            "tool_steps": state.tool_steps + 1, "steps": _log(state, "act", line)}


def rethink(rt: Runtime, state: CaseState) -> dict[str, Any]:
    c = critic.critique(state, rt.tools)
    rt.record("node", "rethink", "critique", c.model_dump())
    return {"critiques": state.critiques + [c], "steps": _log(state, "rethink", f"{c.route}: {c.why}")}


def report(rt: Runtime, state: CaseState) -> dict[str, Any]:
    from agent.report import compose

    rep, dropped = compose(state, rt.tools, planner_model=rt.planner.model_id, planner_mode=rt.planner.mode,
                           narrative_llm=rt.narrative_llm, record=rt.record)
    body = rep.model_dump(mode="json")
    rt.record("node", "report", "report", {"report": body, "dropped": dropped})
    rt.trace.finish_run(rt.run_id, "done", report=body)
    return {"report": body, "steps": _log(state, "report", f"{len(rep.findings)} finding(s); "
                                                            f"{rep.recommendation.outcome}")}


def _after_think(state: CaseState) -> str:
    return "act" if state.pending is not None and state.pending.action == "call" else "report"


def _after_rethink(state: CaseState) -> str:
    return state.critiques[-1].route if state.critiques else "think"


def build_graph(rt: Runtime, checkpointer: Any = None):
    g = StateGraph(CaseState)

    def wrap(fn):
        def node(state: CaseState) -> dict[str, Any]:
            update = fn(rt, state)
            if rt.on_step is not None:
                rt.on_step(fn.__name__, update)
            return update
        node.__name__ = fn.__name__
        return node

    for fn in (intake, think, act, rethink, report):
        g.add_node(fn.__name__, wrap(fn))
    g.add_edge(START, "intake")
    g.add_edge("intake", "think")
    g.add_conditional_edges("think", _after_think, {"act": "act", "report": "report"})
    g.add_edge("act", "rethink")
    g.add_conditional_edges("rethink", _after_rethink, {"think": "think", "report": "report"})
    g.add_edge("report", END)
    return g.compile(checkpointer=checkpointer)


_STATE_TYPES = [CaseState, Evidence, ImageView, ArtifactRef, Decision, Critique, StepLog, Budget]


def sqlite_checkpointer(path: str | Path) -> SqliteSaver:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")  # batch workers share this file
    allowed = [(t.__module__, t.__name__) for t in _STATE_TYPES]
    from agent.state import CaseInput

    allowed.append((CaseInput.__module__, CaseInput.__name__))
    return SqliteSaver(conn, serde=JsonPlusSerializer(allowed_msgpack_modules=allowed))


def new_run_id(seed: str = "") -> str:
    return "run-" + time.strftime("%Y%m%d-%H%M%S") + "-" + hashlib.sha256(f"{seed}{time.time_ns()}".encode()).hexdigest()[:6]
