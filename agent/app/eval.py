"""`dxagent eval MANIFEST --out DIR`: the agent and honest baselines on the same benchmark items.

Systems (`--systems`, comma-separated):
* `agent`    the full loop (intake, think/act/rethink, answer step), a fresh LangGraph thread and state per item;
* `vqa-expert` the project's VQA expert (tools/vqa_expert.py) alone, one call: its best answer in the form asked, or
             "outside my training distribution" - what the agent adds over its own expert;
* `no-tools` the planner's model answers from the question and the case line (intake's modality, shape, spacing)
             alone, with the same constrained answer schema, no tool called;
* `blind`    the same model sees only the question (no image at all);
* `vlm-only` the vision endpoint named `vlm` (agent/llm/endpoints.py) alone: the question and the picture in one call
             (tools/vlm_ask.py), no planner, no other tool; beside `agent` with that endpoint configured (the agent may
             then call `vlm_ask`), it shows what the VLM gains or loses inside dxagent;
* `prior`    the most frequent answer for the question's type in the reference split `--prior-from` (SURE-VQA's
             question-only prior: same question text, else same content and answer type, else same answer type);
* `prior+study` the prior conditioned on the intake study classifier's predicted modality and body region of the
             item's image (the same question on the same predicted study in the reference split, whose images go
             through the same classifier; else the plain prior): what a metadata-aware guess gets without any tool;
* `majority` the most frequent answer per answer type (OPEN/CLOSED) in the reference split.
The manifest's `modality` column is a stratum for the metrics and is never handed to a system (it would answer
the modality questions). Every LLM call runs at temperature 0 with a fixed seed; each LLM system's item is its own
run in the trace store (`DIR/traces`), so every trajectory can be read back (`dxagent trace show RUN_ID`).

Machinery from `dxagent batch`: spawned worker processes (`--workers`), each loading the model once; each (item,
system) result is written atomically to `DIR/items/<item>/<system>.json`, so a re-run skips what is complete and a
kill loses nothing finished. Outputs: `results.jsonl` (one line per item and system: the answer object, the run id,
tool calls, seconds), `summary.json`, `summary.md` and `eval.html` (agent/app/eval_metrics.py).
Research use only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.app.eval_data import (
    EvalItem,
    MajorityBaseline,
    ManifestError,
    PriorBaseline,
    StudyPriorBaseline,
    predicted_study,
    read_eval_manifest,
    sample_items,
)
from agent.app.executors import node_info, now, prepare_stores, run_local
from agent.core.files import write_atomic

SYSTEMS = ("agent", "vqa-expert", "no-tools", "blind", "vlm-only", "prior", "prior+study", "majority")
LLM_SYSTEMS = ("agent", "vqa-expert", "no-tools", "blind", "vlm-only")  # run in the worker processes
QUESTION_ONLY = ("prior", "majority")
REFERENCE = (*QUESTION_ONLY, "prior+study")  # fitted on --prior-from, run in this process, answer in its words


@dataclass
class EvalRun:
    out: Path
    items: int
    invalid: int
    systems: list[str]
    ran: int  # (item, system) pairs computed in this invocation
    skipped: int  # already complete
    wall_s: float
    summary: dict[str, Any]


def _base_row(item: EvalItem, system: str) -> dict[str, Any]:
    from agent.core.question import parse_question

    q = parse_question(item.question) if item.question else None
    return {"item_id": item.case_id, "image_id": item.image_id, "system": system, "question": item.question,
            "gold": item.answer, "answer_type": item.answer_type, "content_type": item.content_type,
            "modality": item.modality, "question_kind": q.kind if q else None, "subject": q.subject if q else None,
            "status": "done", "answer": None, "run_id": None, "tool_calls": 0, "seconds": 0.0, "error": None}


def _abstain(reason: str, basis: str) -> dict[str, Any]:
    from agent.engine.answer import abstain, finish

    return finish(abstain(reason, basis)).model_dump(mode="json")


def _typed_answer(question: str, value: str, probability: float | None, basis: str, method: str) -> dict[str, Any]:
    """A baseline's value as an answer object (no evidence: baselines do not look)."""
    from agent.core.question import parse_question
    from agent.core.state import Answer
    from agent.engine.answer import CANNOT_TELL, answer_text, typed_value

    if value == CANNOT_TELL:
        return _abstain("evidence_does_not_address", "the model could not tell")
    q = parse_question(question)
    kind, typed = typed_value(q, value)
    a = Answer(kind=kind, value=typed, probability=probability, basis=basis, method=method)
    return a.model_copy(update={"text": answer_text(a)}).model_dump(mode="json")


