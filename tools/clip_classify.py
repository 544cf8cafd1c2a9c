"""clip_classify: zero-shot classification with a CLIP- or SigLIP-family model from the user's model store.

Adapter for model cards with `adapter: clip` (agent/models.py; `dxagent models add CARD.yaml`). The card's `weights`
is a local transformers model directory (config.json, the weights, the tokenizer files, preprocessor_config.json, as
`save_pretrained` writes them; its sha256 is the store's tree digest, checked before every load), its `labels` are
the classes, and `input: {template: "a chest radiograph showing {label}"}` optionally sets the text prompt (default
"a medical image of {label}"). Nothing is downloaded: AutoModel, AutoTokenizer and AutoImageProcessor read the
directory with `local_files_only=True`, and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set (tools/_learned.py).

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
same image embeddings to the case library (`dxagent library build --encoder CARD_NAME`, agent/library.py), for
cards of kind `embed` or `classify` with adapter `clip`.

Loading (tools/_learned.py): lazy, once per process per (weights, sha256), thread-safe; CUDA when present, else CPU.

Limitations: zero-shot labels are only as good as the model's pretraining and the prompt wording; general-domain
CLIP models know little radiology; probabilities are not calibrated for this data; 3D volumes are not taken (run it
on a slice view). Validation: the card's own figures (`dxagent models list`); the adapter is tested on tiny CLIP and
SigLIP models trained by tests/makers/clip.py on synthetic textures (tests/test_clip_classify.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from agent.models import ModelCard
from agent.state import ImageView
from tools._learned import LearnedInput, LearnedTool, ModelUsed, device, model_used
from tools.base import FindingDraft, ToolContext, ToolError
from tools.imaging import is_rgb, to_uint8

DEFAULT_TEMPLATE = "a medical image of {label}"
ADAPTER = "clip"
EMBED_KINDS = frozenset({"embed", "classify"})
_BATCH = 32  # images per forward pass in embed_images


def to_rgb8(img: np.ndarray, rgb: bool) -> tuple[np.ndarray, str]:
    """A 2D picture as (H, W, 3) uint8 for the image processor, and how the gray values were mapped."""
    if rgb:
        return np.asarray(img, dtype=np.uint8), "RGB as is"
    lo, hi = (float(v) for v in np.percentile(img, [0.5, 99.5]))
    return np.repeat(to_uint8(img, lo, hi)[..., None], 3, axis=-1), "gray 0.5-99.5 percentile to 8 bits, as RGB"


def prompts(card: ModelCard) -> list[str]:
    """The text prompt of each label, in the card's order."""
    template = str(card.input.get("template") or DEFAULT_TEMPLATE)
    if "{label}" not in template:
        raise ToolError(f"model card {card.name!r}: input.template must contain {{label}}, got {template!r}")
    return [template.replace("{label}", label) for label in card.labels]


@dataclass
class ClipModel:
    """A loaded CLIP/SigLIP model with its tokenizer and image processor."""

    model: Any
    tokenizer: Any
    processor: Any
    family: Literal["clip", "siglip"]
    device: str
    max_length: int
    text_cache: dict[tuple[str, ...], Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pixel_values(self, pictures: Sequence[np.ndarray]) -> Any:
        from PIL import Image

        batch = self.processor(images=[Image.fromarray(p) for p in pictures], return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def image_embeddings(self, pictures: Sequence[np.ndarray]) -> Any:
        """L2-normalised image embeddings (N, D) of (H, W, 3) uint8 pictures, as a float32 torch tensor."""
        import torch

        with self.lock, torch.inference_mode():
            feats = pooled(self.model.get_image_features(pixel_values=self.pixel_values(pictures)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def text_embeddings(self, texts: Sequence[str]) -> Any:
        """L2-normalised text embeddings (N, D), cached per prompt list."""
        import torch

        key = tuple(texts)
        with self.lock:
            if key in self.text_cache:
                return self.text_cache[key]
            if self.family == "siglip":  # trained on fixed-length padded text and pools the last position
                tok = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                                     return_tensors="pt")
            else:
                tok = self.tokenizer(list(texts), padding=True, max_length=self.max_length, truncation=True,
                                     return_tensors="pt")
            names = [n for n in ("input_ids", "attention_mask") if n in tok and n in self.tokenizer.model_input_names]
            with torch.inference_mode():
                feats = pooled(self.model.get_text_features(**{n: tok[n].to(self.device) for n in names}))
            emb = self.text_cache[key] = torch.nn.functional.normalize(feats.float(), dim=-1)
            return emb

    def probabilities(self, image_emb: Any, text_emb: Any) -> tuple[Any, Any]:
        """(probabilities (N, L), cosines (N, L)) by the family's rule."""
        import torch

        cos = image_emb @ text_emb.T
        scale = self.model.logit_scale.detach().float().exp().to(cos.device)
        if self.family == "siglip":
            return torch.sigmoid(cos * scale + self.model.logit_bias.detach().float().to(cos.device)), cos
        return torch.softmax(cos * scale, dim=-1), cos


def pooled(out: Any) -> Any:
    """The projected embedding: transformers 4 returns a tensor, 5 an output whose pooler_output holds it."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_clip(path: Path) -> ClipModel:
    """Load a CLIP/SigLIP-family transformers directory, offline, in eval mode on device()."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (path / "config.json").is_file():
        raise ValueError("not a transformers model directory (no config.json)")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on the CLI's stderr
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if not all(hasattr(model, a) for a in ("get_image_features", "get_text_features", "logit_scale")):
        raise ValueError(f"{type(model).__name__} is not a CLIP- or SigLIP-family model (no image/text towers and "
                         "logit_scale)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    family: Literal["clip", "siglip"] = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
    text_cfg = getattr(model.config, "text_config", None)
    max_length = int(getattr(text_cfg, "max_position_embeddings", 0) or 77)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < max_length:
        max_length = tok_max
    dev = device()
    return ClipModel(model.to(dev).eval(), tokenizer, processor, family, dev, max_length)


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
    requires = ("torch", "transformers")
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


def load_clip(card: ModelCard) -> ClipModel:
    """The loaded model of a `clip` card of kind embed or classify (weights rehashed first, built once per process);
    ToolError naming the card when it cannot be used."""
    if card.adapter != ADAPTER or card.kind not in EMBED_KINDS:
        raise ToolError(f"model card {card.name!r} is {card.adapter}/{card.kind}; image embeddings need adapter clip, "
                        "kind embed or classify")
    return ClipClassify().load(card)


def embed_with(cm: ClipModel, images: Sequence[np.ndarray], rgb: Sequence[bool] | None = None) -> np.ndarray:
    """L2-normalised float32 image embeddings (N, D) of 2D pictures with a loaded model. `rgb[i]` says whether
    picture i is RGB (default: it is when it has three dimensions); gray ones are mapped as `run` maps them."""
    flags = list(rgb) if rgb is not None else [np.asarray(x).ndim == 3 for x in images]
    pictures = [to_rgb8(np.asarray(x), f)[0] for x, f in zip(images, flags, strict=True)]
    out = [cm.image_embeddings(pictures[i:i + _BATCH]).cpu().numpy() for i in range(0, len(pictures), _BATCH)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def embed_images(card: ModelCard, images: Sequence[np.ndarray], rgb: Sequence[bool] | None = None) -> np.ndarray:
    """L2-normalised float32 image embeddings (N, D) of 2D pictures with a `clip` card's model (kind embed or
    classify); the case library's encoder (agent/library.py). ToolError naming the card when it cannot be used."""
    return embed_with(load_clip(card), images, rgb)
