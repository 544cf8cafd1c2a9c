"""Case library: labelled reference images as feature vectors in a faiss index, for `similar_cases`.

    dxagent library build SOURCE [--out DIR] [--encoder handcrafted|MODEL_CARD|MODEL_DIR] [--modality CODE]
    dxagent library info [DIR]

SOURCE is a folder of images (label = the name of the file's parent folder; files directly in SOURCE
have no label) or a `cases.jsonl` (fields `case_id`, `image` (path relative to the file's folder),
`modality`, `findings` (the labels), `source`). Each image is loaded with `agent.imaging.loaders.load_views`;
a file that cannot be loaded is reported and skipped, and the build goes on.

Encoders (the library records which one built it; `similar_cases` embeds queries with the same one):

* `handcrafted` (default, no model): the image (a volume's middle slice; block-averaged first when
  its short side is over 512 px) resized to 128×128, gray values scaled between their 1st and 99th
  percentiles; six feature groups, each L2-normalised and
  weighted equally, then the whole vector L2-normalised so the inner product is a cosine similarity:
  gray histogram (32 bins) and RGB histograms (3×16; a gray image counts as R=G=B), square-rooted
  (Hellinger); hue (weighted by saturation) and saturation histograms (16 + 8); GLCM contrast,
  dissimilarity, homogeneity, energy, correlation and ASM at 1/2/4/8 px, averaged over 4 angles
  (skimage `graycoprops`, 32 gray levels, signed log1p); uniform LBP histograms (P=8 R=1, P=16 R=2),
  square-rooted; HOG (9 orientations, 16 px cells, 2×2 blocks). 1920 dimensions.
* the name of a model card in the model store (agent/store/models.py) with adapter `clip` and kind `embed` or
  `classify`: a CLIP/SigLIP-family transformers directory, loaded offline by agent/analysis/clip.py;
  the L2-normalised projected image embedding (`embed_with`: gray pictures to 8 bits between their
  0.5th and 99.5th percentiles, the model's own image processor). The library records the card's name
  and sha256 (`{"name", "card", "adapter", "kind", "sha256", "dim"}`); a query, a rebuild or
  `similar_cases` whose card is no longer in the store, has another sha256, or whose weights no longer
  verify is refused with one line naming the card (never neighbours from other embeddings). The
  model loads once per process (its weights rehashed then); later uses check the card's sha256 and
  the store's size/mtime-cached hash of the weights.
* a folder holding a Hugging Face vision model and its image processor (`save_pretrained`), loaded
  offline with transformers: the pooled output (or the mean token), L2-normalised.

A name is tried as a model card first, then as a folder.

Storage: `DIR/library.json` names the current generation folder `DIR/gen-NNNNNN/`, which holds
`index.faiss` (a faiss `IndexFlatIP`: exact inner-product search over the normalised vectors) and
`cases.json` (per case: case_id, labels, modality, modality family, source, path relative to the
source root, the source root, image sha256, the loader's gray/rgb flag). Why faiss: a well-kept
library (Meta; CPU wheels on PyPI) with exact inner-product search, restriction of a search to a
subset of ids (`IDSelectorBatch`, used for the same-modality-family filter), its own on-disk format,
and approximate indexes (IVF, HNSW) to move to if a library outgrows exact search. Metadata is plain
JSON: small, readable, and written with the index in the same generation.

Builds are incremental and idempotent (an image whose sha256 is already indexed is skipped) and
atomic: a new generation is written in full, then `library.json` is replaced (`os.replace`), so a
reader or a killed build never sees half a library. A lock file serialises concurrent builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.errors import UserError
from agent.core.files import cache_root, write_atomic

FORMAT = "dxagent-library/1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".gz", ""}
_FAMILIES = {"DX": "xray", "CR": "xray", "RG": "xray", "DR": "xray"}


class LibraryError(UserError, RuntimeError):
    """The library is missing, unreadable, or cannot be built as asked; one line says why."""


def default_library_dir() -> Path:
    """$DXAGENT_LIBRARY, else <cache root>/library."""
    env = os.environ.get("DXAGENT_LIBRARY")
    return Path(env).expanduser() if env else cache_root() / "library"


def modality_family(code: str) -> str:
    """Projection radiography codes (DX, CR, RG, DR) form one family; every other code is its own."""
    return _FAMILIES.get(code.upper(), code.upper())


# ----------------------------------------------------------------------------------------------
# encoders


def _l2(x: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return x / n if n > 0 else x


class HandcraftedEncoder:
    """Colour, intensity, texture (GLCM, LBP) and shape (HOG) features; deterministic, no model."""

    name = "handcrafted"
    version = 1
    dim = 1920
    size = 128

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dim": self.dim}

    def embed(self, img: np.ndarray, rgb: bool) -> np.ndarray:
        from skimage.color import rgb2gray, rgb2hsv
        from skimage.feature import graycomatrix, graycoprops, hog, local_binary_pattern
        from skimage.transform import downscale_local_mean, resize

        from agent.analysis.display import to_uint8

        s = self.size
        f = min(img.shape[:2]) // (2 * s)
        if f > 1:  # a large image: block means first, so the anti-aliased resize and percentiles stay cheap
            img = downscale_local_mean(img, (f, f, 1) if rgb else (f, f))
            img = img.round().clip(0, 255).astype(np.uint8) if rgb else img
        if rgb:
            col = resize(img, (s, s, 3), anti_aliasing=True, preserve_range=True).round().clip(0, 255).astype(np.uint8)
            gray = (rgb2gray(col) * 255).round().astype(np.uint8)
        else:
            gray = resize(to_uint8(img), (s, s), anti_aliasing=True, preserve_range=True).round().astype(np.uint8)
            col = np.repeat(gray[..., None], 3, axis=-1)
        n = float(gray.size)
        hsv = rgb2hsv(col)
        glcm = graycomatrix(gray // 8, [1, 2, 4, 8], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32,
                            symmetric=True, normed=True)
        props = np.concatenate([graycoprops(glcm, p).mean(axis=1) for p in
                                ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")])
        lbp1, lbp2 = local_binary_pattern(gray, 8, 1, "uniform"), local_binary_pattern(gray, 16, 2, "uniform")
        groups = [
            np.sqrt(np.histogram(gray, 32, (0, 256))[0] / n),
            np.sqrt(np.concatenate([np.histogram(col[..., c], 16, (0, 256))[0] for c in range(3)]) / n),
            np.concatenate([np.histogram(hsv[..., 0], 16, (0, 1), weights=hsv[..., 1])[0],
                            np.histogram(hsv[..., 1], 8, (0, 1))[0]]) / n,
            np.sign(props) * np.log1p(np.abs(props)),
            np.sqrt(np.concatenate([np.histogram(lbp1, 10, (0, 10))[0], np.histogram(lbp2, 18, (0, 18))[0]]) / n),
            hog(gray, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), feature_vector=True),
        ]
        vec = np.concatenate([_l2(g.astype(np.float64)) for g in groups])
        return _l2(vec).astype(np.float32)


class ModelEncoder:
    """A Hugging Face vision model saved in a folder (config, weights, image processor); offline only."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "config.json").is_file():
            raise LibraryError(f"encoder {self.path} is not a model folder (no config.json)")
        weights = sorted(p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        h = hashlib.sha256()
        for p in weights:
            with open(p, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(chunk)
        self.weights_sha256 = h.hexdigest()
        self._lock = threading.Lock()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise LibraryError(f"cannot load the encoder model in {self.path}: {' '.join(str(exc).split())[:200]}") from None
        self.name = "model"
        self.dim = int(self.embed(np.zeros((32, 32), np.float32) + np.arange(32, dtype=np.float32), False).shape[0])

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "weights_sha256": self.weights_sha256, "dim": self.dim}

    def embed(self, img: np.ndarray, rgb: bool) -> np.ndarray:
        import torch
        from PIL import Image

        from agent.analysis.display import to_uint8

        pic = Image.fromarray(img if rgb else np.repeat(to_uint8(img)[..., None], 3, axis=-1))
        with self._lock, torch.no_grad():
            inputs = self.processor(images=[pic], return_tensors="pt")
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            else:
                out = self.model(**inputs)
            if not isinstance(out, torch.Tensor):
                pooled = getattr(out, "pooler_output", None)
                out = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        return _l2(out[0].float().numpy().astype(np.float64)).astype(np.float32)


@lru_cache(maxsize=4)
def _model_encoder(path: str) -> ModelEncoder:
    return ModelEncoder(path)


class CardEncoder:
    """A `clip` model card of the model store (kind embed or classify): agent.analysis.clip.s image embeddings."""

    def __init__(self, card: Any):
        from agent.analysis.clip import load_clip
        from agent.core.tool import ToolError

        self.card = card
        self.name = card.name
        try:
            self._model = load_clip(card)  # rehashes the weights, then loads them once per process
        except ToolError as exc:
            raise LibraryError(str(exc)) from None
        self.dim = int(self.embed(np.zeros((32, 32), np.float32) + np.arange(32, dtype=np.float32), False).shape[0])

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.card.name, "card": self.card.name, "adapter": self.card.adapter, "kind": self.card.kind,
                "sha256": self.card.sha256, "dim": self.dim}

    def embed(self, img: np.ndarray, rgb: bool) -> np.ndarray:
        from agent.analysis.clip import embed_with

        return embed_with(self._model, [img], [rgb])[0]


