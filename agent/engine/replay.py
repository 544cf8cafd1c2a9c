"""Replay a recorded run for an audit, or re-run it live and diff.

`replay(dump)` re-executes the graph code with every contact with the outside world served from the record:
the clock, image loading and tool applicability (intake), each tool's output, and each LLM reply. No model is
loaded and no input file is needed. Every event the graph records is compared, in order, with the recorded one
(the LLM request with its full prompts, the decision, the evidence, the critique, the report), so the first
step where today's code behaves differently from the recorded run is named with a diff. A replay that matches
to the end has rebuilt the report byte for byte.

`rerun(dump, paths)` runs the same case again with live models and tools and lists what changed: the planner's
choices, the tools' outputs and the report's fields.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from agent.core.state import ArtifactRef, Budget, CaseInput, CaseState, ImageView
from agent.core.tool import Tool, ToolContext
from agent.engine.graph import Runtime, build_graph
from agent.engine.planner import _JSON_OBJECT_ENDPOINTS, Planner
from agent.store.trace import canonical, run_report, stored_json

VOLATILE = ("now", "latency_s")  # served (the clock) or measured around a served reply: not compared
DRIFT_OK = (("report", "versions", "libraries"), ("report", "versions", "dxagent"))  # warn, don't fail


class Divergence(BaseException):  # noqa: N818 - BaseException: no `except Exception` in a tool or the planner hides it
    """The replayed run did something other than the recorded one."""

    def __init__(self, seq: int, where: str, message: str, recorded: Any = None, replayed: Any = None):
        super().__init__(f"event {seq} ({where}): {message}")
        self.seq, self.where, self.message, self.recorded, self.replayed = seq, where, message, recorded, replayed

    def diff(self, max_lines: int = 60) -> str:
        lines = list(difflib.unified_diff(flatten(self.recorded), flatten(self.replayed), "recorded", "replayed",
                                          lineterm="", n=1))
        return "\n".join(lines[:max_lines] + ([f"... {len(lines) - max_lines} more diff lines"]
                                              if len(lines) > max_lines else []))


def flatten(obj: Any, path: str = "") -> list[str]:
    """`path: value` lines, a multi-line string one line per line, so a diff shows the changed words."""
    if isinstance(obj, dict):
        return [line for k in sorted(obj) for line in flatten(obj[k], f"{path}.{k}" if path else str(k))]
    if isinstance(obj, list):
        return [line for i, x in enumerate(obj) for line in flatten(x, f"{path}[{i}]")] or [f"{path}: []"]
    if isinstance(obj, str) and "\n" in obj:
        return [f"{path}| {line}" for line in obj.split("\n")]
    return [f"{path}: {json.dumps(obj, ensure_ascii=False)}"]


def _plain(payload: dict[str, Any]) -> dict[str, Any]:
    """A payload as stored (texts bounded as the trace bounds them), less the volatile keys."""
    return {k: v for k, v in json.loads(stored_json(payload)).items() if k not in VOLATILE}


def _without(obj: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    obj = json.loads(canonical(obj))
    for p in paths:
        node = obj
        for k in p[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(p[-1], None)
    return obj


def _where(ev: dict[str, Any]) -> str:
    return f"{ev['kind']} {ev['node']} {ev['name']}"


def _drop_interrupted(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A resumed run re-ran the node it was killed in: drop that node's events before the resume note (they were
    recorded, then lost with the unsaved checkpoint) so the record reads as the graph executed it."""
    out: list[dict[str, Any]] = []
    for ev in events:
        if ev["kind"] == "note" and ev["name"] == "resume":
            redo = set(ev["payload"].get("next") or [])
            while out and out[-1]["node"] in redo and out[-1]["kind"] != "note":
                out.pop()
        out.append(ev)
    return out


