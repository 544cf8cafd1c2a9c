"""Batch case processing: a manifest of cases through the graph, in parallel worker processes, resumable.

    dxagent batch MANIFEST --out DIR [--workers N] [--question Q] [--llm local|tiny|openai|...]

MANIFEST is
* a folder: every image file under it is a case (case id = its path relative to the folder, without suffix), except
  that a folder holding only DICOM files (two or more) is one case, a series;
* a CSV with a header: `image` (or `images`/`path`/`paths`; several paths separated by `;`), and optionally
  `case_id`, `question`, `clinical_context` (or `context`), `modality`, `body_part`, `labels` (or `findings`:
  reference labels, separated by `;` or `|`);
* a JSONL file: one object per line with the same keys (`images` and `labels` may be lists).

Relative paths are relative to the manifest's folder, or to `--root DIR`; a path that leaves that root, a missing file, a
malformed row or line, or a repeated case id is reported for that case (status `invalid`), never a crash.

Output (DIR):
* `cases/<case_id>/report.json`, `report.md` and `result.json` (the case's record), each written to a temporary
  file and renamed, `result.json` last: a case is complete exactly when its `result.json` exists;
* `results.jsonl`: one line per case attempt, appended as each ends (re-synchronised from the cases' `result.json`
  on the next run, so a kill between the two loses nothing);
* `summary.csv`: the latest record of every case; `agreement.csv` when the manifest has reference labels;
* `traces/`: the trace store (SQLite, shared by the workers; or `--db-url`), checkpoints and artifacts.

Re-running the same command skips complete cases and retries failed ones. Each worker process loads the planner and
the tools once and gets its share of the CPU cores ($DXAGENT_THREADS). A case that raises is recorded as failed with
its one-line error and the batch goes on; a worker that dies is replaced and its case recorded as failed.
Research use only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.app.executors import CaseSpec, now, prepare_stores, run_local
from agent.core.errors import ManifestError  # noqa: F401 - re-exported: the manifest readers raise it
from agent.core.files import ManifestCapError, read_manifest_text, row_too_long, write_atomic
from agent.imaging.dicomweb import DicomWebError, is_query, is_reference, query, study_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz", ".mha",
                  ".mhd", ".nrrd")
PATH_KEYS = ("image", "images", "path", "paths")
SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


# -- manifests ------------------------------------------------------------------------------------------------------
def _is_dicom(p: Path) -> bool:
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES) or (not p.suffix and _is_dicom(p))


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in re.split(r"[;|]", str(value)) if v.strip()]


def _strip_suffix(rel: str) -> str:
    low = rel.lower()
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return rel[: -len(s)]
    return rel


def folder_cases(root: Path) -> list[CaseSpec]:
    specs: list[CaseSpec] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        d = Path(dirpath)
        files = sorted(d / f for f in filenames if not f.startswith("."))
        images = [f for f in files if _is_image(f)]
        if len(images) >= 2 and not dirnames and all(_is_dicom(f) for f in images) and d != root:
            rel = d.relative_to(root).as_posix()
            specs.append(CaseSpec(rel, [str(d)], where=f"folder {rel}"))
            continue
        for f in images:
            rel = f.relative_to(root).as_posix()
            specs.append(CaseSpec(_strip_suffix(rel), [str(f)], where=f"file {rel}"))
    return specs


def _row_spec(row: dict[str, Any], where: str) -> CaseSpec:
    paths = next((_split(row[k]) for k in PATH_KEYS if row.get(k) not in (None, "", [])), [])
    cid = str(row.get("case_id") or "").strip()
    labels = _split(next((row[k] for k in ("labels", "label", "findings") if row.get(k) not in (None, "", [])), None))
    spec = CaseSpec(cid, paths, question=(str(row["question"]).strip() or None) if row.get("question") else None,
                    clinical_context=str(row.get("clinical_context") or row.get("context") or "").strip(),
                    modality=(str(row["modality"]).strip().upper() or None) if row.get("modality") else None,
                    body_part=(str(row["body_part"]).strip() or None) if row.get("body_part") else None,
                    labels=labels, where=where)
    if not paths:
        spec.error = f"{where}: no image path (give one of the columns {', '.join(PATH_KEYS)})"
    return spec


def read_manifest(path: str | Path, root: str | Path | None = None) -> tuple[Path, list[CaseSpec]]:
    """(root, cases). Relative paths resolve against `root` (default: the manifest's folder) and no path may leave
    it. Raises ManifestError only when the manifest as a whole is unusable."""
    given_root = Path(root).expanduser().resolve() if root is not None else None
    if given_root is not None and not given_root.is_dir():
        raise ManifestError(f"{root}: the root folder does not exist")
    if is_query(str(path)):  # a QIDO-RS query: one case per study it finds
        try:
            refs = query(str(path))
        except DicomWebError as exc:
            raise ManifestError(str(exc)) from exc  # the cause tells `serve` the PACS failed (502), not the manifest
        if not refs:
            raise ManifestError(f"{path}: the query finds no study")
        return given_root or Path.cwd(), _check(given_root or Path.cwd(), [
            CaseSpec(study_key(r), [r], where=f"study {i}") for i, r in enumerate(refs, 1)])
    path = Path(path).expanduser()
    if path.is_dir():
        root = path.resolve()
        specs = folder_cases(root)
        if not specs:
            raise ManifestError(f"{path}: no image files in this folder")
    elif not path.is_file():
        raise ManifestError(f"{path}: no such manifest (a folder, a .csv or a .jsonl)")
    else:
        root = path.resolve().parent
        try:
            text = read_manifest_text(path)
        except ManifestCapError as exc:
            raise ManifestError(str(exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read the manifest as UTF-8 text ({exc})") from None
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            specs = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                if too_long := row_too_long(line, f"line {n}"):
                    specs.append(CaseSpec("", where=f"line {n}", error=too_long))
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    specs.append(CaseSpec("", where=f"line {n}", error=f"line {n}: not JSON ({exc.msg} at column {exc.colno})"))
                    continue
                if not isinstance(row, dict):
                    specs.append(CaseSpec("", where=f"line {n}",
                                          error=f"line {n}: a JSON object is needed, not {type(row).__name__}"))
                    continue
                specs.append(_row_spec(row, f"line {n}"))
        elif path.suffix.lower() in (".csv", ".tsv"):
            try:
                reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                header = [h.strip().lower() for h in (reader.fieldnames or [])]
            except csv.Error as exc:
                raise ManifestError(f"{path}: not a readable CSV ({exc})") from None
            if not any(k in header for k in PATH_KEYS):
                raise ManifestError(f"{path}: the header needs an image column ({' / '.join(PATH_KEYS)}); it has "
                                    f"{', '.join(header) or 'no columns'}")
            reader.fieldnames = header
            specs = []
            try:
                for n, row in enumerate(reader, 2):
                    if None in row:  # more cells than header fields
                        specs.append(CaseSpec("", where=f"row {n}", error=f"row {n}: {len(row[None])} cell(s) more "
                                              "than the header has"))
                        continue
                    specs.append(_row_spec(row, f"row {n}"))
            except csv.Error as exc:
                raise ManifestError(f"{path}: CSV error ({exc})") from None
        else:
            raise ManifestError(f"{path}: a manifest is a folder, a .csv or a .jsonl file, not {path.suffix or 'this'}")
        if not specs:
            raise ManifestError(f"{path}: the manifest lists no cases")
    root = given_root or root
    return root, _check(root, specs)


def _check(root: Path, specs: list[CaseSpec]) -> list[CaseSpec]:
    """Resolve paths against the root; ids made safe and unique; what is wrong goes into the spec's error."""
    seen: set[str] = set()
    for i, s in enumerate(specs, 1):
        if not s.case_id:
            stem = _strip_suffix(Path(s.paths[0]).name) if s.paths else ""
            s.case_id = stem or f"case{i:05d}"
        safe = SAFE_ID.sub("_", s.case_id.replace("/", "__")).strip("._") or f"case{i:05d}"
        if safe != s.case_id:  # "a/b" and "a__b" must not meet in one folder: an altered id keeps a trace of itself
            safe = f"{safe}-{hashlib.sha1(s.case_id.encode()).hexdigest()[:6]}"
        if safe in seen:
            s.error = s.error or f"{s.where}: case id {s.case_id!r} is repeated"
            safe = f"{safe}~{i}"
        seen.add(safe)
        s.case_id = safe
        if s.error:
            continue
        resolved = []
        for p in s.paths:
            if is_reference(p):  # a DICOMweb study: retrieved by the worker (a failure is that case's record)
                resolved.append(p)
                continue
            try:
                full = (root / p).resolve() if not Path(p).is_absolute() else Path(p).resolve()
                full.exists()
            except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a name too long, a symlink loop
                s.error = f"{s.where}: {ascii(p)[:80]} is not a usable path ({type(exc).__name__})"
                break
            if not full.is_relative_to(root):
                s.error = f"{s.where}: {p} escapes the manifest's folder {root}"
                break
            if not full.exists():
                s.error = f"{s.where}: {p}: no such file"
                break
            resolved.append(str(full))
        else:
            s.paths = resolved
    return specs


# -- the batch ------------------------------------------------------------------------------------------------------
def _records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: its case's result.json is the record
        if isinstance(rec, dict) and "case_id" in rec:
            yield rec


def _append(path: Path, rec: dict[str, Any]) -> None:
    line = (json.dumps(rec) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write with O_APPEND: lines from one process never interleave
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_results(out: Path) -> dict[str, dict[str, Any]]:
    """The latest record of each case: results.jsonl, completed by any case's result.json it lacks (a kill between
    writing result.json and appending the line)."""
    results = out / "results.jsonl"
    latest: dict[str, dict[str, Any]] = {}
    for rec in _records(results):
        latest[rec["case_id"]] = rec
    for rj in sorted((out / "cases").glob("*/result.json")):
        try:
            rec = json.loads(rj.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        have = latest.get(rec.get("case_id"))
        if have is None or str(have.get("finished_at", "")) < str(rec.get("finished_at", "")):
            _append(results, rec)
            latest[rec["case_id"]] = rec
    return latest


@dataclass
class BatchSummary:
    out: Path
    total: int
    skipped: int
    ran: int
    counts: Counter
    by_modality: Counter
    seconds: list[float]
    wall_s: float
    agreement: list[dict[str, Any]]
    by_node: Counter  # cases this run ran, by the node that ran them (its Ray node id, else its host name)


def agreement(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reference label over completed cases with reference labels: TP/FP/FN/TN, sensitivity, specificity,
    agreement and Cohen's kappa of the report's present-or-p>=0.5 findings against the reference."""
    from agent.engine.critic import label_key

    cases = [r for r in records if r.get("status") == "done" and r.get("labels")]
    if not cases:
        return []
    refs = [{label_key(x) for x in r["labels"]} for r in cases]
    preds = [set(r.get("predicted") or []) for r in cases]
    rows = []
    for label in sorted(set().union(*refs)):
        tp = sum(label in r and label in p for r, p in zip(refs, preds, strict=True))
        fn = sum(label in r and label not in p for r, p in zip(refs, preds, strict=True))
        fp = sum(label not in r and label in p for r, p in zip(refs, preds, strict=True))
        tn = len(cases) - tp - fn - fp
        n = len(cases)
        po = (tp + tn) / n
        pe = ((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)) / (n * n)
        rows.append({"label": label, "cases": n, "reference_positive": tp + fn, "predicted_positive": tp + fp,
                     "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                     "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
                     "specificity": round(tn / (tn + fp), 4) if tn + fp else None,
                     "agreement": round(po, 4), "kappa": round((po - pe) / (1 - pe), 4) if pe < 1 else None})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (";".join(v) if isinstance(v, list) else v) for k, v in r.items()})
    write_atomic(path, buf.getvalue())


SUMMARY_COLUMNS = ["case_id", "status", "modality", "outcome", "answer_kind", "abstain_reason", "answer", "findings",
                   "labels", "predicted", "seconds", "run_id", "error", "where", "node", "ray_node", "replaced_runs",
                   "finished_at"]


def run_batch(manifest: str | Path, out: str | Path, *, root: str | Path | None = None, workers: int = 1,
              executor: str = "local", ray_address: str | None = None,
              question: str | None = None, llm: str = "local", base_url: str | None = None, model: str | None = None,
              api_key: str | None = None, db_url: str | None = None, max_steps: int = 6, max_wall_s: float = 300.0,
              modality: str | None = None, limit: int | None = None, script: list[Any] | None = None,
              on_case: Callable[[dict[str, Any]], None] | None = None,
              on_start: Callable[[int, int], None] | None = None, dicom: bool = False,
              push: str | None = None) -> BatchSummary:
    from agent.llm.backends import public_url  # batch.json keeps the endpoint without its credentials

    root, specs = read_manifest(manifest, root)
    if limit is not None:
        specs = specs[:limit]
    out = Path(out).expanduser().resolve()
    (out / "cases").mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    latest = sync_results(out)
    opts = {"out": str(out), "question": question, "llm": llm, "base_url": base_url, "model": model,
            "api_key": api_key, "db_url": db_url, "max_steps": max_steps, "max_wall_s": max_wall_s,
            "modality": modality, "script": script, "dicom": dicom, "push": push}
    where = str(manifest) if is_query(str(manifest)) else str(Path(manifest).resolve())  # a query: as given
    write_atomic(out / "batch.json", json.dumps({"manifest": where, "root": str(root),
                                                  "cases": len(specs), "options": {
                                                      **{k: v for k, v in opts.items() if k not in ("api_key", "script")},
                                                      "base_url": public_url(base_url) if base_url else None},
                                                  "started": now()}, indent=2))
    done = {cid for cid, r in latest.items() if r.get("status") == "done" and (out / "cases" / cid / "result.json").exists()}
    todo = [s for s in specs if s.case_id not in done]
    skipped = len(specs) - len(todo)
    t0 = time.perf_counter()
    if on_start:
        on_start(len(specs), skipped)

    def finish(rec: dict[str, Any]) -> None:
        _append(results, rec)
        latest[rec["case_id"]] = rec
        if on_case:
            on_case(rec)

    prepare_stores(out, db_url)
    runnable = []
    for s in todo:
        if s.error:
            finish({"case_id": s.case_id, "status": "invalid", "error": s.error, "where": s.where, "labels": s.labels,
                    "seconds": 0.0, "finished_at": now()})
        else:
            runnable.append(s)
    if runnable:
        if executor == "ray":
            from agent.app.batch_ray import run_on_ray

            run_on_ray(runnable, opts, workers, finish, address=ray_address)
        elif executor == "local":
            run_local(runnable, opts, workers, finish)
        else:
            raise ManifestError(f"unknown executor {executor!r}: local or ray")
    wall = time.perf_counter() - t0

    spec_ids = [s.case_id for s in specs]
    final = [latest[c] for c in spec_ids if c in latest]
    _write_csv(out / "summary.csv", final, SUMMARY_COLUMNS)
    agree = agreement(final)
    if agree:
        _write_csv(out / "agreement.csv", agree, list(agree[0]))
    ran = [r for r in final if r.get("status") in ("done", "failed") and r["case_id"] not in done]
    return BatchSummary(out=out, total=len(specs), skipped=skipped, ran=len(ran),
                        counts=Counter(r.get("status") for r in final),
                        by_modality=Counter(r.get("modality") or "?" for r in final if r.get("status") == "done"),
                        seconds=[float(r.get("seconds") or 0) for r in ran], wall_s=wall, agreement=agree,
                        by_node=Counter(r.get("ray_node") or r.get("node") or "?" for r in ran))


def timing_line(summary: BatchSummary) -> str:
    secs = summary.seconds
    if not secs:
        return "no case ran"
    rate = len(secs) / summary.wall_s * 60 if summary.wall_s > 0 else float("nan")
    return (f"{len(secs)} case(s) in {summary.wall_s:.1f} s: {rate:.1f} cases/min; per case median "
            f"{statistics.median(secs):.1f} s, mean {statistics.mean(secs):.1f} s, max {max(secs):.1f} s")
