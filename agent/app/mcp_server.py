"""The MCP server: dxagent's tools for an LLM client (Claude Desktop, an IDE agent, another agent). Research use only.

    analyze_image(image, question, clinical_context)  a path under a served root (or dicomweb://) -> the typed answer,
                                                      the findings with their evidence ids, the run id, a thread id
    ask_followup(thread_id, question)                 a follow-up in that thread (the chat engine: evidence kept)
    list_expert_tools()                               the registry's tools and what they address
    get_report(run_id, format)                        the report `dxagent run` writes (JSON or Markdown)
    verify_trace(run_id)                              the `dxagent trace verify` verdict
    resources  dxagent://runs/{run_id}/report (Markdown), .../report.json, .../artifacts (the list),
               .../artifacts/{name} (a mask, overlay or pixel file, as a blob with its mime type)

Progress: when the client sends a progress token with analyze_image or ask_followup, each trace event of the run (the
intake, each planner decision and tool call, the critique, the answer, the report) is sent as it is recorded, as an
MCP progress notification (progress = events so far, no total; message = "<name>: <the REST stream's one-line summary>").

Over stdio (`dxagent mcp`, agent/app/cli/mcp.py) and over streamable HTTP at /mcp on `dxagent serve` (mounted by
agent/app/serve.py's create_app). Nothing here is a second engine: a run is `execute` (agent/app/serve_runs.py: run_case
into the trace store) - on `serve` through its run queue, so MCP runs share its bounded workers and are listed under
/api/runs - and a follow-up is agent/app/chat.py's `Chat` resumed on the run (a run id is a thread id, as for
`dxagent chat --resume`). Paths are confined exactly as the REST API's `path` (serve.confine: symlinks resolved,
refused outside the roots); what a tool returns is what the report and trace hold (de-identified, agent/imaging/
deid.py), with inputs named "input 1", never by path or file name. A refusal is a tool error with one line.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from agent.app.serve import DISCLAIMER, Refused, Verdict, artifact_file, confine, run_artifacts, verdict
from agent.app.serve_runs import FINISHED, RunQueue, RunRecord, ServeSettings, execute, now, one_line

MAX_THREADS = 16  # follow-up threads kept open in memory; an older one is resumed from the trace store when asked


# -- what the tools return -------------------------------------------------------------------------------------------
class TypedAnswer(BaseModel):
    kind: str = Field(description="yes_no | choice | count | measurement | location | phrase | abstain")
    value: str | float | int | None = None
    unit: str | None = None
    probability: float | None = Field(None, description="calibrated probability that the value is right, where one "
                                                        "exists")
    abstained: bool = False
    reason: str | None = Field(None, description="an abstention's reason (no_applicable_tool, low_confidence, ...)")
    needed: str = Field("", description="an abstention: what would be needed to answer")
    evidence_ids: list[str] = []
    text: str = ""


class Finding(BaseModel):
    label: str
    present: bool | None = None
    probability: float | None = None
    location: str | None = None
    measurements: list[dict[str, Any]] = []
    evidence_ids: list[str] = []


class Artifact(BaseModel):
    name: str
    kind: str | None = None
    media_type: str | None = None
    uri: str


class Analysis(BaseModel):
    run_id: str
    thread_id: str = Field(description="pass to ask_followup (the run id: the run continues as a chat thread)")
    status: str
    outcome: str | None = Field(None, description="report | abstain | refer")
    answer: TypedAnswer | None = None
    findings: list[Finding] = []
    impression: str = ""
    artifacts: list[Artifact] = Field([], description="masks and overlays its tools made (read them as resources)")
    report_uri: str
    disclaimer: str = DISCLAIMER


class Followup(BaseModel):
    thread_id: str
    turn: int
    outcome: str | None = None
    answer: TypedAnswer | None = None
    said: str = Field("", description="what the assistant answers (it cites evidence ids)")
    findings: list[Finding] = []
    evidence: list[str] = Field([], description="every evidence id the thread holds")
    report_uri: str
    disclaimer: str = DISCLAIMER


class ExpertTool(BaseModel):
    name: str
    kind: str
    modalities: list[str] | str
    dims: list[int]
    addresses: list[str] = Field(description="the question words its evidence answers")
    description: str
    version: str


def _answer(a: Any) -> TypedAnswer | None:
    if not isinstance(a, dict):
        return None
    return TypedAnswer(kind=a.get("kind") or "phrase", value=a.get("value"), unit=a.get("unit"),
                       probability=a.get("probability"), abstained=a.get("kind") == "abstain", reason=a.get("reason"),
                       needed=a.get("needed") or "", evidence_ids=a.get("evidence_ids") or [], text=a.get("text") or "")


def _findings(report: dict[str, Any]) -> list[Finding]:
    keep = Finding.model_fields
    return [Finding(**{k: v for k, v in f.items() if k in keep and v is not None}) for f in report.get("findings") or []]


def _short(answer: TypedAnswer | None, outcome: str | None, ids: str) -> str:
    if answer is None:
        said = "no answer"
    elif answer.abstained:
        said = f"abstained ({answer.reason}): {answer.text}"
    else:
        p = f" (p {answer.probability:.2f})" if answer.probability is not None else ""
        said = f"{answer.text}{p}"
    return f"{one_line(said, 600)}\noutcome: {outcome}; {ids}. {DISCLAIMER}"


# -- the backend: runs, threads, the record --------------------------------------------------------------------------
class Backend:
    """What the tools do, blocking (the tools call it on worker threads). `runs`: `dxagent serve`'s queue (MCP runs wait
    their turn with the API's); None: run here, one at a time (`dxagent mcp` over stdio)."""

    def __init__(self, settings: ServeSettings, roots: list[Path], runs: RunQueue | None = None):
        from agent.store.trace import TraceStore

        self.settings, self.roots, self.runs = settings, roots, runs
        self.trace = runs.trace if runs is not None else TraceStore(settings.db_url, settings.trace_dir)
        self.artifact_root = Path(settings.trace_dir) / "artifacts"
        self.lock = threading.Lock()  # one engine at a time in this process (stdio), one follow-up turn at a time
        self.chats: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.mime: dict[str, str] = {}  # artifact resource uri -> its media type (read_resource sets it on the blob)

    # -- analyze_image ---------------------------------------------------------------------------------------------
    def inputs(self, image: str) -> tuple[str, str]:
        """(input, source) confined and checked to be an image as the REST API's `path` is, before anything is
        recorded."""
        try:
            return confine(image, self.roots)
        except Refused as exc:
            raise ToolError(exc.detail) from None

    def prepare(self, image: str, question: str | None, clinical_context: str | None) -> RunRecord:
        """The run `analyze` makes (its id known before it starts, for the progress notifications)."""
        from agent.engine.graph import new_run_id

        path, source = self.inputs(image)
        s = self.settings
        return RunRecord(id=new_run_id(path), created_at=now(), source=source, inputs=[path], n_inputs=1,
                         question=(question or "").strip() or None, clinical_context=clinical_context or "",
                         max_steps=s.max_steps, max_wall_s=s.max_wall_s)

    def analyze(self, rec: RunRecord, cancel: threading.Event) -> dict[str, Any]:
        s = self.settings
        if self.runs is not None:
            self.runs.submit(rec)
            while (status := self.runs.status(rec.id)[0]) not in FINISHED:
                if cancel.is_set():
                    self.runs.cancel(rec.id)
                time.sleep(0.1)
            error = (self.runs.record(rec.id) or rec).error
        else:
            with self.lock:
                status, error = execute(s, self.trace, rec, cancel)
        if status != "done":
            row = self.trace.get_run(rec.id)
            raise ToolError(one_line(f"run {rec.id} {status}: {(row.error if row else None) or error or status}"))
        return self.report(rec.id)

    # -- the record ------------------------------------------------------------------------------------------------
    def report(self, run_id: str) -> dict[str, Any]:
        row = self.trace.get_run(run_id)
        if row is None:
            raise ToolError(f"no run {one_line(repr(run_id), 120)} in the trace store")
        if not row.report:
            raise ToolError(f"run {run_id} is {row.status}: it has no report")
        return json.loads(row.report)

    def artifacts(self, run_id: str) -> list[Artifact]:
        try:
            found = run_artifacts(self.trace, run_id)
        except Refused as exc:
            raise ToolError(exc.detail) from None
        return [Artifact(name=a["name"], kind=a.get("kind"), media_type=a.get("media_type"),
                         uri=f"dxagent://runs/{run_id}/artifacts/{a['name']}") for a in found]

    def verdict(self, run_id: str) -> Verdict:
        try:
            return verdict(self.trace, self.artifact_root, run_id)
        except Refused as exc:
            raise ToolError(exc.detail) from None

    # -- ask_followup ----------------------------------------------------------------------------------------------
    def followup(self, thread_id: str, question: str) -> tuple[dict[str, Any], Any]:
        """One turn of the chat engine on the thread (a run id): its report and the thread's state."""
        from agent.core.errors import UserError

        if not question.strip():
            raise ToolError("give a question")
        with self.lock:
            chat = self.chats.get(thread_id)
            try:
                if chat is None:
                    chat = self._open(thread_id)
                report = chat.ask(question)
            except UserError as exc:
                raise ToolError(one_line(str(exc))) from None
            self.chats.move_to_end(thread_id)
            if report is None:
                raise ToolError(f"the follow-up in thread {thread_id} was cancelled; its evidence is kept")
            return report, chat.state()

    def _open(self, thread_id: str) -> Any:
        """The thread's Chat, resumed from the trace store and its checkpoints (so a thread outlives a restart)."""
        from rich.console import Console

        from agent.app.chat import Chat
        from agent.app.serve_runs import _close
        from agent.engine.session import engine

        row = self.trace.get_run(thread_id)
        if row is None:
            raise ToolError(f"no thread {one_line(repr(thread_id), 120)}: a thread id is the run id analyze_image "
                            "returned")
        status = "interrupted" if row.status == "running" and self.trace.process_ended(row) else row.status
        if status not in ("done", "idle", "cancelled"):
            raise ToolError(f"run {thread_id} is {status}: a follow-up needs a finished run")
        s = self.settings
        eng = engine(llm=s.llm, base_url=s.base_url, model=s.model, api_key=s.api_key, llm_timeout_s=s.llm_timeout_s,
                     script=list(s.script) if s.script is not None else None, trace_dir=s.trace_dir, db_url=s.db_url)
        chat = Chat(eng, Console(stderr=True, quiet=True), per_turn_steps=s.max_steps, max_wall_s=s.max_wall_s)
        try:
            chat.resume(thread_id)
        except Exception:
            _close(eng)
            raise
        self.chats[thread_id] = chat
        while len(self.chats) > MAX_THREADS:
            _, old = self.chats.popitem(last=False)
            _close(old.eng)
        return chat

    def close(self) -> None:
        from agent.app.serve_runs import _close

        for chat in self.chats.values():
            _close(chat.eng)
        self.chats.clear()


