"""The reading room (agent/app/reading_room.py, agent/static/reading_room/): the page in a real headless Chromium
(Playwright driving the system's chromium: the `browser` fixture) against a real `dxagent serve` app on a loopback
socket, with the scripted planner calling the real tools on the bundled CT (pydicom's CT_small.dcm); and its endpoints
over the socket, refusals included. No engine is mocked."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import call, start_server
from test_serve import CT, IDENTIFIERS, sse, upload, wait

from agent.app.serve import ServeConfig, create_app
from agent.app.serve_runs import ServeSettings

QUESTION = "Which organs are visible, and what is the tissue composition of this CT slice?"
SCRIPT = [call("organ_segment"), call("ct_tissue_composition"), call("crop_zoom", bbox=[20, 20, 90, 90])]


def ask_on_the_ct(page) -> None:
    """Upload the bundled CT on the page and ask QUESTION, with the router off (the planner's steps are streamed)."""
    page.set_input_files("#file", CT)
    page.fill("#question", QUESTION)
    page.click("#open summary")
    page.check("#no-route")
    page.click("#ask")


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """create_app with the scripted planner (organ_segment, ct_tissue_composition, crop_zoom), one worker, a root
    holding the CT, on a loopback socket."""
    base = tmp_path_factory.mktemp("room")
    root = base / "root"
    (root / "cases" / "series").mkdir(parents=True)
    shutil.copy(CT, root / "cases" / "ct.dcm")
    shutil.copy(CT, root / "cases" / "series" / "a.dcm")
    (root / "cases" / "notes.txt").write_text("not an image\n")
    settings = ServeSettings(trace_dir=base / "traces", llm="scripted", script=SCRIPT, workers=1)
    app = create_app(ServeConfig(settings=settings, roots=[root], poll_s=0.05))
    server, t, url = start_server(app)
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        yield type("Room", (), {"client": client, "url": url, "base": base, "root": root, "settings": settings})
    server.should_exit = True
    t.join(timeout=10)


@pytest.fixture(scope="module")
def ct_run(room):
    """One finished upload run of the CT with the organ and tissue question."""
    r = upload(room.client, CT, QUESTION, route="false")  # the scripted planner chooses every call
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    assert wait(room.client, run_id, 120)["status"] == "done"
    return run_id


# -- the page in Chromium ----------------------------------------------------------------------------------------------
SNAPSHOT = """name => { const c = document.getElementById('canvas');
  window[name] = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  return new Set(window[name].filter((_, i) => i % 4 === 0)).size; }"""
CHANGED = "([a, b]) => window[a].reduce((n, v, i) => n + (v !== window[b][i]), 0)"  # bytes that differ


def test_page_open_ask_watch_overlay_evidence_download(room, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1500, "height": 1000}, accept_downloads=True)
    seen: dict[str, list[str]] = {"requests": [], "errors": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
    page.on("response", lambda r: seen["errors"].append(f"{r.status} {r.url}") if r.status >= 400 else None)
    try:
        page.goto(room.url + "/", wait_until="load")
        notice = page.locator(".ruo").first
        assert "RESEARCH USE ONLY" in notice.inner_text() and notice.is_visible()

        # open the bundled CT (an upload) and ask
        ask_on_the_ct(page)
        page.wait_for_selector("#events li[data-step=answer]", timeout=120_000)
        steps = page.eval_on_selector_all("#events li", "els => els.map(e => e.dataset.step)")
        assert steps.index("intake") < steps.index("act") < steps.index("answer"), steps
        acts = page.eval_on_selector_all("#events li[data-step=act]", "els => els.map(e => e.textContent)")
        assert any("organ_segment" in a and "[E1]" in a for a in acts), acts
        assert "fat" in page.inner_text("#answer-text")
        page.wait_for_selector("#report:not(.hidden) table", timeout=30_000)
        assert page.is_hidden("#push")  # an upload did not come from a PACS

        # the viewer: the CT drawn, the organ mask's labels as toggles; turning one off changes the canvas
        page.wait_for_selector("#mask-list input[data-label=liver]", timeout=30_000)
        page.wait_for_function("() => !document.getElementById('stage-empty').offsetParent")
        time.sleep(0.3)
        assert page.evaluate(SNAPSHOT, "before") > 20  # a picture (many grey levels), not a blank canvas
        page.uncheck("#mask-list input[data-label=liver]")
        page.evaluate(SNAPSHOT, "after")
        changed = page.evaluate(CHANGED, ["before", "after"])
        assert changed > 50, changed
        page.check("#mask-list input[data-label=liver]")
        page.evaluate(SNAPSHOT, "again")
        assert page.evaluate(CHANGED, ["before", "again"]) == 0

        # window/level preset, slice PNG re-rendered by the server
        page.select_option("#preset", "bone")
        page.wait_for_function("() => document.getElementById('wl-label').textContent === 'W 1800 L 400'")

        # an evidence id in the answer opens that evidence and its overlay
        page.click("#answer-text a.eid")
        page.wait_for_selector("#evidence:not(.hidden)")
        eid = page.inner_text("#evidence-id")
        assert eid == "E2" and "ct_tissue_composition" in page.inner_text("#evidence-body")
        assert page.locator("#tool-overlays figure[data-eid=E2] img").count() >= 1

        # the crop the agent made is a view of its own
        options = page.eval_on_selector_all("#view-select option", "els => els.map(e => e.textContent)")
        assert any("crop_zoom of V1" in o for o in options), options

        # a follow-up in the same thread: its turn streams, then its answer
        page.fill("#followup-q", "What is the mean HU of the fat?")
        page.click("#followup-ask")
        page.wait_for_selector("#events li[data-step=turn]", timeout=60_000)
        page.wait_for_function("() => { const s = [...document.querySelectorAll('#events li')].map(e => e.dataset.step);"
                               " return s.lastIndexOf('answer') > s.indexOf('turn') && !document.getElementById("
                               "'followup-ask').disabled; }", timeout=120_000)

        # download the DICOM SR: a DICOM file
        with page.expect_download() as dl:
            page.click("[data-dl=sr]")
        path = tmp_path / "sr.dcm"
        dl.value.save_as(path)
        import pydicom

        ds = pydicom.dcmread(path)
        assert path.read_bytes()[128:132] == b"DICM" and ds.Modality == "SR"
        got = {}
        for what in ("report.md", "report.json", "fhir", "audit", "seg"):  # every other download button
            with page.expect_download() as dl:
                page.click(f"[data-dl='{what}']")
            got[what] = Path(dl.value.path()).read_bytes()
        assert got["report.md"].startswith(b"#") and json.loads(got["report.json"])["run_id"]
        assert json.loads(got["fhir"])["resourceType"] == "Bundle" and b"<html" in got["audit"]
        assert got["seg"][128:132] == b"DICM"

        # nothing from elsewhere, no script errors, no identifier on the page
        assert all(u.startswith((room.url, "blob:", "data:")) for u in seen["requests"]), seen["requests"]
        assert seen["errors"] == [], seen["errors"]
        page.screenshot(path=str(tmp_path / "room.png"), full_page=True)
        text = page.inner_text("body")
        assert not [x for x in IDENTIFIERS if x in text]
    finally:
        page.close()


def test_page_stop_cancels_a_running_run_and_resume_finishes_it(room, browser, monkeypatch):
    """A planner that thinks for 3 s a decision (the server runs in this process): Stop during the run cancels it
    before its next step, the page says so and offers Resume, which finishes the run from its checkpoint."""
    from agent.llm import backends

    generate = backends.ScriptedChat._generate

    def slow(self, *a, **k):
        time.sleep(3)
        return generate(self, *a, **k)

    monkeypatch.setattr(backends.ScriptedChat, "_generate", slow)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        page.goto(room.url + "/", wait_until="load")
        ask_on_the_ct(page)
        page.wait_for_selector("#events li[data-step=intake]", timeout=60_000)
        assert page.is_enabled("#stop")
        page.click("#stop")
        page.wait_for_selector("#events li[data-step=stop]")
        page.wait_for_function("() => !document.getElementById('ask').disabled", timeout=60_000)
        run_id = page.evaluate("() => location.hash.split('=')[1]")
        run = room.client.get(f"/api/runs/{run_id}").json()
        assert run["status"] == "cancelled" and run["answer"] is None, run
        assert page.is_disabled("#stop")
        page.wait_for_selector("#resume:not(.hidden)")  # a cancelled run can be resumed: it then finishes
        monkeypatch.setattr(backends.ScriptedChat, "_generate", generate)
        page.click("#resume")
        page.wait_for_selector("#events li[data-step=answer]", timeout=120_000)
        page.wait_for_function("() => !document.getElementById('ask').disabled", timeout=60_000)
        assert room.client.get(f"/api/runs/{run_id}").json()["status"] == "done"
    finally:
        page.close()


def test_page_with_a_token(tmp_path, browser):
    """With DXAGENT_SERVE_TOKEN the page loads, asks for the token, and then every call - the event stream, the slice
    pictures, the downloads - carries it."""
    token = "t0k3n-" + "w" * 20
    settings = ServeSettings(trace_dir=tmp_path / "traces", llm="scripted", script=[call("ct_tissue_composition")])
    server, t, url = start_server(create_app(ServeConfig(settings=settings, roots=[tmp_path], token=token, poll_s=0.05)))
    page = browser.new_page(viewport={"width": 1500, "height": 1000}, accept_downloads=True)
    try:
        page.goto(url + "/", wait_until="load")
        page.wait_for_function("() => document.getElementById('token-box').open")  # the runs list got a 401
        assert "bearer token" in page.inner_text("#open-error")
        page.fill("#token", token)
        page.dispatch_event("#token", "change")
        page.set_input_files("#file", CT)
        page.fill("#question", "What is the tissue composition of this CT slice?")
        page.click("#ask")
        page.wait_for_selector("#events li[data-step=answer]", timeout=120_000)
        page.wait_for_function("() => !document.getElementById('stage-empty').offsetParent")
        with page.expect_download() as dl:
            page.click("[data-dl=fhir]")
        assert json.loads(Path(dl.value.path()).read_text())["resourceType"] == "Bundle"
    finally:
        page.close()
        server.should_exit = True
        t.join(timeout=10)


# -- the endpoints ------------------------------------------------------------------------------------------------------
def test_viewer_slices_and_masks(room, ct_run):
    c = room.client
    m = c.get(f"/api/runs/{ct_run}/viewer").json()
    v1 = next(v for v in m["views"] if v["id"] == "V1")
    assert v1["slices"] == 1 and v1["window"] == {"center": 40, "width": 400} and "lung" in v1["presets"]
    assert v1["orientation"] | {"source": ""} == {"left": "R", "right": "L", "top": "A", "bottom": "P",
                                                   "assumed": False, "source": ""}
    organ = next(x for x in m["masks"] if x["tool"] == "organ_segment")
    liver = next(lab for lab in organ["labels"] if lab["name"] == "liver")
    assert liver["pixels"] > 0 and organ["shape"] == [128, 128]
    assert m["evidence"]["E1"]["tool"] == "organ_segment" and any(v["parent"] == "V1" for v in m["views"])
    assert any(b["eid"] == "E1" for b in m["boxes"])

    png = c.get(f"/api/runs/{ct_run}/views/V1/slices/0.png", params={"center": 40, "width": 400})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    from io import BytesIO

    from PIL import Image

    soft, bone = (np.asarray(Image.open(BytesIO(c.get(f"/api/runs/{ct_run}/views/V1/slices/0.png",
                                                       params={"center": cc, "width": w}).content)))
                  for cc, w in ((40, 400), (400, 1800)))
    assert soft.shape == (128, 128) and not np.array_equal(soft, bone)
    raw = c.get(f"/api/runs/{ct_run}/masks/{organ['name']}/slices/0")
    assert raw.headers["x-shape"] == "128,128" and len(raw.content) == 128 * 128
    assert int(np.frombuffer(raw.content, np.uint8).astype(bool).sum()) >= liver["pixels"]

    for url in (f"/api/runs/{ct_run}/views/V1/slices/1.png", f"/api/runs/{ct_run}/views/V1/slices/-1.png",
                f"/api/runs/{ct_run}/masks/{organ['name']}/slices/3"):
        r = c.get(url)
        assert r.status_code == 400 and set(r.json()) == {"detail"} and "\n" not in r.json()["detail"], r.text
    assert c.get(f"/api/runs/{ct_run}/views/V9/slices/0.png").status_code == 404
    assert c.get(f"/api/runs/{ct_run}/views/V1/slices/0.png", params={"center": 1, "width": 0}).status_code == 422
    assert c.get(f"/api/runs/{ct_run}/masks/{'0' * 64}.npy/slices/0").status_code == 404
    assert c.get("/api/runs/run-none/viewer").status_code == 404
    assert not [x for x in IDENTIFIERS if x in json.dumps(m)]


def test_files_listing_is_confined(room, tmp_path):
    c = room.client
    top = c.get("/api/files").json()
    assert [e["name"] for e in top["entries"]] == ["cases"] and top["parent"] is None
    cases = c.get("/api/files", params={"path": "cases"}).json()
    kinds = {e["name"]: e["kind"] for e in cases["entries"]}
    assert kinds["series"] == "folder" and kinds["ct.dcm"].startswith("dicom") and kinds["notes.txt"] == "other"
    assert cases["parent"] == "" and str(room.root) not in json.dumps(cases)
    outside = tmp_path / "outside"
    outside.mkdir()
    (room.root / "escape").symlink_to(outside)
    try:
        assert "escape" not in [e["name"] for e in c.get("/api/files").json()["entries"]]
        for path in ("..", "../..", "/etc", str(outside), "escape", "cases/../../"):
            r = c.get("/api/files", params={"path": path})
            assert r.status_code == 403 and "outside the served roots" in r.json()["detail"], (path, r.text)
    finally:
        (room.root / "escape").unlink()
    assert c.get("/api/files", params={"path": "cases/none"}).status_code == 404
    r = c.get("/api/files", params={"path": "cases/ct.dcm"})
    assert r.status_code == 400 and r.json() == {"detail": "path is not a folder"}


def test_downloads_fhir_dicom_audit(room, ct_run):
    c = room.client
    fhir = c.get(f"/api/runs/{ct_run}/fhir")
    assert fhir.headers["content-type"].startswith("application/fhir+json")
    assert fhir.json()["resourceType"] == "Bundle"
    found = c.get(f"/api/runs/{ct_run}/dicom").json()
    kinds = sorted(o["kind"] for o in found["objects"])
    assert "SR" in kinds and "SEG" in kinds, found
    import pydicom

    for o in found["objects"]:
        r = c.get(o["url"])
        assert r.status_code == 200 and r.content[128:132] == b"DICM"
    from io import BytesIO

    seg = next(o for o in found["objects"] if o["kind"] == "SEG")
    assert pydicom.dcmread(BytesIO(c.get(seg["url"]).content)).Modality == "SEG"
    assert c.get(f"/api/runs/{ct_run}/dicom").json() == found  # built once per report
    exports = [e for e in sse(c, ct_run) if e.get("event") != "end" and json.loads(e["data"])["kind"] == "export"]
    assert len(exports) == 1  # recorded in the run's trace, as the CLI's --dicom does
    assert c.post(f"/api/runs/{ct_run}/verify").json()["verdict"] == "intact"
    assert c.get(f"/api/runs/{ct_run}/dicom/../../etc/passwd").status_code == 404
    assert c.get(f"/api/runs/{ct_run}/dicom/nothere.dcm").status_code == 404
    audit = c.get(f"/api/runs/{ct_run}/audit")
    assert audit.headers["content-type"].startswith("text/html") and ct_run in audit.text

    path_run = c.post("/api/runs", json={"path": "cases/ct.dcm", "question": QUESTION, "route": False}).json()["id"]
    assert wait(c, path_run, 120)["status"] == "done"
    r = c.get(f"/api/runs/{path_run}/dicom")  # a path run drops its inputs when done: nothing to reference
    assert r.status_code == 409 and "inputs are not kept" in r.json()["detail"]


def test_followup_in_the_thread_and_after_a_restart(room, ct_run):
    c = room.client
    assert c.post("/api/runs/run-none/followups", json={"question": "x"}).status_code == 404
    assert c.post(f"/api/runs/{ct_run}/followups", json={"question": ""}).status_code == 422
    r = c.post(f"/api/runs/{ct_run}/followups", json={"question": "What is the mean HU of the fat?"})
    assert r.status_code == 202 and r.json()["status"] == "running", r.text
    again = c.post(f"/api/runs/{ct_run}/followups", json={"question": "and the bone?"})
    assert again.status_code == 409
    deadline = time.monotonic() + 120
    while (turn := c.get(f"/api/runs/{ct_run}/followups").json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert turn["status"] == "done", turn
    events = [json.loads(e["data"]) for e in sse(c, ct_run) if e.get("event") != "end"]
    turns = [e for e in events if e["kind"] == "note" and e["name"] == "turn"]
    assert len(turns) == 1 and "mean HU of the fat" in turns[0]["summary"]
    report = c.get(f"/api/runs/{ct_run}/report").json()
    assert report["question"] == "What is the mean HU of the fat?"
    assert {"E1", "E2"} <= {e["id"] for e in report["evidence"]}  # the first question's evidence is kept
    assert c.post(f"/api/runs/{ct_run}/verify").json()["verdict"] == "intact"

    # a second server on the same store (a restart) resumes the thread from the trace store and its checkpoints
    app2 = create_app(ServeConfig(settings=room.settings, roots=[room.root], poll_s=0.05))
    server, t, url = start_server(app2)
    try:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c2:
            assert c2.post(f"/api/runs/{ct_run}/followups", json={"question": "How much bone?"}).status_code == 202
            while (turn := c2.get(f"/api/runs/{ct_run}/followups").json())["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert turn["status"] == "done", turn
            report = c2.get(f"/api/runs/{ct_run}/report").json()
            assert report["question"] == "How much bone?" and {"E1", "E2"} <= {e["id"] for e in report["evidence"]}
    finally:
        server.should_exit = True
        t.join(timeout=10)
    r = c.post(f"/api/runs/{ct_run}/followups/cancel")
    assert r.status_code == 409 and "no follow-up under way" in r.json()["detail"]


def test_page_is_public_but_data_needs_the_token(tmp_path):
    from fastapi.testclient import TestClient

    token = "t0k3n-" + "y" * 20
    settings = ServeSettings(trace_dir=tmp_path / "traces", llm="scripted", script=SCRIPT)
    with TestClient(create_app(ServeConfig(settings=settings, roots=[tmp_path], token=token))) as c:
        page = c.get("/")
        assert page.status_code == 200 and "RESEARCH USE ONLY" in page.text and "{{" not in page.text
        assert c.get("/static/reading-room/room.js").status_code == 200
        for url in ("/api/files", "/api/runs/x/viewer", "/static/../openapi.json"):
            assert c.get(url).status_code == 401, url
        assert c.post("/").status_code == 401
        assert c.get("/api/files", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_a_volume_scrolls_by_slice(room, tmp_path):
    """A NIfTI CT volume: the view has its slices, each renders, a 3D mask gives each slice; out of range is 400."""
    import nibabel as nib

    z, y, x = np.mgrid[0:6, 0:48, 0:40]
    hu = np.where((y - 24) ** 2 + (x - 20) ** 2 < 15 ** 2, 40.0, -1000.0)  # a soft-tissue disc in air
    hu[:, 20:28, 16:24] = 700.0 + 50 * z[:, 20:28, 16:24]  # a bone core that brightens slice by slice
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.float32), np.eye(4)), path)
    with open(path, "rb") as fh:
        r = room.client.post("/api/runs", files={"file": ("vol.nii.gz", fh.read())},
                             data={"question": "What is the tissue composition?", "modality": "CT", "route": "false"})
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    assert wait(room.client, run_id, 120)["status"] == "done"
    c = room.client
    m = c.get(f"/api/runs/{run_id}/viewer").json()
    v1 = next(v for v in m["views"] if v["id"] == "V1")
    assert v1["slices"] == 6 and v1["orientation"]["assumed"] is True  # NIfTI: no DICOM orientation here
    pngs = [c.get(f"/api/runs/{run_id}/views/V1/slices/{k}.png", params={"center": 400, "width": 1800}).content
            for k in (0, 5)]
    assert pngs[0][:4] == b"\x89PNG" and pngs[0] != pngs[1]
    mask = next(x for x in m["masks"] if x["shape"] and len(x["shape"]) == 3)
    assert c.get(f"/api/runs/{run_id}/masks/{mask['name']}/slices/5").headers["x-shape"] == ",".join(
        map(str, mask["shape"][1:]))
    for url in (f"/api/runs/{run_id}/views/V1/slices/6.png", f"/api/runs/{run_id}/masks/{mask['name']}/slices/6"):
        r = c.get(url)
        assert r.status_code == 400 and "outside" in r.json()["detail"]


def test_a_pacs_study_runs_and_its_sr_goes_back(room, tmp_path, monkeypatch):
    """A run on a dicomweb:// study in a real Orthanc: its SR/SEG build from the retrieved files, POST .../push stores
    them into that study (recorded in the trace); a run that did not come from a PACS is refused."""
    from makers.orthanc import MISSING
    from makers.orthanc import start as orthanc
    from makers.orthanc import upload as to_orthanc

    if MISSING is not None:
        pytest.skip(MISSING)
    import pydicom

    monkeypatch.setenv("DXAGENT_CACHE", str(tmp_path / "cache"))
    proc, url = orthanc(tmp_path / "orthanc", None)
    try:
        to_orthanc(url, CT)
        study = str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
        ref = url.replace("http://", "dicomweb://") + f"/dicom-web?study={study}"
        c = room.client
        r = c.post("/api/runs", json={"path": ref, "question": QUESTION, "route": False})
        assert r.status_code == 202 and r.json()["source"] == "dicomweb", r.text
        run_id = r.json()["id"]
        assert wait(c, run_id, 120)["status"] == "done"
        assert "SR" in [o["kind"] for o in c.get(f"/api/runs/{run_id}/dicom").json()["objects"]]
        fhir = c.get(f"/api/runs/{run_id}/fhir").json()  # the bundle references the PACS study, as `dxagent run`'s
        assert fhir["entry"][0]["resource"]["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
        pushed = c.post(f"/api/runs/{run_id}/push")
        assert pushed.status_code == 200, pushed.text
        body = pushed.json()
        assert body["objects"][0] == "SR" and body["pushed_to"].endswith("/dicom-web") and study not in pushed.text
        series = httpx.get(f"{url}/dicom-web/studies/{study}/series", timeout=10, trust_env=False).json()
        assert "SR" in {x["00080060"]["Value"][0] for x in series}
        exports = [json.loads(e["data"]) for e in sse(c, run_id) if e.get("event") != "end"]
        assert [e for e in exports if e["kind"] == "export"]
        assert c.post(f"/api/runs/{run_id}/verify").json()["verdict"] == "intact"
    finally:
        proc.terminate()
        proc.wait(10)
    up = upload(c, CT, QUESTION, route="false").json()["id"]
    assert wait(c, up, 120)["status"] == "done"
    r = c.post(f"/api/runs/{up}/push")
    assert r.status_code == 409 and "did not come from a PACS" in r.json()["detail"]
