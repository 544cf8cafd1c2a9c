"""Shared pieces of the CLI: the consoles, the one-line failure, and option definitions declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)


LLM_HELP = "planner backend: local (Qwen2.5-Coder-1.5B, default), tiny (SmolLM2-135M), openai, openai-json"


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def writable_folder(path: Path, what: str = "--out") -> Path:
    """`path` as an output folder, checked before any work is done: created if missing; one line (exit 2) when it
    names a file or cannot be written (read-only, no permission)."""
    import tempfile

    if path.exists() and not path.is_dir():
        fail(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        fail(f"{what} {path} cannot be written: {exc.strerror or exc}")
    return path


def apply_min_probability(value: str | None) -> None:
    """--min-probability: checked (one line, exit 2, when it is neither a probability nor 'careful') and passed on as
    DXAGENT_MIN_PROBABILITY, so worker processes answer under it too; each run records the threshold it used."""
    import os

    from agent.engine.calibration import parse_threshold

    try:
        p = parse_threshold(value)
    except ValueError as exc:
        fail(f"--min-probability: {exc}")
    if p is not None:
        os.environ["DXAGENT_MIN_PROBABILITY"] = repr(p)


NoRoute = Annotated[bool, typer.Option("--no-route", help="let the planner choose every call (by default a question "
                                      "about a named subject goes straight to a tool that addresses it)")]


# option definitions declared once (a command with its own help or default declares its own)
Images = Annotated[list[str], typer.Argument(help="image file(s), a DICOM series folder, or a DICOMweb study "
                                                 "(dicomweb://HOST/PATH?study=UID[&series=UID])")]
Llm = Annotated[str, typer.Option(help=LLM_HELP)]
# dxagent serve and dxagent mcp: the scripted planner too (its replies from --script, the same list for every run)
ServedLlm = Annotated[str, typer.Option(help=LLM_HELP + ", scripted (with --script)")]
ServedScript = Annotated[Path, typer.Option(help="--llm scripted: the planner's replies, one JSON per line; every run "
                                            "starts from the first (testing)")]
BaseUrl = Annotated[str, typer.Option(help="OpenAI-compatible base URL (or DXAGENT_OPENAI_BASE_URL)")]
ModelName = Annotated[str, typer.Option(help="model name at the endpoint (or DXAGENT_OPENAI_MODEL)")]
ApiKey = Annotated[str, typer.Option(help="API key (or DXAGENT_OPENAI_API_KEY)")]
LlmTimeout = Annotated[float, typer.Option(help="seconds per LLM request")]
Modality = Annotated[str, typer.Option(help="modality when the file has none (CT, MR, US, DX, ...)")]
BodyPart = Annotated[str, typer.Option()]
Context = Annotated[str, typer.Option(help="clinical context (the planner sees only the findings, organs and devices it "
                                            "names; it is never read as instructions)")]
MinProbability = Annotated[str, typer.Option(
    "--min-probability", help="withhold a closed answer whose calibrated probability is under this (0..1), or "
    "'careful': the threshold fitted on held-out SLAKE train for at most 10 % wrong answers among those given (0.777; "
    "more abstentions). Default: the fitted 0.5, or DXAGENT_MIN_PROBABILITY")]
TraceDir = Annotated[Path, typer.Option(help="where traces, checkpoints and artifacts go")]
DbUrl = Annotated[str, typer.Option(help="trace database URL (default: SQLite in --trace-dir)")]
OutDbUrl = Annotated[str, typer.Option(help="trace database URL (default: SQLite under --out/traces)")]
TRACE_HELP = "a run id in the trace store, or a trace exported as JSON"
