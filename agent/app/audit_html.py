"""The HTML audit view of one run: a single self-contained file (inline CSS, images as data: URIs, no script).

It reads a trace dump (`TraceStore.dump(run_id)` or `dxagent trace export` JSON via `agent.store.trace.load_dump`) and
the artifact files under `artifact_root`, and shows: the run header with the seal check; every view with its
overlays (masks as translucent fills, boxes and measurement lines as SVG over the pixels, each labelled with its
evidence id) and the tools' own overlay PNGs; the think / act / rethink timeline; the final report, whose evidence
ids link to the act step that produced them. Everything from the trace is untrusted text: the template autoescapes.
A missing key or artifact file is shown as such, never raised.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import ChainableUndefined, Environment, PackageLoader
from markupsafe import Markup, escape

MAX_SIDE = 1024  # longest side of an embedded picture (pixels); overlay coordinates stay in the view's own pixels
THUMB_SIDE = 240
MAX_BOXES = 50  # per evidence
PALETTE = [(255, 70, 70), (60, 200, 255), (90, 230, 90), (255, 200, 0), (225, 90, 255), (255, 140, 0)]
DISCLAIMER = ("RESEARCH USE ONLY. dxagent is not a medical device; this record shows what automated tools did and must "
              "not be used for diagnosis or treatment decisions.")
_CITE = re.compile(r"\[(E\d+(?:\s*,\s*E\d+)*)\]")
_BOX_KEYS = {"bbox": "box", "bbox_px": "crop region", "prompt_box": "prompt box"}


def _loads(value: Any, default: Any) -> Any:
    """A JSON column (string) or an already parsed value; `default` when absent or unreadable."""
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return default


def _d(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _key(text: str) -> str:
    """An id from the trace made safe for an element id and a CSS selector."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(text))


def _nums(v: Any) -> list[float] | None:
    if isinstance(v, list) and v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        return [float(x) for x in v]
    return None


def _pretty(v: Any, indent: int = 0, width: int = 100) -> str:
    """JSON, indented only where a value does not fit on one line (lists of numbers stay on one line)."""
    flat = json.dumps(v, ensure_ascii=False, default=str)
    if len(flat) + indent <= width or not isinstance(v, dict | list) or not v:
        return flat
    pad = " " * (indent + 2)
    if isinstance(v, dict):
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_pretty(x, indent + 2, width)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + _pretty(x, indent + 2, width) for x in v) + "\n" + " " * indent + "]"


