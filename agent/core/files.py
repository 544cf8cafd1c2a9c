"""File helpers: the cache root, hashing, atomic writes. Standard library only; the one copy of each."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """$DXAGENT_CACHE, else $XDG_CACHE_HOME/dxagent, else ~/.cache/dxagent (models, indexes, llama.cpp state)."""
    root = os.environ.get("DXAGENT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "dxagent")
    return Path(root).expanduser()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_atomic(path: str | Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part: a temporary file
    in the same folder, flushed to disk, then renamed over `path` (the temporary file is removed on any failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