# -- in a worker ---------------------------------------------------------------------------------------------------
_LLM: dict[str, Any] = {}


def _llm(opts: dict[str, Any]) -> tuple[Any, str]:
    """The answer model of this process (built once): the planner's backend, with token log-probabilities locally."""
    key = opts.get("llm", "local")
    if key not in _LLM or key == "scripted":  # a scripted test model is consumed per item
        from agent.engine.session import answer_chat
        from agent.llm.backends import make_llm

        chat, model_id, _ = make_llm(key, base_url=opts.get("base_url"), model=opts.get("model"),
                                     api_key=opts.get("api_key"), script=opts.get("script"))
        _LLM[key] = (answer_chat(chat), model_id)
    return _LLM[key]


def _run_agent(item: EvalItem, opts: dict[str, Any], row: dict[str, Any]) -> None:
    from agent.app.executors import start_attempt
    from agent.engine.session import DxError, run_case

    run_id, replaced = start_attempt(Path(opts["out"]) / "items" / item.case_id / "agent.attempt.json", opts,
                                     node_info())
    if replaced:
        row["replaced_runs"] = replaced
    try:
        res = run_case(item.paths, item.question, run_id=run_id, llm=opts.get("llm", "local"), base_url=opts.get("base_url"),
                       model=opts.get("model"), api_key=opts.get("api_key"), trace_dir=Path(opts["out"]) / "traces",
                       db_url=opts.get("db_url"), max_steps=opts.get("max_steps", 6),
                       max_wall_s=opts.get("max_wall_s", 300.0), script=opts.get("script"))
    except DxError as exc:  # the image cannot be read: an honest abstention, with the one-line reason
        row.update(answer=_abstain("input_unreadable", str(exc)), error=str(exc))
        return
    rep = res.report or {}
    row.update(answer=rep.get("answer"), run_id=res.run_id, tool_calls=res.state.tool_steps,
               outcome=(rep.get("recommendation") or {}).get("outcome"),
               llm_calls=sum(1 for s in res.state.steps if s.node == "think") + int(
                   (rep.get("answer") or {}).get("method") == "llm"))


def _run_baseline(item: EvalItem, opts: dict[str, Any], row: dict[str, Any], with_case: bool) -> None:
    """One constrained LLM answer from the question (and, for no-tools, the case line), recorded as its own run."""
    from agent.core.question import parse_question
    from agent.core.state import CaseInput, CaseState
    from agent.engine.answer import ask
    from agent.engine.graph import new_run_id
    from agent.engine.planner import case_line, prompt_versions
    from agent.engine.session import inputs_sha256, resolve_inputs
    from agent.imaging.loaders import ImageLoadError
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore
    from agent.store.trace import TraceStore

    chat, model_id = _llm(opts)
    line = ""
    if with_case:
        try:
            root = Path(opts["out"]) / "traces"
            views = load_views(resolve_inputs(item.paths), ArtifactStore(root / "artifacts"))
        except ImageLoadError as exc:
            row.update(answer=_abstain("input_unreadable", str(exc)), error=str(exc))
            return
        line = case_line(CaseState(inputs=CaseInput(paths=item.paths), views=views))
    system = row["system"]
    digest = inputs_sha256(item.paths) if item.paths else ""
    trace = TraceStore(opts.get("db_url"), Path(opts["out"]) / "traces")
    run_id = new_run_id(f"{system}{item.case_id}")
    trace.start_run(run_id, digest[:12], item.question, model_id, f"baseline:{system}", digest,
                    {"prompts": prompt_versions()}, settings={"baseline": system, "llm": opts.get("llm", "local")})
    rec = lambda kind, node, name, payload: trace.record(run_id, kind, node, name, payload)  # noqa: E731
    value, prob, err = ask(chat, model_id, "answer_baseline", parse_question(item.question), rec, system,
                           case_line=line)
    trace.finish_run(run_id, "done" if value is not None else "failed", error=err or None)
    row.update(run_id=run_id, llm_calls=1)
    if value is None:
        row.update(answer=_abstain("planner_failed", f"the model's reply was unusable: {err[:160]}"), error=err)
    else:
        basis = "from the question and the case line, no tool" if with_case else "from the question alone"
        row["answer"] = _typed_answer(item.question, value, prob, basis, "llm")


