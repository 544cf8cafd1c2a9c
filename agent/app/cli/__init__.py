"""`dxagent` command line (typer + rich). Research use only.

One module per sub-app: cases.py (run, chat, batch, eval, demo, tools, replay), serve.py, mcp.py, trace.py, library.py, models.py;
options.py holds what they share (option definitions declared once, the consoles, the one-line failure).
"""

from __future__ import annotations

import os

import typer
from sqlalchemy.exc import SQLAlchemyError

from agent.app.cli import cases
from agent.app.cli.library import library_app
from agent.app.cli.mcp import mcp
from agent.app.cli.models import models_app
from agent.app.cli.serve import serve
from agent.app.cli.trace import trace_app
from agent.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="dxagent: an agentic diagnostic orchestrator for medical images. RESEARCH USE ONLY.")
for fn, name in ((cases.run, "run"), (cases.chat, "chat"), (cases.batch, "batch"), (cases.eval_cmd, "eval"),
                 (cases.demo, "demo"), (cases.list_tools, "tools"), (cases.replay, "replay")):
    app.command(name)(fn)
app.command("serve")(serve)
app.command("mcp")(mcp)
app.add_typer(trace_app, name="trace")
app.add_typer(library_app, name="library")
app.add_typer(models_app, name="models")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app()
    except (OSError, SQLAlchemyError) as exc:  # a full disk, a read-only or immutable store, a folder that is a
        raise SystemExit(io_failure(exc)) from None  # file: one line and exit 2, wherever it struck
    except UserError as exc:  # one a command did not catch itself (a DXAGENT_ setting read when a store opens)
        raise SystemExit(io_failure(exc)) from None


def io_failure(exc: BaseException) -> int:
    """Print the one line for a storage failure or a user error no command caught (the command's own errors are
    already one line) and return 2."""
    from agent.app.cli.options import err

    if isinstance(exc, SQLAlchemyError):
        orig = getattr(exc, "orig", None) or exc
        text = " ".join(str(orig).split())[:200]
        msg = f"the trace store cannot be used: {text} (check the trace folder's disk space and permissions)"
    elif isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        msg = f"{exc.strerror}{where}"
    else:
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return 2
