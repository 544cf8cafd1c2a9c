"""Model store and model cards: the learned experts users bring (MONAI bundles, SAM, YOLO, TorchXRayVision, CLIP).

A model card is a YAML file that says what a set of weights is, what it is for and how good it is::

    name: spleen_ct_unet            # identifier: letters, digits, _ . -
    kind: segment                   # segment | detect | classify | embed
    adapter: monai_bundle           # which adapter runs it (monai_bundle, sam, yolo, torchxrayvision, clip, ...)
    modalities: [CT]
    body_part: abdomen              # optional
    labels: [spleen]
    input: {size: [96, 96, 96], channels: 1, spacing: [1.5, 1.5, 2.0], intensity: "HU -57..164 -> 0..1"}
    weights: model.pt               # relative to the card file, or absolute
    sha256: 0123...                 # 64 hex digits, checked before every load (`dxagent models hash PATH` prints it)
    license: Apache-2.0
    intended_use: research segmentation of the spleen on portal-venous CT
    validation: {dataset: MSD Task09, dice: 0.96}   # free text or a dict of figures
    version: "0.5.0"

The store is a folder ($DXAGENT_MODELS, else <cache root>/models/cards; the planner's GGUF lives in
<cache root>/models itself) holding one sub-folder per model: `<name>/card.yaml` plus its copied weights, so each
card is self-contained. Cards dropped by hand as `<store>/*.yaml` are listed too. The store also lists the models
the project ships and trained itself (`tools/models/<name>/card.yaml`, weights in the repo; `bundled` in listings):
a user's card of the same name shadows a bundled one, and `add` never writes there; DXAGENT_BUNDLED_MODELS=0 leaves
them out. Weight hashes are cached by
(path, size, mtime) in `<store>/.sha256-cache.json`, so listing multi-GB weights stays fast.

Weights may be a folder (a MONAI bundle with configs/ and models/, a transformers model directory): its sha256 is
that of the text listing every file under it (hidden files and __pycache__ left out) as `<relative path>\t<file
sha256>\n`, sorted by path, so renaming, adding, removing or editing any file changes it.
Research use only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from agent.core.errors import UserError
from agent.core.files import write_atomic

CHUNK = 1 << 20  # sha256 is computed in 1 MiB chunks
CACHE_FILE = ".sha256-cache.json"
CARD_FILE = "card.yaml"
KINDS = ("segment", "detect", "classify", "embed")
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "tools" / "models"  # the project's own trained experts


class ModelStoreError(UserError, RuntimeError):
    """The store cannot do what was asked (unknown model, name clash, bad or missing weights); one line says why."""


class ModelCardError(ModelStoreError):
    """A card file is unreadable or invalid; the one-line message names the file and the field."""


class ModelCard(BaseModel):
    """What a set of weights is, what it is for and how good it is."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    kind: Literal["segment", "detect", "classify", "embed"]
    adapter: str = Field(min_length=1, description="adapter that runs it: monai_bundle, sam, yolo, torchxrayvision, clip")
    modalities: list[str] = Field(min_length=1, description="modality codes: CT, MR, DX, US, XC, OP, ES, SM, ...")
    body_part: str | None = None
    labels: list[str] = Field(default_factory=list)
    input: dict[str, Any] = Field(default_factory=dict, description="size, channels, spacing, intensity normalisation")
    weights: str = Field(min_length=1, description="weights file or folder (a MONAI bundle, a transformers model "
                         "directory), relative to the card file or absolute")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    license: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    validation: str | dict[str, Any] = ""
    version: str = ""

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("sha256")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) else v  # YAML reads `version: 1.0` as a float

    @field_validator("modalities", "labels")
    @classmethod
    def _nonblank(cls, v: list[str]) -> list[str]:
        v = [s.strip() for s in v]
        if any(not s for s in v):
            raise ValueError("entries must not be blank")
        return v

    @property
    def source(self) -> Path | None:
        """The card file this card was read from."""
        return self._source

    @property
    def weights_path(self) -> Path:
        p = Path(self.weights).expanduser()
        if not p.is_absolute() and self._source is not None:
            p = self._source.parent / p
        return p

    def validation_headline(self, width: int = 80) -> str:
        v = self.validation
        if isinstance(v, dict):
            text = ", ".join(f"{k} {_fmt(x)}" for k, x in list(v.items())[:3])
        else:
            text = " ".join(str(v).split())
        return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, dict | list):
        return json.dumps(x)[:30]
    return str(x)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_CARDS: dict[tuple[str, int, int], ModelCard] = {}  # (path, mtime_ns, size) -> the card read from it


