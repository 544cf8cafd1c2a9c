"""`dxagent trace list | show | verify | export | html`: the recorded runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agent.app.cli.options import TRACE_HELP, DbUrl, TraceDir, err, fail, out

trace_app = typer.Typer(no_args_is_help=True, help="Inspect recorded traces.")


def trace_store(trace_dir: Path | None, db_url: str | None):
    from agent.engine.session import default_trace_dir
    from agent.store.trace import TraceStore

    # reading writes nothing: a run whose process died is shown as such, and marked only by the engine (unsealed)
    return TraceStore(db_url, trace_dir or default_trace_dir())


def load_trace(ref: str, trace_dir: Path | None, db_url: str | None) -> tuple[dict, Path]:
    """A run id in the trace store, or a `trace export` JSON file: (dump, artifact root)."""
    from agent.store.trace import load_dump

    if ref.endswith(".json") or Path(ref).is_file():
        try:
            return load_dump(ref), Path(ref).parent / "artifacts"
        except ValueError as exc:
            fail(str(exc))
    store = trace_store(trace_dir, db_url)
    try:
        return store.dump(ref), store.root / "artifacts"
    except KeyError as exc:
        fail(str(exc.args[0]))




def verdict_of(problems: list[str]) -> str:
    """`trace verify`'s word for a run's problems (verify_dump): intact, INCOMPLETE, UNCHECKED or TAMPERED."""
    if not problems:
        return "intact"
    return ("INCOMPLETE" if all(p.startswith("incomplete") for p in problems) else
            "UNCHECKED" if all(p.startswith("this run is sealed with a key") for p in problems) else
            "TAMPERED")


@trace_app.command("list")
def trace_list(trace_dir: TraceDir = None,
               db_url: DbUrl = None,
               status: Annotated[str, typer.Option(help="only runs with this status: running, done, failed")] = None,
               limit: Annotated[int, typer.Option(help="newest N runs")] = 50) -> None:
    """List recorded runs, newest first."""
    table = Table(title="runs")
    for col in ("run id", "case", "status", "llm", "created", "sealed"):
        table.add_column(col, overflow="fold")
    store = trace_store(trace_dir, db_url)
    for r in store.runs(limit, status):
        shown = "running (its process ended)" if store.process_ended(r) else r.status
        table.add_row(r.id, r.case_id, shown, r.llm, r.created_at[:19], r.seal_alg or "no")
    out.print(table)


@trace_app.command("show")
def trace_show(run_id: Annotated[str, typer.Argument(help=TRACE_HELP)], trace_dir: TraceDir = None,
               db_url: DbUrl = None) -> None:
    """Show one run's events in order, and whether its record is intact."""
    from agent.store.trace import verify_dump

    dump, art_root = load_trace(run_id, trace_dir, db_url)
    r = dump["run"]
    out.print(f"run {r['id']} · case {r['case_id']} · {r['status']} · llm {r['llm']}")
    for ev in dump["events"]:
        body = ev["payload"]
        brief = {"llm": lambda b: (b.get("decision") or {}).get("tool") or b.get("rejected") or b.get("error") or "",
                 "tool": lambda b: f"{b['evidence']['id']} {b['evidence']['status']} {b['evidence'].get('error') or ''}",
                 "export": lambda b: f"{len(b.get('objects') or [])} DICOM object(s)"
                                     + (f", stored to {b['pushed_to']}" if b.get("pushed_to") else ""),
                 }.get(ev["kind"], lambda b: ", ".join(sorted(b))[:100])(body)
        out.print(f"{ev['seq']:>3} {ev['kind']:<5} {ev['node']:<8} {ev['name']:<10} {brief}", highlight=False)
        for obj in body.get("objects", []) if ev["kind"] == "export" else []:
            out.print(f"      {obj['kind']:<4} {obj.get('evidence', '')}: SOP instance {obj['sop_instance_uid']} · series "
                      f"{obj['series_instance_uid']}" + (f" · {obj['file']}" if obj.get("file") else ""),
                      highlight=False)
    problems = verify_dump(dump, art_root)
    out.print("record: " + ("intact" if not problems else "[red]NOT INTACT[/] — " + "; ".join(problems)))


