"""monai_bundle: a MONAI Model Zoo segmentation bundle from the user's model store, run with its own inference config.

Adapter for model cards with `adapter: monai_bundle`, `kind: segment` (agent/store/models.py; `dxagent models add
CARD.yaml`). The card's `weights` is a bundle folder laid out as in the MONAI Model Zoo::

    <bundle>/configs/inference.json   (or .yaml / .yml; the card's `input: {config: PATH}` names another)
    <bundle>/configs/metadata.json    (optional: bundle name, version, input/output keys)
    <bundle>/models/model.pt          (a state_dict, loaded with torch.load(weights_only=True))

Its sha256 is the tree digest of the whole folder (agent/store/models.py), so editing any config is caught before loading.
The card's `labels` are the foreground classes 1..N in the order of the output's label values (0 is background);
`input.dims` (2 or 3, default 3) says which views the card fits; `input.channels` must be 1 (one image is fed).

Method (the bundle's own inference path, read with `monai.bundle.ConfigParser`):
  1. the config is read (metadata.json as `_meta_`), with `bundle_root` set to the bundle folder, `device` to this
     process's device and `output_dir` to a private temporary folder; `imports` is resolved when present;
  2. `network_def` (else `network`) is built, models/model.pt loaded into it strictly (a checkpoint dict holding
     `model` or `state_dict` is unwrapped), on CUDA when present else CPU, in eval mode;
  3. `preprocessing`, `inferer` (SimpleInferer when absent) and `postprocessing` (optional) are built; every
     SaveImage/SaveImaged (any transform whose class name starts with "Save") is dropped from the Compose trees, so
     nothing is written next to the bundle or anywhere else;
  4. the view is written to a temporary NIfTI so the bundle's LoadImaged sees physical spacing: a volume (Z, H, W)
     with spacing (z, row, col) goes back to RAS-canonical (x, y, z) order with affine diag(col, row, z) -- the exact
     inverse of how agent/imaging/loaders.py reads a NIfTI, so the bundle sees the voxels as it would the original file
     after Orientationd("RAS"); a 2D view (H, W) is written as (x = column, y = row), as MONAI's PIL reader reads a
     PNG/JPEG. Unknown spacing is written as 1 mm (said in the note);
  5. preprocessing({image_key: file}); inferer(image[None], network); postprocessing({image_key, pred_key}) under
     no_grad (so an Invertd in the config undoes Spacingd/Orientationd as it does in the zoo's evaluator). Keys:
     metadata.json's network_data_format inputs/outputs (default "image" / "pred");
  6. the prediction to a label map: one channel is taken as labels, several are argmax'ed (one-hot or
     probabilities); if its grid still differs from the input's (no Invertd), it is resampled nearest-neighbour
     through the two affines (an identity affine on a MetaTensor without loader meta is taken as a default, not a
     grid); then back to the view's axes.
Output per label: voxels, volume in mL (3D) or area in mm2 (2D) when the spacing is known (else voxels / px2),
bbox ([z0, r0, c0, z1, r1, c1] in 3D, [r0, c0, r1, c1] in 2D, end exclusive), centroid; the inferer used, the
bundle's name/version from metadata.json, the device, the card (ModelUsed). The label map is saved as a mask and an
overlay PNG (3D: the slice with the most foreground).

Limitations: only the inference path of the config is used -- the keys `imports`, `bundle_root`, `device`,
`output_dir`, `network_def`/`network`, `preprocessing`, `inferer`, `postprocessing` (and whatever they reference);
`evaluator`, `dataset`, `handlers`, `initialize`, `run` and training configs are never resolved. A bundle config
is Python (its `$` expressions are evaluated): add only bundles you trust (the sha256 check guards what was added,
not what it does). One single-channel image per call (no multi-modal MR bundles); TorchScript-only bundles
(models/model.ts without model.pt) are not run; 2D views are fed as MONAI reads a PNG (x = column, y = row), so a
2D bundle trained on RAS NIfTI slices would see them turned 180 degrees; the config's AMP setting is ignored (fp32);
label values above 255 do not fit the saved uint8 mask; the
output is only as good as the user's bundle on this data (intensity range, orientation, field of view); CPU
sliding-window inference on a whole CT can take minutes.

Loading (agent/analysis/learned.py): lazy, once per process per (bundle folder, sha256, card input), thread-safe; a bundle without
configs/inference.* or models/model.pt, a config that does not parse or weights that do not fit the network give a
one-line error naming the card. Validation: the card's own figures (`dxagent models list`). The adapter is tested on
tiny UNet bundles the tests train on synthetic phantoms (tests/makers/monai_bundle.py, tests/test_monai_bundle.py):
on an anisotropic (2.0 x 0.8 x 0.8 mm), non-cubic 40x56x48 NIfTI stored LPS, larger than the 32^3 window, with an
off-centre 8 mm sphere: Dice 0.987-0.990, volume within 0.4 % of 2.145 mL, centroid within 0.06 voxel (noise seeds
3-8); the same through a zoo-style Spacingd + Invertd config: Dice 0.95; a 2D bundle on a PNG: Dice 0.995-0.999.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from agent.analysis.display import to_uint8
from agent.analysis.learned import LearnedInput, LearnedTool, ModelUsed, device, model_used, one_line
from agent.core.state import ImageView
from agent.core.tool import FindingDraft, Measurement, ToolContext, ToolError
from agent.store.models import ModelCard

CONFIG_NAMES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
WEIGHTS_NAME = "models/model.pt"
_COLOURS = [(255, 60, 60), (60, 200, 255), (255, 220, 0), (80, 230, 80), (230, 90, 255), (255, 150, 40)]
_ALPHA = 0.45


@dataclass
class Bundle:
    """A loaded bundle: what `build` returns (cached per process by the base)."""

    network: Any
    preprocessing: Any
    inferer: Any
    postprocessing: Any | None
    image_key: str
    pred_key: str
    name: str
    version: str
    inferer_text: str
    device: str
    dropped: list[str]  # saving transforms taken out of the config


class BundleLabel(BaseModel):
    index: int  # the label value in the mask
    label: str
    voxels: int  # voxels (3D) or pixels (2D)
    amount: float  # in `unit`
    unit: str  # "mL", "mm2", "voxels", "px2"
    bbox: list[int] | None  # [z0, r0, c0, z1, r1, c1] (3D) or [r0, c0, r1, c1] (2D), end exclusive; None when empty
    centroid: list[float] | None  # (z, row, col) or (row, col)


class MonaiBundleOutput(BaseModel):
    model: str
    model_version: str
    weights_sha256: str
    bundle_name: str
    bundle_version: str
    labels: list[BundleLabel]  # every card label in order, then any other value the bundle produced
    unit: str
    spatial_dims: int
    spacing_known: bool
    inferer: str
    device: str
    overlay_slice: int | None = None  # 3D: the slice shown in the overlay
    model_card: ModelUsed
    note: str = ""


def to_bundle_axes(arr: np.ndarray) -> np.ndarray:
    """View pixels to the array written to the NIfTI: (Z, H, W) -> RAS-canonical (x, y, z), the inverse of
    agent/imaging/loaders.py's NIfTI reading; (H, W) -> (x = column, y = row)."""
    if arr.ndim == 3:
        return np.ascontiguousarray(arr.transpose(2, 1, 0)[::-1, ::-1, :])
    return np.ascontiguousarray(arr.T)


