"""The LangGraph state machine: intake → think → act → rethink → (think | answer) → answer → report → END.

intake also reads the question (agent/core/question.py) and finds the tools that can address its subject; when none
can, the graph goes straight to the answer step, which abstains with `no_applicable_tool` (no pointless calls).

Nodes are plain functions over `CaseState`; the objects they need (tools, planner, stores) live in a
`Runtime` the nodes close over. A checkpointer keyed by thread id (= run id; SQLite beside the trace store, or
LangGraph's PostgreSQL one on a postgresql:// store) persists the
state after every node, so an interrupted run resumes from its last completed step.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from pydantic import ValidationError

from agent.analysis.study import study_notes
from agent.core.errors import ControlSignal, SettingError
from agent.core.question import Question
from agent.core.state import Answer, ArtifactRef, Budget, CaseState, Critique, Decision, Evidence, ImageView, StepLog, Turn
from agent.core.tool import FindingDraft, Tool, ToolContext, ToolError
from agent.engine import critic
from agent.engine.planner import Planner, PlannerError
from agent.store.artifacts import ArtifactStore
from agent.store.trace import TraceStore


def stored_inputs(paths: list[str]) -> list[str]:
    """What the state (and so the checkpoint database) keeps of the input paths: "input 1", "input 2", ... A folder
    or file named after the patient (MRN12345_DOE_JANE/...) never leaves the user's command line."""
    return [f"input {i}" for i in range(1, len(paths) + 1)]


def redact_paths(text: str, paths: list[str]) -> str:
    """`text` with every input's path and file name replaced by "input N" (for the trace and the run's error)."""
    for i, p in enumerate(paths, 1):
        for s in sorted({str(p), str(Path(p).resolve()), Path(p).name} - {""}, key=len, reverse=True):
            text = text.replace(s, f"input {i}")
    return text


@dataclass
class Runtime:
    """What the nodes need, and every contact with the world outside the state: the clock, image loading, tool
    applicability and execution, the planner's LLM. Replay (agent/engine/replay.py) overrides exactly these methods to
    serve the recorded values, so the graph code itself runs unchanged."""

    tools: dict[str, Tool]
    planner: Planner
    store: ArtifactStore
    trace: TraceStore
    run_id: str = ""
    narrative_llm: Any = None  # an endpoint chat model that may write the impression
    answer_llm: Any = None  # the chat model of the answer step (the local model with token log-probabilities)
    on_step: Any = None  # callback(node, state_update) for live display
    now: float = 0.0  # the current node's clock reading: every budget decision in a node uses this one value
    cancel: Any = None  # a threading.Event: once set, the graph stops before its next node (chat's Ctrl-C)
    # run id -> the input paths: kept here, never in the state (which the checkpoint database stores); the state's
    # inputs.paths hold "input 1", ... (see stored_inputs)
    input_paths: dict[str, list[str]] = field(default_factory=dict)

    def record(self, kind: str, node: str, name: str, payload: dict[str, Any]) -> None:
        self.trace.record(self.run_id, kind, node, name, {**payload, "now": self.now})

    def clock(self, node: str) -> float:
        return time.time()

    def observe_intake(self, state: CaseState) -> dict[str, Any]:
        """Load the inputs into views and find which tools (and which of the user's model cards) apply."""
        from agent.analysis.learned import LearnedTool, model_used
        from agent.engine import worker
        from agent.imaging.loaders import ImageLoadError
        from agent.imaging.views import load_views

        paths = self.input_paths.get(state.run_id) or state.inputs.paths
        try:
            views = load_views(paths, self.store, modality=state.inputs.modality, body_part=state.inputs.body_part,
                               classify=worker.study_classifier(self.store))
        except ImageLoadError as exc:  # LangGraph stores a node's error in the checkpoints: no file names there
            safe = ImageLoadError(redact_paths(str(exc), paths))
            safe.local_message = str(exc)  # for the user's own terminal only (not in the exception's args)
            raise safe from None
        v1 = views[0]
        applicable, refused = [], {}
        for name, tool in self.tools.items():
            why = tool.applicable(v1)
            (refused.__setitem__(name, why) if why else applicable.append(name))
        # the user's model cards behind applicable learned tools: shown to the planner, recorded in the trace
        model_lines = [line for n in applicable for line in self.tools[n].prompt_lines(v1)]
        cards = [model_used(c).model_dump() | {"tool": n, "card_fields": c.model_dump(mode="json")}
                 for n in applicable if isinstance(self.tools[n], LearnedTool) for c in self.tools[n].cards(v1)]
        return {"views": views, "applicable": applicable, "not_applicable": refused, "model_lines": model_lines,
                "models": cards}

    def applicable(self, tool: Tool, view: ImageView) -> str | None:
        return tool.applicable(view)

    def execute(self, tool: Tool, ctx: ToolContext, inp: Any) -> tuple[str, str | None, dict | None, float]:
        """Run a tool under its timeout in a worker process that is stopped if it overruns (agent/engine/worker.py):
        (status, error, output, seconds). Artifacts and new views land in ctx."""
        from agent.engine import worker

        t0 = time.perf_counter()
        try:
            output, status, error = worker.call(tool, ctx, inp), "ok", None
        except (TimeoutError, ToolError, worker.ToolCrashed, worker.WorkerDied) as exc:
            status, error, output = "failed", str(exc), None
        except Exception as exc:  # a tool never crashes the graph
            status, error, output = "failed", f"{type(exc).__name__}: {exc}", None
        return status, error, output, time.perf_counter() - t0

    def planner_images(self, state: CaseState) -> list[dict[str, Any]]:
        """The pictures a vision-capable planner gets this step (agent/llm/pictures.py), kept as the run's artifacts."""
        from agent.llm import pictures as vision

        cfg = self.planner.vision
        parts = vision.image_parts(self.store, vision.planner_views(state, cfg.max_images), cfg.image_max_px,
                                   cfg.redact_corners)
        self.keep_artifacts([ArtifactRef.model_validate(p["ref"]) for p in parts])
        return parts

    def keep_artifacts(self, refs: list[ArtifactRef]) -> None:
        for ref in refs:
            self.trace.add_artifact(ref, self.store.path(ref).stat().st_size)


