"""The reading room: the web page of `dxagent serve` (at /) and the endpoints only it needs. Research use only.

    GET  /                                       the page (agent/static/reading_room/: plain HTML, CSS and JS, no build
                                                 step, nothing fetched from elsewhere)
    GET  /api/files?path=                        a folder under the served roots (the same confinement as a run's
                                                 `path`: symlinks resolved, 403 outside)
    GET  /api/runs/{id}/viewer                   what the viewer draws: the views (the loaded image and the crops and
                                                 zooms the tools made), every mask with its legend, every box and
                                                 measurement line, the tools' overlay pictures, the evidence
    GET  /api/runs/{id}/views/{view}/slices/{k}.png?center=&width=
                                                 slice k of a view, windowed (server-rendered: the pixels the loader
                                                 produced at intake, from the artifact store)
    GET  /api/runs/{id}/masks/{name}/slices/{k}  slice k of a label mask, raw uint8 (X-Shape: rows,cols)
    POST /api/runs/{id}/followups                a follow-up question in the run's thread (agent/app/chat.py's engine,
    GET  /api/runs/{id}/followups                the one the MCP server's ask_followup uses: evidence kept, and a
    POST /api/runs/{id}/followups/cancel         thread not in memory - after a restart - is resumed from the store)
    GET  /api/runs/{id}/fhir                     the report as a FHIR R4B Bundle (agent/app/fhir.py)
    GET  /api/runs/{id}/dicom[/{file}]           DICOM SR and SEG (agent/app/dicom_out.py), recorded in the trace
    POST /api/runs/{id}/push                     the SR and SEG stored back into the PACS the study came from
    GET  /api/runs/{id}/audit                    the audit page (agent/app/audit_html.py)

Why server-rendered slices: the views are already arrays in the artifact store (what the tools saw, on the grid their
masks are on), so one small endpoint draws any view - a DICOM series, a NIfTI volume, a PNG, a crop - with no second
reader and no viewer library to vendor; the page adds canvas overlays, window/level, zoom and pan in plain JS.

What leaves: the trace's views and evidence (de-identified at the loader: agent/imaging/deid.py), never an input path.
The SR and SEG files copy the patient and study modules of the source DICOM (dicom_out's design: that is what attaches
them to the study in a PACS), so they are downloads, never shown on the page.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from agent.app.audit_html import PALETTE, _d, _list, _nums, _shapes, _to_uint8
from agent.app.serve import DISCLAIMER, Refused, _inside, under_roots
from agent.app.serve_runs import FINISHED, _brief, one_line
from agent.core.files import write_atomic

STATIC = Path(__file__).resolve().parents[1] / "static" / "reading_room"
MAX_LISTED = 500  # entries of one folder listing
MAX_OUTPUT_CHARS = 6000  # a tool's output as the evidence panel shows it
# window presets (HU) for CT; other modalities get the file's window and the 1st..99th percentile
PRESETS = {"soft tissue": (40, 400), "lung": (-600, 1500), "bone": (400, 1800), "brain": (40, 80)}
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


class FollowupRequest(BaseModel):
    question: str = Field(..., min_length=1, max_length=4000)


# -- what the viewer draws -------------------------------------------------------------------------------------------
def _letters(v: list[float]) -> str:
    """The patient directions (LPS: +x left, +y posterior, +z head) a unit vector points to, the main one first."""
    axes = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda i: -abs(v[i]))
    return "".join(axes[i][0 if v[i] > 0 else 1] for i in order if abs(v[i]) > 0.25)


def orientation(meta: dict[str, Any]) -> dict[str, Any]:
    """The letters at the image's edges, from ImageOrientationPatient (or PatientOrientation); without either, the
    radiological display is assumed (image left = patient right), and said so."""
    iop = _nums(meta.get("ImageOrientationPatient"))
    if iop and len(iop) == 6:
        row, col = iop[:3], iop[3:]
        right, bottom = _letters(row), _letters(col)
        left, top = _letters([-x for x in row]), _letters([-x for x in col])
        if right and bottom:
            return {"left": left, "right": right, "top": top, "bottom": bottom, "assumed": False,
                    "source": "ImageOrientationPatient"}
    po = meta.get("PatientOrientation")
    if isinstance(po, list) and len(po) == 2 and all(isinstance(x, str) and x for x in po):
        right, bottom = po[0].upper(), po[1].upper()
        flip = lambda s: "".join(_OPPOSITE.get(c, "") for c in s)  # noqa: E731
        if flip(right) and flip(bottom):
            return {"left": flip(right), "right": right, "top": flip(bottom), "bottom": bottom, "assumed": False,
                    "source": "PatientOrientation"}
    return {"left": "R", "right": "L", "top": "", "bottom": "", "assumed": True,
            "source": "none in the file: radiological display assumed (image left = patient right)"}


def _depth(view: dict[str, Any]) -> int:
    shape = view.get("shape") or []
    return int(shape[0]) if view.get("ndim_spatial") == 3 and len(shape) >= 3 else 1


def _rgb(view: dict[str, Any]) -> bool:
    shape = view.get("shape") or []
    return view.get("photometric") == "RGB" or (view.get("ndim_spatial", 2) == 2 and len(shape) == 3
                                                 and shape[-1] in (3, 4))


class RunModel:
    """One run's views, masks, boxes and evidence, read from its trace events (as the audit page reads them)."""

    def __init__(self, dump: dict[str, Any], artifact_root: Path):
        self.run_id = dump["run"]["id"]
        self.root = artifact_root
        self.views: dict[str, dict[str, Any]] = {}
        self.acts: list[dict[str, Any]] = []
        for e in dump["events"]:
            p = _d(e.get("payload"))
            for key in ("views", "new_views"):
                for v in _list(p.get(key)):
                    if isinstance(v, dict) and v.get("id"):
                        self.views[str(v["id"])] = v
            if e.get("kind") == "tool" and isinstance(p.get("evidence"), dict):
                self.acts.append(p["evidence"])
        self.masks: dict[str, dict[str, Any]] = {}  # artifact name -> the mask's ref, evidence id and view
        for ev in self.acts:
            for a in _list(ev.get("artifacts")):
                if isinstance(a, dict) and a.get("kind") == "mask" and str(a.get("path", "")).endswith(".npy"):
                    name = f"{a['sha256']}.npy"
                    self.masks.setdefault(name, {"ref": a, "eid": ev.get("id"), "tool": ev.get("tool"),
                                                 "view": a.get("view") or _d(ev.get("args")).get("view") or "V1"})

    def file(self, ref: dict[str, Any]) -> Path:
        f = (self.root / str(ref.get("path") or "")).resolve()
        if not _inside(f, [self.root.resolve()]) or not f.is_file():
            raise Refused(404, "the artifact's file is missing from the artifact store")
        return f

    def view(self, vid: str) -> dict[str, Any]:
        v = self.views.get(vid)
        if v is None:
            raise Refused(404, f"run {self.run_id} has no view {vid!r}" + ("" if self.views else " (yet)"))
        return v

    def pixels(self, vid: str) -> np.ndarray:
        return np.load(self.file(_d(self.view(vid).get("pixels"))), mmap_mode="r", allow_pickle=False)

    def window(self, vid: str) -> tuple[float, float]:
        """The view's default window (center, width): the file's own, else soft tissue for CT, else the 1st..99th
        percentile of (a sample of) its pixels."""
        v = self.view(vid)
        meta = _d(v.get("metadata"))
        c, w = _nums(meta.get("WindowCenter")), _nums(meta.get("WindowWidth"))
        if c and w and w[0] > 0:
            return c[0], w[0]
        if v.get("modality") == "CT" and v.get("parent") is None:
            return PRESETS["soft tissue"]
        arr = self.pixels(vid)
        sample = np.asarray(arr[:: max(1, arr.shape[0] // 16)] if _depth(v) > 1 else arr, dtype=np.float32)
        lo, hi = (float(x) for x in np.percentile(np.nan_to_num(sample), [1, 99]))
        return (lo + hi) / 2, max(hi - lo, 1e-6)

    def public(self) -> dict[str, Any]:
        """What the page reads: views, masks (legend and colours), boxes and lines, tool overlays, evidence."""
        views = []
        for vid, v in self.views.items():
            c, w = self.window(vid) if not _rgb(v) else (None, None)
            prov = _d(v.get("provenance"))
            views.append({"id": vid, "modality": v.get("modality"), "shape": v.get("shape"),
                          "spacing_mm": v.get("spacing_mm"), "slices": _depth(v), "rgb": _rgb(v),
                          "parent": v.get("parent"), "made_by": prov.get("tool"), "window": {"center": c, "width": w},
                          "presets": {k: {"center": a, "width": b} for k, (a, b) in PRESETS.items()}
                          if v.get("modality") == "CT" and not _rgb(v) else {},
                          "orientation": orientation(_d(v.get("metadata")))})
        masks = []
        for i, (name, m) in enumerate(self.masks.items()):
            ref = m["ref"]
            legend = {int(k): str(x) for k, x in _d(ref.get("legend")).items() if str(k).isdigit()}
            try:
                arr = np.load(self.file(ref), mmap_mode="r", allow_pickle=False)
                shape, counts = list(arr.shape), np.bincount(np.asarray(arr, dtype=np.uint8).ravel(), minlength=256)
            except (OSError, ValueError, Refused):
                shape, counts = [], np.zeros(256, dtype=np.int64)
            present = [int(k) for k in np.nonzero(counts)[0] if k > 0]
            labels = [{"value": k, "name": legend.get(k, f"segment {k}"), "pixels": int(counts[k]) if k < 256 else 0,
                       "colour": "#{:02x}{:02x}{:02x}".format(*PALETTE[(i + k - 1) % len(PALETTE)])}
                      for k in sorted(set(legend) | set(present))]
            masks.append({"name": name, "eid": m["eid"], "tool": m["tool"], "view": m["view"],
                          "slice_index": ref.get("slice_index"), "description": ref.get("description", ""),
                          "shape": shape,
                          "labels": labels})
        boxes, lines, overlays, evidence = [], [], [], {}
        for ev in self.acts:
            eid, vid = str(ev.get("id", "?")), str(_d(ev.get("args")).get("view") or "V1")
            if ev.get("status") == "ok":
                b, ln = _shapes(eid, ev.get("output"), None)
                boxes += [x | {"view": vid} for x in b]
                lines += [x | {"view": vid} for x in ln]
            for a in _list(ev.get("artifacts")):
                if isinstance(a, dict) and a.get("kind") in ("overlay", "preview") and a.get("media_type") == "image/png":
                    overlays.append({"eid": eid, "kind": a["kind"], "description": a.get("description", ""),
                                     "url": f"/api/runs/{self.run_id}/artifacts/{a['sha256']}.png"})
            out = json.dumps(ev.get("output"), indent=1, ensure_ascii=False, default=str)
            evidence[eid] = {"id": eid, "tool": ev.get("tool"), "status": ev.get("status"), "args": ev.get("args"),
                             "view": vid, "error": ev.get("error"), "duration_s": ev.get("duration_s"),
                             "summary": _brief(ev.get("error") if ev.get("status") != "ok" else ev.get("output"), 240),
                             "output": out if len(out) <= MAX_OUTPUT_CHARS else out[:MAX_OUTPUT_CHARS] + "\n...",
                             "views": [str(x) for x in _list(ev.get("new_views"))]}
        return {"run_id": self.run_id, "views": views, "masks": masks, "boxes": boxes, "lines": lines,
                "overlays": overlays, "evidence": evidence, "disclaimer": DISCLAIMER}


def render_slice(arr: np.ndarray, k: int, center: float | None, width: float | None, rgb: bool) -> bytes:
    """Slice k of a view (a 2D view: k = 0) as an 8-bit PNG through the window (center, width)."""
    from PIL import Image

    pic = np.asarray(arr[k] if arr.ndim >= 3 and not rgb else arr)
    while pic.ndim > (3 if rgb else 2):
        pic = pic[pic.shape[0] // 2]
    if rgb:
        img = _to_uint8(pic, True)
    elif center is None or width is None:
        img = _to_uint8(pic, False)
    else:
        lo = center - width / 2
        img = ((np.nan_to_num(pic.astype(np.float32)) - lo) * (255.0 / width)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# -- folders under the served roots ----------------------------------------------------------------------------------
def list_folder(text: str, roots: list[Path]) -> dict[str, Any]:
    """A folder under the served roots: its sub-folders and files (images marked), each with the `path` a run takes.
    With several roots and no path, the roots themselves. Links that leave the roots are not listed."""
    from agent.imaging.loaders import file_kind

    roots = [r.resolve() for r in roots]
    if not text and len(roots) > 1:
        return {"path": "", "parent": None, "entries": [{"name": str(r), "path": str(r), "kind": "folder"}
                                                        for r in roots], "truncated": False}
    real = under_roots(text or ".", roots)
    if not real.is_dir():
        raise Refused(400, "path is not a folder")
    home = next(r for r in roots if real == r or real.is_relative_to(r))

    def rel(p: Path) -> str:  # the `path` a run takes: relative to the first root ("" for the root itself)
        return "" if p == roots[0] else str(p.relative_to(roots[0])) if p.is_relative_to(roots[0]) else str(p)

    entries = []
    try:
        children = sorted(real.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower()))
    except OSError as exc:
        raise Refused(400, f"the folder cannot be read ({exc.strerror or type(exc).__name__})") from None
    for p in children:
        if p.name.startswith(".") or not _inside(p.resolve(), roots):
            continue
        if len(entries) >= MAX_LISTED:
            break
        if p.is_dir():
            entries.append({"name": p.name, "path": rel(p.resolve()), "kind": "folder"})
        elif p.is_file():
            try:
                kind = file_kind(p)
            except OSError:
                kind = None
            entries.append({"name": p.name, "path": rel(p.resolve()), "kind": kind or "other",
                            "bytes": p.stat().st_size})
    parent = None if real == home and len(roots) == 1 else ("" if real == home else rel(real.parent))
    return {"path": rel(real), "parent": parent, "entries": entries, "truncated": len(entries) >= MAX_LISTED}


# -- follow-ups --------------------------------------------------------------------------------------------------------
class Followups:
    """Follow-up turns in run threads, one at a time per thread, each on a thread of its own: the MCP server's Backend
    (agent/app/mcp_server.py) runs the turn with agent/app/chat.py's Chat (one per thread, resumed from the trace store
    and its checkpoints when it is not in memory). This keeps what the page needs to know about the latest turn."""

    def __init__(self, backend: Any, runs: Any):
        self.backend, self.runs = backend, runs
        self.lock = threading.Lock()
        self.turns: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def start(self, run_id: str, question: str) -> dict[str, Any]:
        status = self.runs.status(run_id)[0]
        if status is None:
            raise Refused(404, f"no run {run_id!r}")
        with self.lock:
            cur = self.turns.get(run_id)
            if cur is not None and cur["status"] == "running":
                raise Refused(409, f"run {run_id} is answering a follow-up: wait for it, or cancel it")
            if status not in ("done", "idle", "cancelled"):
                raise Refused(409, f"run {run_id} is {status}: a follow-up needs a finished run")
            turn = {"run_id": run_id, "question": question, "status": "running", "error": None,
                    "events_before": self.runs.count_events(run_id)}
            self.turns[run_id] = turn
            while len(self.turns) > 256:
                self.turns.popitem(last=False)
        threading.Thread(target=self._run, args=(turn,), name=f"dxagent-followup-{run_id}", daemon=True).start()
        return turn

    def _run(self, turn: dict[str, Any]) -> None:
        from mcp.server.mcpserver.exceptions import ToolError

        try:
            self.backend.followup(turn["run_id"], turn["question"])
            turn["status"] = "done"
        except ToolError as exc:
            cancelled = "was cancelled" in str(exc)
            turn["status"], turn["error"] = ("cancelled", None) if cancelled else ("failed", one_line(exc))
        except Exception as exc:  # the turn is failed, the thread and its evidence stay
            turn["status"], turn["error"] = "failed", one_line(f"{type(exc).__name__}: {exc}")

    def get(self, run_id: str) -> dict[str, Any]:
        if self.runs.status(run_id)[0] is None:
            raise Refused(404, f"no run {run_id!r}")
        return self.turns.get(run_id) or {"run_id": run_id, "status": "none", "question": None, "error": None}

    def cancel(self, run_id: str) -> dict[str, Any]:
        turn = self.get(run_id)
        chat = self.backend.chats.get(run_id)
        if turn["status"] != "running" or chat is None:
            raise Refused(409, f"run {run_id} has no follow-up under way" if turn["status"] != "running"
                          else f"the follow-up in run {run_id} is still opening its thread: try again")
        chat.cancel.set()  # the chat's cancel: before the next step (a model call is abandoned, a tool finishes)
        return {**turn, "status": "cancelling"}


# -- DICOM SR / SEG and FHIR ---------------------------------------------------------------------------------------------
def _state(trace_dir: Path, run_id: str) -> Any:
    """The run's (or thread's) latest CaseState from its LangGraph checkpoints."""
    from agent.core.state import CaseState
    from agent.engine.graph import sqlite_checkpointer

    saver = sqlite_checkpointer(trace_dir / "checkpoints.sqlite")
    try:
        tup = saver.get_tuple({"configurable": {"thread_id": run_id}})
    finally:
        saver.conn.close()
    if tup is None:
        raise Refused(409, f"run {run_id} has no checkpoint to build DICOM objects from")
    return CaseState.model_validate(tup.checkpoint["channel_values"])


def _finished(runs: Any, run_id: str) -> tuple[Any, Any]:
    """(trace row, record) of a run with a report; Refused 404 / 409 otherwise."""
    status, row, rec = runs.status(run_id)
    if status is None:
        raise Refused(404, f"no run {run_id!r}")
    if row is None or not row.report or status not in FINISHED + ("idle",):
        raise Refused(409, f"run {run_id} is {status}: it has no report" + ("" if status in FINISHED else " yet"))
    return row, rec


def _export(runs: Any, trace_dir: Path, run_id: str, row: Any, rec: Any, out_dir: Path | None, target: Any) -> Any:
    """dicom_out.export_run on the run's latest report and state, its inputs (a PACS study's from the retrieval cache,
    as the run read them): the objects written under out_dir and/or stored to target, recorded in the trace."""
    from types import SimpleNamespace

    from agent.app.dicom_out import ExportError, export_run
    from agent.imaging.dicomweb import DicomWebError, resolve
    from agent.store.artifacts import ArtifactStore

    inputs = list(rec.inputs) if rec is not None else []
    if not inputs:
        raise Refused(409, f"run {run_id}: its inputs are not kept (a run on a path drops them when it is done), so no "
                           "DICOM object can reference them; `dxagent run --dicom` writes them")
    try:
        files = resolve(inputs)
    except DicomWebError as exc:
        raise Refused(502, one_line(exc)) from None
    res = SimpleNamespace(report=json.loads(row.report), state=_state(trace_dir, run_id),
                          store=ArtifactStore(trace_dir / "artifacts"), inputs=files, run_id=run_id)
    try:
        return export_run(res, out_dir, target, runs.trace)
    except ExportError as exc:
        raise Refused(422, str(exc)) from None


def dicom_export(runs: Any, trace_dir: Path, run_id: str) -> dict[str, Any]:
    """The run's SR and SEG files (dicom_out.export_run, recorded in the trace as the CLI's --dicom does), built once
    per report under <trace dir>/serve/dicom/<run>/<report digest>/; the manifest says what was written and why not."""
    row, rec = _finished(runs, run_id)
    folder = trace_dir / "serve" / "dicom" / run_id / hashlib.sha256(row.report.encode()).hexdigest()[:16]
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return {**json.loads(manifest.read_text()), "_folder": folder}
    written = _export(runs, trace_dir, run_id, row, rec, folder, None)
    out = {"run_id": run_id, "objects": [{k: o.get(k) for k in ("kind", "evidence", "file", "sop_instance_uid",
                                                               "series_instance_uid", "segments", "groups")}
                                         | {"url": f"/api/runs/{run_id}/dicom/{o['file']}"} for o in written.objects],
           "skipped": written.skipped, "notes": written.notes, "disclaimer": DISCLAIMER}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(manifest, json.dumps(out))
    return {**out, "_folder": folder}


def push_to_source(runs: Any, trace_dir: Path, run_id: str) -> dict[str, Any]:
    """The run's SR and SEG stored back (STOW-RS) into the PACS its study came from (the CLI's --push source), recorded
    in the trace whether or not the PACS took them. Refused 409 for a run whose input was not a PACS study."""
    from agent.imaging.dicomweb import DicomWebError, is_reference, push_target

    row, rec = _finished(runs, run_id)
    inputs = list(rec.inputs) if rec is not None else []
    if not any(is_reference(p) for p in inputs):
        raise Refused(409, f"run {run_id} did not come from a PACS (dicomweb://): there is no source to store to")
    try:
        target = push_target("source", inputs)
    except DicomWebError as exc:
        raise Refused(400, one_line(exc)) from None
    written = _export(runs, trace_dir, run_id, row, rec, None, target)
    if written.push_error:
        raise Refused(502, one_line(written.push_error))
    return {"run_id": run_id, "pushed_to": written.pushed_to, "objects": [o["kind"] for o in written.objects],
            "skipped": written.skipped, "disclaimer": DISCLAIMER}


# -- the routes ------------------------------------------------------------------------------------------------------
def mount(app: FastAPI, runs: Any, roots: list[Path], backend: Any) -> None:
    """Add the page and its endpoints to `dxagent serve`'s app (agent/app/serve.py's create_app)."""
    trace_dir = Path(runs.settings.trace_dir)
    artifact_root = trace_dir / "artifacts"
    models: collections.OrderedDict[tuple[str, int], RunModel] = collections.OrderedDict()
    models_lock = threading.Lock()
    followups = Followups(backend, runs)
    dicom_lock = threading.Lock()  # one export at a time: a report's objects are built and recorded once

    def exported(run_id: str) -> dict[str, Any]:
        with dicom_lock:
            return dicom_export(runs, trace_dir, run_id)
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{ disclaimer }}", DISCLAIMER)

    def model(run_id: str) -> RunModel:
        if runs.status(run_id)[0] is None:
            raise Refused(404, f"no run {run_id!r}")
        key = (run_id, runs.count_events(run_id))
        with models_lock:
            if key in models:
                models.move_to_end(key)
                return models[key]
        try:
            m = RunModel(runs.trace.dump(run_id), artifact_root)
        except KeyError:
            raise Refused(409, f"run {run_id} has not started yet: nothing to show") from None
        with models_lock:
            models[key] = m
            while len(models) > 32:
                models.popitem(last=False)
        return m

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def reading_room() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.mount("/static/reading-room", StaticFiles(directory=STATIC), name="reading-room")

    @app.get("/api/files", summary="a folder under the served roots (for the page's case picker)")
    async def files(path: str = Query("", max_length=4096)) -> dict[str, Any]:
        return await run_in_threadpool(list_folder, path, roots)

    @app.get("/api/runs/{run_id}/viewer", summary="the run's views, masks with legends, boxes, overlays, evidence")
    async def viewer(run_id: str) -> dict[str, Any]:
        return await run_in_threadpool(lambda: model(run_id).public())

    @app.get("/api/runs/{run_id}/views/{view_id}/slices/{k}.png", summary="slice k of a view, windowed, as PNG")
    async def view_slice(run_id: str, view_id: str, k: int, center: float | None = Query(None, ge=-1e6, le=1e6),
                         width: float | None = Query(None, gt=0, le=1e7)) -> Response:
        def draw() -> bytes:
            m = model(run_id)
            v = m.view(view_id)
            n = _depth(v)
            if not 0 <= k < n:
                raise Refused(400, f"slice {k} is outside view {view_id}'s slices 0..{n - 1}")
            c, w = (center, width) if center is not None and width is not None else m.window(view_id)
            return render_slice(m.pixels(view_id), k, c, w, _rgb(v))

        return Response(await run_in_threadpool(draw), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/runs/{run_id}/masks/{name}/slices/{k}", summary="slice k of a label mask: raw uint8, row-major")
    async def mask_slice(run_id: str, name: str, k: int) -> Response:
        def read() -> tuple[bytes, tuple[int, ...]]:
            m = model(run_id)
            found = m.masks.get(name)
            if found is None:
                raise Refused(404, f"run {run_id} has no mask {name!r}")
            arr = np.load(m.file(found["ref"]), mmap_mode="r", allow_pickle=False)
            if arr.ndim == 3:
                if not 0 <= k < arr.shape[0]:
                    raise Refused(400, f"slice {k} is outside mask {name[:12]}'s slices 0..{arr.shape[0] - 1}")
                arr = arr[k]
            elif k != 0:
                raise Refused(400, f"mask {name[:12]} is 2D: its only slice is 0")
            arr = np.ascontiguousarray(arr, dtype=np.uint8)
            return arr.tobytes(), arr.shape

        data, shape = await run_in_threadpool(read)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Shape": ",".join(map(str, shape)), "Cache-Control": "private, max-age=3600"})

    @app.post("/api/runs/{run_id}/followups", status_code=202,
              summary="ask a follow-up in the run's thread (the chat engine: its evidence is kept)")
    async def followup(run_id: str, body: FollowupRequest) -> JSONResponse:
        if not body.question.strip():
            raise Refused(422, "question: give a question")
        turn = await run_in_threadpool(followups.start, run_id, body.question.strip())
        return JSONResponse(turn, status_code=202)

    @app.get("/api/runs/{run_id}/followups", summary="the run's latest follow-up asked on this server: its status")
    async def followup_status(run_id: str) -> dict[str, Any]:
        return await run_in_threadpool(followups.get, run_id)

    @app.post("/api/runs/{run_id}/followups/cancel", status_code=202, summary="stop the follow-up under way")
    async def followup_cancel(run_id: str) -> dict[str, Any]:
        return await run_in_threadpool(followups.cancel, run_id)

    @app.get("/api/runs/{run_id}/fhir", summary="the report as a FHIR R4B Bundle (DiagnosticReport + Observations)")
    async def fhir(run_id: str) -> Response:
        from agent.app.fhir import report_bundle
        from agent.imaging.dicomweb import is_reference, parse

        row, rec = await run_in_threadpool(_finished, runs, run_id)
        inputs = list(rec.inputs) if rec is not None else []
        refs = [parse(p) for p in inputs if is_reference(p)]
        study = refs[0].study if len(refs) == 1 and len(inputs) == 1 else None  # as `dxagent run --fhir`
        try:
            bundle = report_bundle(json.loads(row.report), row.finished_at or row.created_at, study)
        except ValueError as exc:
            raise Refused(422, one_line(exc)) from None
        return Response(json.dumps(bundle, indent=2), media_type="application/fhir+json")

    @app.get("/api/runs/{run_id}/dicom", summary="the run's DICOM SR and SEG: what was written, what was not and why")
    async def dicom(run_id: str) -> dict[str, Any]:
        found = await run_in_threadpool(exported, run_id)
        return {k: v for k, v in found.items() if k != "_folder"}

    @app.get("/api/runs/{run_id}/dicom/{file}", summary="one DICOM file of the run (report.sr.dcm, seg-*.dcm)")
    async def dicom_file(run_id: str, file: str) -> FileResponse:
        if not re.fullmatch(r"[A-Za-z0-9_.,-]+\.dcm", file):
            raise Refused(404, f"no DICOM file {file!r}")
        found = await run_in_threadpool(exported, run_id)
        row = next((o for o in found["objects"] if o.get("file") == file), None)
        if row is None:
            raise Refused(404, f"run {run_id} has no DICOM file {file!r}")
        path = found["_folder"] / file
        if not path.is_file():
            raise Refused(404, f"DICOM file {file!r} is missing")
        return FileResponse(path, media_type="application/dicom", filename=file)

    @app.post("/api/runs/{run_id}/push", summary="store the run's SR and SEG back into the PACS its study came from")
    async def push(run_id: str) -> dict[str, Any]:
        def go() -> dict[str, Any]:
            with dicom_lock:
                return push_to_source(runs, trace_dir, run_id)

        return await run_in_threadpool(go)

    @app.get("/api/runs/{run_id}/audit", response_class=HTMLResponse, summary="the run's audit page (self-contained)")
    async def audit(run_id: str) -> HTMLResponse:
        from agent.app.audit_html import render_html

        def build() -> str:
            try:
                return render_html(runs.trace.dump(run_id), artifact_root)
            except KeyError:
                raise Refused(404, f"no run {run_id!r} in the trace store") from None

        return HTMLResponse(await run_in_threadpool(build))