def from_bundle_axes(arr: np.ndarray) -> np.ndarray:
    """The inverse of `to_bundle_axes`: (x, y, z) -> (Z, H, W); (x, y) -> (H, W)."""
    if arr.ndim == 3:
        return np.ascontiguousarray(arr.transpose(2, 1, 0)[:, ::-1, ::-1])
    return np.ascontiguousarray(arr.T)


def bundle_affine(spacing: tuple[float, ...]) -> np.ndarray:
    """The NIfTI affine of `to_bundle_axes` output for a view spacing (z, row, col) or (row, col)."""
    zooms = list(spacing[::-1]) + [1.0] * (3 - len(spacing))  # (x = col, y = row, z)
    return np.diag([*zooms, 1.0])


def write_nifti(pixels: np.ndarray, spacing: tuple[float, ...], path: Path) -> np.ndarray:
    """Write view pixels as the NIfTI the bundle loads; returns the affine written."""
    import nibabel as nib

    affine = bundle_affine(spacing)
    img = nib.Nifti1Image(to_bundle_axes(np.asarray(pixels, dtype=np.float32)), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return affine


def _without_saving(t: Any, dropped: list[str]) -> Any:
    """Drop every Save* transform from a (nested) Compose."""
    from monai.transforms import Compose

    if isinstance(t, Compose):
        kept = []
        for x in t.transforms:
            if type(x).__name__.startswith("Save"):
                dropped.append(type(x).__name__)
            else:
                kept.append(_without_saving(x, dropped))
        t.transforms = type(t.transforms)(kept) if isinstance(t.transforms, tuple | list) else kept
    return t


def _describe_inferer(inferer: Any) -> str:
    parts = [type(inferer).__name__]
    for attr, label in (("roi_size", "roi"), ("overlap", "overlap"), ("sw_batch_size", "batch"), ("mode", "mode")):
        v = getattr(inferer, attr, None)
        if v is None:
            continue
        v = [int(x) for x in v] if isinstance(v, list | tuple) else (round(v, 3) if isinstance(v, float) else v)
        parts.append(f"{label} {getattr(v, 'value', v)}")
    return " ".join(str(p) for p in parts)


def _state_dict(obj: Any) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "network"):
            if key in obj and isinstance(obj[key], dict) and not any(hasattr(v, "shape") for v in obj.values()):
                return obj[key]
        return obj
    raise ValueError(f"{WEIGHTS_NAME} holds a {type(obj).__name__}, not a state_dict")


