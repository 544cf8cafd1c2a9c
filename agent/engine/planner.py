"""The planner: renders the prompt files, asks the LLM for the next action, validates it.

Two protocols over the one `BaseChatModel` seam:
- "json": the reply is one JSON object; a JSON schema built from the candidate tools and their pydantic
  inputs is passed as `response_format` (llama.cpp turns it into a grammar, so the local model can
  only produce a valid action; an endpoint gets the same schema as `json_schema`, or as `json_object` +
  `schema` once it has refused `json_schema`, as llama-cpp-python's server does).
- "tools": native tool calling (OpenAI-compatible endpoints); one function per tool plus "answer",
  with tool_choice "auto".
A reply that does not parse, names an unknown tool or carries bad arguments is recorded and re-asked
with the error, a bounded number of times; then the planner gives up and the report says why.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import time
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import ValidationError

from agent.core.state import CaseState, Decision, Evidence
from agent.core.tool import COORDINATE_ARGS, Tool
from agent.engine.critic import tools_for_question
from agent.engine.llm_calls import (  # noqa: F401 - re-exported: callers import them from the planner too
    _JSON_OBJECT_ENDPOINTS,
    PlannerError,
    bounded_call,
    prompt_text,
    prompt_versions,
    render,
    structured_invoke,
    within,
)
from agent.llm import pictures as vision

REASON_MAX = 24  # characters: each output token costs ~75 ms with the local planner


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline $refs and drop titles so the schema is small and grammar-friendly."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(copy.deepcopy(defs[node["$ref"].split("/")[-1]]))
            return {k: walk(v) for k, v in node.items() if k not in ("title", "$defs")}
        if isinstance(node, list):
            return [walk(x) for x in node]
        return node

    return walk(schema)


@functools.cache
def _input_schema(model: type) -> str:
    return json.dumps(_clean_schema(model.model_json_schema()))


def input_schema(model: type) -> dict[str, Any]:
    """A tool Input's cleaned JSON schema (a fresh copy; building it costs ~2 ms, so it is cached per class)."""
    return json.loads(_input_schema(model))


def _no_null(prop: dict[str, Any]) -> dict[str, Any]:
    """An optional argument's schema without its `null` alternative: the model omits the argument instead of
    writing `"x": null`, which costs output tokens (each ~75 ms with the local planner) and says nothing."""
    alts = [a for a in prop.get("anyOf", []) if a.get("type") != "null"]
    if not alts or len(alts) == len(prop.get("anyOf", [])):
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**rest, **alts[0]} if len(alts) == 1 else {**rest, "anyOf": alts}


def args_schema(tool: Tool, view_ids: list[str], coordinates: bool = True, optional: bool = True) -> dict[str, Any]:
    """The tool's arguments as JSON schema; without `coordinates` (none are grounded yet) optional coordinate
    arguments are left out, so a grammar-constrained model cannot invent a box; without `optional`, every optional
    argument is left out (the tool runs with its defaults; see Planner.optional_args)."""
    schema = input_schema(tool.Input)
    req = set(schema.get("required", []))
    schema["properties"] = {k: v if k in req else _no_null(v) for k, v in schema.get("properties", {}).items()
                            if k in req or (optional and (coordinates or k not in COORDINATE_ARGS)
                                            and v.get("planner") is not False)}
    for v in schema["properties"].values():
        v.pop("planner", None)
    if view_ids == ["V1"]:  # one view: the argument can only be its default, so the model need not write it
        schema["properties"].pop("view", None)
        schema["required"] = sorted(req - {"view"})
    else:
        schema["properties"]["view"] = {"enum": view_ids, "description": "id of the view to act on"}
        schema["required"] = sorted(req | {"view"})
    schema["additionalProperties"] = False
    return schema


