"""Benchmark manifests for question-answering evals, and the question-only baselines (answer prior, majority).

A manifest is one of:
* a JSONL file (`.jsonl`/`.ndjson`), one object per line, the SLAKE layout: `case_id` (or `id`/`qid`), `image` (or
  `img_name`/`image_name`/`image_id`/`path`), `question`, `answer` (a number or a list is turned into text, a list
  joined with ", "), `answer_type` (OPEN|CLOSED, any case; when absent: CLOSED if the answer is yes/no, else OPEN),
  and optionally `content_type` (or `question_type`/`category`) and `modality`;
* a `.json` file holding a list of such objects (the VQA-RAD layout: `image_name, question, answer, answer_type,
  question_type, qid`);
* a VQA-Med style `.txt` file, one `image_id|question|answer` (or `image_id|category|question|answer`) per line; the
  image is `image_id` + .jpg/.jpeg/.png, looked up in the root (`--root`), the manifest's folder and their `images/`
  subfolders;
* a label manifest in the realcases layout (a JSONL whose rows have `findings`, a list of labels, and no `question`):
  label-presence questions are generated. A source's labels (the `source` key) are the union of the findings of its
  cases, less "no finding"-like labels ("No Finding", "normal", "no tumor", "none", "healthy", "No Pneumothorax",
  "non-COVID", ...); each case with findings gets one CLOSED question per label of its source, "Is there <label> in
  this image?", answered "yes" when the label is among its findings and "no" otherwise (item id
  `<case_id>__<label slug>`, content type "Abnormality"); a case with no findings gets none.

Blank lines are skipped. Relative image paths resolve against the manifest's folder, or `root`; a path that leaves the
root, a missing image file, a missing field or a malformed line makes that item invalid (its `error`), never a crash.
Item ids are made filesystem-safe ([A-Za-z0-9._-]); a repeated id gets "~N" (N: the item's position). Only a manifest
that is missing, unreadable, of another kind or without items raises ManifestError. Research use only.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.app.eval_metrics import normalize_answer
from agent.core.errors import ManifestError  # noqa: F401 - re-exported: the manifest readers raise it
from agent.core.files import ManifestCapError, read_manifest_text, row_too_long

ID_KEYS = ("case_id", "id", "qid")
IMAGE_KEYS = ("image", "img_name", "image_name", "image_id", "path")
CONTENT_KEYS = ("content_type", "question_type", "category")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NO_FINDING = {"no finding", "no findings", "normal", "no tumor", "no tumour", "none", "healthy", "negative",
               "no abnormality", "no abnormalities", "no disease", "no lesion", "benign lung tissue"}


@dataclass
class EvalItem:
    case_id: str  # unique item id, filesystem-safe
    paths: list[str]  # resolved absolute image path(s); empty when the item is invalid
    question: str
    answer: str  # the gold answer as text
    answer_type: str  # "OPEN" | "CLOSED"
    content_type: str = ""
    modality: str = ""
    image_id: str = ""  # the image as given in the manifest (for grouping)
    where: str = ""  # "line 3", "item 7"
    error: str | None = None  # why the item cannot run
    labels: list[str] = field(default_factory=list)  # always [] (batch helpers read .labels)


# -- reading ------------------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return str(value).strip()


def _first(row: dict[str, Any], keys: Iterable[str]) -> str:
    return next((_text(row[k]) for k in keys if _text(row.get(k))), "")


def _answer_type(value: Any, answer: str) -> str:
    t = _text(value).upper()
    if t in ("OPEN", "CLOSED"):
        return t
    return "CLOSED" if normalize_answer(answer) in ("yes", "no") else "OPEN"


def _row_item(row: dict[str, Any], where: str) -> EvalItem:
    given = next((row[k] for k in IMAGE_KEYS if _text(row.get(k))), None)
    paths = [_text(p) for p in given if _text(p)] if isinstance(given, list) else [_text(given)] if given else []
    image, question, answer = ";".join(paths), _text(row.get("question")), _text(row.get("answer"))
    item = EvalItem(_first(row, ID_KEYS), paths, question, answer,
                    _answer_type(row.get("answer_type"), answer), _first(row, CONTENT_KEYS), _text(row.get("modality")),
                    image, where)
    missing = [k for k, v in (("image", image), ("question", question), ("answer", answer)) if not v]
    if missing:
        item.error = f"{where}: no {' / '.join(missing)}"
    return item


def _is_no_finding(label: str) -> bool:
    key = " ".join(re.sub(r"[^\w\s]", " ", label.lower()).split())
    return key in _NO_FINDING or key.startswith(("no ", "non ", "not "))


def _label_key(label: str) -> str:
    return " ".join(label.casefold().split())


def _findings(value: Any) -> list[str]:
    if isinstance(value, list):
        return [_text(v) for v in value if _text(v)]
    return [v.strip() for v in re.split(r"[;|]", _text(value)) if v.strip()]


def _label_items(rows: list[tuple[str, dict[str, Any] | None, str | None]]) -> list[EvalItem]:
    """Label-presence questions from a realcases-style label manifest (see the module docstring)."""
    labels: dict[str, dict[str, str]] = {}  # source -> label key -> first spelling
    for _, row, _ in rows:
        if row is not None:
            source = labels.setdefault(_text(row.get("source")), {})
            for f in _findings(row.get("findings")):
                if not _is_no_finding(f):
                    source.setdefault(_label_key(f), f)
    items = []
    for where, row, error in rows:
        if row is None:
            items.append(EvalItem("", [], "", "", "CLOSED", where=where, error=error))
            continue
        found = {_label_key(f) for f in _findings(row.get("findings"))}
        if not found:
            continue
        cid, image = _first(row, ID_KEYS), _first(row, IMAGE_KEYS)
        for key, label in labels[_text(row.get("source"))].items():
            item = EvalItem(f"{cid}__{_UNSAFE.sub('_', key).strip('_')}" if cid else "", [image] if image else [],
                            f"Is there {label} in this image?", "yes" if key in found else "no", "CLOSED",
                            "Abnormality", _text(row.get("modality")), image, where)
            item.error = None if image else f"{where}: no image"
            items.append(item)
    return items


def _json_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """(where, object or None, error) per non-blank line of a JSONL file, or per element of a JSON list."""
    out: list[tuple[str, dict[str, Any] | None, str | None]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        if not isinstance(data, list):
            raise ManifestError(f"{path}: a .json manifest holds a list of question objects, not {type(data).__name__}")
        entries = [(f"item {n}", v) for n, v in enumerate(data, 1)]
    else:
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if too_long := row_too_long(line, f"line {n}"):
                out.append((f"line {n}", None, too_long))
                continue
            try:
                entries.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                out.append((f"line {n}", None, f"line {n}: not JSON ({exc.msg} at column {exc.colno})"))
    for where, v in entries:
        if isinstance(v, dict):
            out.append((where, v, None))
        else:
            out.append((where, None, f"{where}: a JSON object is needed, not {type(v).__name__}"))
    out.sort(key=lambda e: int(e[0].split()[1]))
    return out


def _find_image(image_id: str, folders: list[Path]) -> Path | None:
    for d in folders:
        for s in ("", *IMAGE_SUFFIXES):
            if (p := d / f"{image_id}{s}").is_file() and (s or p.suffix.lower() in IMAGE_SUFFIXES):
                return p
    return None


def _txt_items(text: str, folders: list[Path]) -> list[EvalItem]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("|")]
        if len(cells) not in (3, 4) or not all(cells):
            items.append(EvalItem("", [], "", "", "OPEN", where=f"line {n}",
                                  error=f"line {n}: image_id|question|answer (or image_id|category|question|answer) "
                                        f"is needed, not {len(cells)} field(s)"))
            continue
        image_id, question, answer = cells[0], cells[-2], cells[-1]
        item = EvalItem(image_id, [], question, answer, _answer_type(None, answer), cells[1] if len(cells) == 4 else "",
                        image_id=image_id, where=f"line {n}")
        if (found := _find_image(image_id, folders)) is None:
            item.error = f"line {n}: no image {image_id}.jpg/.png in {', '.join(str(d) for d in folders)}"
        else:
            item.paths = [str(found)]
        items.append(item)
    return items


def _check(root: Path, items: list[EvalItem]) -> list[EvalItem]:
    """Ids made safe and unique ("~N"); image paths resolved against the root; problems go into the item's error."""
    seen: set[str] = set()
    for i, it in enumerate(items, 1):
        stem = Path(it.image_id).stem if it.image_id else ""
        safe = _UNSAFE.sub("_", (it.case_id or stem).replace("/", "__")).strip("._") or f"item{i:05d}"
        if safe in seen:
            safe = f"{safe}~{i}"
        seen.add(safe)
        it.case_id = safe
        if it.error:
            it.paths = []
            continue
        resolved = []
        for p in it.paths:
            full = (root / p).resolve() if not Path(p).is_absolute() else Path(p).resolve()
            if not full.is_relative_to(root):
                it.error = f"{it.where}: {p} escapes the manifest's folder {root}"
                break
            if not full.is_file():
                it.error = f"{it.where}: {p}: no such file"
                break
            resolved.append(str(full))
        it.paths = [] if it.error else resolved
    return items


