"""`dxagent serve`: a REST API over the engine the CLI uses (FastAPI + uvicorn). Research use only.

    POST /api/runs                       create a run: a multipart upload (DICOM, NIfTI, PNG/JPEG, a zip of one DICOM
                                         series) or JSON {"path": ...} under a served root, or a dicomweb:// study
    GET  /api/runs                       the runs this server accepted, newest first
    GET  /api/runs/{id}                  status, the typed answer with its probability, the one-line error
    GET  /api/runs/{id}/report           report JSON; ?format=md: the Markdown `dxagent run` prints
    GET  /api/runs/{id}/events           Server-Sent Events: the run's trace events as they are recorded (id: = seq;
                                         Last-Event-ID continues), then `event: end`
    GET  /api/runs/{id}/artifacts[/{name}]  masks, overlays, pixels the run's tools made (the artifact store)
    POST /api/runs/{id}/verify           the `dxagent trace verify` verdict
    POST /api/runs/{id}/cancel | resume  stop a run at its next step / continue an interrupted one
    POST /api/batches                    submit a batch: JSON {"manifest": a folder/.csv/.jsonl under a served root, or a
                                         DICOMweb query} or a multipart manifest file; each row a run in the same queue
    GET  /api/batches[/{id}]             counts, each row's status and run id, the summary once finished
    GET  /api/batches/{id}/events        Server-Sent Events: progress, each row's new status, then `end` (the summary)
    POST /api/batches/{id}/cancel | resume  drop/stop its rows / continue its interrupted, cancelled, failed rows
    /mcp                                 the MCP server (agent/app/mcp_server.py) over streamable HTTP
    GET  /                               the reading-room page, with its endpoints (agent/app/reading_room.py)

How it fits: `create_app` builds the FastAPI app around a `RunQueue` (agent/app/serve_runs.py), which runs each case
with `agent.engine.session.run_case` into the same trace store as `dxagent run`, so `trace list/verify` and `replay`
see API runs as CLI runs. The event stream polls the trace store (every `poll_s`, 0.2 s by default): it works across
processes and after a restart, and a reconnecting client continues from its last event id.

Safety: loopback by default; a bearer token (DXAGENT_SERVE_TOKEN) is checked on every request when set and the CLI
refuses to listen beyond loopback without one; uploads are read as a stream and cut at --max-upload-mb (413), checked
to be images before anything is kept, and kept only under <trace dir>/uploads/ by sha256; a `path` must resolve
(symlinks too) inside a served root (403). Responses carry what the CLI's report and trace carry (de-identified:
agent/imaging/deid.py), never an input path or file name. Every refusal is a 4xx with one line: {"detail": "..."}.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import uuid
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from agent.app.serve_runs import FINISHED, RunQueue, RunRecord, ServeSettings, now, one_line

DISCLAIMER = "RESEARCH USE ONLY: not a medical device; reports must not be used for diagnosis or treatment."
MAX_JSON_BYTES = 1 << 20  # a JSON request body
MAX_FIELD_BYTES = 64 << 10  # one form field of an upload
MAX_ZIP_MEMBERS = 10_000
PUBLIC_STATIC = "/static/reading-room/"  # the page's script and style: served without the token (they hold no data)


@dataclass
class ServeConfig:
    settings: ServeSettings
    roots: list[Path] = field(default_factory=lambda: [Path.cwd().resolve()])
    token: str | None = None
    max_upload_bytes: int = 512 << 20
    cors_origins: list[str] = field(default_factory=list)  # none: CORS off
    poll_s: float = 0.2  # how often an event stream looks for new events


class Refused(Exception):
    """A request refused with a status and one line (nothing kept)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# -- request and response bodies -------------------------------------------------------------------------------------
class RunOptions(BaseModel):
    question: str | None = Field(None, max_length=4000, description="the question; none: describe the findings")
    clinical_context: str = Field("", max_length=4000)
    modality: str | None = Field(None, max_length=16, description="when the file has none (CT, MR, DX, ...)")
    body_part: str | None = Field(None, max_length=64)
    max_steps: int | None = Field(None, ge=1, le=50, description="tool-call budget (default: the server's)")
    max_seconds: float | None = Field(None, gt=0, le=3600, description="wall-clock budget (default: the server's)")
    min_probability: str | None = Field(None, description="withhold a closed answer under this probability, or "
                                                          "'careful' (as --min-probability)")
    route: bool = Field(True, description="false: the planner chooses every call (as --no-route)")


class PathRun(RunOptions):
    path: str | None = Field(None, description="a file or DICOM series folder under a served root (relative paths "
                                               "are relative to the first root), or dicomweb://HOST/PATH?study=UID")
    paths: list[str] | None = Field(None, max_length=16, description="several images, as `dxagent run A B`")


class BatchRequest(RunOptions):
    manifest: str = Field(..., max_length=4000, description="a folder, a .csv/.tsv or a .jsonl (the `dxagent batch` "
                          "formats) under a served root (relative paths: to the first root), or a DICOMweb query "
                          "dicomweb://HOST/PATH?modality=CT&date=YYYYMMDD-YYYYMMDD (one row per study it finds). The "
                          "options are the defaults of rows that give none (a row's question comes first)")


