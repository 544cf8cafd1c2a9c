"""The TorchXRayVision adapter on weights the test makes: a random-initialised DenseNet saved, carded, added to a
model store, loaded by the tool and run on a radiograph; the sha256 and missing-card paths."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from agent.core.state import CaseInput, CaseState
from agent.core.tool import ToolContext, ToolError
from agent.engine.registry import discover
from agent.imaging.views import load_views
from agent.store.models import ModelStore

torchxrayvision = pytest.importorskip("torchxrayvision")
LABELS = ["Cardiomegaly", "Effusion", "Pneumonia"]


@pytest.fixture
def model_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_MODELS", str(tmp_path / "models"))
    torch.manual_seed(0)
    net = torchxrayvision.models.DenseNet(weights=None, num_classes=len(LABELS), in_channels=1,
                                          block_config=(2, 2, 2, 2))  # small, same class and loading path
    src = tmp_path / "src"
    src.mkdir()
    torch.save(net.state_dict(), src / "xrv_tiny.pt")
    card = {"name": "xrv_tiny", "kind": "classify", "adapter": "torchxrayvision", "modalities": ["DX", "CR"],
            "labels": LABELS, "input": {"resolution": 64, "block_config": [2, 2, 2, 2]}, "weights": "xrv_tiny.pt",
            "sha256": hashlib.sha256((src / "xrv_tiny.pt").read_bytes()).hexdigest(), "license": "test",
            "intended_use": "tests", "version": "0"}
    (src / "card.yaml").write_text(yaml.safe_dump(card))
    store = ModelStore()
    return store, store.add(src / "card.yaml")


def radiograph_state(tmp_path, store_dir):
    from agent.store.artifacts import ArtifactStore

    rng = np.random.default_rng(1)
    img = (rng.normal(120, 30, (96, 80))).clip(0, 255).astype(np.uint8)
    path = tmp_path / "cxr.png"
    Image.fromarray(img).save(path)
    store = ArtifactStore(store_dir)
    return CaseState(inputs=CaseInput(paths=[str(path)]), views=load_views([str(path)], store, modality="DX")), store


def test_every_label_probability_from_the_users_weights(tmp_path, model_store):
    store, card = model_store
    tool = discover()["xrv_classify"]
    state, art = radiograph_state(tmp_path, tmp_path / "art")
    assert tool.applicable(state.views[0]) is None
    out = tool.run(ToolContext(state=state, store=art), tool.Input())
    assert out.model == "xrv_tiny" and out.weights_sha256 == card.sha256 and out.resolution == 64
    assert list(out.probabilities) == LABELS  # every label kept, in the card's order
    # the same numbers as running the saved network by hand on the same input: no threshold, no reordering
    from tools.xrv_classify import preprocess

    x = preprocess(art.get_array(state.views[0].pixels), 64)
    assert x.shape == (1, 1, 64, 64) and -1024.5 <= x.min() and x.max() <= 1024.5
    with torch.inference_mode():
        ref = torch.sigmoid(tool.load(card)(torch.from_numpy(x)))[0].numpy()
    assert out.model_card.name == "xrv_tiny" and out.model_card.sha256 == card.sha256 and out.model_card.license == "test"
    assert np.allclose([out.probabilities[k] for k in LABELS], ref, atol=1e-4)
    assert out.top[0] == LABELS[int(np.argmax(ref))]
    findings = tool.findings(out, state.views[0])
    assert [f.present for f in findings] == [None] * 3 and all(f.probability is not None for f in findings)


def test_tampered_weights_and_missing_cards(tmp_path, model_store):
    store, card = model_store
    tool = discover()["xrv_classify"]
    state, art = radiograph_state(tmp_path, tmp_path / "art")
    with pytest.raises(ToolError, match="no usable torchxrayvision model card named 'nope'"):
        tool.run(ToolContext(state=state, store=art), tool.Input(model="nope"))
    w = card.weights_path
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))  # one byte changed, same size (and maybe the same mtime tick)
    # loading rehashes the file whatever the cache says (this card was loaded before in this process under its
    # old bytes' key, which does not matter: the weights path is rehashed first), and refuses it naming the card
    with pytest.raises(ToolError, match="model card 'xrv_tiny'.*sha256"):
        tool.load(card)
    # the card no longer verifies: the tool is not offered, and says why
    assert "no torchxrayvision model card for DX" in tool.applicable(state.views[0])


def test_not_offered_for_other_modalities_or_without_a_card(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_MODELS", str(tmp_path / "empty"))
    tool = discover()["xrv_classify"]
    state, _ = radiograph_state(tmp_path, tmp_path / "art")
    assert "no torchxrayvision model card for DX (classify) in the model store" in tool.applicable(state.views[0])
    ct = state.views[0].model_copy(update={"modality": "CT"})
    assert "is for CR/DX, not CT" in tool.applicable(ct)