def args_line(tool: Tool, optional: bool = True) -> str:
    """A compact human description of the tool's arguments for the static system prompt (without `optional`, only
    the required ones: the planner cannot set the others)."""
    schema = input_schema(tool.Input)
    req = set(schema.get("required", []))
    parts = []
    for name, prop in schema.get("properties", {}).items():
        if (prop.get("planner") is False or not optional) and name not in req:
            continue  # a user-only knob (agent.core.tool.USER_ONLY), or an argument this planner leaves at its default
        kind = prop.get("enum") or prop.get("type") or "/".join(
            str(p.get("type", p.get("enum", "?"))) for p in prop.get("anyOf", []))
        default = "" if name in req or "default" not in prop else f"={json.dumps(prop['default'])}"
        parts.append(f"{name}: {kind}{default}")
    return "{" + ", ".join(parts) + "}"


def decision_schema(tools: list[Tool], view_ids: list[str], coordinates: bool = True,
                    reason: bool = True, optional: bool = True) -> dict[str, Any]:
    extra = {"reason": {"type": "string", "maxLength": REASON_MAX}} if reason else {}
    required = ["tool", "args", "reason"] if reason else ["tool", "args"]
    options = [
        {"type": "object", "properties": {"tool": {"const": t.name}, "args": args_schema(t, view_ids, coordinates, optional),
                                          **extra},
         "required": required, "additionalProperties": False}
        for t in tools
    ]
    options.append({"type": "object", "properties": {"tool": {"const": "answer"}, "args": {"type": "object",
                    "properties": {}, "additionalProperties": False}, **extra},
                    "required": required, "additionalProperties": False})
    return {"anyOf": options}


def openai_tools(tools: list[Tool], view_ids: list[str], coordinates: bool = True) -> list[dict[str, Any]]:
    fns = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": args_schema(t, view_ids, coordinates)}} for t in tools]
    fns.append({"type": "function", "function": {
        "name": "answer", "description": "Stop calling tools: the evidence answers the question.",
        "parameters": {"type": "object", "properties": {"reason": {"type": "string", "maxLength": REASON_MAX}},
                       "required": []}}})
    return fns


_COORD_KEY = re.compile(r"bbox|box|cent|point|border|seed")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def grounded_coordinates(state: CaseState) -> set[float]:
    """Numbers the planner may use as coordinates: those under coordinate-like keys in successful tool outputs,
    and any number in the question or clinical context. The planner never sees pixels, so any other box is invented."""
    found: set[float] = set()

    def walk(node: Any, coord: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, coord or bool(_COORD_KEY.search(str(k))))
        elif isinstance(node, list):
            for v in node:
                walk(v, coord)
        elif coord and isinstance(node, int | float) and not isinstance(node, bool):
            found.add(float(node))

    for e in state.evidence:
        if e.status == "ok":
            walk(e.output, False)
    for text in (state.question, state.clinical_context or ""):
        found.update(float(x) for x in _NUMBER.findall(text))
    return found


def _numbers(v: Any) -> list[float]:
    if isinstance(v, list):
        return [x for item in v for x in _numbers(item)]
    return [float(v)] if isinstance(v, int | float) and not isinstance(v, bool) else []


def check_grounded(args: dict[str, Any], grounded: set[float]) -> None:
    """Raise ValueError when a coordinate argument holds a number from neither the evidence nor the question.
    Coarse fractions (multiples of 0.25, "the upper half") are allowed: they name a part, not a measured place."""
    for name in sorted(COORDINATE_ARGS & set(args)):
        vals = _numbers(args[name])
        if not vals or all(0 <= v <= 1 and (v * 4).is_integer() for v in vals):
            continue
        stray = [v for v in vals if not any(abs(v - g) <= 1.0 for g in grounded)]
        if stray:
            raise ValueError(f"{name}={json.dumps(args[name])} is not from the evidence or the question (you never see "
                             "the image): take coordinates from a tool's output, or first call a tool that finds the region")


