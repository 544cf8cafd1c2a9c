"""yolo_detect: an Ultralytics YOLO object detector from the user's model store.

Adapter for model cards with `adapter: yolo`, `kind: detect` (agent/store/models.py; `dxagent models add CARD.yaml`). The
card names the weights (an Ultralytics `.pt` checkpoint the user trained; its sha256 is checked before every load),
the labels in class-id order (their count must equal the checkpoint's classes), and optionally
`input: {size: 640, conf: 0.25}` (the inference size, `imgsz`: one side or [rows, cols], and the default
confidence threshold). The modalities the card lists decide where the tool is offered.

Method: the view to 8-bit 3-channel like LiteMedSAM's input (agent/analysis/medsam.py `to_rgb8`: CT in HU through the
soft-tissue window, other gray images stretched between their 0.5th and 99.5th percentiles, colour as is), handed to
Ultralytics as BGR (its numpy convention, as `cv2.imread` gives training images); Ultralytics letterboxes to the
card's size, runs the network and non-maximum suppression, and maps the boxes back to the view's pixels. Each
detection keeps its label, class id, confidence and box [row0, col0, row1, col1] (end exclusive, in the view's
pixels), with its height and width in mm when the pixel spacing is known, else in pixels. The overlay is drawn here
(PIL's built-in font), never with Ultralytics' plotting, which fetches Arial.ttf.

Offline: the environment Ultralytics reads at its import is set when this module is imported (tool discovery, so
before anything in the process imports Ultralytics) and again by `offline_ultralytics()`, which `build` calls before
importing it: YOLO_OFFLINE=1 (no DNS probe, ONLINE false), YOLO_AUTOINSTALL=false (it parses 1/true/yes/on/y/t as
true, anything else as false: no pip installs), a project-owned YOLO_CONFIG_DIR (<cache root>/ultralytics); after the
import, settings `sync` (analytics, crash reports) and the training integrations are turned off. Nothing is
downloaded: the weights are the card's local file. Two process-wide side effects of Ultralytics are undone:
OMP_NUM_THREADS=1 set at its import, and the torch thread count its device selection sets on every new predictor.

Loading (agent/analysis/learned.py): lazy, once per process per model, thread-safe, sha256 rechecked first; CUDA when present,
else CPU. One prediction at a time per process (an Ultralytics model keeps its predictor on itself).

Limitations: only as good as the user's weights and card; 2D images only (a 3D volume is not sliced); the boxes are
axis-aligned and the sizes are the box's, not the object's outline; confidences of a model trained elsewhere are not
calibrated for this data; a `.pt` checkpoint is a pickle: only cards whose weights you trust belong in the store (the
sha256 pins the exact file). Validation: the card's own figures (shown by `dxagent models list`); the adapter itself
is tested on weights the test trains from yolo11n.yaml on generated images (tests/test_yolo_detect.py,
tests/makers/yolo.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.analysis.learned import LearnedInput, LearnedTool, ModelUsed, model_used
from agent.core.state import SPACING_UNKNOWN_NOTE, ImageView
from agent.core.tool import USER_ONLY, FindingDraft, Measurement, ToolContext, ToolError
from agent.store.models import ModelCard

DEFAULT_SIZE = 640
DEFAULT_CONF = 0.25
_PREDICT_LOCK = threading.Lock()
_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (80, 255, 80), (255, 96, 255), (255, 150, 40)]


def offline_env() -> None:
    """The environment Ultralytics reads at its import: offline, no auto-install, a project-owned config folder."""
    root = os.environ.get("DXAGENT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "dxagent")
    os.environ["YOLO_OFFLINE"] = "1"  # is_online() -> False without its DNS probe
    os.environ["YOLO_AUTOINSTALL"] = "false"  # env_bool(): only 1/true/yes/on/y/t are true
    # settings.json lives in <cache root>/ultralytics/Ultralytics (ultralytics makes it), not ~/.config/Ultralytics
    os.environ["YOLO_CONFIG_DIR"] = str(Path(root).expanduser() / "ultralytics")
    os.environ.setdefault("YOLO_VERBOSE", "false")


def offline_ultralytics() -> Any:
    """Import `ultralytics` with everything that reaches for the network off, and return it. The environment is read
    at its import, so it is set here and when this module is imported (tool discovery, before any model loads); the
    flags are also set on the imported modules, so a process that imported ultralytics earlier is made offline too
    (its config folder then stays where that import put it)."""
    offline_env()
    omp_unset = "OMP_NUM_THREADS" not in os.environ
    import ultralytics

    if omp_unset:  # ultralytics sets it to 1 at import "for training"; subprocesses would inherit it
        os.environ.pop("OMP_NUM_THREADS", None)
    import ultralytics.utils as uu
    from ultralytics.utils import checks, events

    for mod in (uu, checks, events):
        if hasattr(mod, "ONLINE"):
            mod.ONLINE = False
        if hasattr(mod, "AUTOINSTALL"):
            mod.AUTOINSTALL = False
    if hasattr(events, "events"):
        events.events.enabled = False
    off = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
           if uu.SETTINGS.get(k) is not False and k in uu.SETTINGS.defaults}
    if off:
        uu.SETTINGS.update(off)
    return ultralytics


offline_env()  # before anything else in the process imports ultralytics


class Detection(BaseModel):
    label: str
    class_id: int
    confidence: float
    bbox: list[float]  # [row0, col0, row1, col1] in the view's pixels, end exclusive
    centre: list[float]  # [row, col] in the view's pixels
    height: float  # box height (rows), in `unit`
    width: float  # box width (columns), in `unit`
    unit: str  # "mm" when the pixel spacing is known, else "px"


class YoloOutput(BaseModel):
    model: str
    detections: list[Detection]  # highest confidence first
    counts: dict[str, int]  # detections per label (labels with none left out)
    conf: float  # confidence threshold used
    max_det: int
    image_size: list[int]  # [rows, cols] of the view
    imgsz: int | list[int]  # the network's input size (the card's `input.size`)
    preprocessing: str
    device: str
    model_card: ModelUsed
    note: str = ""


class YoloInput(LearnedInput):
    conf: float | None = Field(None, ge=0.0, le=1.0, description="confidence threshold (default: the card's, else 0.25)",
                               json_schema_extra=USER_ONLY)
    max_det: int = Field(20, ge=1, le=300, description="most detections to keep", json_schema_extra=USER_ONLY)


class YoloDetect(LearnedTool):
    name = "yolo_detect"
    description = ("Object detector (an Ultralytics YOLO model from your model store): boxes, labels, confidences and "
                   "box sizes of the objects the model card lists.")
    kind = "detect"
    adapter = "yolo"
    card_kinds = frozenset({"detect"})
    requires = ("ultralytics",)
    modalities = None  # the cards decide
    dims = frozenset({2})
    topics = ("detect", "detection", "find", "locate", "where", "count", "how many", "box", "lesion", "nodule", "mass",
              "polyp", "fracture", "object", "size")
    timeout_s = 120.0
    limitations = ("Only as good as the user's weights and card; 2D only; box sizes, not outlines; confidences are not "
                   "calibrated for other sources.")
    validation = "the model card's own figures (dxagent models list)"
    Input = YoloInput
    Output = YoloOutput

    def build(self, card: ModelCard, path: Path) -> Any:
        if path.suffix.lower() != ".pt" or not path.is_file():
            raise ValueError(f"weights must be an Ultralytics .pt checkpoint file, not {path.name}")
        offline_ultralytics()
        from ultralytics import YOLO

        model = YOLO(str(path), task="detect")
        if model.task != "detect":
            raise ValueError(f"{path.name} is a {model.task} model, not a detector")
        return model.to(_device())

    def run(self, ctx: ToolContext, inp: YoloInput) -> YoloOutput:
        from agent.analysis.medsam import to_rgb8

        view = self.usable_view(ctx, inp.view)
        card = self.pick(view, inp.model)
        model = self.load(card)
        names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
        if len(card.labels) != len(names):
            shown = ", ".join(str(names[k]) for k in sorted(names)[:6]) + (" …" if len(names) > 6 else "")
            raise ToolError(f"model card {card.name!r} lists {len(card.labels)} labels but {card.weights_path.name} has "
                            f"{len(names)} classes ({shown}); list them in class-id order under `labels`")
        raw = card.input.get("size", DEFAULT_SIZE)
        size: int | list[int] = [int(v) for v in raw] if isinstance(raw, list | tuple) else int(raw)
        conf = float(inp.conf if inp.conf is not None else card.input.get("conf", DEFAULT_CONF))
        img = ctx.pixels(inp.view)
        rgb8, how = to_rgb8(img, view)
        h, w = rgb8.shape[:2]
        dev = _device()
        import torch

        with _PREDICT_LOCK:
            threads = torch.get_num_threads()
            try:
                res = model.predict(np.ascontiguousarray(rgb8[..., ::-1]), imgsz=size, conf=conf, max_det=inp.max_det,
                                    device=dev, verbose=False)[0]
            finally:  # its select_device() sets the whole process's torch threads to cpu_count - 1 (at most 8)
                torch.set_num_threads(threads)
        xyxy = res.boxes.xyxy.float().cpu().numpy().reshape(-1, 4)
        scores = res.boxes.conf.float().cpu().numpy().reshape(-1)
        classes = res.boxes.cls.cpu().numpy().astype(int).reshape(-1)

        sr, sc = view.plane_spacing()
        unit = view.length_unit
        dets = []
        for (x0, y0, x1, y1), p, k in sorted(zip(xyxy, scores, classes, strict=True), key=lambda t: -float(t[1])):
            r0, r1 = float(np.clip(y0, 0, h)), float(np.clip(y1, 0, h))
            c0, c1 = float(np.clip(x0, 0, w)), float(np.clip(x1, 0, w))
            dets.append(Detection(
                label=card.labels[int(k)], class_id=int(k), confidence=round(float(p), 4),
                bbox=[round(v, 1) for v in (r0, c0, r1, c1)], centre=[round((r0 + r1) / 2, 1), round((c0 + c1) / 2, 1)],
                height=round((r1 - r0) * sr, 2), width=round((c1 - c0) * sc, 2), unit=unit))
        counts: dict[str, int] = {}
        for d in dets:
            counts[d.label] = counts.get(d.label, 0) + 1

        ctx.save_png(draw_boxes(rgb8, dets), kind="overlay",
                     description=f"{view.id}: {card.name} detections (conf ≥ {conf:g}), boxes coloured by label")
        notes = [f"boxes from the user's model {card.name}; confidences not calibrated for this image source"]
        if not view.spacing_known:
            notes.append(SPACING_UNKNOWN_NOTE)
        own = [str(names[k]) for k in sorted(names)]
        if [x.lower() for x in own] != [x.lower() for x in card.labels]:
            notes.append(f"the card's labels are used; the weights name the classes {', '.join(own[:6])}"
                         + (" …" if len(own) > 6 else ""))
        if len(dets) == inp.max_det:
            notes.append(f"max_det {inp.max_det} reached: there may be more")
        return YoloOutput(model=card.name, detections=dets, counts=counts, conf=conf, max_det=inp.max_det,
                          image_size=[h, w], imgsz=size, preprocessing=how, device=dev, model_card=model_used(card),
                          note="; ".join(notes))

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, YoloOutput)
        return [FindingDraft(
            label=d.label, present=True, probability=d.confidence, bbox=d.bbox,
            location=f"centre row {d.centre[0]:.0f}, col {d.centre[1]:.0f}",
            measurements=[Measurement(name="height", value=d.height, unit=d.unit),
                          Measurement(name="width", value=d.width, unit=d.unit)],
            note=f"{output.model} detection (confidence {d.confidence:.2f}, threshold {output.conf:g})",
        ) for d in output.detections]

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, YoloOutput)
        n = len(output.detections)
        if not n:
            return f"{output.model}: no detections at confidence ≥ {output.conf:g}"
        best: dict[str, float] = {}
        for d in output.detections:
            best.setdefault(d.label, d.confidence)  # detections are sorted, so the first is the best
        top = ", ".join(f"{k} ×{output.counts[k]} (best {p:.2f})" for k, p in list(best.items())[:4])
        more = f" +{len(best) - 4} labels" if len(best) > 4 else ""
        return f"{output.model}: {n} detection{'s' * (n != 1)} at confidence ≥ {output.conf:g}: {top}{more}"


def draw_boxes(rgb8: np.ndarray, dets: list[Detection]) -> np.ndarray:
    """The picture with each detection's box and `label confidence`, coloured by class (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(np.ascontiguousarray(rgb8, dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    width = max(1, round(max(im.size) / 300))
    for d in reversed(dets):  # the most confident drawn last, on top
        colour = _COLOURS[d.class_id % len(_COLOURS)]
        r0, c0, r1, c1 = d.bbox
        draw.rectangle([c0, r0, max(c0, c1 - 1), max(r0, r1 - 1)], outline=colour, width=width)
        text = f"{d.label} {d.confidence:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        ty = r0 - (bottom - top) - 2 if r0 >= (bottom - top) + 2 else r0 + 1
        draw.rectangle([c0, ty, c0 + right - left + 2, ty + bottom - top + 2], fill=colour)
        draw.text((c0 + 1 - left, ty + 1 - top), text, fill=(0, 0, 0), font=font)
    return np.asarray(im)


def _device() -> str:
    from agent.analysis.learned import device

    return device()
