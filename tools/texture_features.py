"""texture_features: IBSI radiomics features (shape, first order, GLCM/GLRLM/GLSZM) of a region, through MIRP.

The computation is MIRP's (Medical Image Radiomics Processor, oncoray/mirp, EUPL-1.2; Zwanenburg et al.,
an IBSI-compliant implementation validated against the IBSI 1 reference values): `mirp.extract_features`
with `ibsi_compliant=True` (the default) and the feature families morphology, statistics, glcm, glrlm and
glszm. Feature names are MIRP's IBSI abbreviations (`stat_mean`, `cm_contrast_d1_2d_s_mrg_fbn_n32`, ...).

The region, on one view:

* `bbox` [row0, col0, row1, col1] (pixels, end exclusive, or fractions when all four lie in [0, 1]), on a
  volume over `slices` [z0, z1] (end exclusive; default all slices); and/or
* `mask_from`: an earlier tool's mask, named by its evidence id ("E3"; that evidence must hold exactly
  one mask) or its sha256 (at least 8 hex digits); looked up among the artifacts of this case's
  evidence, read with `store.get_array`. `mask_label` picks one label of a label mask (cxr_lung_fields:
  1 right, 2 left; ct_tissue_composition labels), default every non-zero pixel. A 2D mask on a volume
  (a slice mask) needs `slices` to say which slice(s) it lies on. With a box as well, the region is the
  mask inside the box;
* `threshold` [lo, hi] keeps only voxels with lo <= value <= hi inside that (e.g. an HU range on CT).

Intensities: CT whose values look like Hounsfield units: HU, rounded to integers by MIRP (its CT
image class), discretised with a FIXED BIN SIZE of `bin_width_hu` (25 HU) starting at the threshold's
lower bound, else at -1000 HU (MIRP's CT default; voxels below it fall in bin 1). Every other image
(MR, US, radiographs, CT exported to PNG, PET, ...): MIRP's generic image, FIXED BIN NUMBER `bins` (32)
between the ROI's min and max. RGB images: converted to gray luminance first (skimage rgb2gray, 0..1).
The output's `discretisation` says which was used.

Geometry: 2D images are MIRP's by-slice (2D) case: GLCM and GLRLM from the 4 in-plane directions at
distance 1, merged per slice ("2d_slice_merge"), GLSZM with 8-connected zones ("2d"). MIRP's
morphology is 3D only (IBSI benchmarks shape features in 3D only), so a 2D image is a slab one unit thick:
`morph_vol_approx` (pixel count x pixel area x 1) is then the area in mm² (px² when spacing is
unknown), `morph_diam` the largest in-plane diameter; the slab's surface-based features (area_mesh,
sphericity, compactness) are kept in `all_features` but not in the summary `features`. Volumes: 3D,
13 directions merged ("3d_volume_merge"), 26-connected zones, volumes in mm³. Spacing from the view in
mm; unknown spacing: 1 px per axis, and the output says so.

How MIRP is called, and why:

* the image and mask go in as MIRP `ImageNumpyFile` / `MaskNumpyFile` objects (its numpy import layer,
  documented as public in MIRP's design notes) pointing at .npy files in a temporary folder, because
  that is the one way to hand MIRP a numpy array WITH its voxel spacing: a bare array passed to
  `extract_features(image=arr, ...)` always gets spacing 1.0 (an `image_spacing=` keyword is silently
  ignored, checked in MIRP 2.7.0), and NIfTI files go through ITK, whose first use costs ~3.6 s;
* the arrays are cropped to the ROI's bounding box plus one voxel (none of the five families looks
  outside the ROI; MIRP pads for the mesh itself);
* MIRP's Moran's I / Geary's C (morphology) loop a Python lambda over every voxel pair of each
  100-voxel sample and take 10-20 s per ROI; `_vectorised_spatial_distribution` replaces that one
  inner routine with the same formula vectorised (same pairs, same weights, same seeded samples;
  tests check it against MIRP's own to 1e-9), which brings a call to ~1 s;
* MIRP calls `logging.basicConfig(level=INFO, stream=stdout)`; a NullHandler on the root logger during
  the call keeps that from reconfiguring the host process's logging. Calls are serialised by a lock
  (MIRP caches per-feature data in class-level lru_caches).

Limits: ROIs of fewer than 16 voxels and ROIs holding NaN/Inf are refused (ToolError); ROIs over
`MAX_ROI_VOXELS` are refused with a request for a smaller box or fewer slices (see bench figures).

Validation (tests/test_texture_features.py: phantoms against analytic values):

* disc r = 40 px at 0.5 mm: area (morph_vol_approx) -0.03 %, max diameter +1.3 % (the mesh edge lies half a
  pixel out);
* sphere r = 9 mm on 2 x 0.5 x 0.5 mm voxels: mesh volume +0.7 %, voxel-count volume +1.1 %, max diameter
  +10 % (half a 2-mm slice beyond each pole), sphericity 0.84 (the staircase surface reads ~20 % too
  large; 0.92 on 1 mm voxels, where diameters are +3-6 % and volumes within 1.5 % for r = 9-15 mm);
* constant and two-level ROIs: mean, variance, p10/p90, skewness exact; 1-px checkerboard: GLCM contrast
  exactly (N-1)^2 n / (2n-1) for N = 32 and 8 bins;
* pydicom CT_small.dcm, box + [-100, 200] HU: voxel count, mean and variance equal numpy's on the same voxels.

Time per call (bench/bench_texture_features.py, shared 2-core CPU, two runs): BUSI ultrasound 128x128 box
0.4-0.7 s, COVID-CT PNG slice 0.6-1.5 s, CT_small 0.6-1.1 s; 2D boxes up to 256x256 0.2-1.1 s, 512x512
1.5-2.1 s; 3D boxes up to 262k voxels 0.2-1.2 s; irregular 3D ROIs of 83k-147k voxels 1.5-2.1 s, a very
ragged 256k-voxel one 8 s; 1M voxels would take 6-14 s, hence the limit. MIRP's own Moran's I loop alone
took 10-12 s on a 64x64 box.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import threading
import warnings
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from skimage.color import rgb2gray
from skimage.segmentation import find_boundaries

from agent.analysis.display import bbox_to_px, is_rgb, looks_like_hu, shrink_for_display, to_uint8
from agent.core.state import ArtifactRef, ImageView
from agent.core.tool import FindingDraft, Measurement, Tool, ToolContext, ToolError, ToolInput

MIN_ROI_VOXELS = 16
MAX_ROI_VOXELS = 300_000  # ~1-2 s for a box of this size, up to ~8 s for a ragged one (bench/bench_texture_features.py)
FAMILIES = ["morphology", "statistics", "glcm", "glrlm", "glszm"]
_FEATURE_PREFIXES = ("morph_", "stat_", "cm_", "rlm_", "szm_")

# the compact summary: IBSI feature bases (MIRP appends the distance/aggregation/discretisation suffix)
SUMMARY_MORPH_3D = ("morph_volume", "morph_area_mesh", "morph_sphericity", "morph_diam", "morph_pca_elongation",
                    "morph_vol_dens_conv_hull")
SUMMARY_MORPH_2D = ("morph_vol_approx", "morph_diam", "morph_pca_maj_axis", "morph_pca_min_axis",
                    "morph_pca_elongation", "morph_vol_dens_conv_hull")
SUMMARY_REST = ("stat_mean", "stat_var", "stat_skew", "stat_kurt", "stat_p10", "stat_p90",
                "cm_contrast", "cm_corr", "cm_energy", "cm_inv_diff", "cm_joint_entr",
                "rlm_sre", "rlm_lre", "rlm_glnu_norm", "szm_sze", "szm_lze", "szm_z_perc")

_LOCK = threading.Lock()
_PATCHED = False


# ----------------------------------------------------------------------------------------------
# MIRP


def _vectorised_spatial_distribution(self: Any, data: Any) -> tuple[float, float]:
    """Moran's I and Geary's C of a voxel set, as MIRP's Data3DSpatial._spatial_distribution computes them
    (inverse-distance weights over every unordered voxel pair, physical distances), vectorised."""
    from scipy.spatial.distance import pdist

    n_v = len(data)
    pos = data[["z", "y", "x"]].values * np.asarray(self.spacing, dtype=float)
    w = 1.0 / pdist(pos)
    i, j = np.triu_indices(n_v, k=1)  # pdist's pair order
    g = np.asarray(data.g.values, dtype=float)
    dev = g - np.mean(g)
    denom = np.sum(w) * np.sum(dev**2)
    if not denom > 0.0:  # one intensity only: MIRP's convention
        return 1.0, 1.0
    moran = n_v * np.sum(w * dev[i] * dev[j]) / denom
    geary = (n_v - 1.0) * np.sum(w * (dev[i] - dev[j]) ** 2) / (2.0 * denom)
    return float(moran), float(geary)


def _patch_mirp() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from mirp._features import morph_3d_data

    cls = morph_3d_data.Data3DSpatial
    original = cls._spatial_distribution

    def spatial_distribution(self, data):
        if len(data) >= 2000:  # MIRP's own chunked loop (only reached with no_approximation)
            return original(self, data)
        return _vectorised_spatial_distribution(self, data)

    spatial_distribution.mirp_original = original  # type: ignore[attr-defined]
    cls._spatial_distribution = spatial_distribution
    _PATCHED = True


def mirp_version() -> str:
    return _pkg_version("mirp")


def compute_features(vol: np.ndarray, roi: np.ndarray, spacing: tuple[float, float, float], two_d: bool,
                     ct_hu: bool, bins: int = 32, bin_width: float = 25.0,
                     hu_range: tuple[float, float] | None = None) -> tuple[dict[str, float | None], list[str]]:
    """All MIRP features of `roi` (bool, (Z, H, W)) on `vol` (float, same shape), spacing (z, y, x) in mm.
    Returns ({feature: value or None}, MIRP's warnings)."""
    import mirp
    from mirp._data_import.numpy_file import ImageNumpyFile, MaskNumpyFile

    zz, rr, cc = np.nonzero(roi)
    sl = tuple(slice(max(0, int(a.min()) - 1), int(a.max()) + 2) for a in (zz, rr, cc))
    img = np.ascontiguousarray(vol[sl], dtype=np.float32)
    msk = np.ascontiguousarray(roi[sl], dtype=np.uint8)
    kwargs: dict[str, Any] = {"by_slice": two_d, "base_feature_families": FAMILIES}
    if ct_hu:
        kwargs.update(base_discretisation_method="fixed_bin_size", base_discretisation_bin_width=float(bin_width))
        if hu_range is not None:
            kwargs["resegmentation_intensity_range"] = [float(hu_range[0]), float(hu_range[1])]
    else:
        kwargs.update(base_discretisation_method="fixed_bin_number", base_discretisation_n_bins=int(bins))
    with _LOCK, tempfile.TemporaryDirectory(prefix="dxagent-mirp-") as tmp:
        _patch_mirp()
        ipath, mpath = Path(tmp) / "image.npy", Path(tmp) / "mask.npy"
        np.save(ipath, img)
        np.save(mpath, msk)
        sp = tuple(float(s) for s in spacing)
        image = ImageNumpyFile(file_path=str(ipath), image_spacing=sp, image_modality="ct" if ct_hu else "generic")
        mask = MaskNumpyFile(file_path=str(mpath), image_spacing=sp)
        root = logging.getLogger()
        guard = logging.NullHandler()
        root.addHandler(guard)  # MIRP's logging.basicConfig is then a no-op
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tables = mirp.extract_features(image=image, mask=mask, **kwargs)
        except Exception as exc:
            text = " ".join(str(exc).split())[:200]
            raise ToolError(f"MIRP failed: {type(exc).__name__}: {text}") from None
        finally:
            root.removeHandler(guard)
    if not tables:
        raise ToolError("MIRP returned no feature table for this ROI")
    row = tables[0].iloc[0].to_dict()
    feats: dict[str, float | None] = {}
    for k, v in row.items():
        if not str(k).startswith(_FEATURE_PREFIXES):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        feats[str(k)] = x if math.isfinite(x) else None
    msgs = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if text and text not in msgs and issubclass(w.category, UserWarning):
            msgs.append(text[:160])
    return feats, msgs


# ----------------------------------------------------------------------------------------------
# the tool


class TextureInput(ToolInput):
    bbox: list[float] | None = Field(
        None, min_length=4, max_length=4,
        description="box [row0, col0, row1, col1] in pixels (end exclusive), or fractions when all four lie in [0, 1]",
    )
    slices: list[int] | None = Field(
        None, min_length=2, max_length=2, description="volumes: slice range [z0, z1] (end exclusive); default all",
    )
    mask_from: str | None = Field(
        None, description="an earlier tool's mask: its evidence id (e.g. E3) or the mask's sha256 (8+ hex digits)",
    )
    mask_label: int | None = Field(None, ge=1, description="one label of a label mask (default: every non-zero pixel)")
    threshold: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[lo, hi]: keep only voxels with lo <= value <= hi (HU on CT)",
    )
    bins: int = Field(32, ge=8, le=256, description="fixed bin number for non-CT images")
    bin_width_hu: float = Field(25.0, gt=0, le=500, description="fixed bin size in HU for CT")


