"""`dxagent mcp`: the MCP server (agent/app/mcp_server.py) over stdio, for an LLM client. Research use only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent.app.cli.options import (
    ApiKey,
    BaseUrl,
    DbUrl,
    LlmTimeout,
    MinProbability,
    ModelName,
    ServedLlm,
    ServedScript,
    TraceDir,
    err,
)


def mcp(
    root: Annotated[list[Path], typer.Option(help="folder analyze_image may read images under (repeatable; default: "
                                             "the folder the server starts in)")] = None,
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
    llm: ServedLlm = "local",
    base_url: BaseUrl = None,
    model: ModelName = None,
    api_key: ApiKey = None,
    llm_timeout: LlmTimeout = 120.0,
    script: ServedScript = None,
    max_steps: Annotated[int, typer.Option(help="tool-call budget of a run, and of each follow-up")] = 6,
    max_seconds: Annotated[float, typer.Option(help="wall-clock budget of a run, and of each follow-up")] = 300.0,
    min_probability: MinProbability = None,
) -> None:
    """Serve dxagent to an MCP client over stdio (analyze_image, ask_followup, list_expert_tools, get_report,
    verify_trace; reports and overlays as resources). Runs go to the same trace store as `dxagent run`; nothing but the
    protocol is written to stdout."""
    from agent.app.cli.serve import serve_settings
    from agent.app.mcp_server import serve_stdio

    settings, roots = serve_settings(root, trace_dir, db_url, llm, base_url, model, api_key, llm_timeout, script,
                                     max_steps, max_seconds, min_probability)
    tdir = settings.trace_dir
    err.print(f"dxagent mcp on stdio · traces {tdir} · llm {llm} · roots {', '.join(map(str, roots))} · RESEARCH USE ONLY",
              highlight=False, soft_wrap=True)
    serve_stdio(settings, roots)
