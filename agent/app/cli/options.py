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


NoRoute = Annotated[bool, typer.Option("--no-route", help="let the planner choose every call (by default a question "
                                      "about a named subject goes straight to a tool that addresses it)")]


# option definitions declared once (a command with its own help or default declares its own)
Images = Annotated[list[str], typer.Argument(help="image file(s), a DICOM series folder, or a DICOMweb study "
                                                 "(dicomweb://HOST/PATH?study=UID[&series=UID])")]
Llm = Annotated[str, typer.Option(help=LLM_HELP)]
BaseUrl = Annotated[str, typer.Option(help="OpenAI-compatible base URL (or DXAGENT_OPENAI_BASE_URL)")]
ModelName = Annotated[str, typer.Option(help="model name at the endpoint (or DXAGENT_OPENAI_MODEL)")]
ApiKey = Annotated[str, typer.Option(help="API key (or DXAGENT_OPENAI_API_KEY)")]
LlmTimeout = Annotated[float, typer.Option(help="seconds per LLM request")]
Modality = Annotated[str, typer.Option(help="modality when the file has none (CT, MR, US, DX, ...)")]
BodyPart = Annotated[str, typer.Option()]
Context = Annotated[str, typer.Option(help="clinical context given to the planner")]
TraceDir = Annotated[Path, typer.Option(help="where traces, checkpoints and artifacts go")]
DbUrl = Annotated[str, typer.Option(help="trace database URL (default: SQLite in --trace-dir)")]
OutDbUrl = Annotated[str, typer.Option(help="trace database URL (default: SQLite under --out/traces)")]
TRACE_HELP = "a run id in the trace store, or a trace exported as JSON"