class Discretisation(BaseModel):
    method: str  # "fixed_bin_size" (CT in HU) or "fixed_bin_number"
    bins: int | None = None
    bin_width: float | None = None
    lower_bound: float | None = None  # fixed bin size: the first bin's lower edge
    unit: str  # "HU", "gray 0..1 (rgb luminance)" or "image units"


class TextureOutput(BaseModel):
    roi: str  # how the region was formed, e.g. "box", "mask E3 ∩ box", "... ∩ threshold [-100, 200]"
    dims: int  # 2 or 3
    roi_voxels: int
    roi_bbox: list[int]  # in-plane [row0, col0, row1, col1], end exclusive
    roi_slices: list[int] | None  # volumes: [z0, z1], end exclusive
    spacing_used: list[float]  # (z, row, col) given to MIRP; 2D: z is the unit slab thickness
    spacing_unit: str  # "mm", or "px (spacing unknown)"
    size: float  # 2D: area (morph_vol_approx); 3D: mesh volume (morph_volume)
    size_unit: str  # "mm2", "mm3", "px2", "px3"
    intensity_unit: str
    discretisation: Discretisation
    texture_aggregation: str
    features: dict[str, float | None]  # ~23 informative IBSI features, MIRP's names
    feature_count: int  # every feature MIRP computed (all_features)
    all_features: dict[str, float | None]
    mirp_version: str
    notes: list[str] = Field(default_factory=list)


