"""xrv_classify: a TorchXRayVision DenseNet chest X-ray classifier from the user's model store.

Adapter for model cards with `adapter: torchxrayvision` (agent/models.py; `dxagent models add CARD.yaml`). The
card names the weights (a state_dict file; its sha256 is checked before every load), the labels in the order of
the network's outputs, and optionally `input: {resolution: 224}` (and `block_config`, `growth_rate`,
`num_init_features` for a DenseNet other than the default DenseNet-121). Nothing is downloaded: the network is built
from torchxrayvision's DenseNet class with `weights=None` and the card's weights are loaded into it.

Method (TorchXRayVision's own preprocessing): the radiograph's gray values to 8 bits (0.5th-99.5th percentile),
`xrv.datasets.normalize(img, 255)` to [-1024, 1024], centre crop to a square, resize to the card's resolution
(default 224), one channel; the network's logits through a sigmoid. Every label's probability is kept: no
threshold turns them into yes/no, so the report shows probabilities, not diagnoses.

Loading is lazy, once per process per (weights, sha256), thread-safe; CUDA when present, else CPU.

Limitations: only as good as the user's weights and their card; frontal radiographs only; probabilities of a
model trained elsewhere are not calibrated for this data. Validation: the card's own figures (shown by
`dxagent models list`); the adapter itself is tested on saved random-initialised weights (tests/test_xrv_classify.py).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.models import ModelCard, ModelStore, ModelStoreError
from agent.state import ImageView
from tools.base import FindingDraft, Tool, ToolContext, ToolError, ToolInput
from tools.imaging import to_uint8

ADAPTER = "torchxrayvision"
_LOCK = threading.Lock()
_NETS: dict[tuple[str, str], Any] = {}  # (weights path, sha256) -> network


def xrv_cards(store: ModelStore | None = None) -> list[ModelCard]:
    """Usable cards (weights present, sha256 right) for this adapter."""
    return [c for c in (store or ModelStore()).usable() if c.adapter == ADAPTER and c.kind == "classify"]


def load_network(card: ModelCard, store: ModelStore | None = None) -> Any:
    """The card's DenseNet in eval mode, loaded once; ToolError naming the card when it cannot be."""
    try:
        path = (store or ModelStore()).load_weights_path(card)
    except ModelStoreError as exc:
        raise ToolError(str(exc)) from None
    key = (str(path), card.sha256)
    with _LOCK:
        if (net := _NETS.get(key)) is not None:
            return net
        try:
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import torchxrayvision as xrv
        except ImportError as exc:
            raise ToolError(f"model card {card.name!r} needs torch and torchxrayvision ({exc})") from None
        arch = {k: (tuple(v) if isinstance(v, list) else v) for k, v in card.input.items()
                if k in ("growth_rate", "block_config", "num_init_features")}  # default: DenseNet-121
        net = xrv.models.DenseNet(weights=None, num_classes=len(card.labels), in_channels=1, **arch)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except Exception as exc:  # wrong architecture, label count or file format
            msg = " ".join(str(exc).split())[:200]
            raise ToolError(f"model card {card.name!r}: weights do not fit a {len(card.labels)}-label DenseNet: {msg}") from None
        net.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        _NETS[key] = net
        return net


def preprocess(img: np.ndarray, resolution: int) -> np.ndarray:
    """A 2D radiograph to TorchXRayVision's (1, 1, R, R) float32 input in [-1024, 1024]."""
    import torchxrayvision as xrv
    from skimage.transform import resize

    lo, hi = (float(v) for v in np.percentile(img, [0.5, 99.5]))
    x = xrv.datasets.normalize(to_uint8(img, lo, hi).astype(np.float32), 255)
    h, w = x.shape
    s = min(h, w)
    x = x[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    x = resize(x, (resolution, resolution), order=1, anti_aliasing=True, preserve_range=True)
    return x[None, None].astype(np.float32)


class XrvInput(ToolInput):
    model: str | None = Field(None, description="model card name (default: the first TorchXRayVision card in the store)")


class XrvOutput(BaseModel):
    model: str
    model_version: str
    weights_sha256: str
    probabilities: dict[str, float]  # every label of the card, in its order; no threshold applied
    top: list[str]  # labels by probability, highest first (at most five)
    resolution: int
    device: str
    note: str = "probabilities from the user's model; not calibrated for this image source; no yes/no threshold"


class XrvClassify(Tool):
    name = "xrv_classify"
    description = ("Chest X-ray classifier (TorchXRayVision DenseNet from your model store): the probability of every "
                   "label the model card lists; no yes/no threshold.")
    kind = "classify"
    modalities = frozenset({"DX", "CR"})
    dims = frozenset({2})
    topics = ("pneumonia", "effusion", "cardiomegaly", "consolidation", "atelectasis", "edema", "pneumothorax",
              "nodule", "mass", "opacity", "covid", "finding", "abnormal", "classify", "probability", "disease")
    timeout_s = 120.0
    limitations = ("Only as good as the user's weights and card; frontal radiographs; probabilities are not calibrated "
                   "for other sources.")
    validation = "the model card's own figures (dxagent models list)"
    Input = XrvInput
    Output = XrvOutput

    def applicable(self, view: ImageView) -> str | None:
        if (reason := super().applicable(view)) is not None:
            return reason
        return None if xrv_cards() else ("no TorchXRayVision classifier in the model store: add one with "
                                         "`dxagent models add CARD.yaml` (adapter: torchxrayvision, kind: classify)")

    def run(self, ctx: ToolContext, inp: XrvInput) -> XrvOutput:
        view = ctx.view(inp.view)
        if (reason := super().applicable(view)) is not None:
            raise ToolError(reason)
        store = ModelStore()
        cards = xrv_cards(store)
        if inp.model is not None:
            cards = [c for c in cards if c.name == inp.model]
            if not cards:
                raise ToolError(f"no usable TorchXRayVision card named {inp.model!r} in {store.dir}")
        if not cards:
            raise ToolError(self.applicable(view) or "no TorchXRayVision card")
        card = cards[0]
        net = load_network(card, store)
        resolution = int(card.input.get("resolution", 224))
        import torch

        x = preprocess(ctx.pixels(inp.view), resolution)
        dev = next(net.parameters()).device
        with torch.inference_mode():
            logits = net(torch.from_numpy(x).to(dev))
        probs = torch.sigmoid(logits)[0].float().cpu().numpy()
        probabilities = {label: round(float(p), 4) for label, p in zip(card.labels, probs, strict=True)}
        top = sorted(probabilities, key=lambda k: -probabilities[k])[:5]
        return XrvOutput(model=card.name, model_version=card.version, weights_sha256=card.sha256,
                         probabilities=probabilities, top=top, resolution=resolution, device=str(dev))

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, XrvOutput)
        return [FindingDraft(label=label, present=None, probability=output.probabilities[label],
                             note=f"{output.model} probability (no threshold)") for label in output.top[:3]]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, XrvOutput)
        top = ", ".join(f"{k} {output.probabilities[k]:.2f}" for k in output.top[:3])
        return f"{output.model}: {top} (probabilities, no threshold; {len(output.probabilities)} labels)"