def validate(tools: dict[str, Tool], tool: str | None, args: Any, reason: str, view_ids: list[str],
             grounded: set[float] | None = None) -> Decision:
    """Turn a raw (tool, args) into a Decision, or raise ValueError with what is wrong. With `grounded`, coordinate
    arguments must come from those numbers (see check_grounded)."""
    if tool == "answer":
        return Decision(action="answer", reason=reason[:REASON_MAX])
    if tool not in tools:
        if tool in getattr(tools, "exhausted", ()):
            raise ValueError(f"{tool} already ran; its result is in the evidence: choose another tool or answer")
        if tool in getattr(tools, "held_back", ()):
            raise ValueError(f"{tool} needs a region (a box or point) and no evidence holds one yet: first call a tool "
                             "that finds the region")
        known = tool in getattr(tools, "all_names", ())
        raise ValueError(f"{'tool ' + repr(tool) + ' does not apply to this case' if known else 'unknown tool ' + repr(tool)}"
                         f"; choose one of {sorted(tools)} or answer")
    if not isinstance(args, dict):
        raise ValueError(f"args must be a JSON object, got {type(args).__name__}")
    if args.get("view", "V1") not in view_ids:
        raise ValueError(f"view {args.get('view')!r} does not exist; views are {view_ids}")
    if grounded is not None:
        check_grounded(args, grounded)
    try:
        parsed = tools[tool].Input.model_validate(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"bad arguments for {tool}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return Decision(action="call", tool=tool, args=parsed.model_dump(mode="json"), reason=reason[:REASON_MAX])


def candidate_scores(token_logprobs: list[dict[str, Any]], names: list[str]) -> dict[str, float]:
    """Probability mass the model put on each candidate at the token where the tool name starts."""
    text = ""
    for tok in token_logprobs:
        if text.rstrip().endswith('"tool":') or text.endswith('"tool": "') or text.endswith('"tool":"'):
            scores: dict[str, float] = {}
            for alt, lp in tok["top"].items():
                frag = alt.lstrip(' "')
                for n in names:
                    if frag and n.startswith(frag):
                        scores[n] = scores.get(n, 0.0) + float(pow(2.718281828, lp))
            if scores:
                return {k: round(v, 4) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])}
        text += tok["token"]
    return {}


def evidence_line(e: Evidence, tools: dict[str, Tool]) -> dict[str, Any]:
    if e.status == "ok" and e.output is not None and e.tool in tools:
        summary = tools[e.tool].summary(tools[e.tool].Output.model_validate(e.output))
    else:
        summary = e.error or e.status
    # retrieved passages (knowledge_search, similar cases) and error texts are text from outside the project: a
    # sentence in them that reads as an instruction to the model is dropped before the model reads the summary
    from agent.core.untrusted import strip_instructions

    summary, removed = strip_instructions(summary)
    if removed:
        summary += f" [{removed} sentence(s) reading as instructions to the model withheld]"
    # arguments left at their defaults say nothing the call does not (and cost the planner prompt tokens)
    fields = tools[e.tool].Input.model_fields if e.tool in tools else {}
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in e.args.items()
                     if k == "view" or k not in fields or fields[k].is_required() or v != fields[k].default)
    return {"id": e.id, "tool": e.tool, "args": args, "status": e.status, "summary": summary}


# DICOM modality codes in words, so that any planner model reads "XC" as a skin photograph
MODALITY_WORDS = {
    "CT": "CT", "MR": "MRI", "DX": "radiograph", "CR": "radiograph", "US": "ultrasound", "MG": "mammogram",
    "XC": "dermoscopy/clinical photo", "OP": "fundus photo", "ES": "endoscopy", "SM": "pathology slide",
    "PT": "PET", "NM": "nuclear medicine", "OT": "other",
}


def case_line(state: CaseState) -> str:
    v = state.views[0]
    spacing = "unknown (measurements in pixels)" if v.spacing_mm == "unknown" else \
        "x".join(f"{s:.3g}" for s in v.spacing_mm) + " mm"
    conf = v.metadata.get("modality_confidence")
    src = v.modality_source + (f", confidence {conf:.2f}" if v.modality_inferred and isinstance(conf, int | float)
                               else "") + (", UNCERTAIN" if v.modality_uncertain else "")
    words = MODALITY_WORDS.get(v.modality, v.modality)
    study = v.metadata.get("study") or {}
    seen = ""
    if study:
        from agent.analysis.study import study_facts

        f = study_facts(v)
        seen = "".join(f", {k} {f[k]} (classifier {f[k + '_probability']:.2f})" for k in ("plane", "body_region")
                       if f[k])
    return (f"modality {v.modality} = {words} ({src}), body part {v.body_part}{seen}, {v.ndim_spatial}D "
            f"{'RGB' if v.photometric == 'RGB' else 'grayscale'} image {list(v.shape)}, spacing {spacing}")


