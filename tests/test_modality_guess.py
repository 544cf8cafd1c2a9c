"""guess_modality: synthetic pictures each rule must recognise, bundled real images, and the realcases check.

The realcases test loads all 562 images as the loader hands them to guess_modality (about 15 s on a busy
2-core CPU); bench/bench_modality_guess.py prints the full confusion matrix and per-rule precision.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
import skimage
from PIL import Image
from scipy import ndimage as ndi

from agent.imaging.loaders import load_file
from agent.imaging.modality import GUESS_RULES, _guess_modality_rule, guess_modality, normalise_modality
from agent.imaging.views import load_views

KNOWN_CODES = {"DX", "CT", "MR", "US", "XC", "OP", "ES", "SM", "OT"}
# Measured with bench/bench_modality_guess.py on the 562 realcases images: accuracy 0.950 (old heuristic 0.093),
# 9 wrong non-OT guesses, 19 left as OT. The floor sits 0.02 below, for JPEG decoder / library differences
# between machines; dropping below it means a rule got worse.
REALCASES_ACCURACY_FLOOR = 0.93


def _grid(h: int, w: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w or h].astype(np.float32)
    return y, x


def fundus(n=300, seed=0) -> np.ndarray:
    """A red-orange disc (darker towards its rim) on black."""
    rng = np.random.default_rng(seed)
    y, x = _grid(n)
    r = np.hypot(y - n / 2, x - n / 2)
    disc, shade = r < 0.45 * n, 1 - 0.4 * (r / (0.45 * n)) ** 2
    img = np.zeros((n, n, 3), np.float32)
    for c, v in enumerate((210, 100, 40)):
        img[..., c] = np.where(disc, v * shade + rng.normal(0, 4, (n, n)), rng.uniform(0, 8, (n, n)))
    return np.clip(img, 0, 255).astype(np.uint8)


def endoscopy(n=300, seed=0) -> np.ndarray:
    """Pink-red folds inside an octagonal mask (black cut corners, flat sides on the frame), specular spots."""
    rng = np.random.default_rng(seed)
    y, x = _grid(n)
    cut, far = 0.28 * n, n - 1
    octagon = (x + y > cut) & (far - x + y > cut) & (x + far - y > cut) & (far - x + far - y > cut)
    folds = 30 * np.sin(x / 9.0) * np.cos(y / 13.0)
    img = np.zeros((n, n, 3), np.float32)
    for c, v in enumerate((190, 90, 80)):
        img[..., c] = np.where(octagon, v + folds * v / 190 + rng.normal(0, 5, (n, n)), rng.uniform(0, 10, (n, n)))
    img[ndi.binary_dilation(rng.random((n, n)) < 0.004) & octagon] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def he_slide(n=256, seed=0) -> np.ndarray:
    """Eosin-pink tissue with scattered hematoxylin-purple nuclei."""
    rng = np.random.default_rng(seed)
    img = np.empty((n, n, 3), np.float32)
    img[:] = (235, 160, 205)
    img += rng.normal(0, 6, (n, n, 3))
    img[ndi.binary_dilation(rng.random((n, n)) < 0.012, iterations=2)] = (90, 50, 160)
    return np.clip(img + rng.normal(0, 4, (n, n, 3)), 0, 255).astype(np.uint8)


def skin(h=225, w=300, seed=0) -> np.ndarray:
    """Skin with a brown naevus in the middle."""
    rng = np.random.default_rng(seed)
    y, x = _grid(h, w)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (225, 175, 160)
    img[np.hypot((y - h / 2) / 0.25, (x - w / 2) / 0.3) < h] = (130, 80, 55)
    img += rng.normal(0, 5, (h, w, 3))
    return np.clip(ndi.gaussian_filter(img, (1, 1, 0)), 0, 255).astype(np.uint8)


def sector(n=300, seed=0) -> np.ndarray:
    """An ultrasound sector: apex at the top, 70 degrees wide, Rayleigh speckle fading with depth, black outside."""
    rng = np.random.default_rng(seed)
    y, x = _grid(n)
    ang = np.degrees(np.arctan2(x - n / 2, y + 0.05 * n))
    r = np.hypot(x - n / 2, y + 0.05 * n)
    fan = (np.abs(ang) < 35) & (r > 0.1 * n) & (r < 0.97 * n)
    speckle = ndi.gaussian_filter(rng.rayleigh(1.0, (n, n)), 0.7) * (1.2 - 0.6 * y / n)
    return np.where(fan, 60 * speckle, 0).astype(np.float32)


def head_on_black(n=256, seed=0) -> np.ndarray:
    """An MR-like slice: a soft oval of mid-grays with a brighter rim, on black."""
    rng = np.random.default_rng(seed)
    y, x = _grid(n)
    e = np.hypot((y - n / 2) / 0.40, (x - n / 2) / 0.32) / n
    img = np.where(e < 1, 110 + 25 * np.sin(x / 7.0) * np.cos(y / 11.0), 0) + np.where((e > 0.9) & (e < 1), 60, 0)
    return np.clip(ndi.gaussian_filter(img, 1) + rng.normal(0, 2, (n, n)) + 3, 0, None).astype(np.float32)


def chest_radiograph(n=512, seed=0) -> np.ndarray:
    """A smooth frame-filling chest film: gray body, lungs darkest in their middle, bright mediastinum."""
    rng = np.random.default_rng(seed)
    y, x = _grid(n)
    img = np.full((n, n), 150.0)
    for cx in (0.3, 0.7):
        img -= 70 * np.exp(-((np.hypot((y - 0.45 * n) / 0.3, (x - cx * n) / 0.16) / n) ** 2) * 2)
    img += 70 * (np.abs(x - n / 2) < 0.07 * n)
    img = ndi.gaussian_filter(img, 6) + ndi.gaussian_filter(rng.normal(0, 12, (n, n)), 4)
    return np.clip(img, 0, 255).astype(np.float32)


def lung_window_ct(n=256, seed=0) -> np.ndarray:
    """A chest CT slice in a lung window exported without the air: clipped-white body, two dark veined lungs."""
    rng = np.random.default_rng(seed)
    y, x = _grid(n)
    img = np.full((n, n), 255.0)
    vessels = ndi.gaussian_filter(rng.normal(0, 1, (n, n)), 1.2)
    vessels /= vessels.std()
    for cx in (0.28, 0.72):
        lung = np.hypot((y - 0.5 * n) / 0.36, (x - cx * n) / 0.2) < n
        img[lung] = 30 + 60 * np.clip(vessels[lung], 0, None)
    return np.clip(img, 0, 255).astype(np.float32)


def breast_ultrasound(n=256, seed=0) -> np.ndarray:
    """A cropped ultrasound (no fan): speckle in wavy horizontal layers, an off-centre dark mass."""
    rng = np.random.default_rng(seed)
    y, x = _grid(n)
    layers = 1 + 0.5 * np.sin(y / 9.0 + 2 * np.sin(x / 40.0))
    img = 70 * ndi.gaussian_filter(rng.rayleigh(1.0, (n, n)), 0.6) * layers * (1.1 - 0.5 * y / n)
    img[np.hypot((y - 0.45 * n) / 0.6, (x - 0.3 * n) / 1.0) < 0.15 * n] *= 0.15
    return np.clip(img, 0, 255).astype(np.float32)


SYNTHETIC = [
    (fundus, "OP", "fundus"), (endoscopy, "ES", "endoscopy"), (he_slide, "SM", "he_stain"), (skin, "XC", "skin"),
    (sector, "US", "fan"), (head_on_black, "MR", "body_on_black"), (chest_radiograph, "DX", "smooth_radiograph"),
    (lung_window_ct, "CT", "two_tone"), (breast_ultrasound, "US", "speckle"),
]


@pytest.mark.parametrize(("make", "code", "rule"), SYNTHETIC, ids=[s[2] for s in SYNTHETIC])
def test_synthetic_picture_is_recognised(make, code, rule):
    for seed in (0, 1):
        arr = make(seed=seed)
        before = arr.copy()
        assert _guess_modality_rule(arr) == rule, seed
        assert guess_modality(arr) == (code, GUESS_RULES[rule][1]) == guess_modality(arr)  # deterministic
        assert np.array_equal(arr, before)  # the caller's pixels are left alone


def test_rgb_flag_and_scale():
    arr = head_on_black()
    assert guess_modality(arr * 200.0, False)[0] == "MR"  # a 16-bit PNG holds the same picture, scaled
    assert guess_modality(fundus(), True)[0] == "OP"
    marked = np.repeat(head_on_black().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    marked[20:40, 20:60] = (255, 0, 0)  # a red annotation on a gray slice saved as colour: judged as gray
    assert _guess_modality_rule(marked, True) == "body_on_black" and guess_modality(marked)[0] == "MR"


def test_unsure_pictures_stay_ot_with_low_confidence():
    rng = np.random.default_rng(3)
    assert guess_modality(rng.random((128, 128)).astype(np.float32) * 255) == ("OT", 0.3)  # gray noise
    assert guess_modality(np.full((64, 64), 7.0, np.float32)) == ("OT", 0.1)  # constant
    # colour noise: green is the lowest channel in only a third of the pixels, so it is not read as H&E
    assert guess_modality(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) == ("OT", 0.5)
    assert guess_modality(fundus(n=20)) == ("OT", 0.5)  # too small to tell
    assert guess_modality(head_on_black(n=24)) == ("OT", 0.3)
    y, x = _grid(200)
    mask = (np.hypot(y - 100, (x - 90) * 1.5) < 60).astype(np.float32)  # a segmentation mask: white on black
    lines = np.full((200, 200), 255.0, np.float32)
    lines[::12, 20:180] = 0  # black text lines on a white page
    for binary in (mask, lines):  # black and white, no mid-grays: neither an MR slice nor a lung-window CT
        assert guess_modality(binary) == ("OT", 0.3)
    # a red picture with a blue square: saturated primaries are not H&E stain colours
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0], red[10:20, 10:20, 2] = 200, 255
    assert guess_modality(red) == ("OT", 0.5)


def test_hounsfield_units_and_volumes_keep_their_rules():
    hu = np.random.default_rng(0).normal(40, 30, (64, 64)).astype(np.float32)
    hu[:8], hu[30:34, 30:34] = -1000, 900
    assert guess_modality(hu) == ("CT", 0.7)
    assert guess_modality(np.stack([head_on_black()] * 3)) == ("MR", 0.4)


def test_rule_table_is_consistent():
    for rule, (code, conf) in GUESS_RULES.items():
        assert code in KNOWN_CODES and 0.0 < conf <= 0.9, rule
    assert {rule for _, _, rule in SYNTHETIC} <= set(GUESS_RULES)


def test_guess_reaches_the_view_when_the_classifier_cannot_run(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_BUNDLED_MODELS", "0")  # no study classifier card: the rules are the fallback
    monkeypatch.setenv("DXAGENT_MODELS", str(tmp_path / "empty"))
    Image.fromarray(fundus()).save(tmp_path / "eye.png")
    (view,) = load_views([str(tmp_path / "eye.png")], store)
    assert (view.modality, view.modality_source) == ("OP", "guess")
    assert "no usable study_cnn model card" in view.metadata["study_error"]
    assert view.metadata["modality_confidence"] == GUESS_RULES["fundus"][1]
    (view,) = load_views([str(tmp_path / "eye.png")], store, modality="dermoscopy")  # the user's word wins
    assert (view.modality, view.modality_source) == ("XC", "user")


BUNDLED = [  # real images shipped with pydicom / scikit-image (not realcases, not used to pick thresholds)
    (Path(pydicom.__file__).parent / "data/test_files/examples_ybr_color.dcm", "US"),  # echo sector on black
    (Path(pydicom.__file__).parent / "data/test_files/examples_overlay.dcm", "MR"),  # abdomen MR on black
    (Path(skimage.__file__).parent / "data/retina.jpg", "OP"),  # fundus photograph
]


@pytest.mark.parametrize(("path", "code"), BUNDLED, ids=[p.name for p, _ in BUNDLED])
def test_bundled_real_images_from_pixels_alone(path, code):
    if not path.exists():
        pytest.skip(f"{path.name} is not bundled with this version")
    ld = load_file(path)  # the DICOM tag would win in practice; here only the pixels are judged
    assert guess_modality(ld.arr, ld.rgb)[0] == code


@pytest.mark.realcases
def test_realcases_accuracy_and_honest_confidence(realcases):
    rows = []
    for line in (realcases / "cases.jsonl").read_text().splitlines():
        if line.strip():
            case = json.loads(line)
            ld = load_file(realcases / case["image"])
            code, conf = guess_modality(ld.arr, ld.rgb)
            rows.append((normalise_modality(case["modality"]), code, conf, _guess_modality_rule(ld.arr, ld.rgb)))
    assert len(rows) >= 500
    accuracy = sum(true == code for true, code, _, _ in rows) / len(rows)
    assert accuracy >= REALCASES_ACCURACY_FLOOR, f"accuracy {accuracy:.3f}"
    fired, right = Counter(code for _, code, _, _ in rows), Counter(code for true, code, _, _ in rows if true == code)
    precision = {code: right[code] / fired[code] for code in fired}
    for true, code, conf, rule in rows:
        if code not in (true, "OT"):  # a wrong guess is never more confident than its code's precision
            assert conf <= precision[code], (true, code, conf, rule, precision[code])
    by_rule = defaultdict(list)
    for true, code, _, rule in rows:
        by_rule[rule].append(true == code)
    for rule, hits in by_rule.items():
        code, conf = GUESS_RULES[rule]
        if code != "OT":  # each rule's stated confidence is at most its measured precision
            assert conf <= sum(hits) / len(hits), (rule, conf, sum(hits), len(hits))
