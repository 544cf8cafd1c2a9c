"""`dxagent` command line (typer + rich). Research use only."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="dxagent: an agentic diagnostic orchestrator for medical images. RESEARCH USE ONLY.")
trace_app = typer.Typer(no_args_is_help=True, help="Inspect recorded traces.")
app.add_typer(trace_app, name="trace")
out = Console()
err = Console(stderr=True)

LLM_HELP = "planner backend: local (Qwen2.5-Coder-1.5B, default), tiny (SmolLM2-135M), openai, openai-json"


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def demo_cases() -> list[tuple[str, str, str]]:
    """Bundled demo cases: real CT and MR files that ship inside the pydicom wheel."""
    from pydicom.data import get_testdata_file

    return [
        ("ct_small", get_testdata_file("CT_small.dcm"),
         "What is the tissue composition of this CT slice: how much fat, soft tissue and bone?"),
        ("mr_small", get_testdata_file("MR_small.dcm"), "How large is the dominant bright region in this MR slice?"),
    ]


def _live(node: str, update: dict) -> None:
    steps = update.get("steps") or []
    if steps:
        s = steps[-1]
        err.print(f"  [dim]{s.node:<8}[/] {s.summary}", highlight=False, soft_wrap=True)


def _run_one(paths: list[str], question: str | None, **kw) -> tuple[str, dict]:
    from agent.engine.session import DxError, run_case
    from agent.llm.backends import LLMUnavailable

    try:
        res = run_case(paths, question, on_step=_live, **kw)
    except (DxError, LLMUnavailable) as exc:
        _fail(str(exc))
    return res.run_id, res.report or {}


NoRoute = Annotated[bool, typer.Option("--no-route", help="let the planner choose every call (by default a question "
                                      "about a named subject goes straight to a tool that addresses it)")]


@app.command()
def run(
    image: Annotated[list[Path], typer.Argument(help="image file(s) or a DICOM series folder")] = None,
    question: Annotated[str, typer.Option("--question", "-q")] = None,
    llm: Annotated[str, typer.Option(help=LLM_HELP)] = "local",
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL (or DXAGENT_OPENAI_BASE_URL)")] = None,
    model: Annotated[str, typer.Option(help="model name at the endpoint (or DXAGENT_OPENAI_MODEL)")] = None,
    api_key: Annotated[str, typer.Option(help="API key (or DXAGENT_OPENAI_API_KEY)")] = None,
    llm_timeout: Annotated[float, typer.Option(help="seconds per LLM request")] = 120.0,
    modality: Annotated[str, typer.Option(help="modality when the file has none (CT, MR, US, DX, ...)")] = None,
    body_part: Annotated[str, typer.Option()] = None,
    context: Annotated[str, typer.Option(help="clinical context given to the planner")] = "",
    max_steps: Annotated[int, typer.Option(help="tool-call budget")] = 6,
    max_seconds: Annotated[float, typer.Option(help="wall-clock budget")] = 300.0,
    trace_dir: Annotated[Path, typer.Option(help="where traces, checkpoints and artifacts go")] = None,
    db_url: Annotated[str, typer.Option(help="trace database URL (default: SQLite in --trace-dir)")] = None,
    resume: Annotated[str, typer.Option(help="resume an interrupted run by its id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="also write report.json and report.md here")] = None,
    no_route: NoRoute = False,
) -> None:
    """Run the agent on one case and print its evidence-cited report and trace id."""
    from agent.engine.report import to_markdown

    if not image and not resume:
        _fail("give an IMAGE (file or DICOM folder) or --resume RUN_ID")
    run_id, report = _run_one([str(p) for p in image or []], question, llm=llm, base_url=base_url, model=model,
                              api_key=api_key, llm_timeout_s=llm_timeout, modality=modality, body_part=body_part,
                              clinical_context=context, max_steps=max_steps, max_wall_s=max_seconds,
                              trace_dir=trace_dir, db_url=db_url, resume=resume, route=not no_route)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        (out_dir / "report.md").write_text(to_markdown(report))
    if as_json:  # stdout stays pure JSON; the trace id goes to stderr
        print(json.dumps(report, indent=2))
        err.print(f"trace id: {run_id}", highlight=False)
    else:
        out.print(Markdown(to_markdown(report)))
        out.print(f"trace id: [bold]{run_id}[/]", highlight=False)


@app.command()
def chat(
    image: Annotated[list[Path], typer.Argument(help="image file(s) or a DICOM series folder")] = None,
    question: Annotated[str, typer.Option("--question", "-q", help="the first question")] = None,
    resume: Annotated[str, typer.Option(help="continue a chat thread by its id")] = None,
    llm: Annotated[str, typer.Option(help=LLM_HELP + ", scripted (with --script)")] = "local",
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL (or DXAGENT_OPENAI_BASE_URL)")] = None,
    model: Annotated[str, typer.Option(help="model name at the endpoint (or DXAGENT_OPENAI_MODEL)")] = None,
    api_key: Annotated[str, typer.Option(help="API key (or DXAGENT_OPENAI_API_KEY)")] = None,
    llm_timeout: Annotated[float, typer.Option(help="seconds per LLM request")] = 120.0,
    script: Annotated[Path, typer.Option(help="--llm scripted: the planner's replies, one JSON per line (testing)")] = None,
    modality: Annotated[str, typer.Option(help="modality when the file has none (CT, MR, US, DX, ...)")] = None,
    body_part: Annotated[str, typer.Option()] = None,
    context: Annotated[str, typer.Option(help="clinical context given to the planner")] = "",
    max_steps: Annotated[int, typer.Option(help="tool-call budget per question")] = 4,
    max_seconds: Annotated[float, typer.Option(help="wall-clock budget per question")] = 300.0,
    trace_dir: Annotated[Path, typer.Option(help="where traces, checkpoints and artifacts go")] = None,
    db_url: Annotated[str, typer.Option(help="trace database URL (default: SQLite in --trace-dir)")] = None,
    no_route: NoRoute = False,
) -> None:
    """An interactive consultation on a case: ask questions, watch the think / act / rethink steps, get answers
    that cite evidence ids. /help lists the commands; Ctrl-C cancels a turn; Ctrl-D or /quit leaves."""
    from agent.app.chat import Chat, loop
    from agent.engine.session import DxError, engine
    from agent.llm.backends import LLMUnavailable

    if not image and not resume:
        _fail("give an IMAGE (file or DICOM folder) or --resume THREAD_ID")
    replies = None
    if llm == "scripted":
        if script is None or not script.is_file():
            _fail("--llm scripted needs --script FILE (one planner reply per line)")
        replies = [ln for ln in script.read_text().splitlines() if ln.strip()]
    try:
        eng = engine(llm=llm, base_url=base_url, model=model, api_key=api_key, llm_timeout_s=llm_timeout,
                     script=replies, trace_dir=trace_dir, db_url=db_url)
        c = Chat(eng, out, per_turn_steps=max_steps, max_wall_s=max_seconds, route=not no_route)
        if resume:
            st = c.resume(resume)
            out.print(f"resumed thread {resume}: {len(st.conversation) + (st.report is not None)} answered "
                      f"question(s), evidence {', '.join(e.id for e in st.evidence) or 'none'}", highlight=False, soft_wrap=True)
            if st.report is not None and st.question != "(chat)":
                out.print(f"last question: {st.question}", highlight=False, soft_wrap=True)
        else:
            c.open([str(p) for p in image], modality=modality, body_part=body_part, clinical_context=context)
    except (DxError, LLMUnavailable) as exc:
        _fail(str(exc))
    loop(c, question)


def _progress(label: str, noun: str, out_dir: Path) -> tuple[Any, Any, Any]:
    """A rich progress bar with rate and ETA: (progress, on_start(total, skipped), tick(last line))."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[last]}"),
                        console=err, transient=False)
    state: dict[str, Any] = {}

    def on_start(total: int, skipped: int) -> None:
        state["t0"], state["n"] = time.perf_counter(), 0
        state["task"] = progress.add_task(label, total=total, completed=skipped, rate="", last="")
        if skipped:
            err.print(f"{skipped} of {total} {noun}(s) already complete in {out_dir}: skipped", highlight=False)

    def tick(last: str) -> None:
        state["n"] += 1
        rate = state["n"] / max(1e-9, time.perf_counter() - state["t0"]) * 60
        progress.update(state["task"], advance=1, rate=f"{rate:.1f} {noun}s/min", last=last)

    return progress, on_start, tick