class TurnCancelled(ControlSignal):  # not a failure of the run: nothing records it as one
    """The user cancelled: raised before the next node; every completed node's result is checkpointed."""


def _log(rt: Runtime, state: CaseState, node: str, summary: str) -> list[StepLog]:
    return state.steps + [StepLog(step=len(state.steps) + 1, node=node, summary=summary, t=rt.now)]


def understand(rt: Runtime, state: CaseState, applicable: list[str], views: list[ImageView]) -> dict[str, Any]:
    """The question as understood and the applicable tools that can address its subject."""
    from agent.core.question import asked_part, parse_question
    from agent.engine.addressing import can_address

    q = parse_question(state.question)
    asked = asked_part(state.question)  # the sentence(s) that ask: what follows cannot steer the reading
    how = os.environ.get("DXAGENT_READING", "rules")  # rules (default) | learned | shots | hybrid | model
    if how == "learned":  # agent/engine/learned_reading.py
        from agent.engine.learned_reading import LearnedReader

        q = LearnedReader.load().read(asked).model_copy(update={"text": state.question})
    elif how == "shots" and not (q.describe and q.sure):  # agent/engine/reading.py ShotReader; "Describe the
        # findings" asks for no subject
        from agent.engine.reading import ShotReader

        q = ShotReader.shared().read(asked).model_copy(update={"text": state.question})
    elif how in ("hybrid", "model") and (how == "model" or not q.sure) and getattr(rt, "planner", None) is not None:
        from agent.engine.reading import ModelReader

        chat = rt.answer_llm if getattr(rt, "answer_llm", None) is not None else rt.planner.chat
        q = ModelReader(chat, rt.planner.model_id).read(asked).model_copy(update={"text": state.question})
    addressing = [n for n in applicable if n in rt.tools and can_address(q, rt.tools[n], views[0])]
    if q.kind in ("yes_no", "choice", "count"):  # a closed answer's threshold depends on how near its wording is to
        # the questions the answer calibration was measured on (an open or routed measurement question loads nothing)
        from agent.engine.worker import ask

        scope = next((got for n in applicable if n in rt.tools and (got := ask(rt.tools[n], "question_scope", q.text))),
                     None)
        q = q.model_copy(update={"wording": scope[0] if scope else None})
    # a tool that answers the question itself (the VQA expert) first: once a measuring tool states the subject the
    # loop answers, and the answer step can weigh only what ran
    addressing.sort(key=lambda n: not rt.tools[n].answers_questions)
    return {"question_info": q, "addressing_tools": addressing, "answer": None}