def view_lines(state: CaseState) -> list[str]:
    out = []
    for v in state.views:
        extra = json.dumps({k: x for k, x in v.provenance.items() if k not in ("tool", "parent")})
        tool = v.provenance.get("tool", "?")
        how = "original image" if v.parent is None else f"derived from {v.parent} by {tool} {extra}"
        out.append(f"{v.id}: {how}, shape {list(v.shape)}")
    return out


class _Candidates(dict):
    """The tools offered this step; remembers every tool name so a non-applicable pick is named as such."""

    all_names: frozenset[str] = frozenset()
    held_back: frozenset[str] = frozenset()
    exhausted: frozenset[str] = frozenset()


def exhausted(state: CaseState, tools: list[Tool], view_ids: list[str], optional: bool = True) -> list[str]:
    """Tools that can give nothing new: the planner may set no argument but the view (and the model card), and a
    call was already made on every view (it succeeded, was skipped as a repeat, or failed: with the same input it
    fails again); and a retrieval tool (knowledge search, the
    knowledge graph, similar cases) that already answered once in this case. A small planner otherwise repeats them
    (issue 33: a breast ultrasound paid an 11 s decision for a second knowledge_search, then skipped as a repeat)."""
    out = []
    for t in tools:
        if t.kind == "retrieve" and any(e.tool == t.name and e.status in ("ok", "skipped") for e in state.evidence):
            out.append(t.name)
            continue
        props = set(args_schema(t, view_ids, optional=optional).get("properties", {})) - {"view", "model"}
        if props:
            continue
        # with nothing to vary, a call that failed or was refused fails again: the same input, the same tool
        seen = {e.args.get("view", "V1") for e in state.evidence if e.tool == t.name}
        if set(view_ids) <= seen:
            out.append(t.name)
    return out