@app.command()
def batch(
    manifest: Annotated[Path, typer.Argument(help="a folder of images, a .csv or a .jsonl manifest")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (reports, results.jsonl, summary.csv, traces)")],
    root: Annotated[Path, typer.Option(help="folder the manifest's relative paths are relative to, and that no path "
                                       "may leave (default: the manifest's folder)")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="worker processes (each loads the models once)")] = 1,
    executor: Annotated[str, typer.Option(help="local (worker processes here) or ray (a Ray cluster; pip install "
                                          "'dxagent[ray]')")] = "local",
    question: Annotated[str, typer.Option("--question", "-q", help="question for cases whose row has none")] = None,
    llm: Annotated[str, typer.Option(help=LLM_HELP)] = "local",
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL (or DXAGENT_OPENAI_BASE_URL)")] = None,
    model: Annotated[str, typer.Option(help="model name at the endpoint (or DXAGENT_OPENAI_MODEL)")] = None,
    api_key: Annotated[str, typer.Option(help="API key (or DXAGENT_OPENAI_API_KEY)")] = None,
    modality: Annotated[str, typer.Option(help="modality for cases whose row and file give none")] = None,
    max_steps: Annotated[int, typer.Option(help="tool-call budget per case")] = 6,
    max_seconds: Annotated[float, typer.Option(help="wall-clock budget per case")] = 300.0,
    db_url: Annotated[str, typer.Option(help="trace database URL (default: SQLite under --out/traces)")] = None,
    limit: Annotated[int, typer.Option(help="only the first N cases of the manifest")] = None,
) -> None:
    """Run every case of a manifest: resumable (re-run to skip finished cases), in parallel, one report per case."""
    from agent.app.batch import ManifestError, run_batch, timing_line

    progress, on_start, tick = _progress("batch", "case", out_dir)

    def on_case(rec: dict[str, Any]) -> None:
        mark = {"done": "ok", "failed": "[red]failed[/]", "invalid": "[yellow]invalid[/]"}.get(rec["status"], rec["status"])
        tick(f"{rec['case_id'][:30]} {mark}")
        if rec["status"] != "done":
            progress.console.print(f"  {rec['case_id']}: {rec['status']}: {rec.get('error')}", highlight=False,
                                   soft_wrap=True, markup=False)

    try:
        with progress:
            summary = run_batch(manifest, out_dir, root=root, workers=workers, executor=executor, question=question, llm=llm,
                                base_url=base_url, model=model, api_key=api_key, db_url=db_url, max_steps=max_steps,
                                max_wall_s=max_seconds, modality=modality, limit=limit, on_case=on_case,
                                on_start=on_start)
    except ManifestError as exc:
        _fail(str(exc))
    table = Table(title=f"batch {summary.out}")
    for col in ("cases", "done", "failed", "invalid", "skipped (already done)"):
        table.add_column(col, justify="right")
    table.add_row(str(summary.total), str(summary.counts.get("done", 0)), str(summary.counts.get("failed", 0)),
                  str(summary.counts.get("invalid", 0)), str(summary.skipped))
    out.print(table)
    if summary.by_modality:
        out.print("done by modality: " + ", ".join(f"{k} {v}" for k, v in summary.by_modality.most_common()),
                  highlight=False)
    out.print(timing_line(summary), highlight=False)
    if summary.agreement:
        agree = Table(title="agreement with the reference labels (agreement.csv)")
        for col in ("label", "cases", "ref +", "pred +", "sensitivity", "specificity", "agreement", "kappa"):
            agree.add_column(col, justify="right" if col != "label" else "left")
        for r in summary.agreement:
            agree.add_row(r["label"], str(r["cases"]), str(r["reference_positive"]), str(r["predicted_positive"]),
                          *("-" if r[k] is None else f"{r[k]:.2f}" for k in ("sensitivity", "specificity", "agreement",
                                                                                "kappa")))
        out.print(agree)
    out.print(f"reports: {summary.out / 'cases'} · results.jsonl, summary.csv in {summary.out}", highlight=False)
    if summary.counts.get("failed") or summary.counts.get("invalid"):
        raise typer.Exit(1)


