"""Modality guess benchmark: `guess_modality` on the realcases pixels, against each case's labelled modality.

    .venv/bin/python bench/bench_modality_guess.py [--errors] [--sources busi_ultrasound covid_ct ...]

Every realcases image is loaded as the loader hands it to `guess_modality` (agent.imaging.loaders.load_file: PNG/JPEG via
Pillow then _finish, so RGB uint8 (H, W, 3), gray float32 (H, W), colour files that are really gray already
made gray; the one DICOM too, though its Modality tag would win in practice). The truth is the case's
`modality` field through the loader's own alias table (CXR -> DX, MRI -> MR, fundus -> OP, ...).

Prints: the confusion matrix (true x guessed) overall and per source, accuracy of the new rules and of the
previous heuristic (copied below as `old_guess_modality`), precision per guessed code, and per rule: how often
it fired, precision, the Wilson 95 % lower bound, the confidence that bound gives (rounded down to 0.05, capped
at 0.9) next to the one in `_GUESS_RULES`, and the precision on even/odd case halves (stability). Then the time
per call on the realcases and on synthetic 1000 x 1000 images, and, as an out-of-sample look, the guesses on
the images bundled with pydicom (their Modality tag is the truth) and scikit-image (a fundus photo, a phantom and
non-medical pictures, for which anything but OT is a false alarm). Prints figures; asserts nothing.
Needs ../shared/data/realcases (or $DXAGENT_REALCASES).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import realcases_root  # noqa: E402

from agent.analysis.display import looks_like_hu  # noqa: E402
from agent.imaging.loaders import load_file as _load  # noqa: E402
from agent.imaging.modality import GUESS_RULES as _GUESS_RULES  # noqa: E402
from agent.imaging.modality import _guess_modality_rule, guess_modality  # noqa: E402
from agent.imaging.modality import normalise_modality as _normalise_modality  # noqa: E402

CODES = ["DX", "CT", "MR", "US", "XC", "OP", "ES", "SM", "OT"]


def old_guess_modality(arr: np.ndarray, rgb: bool | None = None) -> tuple[str, float]:
    """The heuristic before this benchmark (commit 6e7174a), for the before/after accuracy."""
    if rgb is None:
        rgb = arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8
    if rgb:
        spread = arr.max(axis=-1).astype(np.int16) - arr.min(axis=-1)
        return ("OT", 0.5) if float(np.median(spread)) >= 5 else ("OT", 0.3)
    if looks_like_hu(arr):
        return "CT", 0.7
    return ("MR", 0.4) if arr.ndim == 3 else ("DX", 0.3)


def wilson_low(k: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson 95 % interval of a proportion k/n."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n))


def conf_from(k: int, n: int) -> float:
    return min(0.9, math.floor(wilson_low(k, n) * 20 + 1e-9) / 20)


def matrix(pairs: list[tuple[str, str]], title: str) -> None:
    cm = Counter(pairs)
    print(f"\n{title}  (rows: true, columns: guessed)")
    print("        " + "".join(f"{c:>5s}" for c in CODES) + "    n")
    for t in CODES:
        n = sum(cm[(t, c)] for c in CODES)
        if n:
            print(f"  {t:5s} " + "".join(f"{cm[(t, c)] or '.':>5}" for c in CODES) + f"{n:5d}")


def load_cases(root: Path, sources: list[str] | None) -> list[dict]:
    cases = []
    for line in (root / "cases.jsonl").read_text().splitlines():
        c = json.loads(line)
        if sources and c["source"] not in sources:
            continue
        ld = _load(root / c["image"])
        cases.append({"id": c["case_id"], "source": c["source"], "true": _normalise_modality(c["modality"]),
                      "arr": ld.arr, "rgb": ld.rgb})
    return cases


BUNDLED_DICOM = ["CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "examples_overlay.dcm", "examples_rgb_color.dcm",
                 "examples_ybr_color.dcm", "examples_palette.dcm", "JPGExtended.dcm", "JPEG2000.dcm"]
BUNDLED_SKIMAGE = {"retina.jpg": "OP", "phantom.png": "OT", "microaneurysms.png": "OT", "ihc.png": "OT",
                   "astronaut.png": "OT", "chelsea.png": "OT", "coffee.png": "OT", "rocket.jpg": "OT",
                   "camera.png": "OT", "moon.png": "OT", "coins.png": "OT", "brick.png": "OT", "grass.png": "OT",
                   "text.png": "OT", "page.png": "OT", "horse.png": "OT", "chessboard_GRAY.png": "OT"}


def bundled() -> None:
    """Guesses on the pydicom / scikit-image bundled images (outside realcases: not used to pick thresholds)."""
    import pydicom
    import skimage

    print("\nout of sample: bundled images (truth: DICOM Modality tag; scikit-image non-medical pictures: OT)")
    items = [(Path(pydicom.__file__).parent / "data/test_files" / n, None) for n in BUNDLED_DICOM]
    items += [(Path(skimage.__file__).parent / "data" / n, t) for n, t in BUNDLED_SKIMAGE.items()]
    for path, truth in items:
        if not path.exists():
            continue
        try:
            ld = _load(path)
        except Exception as exc:  # a decoder missing here: say so, go on
            print(f"  {path.name:24s} not loaded ({type(exc).__name__})")
            continue
        truth = truth or _normalise_modality(ld.modality or "OT")
        code, conf = guess_modality(ld.arr, ld.rgb)
        mark = "ok" if code == truth else ("no guess" if code == "OT" else "WRONG")
        print(f"  {path.name:24s} true {truth:3s} guessed {code:3s} {conf:.2f} "
              f"{_guess_modality_rule(ld.arr, ld.rgb):24s} {mark}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", nargs="*", help="only these realcases sources")
    ap.add_argument("--errors", action="store_true", help="list every wrong guess")
    args = ap.parse_args()
    root = realcases_root()
    if root is None:
        sys.exit("realcases not found (../shared/data/realcases or $DXAGENT_REALCASES)")
    t0 = time.perf_counter()
    cases = load_cases(root, args.sources)
    print(f"{len(cases)} realcases images loaded in {time.perf_counter() - t0:.1f} s")

    times, rows = [], []
    for i, c in enumerate(cases):
        t = time.perf_counter()
        code, conf = guess_modality(c["arr"], c["rgb"])
        times.append(time.perf_counter() - t)
        rule = _guess_modality_rule(c["arr"], c["rgb"])
        old = old_guess_modality(c["arr"], c["rgb"])[0]
        rows.append({**c, "code": code, "conf": conf, "rule": rule, "old": old, "half": i % 2})

    matrix([(r["true"], r["code"]) for r in rows], "Confusion, all sources")
    for src in dict.fromkeys(r["source"] for r in rows):
        sub = [r for r in rows if r["source"] == src]
        guessed = Counter(r["code"] for r in sub)
        print(f"  {src:24s} n={len(sub):3d}  true {sub[0]['true']:2s}  guessed "
              + ", ".join(f"{k} {v}" for k, v in guessed.most_common()))

    n = len(rows)
    acc = sum(r["code"] == r["true"] for r in rows) / n
    old_acc = sum(r["old"] == r["true"] for r in rows) / n
    ot = sum(r["code"] == "OT" for r in rows)
    wrong = [r for r in rows if r["code"] not in (r["true"], "OT")]
    print(f"\naccuracy {acc:.3f} (old heuristic {old_acc:.3f}); OT (no guess) {ot}/{n}; "
          f"confidently wrong (not OT) {len(wrong)}/{n}")

    print("\nprecision per guessed code")
    for code in CODES[:-1]:
        fired = [r for r in rows if r["code"] == code]
        if fired:
            k = sum(r["true"] == code for r in fired)
            print(f"  {code:3s} {k:3d}/{len(fired):3d} = {k / len(fired):.3f}  (Wilson low {wilson_low(k, len(fired)):.3f})")

    print("\nper rule: fired, precision, Wilson low -> confidence it supports | in _GUESS_RULES | even / odd halves")
    by_rule = defaultdict(list)
    for r in rows:
        by_rule[r["rule"]].append(r)
    for rule, (code, conf) in _GUESS_RULES.items():
        fired = by_rule.get(rule, [])
        k = sum(r["true"] == code for r in fired)
        halves = []
        for h in (0, 1):
            sub = [r for r in fired if r["half"] == h]
            halves.append(f"{sum(r['true'] == code for r in sub)}/{len(sub)}")
        prec = f"{k / len(fired):.3f}" if fired else "  -  "
        supported = f"{conf_from(k, len(fired)):.2f}" if fired else "  - "
        flag = "  <-- table above measured" if fired and code != "OT" and conf > conf_from(k, len(fired)) else ""
        print(f"  {rule:24s} {code:3s} {len(fired):4d}  {prec}  {wilson_low(k, len(fired)):.3f} -> {supported} | "
              f"{conf:.2f} | {halves[0]:>7s} {halves[1]:>7s}{flag}")

    ms = [1000 * t for t in times]
    print(f"\ntime per call on realcases: median {statistics.median(ms):.1f} ms, mean {statistics.fmean(ms):.1f} ms, "
          f"max {max(ms):.1f} ms")
    rng = np.random.default_rng(0)
    synth = {"rgb 1000x1000": (rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8), True),
             "gray 1000x1000": (rng.normal(500, 100, (1000, 1000)).astype(np.float32), False),
             "gray 4096x4096": (rng.normal(500, 100, (4096, 4096)).astype(np.float32), False)}
    for name, (arr, rgb) in synth.items():
        guess_modality(arr, rgb)
        reps = []
        for _ in range(5):
            t = time.perf_counter()
            guess_modality(arr, rgb)
            reps.append(1000 * (time.perf_counter() - t))
        print(f"  {name}: median {statistics.median(reps):.1f} ms")

    bundled()

    if args.errors:
        print("\nwrong guesses (true -> guessed, confidence, rule)")
        for r in rows:
            if r["code"] != r["true"]:
                print(f"  {r['true']} -> {r['code']} {r['conf']:.2f} {r['rule']:24s} {r['source']:24s} {r['id']}")


if __name__ == "__main__":
    main()
