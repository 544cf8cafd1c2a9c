"""`dxagent models list | add | verify | hash`: the model store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agent.app.cli.options import err, fail, out

models_app = typer.Typer(no_args_is_help=True, help="The model store: cards (YAML) for learned experts and their weights.")


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="the full cards and weight status")] = False,
                ) -> None:
    """List the model cards in the store, with each one's weights status (sha256 cached by size and mtime)."""
    from agent.store.models import ModelStore

    store = ModelStore()
    entries = store.list()
    checks = {id(e): store.verify_card(e.card) for e in entries if e.card is not None}
    if as_json:
        print(json.dumps([{"name": e.name, "path": str(e.path), "error": e.error, "bundled": e.bundled,
                           "weights": checks[id(e)].message() if e.card else None,
                           "status": checks[id(e)].status if e.card else "broken card",
                           "card": e.card.model_dump(mode="json") if e.card else None} for e in entries], indent=2))
        return
    table = Table(title=f"dxagent models ({store.dir})")
    for col in ("name", "kind", "adapter", "modalities", "labels", "validation", "weights"):
        table.add_column(col, overflow="fold")
    for e in entries:
        if e.card is None:
            table.add_row(e.name, "[red]BROKEN[/]", "", "", "", "", e.error)
            continue
        c, v = e.card, checks[id(e)]
        labels = ", ".join(c.labels[:6]) + (f" +{len(c.labels) - 6}" if len(c.labels) > 6 else "")
        table.add_row(c.name + (" (bundled)" if e.bundled else ""), c.kind, c.adapter, ", ".join(c.modalities), labels,
                      c.validation_headline(),
                      "ok" if v.ok else f"[red]{v.status}[/]")
    out.print(table)
    if not entries:
        out.print("no model cards yet: dxagent models add CARD.yaml", highlight=False)


@models_app.command("add")
def models_add(
    card: Annotated[Path, typer.Argument(help="the model card (YAML)")],
    replace: Annotated[bool, typer.Option("--replace", help="replace a model of the same name")] = False,
    no_copy: Annotated[bool, typer.Option("--no-copy", help="leave the weights where they are (the stored card "
                                          "points to their absolute path)")] = False,
) -> None:
    """Validate CARD, verify its weights' sha256 and add card (and weights) to the store."""
    from agent.store.models import ModelStore, ModelStoreError

    store = ModelStore()
    try:
        stored = store.add(card, copy_weights=not no_copy, replace=replace)
    except ModelStoreError as exc:
        fail(str(exc))
    out.print(f"added {stored.name} ({stored.kind}, {stored.adapter}) → {stored.source}; weights {stored.weights_path}",
              highlight=False, soft_wrap=True)


@models_app.command("verify")
def models_verify(
    name: Annotated[str, typer.Argument(help="one model (default: all)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="rehash every file, ignoring the sha256 cache")] = False,
) -> None:
    """Check that each card is valid and its weights exist and match their sha256; exit 1 if any does not."""
    from agent.store.models import ModelStore, ModelStoreError

    store = ModelStore()
    try:
        results = store.verify(name, fresh=fresh)
    except ModelStoreError as exc:
        fail(str(exc))
    table = Table(title=f"model verification ({store.dir})")
    for col in ("name", "status", "detail"):
        table.add_column(col, overflow="fold")
    for v in results:
        table.add_row(v.name, "ok" if v.ok else f"[red]{v.status}[/]", v.message())
    out.print(table)
    bad = [v for v in results if not v.ok]
    if bad:
        err.print(f"[bold red]error:[/] {len(bad)} of {len(results)} model(s) failed verification", highlight=False)
        raise typer.Exit(1)
    if not results:
        out.print("no model cards in the store", highlight=False)


@models_app.command("hash")
def models_hash(path: Annotated[Path, typer.Argument(help="a weights file or folder (MONAI bundle, transformers dir)")]) -> None:
    """Print the sha256 a model card must carry for PATH (a folder's covers every file in it)."""
    from agent.store.models import ModelStore

    if not (path.is_file() or path.is_dir()):
        fail(f"{path}: no such file or folder")
    out.print(f"{ModelStore().sha256(path, fresh=True)}  {path}", highlight=False, soft_wrap=True)