@app.command(name="eval")
def eval_cmd(
    manifest: Annotated[Path, typer.Argument(help="VQA-style JSONL/JSON/TXT (SLAKE, VQA-RAD, VQA-Med layouts) or a "
                                             "realcases label manifest (see agent/app/eval_data.py)")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (results.jsonl, summary.json/.md, eval.html)")],
    systems: Annotated[str, typer.Option(help="comma-separated: agent, no-tools, blind, vlm-only, prior, majority "
                                         "(default: all but vlm-only with --prior-from, else the first three; vlm-only "
                                         "needs the vision endpoint `vlm`)")] = None,
    prior_from: Annotated[Path, typer.Option(help="reference split the prior and majority baselines are fitted on "
                                             "(e.g. the train split; never the evaluated items)")] = None,
    root: Annotated[Path, typer.Option(help="folder the manifest's relative paths are relative to")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="worker processes (each loads the model once)")] = 1,
    llm: Annotated[str, typer.Option(help=LLM_HELP)] = "local",
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL (or DXAGENT_OPENAI_BASE_URL)")] = None,
    model: Annotated[str, typer.Option(help="model name at the endpoint (or DXAGENT_OPENAI_MODEL)")] = None,
    api_key: Annotated[str, typer.Option(help="API key (or DXAGENT_OPENAI_API_KEY)")] = None,
    limit: Annotated[int, typer.Option(help="only the first N items (after --sample)")] = None,
    sample: Annotated[int, typer.Option(help="a random sample of N items")] = None,
    seed: Annotated[int, typer.Option(help="seed of --sample")] = 0,
    max_steps: Annotated[int, typer.Option(help="the agent's tool-call budget per question")] = 6,
    max_seconds: Annotated[float, typer.Option(help="the agent's wall-clock budget per question")] = 300.0,
    db_url: Annotated[str, typer.Option(help="trace database URL (default: SQLite under --out/traces)")] = None,
) -> None:
    """Score the agent and honest baselines on the same benchmark items (fresh state per question), with intervals."""
    from agent.app.eval import run_eval
    from agent.app.eval_data import ManifestError

    progress, on_start, tick = _progress("eval", "item", out_dir)

    def on_item(rec: dict[str, Any]) -> None:
        agent_row = next((r for r in rec.get("rows", []) if r["system"] == "agent"), None)
        last = (agent_row.get("answer") or {}).get("text", "")[:40] if agent_row else rec.get("status", "")
        tick(f"{rec['case_id'][:24]} {last}")

    names = [s.strip() for s in systems.split(",") if s.strip()] if systems else None
    try:
        with progress:
            res = run_eval(manifest, out_dir, systems=names, prior_from=prior_from, root=root, llm=llm, base_url=base_url,
                           model=model, api_key=api_key, db_url=db_url, workers=workers, limit=limit, sample=sample,
                           seed=seed, max_steps=max_steps, max_wall_s=max_seconds, on_start=on_start, on_item=on_item)
    except ManifestError as exc:
        _fail(str(exc))
    table = Table(title=f"eval {res.out} ({res.items} items; abstentions count as wrong in 'all')")
    for col in ("system", "closed acc (all)", "95% CI", "closed acc (answered)", "coverage", "open recall", "s/question"):
        table.add_column(col, justify="right" if col != "system" else "left")
    for name in res.systems:
        s = res.summary["systems"].get(name) or {}
        c, o = s.get("closed") or {}, s.get("open") or {}
        f = lambda m: "-" if not m or m.get("value") is None else f"{m['value']:.3f}"  # noqa: E731
        ci = c.get("accuracy_all") or {}
        table.add_row(name, f(ci), "-" if ci.get("lo") is None else f"[{ci['lo']:.3f}, {ci['hi']:.3f}]",
                      f(c.get("accuracy_answered")), f(s.get("coverage")), f(o.get("token_recall_all")),
                      "-" if not (s.get("seconds") or {}).get("mean") else f"{s['seconds']['mean']:.2f}")
    out.print(table)
    for k, v in (res.summary.get("paired") or {}).items():
        d = v.get("closed_accuracy") or {}
        if d.get("mean") is not None:
            out.print(f"closed accuracy {k}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (n={d.get('n')})",
                      highlight=False)
    if res.invalid:
        err.print(f"[yellow]warning:[/] {res.invalid} invalid item(s), scored as input_unreadable abstentions (their "
                  "errors are in results.jsonl)", highlight=False)
    out.print(f"{res.ran} result(s) computed, {res.skipped} already complete, in {res.wall_s:.1f} s · "
              f"{res.out / 'summary.md'} · {res.out / 'eval.html'}", highlight=False)