def _question_payload(u: dict[str, Any]) -> dict[str, Any]:
    return {"question": u["question_info"].model_dump(mode="json"), "addressing_tools": u["addressing_tools"]}


def intake(rt: Runtime, state: CaseState) -> dict[str, Any]:
    if state.views:  # a chat turn (the case is loaded): only the new question is read
        u = understand(rt, state, state.applicable_tools, state.views)
        rt.record("node", "intake", "question", _question_payload(u))
        return u
    facts = rt.observe_intake(state)
    views, applicable = facts["views"], facts["applicable"]
    v1 = views[0]
    notes = []
    if not v1.spacing_known:
        notes.append("Pixel spacing is unknown: measurements are in pixels, not mm.")
    notes += study_notes(v1)  # how the modality was found (classifier, rules), and whether it is uncertain
    rt.keep_artifacts([v.pixels for v in views])
    budget = state.budget.model_copy(update={"started_at": rt.now})
    u = understand(rt, state, applicable, views)
    summary = (f"{len(views)} view(s); {v1.modality} {v1.ndim_spatial}D {list(v1.shape)}; {len(applicable)} tools apply; "
               f"{u['question_info'].kind} question about {u['question_info'].subject or '-'}, "
               f"{len(u['addressing_tools'])} tool(s) can address it")
    rt.record("node", "intake", "intake", {
        "views": [v.model_dump(mode="json") for v in views], "applicable": applicable,
        "not_applicable": facts["not_applicable"], "notes": notes, "models": facts["models"],
        "model_lines": facts["model_lines"], **_question_payload(u)})
    return {"views": views, "applicable_tools": applicable, "model_lines": facts["model_lines"],
            "notes": state.notes + notes, "budget": budget, **u,
            "steps": _log(rt, state, "intake", summary)}


def route(state: CaseState, tools: dict[str, Tool]) -> Decision | None:
    """The step to take without asking the planner: a box-prompted segmenter on a detector's boxes that none has taken yet
    (what the critic would suggest); for "describe the findings", each quantitative tool made for the study's modality
    (its own `modalities`: the lung fields and the cardiothoracic ratio on a radiograph, the organs and the tissue
    composition on CT) and each tool that declares it starts that modality's description (`describes`: the lesion
    segmenter on ultrasound, dermoscopy and endoscopy, the texture of a pathology tile), then the planner; for a
    question that names a subject, a call of the first tool that addresses it (intake's `addressing_tools`, in order),
    needs no region and has not been called yet - "Does the picture contain a kidney?" goes straight to the organ
    segmenter, "How is this disease treated?" to the VQA expert and the knowledge graph - or the answer once every
    addressing tool has run (a call of a tool that cannot state the subject cannot answer it). On SLAKE validate the
    planner, asked instead, chose the same tools in 75 of 76 open questions at about 11 s a decision, then re-called
    them.
    None: the planner decides (no tool addresses the subject, a tool that needs a region, a derived view)."""
    q = state.question_info
    if state.budget.route and (chains := critic.pending_chains(state, tools)):  # a detector's boxes: segment them
        from agent.analysis.learned import LearnedTool

        e, n, seg, args = chains[0]
        choice = tools[seg].cards(state.view(args.get("view", "V1"))) if isinstance(tools[seg], LearnedTool) else []
        if len(choice) <= 1:  # which of several of the user's models: the planner's choice, not the router's
            return Decision(action="call", tool=seg, args=args, reason=f"routed: segment the {n} box(es) of {e.id}")
    called = {e.tool for e in state.evidence}
    if state.budget.route and q is not None and q.describe:  # "describe the findings": the modality's own tools first
        from agent.analysis.learned import LearnedTool

        modality, v1 = state.views[0].modality, state.views[0]
        # a generic learned tool (its card decides where it applies: the user's detector, segmenter or classifier)
        # whose one card fits this case was made for it, so it goes first
        own = [n for n in state.applicable_tools if isinstance(tools.get(n), LearnedTool) and tools[n].modalities is None
               and tools[n].kind in ("detect", "segment", "classify") and len(tools[n].cards(v1)) == 1
               and not tools[n].answers_questions]
        declared = [n for n in state.applicable_tools if n in tools and modality in tools[n].describes]
        for name in dict.fromkeys([*own, *state.addressing_tools, *declared]):
            tool = tools.get(name)
            declares = modality in tool.describes if tool is not None else False
            if tool is None or name in called or (tool.requires_region() and not (declares and tool.describe_args)) \
                    or (tool.modalities is None and not declares and name not in own):
                continue
            return Decision(action="call", tool=name, args={"view": "V1", **(tool.describe_args if declares else {})},
                            reason=f"routed: {name} is made for {modality}; a description starts there")
        return None
    if not state.budget.route or q is None or not state.addressing_tools:
        return None
    for name in state.addressing_tools:
        tool = tools.get(name)
        if tool is None or name in called or tool.requires_region() or name not in state.applicable_tools:
            continue
        for first in tool.reads_first(q.text):  # the evidence it reads (the organs present for a system's members)
            if first in tools and first not in called and first in state.applicable_tools \
                    and not tools[first].requires_region():
                return Decision(action="call", tool=first, args={"view": "V1"},
                                reason=f"routed: {name} reads what {first} states, so {first} first")
        return Decision(action="call", tool=name, args={"view": "V1"},
                        reason=f"routed: {name} can state the question's subject ({q.subject or q.kind})")
    if state.addressing_tools and all(n in called for n in state.addressing_tools):
        # every tool that could state the subject has run and none did: another call cannot answer it
        return Decision(action="answer", reason=f"routed: every tool that can address {q.subject or q.kind} has run")
    return None


