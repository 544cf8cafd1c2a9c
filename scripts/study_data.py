"""The labelled images the study classifier is trained, calibrated and tested on (scripts/train_study_classifier.py
says where each label comes from), with the fixed hash splits: shared by the training script, bench/bench_study_classify.py
and tests/test_study_classify.py so that every figure uses the same held-out images. Data stays in ../shared/data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SLAKE = DATA / "slake_dev"
REAL = DATA / "realcases"
SEED = 14
REAL_MODALITY = {"CXR": "DX", "CT": "CT", "MRI": "MR", "ultrasound": "US", "dermoscopy": "XC", "fundus": "OP",
                 "endoscopy": "ES", "pathology": "SM"}
SLAKE_MODALITY = {"CT": "CT", "MRI": "MR", "X-Ray": "DX"}
SLAKE_REGION = {"Abdomen": "abdomen", "Lung": "chest", "Chest_lung": "chest", "Chest_heart": "chest",
                "Chest_mediastinal": "chest", "Brain": "head", "Brain_Tissue": "head", "Brain_Face": "head",
                "Neck": "neck", "Pelvic Cavity": "pelvis"}
# brain_tumor_mri in cases.jsonl order, by eye (a = axial, c = coronal, s = sagittal)
BRAIN_PLANES = ("aaaaaccaaacc" "ccsssssssaaa" "accaaaacsccs" "saaaaaaaaaaa" "aaaaacaaassa" "ssaaacaaccss")
PLANE_WORD = {"a": "axial", "c": "coronal", "s": "sagittal"}


def bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100


def slake_items(split: str) -> list[dict]:
    rows = [json.loads(line) for line in (SLAKE / f"{split}.jsonl").open()]
    by_img: dict[str, dict] = {}
    for r in rows:
        it = by_img.setdefault(r["image"], {"id": f"slake:{r['image']}", "path": SLAKE / r["image"],
                                            "modality": SLAKE_MODALITY[r["modality"]],
                                            "region": SLAKE_REGION.get(r["location"]), "plane": None,
                                            "source": "slake"})
        if r["content_type"] == "Plane":
            a = r["answer"].lower()
            if "transverse" in a:
                it["plane"] = "axial"
            elif "coronal" in a:
                it["plane"] = "coronal"
            elif "sagittal" in a:
                it["plane"] = "sagittal"
    for it in by_img.values():
        if it["modality"] == "DX":
            it["plane"] = "frontal"
        it["split"] = "test" if split == "validate" else ("calib" if bucket(it["id"]) < 15 else "fit")
    return list(by_img.values())


def real_items() -> list[dict]:
    out = []
    brain = 0
    for line in (REAL / "cases.jsonl").open():
        r = json.loads(line)
        mod = REAL_MODALITY[r["modality"]]
        view = str(r.get("view") or "")
        plane = region = None
        if mod == "DX":
            region = "chest"
            plane = "lateral" if view.strip().upper() == "L" else ("frontal" if view.upper().startswith(("PA", "AP"))
                                                                   else None)
        elif mod == "CT":
            region, plane = "chest", "axial"
        elif mod == "US":
            region = "chest"
        elif mod == "MR":
            region, plane = "head", PLANE_WORD[BRAIN_PLANES[brain]]
            brain += 1
        b = bucket(r["case_id"])
        out.append({"id": f"real:{r['case_id']}", "path": REAL / r["image"], "modality": mod, "region": region,
                    "plane": plane, "source": r["source"], "split": "test" if b < 30 else ("calib" if b < 45 else "fit")})
    assert brain == len(BRAIN_PLANES), (brain, len(BRAIN_PLANES))
    return out


def other_items(rng: np.random.Generator) -> list[dict]:
    """Non-medical pictures (scikit-image's and scikit-learn's bundled photographs, faces) and seeded synthetic ones,
    all OT."""
    import skimage.data as d
    from PIL import Image, ImageDraw

    pics: list[tuple[str, np.ndarray]] = []
    for name in ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
                 "gravel", "horse", "hubble_deep_field", "logo", "moon", "page", "rocket", "text", "checkerboard"):
        pics.append((name, np.asarray(getattr(d, name)())))
    left, right, _ = d.stereo_motorcycle()
    pics += [("motorcycle_left", left), ("motorcycle_right", right)]
    try:  # scikit-learn (a sentence-transformers dependency) ships two photographs (BSD-3)
        from sklearn.datasets import load_sample_images

        pics += [(f"sklearn{i}", im) for i, im in enumerate(load_sample_images().images)]
    except ImportError:
        pass
    faces = d.lfw_subset()
    pics += [(f"face{i}", (faces[i] * 255).astype(np.uint8)) for i in range(0, 200, 4)]
    for i in range(40):  # synthetic: noise, gradients, shapes, text, flat colour
        kind = i % 5
        h, w = int(rng.integers(96, 400)), int(rng.integers(96, 400))
        if kind == 0:
            a = rng.integers(0, 256, (h, w, 3) if i % 2 else (h, w), dtype=np.uint8)
        elif kind == 1:
            g = np.linspace(0, 255, w, dtype=np.float32)[None, :] * np.linspace(0.2, 1, h, dtype=np.float32)[:, None]
            a = np.stack([g, g[::-1], np.full_like(g, rng.integers(0, 256))], -1).astype(np.uint8)
        else:
            im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
            dr = ImageDraw.Draw(im)
            for _ in range(int(rng.integers(3, 12))):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                box = [x0, y0, x0 + int(rng.integers(5, w)), y0 + int(rng.integers(5, h))]
                col = tuple(int(v) for v in rng.integers(0, 256, 3))
                if kind == 2:
                    dr.ellipse(box, fill=col)
                elif kind == 3:
                    dr.text((x0, y0), "dxagent report 12 mm", fill=col)
                else:
                    dr.rectangle(box, fill=col)
            a = np.asarray(im)
        pics.append((f"synthetic{i}", a))
    out = []
    for name, a in pics:
        if a.ndim == 3 and a.shape[-1] == 4:
            a = a[..., :3]
        synthetic = name.startswith("synthetic")
        split = "fit" if synthetic else ("test" if bucket(name) < 30 else ("calib" if bucket(name) < 45 else "fit"))
        variants = [(name, a)]
        if split == "fit" and not synthetic and not name.startswith("face"):
            # a handful of photographs is all there is: their gray versions and random crops too (fit split only)
            if a.ndim == 3:
                variants.append((f"{name}_gray", a.mean(-1).astype(np.uint8)))
            h, w = a.shape[:2]
            for j in range(4):
                ch, cw = int(h * rng.uniform(0.3, 0.7)), int(w * rng.uniform(0.3, 0.7))
                r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                variants.append((f"{name}_crop{j}", a[r0:r0 + ch, c0:c0 + cw]))
        for vname, v in variants:
            out.append({"id": f"other:{vname}", "array": v, "rgb": v.ndim == 3, "modality": "OT", "region": None,
                        "plane": None, "source": "synthetic" if synthetic else "skimage", "split": split})
    return out


def available() -> bool:
    return (SLAKE / "train.jsonl").is_file() and (REAL / "cases.jsonl").is_file()