def labels_from_prediction(pred: Any, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The bundle's output for one image (channel-first or not) as an integer label map on the input grid (x, y[, z])."""
    import torch

    d = len(shape)
    pred_affine = getattr(pred, "affine", None)
    meta = getattr(pred, "meta", None) or {}
    if pred_affine is not None and not ({"filename_or_obj", "original_affine"} & set(meta)) \
            and np.allclose(np.asarray(pred_affine, dtype=np.float64), np.eye(len(pred_affine))):
        pred_affine = None  # a MetaTensor a transform made from a plain tensor: its identity affine is a default
    arr = pred.detach().cpu().float().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred, dtype=np.float32)
    if arr.ndim == d + 1:
        lab = arr[0] if arr.shape[0] == 1 else arr.argmax(0)
    elif arr.ndim == d:
        lab = arr
    else:
        raise ToolError(f"the bundle's output has shape {list(arr.shape)}; expected a {d}D label map or channels")
    lab = np.rint(lab).astype(np.int32)
    if pred_affine is not None:
        from monai.data.utils import to_affine_nd

        a_in = to_affine_nd(d, np.asarray(affine, dtype=np.float64))
        a_out = to_affine_nd(d, np.asarray(pred_affine, dtype=np.float64))
        if lab.shape == shape and np.allclose(a_in, a_out, atol=1e-4):
            return lab
        from scipy import ndimage as ndi

        m = np.linalg.inv(a_out) @ a_in  # input voxel index -> output voxel index
        return ndi.affine_transform(lab, m[:d, :d], offset=m[:d, d], output_shape=shape, order=0, mode="constant", cval=0)
    if lab.shape != shape:
        raise ToolError(f"the bundle's output grid {list(lab.shape)} differs from the input's {list(shape)} and carries "
                        "no affine (its postprocessing needs an Invertd)")
    return lab