def think(rt: Runtime, state: CaseState) -> dict[str, Any]:
    left = state.budget.max_steps - state.tool_steps
    if left <= 0 or state.budget.elapsed(rt.now) >= state.budget.max_wall_s:
        decision = Decision(action="answer", reason="budget spent")
        update: dict[str, Any] = {}
    elif (decision := route(state, rt.tools)) is not None:
        update = {}
    else:
        try:
            images = rt.planner_images(state) if rt.planner.vision else None
            decision = rt.planner.decide(state, rt.tools, now=rt.now, images=images)
            update = {}
        except PlannerError as exc:
            decision = Decision(action="answer", reason="planner failed")
            update = {"planner_failures": state.planner_failures + 1,
                      "notes": state.notes + [f"Planner failed at step {state.tool_steps + 1}: {exc}"]}
    what = f"answer ({decision.reason})" if decision.action == "answer" else f"{decision.tool} {decision.args}"
    rt.record("node", "think", "decision", {"decision": decision.model_dump()})
    return {**update, "pending": decision, "steps": _log(rt, state, "think", what)}


def _run_tool(rt: Runtime, state: CaseState, d: Decision, eid: str) -> tuple[Evidence, list[ImageView], dict]:
    """The evidence of one call, its new views, and what was observed of the world (for the trace)."""
    tool = rt.tools.get(d.tool or "")
    base = {"id": eid, "tool": d.tool or "?", "tool_version": getattr(tool, "version", "?"), "args": d.args,
            "step": state.tool_steps + 1}
    if tool is None or d.tool not in state.applicable_tools:
        return Evidence(**base, status="refused", error=f"{d.tool} is not applicable to this case"), [], {}
    try:
        view = state.view(d.args.get("view", "V1"))
    except KeyError as exc:
        return Evidence(**base, status="refused", error=str(exc.args[0])), [], {}
    why = rt.applicable(tool, view)
    if why:
        return Evidence(**base, status="refused", error=why), [], {"applicable": why}
    for e in state.evidence:
        if e.status == "ok" and e.tool == d.tool and e.args == d.args:
            return Evidence(**base, status="skipped", error=f"same call already made as {e.id}; see its result"), [], \
                {"applicable": None}
    try:
        inp = tool.Input.model_validate(d.args)
    except ValidationError as exc:
        return Evidence(**base, status="failed", error=f"bad arguments: {exc.errors()[0]['msg']}"), [], \
            {"applicable": None}
    ctx = ToolContext(state=state, store=rt.store, findings=stated_findings(state, rt.tools))
    status, error, output, dur = rt.execute(tool, ctx, inp)
    conf = output.get("confidence") if isinstance(output, dict) else None
    ev = Evidence(**base, status=status, output=output, artifacts=list(ctx.artifacts) if status == "ok" else [],
                  new_views=[v.id for v in ctx.new_views] if status == "ok" else [], duration_s=round(dur, 4),
                  error=error, confidence=conf if isinstance(conf, int | float) else None)
    return ev, (ctx.new_views if status == "ok" else []), {"applicable": None, "executed": True}


