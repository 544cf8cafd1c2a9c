"""`dxagent run | chat | batch | eval | demo | tools | replay`: the commands that run cases (agent/app/cli/__init__.py
registers them)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markdown import Markdown
from rich.table import Table

from agent.app.cli.options import (
    LLM_HELP,
    TRACE_HELP,
    ApiKey,
    BaseUrl,
    BodyPart,
    Context,
    DbUrl,
    Images,
    Llm,
    LlmTimeout,
    MinProbability,
    Modality,
    ModelName,
    NoRoute,
    OutDbUrl,
    TraceDir,
    apply_min_probability,
    err,
    fail,
    out,
    writable_folder,
)
from agent.app.cli.trace import load_trace
from agent.core.errors import UserError
from agent.core.files import write_atomic


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


def _run_one(paths: list[str], question: str | None, **kw):  # -> agent.engine.session.Result
    from agent.engine import worker

    worker.warm()  # before the engine's own imports: the worker imports torch beside them (cold start)
    from agent.engine.session import run_case

    try:
        return run_case(paths, question, on_step=_live, **kw)
    except UserError as exc:  # DxError, LLMUnavailable, ImageLoadError, ...
        fail(str(exc))


def _push_target(push: str | None, inputs: list[str]):  # -> agent.imaging.dicomweb.Reference | None
    from agent.imaging.dicomweb import DicomWebError, push_target

    try:
        return push_target(push, inputs) if push else None
    except DicomWebError as exc:
        fail(str(exc))


def _write_dicom(res, out_dir: Path | None, target, trace_dir: Path | None, db_url: str | None) -> None:
    """The run as DICOM SR + SEG (agent/app/dicom_out.py) under out_dir and/or stored to a PACS, recorded in the trace."""
    from agent.app.cli.trace import trace_store
    from agent.app.dicom_out import ExportError, export_run

    try:
        written = export_run(res, out_dir, target, trace_store(trace_dir, db_url))
    except ExportError as exc:
        fail(str(exc))
    for why in written.skipped + written.notes:
        err.print(f"[yellow]DICOM: {why}[/]", highlight=False)
    if written.objects:
        err.print(f"DICOM: {', '.join(o['kind'] for o in written.objects)}" + (f" in {out_dir}" if out_dir else "")
                  + (f", stored to {written.pushed_to}" if written.pushed_to else ""), highlight=False)
    if written.push_error:
        fail(written.push_error)


def _write_fhir(report: dict, path: Path, inputs: list[str]) -> None:
    """The report as a FHIR Bundle; the ImagingStudy is referenced when the input was one PACS study."""
    from datetime import UTC, datetime

    from agent.app.fhir import write_bundle
    from agent.imaging.dicomweb import is_reference, parse

    refs = [parse(p) for p in inputs if is_reference(p)]
    study = refs[0].study if len(refs) == 1 and len(inputs) == 1 else None
    try:
        write_bundle(report, path, datetime.now(UTC).isoformat(timespec="seconds"), study)
    except ValueError as exc:
        fail(str(exc))


def run(
    image: Images = None,
    question: Annotated[str, typer.Option("--question", "-q")] = None,
    llm: Llm = "local",
    base_url: BaseUrl = None,
    model: ModelName = None,
    api_key: ApiKey = None,
    llm_timeout: LlmTimeout = 120.0,
    modality: Modality = None,
    body_part: BodyPart = None,
    context: Context = "",
    max_steps: Annotated[int, typer.Option(help="tool-call budget")] = 6,
    max_seconds: Annotated[float, typer.Option(help="wall-clock budget")] = 300.0,
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
    resume: Annotated[str, typer.Option(help="resume an interrupted run by its id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="also write report.json, report.md, report.fhir.json (a FHIR "
                                          "Bundle: DiagnosticReport + Observations) and, for a DICOM input, "
                                          "report.sr.dcm (TID 1500) and one seg-*.dcm (DICOM SEG) per mask here")] = None,
    push: Annotated[str, typer.Option("--push", help="store the DICOM SR and SEG with STOW-RS: 'source' (the PACS "
                                      "the study came from) or dicomweb://HOST[:PORT]/PATH")] = None,
    no_route: NoRoute = False,
    min_probability: MinProbability = None,
) -> None:
    """Run the agent on one case and print its evidence-cited report and trace id."""
    from agent.engine.report import to_markdown

    apply_min_probability(min_probability)
    if not image and not resume:
        fail("give an IMAGE (file or DICOM folder) or --resume RUN_ID")
    target = _push_target(push, [str(p) for p in image or []])  # a bad --push fails before the run, not after
    if out_dir:
        writable_folder(out_dir)  # so does an --out that cannot take the reports
    res = _run_one([str(p) for p in image or []], question, llm=llm, base_url=base_url, model=model,
                   api_key=api_key, llm_timeout_s=llm_timeout, modality=modality, body_part=body_part,
                   clinical_context=context, max_steps=max_steps, max_wall_s=max_seconds,
                   trace_dir=trace_dir, db_url=db_url, resume=resume, route=not no_route)
    run_id, report = res.run_id, res.report or {}
    if out_dir:
        write_atomic(out_dir / "report.json", json.dumps(report, indent=2))  # a full disk leaves no half file
        write_atomic(out_dir / "report.md", to_markdown(report))
        _write_fhir(report, out_dir / "report.fhir.json", image or [])
    if (out_dir or target) and res.report:
        _write_dicom(res, out_dir, target, trace_dir, db_url)
    if as_json:  # stdout stays pure JSON; the trace id goes to stderr
        print(json.dumps(report, indent=2))
        err.print(f"trace id: {run_id}", highlight=False)
    else:
        out.print(Markdown(to_markdown(report)))
        out.print(f"trace id: [bold]{run_id}[/]", highlight=False)


def chat(
    image: Images = None,
    question: Annotated[str, typer.Option("--question", "-q", help="the first question")] = None,
    resume: Annotated[str, typer.Option(help="continue a chat thread by its id")] = None,
    llm: Annotated[str, typer.Option(help=LLM_HELP + ", scripted (with --script)")] = "local",
    base_url: BaseUrl = None,
    model: ModelName = None,
    api_key: ApiKey = None,
    llm_timeout: LlmTimeout = 120.0,
    script: Annotated[Path, typer.Option(help="--llm scripted: the planner's replies, one JSON per line (testing)")] = None,
    modality: Modality = None,
    body_part: BodyPart = None,
    context: Context = "",
    max_steps: Annotated[int, typer.Option(help="tool-call budget per question")] = 4,
    max_seconds: Annotated[float, typer.Option(help="wall-clock budget per question")] = 300.0,
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
    no_route: NoRoute = False,
    min_probability: MinProbability = None,
) -> None:
    """An interactive consultation on a case: ask questions, watch the think / act / rethink steps, get answers
    that cite evidence ids. /help lists the commands; Ctrl-C cancels a turn; Ctrl-D or /quit leaves."""
    from agent.app.chat import Chat, loop
    from agent.engine.session import engine

    if not image and not resume:
        fail("give an IMAGE (file or DICOM folder) or --resume THREAD_ID")
    apply_min_probability(min_probability)
    replies = None
    if llm == "scripted":
        if script is None or not script.is_file():
            fail("--llm scripted needs --script FILE (one planner reply per line)")
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
    except UserError as exc:  # DxError, LLMUnavailable, ImageLoadError, ...
        fail(str(exc))
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


RayAddress = Annotated[str, typer.Option(help="with --executor ray: the cluster to join (HEAD_IP:6379, as `ray start "
                                          "--head` prints; default $RAY_ADDRESS, else a local Ray instance)")]


def batch(
    manifest: Annotated[str, typer.Argument(help="a folder of images, a .csv or a .jsonl manifest, or a QIDO-RS study "
                                            "query: dicomweb://HOST/PATH?modality=CT&date=20260101-20261231")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (reports, results.jsonl, summary.csv, traces)")],
    root: Annotated[Path, typer.Option(help="folder the manifest's relative paths are relative to, and that no path "
                                       "may leave (default: the manifest's folder)")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="worker processes (each loads the models once)")] = 1,
    executor: Annotated[str, typer.Option(help="local (worker processes here) or ray (a Ray cluster; pip install "
                                          "'dxagent[ray]')")] = "local",
    ray_address: RayAddress = None,
    question: Annotated[str, typer.Option("--question", "-q", help="question for cases whose row has none")] = None,
    llm: Llm = "local",
    base_url: BaseUrl = None,
    model: ModelName = None,
    api_key: ApiKey = None,
    modality: Annotated[str, typer.Option(help="modality for cases whose row and file give none")] = None,
    max_steps: Annotated[int, typer.Option(help="tool-call budget per case")] = 6,
    max_seconds: Annotated[float, typer.Option(help="wall-clock budget per case")] = 300.0,
    db_url: OutDbUrl = None,
    limit: Annotated[int, typer.Option(help="only the first N cases of the manifest")] = None,
    dicom: Annotated[bool, typer.Option("--dicom", help="also write each DICOM case's SR and SEG under "
                                        "cases/<id>/dicom/")] = False,
    push: Annotated[str, typer.Option("--push", help="store each case's SR and SEG with STOW-RS: 'source' (the PACS "
                                      "its study came from) or dicomweb://HOST[:PORT]/PATH")] = None,
    min_probability: MinProbability = None,
) -> None:
    """Run every case of a manifest: resumable (re-run to skip finished cases), in parallel, one report per case."""
    from agent.app.batch import ManifestError, run_batch, timing_line

    apply_min_probability(min_probability)
    if push and push != "source":
        _push_target(push, [])  # a malformed server fails now, not once per case

    writable_folder(out_dir)
    progress, on_start, tick = _progress("batch", "case", out_dir)

    def on_case(rec: dict[str, Any]) -> None:
        mark = {"done": "ok", "failed": "[red]failed[/]", "invalid": "[yellow]invalid[/]"}.get(rec["status"], rec["status"])
        tick(f"{rec['case_id'][:30]} {mark}")
        if rec["status"] != "done":
            progress.console.print(f"  {rec['case_id']}: {rec['status']}: {rec.get('error')}", highlight=False,
                                   soft_wrap=True, markup=False)

    try:
        with progress:
            summary = run_batch(manifest, out_dir, root=root, workers=workers, executor=executor, ray_address=ray_address,
                                question=question, llm=llm,
                                base_url=base_url, model=model, api_key=api_key, db_url=db_url, max_steps=max_steps,
                                max_wall_s=max_seconds, modality=modality, limit=limit, on_case=on_case,
                                on_start=on_start, dicom=dicom, push=push)
    except ManifestError as exc:
        fail(str(exc))
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
    if len(summary.by_node) > 1:
        out.print("ran on (node: cases): " + ", ".join(f"{k[:12]} {v}" for k, v in sorted(summary.by_node.items())),
                  highlight=False)
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


def eval_cmd(
    manifest: Annotated[Path, typer.Argument(help="VQA-style JSONL/JSON/TXT (SLAKE, VQA-RAD, VQA-Med layouts) or a "
                                             "realcases label manifest (see agent/app/eval_data.py)")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (results.jsonl, summary.json/.md, eval.html)")],
    systems: Annotated[str, typer.Option(help="comma-separated: agent, vqa-expert, no-tools, blind, vlm-only, prior, "
                                         "prior+study, majority (default with --prior-from: agent, no-tools, blind, "
                                         "prior, majority; else the first three; vlm-only needs the vision endpoint "
                                         "`vlm`; prior+study runs the study classifier over the reference split's "
                                         "images once)")] = None,
    prior_from: Annotated[Path, typer.Option(help="reference split the prior and majority baselines are fitted on "
                                             "(e.g. the train split; never the evaluated items)")] = None,
    answer_style_from: Annotated[Path, typer.Option(help="render answers in the words of this benchmark split's "
                                                    "references (its train split: \"axial\" -> \"Transverse Plane\"); "
                                                    "each row keeps the system's own value")] = None,
    root: Annotated[Path, typer.Option(help="folder the manifest's relative paths are relative to")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="worker processes (each loads the model once)")] = 1,
    executor: Annotated[str, typer.Option(help="local (worker processes here) or ray (a Ray cluster; pip install "
                                          "'dxagent[ray]')")] = "local",
    ray_address: RayAddress = None,
    llm: Llm = "local",
    base_url: BaseUrl = None,
    model: ModelName = None,
    api_key: ApiKey = None,
    limit: Annotated[int, typer.Option(help="only the first N items (after --sample)")] = None,
    sample: Annotated[int, typer.Option(help="a random sample of N items")] = None,
    seed: Annotated[int, typer.Option(help="seed of --sample")] = 0,
    max_steps: Annotated[int, typer.Option(help="the agent's tool-call budget per question")] = 6,
    max_seconds: Annotated[float, typer.Option(help="the agent's wall-clock budget per question")] = 300.0,
    db_url: OutDbUrl = None,
    min_probability: MinProbability = None,
) -> None:
    """Score the agent and honest baselines on the same benchmark items (fresh state per question), with intervals."""
    from agent.app.eval import run_eval
    from agent.app.eval_data import ManifestError

    apply_min_probability(min_probability)
    writable_folder(out_dir)
    progress, on_start, tick = _progress("eval", "item", out_dir)

    def on_item(rec: dict[str, Any]) -> None:
        agent_row = next((r for r in rec.get("rows", []) if r["system"] == "agent"), None)
        last = (agent_row.get("answer") or {}).get("text", "")[:40] if agent_row else rec.get("status", "")
        tick(f"{rec['case_id'][:24]} {last}")

    names = [s.strip() for s in systems.split(",") if s.strip()] if systems else None
    try:
        with progress:
            res = run_eval(manifest, out_dir, systems=names, prior_from=prior_from, root=root, llm=llm, base_url=base_url,
                           model=model, api_key=api_key, db_url=db_url, workers=workers, executor=executor,
                           ray_address=ray_address, limit=limit, sample=sample,
                           seed=seed, max_steps=max_steps, max_wall_s=max_seconds, on_start=on_start, on_item=on_item,
                           answer_style_from=answer_style_from)
    except ManifestError as exc:
        fail(str(exc))
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


def demo(
    llm: Llm = "local",
    trace_dir: TraceDir = None,
    out_dir: Annotated[Path, typer.Option("--out", help="write each report here")] = Path("demo-reports"),
) -> None:
    """Run the agent on the bundled demo cases (real CT and MR from pydicom's wheel) with no network."""
    from agent.engine.report import to_markdown

    table = Table(title="dxagent demo (research use only)")
    for col in ("case", "outcome", "findings", "impression", "trace id"):
        table.add_column(col, overflow="fold")
    writable_folder(out_dir)
    for name, path, question in demo_cases():
        err.print(f"[bold]{name}[/]: {question}")
        res = _run_one([path], question, llm=llm, trace_dir=trace_dir)
        run_id, report = res.run_id, res.report or {}
        write_atomic(out_dir / f"{name}.json", json.dumps(report, indent=2))
        write_atomic(out_dir / f"{name}.md", to_markdown(report))
        if res.report:
            _write_dicom(res, out_dir / f"{name}_dicom", None, trace_dir, None)
        table.add_row(name, report["recommendation"]["outcome"], str(len(report["findings"])),
                      report["impression"][:200], run_id)
    out.print(table)
    out.print(f"reports written to {out_dir}/")


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
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
) -> None:
    """Replay a recorded run with every LLM reply and tool output served from the record (no model loaded):
    each request must match the recorded one and the report must come out identical. Prints verified, or the
    first divergent step with a diff (exit 1). With --rerun: run live again and list what changed."""
    from agent.engine.replay import replay as do_replay
    from agent.engine.replay import report_sha256
    from agent.store.trace import run_report

    dump, _ = load_trace(trace, trace_dir, db_url)
    if rerun:
        _rerun(dump, image, llm, base_url, model, api_key, trace_dir, db_url)
        return
    t0 = time.perf_counter()
    try:
        res = do_replay(dump)
    except ValueError as exc:
        fail(str(exc))
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
    from agent.engine.session import inputs_sha256

    paths = [str(p) for p in image or []]
    if not paths:
        paths = [p for _, p, _ in demo_cases() if inputs_sha256([p]) == dump["run"].get("inputs_sha256")][:1]
        if not paths:
            fail("--rerun needs the run's input file(s): pass --image PATH (traces never store input paths)")
    try:
        new_id, _, rows = rerun(dump, paths, llm=llm, trace_dir=trace_dir, db_url=db_url, base_url=base_url,
                                model=model, api_key=api_key, on_step=_live)
    except UserError as exc:  # DxError, LLMUnavailable, ImageLoadError, ...
        fail(str(exc))
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