_CARD_ENCODERS: dict[tuple[str, str, str], CardEncoder] = {}
_CARD_LOCK = threading.Lock()
Encoder = HandcraftedEncoder | ModelEncoder | CardEncoder


def _store() -> Any:
    from agent.store.models import ModelStore

    return ModelStore()


def _card_named(name: str) -> Any | None:
    """The store's card called `name` (None when there is none); LibraryError when it is broken."""
    from agent.store.models import ModelStoreError

    store = _store()
    if not any(e.name == name for e in store.list()):
        return None
    try:
        return store.get(name)
    except ModelStoreError as exc:
        raise LibraryError(str(exc)) from None


def card_encoder(card: Any) -> CardEncoder:
    """The encoder of a model card, once per process per (name, sha256, weights); LibraryError naming the card when
    it is not a clip embed/classify card or its weights do not verify (size/mtime-cached hash; fresh at first load)."""
    if card.adapter != "clip" or card.kind not in ("embed", "classify"):
        raise LibraryError(f"model card {card.name!r} is {card.adapter}/{card.kind}: a library encoder needs a card with "
                           "adapter clip and kind embed or classify")
    v = _store().verify_card(card)
    if not v.ok:
        raise LibraryError(f"model card {card.name!r}: {v.message()}")
    key = (card.name, card.sha256, str(card.weights_path))
    with _CARD_LOCK:
        if key not in _CARD_ENCODERS:
            _CARD_ENCODERS[key] = CardEncoder(card)
        return _CARD_ENCODERS[key]