def feature_base(name: str) -> str:
    """IBSI feature name without MIRP's distance / aggregation / discretisation suffix:
    "cm_contrast_d1_2d_s_mrg_fbn_n32" -> "cm_contrast", "szm_z_perc_3d_fbs_w25.0" -> "szm_z_perc"."""
    return re.sub(r"_(d\d|2d|2\.5d|3d).*$", "", name)


def _round(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.6g}")


def _find_mask(ctx: ToolContext, key: str) -> tuple[ArtifactRef, str]:
    key = key.strip()
    masks = [(e.id, a) for e in ctx.state.evidence if e.status == "ok" for a in e.artifacts if a.kind == "mask"]
    if re.fullmatch(r"[Ee]\d+", key):
        eid = key.upper()
        ev = ctx.state.evidence_by_id(eid)
        if ev is None:
            raise ToolError(f"mask_from {eid}: no such evidence (have {', '.join(e.id for e in ctx.state.evidence) or 'none'})")
        mine = [a for i, a in masks if i == eid]
        if not mine:
            raise ToolError(f"mask_from {eid}: {ev.tool} ({ev.status}) saved no mask")
        if len(mine) > 1:
            listed = "; ".join(f"{a.sha256[:12]} = {a.description}" for a in mine)
            raise ToolError(f"mask_from {eid}: it saved {len(mine)} masks, pass one sha256: {listed}")
        return mine[0], eid
    if re.fullmatch(r"[0-9a-fA-F]{8,64}", key):
        hits = {a.sha256: (i, a) for i, a in masks if a.sha256.startswith(key.lower())}
        if not hits:
            raise ToolError(f"mask_from {key[:12]}: no mask with that sha256 in this case's evidence")
        if len(hits) > 1:
            raise ToolError(f"mask_from {key}: prefix matches {len(hits)} masks; give more digits")
        eid, ref = next(iter(hits.values()))
        return ref, f"{eid} {ref.sha256[:12]}"
    raise ToolError(f"mask_from {key[:20]!r}: give an evidence id like E3 or a mask's sha256 (8+ hex digits)")


