"""Batches over the REST API of `dxagent serve` (agent/app/serve.py adds the endpoints). Research use only.

A batch is a manifest - the formats `dxagent batch` reads, parsed by agent/app/batch.py's `read_manifest` (a folder,
a CSV/TSV, a JSONL; or a DICOMweb QIDO-RS query: one case per study it finds) - whose rows become runs in the server's
one bounded queue (agent/app/serve_runs.py's `RunQueue`): no second queue and no second engine, so each row is the same
traced, sealed, replayable run as any other, listed under /api/runs and resumable on its own.

A `BatchRecord` (one JSON file under `<trace dir>/serve/batches/`, written atomically) keeps what the run records
cannot know: which runs make up the batch, in manifest order, and the rows that could not run (status `invalid`, with
their one-line reason). The runs' records are saved before the batch's and the runs queued only after it, so a server
killed at any moment loses no row: queued rows start on the next start, running ones are reported interrupted and can
be resumed (each, or all with POST /api/batches/{id}/resume).

What a batch says never names the patient nor an input: rows are named by their place in the manifest ("row 3",
"line 2", "case 5" for a file of a folder manifest, "study 1"), never by a file name or a case id (a case id may be a
record number); row errors have their paths replaced by "input N".
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.app.serve_runs import FINISHED, RunQueue, RunRecord, one_line
from agent.core.files import write_atomic

MAX_ROWS = 10_000  # rows of one batch (the DICOMweb query's own cap)


class BatchRow(BaseModel):
    n: int  # the row's place among the manifest's cases, from 1
    where: str  # "row 3" (CSV), "line 2" (JSONL), "case 5" (a folder's file or series), "study 1" (a query)
    run_id: str | None = None  # None: invalid, never queued
    status: str = "queued"  # invalid | queued | running | done | failed | cancelled | interrupted
    error: str | None = None
    labels: list[str] = []  # the manifest's reference labels (for the summary's agreement)


class BatchRecord(BaseModel):
    id: str
    created_at: str
    source: str  # upload | path | dicomweb (a query)
    question: str | None = None  # the default question (a row's own question comes first)
    rows: list[BatchRow] = []


def new_batch_id() -> str:
    import uuid

    return "batch-" + datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def safe_where(where: str, n: int) -> str:
    """A row's place in the manifest without a file or folder name (a folder manifest's `where` holds one)."""
    return f"case {n}" if where.startswith(("file ", "folder ")) else where


def row_error(error: str, where: str, safe: str, paths: list[str], case_id: str, root: Path) -> str:
    """A manifest row's reason (agent/app/batch.py's `_check`) without paths, file names or the case id."""
    from agent.engine.graph import redact_paths

    text = error.replace(f" the manifest's folder {root}", " the manifest's folder").replace(where, safe)
    text = redact_paths(text, paths).replace(str(root), "the manifest's folder")
    text = re.sub(r"case id .* is repeated$", "its case id repeats an earlier row's", text)  # never the id itself
    if case_id:
        text = text.replace(case_id, "(case id)")
    return one_line(text, 200)


class Batches:
    """The batches one server accepted, over its run queue."""

    def __init__(self, runs: RunQueue):
        self.runs = runs
        self.dir = Path(runs.settings.trace_dir) / "serve" / "batches"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._batches: dict[str, BatchRecord] = {}
        self._summaries: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}  # id -> (rows' ends, summary)
        for f in sorted(self.dir.glob("batch-*.json")):
            try:
                b = BatchRecord.model_validate_json(f.read_text())
            except ValueError:  # a damaged record is left where it is and not served
                continue
            self._batches[b.id] = b

    def _save(self, b: BatchRecord) -> None:
        write_atomic(self.dir / f"{b.id}.json", b.model_dump_json(indent=1))

    def get(self, batch_id: str) -> BatchRecord | None:
        return self._batches.get(batch_id)

    def all(self) -> list[BatchRecord]:
        return sorted(self._batches.values(), key=lambda b: b.created_at, reverse=True)

    def create(self, b: BatchRecord, runs: list[RunRecord]) -> BatchRecord:
        """Save the rows' run records, then the batch, then queue the runs (a kill between two steps loses nothing:
        saved run records are queued again on the next start)."""
        self.runs.add(runs)
        self._save(b)
        self._batches[b.id] = b
        self.runs.enqueue([r.id for r in runs])
        return b

    # -- what a batch is now ---------------------------------------------------------------------------------------
    def status_of(self, run_id: str) -> tuple[str, str | None]:
        """(status, one-line error) of a row's run: its record (the worker writes the final status, a restart reconciles
        it with the trace store), or the trace store for a run this server lost the record of."""
        rec = self.runs.record(run_id)
        if rec is not None and rec.status != "running":
            return rec.status, rec.error
        status, row, _ = self.runs.status(run_id)
        return status or "unknown", (row.error if row is not None and status != "done" else None)

    def rows(self, b: BatchRecord) -> list[BatchRow]:
        out = []
        for r in b.rows:
            if r.run_id:
                status, error = self.status_of(r.run_id)
                r = r.model_copy(update={"status": status, "error": error if status != "done" else None})
            out.append(r)
        return out

    @staticmethod
    def counts(rows: list[BatchRow]) -> dict[str, int]:
        c = Counter(r.status for r in rows)
        return {k: c.get(k, 0) for k in ("queued", "running", "done", "failed", "cancelled", "interrupted", "invalid")}

    @staticmethod
    def finished(rows: list[BatchRow]) -> bool:
        return all(r.status in FINISHED or r.status == "invalid" for r in rows)

    def summary(self, b: BatchRecord, rows: list[BatchRow]) -> dict[str, Any]:
        """A finished batch as `dxagent batch` sums one up: counts, outcomes, modalities, answer kinds, time per run
        and runs per minute, and agreement with the manifest's reference labels where it has them (computed again only
        when a row's status or end time changes: a finished batch changes only when a row is resumed)."""
        key = tuple((r.status, getattr(self.runs.record(r.run_id) if r.run_id else None, "finished_at", None))
                    for r in rows)
        cached = self._summaries.get(b.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        out = self._summary(b, rows)
        self._summaries[b.id] = (key, out)
        return out

    def _summary(self, b: BatchRecord, rows: list[BatchRow]) -> dict[str, Any]:
        import json

        from agent.app.batch import agreement
        from agent.app.executors import predicted_labels

        records, outcomes, modalities, kinds, secs, ends = [], Counter(), Counter(), Counter(), [], []
        for r in rows:
            rec = {"status": r.status, "labels": r.labels, "predicted": []}
            run = self.runs.record(r.run_id) if r.run_id else None
            if run is not None and run.started_at and run.finished_at:
                secs.append((datetime.fromisoformat(run.finished_at) - datetime.fromisoformat(run.started_at))
                            .total_seconds())
                ends.append(run.finished_at)
            row = self.runs.trace.get_run(r.run_id) if r.status == "done" else None
            if row is not None and row.report:
                report = json.loads(row.report)
                rec["predicted"] = predicted_labels(report)
                outcomes[(report.get("recommendation") or {}).get("outcome") or "?"] += 1
                modalities[(report.get("study") or {}).get("modality") or "?"] += 1
                kinds[(report.get("answer") or {}).get("kind") or "?"] += 1
            records.append(rec)
        wall = ((datetime.fromisoformat(max(ends)) - datetime.fromisoformat(b.created_at)).total_seconds()
                if ends else 0.0)
        ran = len(secs)
        return {"rows": len(rows), "counts": self.counts(rows), "outcomes": dict(outcomes),
                "modalities": dict(modalities), "answer_kinds": dict(kinds),
                "seconds_per_run": {"median": round(statistics.median(secs), 3), "mean": round(statistics.mean(secs), 3),
                                    "max": round(max(secs), 3)} if secs else None,
                "wall_s": round(wall, 3), "runs_per_min": round(ran / wall * 60, 2) if wall > 0 else None,
                "agreement": agreement(records)}

    # -- cancel and resume -----------------------------------------------------------------------------------------
    def cancel(self, b: BatchRecord) -> dict[str, int]:
        """Drop the queued rows and stop the running ones at their next step."""
        out = Counter()
        for r in self.rows(b):
            if r.run_id and r.status in ("queued", "running"):
                out[self.runs.cancel(r.run_id)] += 1
        return {"cancelled": out.get("cancelled", 0), "cancelling": out.get("cancelling", 0)}

    def resume(self, b: BatchRecord) -> int:
        """Queue every interrupted, cancelled or failed row to continue from its checkpoint; how many were queued.
        (A row cancelled before it started has no checkpoint: it is queued afresh.)"""
        n = 0
        for r in self.rows(b):
            if not r.run_id or r.status not in ("interrupted", "cancelled", "failed"):
                continue
            try:
                self.runs.resume(r.run_id)
            except ValueError:  # it never reached the trace store: start it from the beginning
                if not self.runs.requeue(r.run_id):
                    continue
            n += 1
        return n