def _png_uri(img: np.ndarray, max_side: int = MAX_SIDE, nearest: bool = False) -> str:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _to_uint8(a: np.ndarray, rgb: bool) -> np.ndarray:
    """Display pixels: gray through a 1st..99th percentile window, RGB as is (floats in 0..1 scaled)."""
    a = np.asarray(a)
    if rgb and a.dtype == np.uint8:
        return a[..., :3]
    f = np.nan_to_num(a.astype(np.float32))
    if rgb:
        return (f[..., :3] * (255.0 if float(f.max(initial=0)) <= 1.0 else 1.0)).clip(0, 255).astype(np.uint8)
    lo, hi = (float(v) for v in np.percentile(f, [1, 99]))
    return ((f - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).clip(0, 255).astype(np.uint8)


class _Reader:
    """Artifact files under the root; every problem becomes a note instead of an exception."""

    def __init__(self, root: Path | None):
        self.root = None if root is None else Path(root)

    def file(self, ref: Any) -> Path | None:
        if self.root is None or not isinstance(ref, dict) or not isinstance(ref.get("path"), str):
            return None
        f = self.root / ref["path"]
        return f if f.is_file() else None

    def array(self, ref: Any) -> tuple[np.ndarray | None, str]:
        f = self.file(ref)
        if f is None:
            return None, f"artifact missing: {_d(ref).get('kind', '?')} {_d(ref).get('path', '?')}"
        try:
            return np.load(f, mmap_mode="r", allow_pickle=False), ""  # a volume: only the slices shown are read
        except (OSError, ValueError) as exc:
            return None, f"artifact unreadable: {ref.get('path')} ({type(exc).__name__})"

    def png(self, ref: Any, max_side: int) -> tuple[str | None, str]:
        f = self.file(ref)
        if f is None:
            return None, f"artifact missing: {_d(ref).get('kind', '?')} {_d(ref).get('path', '?')}"
        try:
            from PIL import Image

            with Image.open(f) as im:
                im.load()
                if im.mode not in ("L", "RGB", "RGBA"):
                    im = im.convert("RGB")
                return _png_uri(np.asarray(im), max_side), ""
        except Exception as exc:  # a corrupt or non-PNG file: say so, never crash the page
            return None, f"artifact unreadable: {ref.get('path')} ({type(exc).__name__})"


def _place(box: dict) -> tuple[float, ...]:
    return box["y"], box["x"], box["h"], box["w"]


def _shapes(eid: str, output: Any, z: int | None) -> tuple[list[dict], list[dict]]:
    """Boxes and measurement lines in a tool's output, in the view's (row, col) pixels, on slice z of a volume."""
    boxes: list[dict] = []
    lines: list[dict] = []

    def add_line(a: Any, b: Any, label: str, text: bool = True) -> None:
        pa, pb = _nums(a), _nums(b)
        if pa and pb and len(pa) == len(pb) == 2:
            lines.append({"eid": eid, "label": f"{eid} {label}", "text": f"{eid} {label}" if text else "",
                          "y1": pa[0], "x1": pa[1], "y2": pb[0], "x2": pb[1]})

    def walk(node: Any, label: str) -> None:
        if isinstance(node, list):
            for x in node:
                walk(x, label)
            return
        if not isinstance(node, dict):
            return
        label = str(node.get("label") or node.get("source_label") or label)
        score = node.get("score", node.get("confidence"))
        for key in _BOX_KEYS:
            b = _nums(node.get(key))
            if b and len(b) == 6:  # [z0, r0, c0, z1, r1, c1]
                b = b[1:3] + b[4:6] if z is None or b[0] <= z < b[3] else None
            sl = _nums(node.get("slices"))
            if b and len(b) == 4 and b[2] > b[0] and b[3] > b[1] and not (z is not None and sl and not sl[0] <= z < sl[1]):
                what = (label or "box") if key == "bbox" else _BOX_KEYS[key]
                text = " ".join(x for x in (eid, what, f"{score:.2f}" if isinstance(score, float) else "") if x)
                boxes.append({"eid": eid, "label": text, "y": b[0], "x": b[1], "h": b[2] - b[0], "w": b[3] - b[1]})
        for b in node["boxes"] if isinstance(node.get("boxes"), list) else []:
            walk({"bbox": b}, label)
        ends = node.get("longest_diameter_endpoints")
        if isinstance(ends, list) and len(ends) == 2:
            add_line(ends[0], ends[1], "longest diameter")
        rb, lb, mid = _nums(node.get("heart_right_border")), _nums(node.get("heart_left_border")), node.get("midline_col")
        if rb and lb and isinstance(mid, int | float):  # cxr_ctr: the cardiac half-widths joined at the midline
            m = min(max(float(mid), rb[1]), lb[1])
            add_line(rb, [rb[0], m], "cardiac width")
            add_line([lb[0], m], lb, "cardiac width", text=False)
        tc = _nums(node.get("thorax_cols"))
        if tc and len(tc) == 2 and isinstance(node.get("thorax_row"), int | float):
            add_line([node["thorax_row"], tc[0]], [node["thorax_row"], tc[1]], "thoracic width")
        for k, v in node.items():
            if isinstance(v, dict | list) and k not in (*_BOX_KEYS, "boxes", "longest_diameter_endpoints"):
                walk(v, label or str(k).rstrip("s"))  # a box in "candidates" is a candidate

    walk(output, "")
    unique: dict[tuple, dict] = {}
    for b in boxes:  # one box per place (a detector's box often reappears in a finding)
        unique.setdefault(_place(b), b)
    return list(unique.values())[:MAX_BOXES], lines


def _shape(view: dict, arr: np.ndarray | None) -> list[int]:
    if arr is not None:
        return list(arr.shape)
    dims = _nums(view.get("shape")) or [1.0, 1.0]
    return [max(1, int(d)) if math.isfinite(d) else 1 for d in dims]


def _slices(depth: int, mine: list[dict]) -> list[int]:
    """The slices of a volume worth showing: those a tool named (its slice_index, the slice of its overlay), the top
    candidate's centre slice, else the middle one; at most four."""
    picks: list[Any] = []
    for e in mine:
        args, out = _d(e.get("args")), _d(e.get("output"))
        picks += [args.get("slice_index"), out.get("slice_index"), out.get("overlay_slice")]
        first = next((c for v in out.values() if isinstance(v, list) for c in v[:1] if isinstance(c, dict)), {})
        centre = _nums(first.get("center") or first.get("centroid"))
        picks += [round(centre[0])] if centre and len(centre) == 3 and math.isfinite(centre[0]) else []
    zs = list(dict.fromkeys(int(p) for p in picks if isinstance(p, int) and 0 <= p < depth))
    return zs[:4] or [depth // 2]


def _figure(view: dict, mine: list[dict], arr: np.ndarray | None, note: str, rgb: bool, z: int | None,
            rd: _Reader, key: str) -> dict[str, Any]:
    """One picture of a view (one slice of a volume) with its overlay layers."""
    vid = str(view.get("id", "?"))
    shape = _shape(view, arr)
    h, w = ((shape[1:] if z is not None else shape) + [1, 1])[:2]
    fig: dict[str, Any] = {"id": vid, "key": _key(key), "view": view, "z": z,
                           "notes": [], "masks": [], "boxes": [], "lines": [], "overlays": [], "base": None, "h": h,
                           "w": w, "disp_w": round(min(720, max(512, w), 640 * w / max(h, 1))),
                           "font": round(max(h, w) / 28, 2)}
    if arr is None:
        fig["notes"].append(note)
    else:
        pic = arr[z] if z is not None else arr
        while pic.ndim > (3 if rgb else 2):
            pic = pic[pic.shape[0] // 2]
        fig["base"] = _png_uri(_to_uint8(pic, rgb))
    for i, e in enumerate(mine):
        eid, colour = str(e.get("id", "?")), PALETTE[i % len(PALETTE)]
        boxes, lines = _shapes(eid, e.get("output"), z)
        style = {"colour": f"rgb{colour}", "key": _key(eid)}
        for b in boxes:  # a box another tool already drew (a crop of a measured region): one label for both
            same = next((x for x in fig["boxes"] if _place(x) == _place(b)), None)
            if same is not None:
                same["text"] += " · " + b["label"]
            fig["boxes"].append(b | style | {"text": "" if same else b["label"]})
        fig["lines"] += [ln | style for ln in lines]
        for a in [a for a in _list(e.get("artifacts")) if isinstance(a, dict)]:
            if a.get("kind") == "overlay" and a.get("media_type") == "image/png":
                uri, note = rd.png(a, MAX_SIDE)
                fig["overlays"].append({"eid": eid, "uri": uri, "note": note, "description": a.get("description", "")})
            elif a.get("kind") == "mask" and str(a.get("path", "")).endswith(".npy"):
                m, note = rd.array(a)
                if m is not None and m.ndim == 3 and z is not None and m.shape[0] > z:
                    m = m[z]
                if m is None or m.shape != (h, w):
                    fig["notes"].append(f"{eid}: " + (note or f"mask shape {list(m.shape)} is not the view's {[h, w]}"))
                    continue
                rgba = np.zeros((h, w, 4), dtype=np.uint8)
                labels = np.asarray(m).astype(np.int64)
                for k in [int(v) for v in np.unique(labels) if v > 0][:len(PALETTE)]:
                    rgba[labels == k] = PALETTE[(i + k - 1) % len(PALETTE)] + (110,)
                fig["masks"].append({"eid": eid, "key": _key(eid), "uri": _png_uri(rgba, nearest=True),
                                     "label": f"{eid} mask: {a.get('description', '')}"})
    drawn = [x["eid"] for x in fig["masks"] + fig["boxes"] + fig["lines"]]
    tool_of = {str(e.get("id", "?")): e.get("tool", "?") for e in mine}
    fig["layers"] = [{"eid": e, "key": _key(e), "tool": tool_of.get(e)} for e in dict.fromkeys(drawn)]  # a switch each
    return fig


def _figures(views: list[dict], acts: list[dict], rd: _Reader) -> list[dict]:
    figs = []
    for view in views:
        mine = [e for e in acts if _d(e.get("args")).get("view", "V1") == view.get("id") and e.get("status") == "ok"]
        arr, note = rd.array(view.get("pixels"))
        shape = _shape(view, arr)
        rgb = view.get("photometric") == "RGB" or (arr is not None and arr.ndim == 3 and arr.shape[-1] in (3, 4)
                                                    and view.get("ndim_spatial", 2) == 2)
        zs = _slices(int(shape[0]), mine) if len(shape) >= 3 and not rgb else [None]
        for n, z in enumerate(zs):
            fig = _figure(view, mine, arr, note, rgb, z, rd, f"{view.get('id')}-z{z}" if n else str(view.get("id")))
            if n:  # the tools' own overlay images once per view; the first figure keeps the view's anchor
                fig["overlays"] = []
            figs.append(fig)
    return figs


def _artifact_rows(e: dict, rd: _Reader) -> list[dict]:
    rows = []
    for a in _list(e.get("artifacts")):
        if not isinstance(a, dict):
            continue
        row = {"a": a, "sha": str(a.get("sha256", ""))[:12], "thumb": None, "note": "", "shape": None}
        if rd.file(a) is None:
            row["note"] = "artifact missing"
        elif a.get("media_type") == "image/png":
            row["thumb"], row["note"] = rd.png(a, THUMB_SIDE)
        elif str(a.get("path", "")).endswith(".npy"):
            try:
                m = np.load(rd.file(a), mmap_mode="r", allow_pickle=False)
                row["shape"] = f"{list(m.shape)} {m.dtype}"
            except (OSError, ValueError) as exc:
                row["note"] = f"artifact unreadable ({type(exc).__name__})"
        rows.append(row)
    return rows


def render_html(dump: dict, artifact_root: Path | None) -> str:
    """The audit page of one dumped run, as one HTML string."""
    from agent.store.trace import verify_dump

    dump = _d(dump)
    run = dict(_d(dump.get("run")))
    events = [dict(e) for e in _list(dump.get("events")) if isinstance(e, dict)]  # copies: the caller's dump is left as is
    for e in events:
        e["payload"] = e.get("payload") if isinstance(e.get("payload"), dict) else {}
    rd = _Reader(artifact_root)
    checked_root = None
    views: list[dict] = []
    acts: list[dict] = []
    for e in events:
        p = e["payload"]
        views += [v for k in ("views", "new_views") if isinstance(p.get(k), list) for v in p[k] if isinstance(v, dict)]
        if e.get("kind") == "tool" and isinstance(p.get("evidence"), dict):
            acts.append(p["evidence"])
            e["artifact_rows"] = _artifact_rows(p["evidence"], rd)
    known = {str(a.get("id")) for a in acts}
    report = _loads(run.get("report"), None)
    if not isinstance(report, dict):
        reps = [e["payload"].get("report") for e in events if e.get("node") == "report" and e["payload"].get("report")]
        report = reps[-1] if reps and isinstance(reps[-1], dict) else None
    try:
        # an export copied without its artifacts folder: the record is still checked; the files show as missing
        checked_root = artifact_root if artifact_root is not None and Path(artifact_root).is_dir() else None
        problems = verify_dump(dump, checked_root) if run.get("id") else ["the dump has no run row"]
    except Exception as exc:  # a malformed dump: the page still renders and says why it could not be checked
        problems = [f"could not be verified: {type(exc).__name__}: {exc}"]
    t0 = min((float(e["t"]) for e in events if isinstance(e.get("t"), int | float)), default=0.0)

    def cite(text: Any) -> Markup:
        def link(m: re.Match) -> str:
            ids = [i.strip() for i in m.group(1).split(",")]
            return "[" + ", ".join(f'<a class="eid" href="#{i}">{i}</a>' if i in known else i for i in ids) + "]"
        return Markup(_CITE.sub(link, str(escape("" if text is None else text))))

    env = Environment(loader=PackageLoader("agent", "templates"), autoescape=True, undefined=ChainableUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(
        cite=cite, pretty=_pretty, key=_key, seq=_list,
        kv=lambda v: list(v.items()) if isinstance(v, dict) else [],
        rel=lambda t: f"+{float(t) - t0:.2f} s" if isinstance(t, int | float) else "")
    return env.get_template("audit.html.j2").render(
        run=run, versions=_loads(run.get("versions"), {}), settings=_loads(run.get("settings"), {}), events=events,
        figures=_figures(views, acts, rd), report=report, known=known, problems=problems, fmt=dump.get("format", "?"),
        artifact_root=str(artifact_root) if artifact_root else None, files_checked=checked_root is not None,
        disclaimer=DISCLAIMER)


def write_html(dump: dict, artifact_root: Path | None, out_path: str | Path) -> Path:
    """Render the run's audit page and write it (UTF-8); returns the path written."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(dump, artifact_root), encoding="utf-8")
    return out
