"""The HTML audit view (agent/app/audit_html.py) of real scripted runs, opened in a real headless Chromium via Playwright.

Playwright drives the system's chromium (scripts/install.sh installs Debian's package); no browser is downloaded.
Without playwright or a chromium binary the tests skip.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import Boom, answer, call
from PIL import Image
from pydicom.data import get_testdata_file

from agent.app.audit_html import write_html
from agent.engine.session import run_case, tools
from agent.store.trace import TraceStore

CT = get_testdata_file("CT_small.dcm")
QUESTION = "How large is the dominant region, and what is its tissue composition (fat, bone)?"

# Everything the page must show, read in the browser: images loaded, in-page links resolved, the SVG overlay.
CHECKS = """() => {
  const byId = id => document.getElementById(id);
  const refs = [...document.querySelectorAll('[href], [src]')].map(e => e.getAttribute('href') ?? e.getAttribute('src'));
  const svg = v => document.querySelector(`#view-${v} svg.overlay`);
  const attrs = (el, names) => el && Object.fromEntries(names.map(n => [n, parseFloat(el.getAttribute(n))]));
  const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  return {
    title: document.title,
    report: !!byId('report') && !!document.querySelector('#report table.findings'),
    images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt})),
    external: refs.filter(h => !(h.startsWith('#') || h.startsWith('data:'))),
    broken: refs.filter(h => h.startsWith('#') && !byId(h.slice(1))),
    anchors: refs.filter(h => h.startsWith('#')).length,
    reportLinks: [...document.querySelectorAll('#report a.eid')].map(a => {
      const t = byId(a.getAttribute('href').slice(1));
      return [a.textContent, t && t.classList.contains('act') ? t.dataset.evidence : null,
              t && t.closest('li') ? t.closest('li').id : null];
    }),
    steps: [...document.querySelectorAll('ol.timeline > li')].map(li => li.id),
    rect: attrs(svg('V1')?.querySelector('rect.ov-box[data-evidence="E1"]'), ['x', 'y', 'width', 'height']),
    line: attrs(svg('V1')?.querySelector('line.ov-line[data-evidence="E1"]'), ['x1', 'y1', 'x2', 'y2']),
    crop: attrs(svg('V1')?.querySelector('rect.ov-box[data-evidence="E2"]'), ['x', 'y', 'width', 'height']),
    masks: [...document.querySelectorAll('svg.overlay image.ov-mask')].map(m =>
      [m.closest('svg').dataset.view, m.dataset.evidence, m.getAttribute('href').startsWith('data:image/png;base64,')]),
    v2: !!svg('V2')?.querySelector('rect.ov-box[data-evidence="E3"]'),
    aligned: svg('V1') ? [box(svg('V1')), box(document.querySelector('#view-V1 img.base'))] : null,
    text: document.body.innerText,
  };
}"""


def open_page(browser, path: Path):
    """Load the file; every request is recorded, and anything but file:/data: is aborted."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen: dict[str, list[str]] = {"requests": [], "errors": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
               else route.abort())
    page.goto(path.as_uri(), wait_until="load")
    return page, seen


def render(tmp_path: Path, run_id: str) -> Path:
    dump = TraceStore(None, tmp_path).dump(run_id)
    return write_html(dump, tmp_path / "artifacts", tmp_path / "audit" / f"{run_id}.html")


def common(page, seen, run_id: str) -> dict:
    got = page.evaluate(CHECKS)
    assert run_id in got["title"] and got["report"]
    assert got["images"] and all(i["ok"] for i in got["images"]), got["images"]
    assert got["external"] == [] and got["broken"] == [] and got["anchors"] > 0
    assert seen["requests"] and all(u.startswith(("file:", "data:")) for u in seen["requests"]), seen["requests"]
    assert seen["errors"] == []
    assert "RESEARCH USE ONLY" in got["text"]
    return got


