"""A tiny CLIP (or SigLIP) model trained here on synthetic textures, saved as a transformers directory with a
locally built tokenizer and an image processor, and carded for the `clip` adapter (tools/clip_classify.py).

Three obvious classes of 64×64 gray pictures (`picture`): a bright disc on a dark background (random centre and
radius), stripes (random angle, period and phase) and a checkerboard (random cell size and offset), each with
random contrast and Gaussian noise. The model: a ViT vision tower (image 32, patch 8, hidden 32, 2 layers) and a
text transformer (hidden 32, 2 layers) over a word-level vocabulary of the template and label words (the
`tokenizers` library; saved as tokenizer.json through PreTrainedTokenizerFast). Training: AdamW, batches of
`groups` × (one picture per class), the family's own loss on each group's 3×3 image-prompt logits (CLIP: the
symmetric cross-entropy; SigLIP: the pairwise sigmoid loss), the pictures through the same preprocessing as the
tool (agent.analysis.clip.to_rgb8, then the saved image processor). The zero-shot accuracy on `held_out` fresh
pictures (another seed) is measured after training and written into the card's validation.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import write_card

LABELS = ["bright disc", "stripes", "checkerboard"]
TEMPLATE = "a synthetic image of {label}"
SIDE = 64  # picture side
IMAGE = 32  # model input side
_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0-3; eos id 3 (not 2: CLIP reads 2 as its legacy argmax rule)


def picture(label: str, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """A (side, side) uint8 picture of one class."""
    y, x = np.mgrid[:side, :side].astype(np.float32)
    lo, hi = rng.uniform(20, 70), rng.uniform(150, 230)
    if label == "bright disc":
        cy, cx = rng.uniform(0.3, 0.7, 2) * side
        r = rng.uniform(0.12, 0.3) * side
        f = ((y - cy) ** 2 + (x - cx) ** 2 <= r * r).astype(np.float32)
    elif label == "stripes":
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
        f = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period + rng.uniform(0, 2 * np.pi))
    elif label == "checkerboard":
        cell = int(rng.integers(8, 17))
        oy, ox = rng.integers(0, cell, 2)
        f = (((y + oy) // cell + (x + ox) // cell) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown class {label!r}")
    img = lo + (hi - lo) * f + rng.normal(0, 8, (side, side))
    return img.clip(0, 255).astype(np.uint8)


def _tokenizer(family: str):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in [TEMPLATE, *LABELS] for w in text.replace("{label}", " ").lower().split()})
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family == "clip":  # <bos> text <eos>, pooled at the first <eos>
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2),
                                                                                                   ("<eos>", 3)])
        names = ["input_ids", "attention_mask"]
    else:  # SigLIP: text <eos>, padded to max length, pooled at the last position, no attention mask
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
        names = ["input_ids"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=16, model_input_names=names)


def _model(family: str, vocab: int):
    vision = dict(image_size=IMAGE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "clip":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
        proc = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
        return CLIPModel(cfg), proc
    if family == "siglip":
        from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

        cfg = SiglipConfig(text_config={**text, "projection_size": 32}, vision_config=vision)
        proc = SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})
        return SiglipModel(cfg), proc
    raise ValueError(f"family must be clip or siglip, not {family!r}")


def _pixels(proc, pictures: list[np.ndarray]):
    from PIL import Image

    from agent.analysis.clip import to_rgb8

    return proc(images=[Image.fromarray(to_rgb8(p, False)[0]) for p in pictures], return_tensors="pt")["pixel_values"]


def _features(model, pixel_values, text):
    import torch.nn.functional as F

    from agent.analysis.clip import pooled

    img = F.normalize(pooled(model.get_image_features(pixel_values=pixel_values)), dim=-1)
    txt = F.normalize(pooled(model.get_text_features(**text)), dim=-1)
    return img, txt


def zero_shot_accuracy(model, proc, tokenizer, family: str, n_per_class: int, seed: int) -> tuple[float, float]:
    """(accuracy, mean margin of the true label's probability over the best other) on fresh pictures."""
    import torch

    rng = np.random.default_rng(seed)
    pics = [picture(label, rng) for label in LABELS for _ in range(n_per_class)]
    truth = np.repeat(np.arange(len(LABELS)), n_per_class)
    text = _text(tokenizer, family)
    with torch.inference_mode():
        img, txt = _features(model, _pixels(proc, pics), text)
        logits = img @ txt.T * model.logit_scale.exp()
        probs = torch.sigmoid(logits + model.logit_bias) if family == "siglip" else logits.softmax(-1)
    p = probs.numpy()
    true = p[np.arange(len(truth)), truth]
    others = p.copy()
    others[np.arange(len(truth)), truth] = -1
    return float((p.argmax(1) == truth).mean()), float((true - others.max(1)).mean())


def _text(tokenizer, family: str):
    texts = [TEMPLATE.replace("{label}", label) for label in LABELS]
    if family == "siglip":
        return dict(tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt", return_attention_mask=False))
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def train(model, proc, tokenizer, family: str, steps: int, groups: int = 8, seed: int = 0) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    text = _text(tokenizer, family)
    k = len(LABELS)
    target = torch.arange(k)
    model.train()
    for _ in range(steps):
        pics = [picture(label, rng) for _ in range(groups) for label in LABELS]
        img, txt = _features(model, _pixels(proc, pics), text)
        logits = (img @ txt.T).view(groups, k, k) * model.logit_scale.exp()  # [group, image, prompt]
        if family == "siglip":
            sign = 2 * torch.eye(k) - 1
            loss = -F.logsigmoid(sign * (logits + model.logit_bias)).sum(-1).mean()
        else:
            loss = (F.cross_entropy(logits.reshape(-1, k), target.repeat(groups))
                    + F.cross_entropy(logits.transpose(1, 2).reshape(-1, k), target.repeat(groups))) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make(folder: Path, family: str = "clip", train_steps: int = 150, name: str | None = None,
         kind: str = "classify", held_out: int = 20) -> Path:
    """Train and save `folder/<name>/`, write `folder/card.yaml` (adapter clip) and return its path."""
    import torch

    folder = Path(folder)
    name = name or f"tiny_{family}"
    tokenizer = _tokenizer(family)
    torch.manual_seed(0)
    model, proc = _model(family, len(tokenizer))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread than on two busy ones
    try:
        t0 = time.perf_counter()
        train(model, proc, tokenizer, family, train_steps)
        seconds = time.perf_counter() - t0
        acc, margin = zero_shot_accuracy(model, proc, tokenizer, family, held_out, seed=12345)
    finally:
        torch.set_num_threads(threads)
    out = folder / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    proc.save_pretrained(out)
    validation = {"synthetic zero-shot accuracy": round(acc, 3), "mean probability margin": round(margin, 3),
                  "held-out pictures": held_out * len(LABELS), "train steps": train_steps,
                  "train seconds": round(seconds, 1)}
    return write_card(folder, name, name=name, kind=kind, adapter="clip", modalities=["any"],
                      labels=list(LABELS) if kind == "classify" else [], input={"template": TEMPLATE},
                      validation=validation)