class BatchRowView(BaseModel):
    n: int
    where: str = Field(description="the row's place in the manifest: row N (CSV), line N (JSONL), case N (a folder's "
                                   "file or series), study N (a query)")
    run_id: str | None = Field(None, description="its run (GET /api/runs/{run_id}); none for an invalid row")
    status: str = Field(description="invalid | queued | running | done | failed | cancelled | interrupted")
    error: str | None = None


class BatchView(BaseModel):
    id: str
    status: str = Field(description="running (a row is queued or running) | finished")
    source: str
    question: str | None = None
    created_at: str
    counts: dict[str, int]
    rows: list[BatchRowView] | None = None
    summary: dict[str, Any] | None = Field(None, description="once finished: counts, outcomes, modalities, answer kinds, "
                                                             "seconds per run, runs per minute, agreement with the "
                                                             "manifest's reference labels")
    links: dict[str, str] = {}
    disclaimer: str = DISCLAIMER


class RunView(BaseModel):
    id: str
    status: str
    source: str | None = None
    question: str | None = None
    n_inputs: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    answer: dict[str, Any] | None = None  # the report's typed answer: kind, value, unit, probability, text, reason
    outcome: str | None = None  # report | abstain | refer
    error: str | None = None
    events: int | None = None
    batch: str | None = None
    links: dict[str, str] = {}
    disclaimer: str = DISCLAIMER


class Verdict(BaseModel):
    run_id: str
    verdict: str  # intact | INCOMPLETE | UNCHECKED | TAMPERED (as `dxagent trace verify`)
    problems: list[str]
    events: int
    artifacts: int
    seal_alg: str | None


