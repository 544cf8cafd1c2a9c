"""Weights the project makes for the learned adapters (no downloads): each module here builds a small real model of
one family, saves it the way users' weights come (a .pt, a .pth checkpoint, a MONAI bundle folder, a transformers
directory) and writes its model card. Used by the tests and by bench/bench_learned.py.

Each module has `make(folder: Path, **options) -> Path`, returning the card YAML, ready for `ModelStore.add`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_card(folder: Path, weights: str, **fields: Any) -> Path:
    """Write `<folder>/card.yaml` for weights (a file or folder under `folder`), with their real sha256."""
    from agent.store.models import ModelStore

    sha = ModelStore(folder / ".hash-cache").sha256(folder / weights, fresh=True)
    card = {"license": "test weights made by the project", "intended_use": "tests and benchmarks of the adapter",
            "version": "0", **fields, "weights": weights, "sha256": sha}
    path = folder / "card.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path
