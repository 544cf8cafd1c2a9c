"""A hostile PACS (issue 32): agent/imaging/dicomweb.py against a fake DICOMweb server that misbehaves on purpose.

The server (http.server.ThreadingHTTPServer on a free loopback port, in a thread) serves one study holding pydicom's
bundled CT slice, or, switched by `pacs.mode`, trickles a byte a second (in the headers or in the body), never
answers, ignores the QIDO offset, lists instances without end, answers with another study's (or series', or
instance's) instance, sends a JSON reply past the cap, garbage multipart, UIDs shaped like path traversal, or 503s.

Each hostile case must end in a one-line DicomWebError within the deadline plus slack (a hang check, not a speed
target), write nothing to the cache, and never put a listed non-UID into a URL.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from agent.imaging import dicomweb
from agent.imaging.dicomweb import DicomWebError

CT = Path(get_testdata_file("CT_small.dcm"))
_ct = dcmread(CT, stop_before_pixels=True)
CT_STUDY, CT_SERIES, CT_SOP = str(_ct.StudyInstanceUID), str(_ct.SeriesInstanceUID), str(_ct.SOPInstanceUID)
OTHER_STUDY, OTHER_SERIES, OTHER_SOP = "1.2.826.0.1.99.1", "1.2.826.0.1.99.1.2", "1.2.826.0.1.99.1.2.3"
BOUNDARY = "dx-boundary-7f3a"
SLACK = 5.0  # seconds past the deadline that still count as "ended": a hang check, not a speed target


def _row(study: str, series: str | None = None, sop: str | None = None, date: str = "20200101") -> dict:
    row = {"0020000D": {"vr": "UI", "Value": [study]}, "00080020": {"vr": "DA", "Value": [date]}}
    if series:
        row["0020000E"] = {"vr": "UI", "Value": [series]}
    if sop:
        row["00080018"] = {"vr": "UI", "Value": [sop]}
    return row


def _multipart(payload: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + payload
            + f"\r\n--{BOUNDARY}--\r\n".encode())


class FakePacs:
    """The server's state: a mode, the paths asked for, and a stop event that ends every stalled handler."""

    def __init__(self):
        self.mode = "ok"
        self.paths: list[str] = []
        self.stop = threading.Event()
        self.studies = 0  # "studies" mode: how many studies the QIDO study listing holds
        self.failures = 0  # "flaky" mode: 503s left before the real answer