def make_encoder(name: str = "handcrafted") -> Encoder:
    """"handcrafted", the name of a clip model card in the model store, or the path of a model folder (loaded once
    per process)."""
    if name == "handcrafted":
        return HandcraftedEncoder()
    if (card := _card_named(name)) is not None:
        return card_encoder(card)
    if not Path(name).expanduser().is_dir():
        raise LibraryError(f"unknown encoder {name!r}: use 'handcrafted', the name of a clip model card in the model store "
                           f"({_store().dir}), or the folder of a saved vision model")
    return _model_encoder(str(Path(name).expanduser().resolve()))


def describe_encoder(spec: dict[str, Any]) -> str:
    """An encoder spec in a few words: handcrafted v1, model card 'x' (sha256 0123456789ab…), model folder PATH."""
    if "card" in spec:
        return f"model card {spec['card']!r} (sha256 {str(spec.get('sha256'))[:12]}…)"
    if spec.get("name") == "handcrafted":
        return f"handcrafted v{spec.get('version')}"
    return f"model folder {spec.get('path')}"


def encoder_from_spec(spec: dict[str, Any]) -> Encoder:
    """The encoder that built a library, for its queries; LibraryError (one line) when it is gone or changed."""
    if spec.get("name") == "handcrafted":
        enc = HandcraftedEncoder()
        if spec.get("version") != enc.version or spec.get("dim") != enc.dim:
            raise LibraryError(f"the library was built with handcrafted encoder v{spec.get('version')}; "
                               f"this dxagent has v{enc.version}: rebuild it")
        return enc
    if "card" in spec:
        if (why := card_problem(spec)) is not None:
            raise LibraryError(why)
        cenc = card_encoder(_card_named(str(spec["card"])))
        if cenc.dim != spec.get("dim"):
            raise LibraryError(f"model card {cenc.name!r} now gives {cenc.dim}-dimensional embeddings; the library "
                               f"holds {spec.get('dim')}: rebuild the library")
        return cenc
    enc = make_encoder(spec.get("path", ""))
    if enc.spec.get("weights_sha256") != spec.get("weights_sha256"):
        raise LibraryError(f"the encoder model in {spec.get('path')} changed since the library was built: rebuild it")
    return enc