class TextureFeatures(Tool):
    name = "texture_features"
    description = ("IBSI radiomics of a region (MIRP): shape, intensity statistics, GLCM/GLRLM/GLSZM texture; "
                   "bbox=[r0,c0,r1,c1] and/or mask_from=E<n> (an earlier mask), optional threshold [lo,hi].")
    version = "1"
    kind = "measure"
    describes = frozenset({"SM"})  # a pathology tile: its texture is the finding
    describe_args = {"bbox": [0, 0, 1, 1]}  # the whole tile (fractions)
    needs_region = True  # a box or an earlier mask
    topics = ("texture", "radiomics", "heterogeneity", "homogeneity", "glcm", "entropy", "shape", "sphericity",
              "first order", "features", "roi")
    timeout_s = 60.0
    limitations = ("describes exactly the region given (no segmentation); feature values depend on the "
                   "discretisation (fixed bin size 25 HU on CT, 32 bins elsewhere) and are comparable only between "
                   "ROIs with the same settings and similar spacing; 2D images get MIRP's 3D shape features of a "
                   "one-unit slab (area, diameters, solidity kept); ROIs of < 16 or > 300,000 voxels refused; "
                   "no diagnostic meaning on its own")
    validation = ("phantoms vs analytic values: disc area -0.03 %, diameter +1.3 %; sphere on 2x0.5x0.5 mm voxels: volume "
                  "+0.7 %, diameter +10 %, sphericity 0.84; constant/two-level mean and variance and checkerboard GLCM "
                  "contrast exact; CT_small HU range: voxel count and mean HU equal numpy's. Time per call (2-core CPU): "
                  "BUSI 0.4-0.7 s, COVID-CT slice 0.6-1.5 s, CT_small 0.6-1.1 s, 3D boxes up to 262k voxels <= 1.2 s, "
                  "ragged 256k-voxel ROI 8 s")
    Input = TextureInput
    Output = TextureOutput

    def run(self, ctx: ToolContext, inp: TextureInput) -> TextureOutput:
        view = self.usable_view(ctx, inp.view)
        if inp.bbox is None and inp.mask_from is None:
            raise ToolError("give a region: bbox [row0, col0, row1, col1] and/or mask_from (an earlier mask's evidence id)")
        arr = ctx.pixels(inp.view)
        rgb = is_rgb(view)
        notes: list[str] = []
        if rgb:
            img = rgb2gray(arr).astype(np.float32)
            notes.append("RGB converted to gray luminance (skimage rgb2gray, 0..1) before feature extraction")
        else:
            img = np.asarray(arr, dtype=np.float32)
        two_d = img.ndim == 2
        vol = img[None] if two_d else img
        nz, h, w = vol.shape

        region, parts = self._region(ctx, inp, vol.shape, two_d, notes)
        inside = vol[region]
        bad = int(inside.size - np.count_nonzero(np.isfinite(inside)))
        if bad:
            raise ToolError(f"the ROI holds {bad} NaN/Inf voxel(s); texture features need finite intensities")
        ct_hu = view.modality == "CT" and not rgb and looks_like_hu(img)
        if inp.threshold is not None:
            lo, hi = (float(v) for v in inp.threshold)
            if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
                raise ToolError(f"threshold {inp.threshold} must be two finite numbers [lo, hi] with lo <= hi")
            region &= (vol >= lo) & (vol <= hi)
            parts.append(f"threshold [{lo:g}, {hi:g}]")
        n = int(region.sum())
        if n < MIN_ROI_VOXELS:
            raise ToolError(f"ROI has {n} voxel(s); texture features need at least {MIN_ROI_VOXELS}")
        if n > MAX_ROI_VOXELS:
            raise ToolError(f"ROI has {n:,} voxels, over the {MAX_ROI_VOXELS:,} limit (MIRP's 3D texture gets slow): "
                            "give a smaller bbox or fewer slices")

        if view.spacing_known:
            sp = tuple(float(s) for s in view.spacing_mm)
            spacing = (1.0, *sp) if two_d else sp
            sp_unit = "mm"
        else:
            spacing = (1.0, 1.0, 1.0)
            sp_unit = "px (spacing unknown)"
            notes.append("pixel spacing unknown: 1 px per axis, sizes in px")
        if view.modality == "CT" and not ct_hu and not rgb:
            notes.append("CT without Hounsfield units (e.g. an exported picture): fixed bin number, not 25 HU bins")
        if ct_hu:
            lower = float(inp.threshold[0]) if inp.threshold is not None else -1000.0
            disc = Discretisation(method="fixed_bin_size", bin_width=float(inp.bin_width_hu), lower_bound=lower, unit="HU")
            iunit = "HU"
        else:
            iunit = "gray 0..1 (rgb luminance)" if rgb else "image units"
            disc = Discretisation(method="fixed_bin_number", bins=int(inp.bins), unit=iunit)
        hu_range = (float(inp.threshold[0]), float(inp.threshold[1])) if (ct_hu and inp.threshold is not None) else None

        feats, warns = compute_features(vol, region, spacing, two_d, ct_hu, inp.bins, inp.bin_width_hu, hu_range)
        for msg in warns:
            if "default value -1000" in msg:
                continue  # reported in `discretisation.lower_bound`
            notes.append("MIRP: " + msg)
        if two_d:
            notes.append("2D: MIRP's shape features are 3D; the image is a slab one unit thick, so morph_vol_approx "
                         "is the area and surface-based shape features (in all_features) describe the slab")
        picked = self._summary_features(feats, two_d)
        zz, rr, cc = np.nonzero(region)
        unit = view.length_unit
        size_key = "morph_vol_approx" if two_d else "morph_volume"
        size = feats.get(size_key)
        if size is None:
            raise ToolError(f"MIRP gave no {size_key} for this ROI")
        self._overlay(ctx, view, vol, region, rgb, arr)
        return TextureOutput(
            roi=" ∩ ".join(parts), dims=2 if two_d else 3, roi_voxels=n,
            roi_bbox=[int(rr.min()), int(cc.min()), int(rr.max()) + 1, int(cc.max()) + 1],
            roi_slices=None if two_d else [int(zz.min()), int(zz.max()) + 1],
            spacing_used=[float(s) for s in spacing], spacing_unit=sp_unit, size=_round(size) or 0.0,
            size_unit=unit + ("2" if two_d else "3"), intensity_unit=iunit, discretisation=disc,
            texture_aggregation=("2D: GLCM/GLRLM of the 4 in-plane directions at distance 1 merged (2d_slice_merge), "
                                 "GLSZM 8-connected (2d)") if two_d else
                                ("3D: GLCM/GLRLM of 13 directions at distance 1 merged (3d_volume_merge), "
                                 "GLSZM 26-connected (3d)"),
            features={k: _round(v) for k, v in picked.items()}, feature_count=len(feats),
            all_features={k: _round(v) for k, v in feats.items()}, mirp_version=mirp_version(), notes=notes,
        )

    @staticmethod
    def _summary_features(feats: dict[str, float | None], two_d: bool) -> dict[str, float | None]:
        wanted = (SUMMARY_MORPH_2D if two_d else SUMMARY_MORPH_3D) + SUMMARY_REST
        by_base = {feature_base(k): k for k in feats}
        return {by_base[b]: feats[by_base[b]] for b in wanted if b in by_base}

    @staticmethod
    def _region(ctx: ToolContext, inp: TextureInput, shape: tuple[int, int, int], two_d: bool,
                notes: list[str]) -> tuple[np.ndarray, list[str]]:
        nz, h, w = shape
        z0, z1 = 0, nz
        if inp.slices is not None:
            if two_d:
                raise ToolError("slices applies to volumes only; this view is 2D")
            z0, z1 = max(0, int(inp.slices[0])), min(nz, int(inp.slices[1]))
            if z1 <= z0:
                raise ToolError(f"slices {inp.slices} select nothing of the {nz} slices")
        region = np.zeros(shape, dtype=bool)
        region[z0:z1] = True
        parts: list[str] = []
        if inp.mask_from is not None:
            ref, where = _find_mask(ctx, inp.mask_from)
            try:
                m = np.asarray(ctx.store.get_array(ref))
            except (OSError, ValueError) as exc:
                raise ToolError(f"mask_from {where}: cannot read the mask ({type(exc).__name__})") from None
            m = m == inp.mask_label if inp.mask_label is not None else m != 0
            if m.shape == (nz, h, w) and not two_d:
                pass
            elif m.shape == (h, w):
                if not two_d and inp.slices is None:
                    raise ToolError(f"mask_from {where} is one 2D slice ({h}×{w}) of this volume ('{ref.description}'): "
                                    "give slices [k, k+1] for the slice it lies on")
                m = np.broadcast_to(m, shape)
                if not two_d and z1 - z0 > 1:
                    notes.append(f"the 2D mask is repeated on slices {z0}..{z1 - 1}")
            else:
                raise ToolError(f"mask_from {where} is {'×'.join(map(str, m.shape))} but view {inp.view} is "
                                f"{'×'.join(map(str, (h, w) if two_d else (nz, h, w)))} (a mask of another view?)")
            if not m.any():
                raise ToolError(f"mask_from {where} is empty" + (f" for label {inp.mask_label}" if inp.mask_label else ""))
            region &= m
            parts.append(f"mask {where}" + (f" label {inp.mask_label}" if inp.mask_label is not None else ""))
        elif inp.mask_label is not None:
            raise ToolError("mask_label applies to mask_from only")
        if inp.bbox is not None:
            try:
                r0, c0, r1, c1 = bbox_to_px(inp.bbox, h, w)
            except ValueError as exc:
                raise ToolError(str(exc)) from None
            box = np.zeros((h, w), dtype=bool)
            box[r0:r1, c0:c1] = True
            region &= box
            parts.append(f"box [{r0}, {c0}, {r1}, {c1}]")
            if not two_d and inp.slices is None and inp.mask_from is None:
                notes.append(f"the box covers all {nz} slices (no slices given)")
        if inp.slices is not None:
            parts.append(f"slices [{z0}, {z1}]")
        return region, parts

    @staticmethod
    def _overlay(ctx: ToolContext, view: ImageView, vol: np.ndarray, region: np.ndarray, rgb: bool,
                 arr: np.ndarray) -> None:
        k = int(np.argmax(region.reshape(region.shape[0], -1).sum(axis=1)))
        base = np.array(arr, dtype=np.uint8) if rgb else np.repeat(to_uint8(vol[k])[..., None], 3, axis=-1)
        base[find_boundaries(region[k], mode="inner")] = (0, 255, 255)
        where = f" slice {k}" if vol.shape[0] > 1 else ""
        base, scale = shrink_for_display(base)
        ctx.save_png(base, kind="overlay", description=f"{view.id}{where}: texture ROI outline (cyan){scale}")

    def findings(self, output: BaseModel, view: ImageView) -> list[FindingDraft]:
        assert isinstance(output, TextureOutput)
        f = output.all_features
        unit = "mm" if output.spacing_unit == "mm" else "px"
        ms = []
        if output.dims == 2:
            ms.append(Measurement(name="area", value=output.size, unit=output.size_unit))
        elif unit == "mm":
            ms.append(Measurement(name="volume", value=_round(output.size / 1000.0) or 0.0, unit="mL"))
        else:
            ms.append(Measurement(name="volume", value=output.size, unit="px3"))
        if f.get("morph_diam") is not None:
            ms.append(Measurement(name="max_diameter", value=f["morph_diam"], unit=unit))
        iu = "HU" if output.intensity_unit == "HU" else "a.u."
        for key, name, u in (("stat_mean", "mean_intensity", iu), ("cm_contrast", "glcm_contrast", "a.u."),
                             ("cm_joint_entr", "glcm_joint_entropy", "a.u.")):
            hit = next((v for k, v in output.features.items() if feature_base(k) == key and v is not None), None)
            if hit is not None:
                ms.append(Measurement(name=name, value=hit, unit=u))
        b = output.roi_bbox
        return [FindingDraft(label="ROI radiomics features", present=None, location=output.roi,
                             bbox=[float(v) for v in b], measurements=ms,
                             note=f"{output.feature_count} IBSI features (MIRP {output.mirp_version}); "
                                  + self._disc_text(output.discretisation))]

    @staticmethod
    def _disc_text(d: Discretisation) -> str:
        if d.method == "fixed_bin_size":
            return f"fixed bin size {d.bin_width:g} HU from {d.lower_bound:g} HU"
        return f"fixed bin number {d.bins}"

    def summary(self, output: BaseModel) -> str:
        assert isinstance(output, TextureOutput)
        g = {feature_base(k): v for k, v in output.features.items()}
        size = f"{'area' if output.dims == 2 else 'volume'} {output.size:g} {output.size_unit}"
        parts = [f"{output.roi_voxels} vox", size]
        if g.get("stat_mean") is not None:
            sd = math.sqrt(g["stat_var"]) if g.get("stat_var") is not None else float("nan")
            parts.append(f"mean {g['stat_mean']:g} ± {sd:.4g} {output.intensity_unit}")
        for key, label in (("cm_contrast", "GLCM contrast"), ("cm_joint_entr", "joint entropy"), ("szm_z_perc", "zone %")):
            if g.get(key) is not None:
                parts.append(f"{label} {g[key]:.4g}")
        tail = f"{output.feature_count} IBSI features, {self._disc_text(output.discretisation)}"
        if output.spacing_unit != "mm":
            tail += ", spacing unknown"
        return f"texture of {output.roi}: " + ", ".join(parts) + f" ({tail})"