def _handler(pacs: FakePacs):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes, ctype: str, length: bool = True) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            if length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

        def _json(self, rows) -> None:
            self._send(200, json.dumps(rows).encode(), "application/dicom+json")

        def _trickle(self, data: bytes) -> None:
            for i in range(len(data)):
                if pacs.stop.wait(1.0):
                    return
                try:
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return

        def do_POST(self):  # STOW-RS
            pacs.paths.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if pacs.mode == "silent":
                pacs.stop.wait(60)
                return
            self._json({})

        def do_GET(self):
            pacs.paths.append(self.path)
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            limit, offset = int(query.get("limit", 100000)), int(query.get("offset", 0))
            parts = [p for p in url.path.split("/") if p][1:]  # after /dicom-web
            mode = pacs.mode
            if mode == "silent":
                pacs.stop.wait(60)
                return
            if mode == "trickle-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                self._trickle(b"X-Slow: " + b"a" * 100 + b"\r\n\r\n")
                return
            if mode == "trickle-body":
                body = json.dumps([_row(CT_STUDY, CT_SERIES)] * 50).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self._trickle(body)
                return
            if mode == "flaky" and pacs.failures > 0:
                pacs.failures -= 1
                self._send(503, b"busy", "text/plain")
                return
            if mode == "always-503":
                self._send(503, b"busy", "text/plain")
                return
            if parts == ["studies"]:  # QIDO studies
                if mode == "huge-json":  # a study listing of ~4 MB, no Content-Length: the cap must cut the read
                    self._send(200, b"[" + b",".join([json.dumps(_row(CT_STUDY)).encode()] * 40000) + b"]",
                               "application/dicom+json", length=False)
                    return
                uids = [f"1.2.826.0.1.7.{i}" for i in range(pacs.studies)]
                if mode == "ignore-offset":
                    offset = 0
                self._json([_row(u, date=f"2020{i % 12 + 1:02d}01") for i, u in enumerate(uids)][offset:offset + limit])
                return
            if len(parts) == 3 and parts[2] == "series":  # QIDO series of a study
                if mode == "traversal":
                    self._json([_row(parts[1], "1.2.3/../../../../etc/passwd"), _row(parts[1], "..")])
                elif mode == "garbage-json":
                    self._json([1, "two", None])
                else:
                    self._json([_row(parts[1], CT_SERIES if parts[1] == CT_STUDY else OTHER_SERIES)][offset:])
                return
            if len(parts) == 5 and parts[4] == "instances":  # QIDO instances of a series
                study, series = parts[1], parts[3]
                if mode == "ignore-offset":  # a full page, the same page whatever the offset
                    self._json([_row(study, series, f"1.2.826.0.1.8.{i}") for i in range(limit)])
                elif mode == "endless":  # honours offset, never runs out
                    self._json([_row(study, series, f"1.2.826.0.1.8.{offset + i}") for i in range(limit)])
                elif mode == "traversal-sop":
                    self._json([_row(study, series, "1.2/../../x")])
                else:
                    sop = CT_SOP if study == CT_STUDY else OTHER_SOP
                    self._json([_row(study, series, sop)][offset:offset + limit])
                return
            if len(parts) == 6 and parts[4] == "instances":  # WADO-RS one instance
                if mode == "garbage-multipart":
                    self._send(200, f"--{BOUNDARY}\r\nno blank line here, and not DICOM\r\n--{BOUNDARY}--".encode(),
                               f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
                    return
                ds = dcmread(CT)
                if mode == "wrong-series":
                    ds.StudyInstanceUID = parts[1]
                elif mode == "wrong-sop":
                    ds.StudyInstanceUID, ds.SeriesInstanceUID = parts[1], parts[3]
                # "ok" and "wrong-study": CT_small as it is, whatever was asked for
                import io

                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                self._send(200, _multipart(buf.getvalue()),
                           f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
                return
            self._send(404, b"", "text/plain")

    return Handler


@pytest.fixture
def pacs(monkeypatch):
    """(FakePacs, base URL); a small deadline and short timeouts for every test here."""
    state = FakePacs()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for name in ("DXAGENT_DICOMWEB_TOKEN", "DXAGENT_DICOMWEB_USER", "DXAGENT_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DXAGENT_DICOMWEB_DEADLINE", "3")
    monkeypatch.setenv("DXAGENT_DICOMWEB_TIMEOUT", "30")
    monkeypatch.setenv("DXAGENT_DICOMWEB_RETRIES", "3")
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    state.stop.set()
    server.shutdown()
    server.server_close()


def ref(url: str, study: str, series: str | None = None) -> str:
    return url.replace("http://", "dicomweb://") + f"/dicom-web?study={study}" + (f"&series={series}" if series else "")


def _fails(call, match: str, bound: float) -> tuple[str, float]:
    """`call` raises a one-line DicomWebError matching `match` within `bound` seconds; (message, seconds)."""
    start = time.monotonic()
    with pytest.raises(DicomWebError, match=match) as caught:
        call()
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert elapsed < bound, f"{elapsed:.1f} s: {message}"
    return message, elapsed


def _cached(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_a_well_behaved_server_is_retrieved(pacs, tmp_path):
    state, url = pacs
    folders = dicomweb.resolve([ref(url, CT_STUDY)], cache=tmp_path / "c")
    files = _cached(tmp_path / "c")
    assert len(folders) == 1 and len(files) == 1
    assert str(dcmread(files[0]).SOPInstanceUID) == CT_SOP
    state.studies = 2500  # three pages of 1,000
    found = dicomweb.query(url.replace("http://", "dicomweb://") + "/dicom-web?modality=CT")
    assert len(found) == 2500 == len(set(found))
    assert [p for p in state.paths if p.startswith("/dicom-web/studies?")][-1].count("offset=2000")
    assert len(dicomweb.query(url.replace("http://", "dicomweb://") + "/dicom-web?limit=1200")) == 1200


@pytest.mark.parametrize("mode", ["trickle-body", "trickle-headers"])
def test_a_trickling_server_is_cut_at_the_deadline(pacs, tmp_path, mode):
    state, url = pacs
    state.mode = mode
    message, elapsed = _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"),
                              "did not finish within 3 s", 3 + SLACK)
    assert elapsed >= 2.5  # it was the deadline that ended it
    assert not _cached(tmp_path / "c")


def test_a_silent_server_costs_the_deadline_once(pacs, tmp_path):
    state, url = pacs
    state.mode = "silent"
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"), "did not finish within 3 s",
           3 + SLACK)
    _fails(lambda: dicomweb.store(dicomweb.parse(url.replace("http://", "dicomweb://") + "/dicom-web",
                                                 need_study=False), [dcmread(CT)]),
           "storing to .*did not finish within 3 s", 3 + SLACK)


def test_a_request_timeout_is_not_retried(pacs, tmp_path, monkeypatch):
    state, url = pacs
    state.mode = "silent"
    monkeypatch.setenv("DXAGENT_DICOMWEB_DEADLINE", "20")
    monkeypatch.setenv("DXAGENT_DICOMWEB_TIMEOUT", "1")
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"), r"did not answer within 1 s",
           1 + SLACK)
    assert len(state.paths) == 1  # one attempt, not three