class MonaiBundle(LearnedTool):
    name = "monai_bundle"
    description = ("Segmentation with a MONAI bundle from your model store, run with the bundle's own inference config: "
                   "per label the volume (mL) or area (mm2), bbox and centroid, with a mask and overlay.")
    kind = "segment"
    adapter = "monai_bundle"
    card_kinds = frozenset({"segment"})
    requires = ("torch", "monai", "nibabel")
    dims = frozenset({2, 3})
    topics = ("segment", "segmentation", "volume", "organ", "tumor", "tumour", "lesion", "mask", "label", "spleen",
              "liver", "kidney", "pancreas", "lung", "brain", "size", "extent", "ml")
    timeout_s = 600.0  # sliding-window inference of a whole CT on CPU takes minutes
    limitations = ("Only as good as the user's bundle and card; only the config's inference path; one single-channel "
                   "image; the config is code: add only trusted bundles.")
    validation = "the model card's own figures (dxagent models list)"
    Input = LearnedInput
    Output = MonaiBundleOutput

    # -- cards ------------------------------------------------------------------------------------------------
    def card_fits(self, card: ModelCard, view: ImageView) -> str | None:
        dims, channels = card.input.get("dims", 3), card.input.get("channels", 1)
        if dims not in (2, 3):
            return f"input.dims must be 2 or 3, not {dims!r}"
        if view.ndim_spatial != dims:
            return f"a {dims}D bundle; {view.id} is {view.ndim_spatial}D"
        if view.photometric == "RGB":
            return f"a single-channel bundle; {view.id} is RGB"
        if channels != 1:
            return f"the bundle takes {channels} input channels; this adapter feeds one image"
        return None

    # -- loading ----------------------------------------------------------------------------------------------
    def build(self, card: ModelCard, path: Path) -> Bundle:
        if not path.is_dir():
            raise ToolError(f"weights {path.name} is a file; a MONAI bundle is a folder with configs/ and models/")
        names = [str(card.input["config"])] if card.input.get("config") else list(CONFIG_NAMES)
        config = next((path / n for n in names if (path / n).is_file()), None)
        if config is not None and not config.resolve().is_relative_to(path.resolve()):
            raise ToolError(f"input.config {names[0]} lies outside the bundle")
        if config is None:
            raise ToolError(f"bundle {path.name} has no {' or '.join(names)}")
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            extra = " (models/model.ts, TorchScript, is not run)" if (path / "models" / "model.ts").is_file() else ""
            raise ToolError(f"bundle {path.name} has no {WEIGHTS_NAME}{extra}")
        import torch
        from monai.bundle import ConfigParser
        from monai.inferers import SimpleInferer

        dev = device()
        meta_file = path / "configs" / "metadata.json"
        meta: dict[str, Any] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                stage = f"{config.relative_to(path)} does not parse"
                parser = ConfigParser()
                parser.read_config(str(config))
                if meta_file.is_file():
                    stage = "configs/metadata.json does not parse"
                    meta = json.loads(meta_file.read_text())
                    parser.read_meta(meta)
                stage = f"{config.relative_to(path)} does not parse"
                out_dir = tempfile.mkdtemp(prefix="dxagent-bundle-out-")
                atexit.register(shutil.rmtree, out_dir, True)
                parser["bundle_root"] = str(path)
                parser["output_dir"] = out_dir
                parser["device"] = f"$torch.device('{dev}')"
                if "imports" in parser:
                    parser.get_parsed_content("imports")
                key = "network_def" if "network_def" in parser else "network" if "network" in parser else None
                if key is None:
                    raise ToolError(f"{config.relative_to(path)} has no network_def or network")
                stage = f"{config.relative_to(path)}: cannot build {key}"
                net = parser.get_parsed_content(key)
                stage = f"{WEIGHTS_NAME} does not fit {key}"
                state = _state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                net.load_state_dict(state, strict=True)
                net = net.to(dev).eval()
                stage = f"{config.relative_to(path)}: cannot build preprocessing"
                if "preprocessing" not in parser:
                    raise ToolError(f"{config.relative_to(path)} has no preprocessing")
                dropped: list[str] = []
                pre = _without_saving(parser.get_parsed_content("preprocessing"), dropped)
                stage = f"{config.relative_to(path)}: cannot build inferer"
                inferer = parser.get_parsed_content("inferer") if "inferer" in parser else SimpleInferer()
                stage = f"{config.relative_to(path)}: cannot build postprocessing"
                post = _without_saving(parser.get_parsed_content("postprocessing"), dropped) \
                    if "postprocessing" in parser else None
            except ToolError:
                raise
            except Exception as exc:
                raise ToolError(f"{stage}: {type(exc).__name__}: {one_line(exc, 160)}") from None
        fmt = meta.get("network_data_format", {}) if isinstance(meta, dict) else {}
        image_key = next(iter(fmt.get("inputs") or {}), "image")
        pred_key = next(iter(fmt.get("outputs") or {}), "pred")
        return Bundle(network=net, preprocessing=pre, inferer=inferer, postprocessing=post, image_key=image_key,
                      pred_key=pred_key, name=str(meta.get("name", path.name)), version=str(meta.get("version", "")),
                      inferer_text=_describe_inferer(inferer), device=dev, dropped=dropped)

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, ctx: ToolContext, inp: LearnedInput) -> MonaiBundleOutput:
        view = self.usable_view(ctx, inp.view)
        card = self.pick(view, inp.model)
        bundle: Bundle = self.load(card)
        import torch

        pixels = ctx.pixels(inp.view)
        three_d = pixels.ndim == 3
        spacing = tuple(float(s) for s in view.spacing_mm) if view.spacing_known else (1.0,) * pixels.ndim
        with tempfile.TemporaryDirectory(prefix="dxagent-bundle-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = Path(tmp) / "image.nii"
            affine = write_nifti(pixels, spacing, src)
            stage = "preprocessing"
            try:
                data = bundle.preprocessing({bundle.image_key: str(src)})
                if isinstance(data, list):  # a sampling transform returned several items; inference wants one
                    raise ToolError("the bundle's preprocessing returns several samples per image")
                image = data[bundle.image_key]
                image = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
                stage = "inference"
                with torch.no_grad():
                    pred = bundle.inferer(image[None].to(bundle.device), bundle.network)
                    if isinstance(pred, tuple | list):  # deep supervision heads: the first is the prediction
                        pred = pred[0]
                    data[bundle.pred_key] = pred[0]
                    stage = "postprocessing"
                    if bundle.postprocessing is not None:
                        data = bundle.postprocessing(data)
                stage = "reading its output"
                xyz = labels_from_prediction(data[bundle.pred_key], pixels.shape[::-1], affine)  # (x, y[, z])
            except ToolError:
                raise
            except Exception as exc:
                raise ToolError(f"bundle {card.name!r} failed in {stage}: {type(exc).__name__}: {one_line(exc, 160)}") \
                    from None
        labels = from_bundle_axes(xyz)
        if labels.min() < 0:
            raise ToolError(f"bundle {card.name!r} produced negative label values")

        if view.spacing_known:
            unit_size = float(np.prod(spacing)) / (1000.0 if three_d else 1.0)
            unit = "mL" if three_d else "mm2"
        else:
            unit_size, unit = 1.0, "voxels" if three_d else "px2"
        from scipy import ndimage as ndi

        top = max(len(card.labels), int(labels.max()))
        counts = np.bincount(labels.ravel(), minlength=top + 1)
        boxes = ndi.find_objects(labels, max_label=top)
        present = [k for k in range(1, top + 1) if counts[k]]
        coms = dict(zip(present, ndi.center_of_mass(labels > 0, labels, present), strict=True)) if present else {}
        stats = []
        for k in range(1, top + 1):
            n = int(counts[k])
            box, centroid = None, None
            if n:
                sl = boxes[k - 1]
                box = [int(s.start) for s in sl] + [int(s.stop) for s in sl]
                centroid = [round(float(c), 2) for c in coms[k]]
            name = card.labels[k - 1] if k <= len(card.labels) else f"label_{k}"
            stats.append(BundleLabel(index=k, label=name, voxels=n, amount=round(n * unit_size, 4 if three_d else 2),
                                     unit=unit, bbox=box, centroid=centroid))

        per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(1) if three_d else None
        k_slice = (int(np.argmax(per_slice)) if per_slice.any() else labels.shape[0] // 2) if three_d else None
        shown = pixels[k_slice] if three_d else pixels
        rgb = np.repeat(to_uint8(shown)[..., None], 3, axis=-1).astype(np.float32)
        lab2d = labels[k_slice] if three_d else labels
        for k in range(1, top + 1):
            sel = lab2d == k
            rgb[sel] = (1 - _ALPHA) * rgb[sel] + _ALPHA * np.array(_COLOURS[(k - 1) % len(_COLOURS)], dtype=np.float32)
        where = f" slice {k_slice}" if three_d else ""
        legend = ", ".join(f"{s.label} {s.index}" for s in stats[:8])
        ctx.save_png(rgb.round().astype(np.uint8), kind="overlay", description=f"{view.id}{where}: {card.name} labels "
                     f"({legend})")
        ctx.save_mask(labels.clip(0, 255), description=f"{view.id}: {card.name} label map ({legend}; 0 background)",
                      legend={s.index: s.label for s in stats if s.index <= 255}, view=view.id)

        notes = []
        if not view.spacing_known:
            notes.append("spacing unknown: written to the bundle as 1 mm, amounts in voxels/pixels")
        if bundle.dropped:
            notes.append(f"saving transforms not run: {', '.join(sorted(set(bundle.dropped)))}")
        if top > len(card.labels):
            notes.append(f"the bundle produced label values above the card's {len(card.labels)} labels")
        if top > 255:
            notes.append("label values above 255 are clipped in the saved mask")
        return MonaiBundleOutput(model=card.name, model_version=card.version, weights_sha256=card.sha256,
                                 bundle_name=bundle.name, bundle_version=bundle.version, labels=stats, unit=unit,
                                 spatial_dims=pixels.ndim, spacing_known=view.spacing_known, inferer=bundle.inferer_text,
                                 device=bundle.device, overlay_slice=k_slice, model_card=model_used(card), note="; ".join(notes))

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, MonaiBundleOutput)
        what = "volume" if output.spatial_dims == 3 else "area"
        out = []
        for s in output.labels:
            if not s.voxels:
                continue
            if output.spatial_dims == 3 and s.bbox:
                location = f"slices {s.bbox[0]}-{s.bbox[3] - 1}, centroid (z, row, col) {s.centroid}"
                bbox = [float(s.bbox[1]), float(s.bbox[2]), float(s.bbox[4]), float(s.bbox[5])]  # in-plane extent
            else:
                location = f"centroid (row, col) {s.centroid}"
                bbox = [float(v) for v in s.bbox] if s.bbox else None
            out.append(FindingDraft(label=s.label, present=None, location=location, bbox=bbox,
                                    measurements=[Measurement(name=what, value=s.amount, unit=s.unit)],
                                    note=f"segmented by {output.model} ({output.bundle_name})"))
        return out

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, MonaiBundleOutput)
        found = [f"{s.label} {s.amount:g} {s.unit}" for s in output.labels if s.voxels]
        none = [s.label for s in output.labels if not s.voxels]
        text = "; ".join(found[:4]) + (f" +{len(found) - 4} more" if len(found) > 4 else "")
        if none:
            text += ("; " if text else "") + f"none of {', '.join(none[:3])}" + ("…" if len(none) > 3 else "")
        return f"{output.model}: {text} ({output.inferer}, {output.device})"