@app.command()
def demo(
    llm: Annotated[str, typer.Option(help=LLM_HELP)] = "local",
    trace_dir: Annotated[Path, typer.Option()] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="write each report here")] = Path("demo-reports"),
) -> None:
    """Run the agent on the bundled demo cases (real CT and MR from pydicom's wheel) with no network."""
    from agent.engine.report import to_markdown

    table = Table(title="dxagent demo (research use only)")
    for col in ("case", "outcome", "findings", "impression", "trace id"):
        table.add_column(col, overflow="fold")
    for name, path, question in demo_cases():
        err.print(f"[bold]{name}[/]: {question}")
        run_id, report = _run_one([path], question, llm=llm, trace_dir=trace_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
        (out_dir / f"{name}.md").write_text(to_markdown(report))
        table.add_row(name, report["recommendation"]["outcome"], str(len(report["findings"])),
                      report["impression"][:200], run_id)
    out.print(table)
    out.print(f"reports written to {out_dir}/")


@app.command("tools")
def list_tools(as_json: Annotated[bool, typer.Option("--json", help="the full cards: limitations, validation")] = False,
               ) -> None:
    """List the expert tools and where they apply."""
    from agent.engine.session import tools

    if as_json:
        print(json.dumps([t.card() for t in tools().values()], indent=2))
        return
    table = Table(title="dxagent tools")
    for col in ("name", "kind", "modalities", "dims", "description"):
        table.add_column(col, overflow="fold")
    for t in tools().values():
        c = t.card()
        table.add_row(c["name"], c["kind"], c["modalities"] if isinstance(c["modalities"], str)
                      else ", ".join(c["modalities"]), "/".join(f"{d}D" for d in c["dims"]), c["description"])
    out.print(table)


def _store(trace_dir: Path | None, db_url: str | None):
    from agent.engine.session import default_trace_dir
    from agent.store.trace import TraceStore

    store = TraceStore(db_url, trace_dir or default_trace_dir())
    store.mark_interrupted()  # runs whose process died are not "running"
    return store


def _load_trace(ref: str, trace_dir: Path | None, db_url: str | None) -> tuple[dict, Path]:
    """A run id in the trace store, or a `trace export` JSON file: (dump, artifact root)."""
    from agent.store.trace import load_dump

    if ref.endswith(".json") or Path(ref).is_file():
        try:
            return load_dump(ref), Path(ref).parent / "artifacts"
        except ValueError as exc:
            _fail(str(exc))
    store = _store(trace_dir, db_url)
    try:
        return store.dump(ref), store.root / "artifacts"
    except KeyError as exc:
        _fail(str(exc.args[0]))


TRACE_HELP = "a run id in the trace store, or a trace exported as JSON"


@trace_app.command("list")
def trace_list(trace_dir: Annotated[Path, typer.Option()] = None,
               db_url: Annotated[str, typer.Option()] = None,
               status: Annotated[str, typer.Option(help="only runs with this status: running, done, failed")] = None,
               limit: Annotated[int, typer.Option(help="newest N runs")] = 50) -> None:
    """List recorded runs, newest first."""
    table = Table(title="runs")
    for col in ("run id", "case", "status", "llm", "created", "sealed"):
        table.add_column(col, overflow="fold")
    for r in _store(trace_dir, db_url).runs(limit, status):
        table.add_row(r.id, r.case_id, r.status, r.llm, r.created_at[:19], r.seal_alg or "no")
    out.print(table)


@trace_app.command("show")
def trace_show(run_id: Annotated[str, typer.Argument(help=TRACE_HELP)], trace_dir: Annotated[Path, typer.Option()] = None,
               db_url: Annotated[str, typer.Option()] = None) -> None:
    """Show one run's events in order, and whether its record is intact."""
    from agent.store.trace import verify_dump

    dump, art_root = _load_trace(run_id, trace_dir, db_url)
    r = dump["run"]
    out.print(f"run {r['id']} · case {r['case_id']} · {r['status']} · llm {r['llm']}")
    for ev in dump["events"]:
        body = ev["payload"]
        brief = {"llm": lambda b: (b.get("decision") or {}).get("tool") or b.get("rejected") or b.get("error") or "",
                 "tool": lambda b: f"{b['evidence']['id']} {b['evidence']['status']} {b['evidence'].get('error') or ''}",
                 }.get(ev["kind"], lambda b: ", ".join(sorted(b))[:100])(body)
        out.print(f"{ev['seq']:>3} {ev['kind']:<5} {ev['node']:<8} {ev['name']:<10} {brief}", highlight=False)
    problems = verify_dump(dump, art_root)
    out.print("record: " + ("intact" if not problems else "[red]NOT INTACT[/] — " + "; ".join(problems)))


@trace_app.command("verify")
def trace_verify(
    runs: Annotated[list[str], typer.Argument(help=TRACE_HELP + "; several allowed")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="every run in the trace store")] = False,
    trace_dir: Annotated[Path, typer.Option()] = None,
    db_url: Annotated[str, typer.Option()] = None,
) -> None:
    """Check runs for tampering: edited, inserted or deleted events (hash chain + seal), an edited run row or
    report, missing or edited artifact files; a run without its seal (running, killed, truncated) is incomplete, and
    with DXAGENT_TRACE_KEY set only keyed seals pass. Exit 1 if any run is not intact."""
    from agent.store.trace import verify_dump

    refs = list(runs or [])
    if all_runs:
        refs += [r.id for r in _store(trace_dir, db_url).runs(10_000_000)]
    if not refs:
        _fail("name a run id or an exported trace file, or pass --all")
    bad = 0
    for ref in refs:
        dump, art_root = _load_trace(ref, trace_dir, db_url)
        problems = verify_dump(dump, art_root)
        n = len(dump["events"])
        if problems:
            bad += 1
            verdict = "INCOMPLETE" if all(p.startswith("incomplete") for p in problems) else "TAMPERED"
            out.print(f"[red]{verdict}[/] {dump['run']['id']} ({n} events)", highlight=False)
            for p in problems:
                out.print(f"  - {p}", highlight=False, soft_wrap=True)
        else:
            out.print(f"[green]intact[/] {dump['run']['id']} ({n} events, {len(dump.get('artifacts', []))} artifacts, "
                      f"sealed with {dump['run'].get('seal_alg')})", highlight=False)
    if bad:
        raise typer.Exit(1)


