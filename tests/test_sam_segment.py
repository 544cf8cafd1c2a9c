"""The segment-anything adapter on a small random-initialised SAM the test builds and saves: box, point and
detector-box prompts give the same masks as segment-anything's own SamPredictor (or MedSAM's recipe); the image
embedding is cached per picture; bad, tampered and missing weights are refused naming the card."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("segment_anything")
import torch  # noqa: E402
from helpers import make_ctx  # noqa: E402
from makers import sam as sam_maker  # noqa: E402

from agent.core.state import Evidence  # noqa: E402
from agent.core.tool import ToolError  # noqa: E402
from agent.engine.registry import discover  # noqa: E402
from agent.store.models import ModelStore  # noqa: E402
from tools import sam_segment  # noqa: E402


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    src = tmp_path_factory.mktemp("sam-src")
    return {"sam": sam_maker.make(src / "sam"), "medsam": sam_maker.make(src / "medsam", name="medsam_tiny",
                                                                         preprocess="medsam", seed=1)}


@pytest.fixture
def models(tmp_path, monkeypatch, cards):
    monkeypatch.setenv("DXAGENT_MODELS", str(tmp_path / "models"))
    store = ModelStore()
    return store, {k: store.add(v) for k, v in cards.items()}


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(3)
    img = (rng.random((120, 90, 3)) * 60).astype(np.uint8)
    img[30:70, 25:60] += 150  # one bright object
    path = tmp_path / "photo.png"
    Image.fromarray(img).save(path)
    return path, img


def tool():
    return discover()["sam_segment"]


def predictor_masks(card_name: str, store: ModelStore, img: np.ndarray, **kw):
    from segment_anything import SamPredictor

    net = tool().load(store.get(card_name))
    p = SamPredictor(net)
    p.set_image(img)
    masks, scores, _ = p.predict(**kw)
    return masks, scores


def test_box_and_point_prompts_match_segment_anythings_predictor(tmp_path, models, photo):
    store, _ = models
    path, img = photo
    ctx = make_ctx(_art(tmp_path), path)
    t = tool()
    assert t.applicable(ctx.state.views[0]) is None
    out = t.run(ctx, t.Input(bbox=[30, 25, 70, 60], model="sam_tiny"))
    ref, ref_iou = predictor_masks("sam_tiny", store, img, box=np.array([25, 30, 59, 69]), multimask_output=False)
    label = ctx.store.get_array(ctx.artifacts[-1])
    assert label.shape == img.shape[:2]
    np.testing.assert_array_equal(label == 1, ref[0])
    [o] = out.objects
    assert o.pixels == int(ref[0].sum()) and o.predicted_iou == pytest.approx(min(1, max(0, float(ref_iou[0]))), abs=1e-4)
    assert out.model_card.name == "sam_tiny" and out.model_card.sha256 == store.get("sam_tiny").sha256
    assert out.preprocess == "sam" and out.area_unit == "px2"
    # points: segment-anything's three candidates, the best kept
    ctx2 = make_ctx(_art(tmp_path), path)
    out2 = t.run(ctx2, t.Input(points=[[50, 40], [5, 5]], point_labels=[1, 0], model="sam_tiny"))
    refs, scores = predictor_masks("sam_tiny", store, img, point_coords=np.array([[40.0, 50.0], [5.0, 5.0]]),
                                   point_labels=np.array([1, 0]), multimask_output=True)
    best = refs[int(np.argmax(scores))]
    np.testing.assert_array_equal(ctx2.store.get_array(ctx2.artifacts[-1]) == 1, best)
    assert out2.objects[0].prompt.startswith("points")


def test_detector_boxes_prompt_sam_and_the_embedding_is_cached(tmp_path, models, photo):
    store, _ = models
    path, img = photo
    ctx = make_ctx(_art(tmp_path), path)
    det = {"detections": [{"label": "blob", "confidence": 0.4, "bbox": [5, 5, 25, 30]},
                          {"label": "lesion", "confidence": 0.9, "bbox": [30, 25, 70, 60]}]}
    ctx.state.evidence.append(Evidence(id="E1", tool="yolo_detect", tool_version="1", args={}, status="ok", output=det))
    ctx.state.evidence.append(Evidence(id="E2", tool="yolo_detect", tool_version="1", args={}, status="failed",
                                       error="boom"))
    t = tool()
    before = sam_segment.encoder_calls
    out = t.run(ctx, t.Input(boxes_from="E1", model="sam_tiny"))
    # best first: the 0.9 lesion box is object 1, with the detector's label and score carried over
    assert [o.source_label for o in out.objects] == ["lesion", "blob"][: len(out.objects)]
    assert out.objects[0].source_score == 0.9 and out.objects[0].prompt == "box [30, 25, 70, 60]"
    # the same picture again with another prompt: no second encoder pass
    out2 = t.run(ctx, t.Input(bbox=[5, 5, 25, 30], model="sam_tiny"))
    assert out2.embedding_cached and sam_segment.encoder_calls - before <= 1
    findings = t.findings(out, ctx.state.views[0])
    assert findings[0].label == "lesion" and findings[0].measurements[0].name == "area"
    with pytest.raises(ToolError, match="E2 .*did not succeed"):
        t.run(ctx, t.Input(boxes_from="E2", model="sam_tiny"))
    with pytest.raises(ToolError, match="no evidence 'E9'"):
        t.run(ctx, t.Input(boxes_from="E9", model="sam_tiny"))
    with pytest.raises(ValueError, match="a prompt is needed"):
        t.Input(model="sam_tiny")
    with pytest.raises(ValueError, match="boxes_from alone"):
        t.Input(boxes_from="E1", bbox=[1, 2, 3, 4])


def test_medsam_recipe(tmp_path, models, photo):
    import torch.nn.functional as F

    store, _ = models
    path, img = photo
    ctx = make_ctx(_art(tmp_path), path)
    t = tool()
    out = t.run(ctx, t.Input(bbox=[30, 25, 70, 60], model="medsam_tiny"))
    assert out.preprocess == "medsam"
    # MedSAM's inference recipe by hand: stretch to 1024², min-max to [0, 1], box scaled per axis, sigmoid > 0.5
    net = t.load(store.get("medsam_tiny"))
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(1024, 1024), mode="bicubic", antialias=True, align_corners=False)
    x = (x - x.min()) / (x.max() - x.min())
    h, w = img.shape[:2]
    box = torch.tensor([[25 * 1024 / w, 30 * 1024 / h, 59 * 1024 / w, 69 * 1024 / h]])
    with torch.inference_mode():
        emb = net.image_encoder(x)
        sparse, dense = net.prompt_encoder(points=None, boxes=box, masks=None)
        low, _ = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        ref = (torch.sigmoid(F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)) > 0.5)[0, 0].numpy()
    np.testing.assert_array_equal(ctx.store.get_array(ctx.artifacts[-1]) == 1, ref)


def test_wrong_tampered_and_missing_weights_name_the_card(tmp_path, models, photo):
    store, cards = models
    path, _ = photo
    ctx = make_ctx(_art(tmp_path), path)
    t = tool()
    # a card whose encoder does not match its checkpoint
    bad = cards["sam"].model_copy(update={"input": {"model_type": "vit_b"}})
    with pytest.raises(ToolError, match=r"model card 'sam_tiny': .*do not fit the card's SAM encoder \(768-wide"):
        t.load(bad)  # same weights, another architecture: a new cache key, so a real load attempt
    w = cards["medsam"].weights_path
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ToolError, match="model card 'medsam_tiny'.*sha256 mismatch"):
        t.run(ctx, t.Input(bbox=[30, 25, 70, 60], model="medsam_tiny"))
    cards["sam"].weights_path.unlink()
    assert "no sam model card for" in t.applicable(ctx.state.views[0])
    with pytest.raises(ToolError, match="model card 'sam_tiny'.*weights not found"):
        t.load(cards["sam"])


def _art(tmp_path):
    from agent.store.artifacts import ArtifactStore

    return ArtifactStore(tmp_path / f"art{np.random.randint(1 << 30)}")


def test_graph_chains_detector_boxes_into_sam_and_records_the_card(tmp_path, models):
    """Through the real graph (scripted planner): detect_candidates finds blobs; the critic suggests sam_segment
    boxes_from=E1; the next act step segments them; the card shows in the prompt, the trace and the report."""
    import json

    from helpers import answer, call

    from agent.engine.report import to_markdown
    from agent.engine.session import run_case
    from agent.store.models import BUNDLED_DIR
    from agent.store.trace import TraceStore

    rng = np.random.default_rng(5)
    img = rng.normal(40, 6, (160, 160)).clip(0, 255)
    yy, xx = np.mgrid[:160, :160]
    for r, c, rad in ((50, 50, 9), (110, 100, 12)):
        img[(yy - r) ** 2 + (xx - c) ** 2 <= rad * rad] = 200
    path = tmp_path / "blobs.png"
    Image.fromarray(img.astype(np.uint8)).save(path)
    res = run_case([str(path)], "Segment the nodules and measure them.", llm="scripted", modality="CT",
                   script=[call("detect_candidates"), call("sam_segment", boxes_from="E1", model="sam_tiny"), answer()],
                   trace_dir=tmp_path / "traces", route=False)  # the planner's own chain, no CT tools routed first
    st = res.state
    assert [e.tool for e in st.evidence] == ["detect_candidates", "sam_segment"], [e.error for e in st.evidence]
    assert st.evidence[1].status == "ok", st.evidence[1].error
    assert any('{"tool": "sam_segment", "args": {"boxes_from": "E1"}}' in s for s in st.critiques[0].suggestions)
    assert any(line.startswith("sam_tiny: segment") for line in st.model_lines)
    store = TraceStore(None, tmp_path / "traces")
    [intake] = [json.loads(e.payload) for e in store.events(res.run_id) if e.name == "intake"]
    bundled = {p.parent.name for p in BUNDLED_DIR.glob("*/card.yaml")}  # the project's own cards, listed too
    assert {m["name"] for m in intake["models"]} - bundled == {"sam_tiny", "medsam_tiny"}
    first_prompt = json.loads(store.events(res.run_id, "llm")[0].payload)["request"]["messages"][1]["content"]
    assert "Your models (model cards) for this case:" in first_prompt and "sam_tiny: segment" in first_prompt
    [used] = [m for m in res.report["models_used"] if m["name"] != "study_cnn_v1"]  # the intake classifier aside
    assert used["name"] == "sam_tiny" and used["evidence_ids"] == ["E2"]
    md = to_markdown(res.report)
    assert "## Models used" in md and "sam_tiny" in md
