"""The shared base of the learned tools (agent/analysis/learned.py): one load per model even under concurrent calls, the
card checks before loading, and why a card does not fit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers import bare_view as view
from makers import write_card

from agent.analysis.learned import LearnedTool, modality_fits
from agent.core.tool import ToolError
from agent.store.models import ModelStore
from tools.xrv_classify import XrvOutput


class Counting(LearnedTool):
    name = "counting_test_tool"
    description = "test"
    adapter = "counting"
    card_kinds = frozenset({"classify"})
    dims = frozenset({2})
    Output = XrvOutput
    builds = 0

    def build(self, card, path: Path):
        time.sleep(0.3)  # long enough for the other threads to arrive while it loads
        type(self).builds += 1
        return {"weights": path.read_bytes()}

    def card_fits(self, card, view):
        return None if card.input.get("fits", True) else "the card says it does not fit"

    def run(self, ctx, inp):  # pragma: no cover - not run here
        raise AssertionError


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("DXAGENT_MODELS", str(tmp_path / "store"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights")
    s = ModelStore()
    s.add(write_card(src, "w.bin", name="counter", kind="classify", adapter="counting", modalities=["CR"], labels=["a"]))
    return s


def test_concurrent_calls_build_the_model_once(store):
    tool = Counting()
    card = store.get("counter")
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(tool.load(card))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counting.builds == 1 and len(got) == 6 and all(g is got[0] for g in got)
    assert tool.load(card) is got[0]  # later calls: the same object, no rebuild


def test_why_a_card_does_not_fit_and_modality_families(store, tmp_path):
    tool = Counting()
    dx = view("DX")
    assert tool.applicable(dx) is None  # a CR card fits a DX radiograph: one family
    assert modality_fits(store.get("counter"), "CR") and not modality_fits(store.get("counter"), "CT")
    assert tool.applicable(view("CT")).startswith("no counting model card for CT (classify)")
    assert tool.pick(dx, None).name == "counter"
    with pytest.raises(ToolError, match="is for CR, not CT"):
        tool.pick(view("CT"), "counter")
    # the weights change: not offered, and the reason names the card and what is wrong
    card = store.get("counter")
    card.weights_path.write_bytes(b"tampered")
    reason = tool.applicable(dx)
    assert "counter: sha256 mismatch" in reason
    with pytest.raises(ToolError, match="model card 'counter': sha256 mismatch"):
        tool.pick(dx, "counter")
