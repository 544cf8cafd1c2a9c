"""xrv_classify: a TorchXRayVision DenseNet chest X-ray classifier from the user's model store.

Adapter for model cards with `adapter: torchxrayvision` (agent/store/models.py; `dxagent models add CARD.yaml`). The
card names the weights (a state_dict file; its sha256 is checked before every load), the labels in the order of
the network's outputs, and optionally `input: {resolution: 224}` (and `block_config`, `growth_rate`,
`num_init_features` for a DenseNet other than the default DenseNet-121). Nothing is downloaded: the network is built
from torchxrayvision's DenseNet class with `weights=None` and the card's weights are loaded into it.

Method (TorchXRayVision's own preprocessing): the radiograph's gray values to 8 bits (0.5th-99.5th percentile),
`xrv.datasets.normalize(img, 255)` to [-1024, 1024], centre crop to a square, resize to the card's resolution
(default 224), one channel; the network's logits through a sigmoid. Every label's probability is kept: no
threshold turns them into yes/no, so the report shows probabilities, not diagnoses.

Loading (agent/analysis/learned.py): lazy, once per process per (weights, sha256), thread-safe; CUDA when present, else CPU.

Limitations: only as good as the user's weights and their card; frontal radiographs only; probabilities of a
model trained elsewhere are not calibrated for this data. Validation: the card's own figures (shown by
`dxagent models list`); the adapter itself is tested on saved random-initialised weights (tests/test_xrv_classify.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from agent.analysis.display import to_uint8
from agent.analysis.learned import LearnedInput, LearnedTool, ModelUsed, model_used
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, ToolContext
from agent.store.models import ModelCard


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


class XrvOutput(BaseModel):
    model: str
    model_version: str
    weights_sha256: str
    probabilities: dict[str, float]  # every label of the card, in its order; no threshold applied
    top: list[str]  # labels by probability, highest first (at most five)
    resolution: int
    device: str
    model_card: ModelUsed
    note: str = "probabilities from the user's model; not calibrated for this image source; no yes/no threshold"


class XrvClassify(LearnedTool):
    name = "xrv_classify"
    description = ("Chest X-ray classifier (TorchXRayVision DenseNet from your model store): the probability of every "
                   "label the model card lists; no yes/no threshold.")
    kind = "classify"
    adapter = "torchxrayvision"
    card_kinds = frozenset({"classify"})
    requires = ("torch", "torchxrayvision")
    modalities = frozenset({"DX", "CR"})
    dims = frozenset({2})
    topics = ("pneumonia", "effusion", "cardiomegaly", "consolidation", "atelectasis", "edema", "pneumothorax",
              "nodule", "mass", "opacity", "covid", "finding", "abnormal", "classify", "probability", "disease")
    timeout_s = 120.0
    limitations = ("Only as good as the user's weights and card; frontal radiographs; probabilities are not calibrated "
                   "for other sources.")
    validation = "the model card's own figures (dxagent models list)"
    Input = LearnedInput
    Output = XrvOutput

    def build(self, card: ModelCard, path: Path) -> Any:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchxrayvision as xrv
        arch = {k: (tuple(v) if isinstance(v, list) else v) for k, v in card.input.items()
                if k in ("growth_rate", "block_config", "num_init_features")}  # default: DenseNet-121
        net = xrv.models.DenseNet(weights=None, num_classes=len(card.labels), in_channels=1, **arch)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except RuntimeError as exc:  # wrong architecture or label count
            msg = " ".join(str(exc).split())[:200]
            raise ValueError(f"weights do not fit a {len(card.labels)}-label DenseNet: {msg}") from None
        return net.to(_device()).eval()

    def run(self, ctx: ToolContext, inp: LearnedInput) -> XrvOutput:
        view = self.usable_view(ctx, inp.view)
        card = self.pick(view, inp.model)
        net = self.load(card)
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
                         probabilities=probabilities, top=top, resolution=resolution, device=str(dev),
                         model_card=model_used(card))

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, XrvOutput)
        return [FindingDraft(label=label, present=None, probability=output.probabilities[label],
                             note=f"{output.model} probability (no threshold)") for label in output.top[:3]]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, XrvOutput)
        top = ", ".join(f"{k} {output.probabilities[k]:.2f}" for k in output.top[:3])
        return f"{output.model}: {top} (probabilities, no threshold; {len(output.probabilities)} labels)"


def _device() -> str:
    from agent.analysis.learned import device

    return device()