@trace_app.command("upgrade")
def trace_upgrade(trace_dir: TraceDir = None, db_url: DbUrl = None) -> None:
    """Create or upgrade the trace store's schema (and its checkpoint tables) to this dxagent's version. Opening a
    store does the same; run this as a database user that may create and alter tables when those running dxagent
    may not."""
    from agent.engine.graph import checkpointer, close_checkpointer
    from agent.store.trace import SCHEMA_VERSION

    store = trace_store(trace_dir, db_url)
    saver = checkpointer(db_url, store.root)
    saver.setup()
    close_checkpointer(saver)
    was = store.schema_from
    how = ("created" if was is None else "already current" if was == SCHEMA_VERSION else
           f"upgraded from {'an unversioned store (version 0)' if was == 0 else f'version {was}'}")
    out.print(f"{store.shown_url}: schema version {SCHEMA_VERSION} ({how})", highlight=False, soft_wrap=True)


@trace_app.command("uid")
def trace_uid(uid: Annotated[str, typer.Argument(help="a SOP instance or series UID of a DICOM SR/SEG dxagent wrote")],
              trace_dir: TraceDir = None, db_url: DbUrl = None) -> None:
    """Which run wrote a DICOM object (found in a viewer or a PACS), and from which evidence."""
    found = trace_store(trace_dir, db_url).find_uid(uid.strip())
    if not found:
        fail(f"no recorded run wrote a DICOM object with UID {uid.strip()[:70]}")
    for run_id, obj in found:
        out.print(f"run {run_id} · {obj['kind']} from {obj.get('evidence') or 'the report'}"
                  + (f" ({obj['tool']})" if obj.get("tool") else "") + f" · `dxagent trace show {run_id}`",
                  highlight=False)


@trace_app.command("verify")
def trace_verify(
    runs: Annotated[list[str], typer.Argument(help=TRACE_HELP + "; several allowed")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="every run in the trace store")] = False,
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
) -> None:
    """Check runs for tampering: edited, inserted or deleted events (hash chain + seal), an edited run row or
    report, missing or edited artifact files; a run without its seal (running, killed, truncated) is incomplete, and
    with DXAGENT_TRACE_KEY set only keyed seals pass. Exit 1 if any run is not intact."""
    from agent.store.trace import verify_dump

    refs = list(runs or [])
    if all_runs:
        refs += [r.id for r in trace_store(trace_dir, db_url).runs(10_000_000)]
        if not refs:
            print("no runs in the trace store: nothing to verify")
            return
    if not refs:
        fail("name a run id or an exported trace file, or pass --all")
    bad = 0
    for ref in refs:
        dump, art_root = load_trace(ref, trace_dir, db_url)
        problems = verify_dump(dump, art_root)
        n = len(dump["events"])
        if problems:
            bad += 1
            verdict = verdict_of(problems)
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
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
) -> None:
    """Export a run as JSON (replayable, verifiable), or runs as planner training trajectories (JSONL)."""
    from agent.store.trace import canonical, trajectories, write_export

    refs = list(runs or [])
    if fmt == "trajectories":
        if all_runs:
            refs += [r.id for r in trace_store(trace_dir, db_url).runs(10_000_000, "done")]
        lines = [canonical(rec) for ref in refs for rec in trajectories(load_trace(ref, trace_dir, db_url)[0])]
        text = "\n".join(lines) + ("\n" if lines else "")
    elif fmt == "json":
        if len(refs) != 1:
            fail("--format json exports one run: name exactly one run id")
        dump, art_root = load_trace(refs[0], trace_dir, db_url)
        if out_path is None:
            if with_artifacts:
                fail("--with-artifacts needs --out")
            sys.stdout.write(json.dumps(dump, indent=1, ensure_ascii=False) + "\n")
            return
        try:
            write_export(dump, out_path, art_root if with_artifacts else None)
        except FileNotFoundError as exc:
            fail(str(exc))
        err.print(f"wrote {out_path}")
        return
    else:
        fail(f"unknown --format {fmt!r}: json or trajectories")
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
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
) -> None:
    """Write the audit view of one run: one self-contained HTML file (image with overlays, the think / act /
    rethink timeline with the planner's messages and each tool's inputs and outputs, the report with its
    evidence linked to the steps)."""
    from agent.app.audit_html import write_html

    dump, art_root = load_trace(run_id, trace_dir, db_url)
    path = write_html(dump, art_root, out_path or Path(f"{dump['run']['id']}.html"))
    out.print(f"wrote {path}")