def stated_findings(state: CaseState, tools: dict[str, Tool]) -> dict[str, list[FindingDraft]]:
    """What each successful earlier call states, by evidence id (ToolContext.findings: a tool may build on it)."""
    from agent.engine.addressing import findings_of

    out = {}
    for e in state.evidence:
        try:
            if e.status == "ok" and (found := findings_of(e, state, tools)):
                out[e.id] = found
        except Exception:  # noqa: BLE001 - an output its tool cannot read back states nothing here
            continue
    return out


def act(rt: Runtime, state: CaseState) -> dict[str, Any]:
    d = state.pending
    assert d is not None and d.action == "call"
    eid = f"E{len(state.evidence) + 1}"
    ev, new_views, observed = _run_tool(rt, state, d, eid)
    rt.keep_artifacts(list(ev.artifacts) + [v.pixels for v in new_views])
    rt.record("tool", "act", ev.tool, {"evidence": ev.model_dump(mode="json"),
                                       "new_views": [v.model_dump(mode="json") for v in new_views], **observed})
    line = f"[{eid}] {ev.tool} -> {ev.status}" + (f": {ev.error}" if ev.error else "")
    return {"evidence": state.evidence + [ev], "views": state.views + new_views, "pending": None,
            "tool_steps": state.tool_steps + 1, "steps": _log(rt, state, "act", line)}


def rethink(rt: Runtime, state: CaseState) -> dict[str, Any]:
    c = critic.critique(state, rt.tools, now=rt.now)
    rt.record("node", "rethink", "critique", c.model_dump())
    return {"critiques": state.critiques + [c], "steps": _log(rt, state, "rethink", f"{c.route}: {c.why}")}


def answer(rt: Runtime, state: CaseState) -> dict[str, Any]:
    """Compose the answer from the evidence about the question's subject (agent/engine/answer.py)."""
    from agent.engine.answer import compose_answer
    from agent.engine.planner import case_line

    chat = rt.answer_llm if rt.answer_llm is not None else rt.planner.chat
    a = compose_answer(state, rt.tools, chat=chat, model_id=rt.planner.model_id, record=rt.record,
                       case_line=case_line(state))
    rt.record("node", "answer", "answer", {"answer": a.model_dump(mode="json")})
    what = f"{a.kind}: {a.value}" if a.answered else f"abstain ({a.reason})"
    return {"answer": a, "steps": _log(rt, state, "answer", what)}


def report(rt: Runtime, state: CaseState) -> dict[str, Any]:
    from agent.engine.report import compose

    rep, dropped = compose(state, rt.tools, planner_model=rt.planner.model_id, planner_mode=rt.planner.mode,
                           narrative_llm=rt.narrative_llm, record=rt.record)
    body = rep.model_dump(mode="json")
    rt.record("node", "report", "report", {"report": body, "dropped": dropped})
    rt.trace.finish_run(rt.run_id, "done", report=body)
    return {"report": body, "steps": _log(rt, state, "report", f"{len(rep.findings)} finding(s); "
                                                            f"{rep.recommendation.outcome}")}


def _after_intake(state: CaseState) -> str:
    return "think" if state.addressing_tools else "answer"


def _after_think(state: CaseState) -> str:
    return "act" if state.pending is not None and state.pending.action == "call" else "answer"


def _after_rethink(state: CaseState) -> str:
    route = state.critiques[-1].route if state.critiques else "think"
    return "answer" if route == "report" else route


def build_graph(rt: Runtime, checkpointer: Any = None):
    g = StateGraph(CaseState)

    def wrap(fn):
        def node(state: CaseState) -> dict[str, Any]:
            if rt.cancel is not None and rt.cancel.is_set():
                raise TurnCancelled(fn.__name__)
            rt.now = rt.clock(fn.__name__)
            update = fn(rt, state)
            if rt.on_step is not None:
                rt.on_step(fn.__name__, update)
            return update
        node.__name__ = fn.__name__
        return node

    for fn in (intake, think, act, rethink, answer, report):
        g.add_node(fn.__name__, wrap(fn))
    g.add_edge(START, "intake")
    g.add_conditional_edges("intake", _after_intake, {"think": "think", "answer": "answer"})
    g.add_conditional_edges("think", _after_think, {"act": "act", "answer": "answer"})
    g.add_edge("act", "rethink")
    g.add_conditional_edges("rethink", _after_rethink, {"think": "think", "answer": "answer"})
    g.add_edge("answer", "report")
    g.add_edge("report", END)
    return g.compile(checkpointer=checkpointer)