def read_eval_manifest(path: str | Path, root: str | Path | None = None) -> tuple[Path, list[EvalItem]]:
    """(root, items) from a benchmark manifest (formats: the module docstring). Raises ManifestError only when the
    manifest as a whole is unusable."""
    path = Path(path).expanduser()
    given_root = Path(root).expanduser().resolve() if root is not None else None
    if given_root is not None and not given_root.is_dir():
        raise ManifestError(f"{root}: the root folder does not exist")
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file (a .jsonl, .json or .txt)")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".txt"):
        raise ManifestError(f"{path}: an eval manifest is a .jsonl, .json or .txt file, not {path.suffix or 'this'}")
    try:
        text = read_manifest_text(path)
    except ManifestCapError as exc:
        raise ManifestError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest as UTF-8 text ({exc})") from None
    base = given_root or path.resolve().parent
    if suffix == ".txt":
        folders = list(dict.fromkeys(d for r in (given_root, path.resolve().parent) if r for d in (r, r / "images")))
        items = _txt_items(text, folders)
    else:
        rows = _json_rows(path, text)
        dicts = [r for _, r, _ in rows if r is not None]
        if dicts and not any("question" in r for r in dicts) and any("findings" in r for r in dicts):
            items = _label_items(rows)
        else:
            items = [_row_item(r, w) if r is not None else EvalItem("", [], "", "", "OPEN", where=w, error=e)
                     for w, r, e in rows]
    if not items:
        raise ManifestError(f"{path}: the manifest lists no items")
    return base, _check(base, items)


