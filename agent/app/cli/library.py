"""`dxagent library build | info`: the case library that similar_cases searches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agent.app.cli.options import err, fail, out

library_app = typer.Typer(no_args_is_help=True, help="The case library that similar_cases searches.")


@library_app.command("build")
def library_build(
    source: Annotated[Path, typer.Argument(help="a folder of images (label = parent folder name) or a cases.jsonl")],
    out_dir: Annotated[Path, typer.Option("--out", help="library folder (default $DXAGENT_LIBRARY or "
                                          "~/.cache/dxagent/library)")] = None,
    encoder: Annotated[str, typer.Option(help="handcrafted; the name of a clip model card (kind embed or classify) "
                                         "in the model store, whose image embeddings index the library; or the "
                                         "folder of a saved vision model")] = "handcrafted",
    modality: Annotated[str, typer.Option(help="modality of every image (CXR, CT, dermoscopy, ...); default: "
                                          "from cases.jsonl, the DICOM file, or a guess")] = None,
) -> None:
    """Add SOURCE's images to the case library (images already indexed, by sha256, are skipped)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from agent.index.library import LibraryError, build

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("indexing", total=None)
        try:
            rep = build(source, out_dir, encoder=encoder, modality=modality,
                        on_item=lambda n, total, name: bar.update(task, completed=n, total=total))
        except LibraryError as exc:
            fail(str(exc))
    for rel, why in rep.failed:
        err.print(f"[yellow]skipped[/] {rel}: {why}", highlight=False, soft_wrap=True)
    out.print(f"library {rep.dir}: added {rep.added}, already indexed {rep.already}, failed {len(rep.failed)}; "
              f"{rep.total} cases ({rep.seconds:.1f} s)", highlight=False, soft_wrap=True)
    if rep.total == 0:
        fail("no image could be indexed")


@library_app.command("info")
def library_info(
    library_dir: Annotated[Path, typer.Argument(help="library folder (default $DXAGENT_LIBRARY or "
                                                "~/.cache/dxagent/library)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show what the case library holds: cases per source and label, and its encoder."""
    from agent.index.library import Library, LibraryError, default_library_dir

    try:
        info = Library.load(library_dir or default_library_dir()).summary()
    except LibraryError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    enc = info["encoder"]
    card = f" (model card, sha256 {enc['sha256'][:12]}…)" if "card" in enc else ""
    out.print(f"library {info['dir']} · {info['cases']} cases · encoder {enc['name']}{card} "
              f"({info['encoder']['dim']} dims) · {info['generation']} · updated {info['updated']}", highlight=False,
              soft_wrap=True)
    table = Table()
    for col in ("source (modality)", "label", "cases"):
        table.add_column(col, overflow="fold")
    for src, labels in info["by_source"].items():
        for label, n in labels.items():
            table.add_row(src, label, str(n))
    out.print(table)