_STATE_TYPES = [CaseState, Evidence, ImageView, ArtifactRef, Decision, Critique, StepLog, Budget, Turn, Answer, Question]


def _serde() -> JsonPlusSerializer:
    allowed = [(t.__module__, t.__name__) for t in _STATE_TYPES]
    from agent.core.state import CaseInput

    allowed.append((CaseInput.__module__, CaseInput.__name__))
    return JsonPlusSerializer(allowed_msgpack_modules=allowed)


def sqlite_checkpointer(path: str | Path) -> SqliteSaver:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")  # batch workers share this file
    return SqliteSaver(conn, serde=_serde())


_PG_SAVERS: dict[tuple[int, str], Any] = {}  # (pid, url) -> the process's PostgreSQL checkpointer (its pool)
_PG_LOCK = threading.Lock()  # guards the dict only
_SETUP_LOCK = 0x6478_6163  # the advisory lock held while the checkpoint tables are created or migrated


def postgres_checkpointer(db_url: str) -> Any:
    """LangGraph's own PostgreSQL checkpointer (langgraph-checkpoint-postgres) on the trace store's database: one per
    process, over a psycopg pool of DXAGENT_DB_POOL connections (checked before use, so a restarted server's dead
    ones are replaced; a connection waited for at most 10 s). Its tables are created once per process, under an
    advisory lock, so that many workers starting at once do not race to create them."""
    from agent.store.trace import CONNECT_TIMEOUT_S, libpq_url, pool_size, shown_url, unavailable

    try:
        from langgraph.checkpoint.postgres import PostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool
    except ModuleNotFoundError as exc:
        raise SettingError(f"--db-url {shown_url(db_url)} needs the PostgreSQL checkpointer ({exc.name} is not "
                           "installed): pip install 'dxagent[postgres]'") from None
    # the pool retries lost connections in the background and logs each try; the failure a run meets is its own one
    # line (StoreUnavailable), so those logs go nowhere unless the application configured logging
    logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
    key = (os.getpid(), db_url)
    with _PG_LOCK:
        saver = _PG_SAVERS.get(key)
        if saver is not None:
            return saver
        n = pool_size()
        pool = ConnectionPool(libpq_url(db_url), min_size=1, max_size=n, timeout=CONNECT_TIMEOUT_S, open=True,
                              check=ConnectionPool.check_connection, name="dxagent-checkpoints",
                              kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row,
                                      "connect_timeout": CONNECT_TIMEOUT_S, "application_name": "dxagent"})
        try:
            with pool.connection() as conn:
                conn.execute("SELECT pg_advisory_lock(%s)", (_SETUP_LOCK,))
                try:
                    PostgresSaver(conn, serde=_serde()).setup()
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK,))
        except Exception as exc:
            pool.close()
            err = unavailable(exc, db_url)
            if err is None:
                raise
            raise err from None
        saver = _PG_SAVERS[key] = PostgresSaver(pool, serde=_serde())
        return saver


def _close_pg_savers() -> None:
    """At exit: the process's checkpoint pools closed (their connections ended politely, their threads stopped)."""
    for saver in list(_PG_SAVERS.values()):
        try:
            saver.conn.close(timeout=1.0)
        except Exception:
            pass
    _PG_SAVERS.clear()


atexit.register(_close_pg_savers)


def checkpointer(db_url: str | None, trace_dir: str | Path) -> Any:
    """The checkpointer beside a trace store: on PostgreSQL in the same database (postgres_checkpointer), else the
    SQLite file <trace_dir>/checkpoints.sqlite (also when --db-url names another SQLite file, as before)."""
    from agent.store.trace import engine_url

    if db_url and engine_url(db_url).startswith("postgresql"):
        return postgres_checkpointer(db_url)
    return sqlite_checkpointer(Path(trace_dir) / "checkpoints.sqlite")


def close_checkpointer(saver: Any) -> None:
    """Close what a checkpointer holds for one engine: a SQLite connection. A PostgreSQL one is the process's, shared
    by its engines, and stays open."""
    if isinstance(saver, SqliteSaver):
        saver.conn.close()


def new_run_id(seed: str = "") -> str:
    return "run-" + time.strftime("%Y%m%d-%H%M%S") + "-" + hashlib.sha256(f"{seed}{time.time_ns()}".encode()).hexdigest()[:6]