def card_problem(spec: dict[str, Any]) -> str | None:
    """Why a library built with model card `spec["card"]` cannot be searched now (card gone, other sha256, weights
    missing or changed per the store's cached hash), in one line naming the card; None when it can (or the spec is
    not a card's)."""
    if "card" not in spec:
        return None
    name = str(spec["card"])
    try:
        card = _card_named(name)
    except LibraryError as exc:
        return f"the case library was built with model card {name!r}, which is broken now: {exc}"
    if card is None:
        return (f"the case library was built with model card {name!r}, which is not in the model store "
                f"({_store().dir}): add it back or rebuild the library")
    if card.sha256 != spec.get("sha256"):
        return (f"the case library was built with model card {name!r} (sha256 {str(spec.get('sha256'))[:12]}…), which "
                f"now has sha256 {card.sha256[:12]}…: rebuild the library")
    v = _store().verify_card(card)
    if not v.ok:
        return f"the case library was built with model card {name!r}, whose weights no longer verify: {v.message()}"
    return None


def embed_pixels(encoder: Encoder, arr: np.ndarray, rgb: bool) -> np.ndarray:
    """A view's vector: the picture itself, or a volume's middle slice."""
    from agent.analysis.display import display_slice

    return encoder.embed(display_slice(arr, rgb), rgb)


# ----------------------------------------------------------------------------------------------
# the on-disk library