@trace_app.command("export")
def trace_export(
    runs: Annotated[list[str], typer.Argument(help="run id(s); trajectories accept several")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json: the whole record of one run; trajectories: JSONL of "
                                                      "the planner's steps with tool results, for fine-tuning")] = "json",
    out_path: Annotated[Path, typer.Option("--out", "-o", help="file to write (default: standard output)")] = None,
    with_artifacts: Annotated[bool, typer.Option(help="json: copy the run's artifact files to artifacts/ beside "
                                                      "--out, so the export verifies and replays on its own")] = False,
    all_runs: Annotated[bool, typer.Option("--all", help="trajectories: every finished run")] = False,
    trace_dir: Annotated[Path, typer.Option()] = None,
    db_url: Annotated[str, typer.Option()] = None,
) -> None:
    """Export a run as JSON (replayable, verifiable), or runs as planner training trajectories (JSONL)."""
    from agent.store.trace import canonical, trajectories, write_export

    refs = list(runs or [])
    if fmt == "trajectories":
        if all_runs:
            refs += [r.id for r in _store(trace_dir, db_url).runs(10_000_000, "done")]
        lines = [canonical(rec) for ref in refs for rec in trajectories(_load_trace(ref, trace_dir, db_url)[0])]
        text = "\n".join(lines) + ("\n" if lines else "")
    elif fmt == "json":
        if len(refs) != 1:
            _fail("--format json exports one run: name exactly one run id")
        dump, art_root = _load_trace(refs[0], trace_dir, db_url)
        if out_path is None:
            if with_artifacts:
                _fail("--with-artifacts needs --out")
            sys.stdout.write(json.dumps(dump, indent=1, ensure_ascii=False) + "\n")
            return
        try:
            write_export(dump, out_path, art_root if with_artifacts else None)
        except FileNotFoundError as exc:
            _fail(str(exc))
        err.print(f"wrote {out_path}")
        return
    else:
        _fail(f"unknown --format {fmt!r}: json or trajectories")
    if out_path is None:
        sys.stdout.write(text)
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    err.print(f"wrote {out_path} ({len(lines)} steps)")