class ReplayLog:
    """The recorded events, consumed in order; resume notes shift the served clock by the pause they skipped."""

    def __init__(self, events: list[dict[str, Any]]):
        self.events = _drop_interrupted(events)
        self.pos = 0
        self.shift = 0.0
        self.warnings: list[str] = []

    def _skip_notes(self) -> None:
        while self.pos < len(self.events) and self.events[self.pos]["kind"] == "note" \
                and self.events[self.pos]["name"] == "resume":
            self.shift += float(self.events[self.pos]["payload"].get("paused_s") or 0.0)
            self.pos += 1

    def peek(self, what: str, kind: str | None = None, name: str | None = None) -> dict[str, Any]:
        self._skip_notes()
        if self.pos >= len(self.events):
            raise Divergence(self.pos, "end of record", f"the replay needs {what}, but the record has ended")
        ev = self.events[self.pos]
        if (kind and ev["kind"] != kind) or (name and ev["name"] != name):
            raise Divergence(ev["seq"], _where(ev), f"the replay needs {what} here; the record has {_where(ev)}")
        return ev

    def expect(self, kind: str, node: str, name: str, payload: dict[str, Any]) -> None:
        self._skip_notes()
        got = {"kind": kind, "node": node, "name": name, "payload": _plain(payload)}
        if self.pos >= len(self.events):
            raise Divergence(self.pos, f"{kind} {node} {name}", "the replay recorded an event the record does not have",
                             None, got)
        ev = self.events[self.pos]
        want = {"kind": ev["kind"], "node": ev["node"], "name": ev["name"], "payload": _plain(ev["payload"])}
        if canonical(want) != canonical(got):  # key order counts: the report must come out byte for byte
            drift = tuple(("payload",) + p for p in DRIFT_OK)
            if canonical(_without(want, drift)) != canonical(_without(got, drift)):
                raise Divergence(ev["seq"], _where(ev), "the replayed event differs from the recorded one", want, got)
            self.warnings.append(f"event {ev['seq']} ({_where(ev)}): library or dxagent versions differ from the "
                                 "recording (behaviour identical)")
        self.pos += 1

    def rest(self) -> list[dict[str, Any]]:
        self._skip_notes()
        return self.events[self.pos:]


class _ReplayTrace:
    """Stands in for the TraceStore: each event the graph records is checked against the record."""

    def __init__(self, log: ReplayLog):
        self.log = log

    def record(self, run_id: str, kind: str, node: str, name: str, payload: dict[str, Any]) -> None:
        self.log.expect(kind, node, name, payload)

    def add_artifact(self, *_: Any) -> None:
        pass

    def finish_run(self, *_: Any, **__: Any) -> None:
        pass


def _recorded_exception(text: str) -> Exception:
    """An exception whose `f"{type}: {message}"` is the recorded text, so the graph records the same line."""
    name, _, msg = text.partition(": ")
    return type(name if name.isidentifier() else "RecordedError", (Exception,), {})(msg)


class _RecordedRefusal(Exception):
    """The endpoint's recorded refusal of response_format json_schema (its text is what the planner kept)."""

    status_code = 400


class ReplayChat(BaseChatModel):
    """Serves the recorded LLM replies in order; reports the recorded backend's type so the planner builds the
    same request (the request itself is then compared with the record when the planner records it)."""

    log: Any
    llm_type: str = "llama-cpp"

    @property
    def _llm_type(self) -> str:
        return self.llm_type

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=tools, **kwargs)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        ev = self.log.peek("an LLM reply", kind="llm")
        p = ev["payload"]
        rejected = (p.get("params") or {}).get("json_schema_rejected")
        if rejected and (kwargs.get("response_format") or {}).get("type") == "json_schema":
            raise _RecordedRefusal(rejected)  # the endpoint refused json_schema, as recorded
        if "error" in p:
            raise _recorded_exception(p["error"])
        resp = p.get("response")
        if isinstance(resp, str):  # the report's impression
            msg = AIMessage(content=resp)
        else:
            calls = [{"name": c["name"], "args": c["args"], "id": f"call_{i}", "type": "tool_call"}
                     for i, c in enumerate(resp.get("tool_calls") or [])]
            msg = AIMessage(content=resp.get("content") or "", tool_calls=calls,
                            invalid_tool_calls=resp.get("invalid_tool_calls") or [],
                            response_metadata=dict(p.get("metadata") or {}), usage_metadata=p.get("usage") or None)
        return ChatResult(generations=[ChatGeneration(message=msg)])


