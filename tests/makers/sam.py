"""A small random-initialised segment-anything model (the real Sam class, a narrow 2-block ViT encoder), saved as a
state_dict checkpoint the way Meta's sam_vit_*.pth and MedSAM's medsam_vit_b.pth come, with its card."""

from __future__ import annotations

from pathlib import Path

from makers import write_card

ENCODER = {"embed_dim": 48, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}


def build(seed: int = 0):
    import torch
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(seed)
    return _build_sam(encoder_embed_dim=ENCODER["embed_dim"], encoder_depth=ENCODER["depth"],
                      encoder_num_heads=ENCODER["num_heads"], encoder_global_attn_indexes=ENCODER["global_attn_indexes"],
                      checkpoint=None).eval()


def make(folder: Path, name: str = "sam_tiny", preprocess: str = "sam", seed: int = 0, modalities=("any",)) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build(seed).state_dict(), folder / f"{name}.pth")
    return write_card(folder, f"{name}.pth", name=name, kind="segment", adapter="sam", modalities=list(modalities),
                      labels=["object"], input={"encoder": ENCODER, "preprocess": preprocess},
                      validation="random-initialised: exercises the adapter only")
