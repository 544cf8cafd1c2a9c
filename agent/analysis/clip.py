"""CLIP/SigLIP-family models from the model store: loading (offline, sha256-verified, once per process), pictures to
the model's RGB input, image and text embeddings, and the family's scoring rule. Used by the clip_classify tool
(tools/clip_classify.py) and by the case index's image encoder (agent/index/library.py)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.analysis.display import to_uint8
from agent.analysis.learned import device, load_model, missing_modules
from agent.core.tool import ToolError
from agent.store.models import ModelCard

REQUIRES = ("torch", "transformers")
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


def load_clip(card: ModelCard) -> ClipModel:
    """The loaded model of a `clip` card of kind embed or classify (weights rehashed first, built once per process);
    ToolError naming the card when it cannot be used."""
    if card.adapter != ADAPTER or card.kind not in EMBED_KINDS:
        raise ToolError(f"model card {card.name!r} is {card.adapter}/{card.kind}; image embeddings need adapter clip, "
                        "kind embed or classify")
    return load_model(ADAPTER, card, lambda _card, path: build_clip(path), lambda: missing_modules(REQUIRES))


def embed_with(cm: ClipModel, images: Sequence[np.ndarray], rgb: Sequence[bool] | None = None) -> np.ndarray:
    """L2-normalised float32 image embeddings (N, D) of 2D pictures with a loaded model. `rgb[i]` says whether
    picture i is RGB (default: it is when it has three dimensions); gray ones are mapped as `run` maps them."""
    flags = list(rgb) if rgb is not None else [np.asarray(x).ndim == 3 for x in images]
    pictures = [to_rgb8(np.asarray(x), f)[0] for x, f in zip(images, flags, strict=True)]
    out = [cm.image_embeddings(pictures[i:i + _BATCH]).cpu().numpy() for i in range(0, len(pictures), _BATCH)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def embed_images(card: ModelCard, images: Sequence[np.ndarray], rgb: Sequence[bool] | None = None) -> np.ndarray:
    """L2-normalised float32 image embeddings (N, D) of 2D pictures with a `clip` card's model (kind embed or
    classify); the case library's encoder (agent/index/library.py). ToolError naming the card when it cannot be used."""
    return embed_with(load_clip(card), images, rgb)