def test_retries_only_on_busy_answers_and_within_the_deadline(pacs, tmp_path, monkeypatch):
    state, url = pacs
    state.mode, state.failures = "flaky", 2  # two 503s, then the answers: retried, and retrieved
    assert dicomweb.resolve([ref(url, CT_STUDY)], cache=tmp_path / "c")
    state.mode = "always-503"
    monkeypatch.setenv("DXAGENT_DICOMWEB_RETRIES", "50")
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, OTHER_STUDY)), tmp_path / "d"), "answered 503|within 3 s",
           3 + SLACK)


def test_a_server_that_ignores_the_offset_is_refused(pacs, tmp_path):
    state, url = pacs
    state.mode = "ignore-offset"
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"), "ignores the QIDO offset",
           3 + SLACK)
    state.studies = 1500
    _fails(lambda: dicomweb.query(url.replace("http://", "dicomweb://") + "/dicom-web?modality=CT"),
           "querying .*ignores the QIDO offset", 3 + SLACK)
    assert not _cached(tmp_path / "c")


def test_an_endless_instance_listing_stops_at_its_cap(pacs, tmp_path, monkeypatch):
    state, url = pacs
    state.mode = "endless"
    monkeypatch.setenv("DXAGENT_DICOMWEB_DEADLINE", "20")
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"),
           f"more than {dicomweb.MAX_INSTANCES} instances", 20 + SLACK)
    assert sum("/instances?" in p for p in state.paths) <= dicomweb.MAX_INSTANCES // dicomweb.PAGE + 1
    assert not _cached(tmp_path / "c")


@pytest.mark.parametrize(("mode", "asked", "match"), [
    ("wrong-study", (OTHER_STUDY, OTHER_SERIES), "instance of another study"),
    ("wrong-series", (OTHER_STUDY, OTHER_SERIES), "instance of another series"),
    ("wrong-sop", (OTHER_STUDY, OTHER_SERIES), "another instance than the one asked for"),
])
def test_an_instance_of_another_study_is_refused_and_not_cached(pacs, tmp_path, mode, asked, match):
    state, url = pacs
    state.mode = mode
    message, _ = _fails(lambda: dicomweb.resolve([ref(url, *asked)], cache=tmp_path / "c"), match, 3 + SLACK)
    assert CT_STUDY not in message and CT_SERIES not in message  # the other patient's UIDs are not echoed
    assert not _cached(tmp_path / "c")


def test_a_json_reply_past_the_cap_is_cut(pacs, monkeypatch):
    state, url = pacs
    state.mode, state.studies = "huge-json", 1
    monkeypatch.setenv("DXAGENT_DICOMWEB_MAX_JSON_BYTES", str(1 << 20))
    _fails(lambda: dicomweb.query(url.replace("http://", "dicomweb://") + "/dicom-web?modality=CT"),
           r"larger than 1 MiB", 3 + SLACK)


def test_an_instance_past_the_byte_cap_is_cut(pacs, tmp_path, monkeypatch):
    state, url = pacs
    monkeypatch.setenv("DXAGENT_DICOMWEB_MAX_BYTES", "10000")  # CT_small is ~40 kB
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"), "larger than", 3 + SLACK)
    assert not _cached(tmp_path / "c")


@pytest.mark.parametrize(("mode", "said"), [("garbage-multipart", "PACS"), ("garbage-json", "PACS"),
                                           ("traversal", "not a DICOM UID"), ("traversal-sop", "not a DICOM UID")])
def test_garbage_and_path_shaped_uids_are_one_line(pacs, tmp_path, mode, said):
    """A reply that does not parse, or a listed UID shaped like a path (which must never reach a URL)."""
    state, url = pacs
    state.mode = mode
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"), said, 3 + SLACK)
    assert not any(".." in p for p in state.paths), state.paths
    assert not _cached(tmp_path / "c")


def test_bad_settings_are_one_line(pacs, tmp_path, monkeypatch):
    _, url = pacs
    monkeypatch.setenv("DXAGENT_DICOMWEB_DEADLINE", "soon")
    _fails(lambda: dicomweb.fetch(dicomweb.parse(ref(url, CT_STUDY)), tmp_path / "c"), "DXAGENT_DICOMWEB_DEADLINE",
           SLACK)
