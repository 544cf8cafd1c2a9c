"""`dxagent serve`: the REST API (agent/app/serve.py) on uvicorn. Research use only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

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
    apply_min_probability,
    err,
    fail,
)

TOKEN_ENV = "DXAGENT_SERVE_TOKEN"


def serve_settings(root: list[Path] | None, trace_dir: Path | None, db_url: str | None, llm: str, base_url: str | None,
                   model: str | None, api_key: str | None, llm_timeout: float, script: Path | None, max_steps: int,
                   max_seconds: float, min_probability: str | None, workers: int = 1) -> tuple[Any, list[Path]]:
    """The ServeSettings and the served roots of `dxagent serve` and `dxagent mcp` (one line and exit 2 on a bad
    option): the scripted planner's replies, the default threshold of runs that name none, the roots as folders."""
    from agent.app.serve_runs import ServeSettings
    from agent.engine.session import default_trace_dir

    replies = None
    if llm == "scripted":
        if script is None or not script.is_file():
            fail("--llm scripted needs --script FILE (one planner reply per line)")
        replies = [ln for ln in script.read_text().splitlines() if ln.strip()]
    apply_min_probability(min_probability)
    roots = [r.expanduser().resolve() for r in (root or [Path.cwd()])]
    for r in roots:
        if not r.is_dir():
            fail(f"--root {r} is not a folder")
    settings = ServeSettings(trace_dir=Path(trace_dir or default_trace_dir()), db_url=db_url, llm=llm,
                             base_url=base_url, model=model, api_key=api_key, llm_timeout_s=llm_timeout,
                             script=replies, workers=workers, max_steps=max_steps, max_wall_s=max_seconds)
    return settings, roots


def serve(
    host: Annotated[str, typer.Option(help="address to listen on; anything but loopback needs DXAGENT_SERVE_TOKEN")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8765,
    trace_dir: TraceDir = None,
    db_url: DbUrl = None,
    llm: ServedLlm = "local",
    base_url: BaseUrl = None,
    model: ModelName = None,
    api_key: ApiKey = None,
    llm_timeout: LlmTimeout = 120.0,
    script: ServedScript = None,
    workers: Annotated[int, typer.Option(help="runs at once (queued beyond that). Default 1: on 2 cores the embedded "
                                         "planner and the torch tools each use both; more than 1 needs an endpoint "
                                         "planner (--llm openai) or scripted")] = 1,
    max_upload_mb: Annotated[float, typer.Option(help="largest request body of an upload, and largest unzipped "
                                                 "series (413 beyond)")] = 512.0,
    root: Annotated[list[Path], typer.Option(help="folder a JSON `path` may name files under (repeatable; default: "
                                             "the folder the server starts in)")] = None,
    cors_origin: Annotated[list[str], typer.Option(help="allow browser pages of this origin (repeatable; default: "
                                                   "none, CORS off)")] = None,
    max_steps: Annotated[int, typer.Option(help="default tool-call budget of a run")] = 6,
    max_seconds: Annotated[float, typer.Option(help="default wall-clock budget of a run")] = 300.0,
    min_probability: MinProbability = None,
) -> None:
    """Serve the REST API (OpenAPI at /openapi.json): create runs by upload, path or dicomweb://, stream their
    events, fetch reports and artifacts, verify traces. Runs go to the same trace store as `dxagent run`."""
    from agent.app.serve import ServeConfig, create_app, is_loopback

    token = os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        fail(f"--host {host} listens beyond this machine: set {TOKEN_ENV} (a bearer token of 16+ characters) first")
    if token is not None and len(token) < 16:
        fail(f"{TOKEN_ENV} is shorter than 16 characters: use a long random token (e.g. `openssl rand -hex 24`)")
    if workers < 1:
        fail("--workers must be at least 1")
    if workers > 1 and llm in ("local", "tiny"):
        fail(f"--workers {workers} with --llm {llm}: the embedded model is one llama.cpp context per process, which "
             "threads cannot share; use --workers 1, or an endpoint planner (--llm openai)")
    if max_upload_mb <= 0:
        fail("--max-upload-mb must be positive")
    settings, roots = serve_settings(root, trace_dir, db_url, llm, base_url, model, api_key, llm_timeout, script,
                                     max_steps, max_seconds, min_probability, workers=workers)
    tdir = settings.trace_dir
    app = create_app(ServeConfig(settings=settings, roots=roots, token=token,
                                 max_upload_bytes=int(max_upload_mb * 2**20), cors_origins=list(cors_origin or [])))
    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    err.print(f"dxagent serve on http://{shown}:{port} (OpenAPI: /openapi.json) · traces {tdir} · llm {llm} · "
              f"{workers} worker(s) · roots {', '.join(map(str, roots))} · token {'required' if token else 'off'} · "
              "RESEARCH USE ONLY", highlight=False, soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
