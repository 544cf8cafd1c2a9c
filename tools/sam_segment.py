"""sam_segment: segment-anything (SAM) or MedSAM checkpoints from the user's model store, prompted by boxes or points.

Adapter for model cards with `adapter: sam`, `kind: segment` (agent/store/models.py; `dxagent models add CARD.yaml`). The
card's weights are a segment-anything checkpoint (a state_dict .pth: Meta's sam_vit_b/l/h, or MedSAM's medsam_vit_b,
which loads the same way). The card's `input` says which:

    input: {model_type: vit_b, preprocess: sam}      # vit_b | vit_l | vit_h; preprocess sam (default) or medsam
    input: {encoder: {embed_dim: 64, depth: 2, num_heads: 2, global_attn_indexes: [1]}}   # any other ViT size

Nothing is downloaded: the network is built by the `segment-anything` package with no checkpoint and the card's
weights (sha256 checked before loading) are loaded into it, on CUDA when present, else CPU.

Prompts, in the view's pixels: `bbox` [row0, col0, row1, col1] (one object), `points` [[row, col], ...] with
`point_labels` (1 foreground, 0 background; default all 1), or `boxes_from` an evidence id: the boxes an earlier tool
found on the same view (a detector such as yolo_detect or detect_candidates, a segmenter's bbox), best first, up to
`max_objects`, segmented together in one decoder pass. So a detector's boxes prompt SAM in the next act step without
the planner copying numbers.

Method:
- the 2D picture: the view, or slice `slice_index` of a volume (default the middle); gray to 8-bit RGB (CT through a
  soft-tissue window, else the 0.5th-99.5th percentiles; agent/analysis/medsam.py `to_rgb8`); RGB as is;
- preprocess `sam` (segment-anything's SamPredictor recipe): longest side resized to 1024, the model's pixel mean/std,
  zero padding to 1024 x 1024; boxes and points scaled the same way. Preprocess `medsam` (MedSAM's inference recipe):
  the picture stretched to 1024 x 1024, min-max scaled to [0, 1], no mean/std; boxes scaled per axis;
- the image embedding is cached per (weights, picture) for the last few pictures: SAM vit_b needs ~17 s per embedding
  on a 2-core CPU, another prompt on the same picture ~0.3 s;
- box prompts: one mask per box; point prompts without a box: three candidate masks, the one with the highest
  predicted IoU kept; masks upsampled to the picture and thresholded at logit 0 (SAM) or probability 0.5 (MedSAM).

Output per object: area (mm² with known spacing, else px²), longest diameter, bbox, centroid, SAM's predicted IoU,
the prompt; a label mask (object i has value i) and an overlay. Limitations: only as good as the prompt and the
user's weights; one 2D picture at a time; SAM segments, it does not classify. Validation: the card's own figures; the
adapter is tested on a small random-initialised SAM against segment-anything's own SamPredictor
(tests/test_sam_segment.py).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator
from skimage.measure import regionprops

from agent.analysis.display import bbox_to_px, box_edges, outline, picture
from agent.analysis.learned import LearnedInput, LearnedTool, ModelUsed, boxes_from_evidence, device, model_used
from agent.analysis.medsam import CT_WINDOWS, to_rgb8
from agent.core.state import SPACING_UNKNOWN_NOTE, ImageView
from agent.core.tool import FindingDraft, Measurement, ToolContext, ToolError
from agent.store.models import ModelCard

REGISTRY = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
            "vit_h": (1280, 32, 16, [7, 15, 23, 31])}  # segment-anything's build_sam_vit_* sizes
COLOURS = np.array([(0, 255, 0), (255, 0, 255), (0, 200, 255), (255, 128, 0), (255, 255, 0), (128, 0, 255),
                    (0, 128, 255), (255, 0, 0)], dtype=np.float32)
_CACHE_SIZE = 4
_EMB_LOCK = threading.Lock()
_EMBEDDINGS: OrderedDict[tuple[str, str, str], Any] = OrderedDict()  # (sha256, preprocess, picture sha) -> embedding
encoder_calls = 0  # image-encoder forward passes in this process (the tests check the cache with it)


class SamInput(LearnedInput):
    bbox: list[float] | None = Field(None, min_length=4, max_length=4, description=(
        "box around ONE object, [row0, col0, row1, col1] in the view's pixels (fractions when all four lie in [0, 1]), "
        "from an earlier tool's output or the user"))
    points: list[list[float]] | None = Field(None, description="prompt points [[row, col], ...] in the view's pixels")
    point_labels: list[int] | None = Field(None, description="1 foreground, 0 background, one per point (default all 1)")
    boxes_from: str | None = Field(None, description="evidence id whose boxes (a detector's) to segment, e.g. E2")
    max_objects: int = Field(5, ge=1, le=16, description="with boxes_from: how many of its boxes, best first")
    slice_index: int | None = Field(None, description="3D volumes: the slice (axis 0) to segment; default the middle")
    ct_window: Literal["soft_tissue", "lung", "bone"] = Field("soft_tissue", description="CT in HU: the window shown")

    @model_validator(mode="after")
    def _one_prompt(self) -> SamInput:
        if self.boxes_from is not None and (self.bbox is not None or self.points is not None):
            raise ValueError("give boxes_from alone, or bbox and/or points")
        if self.boxes_from is None and self.bbox is None and not self.points:
            raise ValueError("a prompt is needed: bbox, points or boxes_from")
        if self.points is not None:
            if any(len(p) != 2 for p in self.points):
                raise ValueError("points are [row, col] pairs")
            if self.point_labels is not None and len(self.point_labels) != len(self.points):
                raise ValueError("point_labels needs one label (1 or 0) per point")
            if self.point_labels is not None and any(v not in (0, 1) for v in self.point_labels):
                raise ValueError("point labels are 1 (foreground) or 0 (background)")
        return self


class SamObject(BaseModel):
    index: int  # value in the label mask
    prompt: str  # "box [r0, c0, r1, c1]" or "points ..."
    source_label: str = ""  # the detector's label, with boxes_from
    source_score: float | None = None
    area: float
    longest_diameter: float
    bbox: list[int]  # the mask's [row0, col0, row1, col1], end exclusive
    centroid: list[float]
    pixels: int
    predicted_iou: float


class SamOutput(BaseModel):
    objects: list[SamObject]
    empty_prompts: list[str]  # prompts whose mask came out empty
    area_unit: str
    length_unit: str
    slice_index: int | None = None
    preprocess: str
    gray_mapping: str
    embedding_cached: bool
    device: str
    model_card: ModelUsed
    confidence: float  # mean predicted IoU of the objects
    note: str = ""


def _arch(card: ModelCard) -> tuple[int, int, int, list[int]]:
    enc = card.input.get("encoder")
    if isinstance(enc, dict):
        try:
            return int(enc["embed_dim"]), int(enc["depth"]), int(enc["num_heads"]), [int(i) for i in enc["global_attn_indexes"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError("input.encoder needs embed_dim, depth, num_heads and global_attn_indexes") from None
    kind = str(card.input.get("model_type", "vit_b"))
    if kind not in REGISTRY:
        raise ValueError(f"input.model_type {kind!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[kind]


def _preprocess_mode(card: ModelCard) -> str:
    mode = str(card.input.get("preprocess", "sam"))
    if mode not in ("sam", "medsam"):
        raise ToolError(f"model card {card.name!r}: input.preprocess must be sam or medsam, not {mode!r}")
    return mode


def picture_tensor(sam: Any, rgb8: np.ndarray, mode: str) -> Any:
    """The (1, 3, 1024, 1024) encoder input and the (h, w) the picture occupies in it."""
    import torch
    import torch.nn.functional as F
    from segment_anything.utils.transforms import ResizeLongestSide

    side = sam.image_encoder.img_size
    dev = sam.device
    if mode == "medsam":
        x = torch.from_numpy(rgb8.astype(np.float32)).permute(2, 0, 1)[None].to(dev)
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
        return x, (side, side)
    small = ResizeLongestSide(side).apply_image(rgb8)
    x = torch.as_tensor(small, device=dev).permute(2, 0, 1).contiguous()[None]
    return sam.preprocess(x), tuple(small.shape[:2])


def embed(sam: Any, card: ModelCard, rgb8: np.ndarray, mode: str) -> tuple[Any, tuple[int, int], bool]:
    """The image embedding (cached), the input size and whether it came from the cache."""
    global encoder_calls
    import torch

    x, input_size = picture_tensor(sam, rgb8, mode)
    key = (card.sha256, mode, hashlib.sha256(x.float().cpu().numpy().tobytes()).hexdigest())
    with _EMB_LOCK:
        emb = _EMBEDDINGS.pop(key, None)
        if emb is not None:
            _EMBEDDINGS[key] = emb
            return emb, input_size, True
    with torch.inference_mode():
        emb = sam.image_encoder(x)
    with _EMB_LOCK:
        encoder_calls += 1
        _EMBEDDINGS[key] = emb
        while len(_EMBEDDINGS) > _CACHE_SIZE:
            _EMBEDDINGS.popitem(last=False)
    return emb, input_size, False


def decode(sam: Any, emb: Any, input_size: tuple[int, int], hw: tuple[int, int], mode: str,
           boxes: list[tuple[int, int, int, int]] | None = None, points: list[list[float]] | None = None,
           labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(masks (K, h, w) bool, predicted IoU (K,)) for K boxes, or for one point prompt (optionally with one box)."""
    import torch
    import torch.nn.functional as F

    h, w = hw
    side = sam.image_encoder.img_size
    sy, sx = (side / h, side / w) if mode == "medsam" else (input_size[0] / h, input_size[1] / w)
    dev = sam.device
    box_t = pts = None
    if boxes:  # [r0, c0, r1, c1] end exclusive -> model [x0, y0, x1, y1] with inclusive ends
        box_t = torch.tensor([[c0 * sx, r0 * sy, (c1 - 1) * sx, (r1 - 1) * sy] for r0, c0, r1, c1 in boxes],
                             dtype=torch.float32, device=dev)
    if points:
        coords = torch.tensor([[[c * sx, r * sy] for r, c in points]], dtype=torch.float32, device=dev)
        pts = (coords, torch.tensor([labels or [1] * len(points)], dtype=torch.int64, device=dev))
    multi = box_t is None  # a point prompt is ambiguous: three candidates, the best kept
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=pts, boxes=box_t, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=multi)
        if multi:
            best = iou.argmax(dim=1)
            low, iou = low[torch.arange(low.shape[0]), best][:, None], iou.gather(1, best[:, None])
        if mode == "medsam":
            prob = torch.sigmoid(F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False))
            masks = prob > 0.5
        else:
            masks = sam.postprocess_masks(low, input_size, (h, w)) > sam.mask_threshold
    return masks[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()


class SamSegment(LearnedTool):
    name = "sam_segment"
    description = ("SAM/MedSAM from your model store: segment objects from a box, points, or the boxes an earlier "
                   "detector found (boxes_from=E#); area, longest diameter, predicted IoU per object.")
    kind = "segment"
    adapter = "sam"
    card_kinds = frozenset({"segment"})
    requires = ("torch", "segment_anything")
    needs_region = True
    subjects = ("segmented region", "area", "longest_diameter", "equivalent_diameter")
    topics = ("segment", "segmentation", "mask", "outline", "boundary", "size", "area", "diameter", "measure", "lesion", "tumor",
              "mass", "nodule", "polyp", "organ", "region")
    timeout_s = 240.0  # a vit_h embedding on CPU
    limitations = ("Only as good as the prompt and the user's weights; one 2D picture (one slice of a volume) at a time; "
                   "segments, does not classify; ~17 s per new picture for vit_b on CPU.")
    validation = "the model card's own figures (dxagent models list); adapter checked against segment-anything's SamPredictor"
    Input = SamInput
    Output = SamOutput

    def build(self, card: ModelCard, path: Path) -> Any:
        import torch
        from segment_anything.build_sam import _build_sam

        embed_dim, depth, heads, global_idx = _arch(card)
        sam = _build_sam(encoder_embed_dim=embed_dim, encoder_depth=depth, encoder_num_heads=heads,
                         encoder_global_attn_indexes=global_idx, checkpoint=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"weights do not fit the card's SAM encoder ({embed_dim}-wide, depth {depth}): "
                             f"{' '.join(str(exc).split())[:160]}") from None
        return sam.to(device()).eval()

    def run(self, ctx: ToolContext, inp: SamInput) -> SamOutput:
        view = self.usable_view(ctx, inp.view)
        card = self.pick(view, inp.model)
        mode = _preprocess_mode(card)
        try:
            img, k, notes = picture(ctx.pixels(inp.view), view, inp.slice_index)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        h, w = img.shape[:2]

        boxes: list[tuple[int, int, int, int]] = []
        sources: list[dict[str, Any]] = []
        if inp.boxes_from is not None:
            for b in boxes_from_evidence(ctx, inp.boxes_from, inp.view, limit=inp.max_objects):
                try:
                    boxes.append(bbox_to_px(b["bbox"], h, w))
                    sources.append(b)
                except ValueError as exc:
                    notes.append(f"a box from {inp.boxes_from} skipped: {exc}")
            if not boxes:
                raise ToolError(f"none of {inp.boxes_from}'s boxes lies on the {h}x{w} picture")
        elif inp.bbox is not None:
            try:
                boxes = [bbox_to_px(inp.bbox, h, w)]
            except ValueError as exc:
                raise ToolError(str(exc)) from None
        points = inp.points
        if points is not None:
            bad = [p for p in points if not (0 <= p[0] < h and 0 <= p[1] < w)]
            if bad:
                raise ToolError(f"points {bad} lie outside the {h}x{w} picture")
        for r0, c0, r1, c1 in boxes:
            if r1 - r0 < 3 or c1 - c0 < 3:
                raise ToolError(f"box rows {r0}:{r1}, cols {c0}:{c1} is too small to segment (under 3 px)")

        rgb8, how = to_rgb8(img, view, inp.ct_window)
        sam = self.load(card)
        emb, input_size, cached = embed(sam, card, rgb8, mode)
        if points is not None and len(boxes) <= 1:
            masks, ious = decode(sam, emb, input_size, (h, w), mode, boxes or None, points, inp.point_labels)
            prompts = [("box " + str(list(boxes[0])) + " + " if boxes else "") + f"points {points}"]
        else:
            masks, ious = decode(sam, emb, input_size, (h, w), mode, boxes)
            prompts = [f"box {list(b)}" for b in boxes]

        spacing = view.plane_spacing()
        label_img = np.zeros((h, w), dtype=np.uint8)
        objects: list[SamObject] = []
        empty: list[str] = []
        for i, (m, iou, prompt) in enumerate(zip(masks, ious, prompts, strict=True)):
            m = m & (label_img == 0)  # an earlier object keeps contested pixels
            if not m.any():
                empty.append(prompt)
                continue
            idx = len(objects) + 1
            label_img[m] = idx
            props = regionprops(m.astype(np.uint8))[0]
            phys = regionprops(m.astype(np.uint8), spacing=spacing)[0]
            src = sources[i] if sources else {}
            objects.append(SamObject(
                index=idx, prompt=prompt, source_label=src.get("label", ""), source_score=src.get("score"),
                area=round(float(m.sum()) * spacing[0] * spacing[1], 3),
                longest_diameter=round(float(phys.feret_diameter_max), 3), bbox=[int(v) for v in props.bbox],
                centroid=[round(float(v), 2) for v in props.centroid], pixels=int(m.sum()),
                predicted_iou=round(float(min(1.0, max(0.0, iou))), 4)))
        if not objects:
            raise ToolError(f"{card.name} returned an empty mask for every prompt ({'; '.join(empty)})")
        if empty:
            notes.append(f"{len(empty)} prompt(s) gave an empty mask")
        if not view.spacing_known:
            notes.append(SPACING_UNKNOWN_NOTE)

        over = rgb8.astype(np.float32)
        for o in objects:
            m = label_img == o.index
            colour = COLOURS[(o.index - 1) % len(COLOURS)]
            over[m] = 0.6 * over[m] + 0.4 * colour
            outline(over, m, colour)
        for box in boxes:
            box_edges(over, box)
        where = view.id + (f" slice {k}" if k is not None else "")
        ctx.save_png(over.clip(0, 255).astype(np.uint8), kind="overlay",
                     description=f"{where}: {card.name} masks (one colour per object), prompt boxes yellow")
        ctx.save_mask(label_img, description=f"{where}: {card.name} label mask (object i = value i)",
                      legend={o.index: o.source_label or f"object {o.index}" for o in objects}, view=view.id,
                      slice_index=k)
        unit = view.length_unit
        return SamOutput(objects=objects, empty_prompts=empty, area_unit=unit + "2", length_unit=unit, slice_index=k,
                         preprocess=mode, gray_mapping=how, embedding_cached=cached, device=str(sam.device),
                         model_card=model_used(card), confidence=round(float(np.mean([o.predicted_iou for o in objects])), 4),
                         note="; ".join(notes))

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, SamOutput)
        where = f"slice {output.slice_index}, " if output.slice_index is not None else ""
        return [FindingDraft(
            label=o.source_label or "segmented region", present=None,
            location=f"{where}centroid row {o.centroid[0]:.0f}, col {o.centroid[1]:.0f}", bbox=[float(v) for v in o.bbox],
            measurements=[Measurement(name="area", value=o.area, unit=output.area_unit),
                          Measurement(name="longest_diameter", value=o.longest_diameter, unit=output.length_unit),
                          Measurement(name="predicted_iou", value=o.predicted_iou, unit="ratio")],
            note=f"{output.model_card.name} mask {o.index} from {o.prompt}") for o in output.objects]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, SamOutput)
        parts = [f"{o.source_label or 'object'} {o.index}: area {o.area:g} {output.area_unit}, longest "
                 f"{o.longest_diameter:g} {output.length_unit}, IoU {o.predicted_iou:.2f}" for o in output.objects[:3]]
        more = f" (+{len(output.objects) - 3} more)" if len(output.objects) > 3 else ""
        return f"{output.model_card.name}: {len(output.objects)} mask(s): " + "; ".join(parts) + more


__all__ = ["CT_WINDOWS", "SamSegment", "decode", "embed", "picture_tensor"]