@dataclass
class ReplayRuntime(Runtime):
    log: ReplayLog | None = None

    def clock(self, node: str) -> float:
        ev = self.log.peek(f"the {node} step")
        if "now" not in ev["payload"]:
            raise Divergence(ev["seq"], _where(ev), "the record has no clock readings (written by an older dxagent)")
        return float(ev["payload"]["now"]) - self.log.shift

    def observe_intake(self, state: CaseState) -> dict[str, Any]:
        p = self.log.peek("the intake", kind="node", name="intake")["payload"]
        return {"views": [ImageView.model_validate(v) for v in p["views"]], "applicable": list(p["applicable"]),
                "not_applicable": dict(p.get("not_applicable") or {}), "model_lines": list(p.get("model_lines") or []),
                "models": list(p.get("models") or [])}

    def _tool_event(self, tool: Tool, what: str) -> dict[str, Any]:
        ev = self.log.peek(f"{what} of {tool.name}", kind="tool", name=tool.name)
        return ev

    def applicable(self, tool: Tool, view: ImageView) -> str | None:
        ev = self._tool_event(tool, "the applicability check")
        if "applicable" not in ev["payload"]:
            raise Divergence(ev["seq"], _where(ev), f"the replay checks whether {tool.name} applies; the recorded "
                                                    "run did not get that far")
        return ev["payload"]["applicable"]

    def execute(self, tool: Tool, ctx: ToolContext, inp: Any) -> tuple[str, str | None, dict | None, float]:
        ev = self._tool_event(tool, "the output")
        if not ev["payload"].get("executed", True):
            raise Divergence(ev["seq"], _where(ev), f"the replay runs {tool.name}; the recorded run did not")
        e = ev["payload"]["evidence"]
        ctx.artifacts[:] = [ArtifactRef.model_validate(a) for a in e.get("artifacts") or []]
        ctx.new_views[:] = [ImageView.model_validate(v) for v in ev["payload"].get("new_views") or []]
        return e["status"], e.get("error"), e.get("output"), float(e.get("duration_s") or 0.0)

    def planner_images(self, state: CaseState) -> list[dict[str, Any]]:
        """The pictures the recorded think step sent, as the trace names them (by sha256; no pixels, no endpoint)."""
        ev = self.log.peek("the planner's pictures", kind="llm")
        return list((ev["payload"].get("request") or {}).get("images") or [])

    def keep_artifacts(self, refs: list[ArtifactRef]) -> None:
        pass


@dataclass
class ReplayResult:
    run_id: str
    verified: bool
    events: int  # recorded events matched
    llm_calls: int
    tool_calls: int
    report: dict[str, Any] | None = None
    report_sha256: str | None = None
    divergence: Divergence | None = None
    warnings: list[str] = field(default_factory=list)


def _settings(run: dict[str, Any]) -> dict[str, Any]:
    raw = run.get("settings") or "{}"
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def _llm_type(run: dict[str, Any], settings: dict[str, Any]) -> str:
    if settings.get("llm_type"):
        return settings["llm_type"]
    llm = run.get("llm") or ""
    return "scripted" if llm == "scripted" else "openai-chat" if llm.startswith("openai:") else "llama-cpp"


def report_sha256(report: dict[str, Any] | None) -> str | None:
    return None if report is None else hashlib.sha256(canonical(report).encode()).hexdigest()