# -- the server ------------------------------------------------------------------------------------------------------
class _Server(MCPServer):
    """MCPServer whose artifact blobs carry each file's own mime type (a resource template has one for all)."""

    backend: Backend

    async def read_resource(self, uri: Any, context: Any = None) -> Any:
        contents = await super().read_resource(uri, context)
        mime = self.backend.mime.pop(str(uri), None)
        if mime is not None and isinstance(contents, list):
            for c in contents:
                c.mime_type = mime
        return contents


async def _blocking(fn: Any, *args: Any, cancel: threading.Event | None = None) -> Any:
    """Run `fn` on a worker thread. With `cancel`: a cancelled call (the client gave up) returns at once and sets it, so
    the run stops at its next step (the thread finishes that step and records the run cancelled)."""
    try:
        return await anyio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=cancel is not None)
    except anyio.get_cancelled_exc_class():
        if cancel is not None:
            cancel.set()
        raise


def _progress_token(ctx: Context | None) -> Any:
    try:
        return (ctx.request_context.meta or {}).get("progress_token") if ctx is not None else None
    except (ValueError, AttributeError):  # no request (the tool called outside one)
        return None


async def _progress(ctx: Context, trace: Any, run_id: str, after: int, done: anyio.Event) -> None:
    """Each trace event of the run after `after` as an MCP progress notification (progress: events so far; the
    message: the event's name and the one-line summary the REST event stream gives), polled from the trace store until
    `done` and the last event is sent."""
    from agent.app.serve_runs import event_view, events_after

    cursor, n = after, 0
    while True:
        finished = done.is_set()  # read before the events: none is missed
        batch = await anyio.to_thread.run_sync(events_after, trace, run_id, cursor)
        for ev in batch:
            cursor, n = ev.seq, n + 1
            v = event_view(ev)
            await ctx.report_progress(n, None, one_line(f"{v['name']}: {v['summary']}", 300))
        if finished and not batch:
            return
        if not batch:
            await anyio.sleep(0.1)