def _one_call(item: EvalItem, opts: dict[str, Any], row: dict[str, Any], tool: Any, inp: Any,
              system: str) -> tuple[Any, Any] | None:
    """One tool alone on the item's image, recorded as its own run: (output, the view), or None with the row's
    abstention written (unreadable image, the tool failed)."""
    from agent.core.state import CaseInput, CaseState
    from agent.core.tool import ToolContext, ToolError
    from agent.engine.graph import new_run_id
    from agent.engine.planner import prompt_versions
    from agent.engine.session import inputs_sha256, resolve_inputs
    from agent.imaging.loaders import ImageLoadError
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore
    from agent.store.trace import TraceStore

    root = Path(opts["out"]) / "traces"
    store = ArtifactStore(root / "artifacts")
    try:
        views = load_views(resolve_inputs(item.paths), store)
    except ImageLoadError as exc:
        row.update(answer=_abstain("input_unreadable", str(exc)), error=str(exc))
        return None
    digest = inputs_sha256(item.paths)
    trace = TraceStore(opts.get("db_url"), root)
    run_id = new_run_id(f"{system}{item.case_id}")
    trace.start_run(run_id, digest[:12], item.question, system, f"baseline:{system}", digest,
                    {"prompts": prompt_versions(), "tools": {tool.name: tool.version}}, settings={"baseline": system})
    ctx = ToolContext(state=CaseState(inputs=CaseInput(paths=["input 1"]), views=views, question=item.question),
                      store=store)
    row.update(run_id=run_id)
    try:
        out = tool.run(ctx, inp)
    except ToolError as exc:
        trace.record(run_id, "tool", system, tool.name, {"error": str(exc)})
        trace.finish_run(run_id, "failed", error=str(exc))
        row.update(answer=_abstain("planner_failed", str(exc)), error=str(exc))
        return None
    for ref in ctx.artifacts:
        trace.add_artifact(ref, store.path(ref).stat().st_size)
    trace.record(run_id, "tool", system, tool.name, {"evidence": {
        "tool": tool.name, "status": "ok", "output": out.model_dump(mode="json"),
        "artifacts": [a.model_dump(mode="json") for a in ctx.artifacts]}})
    trace.finish_run(run_id, "done")
    return out, views[0]


def _run_vlm(item: EvalItem, opts: dict[str, Any], row: dict[str, Any]) -> None:
    """The `vlm` endpoint alone on the question and the picture (one vlm_ask call), recorded as its own run."""
    from agent.core.question import parse_question
    from tools.vlm_ask import VlmAsk, VlmInput

    got = _one_call(item, opts, row, VlmAsk(), VlmInput(question=item.question), "vlm-only")
    if got is None:
        return
    out, _ = got
    value, prob = out.answer, None
    if out.yes_no is not None and parse_question(item.question).kind == "yes_no":
        value = "yes" if out.yes_no else "no"
        prob = None if out.probability is None else (out.probability if out.yes_no else 1 - out.probability)
    row.update(llm_calls=1)
    row["answer"] = _typed_answer(item.question, value, prob, f"from the picture by {out.model} alone, no tool", "llm")