def replay(dump: dict[str, Any], tools: dict[str, Tool] | None = None) -> ReplayResult:
    """Re-execute one recorded run (a `TraceStore.dump` / `trace export` dict) against its own record."""
    from agent.engine.session import error_message
    from agent.engine.session import tools as default_tools

    run = dump["run"]
    settings = _settings(run)
    if settings.get("baseline"):
        raise ValueError(f"{run['id']} is an eval baseline ({settings['baseline']}): one LLM call, whose prompt and reply "
                         "are in the trace (`dxagent trace show`); replay covers agent runs")
    if settings.get("chat"):
        raise ValueError(f"{run['id']} is a chat thread: replay covers single runs (`dxagent run`, batch) for now; "
                         "`dxagent trace verify` checks its record")
    # exports (DICOM objects written after the run, agent/app/dicom_out.py) are not the graph's: the chain and the
    # seal cover them (`dxagent trace verify`), replay does not re-create them
    events = [e for e in dump["events"] if e["kind"] != "export"]
    log = ReplayLog(events)
    chat = ReplayChat(log=log, llm_type=_llm_type(run, settings))
    planner = Planner(chat, run.get("llm") or "custom", run.get("planner_mode") or "json",
                      with_reason=settings.get("with_reason"),
                      optional_args=settings.get("optional_args", True))  # recorded before it was a setting: offered
    planner.token_budget = settings.get("token_budget")
    if settings.get("vision"):
        from agent.llm.endpoints import Vision

        planner.vision = Vision.model_validate(settings["vision"])
    first = next((e["payload"] for e in events if e["kind"] == "llm" and e["node"] == "think"), None)
    if first and (first.get("params") or {}).get("response_format", {}).get("type") == "json_object" \
            and chat.llm_type not in ("llama-cpp", "scripted") and "json_schema_rejected" not in first["params"]:
        _JSON_OBJECT_ENDPOINTS.add(planner.model_id)  # the endpoint's refusal was learnt before this run
    else:
        _JSON_OBJECT_ENDPOINTS.discard(planner.model_id)
    narrative = settings.get("narrative", any(e["kind"] == "llm" and e["node"] == "report" for e in events))
    rt = ReplayRuntime(tools=tools or default_tools(), planner=planner, store=_NullStore(), trace=_ReplayTrace(log),
                       run_id=run["id"], narrative_llm=chat if narrative else None, answer_llm=chat, log=log)
    planner.record = lambda kind, node, name, payload: rt.record(kind, node, name, payload)
    graph = build_graph(rt)
    max_steps = int(settings.get("max_steps", 6))
    state = CaseState(case_id=run["case_id"], run_id=run["id"], question=run.get("question") or "",
                      inputs=CaseInput(paths=[], modality=settings.get("modality"), body_part=settings.get("body_part")),
                      clinical_context=settings.get("clinical_context") or "",
                      budget=Budget(max_steps=max_steps, max_wall_s=float(settings.get("max_wall_s", 300.0)),
                                    route=bool(settings.get("route", False))))  # traces before routing: none
    counts = {"llm": 0, "tool": 0}
    for e in log.events:
        if e["kind"] in counts:
            counts[e["kind"]] += 1
    result = ReplayResult(run_id=run["id"], verified=False, events=0, llm_calls=counts["llm"],
                          tool_calls=counts["tool"])
    try:
        try:
            from agent.engine import calibration

            with calibration.threshold(settings.get("min_probability"),  # the thresholds the run answered under
                                       settings.get("min_probability_new_wording")):
                final = graph.invoke(state, {"recursion_limit": 4 * max_steps + 12})
            result.report = final.get("report")
        except Exception as exc:  # the recorded run may have failed the same way
            rt.record("note", "error", "error", {"error": error_message(exc)})
        left = log.rest()
        if left:
            raise Divergence(left[0]["seq"], _where(left[0]), f"the replay ended; the record has {len(left)} more event(s)",
                             {"kind": left[0]["kind"], "payload": _plain(left[0]["payload"])}, None)
        recorded = run_report(run)
        if recorded is not None and result.report is not None:
            drift = tuple(p[1:] for p in DRIFT_OK)
            if canonical(_without(recorded, drift)) != canonical(_without(json.loads(stored_json(result.report)),
                                                                          drift)):
                raise Divergence(len(events), "run report", "the replayed report differs from the run's stored report",
                                 recorded, result.report)
        result.verified = True
    except Divergence as div:
        result.divergence = div
    result.events = log.pos
    result.report_sha256 = report_sha256(result.report)
    result.warnings = log.warnings
    return result