@dataclass
class Library:
    root: Path
    generation: str
    encoder: dict[str, Any]
    cases: list[dict[str, Any]]
    index: Any  # faiss.Index
    updated: str = ""

    @property
    def size(self) -> int:
        return len(self.cases)

    @classmethod
    def load(cls, root: str | Path) -> Library:
        root = Path(root).expanduser()
        head = root / "library.json"
        if not head.is_file():
            raise LibraryError(f"no case library at {root}: build one with `dxagent library build`")
        try:
            meta = json.loads(head.read_text())
            if meta.get("format") != FORMAT:
                raise LibraryError(f"{head} is not a {FORMAT} library (format {meta.get('format')!r})")
            gen = root / meta["generation"]
            cases = json.loads((gen / "cases.json").read_text())["cases"]
            import faiss

            index = faiss.read_index(str(gen / "index.faiss"))
        except LibraryError:
            raise
        except Exception as exc:
            raise LibraryError(f"case library at {root} is unreadable ({type(exc).__name__}: {str(exc)[:160]})") from None
        if index.ntotal != len(cases):
            raise LibraryError(f"case library at {root} is inconsistent ({index.ntotal} vectors, {len(cases)} cases)")
        return cls(root, meta["generation"], meta["encoder"], cases, index, meta.get("updated", ""))

    def search(self, vec: np.ndarray, k: int, family: str | None = None,
               exclude_sha256: str = "") -> tuple[list[tuple[dict[str, Any], float]], bool]:
        """The k nearest cases (case, cosine) — within `family` when the library holds any case of it —
        and whether the family restriction applied. Cases with sha256 `exclude_sha256` are left out."""
        import faiss

        ids = [i for i, c in enumerate(self.cases) if c["sha256"] != exclude_sha256]
        fam = [i for i in ids if family and self.cases[i]["family"] == family]
        restricted = bool(fam)
        ids = fam or ids
        if not ids or k <= 0:
            return [], restricted
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))
        scores, found = self.index.search(np.asarray(vec, dtype=np.float32)[None], min(k, len(ids)), params=params)
        hits = [(self.cases[int(i)], float(s)) for i, s in zip(found[0], scores[0], strict=True) if i >= 0]
        return hits, restricted

    def summary(self) -> dict[str, Any]:
        by: dict[str, Counter[str]] = {}
        for c in self.cases:
            by.setdefault(f"{c['source']} ({c['modality']})", Counter())[", ".join(c["labels"]) or "(no label)"] += 1
        return {"dir": str(self.root), "generation": self.generation, "updated": self.updated, "cases": self.size,
                "encoder": self.encoder, "by_source": {k: dict(v.most_common()) for k, v in by.items()}}


_LOADED: dict[str, Library] = {}
_LOADED_LOCK = threading.Lock()


def open_library(root: str | Path | None = None) -> Library:
    """The library at `root` (default `default_library_dir()`), cached per process until it is rebuilt."""
    root = Path(root).expanduser() if root else default_library_dir()
    key = str(root.resolve())
    try:
        gen = json.loads((root / "library.json").read_text()).get("generation")
    except (OSError, ValueError):
        gen = None
    with _LOADED_LOCK:
        lib = _LOADED.get(key)
        if lib is None or lib.generation != gen:
            lib = _LOADED[key] = Library.load(root)
        return lib


# ----------------------------------------------------------------------------------------------
# building


@dataclass
class Item:
    path: Path  # absolute
    rel: str  # relative to the source root
    case_id: str
    labels: list[str]
    modality: str | None  # as the user wrote it (CXR, dermoscopy, ...) or None
    source: str


@dataclass
class BuildReport:
    dir: Path
    added: int = 0
    already: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path or line, why)
    total: int = 0  # cases in the library after the build
    seconds: float = 0.0


def _image_like(p: Path) -> bool:
    if p.name.startswith(".") or not p.is_file():
        return False
    suffix = p.suffix.lower()
    return suffix in IMAGE_SUFFIXES and (suffix != ".gz" or p.name.lower().endswith(".nii.gz"))


