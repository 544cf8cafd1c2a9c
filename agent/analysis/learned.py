"""What every tool that runs a user's model card shares (agent/store/models.py holds the cards and the store).

A learned tool is a `LearnedTool` subclass in one file: it names the card `adapter` it runs and the card `kind`s,
and implements `build(card, path)` (weights path → loaded model) and `run`. This module gives it:

- which usable cards (weights present, sha256 right) fit a view: adapter, kind, modality (DX and CR are one family;
  `any` fits all) and the tool's own `card_fits` check (2D/3D, ...);
- `applicable`: the tool is offered only while a fitting card exists, else the reason (what to add, where);
- `load(card)`: lazy, once per process per (adapter, weights, sha256, card input), thread-safe (one lock per model,
  so two models load in parallel but one model never twice), with a fresh sha256 check before the first load (later
  calls trust the (size, mtime) hash cache, and a changed file is rehashed and refused); any failure
  is a one-line ToolError naming the card, so the case goes on and the evidence says why;
- `ModelUsed`: the card's identity, licence, intended use and validation, carried in every output, so the trace
  records exactly which weights produced the evidence and the report lists them;
- `boxes_from_evidence`: boxes another tool found ([row0, col0, row1, col1] under any `bbox` key of its output),
  so a detector's boxes can prompt a segmenter in the next act step without the planner copying numbers.

CUDA when torch sees one, else CPU. Nothing is downloaded: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before any
adapter imports a hub library.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from agent.core.state import ImageView
from agent.core.tool import Tool, ToolContext, ToolError, ToolInput
from agent.store.models import BUNDLED_DIR, ModelCard, ModelStore, ModelStoreError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_RADIOGRAPH = {"DX", "CR"}
_LOCKS_GUARD = threading.Lock()
_LOCKS: dict[tuple[str, str, str, str], threading.Lock] = {}
_LOADED: dict[tuple[str, str, str, str], Any] = {}  # (adapter, weights, sha256, card input) -> model


class ModelUsed(BaseModel):
    """Which card produced a piece of evidence: recorded in the trace with the output, listed in the report."""

    name: str
    adapter: str
    kind: str
    version: str = ""
    sha256: str
    license: str
    intended_use: str
    validation: str = ""
    card: str = ""  # the card file; for dxagent's own models relative to the project (no install path in traces)
    bundled: bool = False  # one of dxagent's own trained experts (tools/models), not a user's card


def model_used(card: ModelCard) -> ModelUsed:
    src = Path(card.source) if card.source else None
    bundled = src is not None and src.resolve().is_relative_to(BUNDLED_DIR)
    where = f"tools/models/{src.resolve().relative_to(BUNDLED_DIR)}" if bundled and src else str(src or "")
    return ModelUsed(name=card.name, adapter=card.adapter, kind=card.kind, version=card.version, sha256=card.sha256,
                     license=card.license, intended_use=card.intended_use, validation=card.validation_headline(120),
                     card=where, bundled=bundled)


def modality_fits(card: ModelCard, modality: str) -> bool:
    codes = {m.upper() for m in card.modalities}
    return "ANY" in codes or modality.upper() in codes or (modality.upper() in _RADIOGRAPH and bool(codes & _RADIOGRAPH))


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Those of the importable module names that are not installed."""
    return [m for m in names if importlib.util.find_spec(m) is None]


class LearnedInput(ToolInput):
    model: str | None = Field(None, description="model card name (default: the first usable card that fits the image)")