def test_audit_page_shows_overlays_timeline_and_linked_report(browser, tmp_path):
    res = run_case([CT], QUESTION, llm="scripted", trace_dir=tmp_path, route=False, script=[
        call("region_measure"), call("crop_zoom", bbox=[0, 88, 68, 128]), call("region_measure", view="V2"),
        call("ct_tissue_composition"), answer()])
    ev = {e.id: e for e in res.state.evidence}
    assert [(e.tool, e.status) for e in ev.values()] == [("region_measure", "ok"), ("crop_zoom", "ok"),
                                                         ("region_measure", "ok"), ("ct_tissue_composition", "ok")]
    page, seen = open_page(browser, render(tmp_path, res.run_id))
    got = common(page, seen, res.run_id)
    # the report's evidence links land on the act step of that evidence, and every report id is linked
    cited = {i for f in res.report["findings"] for i in f["evidence_ids"]}
    assert {t for t, _, _ in got["reportLinks"]} >= cited and cited
    assert all(t == target and li.startswith("step-") for t, target, li in got["reportLinks"]), got["reportLinks"]
    assert len(got["steps"]) == len(TraceStore(None, tmp_path).events(res.run_id))
    # E1's box and longest diameter drawn in V1's pixels; E2's crop box on V1; E3 on the derived view V2
    r0, c0, r1, c1 = ev["E1"].output["bbox"]
    assert got["rect"] == {"x": c0, "y": r0, "width": c1 - c0, "height": r1 - r0}
    (ar, ac), (br, bc) = ev["E1"].output["longest_diameter_endpoints"]
    assert got["line"] == {"x1": ac, "y1": ar, "x2": bc, "y2": br}
    assert got["crop"] == {"x": 88, "y": 0, "width": 40, "height": 68} and got["v2"]
    assert ["V1", "E1", True] in got["masks"] and ["V2", "E3", True] in got["masks"]
    svg_box, img_box = got["aligned"]
    assert svg_box == pytest.approx(img_box, abs=0.5)  # the overlay lies exactly over the pixels
    for step in ("planner call", "system prompt", "user prompt", "rethink", "tool overlay", "crop_zoom"):
        assert step in got["text"]
    # the mask really paints: over E1's mask pixels the page turns red with E1's layer on, not with it off (no script)
    mask = np.load(tmp_path / "artifacts" / next(a.path for a in ev["E1"].artifacts if a.kind == "mask")).astype(bool)
    stage = page.locator("#view-V1 .stage")

    def redness() -> float:
        shot = np.asarray(Image.open(io.BytesIO(stage.screenshot())).convert("RGB"), dtype=np.float32)
        h, w = mask.shape
        on_screen = mask[np.arange(shot.shape[0]) * h // shot.shape[0]][:, np.arange(shot.shape[1]) * w // shot.shape[1]]
        return float((shot[..., 0] - shot[..., 1])[on_screen].mean())

    page.click("label[for=layer-V1-E4]")  # the tissue map covers the whole slice
    on = redness()
    page.click("label[for=layer-V1-E1]")
    off = redness()
    assert on > 40 and abs(off) < 10, (on, off)


def test_failed_tool_rejected_reply_and_missing_artifacts_still_render(browser, tmp_path):
    ts = {**tools(), "boom": Boom()}
    question = "How large is the dominant region? <img src=x onerror=alert(1)>"
    res = run_case([CT], question, llm="scripted", trace_dir=tmp_path, tool_set=ts, route=False,
                   script=["not json at all", call("boom"), call("region_measure")])
    e1, e2 = res.state.evidence
    assert e1.status == "failed" and "kaboom" in e1.error and e2.status == "ok"
    for a in e2.artifacts:  # the mask and the overlay PNG are gone
        (tmp_path / "artifacts" / a.path).unlink()
    page, seen = open_page(browser, render(tmp_path, res.run_id))
    got = common(page, seen, res.run_id)
    text = got["text"]
    assert "<img src=x onerror=alert(1)>" in text  # the question is shown as text, never as markup
    step = page.locator("#E1")
    assert "failed" in step.inner_text() and "kaboom inside the tool" in step.inner_text()
    assert "rejected: reply is not JSON" in text
    assert text.count("artifact missing") >= 2 and "problem(s)" in text and "missing" in page.locator("#integrity").inner_text()
    # the measurement lines and box are still drawn from the evidence output, with no mask layer
    assert got["rect"] is None and got["masks"] == []
    assert page.locator('#view-V1 rect.ov-box[data-evidence="E2"]').count() == 1