class Planner:
    def __init__(self, chat: BaseChatModel, model_id: str, mode: str = "json",
                 record: Any = None, max_tokens: int = 160, with_reason: bool | None = None,
                 optional_args: bool | None = None):
        self.chat, self.model_id, self.mode, self.max_tokens = chat, model_id, mode, max_tokens
        local = getattr(chat, "_llm_type", "") == "llama-cpp"
        # The in-process model writes no free-text reason: each output token costs ~0.1 s on this CPU under the
        # grammar, and a 1.5B model's reason ("The ct_tissue_compositon") says nothing the call does not.
        self.with_reason = with_reason if with_reason is not None else not local
        # Nor does it set optional arguments: writing them was ~50 output tokens a decision (3-4 s), and what it wrote
        # was noise ("top_n": 1000000000000000, rejected three times over, on a breast ultrasound: issue 33). Its
        # calls run with the tools' defaults; required arguments and the view (where there are several) it still
        # writes. An endpoint planner sets optional arguments as before.
        self.optional_args = optional_args if optional_args is not None else not local
        self.record = record or (lambda **kw: None)  # callback(kind, node, name, payload)
        self.vision: Any = None  # agent.llm.endpoints.Vision when the endpoint is declared vision-capable: it gets pictures
        self.token_budget: int | None = None  # prompt + completion tokens this planner may spend (an endpoint's
        self.tokens_used = 0  # max_tokens_per_run); the engine makes a planner per run, chat one per thread

    def system_prompt(self, tools: list[Tool]) -> str:
        """Every tool this installation can run (not only this case's): the same text across steps and cases."""
        return render("system", tools=[{"name": t.name, "description": t.description,
                                        "args": args_line(t, self.optional_args)}
                                       for t in tools if t.available() is None], mode=self.mode,
                      reason=self.with_reason)

    def user_prompt(self, state: CaseState, tools: dict[str, Tool], error: str | None,
                    candidates: list[str] | None = None, now: float | None = None) -> str:
        critic = render("rethink", c=state.critiques[-1]).strip() if state.critiques else ""
        # Ordered for llama.cpp's KV-state reuse: what stays the same through a case comes first (model cards, case,
        # question), then the evidence, which only grows, and last what changes at every step (critic notes, the
        # tools still on offer, the budget): a case's later decision evaluates only its new tail (issue 33).
        names = state.applicable_tools if candidates is None else candidates
        from agent.core.question import asked_part, parse_question
        from agent.core.untrusted import clinical_terms, question_reading

        q = state.question_info or parse_question(state.question)
        # untrusted text reaches the planner only through structured slots (agent/core/untrusted.py): the
        # question's reading, the context's clinical terms, earlier questions' readings and the agent's own answers
        earlier = [{"question": question_reading(parse_question(t.question), t.question), "answer": t.answer[:300]}
                   for t in state.conversation]
        return render(
            "think", question=question_reading(q, state.question), case_line=case_line(state),
            context_terms=", ".join(clinical_terms(state.clinical_context)),
            context_given=bool((state.clinical_context or "").strip()),
            views=view_lines(state), candidates=", ".join(names),
            matched=", ".join(([n for n in state.addressing_tools if n in names]
                               or tools_for_question(asked_part(state.question), tools, names))[:4]),
            subject=state.question_info.subject if state.question_info else "",
            evidence=[evidence_line(e, tools) for e in state.evidence], critic=critic,
            conversation=earlier,
            models=state.model_lines,  # all applicable learned tools' cards, held-back ones too (what a box unlocks)
            steps_left=state.budget.max_steps - state.tool_steps,  # seconds shown only under a minute: the decision
            # must not depend on how busy the machine was (the same case on a loaded machine chose other tools)
            seconds_left=int(max(0.0, state.budget.max_wall_s - state.budget.elapsed(now))), error=error,
        )

    def _ask(self, messages: list, tools: list[Tool], view_ids: list[str],
             coordinates: bool = True) -> tuple[Any, dict[str, Any]]:
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.mode == "json":
            schema = decision_schema(tools, view_ids, coordinates, self.with_reason, self.optional_args)
            return structured_invoke(self.chat, self.model_id, messages, schema, self.max_tokens)
        # tool_choice "auto" is the OpenAI/vLLM default, but llama-cpp-python's chatml-function-calling ignores
        # the tools unless it is sent (and fails on "required"); a reply without a call counts as "answer".
        params["tool_choice"] = "auto"
        bound = self.chat.bind_tools(openai_tools(tools, view_ids, coordinates), tool_choice="auto") \
            if hasattr(self.chat, "bind_tools") else self.chat
        return bound.invoke(messages, max_tokens=self.max_tokens), params

    def decide(self, state: CaseState, tools: dict[str, Tool], node: str = "think", now: float | None = None,
               images: list[dict[str, Any]] | None = None) -> Decision:
        """One decision; `images` (agent/llm/pictures.py parts) go to a vision-capable endpoint with the user message."""
        grounded = grounded_coordinates(state)
        cands = [tools[n] for n in state.applicable_tools if n in tools]
        # a tool that needs a region is offered only once there are coordinates to give it
        held = [] if grounded else [t.name for t in cands if t.requires_region()]
        view_ids = [v.id for v in state.views]
        done = exhausted(state, cands, view_ids, self.optional_args)
        cands = [t for t in cands if t.name not in held and t.name not in done]
        cand_map = _Candidates({t.name: t for t in cands})
        cand_map.all_names = frozenset(tools)
        cand_map.held_back = frozenset(held)
        cand_map.exhausted = frozenset(done)
        # The system prompt lists every tool, so it is identical across steps and cases and llama.cpp reuses
        # its KV cache; the candidates for this case are named in the user message and enforced by the schema.
        system = self.system_prompt(list(tools.values()))
        error: str | None = None
        for attempt in range(state.budget.max_invalid_decisions + 1):
            user = self.user_prompt(state, tools, error, [t.name for t in cands], now)
            messages = [SystemMessage(system), HumanMessage(vision.content(user, images) if images else user)]
            request = {"model": self.model_id, "mode": self.mode, "attempt": attempt,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                       "candidates": sorted(cand_map), "held_back": held, "exhausted": sorted(done)}
            if images:
                request["images"] = vision.recorded(images)  # by sha256: the artifact store keeps the pictures
            if self.token_budget is not None and self.tokens_used >= self.token_budget:
                raise PlannerError(f"the run's token budget for the planner endpoint is spent ({self.tokens_used} of "
                                   f"{self.token_budget})")
            t0 = time.perf_counter()
            try:
                left = state.budget.max_wall_s - state.budget.elapsed(now)
                reply, params = bounded_call(self.chat, left, functools.partial(
                    self._ask, messages, cands, view_ids, bool(grounded)))
            except Exception as exc:  # timeouts, connection errors, HTTP errors after retries
                self.record(kind="llm", node=node, name="error", payload={
                    "request": request, "error": f"{type(exc).__name__}: {exc}",
                    "latency_s": time.perf_counter() - t0})
                hint = " (pictures were sent: is the endpoint vision-capable?)" if images and \
                    "400" in str(exc) else ""
                raise PlannerError(f"LLM call failed{hint}: {type(exc).__name__}: {str(exc)[:200]}") from exc
            latency = time.perf_counter() - t0
            self.tokens_used += int((reply.usage_metadata or {}).get("total_tokens") or 0)
            meta = dict(reply.response_metadata or {})
            token_lp = meta.get("token_logprobs") or []  # kept in the trace: replay recomputes the scores from them
            if not token_lp:
                meta.pop("token_logprobs", None)
            response = {"content": reply.content, "tool_calls": [
                {"name": c["name"], "args": c["args"]} for c in reply.tool_calls],
                "invalid_tool_calls": [dict(c) for c in getattr(reply, "invalid_tool_calls", [])]}
            try:
                decision = self._parse(reply, cand_map, view_ids, grounded)
                error = None
            except ValueError as exc:
                decision, error = None, str(exc)
            self.record(kind="llm", node=node, name="decision", payload={
                "request": request, "params": params, "response": response,
                "usage": dict(reply.usage_metadata or {}), "latency_s": latency, "metadata": meta,
                "candidate_scores": meta.get("choice_scores") or candidate_scores(token_lp, sorted(cand_map) + ["answer"]),
                "decision": decision.model_dump() if decision else None, "rejected": error})
            if decision is not None:
                return decision
        raise PlannerError(f"no valid decision after {state.budget.max_invalid_decisions + 1} tries; last: {error}")

    def _parse(self, reply: Any, tools: dict[str, Tool], view_ids: list[str], grounded: set[float]) -> Decision:
        if self.mode == "tools":
            if getattr(reply, "invalid_tool_calls", None):
                bad = reply.invalid_tool_calls[0]
                raise ValueError(f"malformed tool call {bad.get('name')!r}: {str(bad.get('error'))[:160]}")
            if not reply.tool_calls:
                # prose is not a decision: a model that is done calls the function "answer" (re-asked, bounded)
                raise ValueError(f"the reply called no function (text {str(reply.content)[:60]!r}); call one tool, "
                                 "or the function \"answer\" when the evidence answers the question")
            call = reply.tool_calls[0]
            args = dict(call["args"])
            reason = str(args.pop("reason", "")) if call["name"] == "answer" else ""
            return validate(tools, call["name"], args, reason, view_ids, grounded)
        text = str(reply.content).strip()
        if text.startswith("```"):
            text = text.strip("`").removeprefix("json").strip()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"reply is not JSON ({exc.msg} at char {exc.pos}): {text[:80]!r}") from None
        if not isinstance(obj, dict):
            raise ValueError("reply must be a JSON object")
        return validate(tools, obj.get("tool"), obj.get("args", {}), str(obj.get("reason", "")), view_ids, grounded)