def sample_items(items: list[EvalItem], n: int | None, seed: int) -> list[EvalItem]:
    """`n` items drawn at random (random.Random(seed)), in file order; all of them when n is None or not smaller."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# -- question-only baselines --------------------------------------------------------------------------------------------
def question_key(question: str) -> str:
    """The question text normalised: lower case, punctuation removed, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", question.lower()).split())


class _Tally:
    """Answers counted by their normalised form; the most frequent wins, ties going to the first seen."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # insertion order = first occurrence
        self.spellings: dict[str, dict[str, int]] = {}
        self.total = 0

    def add(self, answer: str) -> None:
        key = normalize_answer(answer)
        self.counts[key] = self.counts.get(key, 0) + 1
        sp = self.spellings.setdefault(key, {})
        sp[answer] = sp.get(answer, 0) + 1
        self.total += 1

    def best(self) -> tuple[str, int]:
        """(the most frequent original spelling of the most frequent answer, that answer's count)."""
        key = max(self.counts, key=self.counts.__getitem__)  # max keeps the first of equals
        sp = self.spellings[key]
        return max(sp, key=sp.__getitem__), self.counts[key]


def _usable(reference: list[EvalItem], who: str) -> list[EvalItem]:
    ref = [it for it in reference if it.question and it.answer]
    if not ref:
        raise ValueError(f"{who}: the reference split has no question with an answer")
    return ref


class PriorBaseline:
    """SURE-VQA's question-only prior: the most frequent answer, fitted on a reference split (never the eval items).

    Levels, the first with data: the same normalised question text; the same (content type, answer type); the same
    answer type; every reference answer. Answers are compared normalised; the most frequent original spelling is
    returned; ties go to the answer seen first in the reference."""

    def __init__(self, reference: list[EvalItem]):
        self.by_question: dict[str, _Tally] = {}
        self.by_content: dict[tuple[str, str], _Tally] = {}
        self.by_type: dict[str, _Tally] = {}
        self.all = _Tally()
        for it in _usable(reference, "PriorBaseline"):
            self.by_question.setdefault(question_key(it.question), _Tally()).add(it.answer)
            if it.content_type:
                self.by_content.setdefault((it.content_type, it.answer_type), _Tally()).add(it.answer)
            self.by_type.setdefault(it.answer_type, _Tally()).add(it.answer)
            self.all.add(it.answer)

    def predict(self, item: EvalItem) -> tuple[str, str]:
        """(answer, basis): the basis names the level that matched and the answer's share there."""
        levels = [(self.by_question.get(question_key(item.question)), "the same question text"),
                  (self.by_content.get((item.content_type, item.answer_type)) if item.content_type else None,
                   f"content type {item.content_type} and answer type {item.answer_type}"),
                  (self.by_type.get(item.answer_type), f"answer type {item.answer_type}"),
                  (self.all, "all reference questions")]
        tally, basis = next((t, b) for t, b in levels if t is not None and t.total)
        answer, count = tally.best()
        return answer, f"question-only prior, {basis}: {count} of {tally.total} reference answers"


def predicted_study(paths: list[str]) -> tuple[str, str]:
    """(modality, body region) the intake study classifier predicts for an item's first image ("?" where it cannot
    say): the metadata a `prior+study` guess may use, since it is what the agent itself knows before any tool."""
    from agent.analysis.study import study_facts
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore

    with tempfile.TemporaryDirectory(prefix="dxagent-study-") as tmp:  # the pixels are not kept
        try:
            view = load_views(paths[:1], ArtifactStore(tmp))[0]
        except Exception:  # an unreadable reference image only loses its metadata
            return "?", "?"
    facts = study_facts(view)
    return view.modality or "?", facts.get("body_region") or "?"


class StudyPriorBaseline(PriorBaseline):
    """The question-only prior conditioned on the study classifier's predicted modality and body region (a
    question-plus-metadata guess, issue 31): levels (question text, modality, region), (question text, modality),
    then the plain prior's levels. Reference images go through the same classifier (`study_of`), so both sides use
    predicted metadata, never the manifests' labels."""

    def __init__(self, reference: list[EvalItem], study_of: Callable[[EvalItem], tuple[str, str]]):
        super().__init__(reference)
        self.study_of = study_of
        self.by_study: dict[tuple[str, str, str], _Tally] = {}
        self.by_modality: dict[tuple[str, str], _Tally] = {}
        for it in _usable(reference, "StudyPriorBaseline"):
            if not it.paths:
                continue
            mod, region = study_of(it)
            key = question_key(it.question)
            self.by_study.setdefault((key, mod, region), _Tally()).add(it.answer)
            self.by_modality.setdefault((key, mod), _Tally()).add(it.answer)

    def predict(self, item: EvalItem) -> tuple[str, str]:
        if item.paths:
            mod, region = self.study_of(item)
            key = question_key(item.question)
            for tally, basis in ((self.by_study.get((key, mod, region)), f"the same question on {mod} of the {region}"),
                                 (self.by_modality.get((key, mod)), f"the same question on {mod}")):
                if tally is not None and tally.total:
                    answer, count = tally.best()
                    return answer, (f"question + predicted study prior, {basis}: {count} of {tally.total} reference "
                                    "answers")
        return super().predict(item)


class MajorityBaseline:
    """The most frequent answer per answer type (OPEN/CLOSED) in the reference split (every answer when the type is
    absent from it); ties go to the answer seen first."""

    def __init__(self, reference: list[EvalItem]):
        self.by_type: dict[str, _Tally] = {}
        self.all = _Tally()
        for it in _usable(reference, "MajorityBaseline"):
            self.by_type.setdefault(it.answer_type, _Tally()).add(it.answer)
            self.all.add(it.answer)

    def predict(self, item: EvalItem) -> tuple[str, str]:
        tally = self.by_type.get(item.answer_type)
        basis = f"{item.answer_type} reference questions" if tally else "all reference questions"
        answer, count = (tally or self.all).best()
        return answer, f"majority answer of {basis}: {count} of {(tally or self.all).total}"