def read_source(source: str | Path, modality: str | None = None) -> tuple[Path, list[Item], list[tuple[str, str]]]:
    """(source root, items, problems) for a folder of images or a cases.jsonl."""
    src = Path(source).expanduser().resolve()
    if not src.exists():
        raise LibraryError(f"{source}: no such file or folder")
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    if src.is_dir():
        for p in sorted(src.rglob("*")):
            if _image_like(p) and not any(part.startswith(".") for part in p.relative_to(src).parts):
                rel = p.relative_to(src).as_posix()
                labels = [p.parent.name] if p.parent != src else []
                items.append(Item(p, rel, rel.rsplit(".", 1)[0] if "." in p.name else rel, labels, modality, src.name))
        return src, items, problems
    root = src.parent
    for n, line in enumerate(src.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rel = str(rec["image"])
            labels = rec.get("findings") or []
            if isinstance(labels, str):
                labels = [labels]
            items.append(Item(root / rel, rel, str(rec.get("case_id") or rel), [str(x) for x in labels],
                              modality or rec.get("modality"), str(rec.get("source") or src.stem)))
        except (ValueError, KeyError, TypeError) as exc:
            problems.append((f"{src.name} line {n}", f"bad record ({type(exc).__name__}: {str(exc)[:100]})"))
    return root, items, problems


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(source: str | Path, out: str | Path | None = None, encoder: str = "handcrafted", modality: str | None = None,
          on_item: Callable[[int, int, str], None] | None = None) -> BuildReport:
    """Add the images of `source` that the library at `out` does not hold yet (by sha256).

    `on_item(done, total, name)` is called after each image (for a progress bar)."""
    import faiss

    from agent.analysis.display import is_rgb
    from agent.core.files import sha256_file
    from agent.imaging.loaders import ImageLoadError
    from agent.imaging.views import load_views
    from agent.store.artifacts import ArtifactStore

    t0 = time.perf_counter()
    root = Path(out).expanduser() if out else default_library_dir()
    src_root, items, problems = read_source(source, modality)
    report = BuildReport(root, failed=list(problems))
    if not items and not problems:
        raise LibraryError(f"{source}: no images found")
    enc = make_encoder(encoder)
    with _locked(root):
        for stale in root.glob(".tmp-*"):  # left by a build that was killed while writing
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        old = Library.load(root) if (root / "library.json").exists() else None
        if old is not None and old.encoder != enc.spec:
            raise LibraryError(f"the library at {root} was built with {describe_encoder(old.encoder)}; this build uses "
                               f"{describe_encoder(enc.spec)}: use another --out or delete the library")
        cases = list(old.cases) if old else []
        index = faiss.clone_index(old.index) if old else faiss.IndexFlatIP(enc.dim)
        known = {c["sha256"] for c in cases}
        new_vecs: list[np.ndarray] = []
        with tempfile.TemporaryDirectory(prefix="dxagent-library-") as tmp:
            for n, it in enumerate(items, 1):
                try:
                    if it.path.is_file() and sha256_file(it.path) in known:  # indexed already: no need to decode it
                        report.already += 1
                        continue
                    store = ArtifactStore(tmp)  # a fresh store per image keeps memory flat
                    view = load_views([str(it.path)], store, modality=it.modality)[0]
                    if view.source_sha256 in known:
                        report.already += 1
                    else:
                        rgb = is_rgb(view)
                        new_vecs.append(embed_pixels(enc, store.get_array(view.pixels), rgb))
                        known.add(view.source_sha256)
                        cases.append({"case_id": it.case_id, "labels": it.labels, "modality": view.modality,
                                      "family": modality_family(view.modality), "source": it.source, "path": it.rel,
                                      "root": str(src_root), "sha256": view.source_sha256, "rgb": rgb,
                                      "shape": list(view.shape)})
                        report.added += 1
                    store.path(view.pixels).unlink(missing_ok=True)
                except ImageLoadError as exc:
                    report.failed.append((it.rel, str(exc)))
                except Exception as exc:  # a feature extractor failing on one odd image must not stop the build
                    report.failed.append((it.rel, f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"))
                finally:
                    if on_item:
                        on_item(n, len(items), it.rel)
        if new_vecs:
            index.add(np.stack(new_vecs).astype(np.float32))
            gen_no = int(old.generation.split("-")[1]) + 1 if old else 1
            gen = f"gen-{gen_no:06d}"
            tmp_gen = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-gen-"))
            faiss.write_index(index, str(tmp_gen / "index.faiss"))
            (tmp_gen / "cases.json").write_text(json.dumps({"cases": cases}, indent=0))
            os.chmod(tmp_gen, 0o755)
            shutil.rmtree(root / gen, ignore_errors=True)
            os.replace(tmp_gen, root / gen)
            write_atomic(root / "library.json", json.dumps({
                "format": FORMAT, "generation": gen, "encoder": enc.spec, "cases": len(cases),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }, indent=1))
            keep = {gen, old.generation if old else ""}
            for p in root.glob("gen-*"):  # keep the previous generation for readers that are mid-load
                if p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True)
    report.total = len(cases)
    report.seconds = time.perf_counter() - t0
    return report
