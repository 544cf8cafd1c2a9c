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


STORED_TEXT_MAX_BYTES = 256 * 2**10  # DXAGENT_MAX_STORED_REPLY_BYTES changes it


def stored_text_cap() -> int:
    """The most bytes of any one text a trace event stores (an LLM reply, a tool's output, an error), and of an
    endpoint's reply that is read at all: $DXAGENT_MAX_STORED_REPLY_BYTES, else 256 KiB (a planner reply is under
    1 KB). SettingError (one line) when it is not a positive whole number of bytes."""
    from agent.core.errors import SettingError

    raw = os.environ.get("DXAGENT_MAX_STORED_REPLY_BYTES", "").strip()
    if raw and not (raw.isdigit() and int(raw) >= 1024):
        raise SettingError(f"DXAGENT_MAX_STORED_REPLY_BYTES={raw[:20]!r} is not a whole number of bytes, 1024 or more")
    return int(raw) if raw else STORED_TEXT_MAX_BYTES


def size_text(n: int) -> str:
    """A byte count as people read it: 256 KiB, 3.0 MiB, 900 bytes."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n // 2**10} KiB" if n >= 2**10 else f"{n} bytes"


MANIFEST_MAX_BYTES = 64 * 2**20  # a manifest of 100,000 rows is about 20 MB; DXAGENT_MAX_MANIFEST_BYTES changes it
MANIFEST_MAX_LINE = 2**20  # characters in one manifest row (a row names an image, a question and an answer)


class ManifestCapError(ValueError):
    """A manifest over its cap, or the cap set to something that is not a size: the message is one line."""


def read_manifest_text(path: str | Path) -> str:
    """A manifest's text, read only up to its cap (so a huge file, a device or a pipe cannot take the memory): UTF-8,
    a byte-order mark dropped. ManifestCapError past the cap; OSError / UnicodeDecodeError as reading raises them."""
    raw = os.environ.get("DXAGENT_MAX_MANIFEST_BYTES", "").strip()
    if raw and not (raw.isdigit() and int(raw) > 0):
        raise ManifestCapError(f"DXAGENT_MAX_MANIFEST_BYTES={raw[:20]!r} is not a positive whole number of bytes")
    cap = int(raw) if raw else MANIFEST_MAX_BYTES
    with open(path, "rb") as fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise ManifestCapError(f"{path}: larger than {cap:,} bytes, the cap for a manifest (DXAGENT_MAX_MANIFEST_BYTES): "
                       "split it")
    return data.decode("utf-8-sig")


def row_too_long(line: str, where: str) -> str | None:
    """The one-line error for a manifest row over MANIFEST_MAX_LINE characters, else None."""
    if len(line) > MANIFEST_MAX_LINE:
        return f"{where}: {len(line):,} characters, longer than a manifest row may be ({MANIFEST_MAX_LINE:,})"
    return None
