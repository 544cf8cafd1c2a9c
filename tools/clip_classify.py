"""clip_classify: zero-shot classification with a CLIP- or SigLIP-family model from the user's model store.

Adapter for model cards with `adapter: clip` (agent/store/models.py; `dxagent models add CARD.yaml`). The card's `weights`
is a local transformers model directory (config.json, the weights, the tokenizer files, preprocessor_config.json, as
`save_pretrained` writes them; its sha256 is the store's tree digest, checked before every load), its `labels` are
the classes, and `input: {template: "a chest radiograph showing {label}"}` optionally sets the text prompt (default
"a medical image of {label}"). Nothing is downloaded: AutoModel, AutoTokenizer and AutoImageProcessor read the
directory with `local_files_only=True`, and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set (agent/analysis/learned.py).

Method: one prompt per label, `template.format(label=...)`, through the tokenizer and the text tower (the text
embeddings are cached per loaded model and prompt list); the picture (2D only): a gray image to 8 bits between its
0.5th and 99.5th percentiles and repeated to three channels, an RGB image as is, then the model's own image
processor (resize, crop, normalisation) and the image tower. Both embeddings are L2-normalised and compared by
cosine. Probabilities follow the family's training objective:

* CLIP family (no `logit_bias`): softmax over the card's labels of logit_scale·cosine, so they sum to 1 and
  only rank the labels given (an image of none of them still gets a distribution over them);
* SigLIP family (the model has `logit_bias`): an independent sigmoid per label of logit_scale·cosine + logit_bias,
  so several labels (or none) may be likely.

Every label's probability is kept: no threshold turns them into yes/no. `embed_images(card, images)` gives the
same image embeddings to the case library (`dxagent library build --encoder CARD_NAME`, agent/index/library.py), for
cards of kind `embed` or `classify` with adapter `clip`.

Loading (agent/analysis/learned.py): lazy, once per process per (weights, sha256), thread-safe; CUDA when present, else CPU.

Limitations: zero-shot labels are only as good as the model's pretraining and the prompt wording; general-domain
CLIP models know little radiology; probabilities are not calibrated for this data; 3D volumes are not taken (run it
on a slice view). Validation: the card's own figures (`dxagent models list`); the adapter is tested on tiny CLIP and
SigLIP models trained by tests/makers/clip.py on synthetic textures (tests/test_clip_classify.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from agent.analysis.clip import ADAPTER, DEFAULT_TEMPLATE, REQUIRES, ClipModel, build_clip, prompts, to_rgb8
from agent.analysis.display import is_rgb
from agent.analysis.learned import LearnedInput, LearnedTool, ModelUsed, model_used
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, ToolContext
from agent.store.models import ModelCard


class ClipOutput(BaseModel):
    model: str
    model_version: str
    weights_sha256: str
    family: Literal["clip", "siglip"]
    scoring: str  # how the probabilities were made from the cosines
    template: str
    probabilities: dict[str, float]  # every label of the card, in its order; no threshold applied
    cosine: dict[str, float]  # image-prompt cosine similarity per label
    top: list[str]  # labels by probability, highest first (at most five)
    image: str  # how the pixels were mapped to the model's RGB input
    device: str
    model_card: ModelUsed
    note: str = ("zero-shot probabilities from the user's model and the card's prompt; not calibrated for this image "
                 "source; no yes/no threshold")


SCORING = {"clip": "softmax over the card's labels of logit_scale*cosine (sums to 1)",
           "siglip": "independent sigmoid per label of logit_scale*cosine + logit_bias"}


class ClipClassify(LearnedTool):
    name = "clip_classify"
    description = ("Zero-shot image classifier (a CLIP/SigLIP model from your model store): the probability of every "
                   "label its model card lists, from image-text similarity; no yes/no threshold.")
    kind = "classify"
    adapter = ADAPTER
    card_kinds = frozenset({"classify"})
    requires = REQUIRES
    dims = frozenset({2})
    topics = ("classify", "classification", "probability", "category", "zero-shot", "diagnosis", "benign", "malignant",
              "normal", "abnormal", "finding", "disease")
    timeout_s = 120.0
    limitations = ("Zero-shot: only as good as the user's model, its pretraining and the prompt wording; probabilities "
                   "are not calibrated; 2D pictures only.")
    validation = "the model card's own figures (dxagent models list)"
    Input = LearnedInput
    Output = ClipOutput

    def card_fits(self, card: ModelCard, view: ImageView) -> str | None:
        return None if card.labels else "the card lists no labels to classify into"

    def build(self, card: ModelCard, path: Path) -> Any:
        return build_clip(path)

    def run(self, ctx: ToolContext, inp: LearnedInput) -> ClipOutput:
        view = self.usable_view(ctx, inp.view)
        card = self.pick(view, inp.model)
        texts = prompts(card)
        cm: ClipModel = self.load(card)
        picture, how = to_rgb8(ctx.pixels(inp.view), is_rgb(view))
        probs, cos = cm.probabilities(cm.image_embeddings([picture]), cm.text_embeddings(texts))
        p, c = probs[0].cpu().numpy(), cos[0].cpu().numpy()
        probabilities = {label: round(float(x), 4) for label, x in zip(card.labels, p, strict=True)}
        top = [card.labels[i] for i in np.argsort(-p, kind="stable")[:5]]
        return ClipOutput(model=card.name, model_version=card.version, weights_sha256=card.sha256, family=cm.family,
                          scoring=SCORING[cm.family], template=str(card.input.get("template") or DEFAULT_TEMPLATE),
                          probabilities=probabilities,
                          cosine={label: round(float(x), 4) for label, x in zip(card.labels, c, strict=True)},
                          top=top, image=how, device=cm.device, model_card=model_used(card))

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, ClipOutput)
        rule = "softmax over the labels" if output.family == "clip" else "sigmoid per label"
        return [FindingDraft(label=label, present=None, probability=output.probabilities[label],
                             note=f"{output.model} zero-shot probability ({rule}, no threshold)")
                for label in output.top[:3]]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, ClipOutput)
        top = ", ".join(f"{k} {output.probabilities[k]:.2f}" for k in output.top[:3])
        rule = "softmax" if output.family == "clip" else "sigmoid"
        return f"{output.model} zero-shot: {top} ({rule} over {len(output.probabilities)} labels, no threshold)"