class _NullStore:
    """Replay reads no pixels: tools are served from the record. Anything that tries says so."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"replay touched the artifact store ({name}); every pixel access belongs to a tool")


# -- re-run with live models and tools ------------------------------------------------------------------------------

def _decisions(dump: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["payload"]["decision"] for e in dump["events"] if e["kind"] == "node" and e["name"] == "decision"]


def _evidence(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for e in dump["events"]:
        if e["kind"] == "tool":
            ev = dict(e["payload"]["evidence"])
            ev.pop("duration_s", None)
            out[ev["id"]] = ev
    return out


def _report(dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (run_report(dump["run"]) or {}).items() if k != "run_id"}


def _pairs(a: Any, b: Any) -> list[tuple[str, str, str]]:
    """(path, recorded, rerun) for each leaf that differs."""
    fa = dict(line.split(": ", 1) if ": " in line else (line, "") for line in flatten(a))
    fb = dict(line.split(": ", 1) if ": " in line else (line, "") for line in flatten(b))
    return [(k, fa.get(k, "—"), fb.get(k, "—")) for k in sorted(set(fa) | set(fb), key=lambda k: (k not in fa, k))
            if fa.get(k) != fb.get(k)]


def diff_runs(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """What changed between two runs of the same case: (area, path, recorded, rerun) rows, areas being
    'llm' (the planner's choices), 'tool' (outputs per evidence id) and 'report' (fields)."""
    rows: list[tuple[str, str, str, str]] = []
    da, db = _decisions(old), _decisions(new)
    for i in range(max(len(da), len(db))):
        a = da[i] if i < len(da) else None
        b = db[i] if i < len(db) else None
        strip = (lambda d: None if d is None else {"action": d["action"], "tool": d.get("tool"), "args": d.get("args")})
        rows += [("llm", f"step {i + 1}.{p}", x, y) for p, x, y in _pairs(strip(a), strip(b))]
    ea, eb = _evidence(old), _evidence(new)
    for eid in sorted(set(ea) | set(eb), key=lambda s: int(s[1:]) if s[1:].isdigit() else 0):
        rows += [("tool", f"{eid}.{p}", x, y) for p, x, y in _pairs(ea.get(eid), eb.get(eid))]
    rows += [("report", p, x, y) for p, x, y in _pairs(_report(old), _report(new))]
    return rows


def _llm_kind(run: dict[str, Any]) -> str:
    from agent.llm.backends import QWEN_FILE

    recorded = _settings(run).get("llm")
    if recorded:
        return recorded
    mid = run.get("llm") or ""
    return "local" if mid.startswith(QWEN_FILE) else "openai" if mid.startswith("openai:") else \
        "tiny" if "smollm" in mid.lower() else mid


def rerun(dump: dict[str, Any], paths: list[str], *, llm: str | None = None, trace_dir: str | Path | None = None,
          db_url: str | None = None, base_url: str | None = None, model: str | None = None,
          api_key: str | None = None, on_step: Any = None,
          **run_kw: Any) -> tuple[str, dict[str, Any], list[tuple[str, str, str, str]]]:
    """Run the recorded case again, live, with the recorded settings; returns (new run id, its dump, the diff).
    `run_kw` go to run_case (tests pass a script and a tool set)."""
    from agent.engine.session import DxError, inputs_sha256, run_case
    from agent.store.trace import TraceStore

    run = dump["run"]
    settings = _settings(run)
    if inputs_sha256(paths) != run.get("inputs_sha256"):
        raise DxError("the files given are not this run's inputs (their sha256 differs from the record)")
    kind = llm or _llm_kind(run)
    if kind == "scripted" and "script" not in run_kw:
        raise DxError("this run used the scripted test planner, which cannot run live: pass --llm local|tiny|openai")
    if kind.startswith("openai") and not (base_url and model) and (run.get("llm") or "").startswith("openai:"):
        rec_model, _, rec_url = run["llm"].removeprefix("openai:").partition("@")
        base_url, model = base_url or rec_url, model or rec_model
    res = run_case(paths, run.get("question") or None, llm=kind, base_url=base_url, model=model, api_key=api_key,
                   trace_dir=trace_dir, db_url=db_url, max_steps=int(settings.get("max_steps", 6)),
                   max_wall_s=float(settings.get("max_wall_s", 300.0)), modality=settings.get("modality"),
                   body_part=settings.get("body_part"), clinical_context=settings.get("clinical_context") or "",
                   route=bool(settings.get("route", False)), on_step=on_step, **run_kw)
    from agent.engine.session import default_trace_dir

    new = TraceStore(db_url, trace_dir or default_trace_dir()).dump(res.run_id)
    return res.run_id, new, diff_runs(dump, new)
