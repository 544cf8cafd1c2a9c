"""Content-addressed artifact store: pixels, masks and overlays as files named by sha256.

Writes are atomic (temp file + rename), so a killed run never leaves a half-written artifact.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from agent.core.files import write_atomic
from agent.core.state import ArtifactRef

CACHE_BYTES = 512 * 2**20  # decoded arrays kept in memory per store (least recently used go first)
_EXT = {"application/x-npy": ".npy", "image/png": ".png", "application/json": ".json"}


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # a long batch must not keep every case's pixels
        self._lock = threading.Lock()

    def put_bytes(self, data: bytes, kind: str, media_type: str, description: str = "") -> ArtifactRef:
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{sha[:2]}/{sha}{_EXT.get(media_type, '.bin')}"
        dest = self.root / rel
        if not dest.exists():
            write_atomic(dest, data)
        return ArtifactRef(sha256=sha, kind=kind, media_type=media_type, path=rel, description=description)

    def put_array(self, arr: np.ndarray, kind: str = "pixels", description: str = "") -> ArtifactRef:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        ref = self.put_bytes(buf.getvalue(), kind, "application/x-npy", description)
        self._remember(ref.sha256, arr)
        return ref

    def put_png(self, rgb_or_gray: np.ndarray, kind: str = "overlay", description: str = "") -> ArtifactRef:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.asarray(rgb_or_gray, dtype=np.uint8)).save(buf, format="PNG")
        return self.put_bytes(buf.getvalue(), kind, "image/png", description)

    def path(self, ref: ArtifactRef) -> Path:
        return self.root / ref.path

    def get_array(self, ref: ArtifactRef) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(ref.sha256)
            if hit is not None:
                self._cache.move_to_end(ref.sha256)
                return hit
        arr = np.load(self.path(ref), allow_pickle=False)
        self._remember(ref.sha256, arr)
        return arr

    def _remember(self, sha: str, arr: np.ndarray) -> None:
        with self._lock:
            self._cache[sha] = arr
            self._cache.move_to_end(sha)
            total = sum(a.nbytes for a in self._cache.values())
            while total > CACHE_BYTES and len(self._cache) > 1:
                total -= self._cache.popitem(last=False)[1].nbytes

    def verify(self, ref: ArtifactRef) -> bool:
        p = self.path(ref)
        return p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() == ref.sha256