@trace_app.command("html")
def trace_html(
    run_id: Annotated[str, typer.Argument(help=TRACE_HELP)],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="default: <run id>.html")] = None,
    trace_dir: Annotated[Path, typer.Option()] = None,
    db_url: Annotated[str, typer.Option()] = None,
) -> None:
    """Write the audit view of one run: one self-contained HTML file (image with overlays, the think / act /
    rethink timeline with the planner's messages and each tool's inputs and outputs, the report with its
    evidence linked to the steps)."""
    from agent.app.audit_html import write_html

    dump, art_root = _load_trace(run_id, trace_dir, db_url)
    path = write_html(dump, art_root, out_path or Path(f"{dump['run']['id']}.html"))
    out.print(f"wrote {path}")


@app.command()
def replay(
    trace: Annotated[str, typer.Argument(help=TRACE_HELP)],
    rerun: Annotated[bool, typer.Option("--rerun", help="run again with live models and tools, and diff")] = False,
    image: Annotated[list[Path], typer.Option("--image", help="--rerun: the run's input file(s); their sha256 must "
                                                             "match the record (bundled demo cases are found)")] = None,
    llm: Annotated[str, typer.Option(help="--rerun: planner backend (default: the recorded one)")] = None,
    base_url: Annotated[str, typer.Option(help="--rerun with --llm openai")] = None,
    model: Annotated[str, typer.Option(help="--rerun with --llm openai")] = None,
    api_key: Annotated[str, typer.Option(help="--rerun with --llm openai")] = None,
    show: Annotated[int, typer.Option(help="diff lines to print at a divergence")] = 60,
    trace_dir: Annotated[Path, typer.Option()] = None,
    db_url: Annotated[str, typer.Option()] = None,
) -> None:
    """Replay a recorded run with every LLM reply and tool output served from the record (no model loaded):
    each request must match the recorded one and the report must come out identical. Prints verified, or the
    first divergent step with a diff (exit 1). With --rerun: run live again and list what changed."""
    from agent.engine.replay import replay as do_replay
    from agent.engine.replay import report_sha256
    from agent.store.trace import run_report

    dump, _ = _load_trace(trace, trace_dir, db_url)
    if rerun:
        _rerun(dump, image, llm, base_url, model, api_key, trace_dir, db_url)
        return
    t0 = time.perf_counter()
    try:
        res = do_replay(dump)
    except ValueError as exc:
        _fail(str(exc))
    secs = time.perf_counter() - t0
    for w in res.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if res.verified:
        same = res.report_sha256 == report_sha256(run_report(dump["run"]))
        out.print(f"[green]verified[/] {res.run_id}: {res.events} events matched ({res.llm_calls} LLM replies, "
                  f"{res.tool_calls} tool outputs served) in {secs:.2f} s; report sha256 {str(res.report_sha256)[:16]}"
                  f"{' identical' if same else ''}", highlight=False)
        return
    d = res.divergence
    out.print(f"[red]DIVERGED[/] {res.run_id} at {d}", highlight=False, soft_wrap=True)
    if d.recorded is not None or d.replayed is not None:
        out.print(d.diff(show), highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _rerun(dump: dict, image: list[Path] | None, llm: str | None, base_url: str | None, model: str | None,
           api_key: str | None, trace_dir: Path | None, db_url: str | None) -> None:
    from agent.engine.replay import rerun
    from agent.engine.session import DxError, inputs_sha256
    from agent.llm.backends import LLMUnavailable

    paths = [str(p) for p in image or []]
    if not paths:
        paths = [p for _, p, _ in demo_cases() if inputs_sha256([p]) == dump["run"].get("inputs_sha256")][:1]
        if not paths:
            _fail("--rerun needs the run's input file(s): pass --image PATH (traces never store input paths)")
    try:
        new_id, _, rows = rerun(dump, paths, llm=llm, trace_dir=trace_dir, db_url=db_url, base_url=base_url,
                                model=model, api_key=api_key, on_step=_live)
    except (DxError, LLMUnavailable) as exc:
        _fail(str(exc))
    if not rows:
        out.print(f"[green]no change[/]: re-run {new_id} chose the same tools, got the same outputs and the same "
                  "report", highlight=False)
        return
    table = Table(title=f"{dump['run']['id']} (recorded) vs {new_id} (re-run): {len(rows)} difference(s)")
    for col in ("area", "field", "recorded", "re-run"):
        table.add_column(col, overflow="fold")
    for area, path, a, b in rows:
        table.add_row(area, path, a[:300], b[:300])
    out.print(table)
    raise typer.Exit(1)


library_app = typer.Typer(no_args_is_help=True, help="The case library that similar_cases searches.")
app.add_typer(library_app, name="library")


@library_app.command("build")
def library_build(
    source: Annotated[Path, typer.Argument(help="a folder of images (label = parent folder name) or a cases.jsonl")],
    out_dir: Annotated[Path, typer.Option("--out", help="library folder (default $DXAGENT_LIBRARY or "
                                          "~/.cache/dxagent/library)")] = None,
    encoder: Annotated[str, typer.Option(help="handcrafted; the name of a clip model card (kind embed or classify) "
                                         "in the model store, whose image embeddings index the library; or the "
                                         "folder of a saved vision model")] = "handcrafted",
    modality: Annotated[str, typer.Option(help="modality of every image (CXR, CT, dermoscopy, ...); default: "
                                          "from cases.jsonl, the DICOM file, or a guess")] = None,
) -> None:
    """Add SOURCE's images to the case library (images already indexed, by sha256, are skipped)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from agent.index.library import LibraryError, build

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("indexing", total=None)
        try:
            rep = build(source, out_dir, encoder=encoder, modality=modality,
                        on_item=lambda n, total, name: bar.update(task, completed=n, total=total))
        except LibraryError as exc:
            _fail(str(exc))
    for rel, why in rep.failed:
        err.print(f"[yellow]skipped[/] {rel}: {why}", highlight=False, soft_wrap=True)
    out.print(f"library {rep.dir}: added {rep.added}, already indexed {rep.already}, failed {len(rep.failed)}; "
              f"{rep.total} cases ({rep.seconds:.1f} s)", highlight=False, soft_wrap=True)
    if rep.total == 0:
        _fail("no image could be indexed")


@library_app.command("info")
def library_info(
    library_dir: Annotated[Path, typer.Argument(help="library folder (default $DXAGENT_LIBRARY or "
                                                "~/.cache/dxagent/library)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show what the case library holds: cases per source and label, and its encoder."""
    from agent.index.library import Library, LibraryError, default_library_dir

    try:
        info = Library.load(library_dir or default_library_dir()).summary()
    except LibraryError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    enc = info["encoder"]
    card = f" (model card, sha256 {enc['sha256'][:12]}…)" if "card" in enc else ""
    out.print(f"library {info['dir']} · {info['cases']} cases · encoder {enc['name']}{card} "
              f"({info['encoder']['dim']} dims) · {info['generation']} · updated {info['updated']}", highlight=False,
              soft_wrap=True)
    table = Table()
    for col in ("source (modality)", "label", "cases"):
        table.add_column(col, overflow="fold")
    for src, labels in info["by_source"].items():
        for label, n in labels.items():
            table.add_row(src, label, str(n))
    out.print(table)


models_app = typer.Typer(no_args_is_help=True, help="The model store: cards (YAML) for learned experts and their weights.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="the full cards and weight status")] = False,
                ) -> None:
    """List the model cards in the store, with each one's weights status (sha256 cached by size and mtime)."""
    from agent.store.models import ModelStore

    store = ModelStore()
    entries = store.list()
    checks = {id(e): store.verify_card(e.card) for e in entries if e.card is not None}
    if as_json:
        print(json.dumps([{"name": e.name, "path": str(e.path), "error": e.error, "bundled": e.bundled,
                           "weights": checks[id(e)].message() if e.card else None,
                           "status": checks[id(e)].status if e.card else "broken card",
                           "card": e.card.model_dump(mode="json") if e.card else None} for e in entries], indent=2))
        return
    table = Table(title=f"dxagent models ({store.dir})")
    for col in ("name", "kind", "adapter", "modalities", "labels", "validation", "weights"):
        table.add_column(col, overflow="fold")
    for e in entries:
        if e.card is None:
            table.add_row(e.name, "[red]BROKEN[/]", "", "", "", "", e.error)
            continue
        c, v = e.card, checks[id(e)]
        labels = ", ".join(c.labels[:6]) + (f" +{len(c.labels) - 6}" if len(c.labels) > 6 else "")
        table.add_row(c.name + (" (bundled)" if e.bundled else ""), c.kind, c.adapter, ", ".join(c.modalities), labels,
                      c.validation_headline(),
                      "ok" if v.ok else f"[red]{v.status}[/]")
    out.print(table)
    if not entries:
        out.print("no model cards yet: dxagent models add CARD.yaml", highlight=False)


@models_app.command("add")
def models_add(
    card: Annotated[Path, typer.Argument(help="the model card (YAML)")],
    replace: Annotated[bool, typer.Option("--replace", help="replace a model of the same name")] = False,
    no_copy: Annotated[bool, typer.Option("--no-copy", help="leave the weights where they are (the stored card "
                                          "points to their absolute path)")] = False,
) -> None:
    """Validate CARD, verify its weights' sha256 and add card (and weights) to the store."""
    from agent.store.models import ModelStore, ModelStoreError

    store = ModelStore()
    try:
        stored = store.add(card, copy_weights=not no_copy, replace=replace)
    except ModelStoreError as exc:
        _fail(str(exc))
    out.print(f"added {stored.name} ({stored.kind}, {stored.adapter}) → {stored.source}; weights {stored.weights_path}",
              highlight=False, soft_wrap=True)


@models_app.command("verify")
def models_verify(
    name: Annotated[str, typer.Argument(help="one model (default: all)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="rehash every file, ignoring the sha256 cache")] = False,
) -> None:
    """Check that each card is valid and its weights exist and match their sha256; exit 1 if any does not."""
    from agent.store.models import ModelStore, ModelStoreError

    store = ModelStore()
    try:
        results = store.verify(name, fresh=fresh)
    except ModelStoreError as exc:
        _fail(str(exc))
    table = Table(title=f"model verification ({store.dir})")
    for col in ("name", "status", "detail"):
        table.add_column(col, overflow="fold")
    for v in results:
        table.add_row(v.name, "ok" if v.ok else f"[red]{v.status}[/]", v.message())
    out.print(table)
    bad = [v for v in results if not v.ok]
    if bad:
        err.print(f"[bold red]error:[/] {len(bad)} of {len(results)} model(s) failed verification", highlight=False)
        raise typer.Exit(1)
    if not results:
        out.print("no model cards in the store", highlight=False)


@models_app.command("hash")
def models_hash(path: Annotated[Path, typer.Argument(help="a weights file or folder (MONAI bundle, transformers dir)")]) -> None:
    """Print the sha256 a model card must carry for PATH (a folder's covers every file in it)."""
    from agent.store.models import ModelStore

    if not (path.is_file() or path.is_dir()):
        _fail(f"{path}: no such file or folder")
    out.print(f"{ModelStore().sha256(path, fresh=True)}  {path}", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