def load_card(path: str | Path) -> ModelCard:
    """Read and validate one card file; any problem is a one-line ModelCardError naming the file and the field. A
    card file read before and unchanged since (same mtime and size) is not parsed again: routing asks for the cards
    of every learned tool several times per case (48 parses, 1.2 s of a cold run)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if (hit := _CARDS.get(key)) is not None:
            return hit.model_copy(deep=True)
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as exc:
        raise ModelCardError(f"{path}: cannot read card: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ModelCardError(f"{path}: not valid YAML{where}: {_one_line(getattr(exc, 'problem', None) or exc)}") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"{path}: a model card must be a YAML mapping of fields, got {type(data).__name__}")
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors()
        missing = [".".join(map(str, e["loc"])) for e in errs if e["type"] == "missing"]
        if missing:
            others = len(errs) - len(missing)
            more = f" (+{others} more)" if others else ""
            raise ModelCardError(f"{path}: {', '.join(missing)}: required field{'s' if len(missing) > 1 else ''} "
                                 f"missing{more}") from None
        e = errs[0]
        field = ".".join(str(x) for x in e["loc"]) or "card"
        msg = _one_line(e["msg"])
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif field == "sha256" and e["type"] == "string_pattern_mismatch":
            msg = "must be 64 hexadecimal digits"
        elif field == "name" and e["type"] == "string_pattern_mismatch":
            msg = "must be an identifier (letters, digits, _ . -)"
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ModelCardError(f"{path}: {field}: {msg}{more}") from None
    card._source = path.resolve()
    if len(_CARDS) >= 256:
        _CARDS.clear()
    _CARDS[key] = card.model_copy(deep=True)
    return card


def default_models_dir() -> Path:
    """$DXAGENT_MODELS, else <cache root>/models/cards (cache root: $DXAGENT_CACHE, $XDG_CACHE_HOME/dxagent or
    ~/.cache/dxagent). Not <cache root>/models itself: the planner's GGUF lives there."""
    env = os.environ.get("DXAGENT_MODELS")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("DXAGENT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "dxagent")
    return Path(root).expanduser() / "models" / "cards"


@dataclass
class CardEntry:
    """One card file in the store: a valid card, or a broken one with its one-line error."""

    path: Path
    card: ModelCard | None = None
    error: str | None = None
    bundled: bool = False  # shipped with dxagent (tools/models), not added by the user

    @property
    def name(self) -> str:
        if self.card is not None:
            return self.card.name
        return self.path.parent.name if self.path.name == CARD_FILE else self.path.stem

    @property
    def ok(self) -> bool:
        return self.card is not None


@dataclass
class Verification:
    name: str
    status: Literal["ok", "missing weights", "sha256 mismatch", "broken card"]
    path: Path | None = None  # the weights (or the card file, when broken)
    expected: str | None = None
    got: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def message(self) -> str:
        if self.status == "ok":
            return f"ok ({self.path})"
        if self.status == "missing weights":
            return f"weights not found: {self.path}"
        if self.status == "sha256 mismatch":
            return f"sha256 mismatch in {self.path}: expected {self.expected}, got {self.got}"
        return self.error or "broken card"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(root: Path) -> list[Path]:
    """Files under a weights folder that its sha256 covers: all but hidden ones and __pycache__."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if p.is_file() and not any(x.startswith(".") or x == "__pycache__" for x in rel):
            out.append(p)
    return out


def tree_digest(root: Path, file_digest: Any = None) -> str:
    """sha256 of a weights folder: of the sorted lines `<relative posix path>\t<file sha256>\n`."""
    file_digest = file_digest or _hash_file
    h = hashlib.sha256()
    for p in _tree_files(root):
        h.update(f"{p.relative_to(root).as_posix()}\t{file_digest(p)}\n".encode())
    return h.hexdigest()


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy src to dst and return the sha256 of the bytes copied (one pass over multi-GB weights)."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(CHUNK):
            h.update(chunk)
            fo.write(chunk)
    shutil.copystat(src, dst)
    return h.hexdigest()


class ModelStore:
    """A folder of model cards and their weights."""

    def __init__(self, dir: str | Path | None = None, bundled: bool | None = None):
        self.dir = Path(dir).expanduser() if dir else default_models_dir()
        if bundled is None:
            bundled = os.environ.get("DXAGENT_BUNDLED_MODELS", "1").strip() != "0"
        self.bundled_dir: Path | None = BUNDLED_DIR if bundled else None
        self._cache: dict[str, dict[str, Any]] | None = None

    # -- sha256 with a (path, size, mtime) cache -------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        return self.dir / CACHE_FILE

    def _load_cache(self) -> dict[str, dict[str, Any]]:
        if self._cache is None:
            try:
                data = json.loads(self.cache_path.read_text())
                self._cache = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._cache = {}
        return self._cache

    def _save_cache(self) -> None:
        if self._cache is None:
            return
        try:
            write_atomic(self.cache_path, json.dumps(self._cache, indent=0, sort_keys=True))
        except OSError:
            pass  # a read-only store still works, only slower

    def _remember(self, path: Path, digest: str) -> None:
        st = path.stat()
        self._load_cache()[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._save_cache()

    def sha256(self, path: str | Path, fresh: bool = False) -> str:
        """sha256 of a file (or a weights folder, see tree_digest), from the cache when a file's size and mtime are
        unchanged (fresh=True always rereads)."""
        path = Path(path)
        if path.is_dir():
            return tree_digest(path, lambda p: self.sha256(p, fresh=fresh))
        st = path.stat()
        key = str(path.resolve())
        hit = self._load_cache().get(key)
        if not fresh and hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        digest = _hash_file(path)
        self._remember(path, digest)
        return digest

    # -- cards ------------------------------------------------------------------------------------------------
    @staticmethod
    def _card_files(folder: Path | None, loose: bool = True) -> list[Path]:
        if folder is None or not folder.is_dir():
            return []
        files = [p for p in folder.glob(f"*/{CARD_FILE}") if not p.parent.name.startswith(".")]
        if loose:
            files += [p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()]
        return sorted(files)

    def list(self, bundled: bool = True) -> list[CardEntry]:
        """Every card in the store (the user's, then the bundled ones they do not shadow); a bad card is an entry with
        its one-line error, never an exception."""
        entries = []
        for p in self._card_files(self.dir):
            try:
                entries.append(CardEntry(p, card=load_card(p)))
            except ModelCardError as exc:
                entries.append(CardEntry(p, error=str(exc)))
        if bundled and self.bundled_dir is not None and self.bundled_dir.resolve() != self.dir.resolve():
            names = {e.name for e in entries}
            for p in self._card_files(self.bundled_dir, loose=False):
                try:
                    e = CardEntry(p, card=load_card(p), bundled=True)
                except ModelCardError as exc:
                    e = CardEntry(p, error=str(exc), bundled=True)
                if e.name not in names:
                    entries.append(e)
        return entries

    def cards(self) -> list[ModelCard]:
        return [e.card for e in self.list() if e.card is not None]

    def get(self, name: str) -> ModelCard:
        for e in self.list():
            if e.name == name:
                if e.card is None:
                    raise ModelCardError(e.error or f"model card {name!r} is broken")
                return e.card
        raise ModelStoreError(f"no model {name!r} in {self.dir}")

    def add(self, card_yaml_path: str | Path, copy_weights: bool = True, replace: bool = False) -> ModelCard:
        """Validate a card, verify its weights' sha256 and put card (+ weights) into the store as <name>/card.yaml.

        With copy_weights the weights are copied next to the card (self-contained); without, the stored card
        points to the weights' absolute path."""
        card = load_card(card_yaml_path)
        src = card.weights_path
        if not (src.is_file() or src.is_dir()):
            raise ModelCardError(f"{card_yaml_path}: weights: file or folder not found: {src}")
        clash = [e for e in self.list(bundled=False) if e.name == card.name]  # a bundled card is shadowed, never replaced
        dest = self.dir / card.name
        if (clash or dest.exists()) and not replace:
            where = clash[0].path if clash else dest
            raise ModelStoreError(f"a model named {card.name!r} is already in the store ({where}); use --replace")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".add-{card.name}-"))
        try:
            data = card.model_dump(mode="json")
            if copy_weights and src.is_dir():
                shutil.copytree(src, tmp / src.name, ignore=shutil.ignore_patterns("__pycache__"))
                got = tree_digest(tmp / src.name)
                data["weights"] = src.name
            elif copy_weights:
                got = _copy_hashed(src, tmp / src.name)
                data["weights"] = src.name
            else:
                got = self.sha256(src)
                data["weights"] = str(src.resolve())
            if got != card.sha256:
                raise ModelStoreError(f"{card_yaml_path}: sha256 mismatch in {src}: expected {card.sha256}, got {got}")
            (tmp / CARD_FILE).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
            for e in clash:  # replace: the old card (and its folder of weights) goes
                if e.path.name == CARD_FILE and e.path.parent.parent == self.dir:
                    shutil.rmtree(e.path.parent)
                else:
                    e.path.unlink()
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if copy_weights and src.is_file():
            self._remember(dest / src.name, got)
        stored = load_card(dest / CARD_FILE)
        return stored

    def verify_card(self, card: ModelCard, fresh: bool = False) -> Verification:
        p = card.weights_path
        if not (p.is_file() or p.is_dir()):
            return Verification(card.name, "missing weights", path=p)
        got = self.sha256(p, fresh=fresh)
        if got != card.sha256:
            return Verification(card.name, "sha256 mismatch", path=p, expected=card.sha256, got=got)
        return Verification(card.name, "ok", path=p, expected=card.sha256, got=got)

    def verify(self, name: str | None = None, fresh: bool = False) -> list[Verification]:
        """Check every card's weights (or one card's): ok, missing weights, sha256 mismatch, or broken card."""
        entries = self.list()
        if name is not None:
            entries = [e for e in entries if e.name == name]
            if not entries:
                raise ModelStoreError(f"no model {name!r} in {self.dir}")
        out = []
        for e in entries:
            if e.card is None:
                out.append(Verification(e.name, "broken card", path=e.path, error=e.error))
            else:
                out.append(self.verify_card(e.card, fresh=fresh))
        return out

    def load_weights_path(self, card: ModelCard | str) -> Path:
        """The verified weights path of a card (or a card name); a one-line ModelStoreError naming the card if the
        weights are missing or their sha256 differs. This is what adapters call before loading: it rehashes the file
        (the size/mtime cache is for listings; an adapter loads a file once per process)."""
        if isinstance(card, str):
            card = self.get(card)
        v = self.verify_card(card, fresh=True)
        if not v.ok:
            raise ModelStoreError(f"model card {card.name!r}: {v.message()}")
        return v.path

    def usable(self) -> list[ModelCard]:
        """Valid cards whose weights are present and match their sha256 (cached)."""
        return [c for c in self.cards() if self.verify_card(c).ok]


def load_weights_path(card: ModelCard | str, store: ModelStore | None = None) -> Path:
    return (store or ModelStore()).load_weights_path(card)


def planner_lines(cards: list[ModelCard], max_labels: int = 4) -> list[str]:
    """One short line per card for the planner prompt: name, kind, modalities, first labels, validation headline."""
    lines = []
    for c in cards:
        labels = ", ".join(c.labels[:max_labels]) + (f" +{len(c.labels) - max_labels}" if len(c.labels) > max_labels
                                                      else "")
        parts = [f"{c.name}: {c.kind}", "/".join(c.modalities) + (f" {c.body_part}" if c.body_part else "")]
        if labels:
            parts.append(f"labels {labels}")
        head = c.validation_headline(60)
        parts.append(f"validation {head}" if head else "no validation figures")
        lines.append(" · ".join(parts))
    return lines


__all__ = ["KINDS", "CardEntry", "ModelCard", "ModelCardError", "ModelStore", "ModelStoreError", "Verification",
           "default_models_dir", "load_card", "load_weights_path", "planner_lines", "tree_digest"]