# -- uploads ---------------------------------------------------------------------------------------------------------
class Uploads:
    """Files received in a multipart body, streamed to <trace dir>/uploads/.incoming/<request>/ and counted as they
    arrive (cut at the limit), then checked; only `keep` moves them to their content-addressed place."""

    def __init__(self, root: Path, limit: int, hint: str = "send the image as a form field named 'file'"):
        self.root, self.limit, self.hint = root, limit, hint
        self.incoming = root / ".incoming" / uuid.uuid4().hex
        self.files: list[tuple[Path, str, int]] = []  # (temporary path, sha256, bytes), in the body's order
        self.fields: dict[str, str] = {}

    async def receive(self, request: Request) -> None:
        from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if not boundary:
            raise Refused(400, "malformed upload: multipart/form-data without a boundary")
        part: dict[str, Any] = {}

        def on_part_begin() -> None:
            part.clear()
            part.update(headers={}, name=b"", value=b"", data=bytearray(), fh=None)

        def on_header_field(data: bytes, start: int, end: int) -> None:
            part["name"] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            part["value"] += data[start:end]

        def on_header_end() -> None:
            part["headers"][part["name"].decode("latin-1").lower()] = part["value"]
            part["name"], part["value"] = b"", b""

        def on_headers_finished() -> None:
            _, disp = parse_options_header(part["headers"].get("content-disposition", b""))
            part["field"] = disp.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in disp:  # a file: to disk, hashed as it arrives (its name is never kept)
                self.incoming.mkdir(parents=True, exist_ok=True)
                path = self.incoming / f"part-{len(self.files) + 1}"
                part.update(fh=open(path, "wb"), path=path, sha=hashlib.sha256(), n=0)

        def on_part_data(data: bytes, start: int, end: int) -> None:
            chunk = data[start:end]
            if part.get("fh") is not None:
                part["fh"].write(chunk)
                part["sha"].update(chunk)
                part["n"] += len(chunk)
            else:
                part["data"] += chunk
                if len(part["data"]) > MAX_FIELD_BYTES:
                    raise Refused(400, f"form field {part['field']!r} is over {MAX_FIELD_BYTES >> 10} KiB")

        def on_part_end() -> None:
            if part.get("fh") is not None:
                part["fh"].close()
                self.files.append((part["path"], part["sha"].hexdigest(), part["n"]))
            else:
                self.fields[part["field"]] = part["data"].decode("utf-8", "replace")

        parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                            "on_header_value": on_header_value, "on_header_end": on_header_end,
                                            "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                                            "on_part_end": on_part_end})
        total = 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > self.limit:
                    raise Refused(413, f"upload over the {self.limit / 2**20:g} MB limit (--max-upload-mb): nothing was "
                                       "kept")
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as exc:
            raise Refused(400, f"malformed upload: {one_line(exc, 160)}") from None
        finally:
            if part.get("fh") is not None and not part["fh"].closed:
                part["fh"].close()
        if not self.files:
            raise Refused(400, f"malformed upload: no file part ({self.hint})")

    def keep(self, series: bool) -> tuple[list[str], list[str]]:
        """Check every received file (an image `load_file` reads, or a zip of one DICOM series), then move them to
        uploads/<sha256> (a zip: uploads/<sha256>.series/; series=True: all files in one folder, one DICOM series).
        Returns (input paths, kinds). Refused (and nothing kept) when any file is not an image."""
        from agent.imaging.loaders import file_kind

        checked: list[tuple[Path, str, str]] = []
        for i, (tmp, sha, n) in enumerate(self.files, 1):
            if n == 0:
                raise Refused(400, f"upload file {i}: 0-byte file")
            with open(tmp, "rb") as fh:
                is_zip = fh.read(4) == b"PK\x03\x04"
            kind = "zip" if is_zip else file_kind(tmp)
            if kind is None:
                raise Refused(400, f"upload file {i}: not an image (no DICOM preamble, not PNG/JPEG/TIFF/NIfTI, not a zip "
                                   "of a DICOM series)")
            checked.append((tmp, sha, kind))
        if series and any(not k.startswith("dicom") for _, _, k in checked):
            raise Refused(400, "series=true: every uploaded file must be DICOM (one series)")
        unzipped = {sha: self._unzip(tmp, i) for i, (tmp, sha, kind) in enumerate(checked, 1) if kind == "zip"}
        self.root.mkdir(parents=True, exist_ok=True)
        paths: list[str] = []
        if series:
            digest = hashlib.sha256("".join(sorted(sha for _, sha, _ in checked)).encode()).hexdigest()
            folder = self.incoming / "series"
            folder.mkdir()
            for tmp, sha, _ in checked:
                os.replace(tmp, folder / sha)
            paths.append(str(self._place(folder, f"{digest}.series")))
        else:
            for tmp, sha, kind in checked:
                paths.append(str(self._place(unzipped[sha], f"{sha}.series") if kind == "zip" else self._place(tmp, sha)))
        return paths, ["series" if series else k for _, _, k in checked]

    def _place(self, src: Path, name: str) -> Path:
        final = self.root / name
        if not final.exists():  # content-addressed: the same bytes are kept once
            os.replace(src, final)
        return final

    def _unzip(self, tmp: Path, i: int) -> Path:
        """A zip's members (DICOM files only; folders, __MACOSX and dot files skipped) extracted under numbered names
        (never the members' names), counted against the upload limit as they are written (a zip bomb stops there)."""
        from agent.imaging.loaders import file_kind

        out = self.incoming / f"zip-{i}"
        out.mkdir()
        written = 0
        try:
            with zipfile.ZipFile(tmp) as zf:
                members = [m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                           and not Path(m.filename).name.startswith(".")]
                if not members:
                    raise Refused(400, f"upload file {i}: the zip holds no file")
                if len(members) > MAX_ZIP_MEMBERS:
                    raise Refused(400, f"upload file {i}: the zip holds over {MAX_ZIP_MEMBERS} files")
                for k, m in enumerate(members, 1):
                    dest = out / f"{k:05d}.dcm"
                    with zf.open(m) as src, open(dest, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            if written > self.limit:
                                raise Refused(413, f"upload file {i}: the zip unpacks to over the {self.limit / 2**20:g} MB "
                                                   "limit (--max-upload-mb): nothing was kept")
                            dst.write(chunk)
                    if not (file_kind(dest) or "").startswith("dicom"):
                        raise Refused(400, f"upload file {i}: zip member {k} is not DICOM (a zip is read as one DICOM "
                                           "series)")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
            raise Refused(400, f"upload file {i}: not a readable zip ({one_line(exc, 120)})") from None
        return out

    def discard(self) -> None:
        shutil.rmtree(self.incoming, ignore_errors=True)


# -- paths under the served roots ------------------------------------------------------------------------------------
def _inside(p: Path, roots: list[Path]) -> bool:
    return any(p == r or p.is_relative_to(r) for r in roots)


def under_roots(text: str, roots: list[Path]) -> Path:
    """A path (relative paths: to the first root) resolved with its symlinks; Refused 403 outside the served roots, 404
    when it does not exist (what `confine` checks first, and the reading room's folder listing)."""
    if "\x00" in text:
        raise Refused(400, "a path may not contain NUL")
    p = Path(text).expanduser()
    real = (p if p.is_absolute() else roots[0] / p).resolve()
    if not _inside(real, roots):
        raise Refused(403, "path is outside the served roots (--root)")
    if not real.exists():
        raise Refused(404, "path: no such file or folder under the served roots")
    return real


def confine(text: str, roots: list[Path]) -> tuple[str, str]:
    """A `path` of a JSON request as (input, source): a dicomweb:// reference as it is (checked), or a file or folder
    that resolves - symlinks included, and every link inside a folder - inside a served root."""
    from agent.imaging.dicomweb import DicomWebError, is_reference, parse

    if is_reference(text):
        try:
            parse(text)
        except DicomWebError as exc:
            raise Refused(400, one_line(exc, 200)) from None
        return text, "dicomweb"
    real = under_roots(text, roots)
    if real.is_dir():
        for x in real.rglob("*"):
            if x.is_symlink() and not _inside(x.resolve(), roots):
                raise Refused(403, "path: the folder holds a link to outside the served roots (--root)")
    _refuse_non_image(real)
    return str(real), "path"


def _refuse_non_image(p: Path) -> None:
    """Refused (400) when a file is not an image the loader reads (its own content test) or a folder holds none: the
    request is refused before anything is queued or recorded, as a non-image upload is."""
    from agent.imaging.loaders import file_kind

    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())[:10_000]
    try:
        ok = any(file_kind(f) for f in files)
    except OSError as exc:
        raise Refused(400, f"path cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not ok:
        raise Refused(400, "path is not an image (no DICOM preamble, not PNG/JPEG/TIFF/NIfTI)" if p.is_file()
                      else "path is a folder that holds no image")


# -- a batch's manifest ---------------------------------------------------------------------------------------------
def plan_batch(manifest: str | Path, root: Path | None, hide: list[str], roots: list[Path], options: dict[str, Any],
               batch_id: str) -> tuple[list[Any], list[RunRecord]]:
    """A manifest read by `dxagent batch`'s own reader (agent/app/batch.py's `read_manifest`) as (rows, the run records
    of the rows that can run). A row the reader finds wrong, or whose path `confine` refuses, is an `invalid` row with
    its one-line reason; the manifest as a whole unusable, or no row that can run, is Refused 400 (nothing queued).
    `hide`: what the reader may say of the manifest's own place (replaced by "the manifest")."""
    from agent.app.batch import read_manifest
    from agent.app.serve_batches import MAX_ROWS, BatchRow, row_error, safe_where
    from agent.core.errors import ManifestError
    from agent.engine.graph import new_run_id
    from agent.imaging.dicomweb import PacsError

    try:
        mroot, specs = read_manifest(manifest, root)
    except ManifestError as exc:
        msg = str(exc)
        for h in sorted({h for h in hide if h}, key=len, reverse=True):
            msg = msg.replace(h, "the manifest")
        if isinstance(exc.__cause__, PacsError):  # the query was fine; the PACS did not answer it
            raise Refused(502, f"the PACS did not answer the query: {one_line(msg, 240)}") from None
        raise Refused(400, f"malformed manifest: {one_line(msg, 240)}") from None
    if len(specs) > MAX_ROWS:
        raise Refused(400, f"the manifest lists {len(specs)} cases: a batch holds at most {MAX_ROWS}")
    rows, recs = [], []
    for n, spec in enumerate(specs, 1):
        where = safe_where(spec.where, n)
        if spec.error:
            rows.append(BatchRow(n=n, where=where, status="invalid", labels=spec.labels,
                                 error=row_error(spec.error, spec.where, where, spec.paths, spec.case_id, mroot)))
            continue
        try:
            confined = [confine(p, roots) for p in spec.paths]
        except Refused as exc:
            rows.append(BatchRow(n=n, where=where, status="invalid", labels=spec.labels, error=f"{where}: {exc.detail}"))
            continue
        inputs = [p for p, _ in confined]
        rec = RunRecord(id=new_run_id("".join(inputs) + str(n)), created_at=now(), batch=batch_id,
                        source="dicomweb" if any(src == "dicomweb" for _, src in confined) else "path",
                        inputs=inputs, n_inputs=len(inputs),
                        **{**options, "question": spec.question or options["question"],
                           "clinical_context": spec.clinical_context or options["clinical_context"],
                           "modality": spec.modality or options["modality"],
                           "body_part": spec.body_part or options["body_part"]})
        rows.append(BatchRow(n=n, where=where, run_id=rec.id, labels=spec.labels))
        recs.append(rec)
    if not recs:
        raise Refused(400, one_line(f"the manifest has no row that can run (nothing queued): {rows[0].error}", 240))
    return rows, recs


def sniff_manifest(path: Path, fmt: str | None) -> Path:
    """An uploaded manifest renamed with the suffix `read_manifest` reads it by: `format` (csv, tsv, jsonl) when
    given, else JSONL when its first line is a JSON object, TSV when that line has tabs and no comma, else CSV."""
    if fmt is None:
        with open(path, "rb") as fh:
            first = next((ln for ln in fh.read(65536).splitlines() if ln.strip()), b"")
        fmt = "jsonl" if first.lstrip().startswith(b"{") else "tsv" if b"\t" in first and b"," not in first else "csv"
    if fmt not in ("csv", "tsv", "jsonl"):
        raise Refused(400, "format: csv, tsv or jsonl")
    named = path.with_name(f"manifest.{fmt}")
    os.replace(path, named)
    return named


# -- what a run's record holds, for the API and the MCP server (agent/app/mcp_server.py) ------------------------------
def run_artifacts(trace: Any, run_id: str) -> list[dict[str, Any]]:
    """The files a run's tools made, as the API names them (sha256 + suffix; never a path): name, sha256, kind,
    media_type, bytes, url, and `_path` (inside the artifact store: not for a response)."""
    try:
        dump = trace.dump(run_id)
    except KeyError:
        raise Refused(404, f"no run {run_id!r} in the trace store (a queued run has no artifacts yet)") from None
    out = []
    for a in dump.get("artifacts", []):
        name = a["sha256"] + Path(a.get("path") or "").suffix
        out.append({"name": name, "sha256": a["sha256"], "kind": a.get("kind"), "media_type": a.get("media_type"),
                    "bytes": a.get("bytes"), "url": f"/api/runs/{run_id}/artifacts/{name}", "_path": a.get("path")})
    return out


def artifact_file(trace: Any, artifact_root: Path, run_id: str, name: str) -> dict[str, Any]:
    """One artifact of a run (as `run_artifacts`) with `_file`, its file inside the artifact store; Refused 404 when the
    run has no such artifact or its file is missing."""
    found = next((a for a in run_artifacts(trace, run_id) if a["name"] == name), None)
    if found is None:
        raise Refused(404, f"run {run_id} has no artifact {name!r}")
    path = (artifact_root / (found["_path"] or "")).resolve()
    if not _inside(path, [artifact_root.resolve()]) or not path.is_file():
        raise Refused(404, f"artifact {name!r}: its file is missing from the artifact store")
    return {**found, "_file": path}


def verdict(trace: Any, artifact_root: Path, run_id: str) -> Verdict:
    """The `dxagent trace verify` verdict of one run; Refused 404 when the store has no such run."""
    from agent.app.cli.trace import verdict_of
    from agent.store.trace import verify_dump

    try:
        dump = trace.dump(run_id)
    except KeyError:
        raise Refused(404, f"no run {run_id!r} in the trace store") from None
    problems = verify_dump(dump, artifact_root)
    return Verdict(run_id=run_id, verdict=verdict_of(problems), problems=problems, events=len(dump["events"]),
                   artifacts=len(dump.get("artifacts", [])), seal_alg=dump["run"].get("seal_alg"))


# -- the app ---------------------------------------------------------------------------------------------------------
def _one_line_validation(exc: ValidationError | RequestValidationError) -> str:
    errs = exc.errors()
    e = errs[0] if errs else {}
    where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",))
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return one_line(f"{where}: {e.get('msg', 'invalid')}{more}" if where else f"{e.get('msg', 'invalid')}{more}", 200)


async def json_body(request: Request) -> bytes:
    """A JSON request body read as a stream and cut at MAX_JSON_BYTES (413)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise Refused(413, f"JSON body over {MAX_JSON_BYTES >> 10} KiB")
    return bytes(body)


def request_body(required: str, json_model: type[BaseModel], upload_fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of an endpoint that takes a multipart upload (these fields plus the run options as form
    fields) or JSON (`json_model`)."""
    options = ("question", "clinical_context", "modality", "body_part", "max_steps", "max_seconds", "min_probability",
               "route")
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": [required], "properties": {
            **upload_fields, **{k: {"type": "string"} for k in options}}}},
        "application/json": {"schema": json_model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


def create_app(config: ServeConfig) -> FastAPI:
    from agent.app.serve_batches import Batches

    runs = RunQueue(config.settings)
    batches = Batches(runs)
    trace_dir = Path(config.settings.trace_dir)
    uploads_root = trace_dir / "uploads"
    artifact_root = trace_dir / "artifacts"
    shutil.rmtree(uploads_root / ".incoming", ignore_errors=True)  # what a killed server was receiving
    from agent.app.mcp_server import http_app

    mcp, mcp_app = http_app(runs, config.roots, config.token)  # the MCP server at /mcp, its runs in this queue

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runs.start()
        async with mcp.session_manager.run():
            yield
        runs.stop()

    app = FastAPI(title="dxagent", version="0.1.0", lifespan=lifespan,
                  description="An agentic diagnostic orchestrator for medical images: create a run, follow its "
                              "think / act / rethink steps, fetch its evidence-cited report. " + DISCLAIMER)
    app.state.runs = runs
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])

    @app.middleware("http")
    async def bearer_token(request: Request, call_next: Any) -> Any:
        """Every request needs `Authorization: Bearer <token>` when a token is set (checked before any body is
        read); compared in constant time. The reading room's page and its script and style (no data: the page asks
        for the token and sends it on every call) are the exception."""
        public = request.method == "GET" and (request.url.path == "/" or request.url.path.startswith(PUBLIC_STATIC))
        if config.token and request.method != "OPTIONS" and not public:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), config.token.encode()):
                return JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line_validation(exc)}, status_code=422)

    def links(run_id: str) -> dict[str, str]:
        base = f"/api/runs/{run_id}"
        return {"self": base, "events": f"{base}/events", "report": f"{base}/report", "artifacts": f"{base}/artifacts",
                "verify": f"{base}/verify", "cancel": f"{base}/cancel", "resume": f"{base}/resume"}

    def view(run_id: str) -> RunView:
        status, row, rec = runs.status(run_id)
        if status is None:
            raise Refused(404, f"no run {run_id!r}")
        v = RunView(id=run_id, status=status, links=links(run_id))
        if rec is not None:
            v.source, v.question, v.n_inputs, v.batch = rec.source, rec.question, rec.n_inputs, rec.batch
            v.created_at, v.started_at, v.finished_at, v.error = rec.created_at, rec.started_at, rec.finished_at, rec.error
        if row is not None:
            v.question = row.question or v.question
            v.created_at = v.created_at or row.created_at
            if status in FINISHED:
                v.finished_at = row.finished_at or v.finished_at
                v.error = row.error or (v.error if status != "done" else None)
            report = json.loads(row.report) if row.report else None
            if report:
                v.answer = report.get("answer")
                v.outcome = (report.get("recommendation") or {}).get("outcome")
            v.events = row.n_events if row.n_events is not None else runs.count_events(run_id)
        return v

    def options(o: RunOptions) -> dict[str, Any]:
        from agent.engine.calibration import parse_threshold

        try:
            p = parse_threshold(o.min_probability)
        except ValueError as exc:
            raise Refused(400, f"min_probability: {exc}") from None
        s = config.settings
        return {"question": o.question or None, "clinical_context": o.clinical_context, "modality": o.modality,
                "body_part": o.body_part, "max_steps": o.max_steps or s.max_steps,
                "max_wall_s": o.max_seconds or s.max_wall_s, "min_probability": p, "route": o.route}

    def new_id(seed: str) -> str:
        from agent.engine.graph import new_run_id

        return new_run_id(seed)

    async def json_model(request: Request, model: type[BaseModel]) -> Any:
        """The JSON body validated as `model`: an empty body is a 400, an invalid one a 422, each one line."""
        body = await json_body(request)
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise Refused(422 if body else 400, _one_line_validation(exc) if body else "empty JSON body") from None

    async def form_upload(request: Request, hint: str | None = None) -> tuple[Uploads, RunOptions]:
        """A multipart request received within the upload limit: its files in a temporary folder (the caller keeps
        what it needs, then calls `discard()`) and its run options, validated; refused with nothing kept."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_upload_bytes:
            raise Refused(413, f"upload over the {config.max_upload_bytes / 2**20:g} MB limit (--max-upload-mb): "
                               "nothing was kept")
        up = Uploads(uploads_root, config.max_upload_bytes, **({"hint": hint} if hint else {}))
        try:
            await up.receive(request)
            opts = RunOptions.model_validate({k: v for k, v in up.fields.items() if k in RunOptions.model_fields
                                              and v != ""})
        except ValidationError as exc:
            up.discard()
            raise Refused(422, _one_line_validation(exc)) from None
        except BaseException:
            up.discard()
            raise
        return up, opts

    run_body = request_body("file", PathRun, {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or more images (DICOM, NIfTI, PNG/JPEG/TIFF) or a zip of one DICOM series"},
        "series": {"type": "boolean", "description": "all files are the slices of one DICOM series"}})

    @app.post("/api/runs", status_code=202, response_model=RunView, openapi_extra=run_body,
              summary="create a run (an upload, or a path under a served root, or a dicomweb:// study)")
    async def create_run(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            up, opts = await form_upload(request)
            try:
                series = up.fields.get("series", "").strip().lower() in ("1", "true", "yes", "on")
                inputs, _ = await run_in_threadpool(up.keep, series)
            finally:
                up.discard()
            source, seed = "upload", "".join(inputs)
        elif ctype == "application/json":
            req = await json_model(request, PathRun)
            given = ([req.path] if req.path else []) + list(req.paths or [])
            if not given:
                raise Refused(400, "give `path` (or `paths`): a file or folder under a served root, or dicomweb://...")
            confined = [confine(p, config.roots) for p in given]
            inputs = [p for p, _ in confined]
            source = "dicomweb" if any(s == "dicomweb" for _, s in confined) else "path"
            opts, seed = req, "".join(inputs)
        else:
            raise Refused(415, "send multipart/form-data (an upload) or application/json (a path)")
        rec = RunRecord(id=new_id(seed), created_at=now(), source=source, inputs=inputs, n_inputs=len(inputs),
                        **options(opts))
        runs.submit(rec)
        return JSONResponse(view(rec.id).model_dump(), status_code=202, headers={"Location": f"/api/runs/{rec.id}"})

    @app.get("/api/runs", response_model=list[RunView], summary="the runs this server accepted, newest first")
    async def list_runs(limit: int = Query(100, ge=1, le=10_000), status: str | None = None) -> list[RunView]:
        def build() -> list[RunView]:
            out = []
            for rec in runs.records():
                v = view(rec.id)
                if status is None or v.status == status:
                    out.append(v)
                if len(out) >= limit:
                    break
            return out

        return await run_in_threadpool(build)

    @app.get("/api/runs/{run_id}", response_model=RunView, summary="a run's status, typed answer and error")
    async def get_run(run_id: str) -> RunView:
        return await run_in_threadpool(view, run_id)

    @app.get("/api/runs/{run_id}/report", summary="the report (JSON, or ?format=md for the CLI's Markdown)")
    async def get_report(run_id: str, format: str = Query("json", pattern="^(json|md)$")) -> Any:
        from agent.engine.report import to_markdown

        status, row, _ = await run_in_threadpool(runs.status, run_id)
        if status is None:
            raise Refused(404, f"no run {run_id!r}")
        if row is None or not row.report:
            raise Refused(409, f"run {run_id} is {status}: it has no report" + ("" if status in FINISHED else " yet"))
        report = json.loads(row.report)
        if format == "md":
            return PlainTextResponse(to_markdown(report), media_type="text/markdown; charset=utf-8")
        return JSONResponse(report)

    @app.get("/api/runs/{run_id}/events", summary="Server-Sent Events: the run's trace events, then `end`")
    async def stream_events(request: Request, run_id: str, after: int | None = Query(None, ge=-1)) -> Any:
        from sse_starlette.sse import EventSourceResponse

        from agent.app.serve_runs import event_view

        if (await run_in_threadpool(runs.status, run_id))[0] is None:
            raise Refused(404, f"no run {run_id!r}")
        last = request.headers.get("last-event-id", "")
        cursor = int(last) if last.strip().lstrip("-").isdigit() else (after if after is not None else -1)

        async def events() -> Any:
            nonlocal cursor
            while True:
                status = (await run_in_threadpool(runs.status, run_id))[0]  # read before the events: none is missed
                batch = await run_in_threadpool(runs.events_after, run_id, cursor)
                for ev in batch:
                    cursor = ev.seq
                    yield {"id": str(ev.seq), "data": json.dumps(event_view(ev), default=str)}
                if not batch and status in FINISHED:
                    yield {"event": "end", "data": json.dumps({"run_id": run_id, "status": status})}
                    return
                if not batch:
                    await asyncio.sleep(config.poll_s)

        return EventSourceResponse(events(), ping=15)

    @app.get("/api/runs/{run_id}/artifacts", summary="the files the run's tools made (masks, overlays, pixels)")
    async def list_artifacts(run_id: str) -> list[dict[str, Any]]:
        found = await run_in_threadpool(run_artifacts, runs.trace, run_id)
        return [{k: v for k, v in a.items() if k != "_path"} for a in found]

    @app.get("/api/runs/{run_id}/artifacts/{name}", summary="one artifact file")
    async def get_artifact(run_id: str, name: str) -> FileResponse:
        found = await run_in_threadpool(artifact_file, runs.trace, artifact_root, run_id, name)
        return FileResponse(found["_file"], media_type=found.get("media_type") or "application/octet-stream")

    @app.post("/api/runs/{run_id}/verify", response_model=Verdict, summary="the `dxagent trace verify` verdict")
    async def verify(run_id: str) -> Verdict:
        return await run_in_threadpool(verdict, runs.trace, artifact_root, run_id)

    @app.post("/api/runs/{run_id}/cancel", summary="drop a queued run, or stop a running one at its next step")
    async def cancel(run_id: str) -> JSONResponse:
        if (await run_in_threadpool(runs.status, run_id))[0] is None:
            raise Refused(404, f"no run {run_id!r}")
        result = await run_in_threadpool(runs.cancel, run_id)
        if result not in ("cancelled", "cancelling"):
            raise Refused(409, f"run {run_id} is {result}: only a queued or running run can be cancelled")
        return JSONResponse({"id": run_id, "status": result}, status_code=202 if result == "cancelling" else 200)

    @app.post("/api/runs/{run_id}/resume", status_code=202, response_model=RunView,
              summary="continue an interrupted, cancelled or failed run from its checkpoint")
    async def resume(run_id: str) -> RunView:
        try:
            await run_in_threadpool(runs.resume, run_id)
        except ValueError as exc:
            raise Refused(409, str(exc)) from None
        return await run_in_threadpool(view, run_id)

    # -- batches: a manifest's rows as runs in the same queue (agent/app/serve_batches.py) ---------------------------
    def batch_links(batch_id: str) -> dict[str, str]:
        base = f"/api/batches/{batch_id}"
        return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel", "resume": f"{base}/resume"}

    def batch_view(batch_id: str, full: bool = True) -> BatchView:
        b = batches.get(batch_id)
        if b is None:
            raise Refused(404, f"no batch {batch_id!r}")
        rows = batches.rows(b)
        done = batches.finished(rows)
        v = BatchView(id=b.id, status="finished" if done else "running", source=b.source, question=b.question,
                      created_at=b.created_at, counts=batches.counts(rows), links=batch_links(b.id))
        if full:
            v.rows = [BatchRowView(**r.model_dump(exclude={"labels"})) for r in rows]
            v.summary = batches.summary(b, rows) if done else None
        return v

    batch_body = request_body("manifest", BatchRequest, {
        "manifest": {"type": "string", "format": "binary", "description": "a CSV/TSV or JSONL manifest (the "
                     "`dxagent batch` formats); its relative paths are relative to the first served root"},
        "format": {"type": "string", "enum": ["csv", "tsv", "jsonl"], "description": "default: sniffed"}})

    @app.post("/api/batches", status_code=202, response_model=BatchView, openapi_extra=batch_body,
              summary="submit a batch: a manifest (uploaded, or a path under a served root) or a DICOMweb query")
    async def create_batch(request: Request) -> JSONResponse:
        from agent.app.serve_batches import BatchRecord, new_batch_id
        from agent.imaging.dicomweb import is_query

        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        batch_id = new_batch_id()
        if ctype == "multipart/form-data":
            up, opts = await form_upload(request, hint="send the manifest as a form field named 'manifest'")
            try:
                fmt = up.fields.get("format", "").strip().lower() or None
                named = sniff_manifest(up.files[0][0], fmt)
                rows, recs = await run_in_threadpool(plan_batch, named, config.roots[0], [str(named)], config.roots,
                                                     options(opts), batch_id)
            finally:
                up.discard()
            source = "upload"
        elif ctype == "application/json":
            req = await json_model(request, BatchRequest)
            if is_query(req.manifest):  # QIDO-RS, on a worker thread: one row per study it finds
                hide, source, manifest = [req.manifest], "dicomweb", req.manifest
            else:
                real = await run_in_threadpool(under_roots, req.manifest, config.roots)
                hide, source, manifest = [str(real), req.manifest], "path", real
            rows, recs = await run_in_threadpool(plan_batch, manifest, None, hide, config.roots, options(req), batch_id)
            opts = req
        else:
            raise Refused(415, "send application/json ({\"manifest\": ...}) or multipart/form-data (a manifest file)")
        b = BatchRecord(id=batch_id, created_at=now(), source=source, question=opts.question or None, rows=rows)
        await run_in_threadpool(batches.create, b, recs)
        return JSONResponse(batch_view(b.id).model_dump(), status_code=202, headers={"Location": f"/api/batches/{b.id}"})

    @app.get("/api/batches", response_model=list[BatchView], summary="the batches this server accepted, newest first")
    async def list_batches(limit: int = Query(100, ge=1, le=10_000)) -> list[BatchView]:
        return await run_in_threadpool(lambda: [batch_view(b.id, full=False) for b in batches.all()[:limit]])

    @app.get("/api/batches/{batch_id}", response_model=BatchView,
             summary="a batch's counts, each row's status and run id, and its summary once finished")
    async def get_batch(batch_id: str) -> BatchView:
        return await run_in_threadpool(batch_view, batch_id)

    @app.get("/api/batches/{batch_id}/events", summary="Server-Sent Events: `progress` (counts), `row` (a row's new "
                                                      "status), then `end` with the summary")
    async def batch_events(batch_id: str) -> Any:
        from sse_starlette.sse import EventSourceResponse

        b = batches.get(batch_id)
        if b is None:
            raise Refused(404, f"no batch {batch_id!r}")

        async def events() -> Any:
            seen = {r.n: r.status for r in b.rows}  # as submitted: a row that moved since is sent first
            first = True
            while True:
                rows = await run_in_threadpool(batches.rows, b)
                moved = [r for r in rows if seen.get(r.n) != r.status]
                for r in moved:
                    yield {"event": "row", "data": BatchRowView(**r.model_dump(exclude={"labels"})).model_dump_json()}
                seen = {r.n: r.status for r in rows}
                if moved or first:
                    yield {"event": "progress", "data": json.dumps({"id": b.id, "counts": batches.counts(rows)})}
                first = False
                if batches.finished(rows):
                    summary = await run_in_threadpool(batches.summary, b, rows)
                    yield {"event": "end", "data": json.dumps({"id": b.id, "status": "finished", "summary": summary})}
                    return
                await asyncio.sleep(config.poll_s)

        return EventSourceResponse(events(), ping=15)

    @app.post("/api/batches/{batch_id}/cancel", summary="drop a batch's queued rows, stop its running ones")
    async def cancel_batch(batch_id: str) -> JSONResponse:
        b = batches.get(batch_id)
        if b is None:
            raise Refused(404, f"no batch {batch_id!r}")
        return JSONResponse({"id": batch_id, **(await run_in_threadpool(batches.cancel, b))}, status_code=202)

    @app.post("/api/batches/{batch_id}/resume", status_code=202, response_model=BatchView,
              summary="continue a batch's interrupted, cancelled and failed rows")
    async def resume_batch(batch_id: str) -> BatchView:
        b = batches.get(batch_id)
        if b is None:
            raise Refused(404, f"no batch {batch_id!r}")
        if not await run_in_threadpool(batches.resume, b):
            raise Refused(409, f"batch {batch_id} has no interrupted, cancelled or failed row to resume")
        return await run_in_threadpool(batch_view, batch_id)

    from agent.app.reading_room import mount

    mount(app, runs, config.roots, mcp.backend)  # the reading-room page at / and the endpoints it adds
    app.router.routes.extend(mcp_app.routes)  # POST/GET/DELETE /mcp: streamable HTTP, behind the same bearer token
    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