EXPERT = "vqa_expert"  # the tool the `vqa-expert` system runs alone


def _run_expert(item: EvalItem, opts: dict[str, Any], row: dict[str, Any]) -> None:
    """The VQA expert alone (one call): its best answer in the form the question asks, or its abstention."""
    from agent.core.question import parse_question
    from agent.engine.answer import conform, expert_value, finish
    from agent.engine.session import tools

    tool = tools().get(EXPERT)
    if tool is None:
        row.update(answer=_abstain("no_applicable_tool", f"no tool {EXPERT} is installed"))
        return
    got = _one_call(item, opts, row, tool, tool.Input(question=item.question), "vqa-expert")
    if got is None:
        return
    out, view = got
    q = parse_question(item.question)
    ranked = tool.answer_to(out, view, item.question)
    best = expert_value(q, ranked) if ranked else None
    if best is None:
        why = getattr(out, "reason", "") or "no answer in the form asked"
        row["answer"] = _abstain("evidence_does_not_address", f"{EXPERT}: {why}")
        return
    from agent.core.state import Answer

    kind, value, p = best
    a = conform(q, Answer(kind=kind, value=value, probability=round(float(p), 4), evidence_ids=["E1"], method="expert",
                          basis=f"{EXPERT} alone: {value} at p {p:.2f}", route=f"{EXPERT}:{q.kind}"))
    row["answer"] = finish(a, q).model_dump(mode="json")