async def _with_progress(ctx: Context | None, trace: Any, run_id: str, after: int, fn: Any, *args: Any,
                         cancel: threading.Event | None = None) -> Any:
    """`_blocking(fn, *args)`, and meanwhile, when the client sent a progress token, the run's trace events as
    progress notifications (the SDK's progress mechanism)."""
    if _progress_token(ctx) is None:
        return await _blocking(fn, *args, cancel=cancel)
    done, out = anyio.Event(), {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(_progress, ctx, trace, run_id, after, done)
        try:
            out["value"] = await _blocking(fn, *args, cancel=cancel)
        except Exception as exc:  # raised after the last events are sent (outside the task group: not wrapped)
            out["error"] = exc
        finally:
            done.set()
    if "error" in out:
        raise out["error"]
    return out["value"]


def build(backend: Backend) -> MCPServer:
    from agent.engine.report import to_markdown

    mcp = _Server("dxagent", version="0.1.0", log_level="WARNING",
                  instructions="dxagent analyses a medical image (DICOM, NIfTI, PNG/JPEG) with expert tools and "
                               "answers with evidence ids ([E1]) that its report and trace record. " + DISCLAIMER)
    mcp.backend = backend

    @mcp.tool(description="Analyse a medical image: a file or DICOM series folder under the served roots, or "
                          "dicomweb://HOST/PATH?study=UID. Returns the typed answer (value and probability, or an "
                          "abstention with its reason), the findings with their evidence ids, the impression, the run "
                          "id and a thread id for ask_followup. Without a question: describe the findings. "
                          + DISCLAIMER)
    async def analyze_image(image: str, question: str | None = None, clinical_context: str | None = None,
                            ctx: Context | None = None) -> Annotated[CallToolResult, Analysis]:
        cancel = threading.Event()
        rec = await _blocking(backend.prepare, image, question, clinical_context)
        report = await _with_progress(ctx, backend.trace, rec.id, -1, backend.analyze, rec, cancel, cancel=cancel)
        run_id = report["run_id"]
        arts = await _blocking(backend.artifacts, run_id)
        outcome = (report.get("recommendation") or {}).get("outcome")
        a = Analysis(run_id=run_id, thread_id=run_id, status="done", outcome=outcome, answer=_answer(report.get("answer")),
                     findings=_findings(report), impression=report.get("impression") or "", artifacts=arts,
                     report_uri=f"dxagent://runs/{run_id}/report")
        text = _short(a.answer, outcome, f"run {run_id}, {len(a.findings)} finding(s); follow up with thread {run_id}")
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=a.model_dump(mode="json"))

    @mcp.tool(description="Ask a follow-up question in a thread (the thread_id analyze_image returned). The evidence "
                          "of earlier questions stays in the thread, so the answer can build on it. " + DISCLAIMER)
    async def ask_followup(thread_id: str, question: str,
                           ctx: Context | None = None) -> Annotated[CallToolResult, Followup]:
        from agent.app.chat import answer_text
        from agent.app.serve_runs import last_seq

        after = await _blocking(last_seq, backend.trace, thread_id) if _progress_token(ctx) is not None else -1
        report, st = await _with_progress(ctx, backend.trace, thread_id, after, backend.followup, thread_id, question)
        outcome = (report.get("recommendation") or {}).get("outcome")
        f = Followup(thread_id=thread_id, turn=len(st.conversation) + 1, outcome=outcome,
                     answer=_answer(report.get("answer")), said=answer_text(report, False), findings=_findings(report),
                     evidence=[e.id for e in st.evidence], report_uri=f"dxagent://runs/{thread_id}/report")
        text = _short(f.answer, outcome, f"thread {thread_id}, turn {f.turn}, evidence {', '.join(f.evidence) or 'none'}")
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=f.model_dump(mode="json"))

    @mcp.tool(description="The expert tools dxagent's planner can call: their kind (segment, measure, classify, ...), "
                          "modalities, dimensions and the question words their evidence addresses.")
    def list_expert_tools() -> list[ExpertTool]:
        from agent.engine.session import tools

        return [ExpertTool(name=c["name"], kind=c["kind"], modalities=c["modalities"], dims=c["dims"],
                           addresses=c["topics"], description=c["description"], version=str(c["version"]))
                for c in (t.card() for t in tools().values())]

    @mcp.tool(description="A run's report as `dxagent run` writes it: format 'json' (report.json) or 'md' (report.md). "
                          "After follow-ups, the latest turn's report.", structured_output=False)
    async def get_report(run_id: str, format: Literal["json", "md"] = "json") -> str:
        report = await _blocking(backend.report, run_id)
        return to_markdown(report) if format == "md" else json.dumps(report, indent=2)

    @mcp.tool(description="The `dxagent trace verify` verdict of a run's record: intact, INCOMPLETE (unsealed: "
                          "running, killed), UNCHECKED (sealed with a key not set here) or TAMPERED, with its problems.")
    async def verify_trace(run_id: str) -> Verdict:
        return await _blocking(backend.verdict, run_id)

    def _report_of(run_id: str) -> dict[str, Any]:
        try:
            return backend.report(run_id)
        except ToolError as exc:
            raise ResourceNotFoundError(str(exc)) from None

    @mcp.resource("dxagent://runs/{run_id}/report", mime_type="text/markdown",
                  description="a run's report, Markdown (what `dxagent run` prints)")
    def report_md(run_id: str) -> str:
        return to_markdown(_report_of(run_id))

    @mcp.resource("dxagent://runs/{run_id}/report.json", mime_type="application/json",
                  description="a run's report, JSON (report.json)")
    def report_json(run_id: str) -> str:
        return json.dumps(_report_of(run_id), indent=2)

    @mcp.resource("dxagent://runs/{run_id}/artifacts", mime_type="application/json",
                  description="the masks, overlays and pixel files a run's tools made, with their resource uris")
    def artifact_list(run_id: str) -> str:
        try:
            return json.dumps([a.model_dump() for a in backend.artifacts(run_id)], indent=2)
        except ToolError as exc:
            raise ResourceNotFoundError(str(exc)) from None

    @mcp.resource("dxagent://runs/{run_id}/artifacts/{name}", mime_type="application/octet-stream",
                  description="one artifact file (an overlay PNG, a mask .npy, ...) as a blob with its mime type")
    def artifact(run_id: str, name: str) -> bytes:
        try:
            found = artifact_file(backend.trace, backend.artifact_root, run_id, name)
        except Refused as exc:
            raise ResourceNotFoundError(exc.detail) from None
        try:
            data = Path(found["_file"]).read_bytes()
        except OSError as exc:
            raise ResourceError(f"artifact {name!r} cannot be read ({exc.strerror})") from None
        backend.mime[f"dxagent://runs/{run_id}/artifacts/{name}"] = found.get("media_type") or "application/octet-stream"
        return data

    return mcp


def http_app(runs: RunQueue, roots: list[Path], token: str | None) -> tuple[MCPServer, Any]:
    """The server for `dxagent serve`: (the MCPServer, its Starlette app serving streamable HTTP at /mcp). The caller
    adds the app's routes and runs `server.session_manager.run()` in its lifespan. With a bearer token (the serve
    middleware checks it on /mcp too) the Host-header check for DNS rebinding is off: a server beyond loopback is
    reached by names the SDK cannot know, and a rebinding page cannot send the token."""
    from mcp.server.transport_security import TransportSecuritySettings

    server = build(Backend(runs.settings, roots, runs))
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False) if token else None
    return server, server.streamable_http_app(streamable_http_path="/mcp", transport_security=security)


def serve_stdio(settings: ServeSettings, roots: list[Path]) -> None:
    """`dxagent mcp`: serve over stdin/stdout until the client closes them (the SDK points fd 1 at stderr meanwhile, so
    a stray print or a child process cannot corrupt the protocol)."""
    backend = Backend(settings, roots)
    backend.trace.mark_interrupted()
    try:
        anyio.run(build(backend).run_stdio_async)
    finally:
        backend.close()