class LearnedTool(Tool):
    """A tool that runs the model cards of one adapter."""

    adapter: ClassVar[str]  # the cards' `adapter` value this tool runs
    card_kinds: ClassVar[frozenset[str]]  # the cards' `kind`s it runs
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules it needs (e.g. "ultralytics")
    Input: ClassVar[type[ToolInput]] = LearnedInput

    # -- cards ------------------------------------------------------------------------------------------------
    def store(self) -> ModelStore:
        return ModelStore()  # $DXAGENT_MODELS is read at call time

    def card_fits(self, card: ModelCard, view: ImageView) -> str | None:
        """None if this card can run on the view, else why not (override for 2D/3D or channel checks)."""
        return None

    def cards(self, view: ImageView | None = None, store: ModelStore | None = None) -> list[ModelCard]:
        """Usable cards of this adapter (and, with a view, those that fit it)."""
        found = [c for c in (store or self.store()).usable() if c.adapter == self.adapter and c.kind in self.card_kinds]
        if view is not None:
            found = [c for c in found if modality_fits(c, view.modality) and self.card_fits(c, view) is None]
        return found

    def missing_modules(self) -> list[str]:
        return missing_modules(self.requires)

    def applicable(self, view: ImageView) -> str | None:
        if (reason := super().applicable(view)) is not None:
            return reason
        if missing := self.missing_modules():
            return f"{self.name} needs the Python package(s) {', '.join(missing)}, which are not installed"
        store = self.store()
        if self.cards(view, store):
            return None
        kinds = "/".join(sorted(self.card_kinds))
        reason = (f"no {self.adapter} model card for {view.modality} ({kinds}) in the model store: add one with "
                  f"`dxagent models add CARD.yaml` (adapter: {self.adapter})")
        why = []  # cards of this adapter and modality that exist but do not fit: say why
        for c in store.cards():
            if c.adapter != self.adapter or c.kind not in self.card_kinds or not modality_fits(c, view.modality):
                continue
            v = store.verify_card(c)
            if not v.ok:
                why.append(f"{c.name}: {v.status}" + (" (the weights changed since the card was written)"
                                                      if v.status == "sha256 mismatch" else ""))
            elif (w := self.card_fits(c, view)) is not None:
                why.append(f"{c.name}: {w}")
        return reason + (f" ({'; '.join(why[:3])})" if why else "")

    def pick(self, view: ImageView, name: str | None) -> ModelCard:
        """The card to run: the one named, else the first that fits; ToolError saying why none does."""
        store = self.store()
        if name is not None:
            named = [c for c in self.cards(None, store) if c.name == name]
            if not named:
                theirs = [c for c in store.cards() if c.name == name and c.adapter == self.adapter]
                if theirs:  # the card exists but does not verify: say why
                    raise ToolError(f"model card {name!r}: {store.verify_card(theirs[0]).message()}")
                raise ToolError(f"no usable {self.adapter} model card named {name!r} in {store.dir}")
            card = named[0]
            if not modality_fits(card, view.modality):
                raise ToolError(f"model card {name!r} is for {'/'.join(card.modalities)}, not {view.modality}")
            if (why := self.card_fits(card, view)) is not None:
                raise ToolError(f"model card {name!r}: {why}")
            return card
        fits = self.cards(view, store)
        if not fits:
            raise ToolError(self.applicable(view) or f"no {self.adapter} model card fits {view.id}")
        return fits[0]

    def addresses(self, view: ImageView) -> frozenset[str]:
        """The class's subjects plus the labels of every card that fits this view (a classifier of 'effusion')."""
        from agent.core.vocab import label_key

        return frozenset(self.subjects) | {label_key(lab) for c in self.cards(view) for lab in c.labels}

    def prompt_lines(self, view: ImageView) -> list[str]:
        from agent.store.models import planner_lines

        return [f"{line} (tool {self.name})" for line in planner_lines(self.cards(view))]

    # -- loading ----------------------------------------------------------------------------------------------
    def build(self, card: ModelCard, path: Path) -> Any:
        """Load the card's weights at `path` (already sha256-verified) into a ready model; raise on any problem."""
        raise NotImplementedError

    def load(self, card: ModelCard) -> Any:
        """The card's model, built once per process; ToolError naming the card when it cannot be."""
        return load_model(self.adapter, card, self.build, self.missing_modules, self.store())


def load_model(adapter: str, card: ModelCard, build: Any, missing_modules: Any = list,
               store: ModelStore | None = None) -> Any:
    """`build(card, path)` run once per process per (adapter, weights, sha256, input) on sha256-verified weights;
    ToolError naming the card when it cannot be (a learned tool's `load`, and the case index's CLIP encoder)."""
    store = store or ModelStore()
    key = (adapter, str(card.weights_path), card.sha256, json.dumps(card.input, sort_keys=True, default=str))
    if key in _LOADED and store.verify_card(card).ok:  # loaded from verified bytes; the file is unchanged
        return _LOADED[key]  # (size/mtime cache: a multi-GB folder is not rehashed on every call)
    try:
        path = store.load_weights_path(card)  # the first load (or a changed file) rehashes in full
    except ModelStoreError as exc:
        _LOADED.pop(key, None)
        raise ToolError(str(exc)) from None
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key in _LOADED:
            return _LOADED[key]  # another thread loaded it meanwhile
        if missing := missing_modules():
            raise ToolError(f"model card {card.name!r} needs the Python package(s) {', '.join(missing)}")
        try:
            model = build(card, path)
        except ToolError as exc:
            raise ToolError(f"model card {card.name!r}: {exc}") from None
        except Exception as exc:  # wrong architecture, corrupt file, missing config: the card is named
            raise ToolError(f"model card {card.name!r}: cannot load {path.name}: {type(exc).__name__}: "
                            f"{one_line(exc)}") from None
        _LOADED[key] = model
        return model


def loaded_models() -> list[tuple[str, str, str]]:
    """(adapter, weights path, sha256) of every model loaded in this process."""
    return sorted({k[:3] for k in _LOADED})


def boxes_from_evidence(ctx: ToolContext, evidence_id: str, view_id: str, limit: int = 8) -> list[dict[str, Any]]:
    """Boxes an earlier successful tool call found on `view_id`, best first: each {"bbox": [r0, c0, r1, c1],
    "score": float | None, "label": str}. A ToolError says why there are none."""
    e = ctx.state.evidence_by_id(evidence_id)
    if e is None:
        raise ToolError(f"no evidence {evidence_id!r}; evidence ids are {[x.id for x in ctx.state.evidence]}")
    if e.status != "ok" or e.output is None:
        raise ToolError(f"{evidence_id} ({e.tool}) did not succeed, so it holds no boxes")
    if e.args.get("view", "V1") != view_id:
        raise ToolError(f"{evidence_id}'s boxes are on {e.args.get('view', 'V1')}, not {view_id}")
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            box = node.get("bbox")
            if isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box):
                score = next((node[k] for k in ("confidence", "score", "probability") if isinstance(node.get(k), int | float)),
                             None)
                label = next((str(node[k]) for k in ("label", "name", "class_name") if isinstance(node.get(k), str)), "")
                found.append({"bbox": [float(v) for v in box], "score": score, "label": label})
            for k, v in node.items():
                if k != "bbox":
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(e.output)
    if not found:
        raise ToolError(f"{evidence_id} ({e.tool}) holds no boxes")
    found.sort(key=lambda b: -(b["score"] if b["score"] is not None else -1.0))
    return found[:limit]