def eval_one(spec: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Every LLM system still missing for one item; each result written atomically. Never raises for an item."""
    item = EvalItem(**spec)
    d = Path(opts["out"]) / "items" / item.case_id
    rows = []
    for system in opts["systems"]:
        if system not in LLM_SYSTEMS or (d / f"{system}.json").exists():
            continue
        row = _base_row(item, system)
        t0 = time.perf_counter()
        try:
            if system == "agent":
                _run_agent(item, opts, row)
            elif system == "vlm-only":
                _run_vlm(item, opts, row)
            elif system == "vqa-expert":
                _run_expert(item, opts, row)
            else:
                _run_baseline(item, opts, row, with_case=system == "no-tools")
        except Exception as exc:  # an item never stops the eval
            row.update(status="failed", error=" ".join(f"{type(exc).__name__}: {exc}".split())[:300])
        row.update(seconds=round(time.perf_counter() - t0, 3), finished_at=now(), worker=os.getpid(), **node_info())
        write_atomic(d / f"{system}.json", json.dumps(row))
        rows.append(row)
    return {"case_id": item.case_id, "status": "done", "rows": rows}


def restyle(row: dict[str, Any], style: Any) -> dict[str, Any]:
    """The row with its answer's value in the benchmark's words (question-only baselines already answer in them);
    the system's own value stays as `value_raw`, the rule used as `style_rule`."""
    ans = row.get("answer") or {}
    if row.get("system") in REFERENCE or ans.get("kind") in (None, "abstain") or not row.get("question"):
        return row
    measured = ans.get("method") == "evidence" and ans.get("kind") == "location"  # sides in the patient's frame
    value, key = style.render(row["question"], ans.get("value"), measured)
    if key is None or value == ans.get("value"):
        return row
    return {**row, "answer": {**ans, "value": value, "value_raw": ans.get("value"), "style_rule": key}}


# -- the run -------------------------------------------------------------------------------------------------------
def _question_only(item: EvalItem, system: str, model: PriorBaseline | MajorityBaseline) -> dict[str, Any]:
    row = _base_row(item, system)
    value, basis = model.predict(item)
    row["answer"] = _typed_answer(item.question, value, None, basis, "rules")
    return row


def study_cache(out: Path) -> Callable[[EvalItem], tuple[str, str]]:
    """The study classifier's (modality, region) of an item's image, cached by image path in DIR/study_cache.json so a
    resumed eval does not classify the reference split again."""
    path = out / "study_cache.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}

    def study_of(item: EvalItem) -> tuple[str, str]:
        key = item.paths[0] if item.paths else ""
        if key not in cache:
            cache[key] = list(predicted_study(item.paths))
            if len(cache) % 50 == 0:
                write_atomic(path, json.dumps(cache))
        return tuple(cache[key])  # type: ignore[return-value]

    study_of.save = lambda: write_atomic(path, json.dumps(cache))  # type: ignore[attr-defined]
    return study_of


def _read_rows(out: Path, items: list[EvalItem], systems: list[str]) -> list[dict[str, Any]]:
    rows = []
    for it in items:
        for s in systems:
            p = out / "items" / it.case_id / f"{s}.json"
            if p.exists():
                try:
                    rows.append(json.loads(p.read_text()))
                except (OSError, json.JSONDecodeError):
                    p.unlink(missing_ok=True)  # a torn file cannot exist (atomic writes), but never trust one
    return rows


def run_eval(manifest: str | Path, out: str | Path, *, systems: list[str] | None = None, prior_from: str | Path | None = None,
             root: str | Path | None = None, llm: str = "local", base_url: str | None = None, model: str | None = None,
             api_key: str | None = None, db_url: str | None = None, workers: int = 1, executor: str = "local",
             ray_address: str | None = None, limit: int | None = None,
             sample: int | None = None, seed: int = 0, max_steps: int = 6, max_wall_s: float = 300.0,
             script: list[Any] | None = None, on_start: Callable[[int, int], None] | None = None,
             on_item: Callable[[dict[str, Any]], None] | None = None,
             answer_style_from: str | Path | None = None) -> EvalRun:
    from agent.app.eval_metrics import summarize, summary_markdown, write_eval_html

    default = [s for s in (SYSTEMS if prior_from else LLM_SYSTEMS) if s not in ("vlm-only", "prior+study", "vqa-expert")]
    systems = list(systems or default)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ManifestError(f"unknown system(s) {', '.join(unknown)}: choose from {', '.join(SYSTEMS)}")
    if "vlm-only" in systems:
        from tools.vlm_ask import _endpoint

        if isinstance(why := _endpoint(), str):
            raise ManifestError(f"--systems vlm-only: {why}")
    if any(s in REFERENCE for s in systems) and not prior_from:
        raise ManifestError("the prior, prior+study and majority baselines need a reference split: --prior-from "
                            "MANIFEST")
    _, items = read_eval_manifest(manifest, root)
    items = sample_items(items, sample, seed) if sample else items
    items = items[:limit] if limit is not None else items
    out = Path(out).expanduser().resolve()
    (out / "items").mkdir(parents=True, exist_ok=True)
    notes = [f"manifest {Path(manifest).resolve()}, {len(items)} item(s)" + (f" (sample of {sample}, seed {seed})"
                                                                            if sample else "")]
    ref_models: dict[str, Any] = {}
    if prior_from:
        _, ref = read_eval_manifest(prior_from, None)  # questions and answers only: its images are not needed
        try:
            ref_models = {"prior": PriorBaseline(ref), "majority": MajorityBaseline(ref)}
            if "prior+study" in systems:
                ref_models["prior+study"] = StudyPriorBaseline(ref, study_cache(out))
        except ValueError as exc:
            raise ManifestError(f"{prior_from}: {exc}") from None
        same = Path(prior_from).resolve() == Path(manifest).resolve()
        notes.append(f"prior and majority fitted on {Path(prior_from).resolve()} ({len(ref)} items)"
                     + (" — THE EVALUATED MANIFEST ITSELF: in-sample, not a fair baseline" if same else ""))
    style = None
    if answer_style_from:
        from agent.app.answer_style import style_from_manifest

        style = style_from_manifest(answer_style_from)
        notes.append(f"answers rendered in the words of {Path(answer_style_from).resolve()} ({len(style.table)} "
                     "wording rules, agent/app/answer_style.py); each row keeps the system's own value as value_raw")
    opts = {"out": str(out), "systems": systems, "llm": llm, "base_url": base_url, "model": model, "api_key": api_key,
            "db_url": db_url, "max_steps": max_steps, "max_wall_s": max_wall_s, "script": script}
    write_atomic(out / "eval.json", json.dumps({"manifest": str(Path(manifest).resolve()), "systems": systems,
                                                 "options": {k: v for k, v in opts.items() if k not in ("api_key", "script")},
                                                 "prior_from": str(prior_from) if prior_from else None,
                                                 "answer_style_from": str(answer_style_from) if answer_style_from
                                                 else None,
                                                 "started": now()}, indent=2))
    valid = [it for it in items if not it.error]
    invalid = [it for it in items if it.error]
    done = lambda it, s: (out / "items" / it.case_id / f"{s}.json").exists()  # noqa: E731
    todo_llm = [it for it in valid if any(not done(it, s) for s in systems if s in LLM_SYSTEMS)]
    pairs_left = sum(not done(it, s) for it in items for s in systems)
    skipped = len(items) * len(systems) - pairs_left
    if on_start:
        on_start(len(items), len(items) - len(todo_llm) - sum(1 for it in invalid if any(not done(it, s) for s in systems)))
    t0 = time.perf_counter()
    ran = 0
    for it in items:  # question-only systems and invalid items: here, no model needed
        for s in systems:
            if done(it, s):
                continue
            if it.error:
                row = _base_row(it, s) | {"answer": _abstain("input_unreadable", it.error), "error": it.error}
            elif s in REFERENCE:
                row = _question_only(it, s, ref_models[s])
            else:
                continue
            row["finished_at"] = now()
            write_atomic(out / "items" / it.case_id / f"{s}.json", json.dumps(row))
            ran += 1
        if it.error and on_item:
            on_item({"case_id": it.case_id, "status": "invalid", "error": it.error, "rows": []})
    if "prior+study" in ref_models:
        ref_models["prior+study"].study_of.save()

    def finish(rec: dict[str, Any]) -> None:
        nonlocal ran
        if "rows" not in rec:  # a worker died twice on this item (batch's failed_record record)
            for s in systems:
                if s in LLM_SYSTEMS and not done(by_id[rec["case_id"]], s):
                    row = _base_row(by_id[rec["case_id"]], s) | {"status": "failed", "error": rec.get("error"),
                                                                 "finished_at": now()}
                    write_atomic(out / "items" / rec["case_id"] / f"{s}.json", json.dumps(row))
            rec = {**rec, "rows": []}
        ran += len(rec["rows"])
        if on_item:
            on_item(rec)

    by_id = {it.case_id: it for it in items}
    if todo_llm:
        prepare_stores(out, db_url)
        if executor == "ray":
            from agent.app.batch_ray import run_on_ray

            run_on_ray(todo_llm, opts, workers, finish, fn=eval_one, address=ray_address)
        elif executor == "local":
            run_local(todo_llm, opts, workers, finish, fn=eval_one)
        else:
            raise ManifestError(f"unknown executor {executor!r}: local or ray")
    wall = time.perf_counter() - t0
    rows = _read_rows(out, items, systems)
    if style is not None:
        rows = [restyle(r, style) for r in rows]
    write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(rows, systems, reference_system="agent" if "agent" in systems else systems[0])
    summary["notes"] = notes + list(summary.get("notes") or [])
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_atomic(out / "summary.md", summary_markdown(summary))
    write_eval_html(summary, out / "eval.html")
    return EvalRun(out=out, items=len(items), invalid=len(invalid), systems=systems, ran=ran, skipped=skipped,
                   wall_s=wall, summary=summary)


__all__ = ["SYSTEMS", "EvalRun", "ManifestError", "eval_one", "run_eval"]
