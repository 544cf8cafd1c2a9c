"""Studies from a PACS over DICOMweb (QIDO-RS to list, WADO-RS to retrieve), with dicomweb-client.

A reference names a study, and optionally one series, on a DICOMweb server:

    dicomweb://HOST[:PORT]/PATH?study=STUDY_UID[&series=SERIES_UID]     (http)
    dicomwebs://HOST[:PORT]/PATH?study=STUDY_UID[&series=SERIES_UID]    (https)

PATH is the server's DICOMweb root (Orthanc: /dicom-web). `resolve(paths)` turns every reference into one local folder
per series (a study with a CT and a scout series gives two views) and leaves file paths as they are, so everything
downstream (the loaders, de-identification, the trace) runs exactly as on files.

Cache: each instance is written once under <cache root>/dicomweb/<series key>/<instance key>.dcm, the keys being sha256
digests of the UIDs (the UIDs themselves never become file names, so the trace's input names carry none), each file
written atomically; a second run of the same study retrieves only what is missing.

Auth from the environment: DXAGENT_DICOMWEB_TOKEN (a bearer token), or DXAGENT_DICOMWEB_USER and
DXAGENT_DICOMWEB_PASSWORD (basic auth). Credentials never go into a URL, a log or the trace.

Bounds (issue 32): a PACS is an untrusted peer, so every retrieval (`fetch` of one reference, `query`, `store`) is
bounded in time, memory and work, whatever the server does:

* DXAGENT_DICOMWEB_DEADLINE (seconds, default 300): the whole retrieval, every request and every retry together.
  Each request's socket timeout is min(DXAGENT_DICOMWEB_TIMEOUT, the time left), and a timer armed for the time left
  shuts down the retrieval's sockets when it passes, so a server that trickles a byte at a time (which restarts every
  per-read timeout) is cut at the deadline too: "...: the PACS did not finish within N s". 300 s retrieves a
  2,000-slice CT (about 1 GB) at 30 MB/s; what was retrieved before the deadline stays cached, so a rerun resumes.
* DXAGENT_DICOMWEB_TIMEOUT (seconds per request, default 30): a server that accepts and never answers costs this
  once; a timeout is not retried.
* DXAGENT_DICOMWEB_RETRIES (attempts, default 3): only a 408/429/503/504 answer is retried, after a short back-off
  (0.5 s, 1 s, ...; a Retry-After of up to 30 s is honoured), and never past the deadline.
* DXAGENT_DICOMWEB_MAX_BYTES (default 1 GiB): the largest reply (one instance) read, counted while reading (and
  checked against Content-Length first), so a reply cannot grow memory past it; QIDO and STOW JSON replies have their
  own cap, DXAGENT_DICOMWEB_MAX_JSON_BYTES (default 64 MiB: 20,000 instance rows are about 10 MB). dicomweb-client
  copies a reply while decoding it, so the peak memory of a retrieval is about 5x its largest instance (measured: a
  200 MB instance peaked at 1.0 GB), at most about 5 GiB at the default cap; lower the cap to lower that bound.
* QIDO paging is done here, a page of 1,000 at a time (limit/offset): it stops at a short page (unless the server's
  Warning header says more remain), refuses a page that repeats a UID already listed (a server that ignores offset)
  and a listing past its cap (MAX_STUDIES studies, MAX_SERIES series in a study, MAX_INSTANCES instances in a series).
* Every UID the server lists must be a DICOM UID (digits and dots, at most 64 characters) before it goes into a URL,
  and every instance retrieved must carry the Study, Series and SOP Instance UIDs asked for; one that does not fails
  the case and is not written to the cache.

Every failure is one line (`DicomWebError`, a UserError): a malformed reference, a server that cannot be reached, a
refused request (401/403), a study or series the server does not have, an instance that does not parse, a deadline
or a cap passed, an answer about another study.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from agent.core.errors import UserError
from agent.core.files import cache_root, write_atomic

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
RETRIABLE = frozenset({408, 429, 503, 504})
PAGE = 1000  # QIDO rows asked for per request
MAX_SERIES = 1000  # series in one study
MAX_INSTANCES = 20000  # instances in one series (a whole-body CT has a few thousand)
_PLURAL = {"study": "studies", "series": "series", "instance": "instances"}


class DicomWebError(UserError, RuntimeError):
    """A DICOMweb reference could not be resolved; the message is one line."""


class PacsError(DicomWebError):
    """The PACS failed the request (unreachable, refused, timed out, an error status or an unusable reply), as opposed
    to a reference or query that is wrong before any PACS is asked."""


class _Deadline(Exception):
    """The retrieval's deadline passed (turned into a DicomWebError naming the reference)."""


class _TooBig(Exception):
    """A reply passed its size cap (turned into a DicomWebError naming the reference)."""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise DicomWebError(f"{name}={raw[:20]!r} is not a positive number")
    return value


def is_uid(text: object) -> bool:
    """A DICOM UID: digits and dots, no empty component, at most 64 characters."""
    return isinstance(text, str) and len(text) <= 64 and _UID.fullmatch(text) is not None


@dataclass(frozen=True)
class Reference:
    base_url: str  # the DICOMweb root, http(s)://host:port/path
    study: str
    series: str | None = None

    def public(self) -> str:
        """The reference as the user wrote it, for messages (it carries no credentials); a server root (no study,
        for --push and queries) as dicomweb://HOST/PATH."""
        scheme = "dicomwebs" if self.base_url.startswith("https:") else "dicomweb"
        rest = self.base_url.split("://", 1)[1]
        if not self.study:
            return f"{scheme}://{rest}"
        return f"{scheme}://{rest}?study={self.study}" + (f"&series={self.series}" if self.series else "")


def is_reference(text: str) -> bool:
    return str(text).split("://", 1)[0].lower() in SCHEMES and "://" in str(text)


def parse(text: str, need_study: bool = True) -> Reference:
    """A study (or series) reference; with need_study=False a server root (`dicomweb://HOST/PATH`, for --push)."""
    parts = urlsplit(str(text))
    if parts.scheme.lower() not in SCHEMES:
        raise DicomWebError(f"{text}: not a DICOMweb reference (dicomweb://HOST/PATH?study=UID[&series=UID])")
    if parts.username or parts.password:
        raise DicomWebError("a DICOMweb reference must not carry credentials: set DXAGENT_DICOMWEB_TOKEN or "
                            "DXAGENT_DICOMWEB_USER / DXAGENT_DICOMWEB_PASSWORD instead")
    if not parts.hostname:
        raise DicomWebError(f"{text}: no host (dicomweb://HOST[:PORT]/PATH?study=UID)")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"study", "series"})
    study, series = query.get("study", [""])[0], (query.get("series") or [None])[0]
    if not need_study and query:
        raise DicomWebError(f"{text}: a server to store to is dicomweb://HOST[:PORT]/PATH, with no query")
    if need_study and (unknown or not study):
        raise DicomWebError(f"{text}: give ?study=UID (and optionally &series=UID)"
                            + (f"; unknown parameter(s) {', '.join(unknown)}" if unknown else ""))
    for uid in (study, series):
        if uid and not is_uid(uid):
            raise DicomWebError(f"{uid[:70]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    base = f"{SCHEMES[parts.scheme.lower()]}://{parts.netloc}{parts.path.rstrip('/')}"
    return Reference(base, study, series)


def _key(*uids: str) -> str:
    return hashlib.sha256("|".join(uids).encode()).hexdigest()[:24]


def _session_class():
    """A requests.Session whose every request is bounded by the retrieval's deadline and a size cap (built on first
    use, so that importing this module does not import requests)."""
    import requests
    from requests.adapters import HTTPAdapter

    class TrackingAdapter(HTTPAdapter):
        """Connection pools whose connections register themselves with the session, so that its deadline timer can
        shut their sockets down (a recv blocked in another frame then returns at once)."""

        def __init__(self, registry: weakref.WeakSet, **kw):
            self._registry = registry
            super().__init__(**kw)

        def init_poolmanager(self, *args, **kw):
            super().init_poolmanager(*args, **kw)
            self._track(self.poolmanager)

        def proxy_manager_for(self, proxy, **kw):
            manager = super().proxy_manager_for(proxy, **kw)
            self._track(manager)
            return manager

        def _track(self, manager) -> None:
            registry = self._registry

            def tracked(conn_cls):
                def __init__(conn, *args, **kw):
                    conn_cls.__init__(conn, *args, **kw)
                    registry.add(conn)
                return type(f"Tracked{conn_cls.__name__}", (conn_cls,), {"__init__": __init__})

            manager.pool_classes_by_scheme = {
                scheme: type(f"Tracked{pool.__name__}", (pool,), {"ConnectionCls": tracked(pool.ConnectionCls)})
                for scheme, pool in manager.pool_classes_by_scheme.items()}

    class BoundedSession(requests.Session):
        """Every request: a timeout of min(per-request timeout, time left); the body read here in pieces under a
        cap; a timer that shuts the sockets down when the deadline passes; retries only on 408/429/503/504 and only
        within the deadline. Raises _Deadline or _TooBig, or what requests raises."""

        def __init__(self, deadline_s: float, timeout_s: float, attempts: int, max_bytes: int, max_json_bytes: int):
            super().__init__()
            self.deadline_s, self.timeout_s, self.attempts = deadline_s, timeout_s, attempts
            self.max_bytes, self.max_json_bytes = max_bytes, max_json_bytes
            self.deadline = time.monotonic() + deadline_s
            self.expired = False
            self.warning = ""  # the last reply's Warning header (QIDO: more results remain)
            self._connections: weakref.WeakSet = weakref.WeakSet()
            for prefix in ("http://", "https://"):
                self.mount(prefix, TrackingAdapter(self._connections))

        def left(self) -> float:
            return self.deadline - time.monotonic()

        def _expire(self) -> None:
            self.expired = True
            for conn in list(self._connections):
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        def request(self, method, url, **kw):
            if self.left() <= 0:
                raise _Deadline()
            accept = str((kw.get("headers") or {}).get("Accept", ""))
            cap = self.max_json_bytes if method != "GET" or "json" in accept else self.max_bytes
            resendable = kw.get("data") is None or isinstance(kw.get("data"), bytes | str)
            kw["stream"] = True
            timer = threading.Timer(self.left(), self._expire)
            timer.daemon = True
            timer.start()
            try:
                for attempt in range(1, self.attempts + 1):
                    per = min(self.timeout_s, max(self.left(), 0.01))
                    kw["timeout"] = (per, per)
                    response = super().request(method, url, **kw)
                    self._read(response, cap)
                    if response.status_code not in RETRIABLE or attempt == self.attempts or not resendable:
                        break
                    wait = 0.5 * 2 ** (attempt - 1)
                    after = response.headers.get("Retry-After", "")
                    if after.isdigit():
                        wait = min(float(after), 30.0)
                    if wait >= self.left():
                        break  # no time for another attempt: the retriable answer is the answer
                    time.sleep(wait)
                if self.expired:  # the timer cut the reply short (a cut header block can even parse): not an answer
                    raise _Deadline()
                self.warning = response.headers.get("Warning", "")
                return response
            except (_Deadline, _TooBig):
                raise
            except Exception:
                if self.expired or self.left() <= 0.05:
                    raise _Deadline() from None
                raise
            finally:
                timer.cancel()

        @staticmethod
        def _read(response, cap: int) -> None:
            """The body, read in pieces and never past `cap` bytes (after any content decoding)."""
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > cap:
                response.close()
                raise _TooBig(cap)
            chunks, size = [], 0
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > cap:
                    response.close()
                    raise _TooBig(cap)
                chunks.append(chunk)
            response._content = b"".join(chunks)
            response._content_consumed = True

    return BoundedSession


def session():  # -> a requests.Session bounded as the module docstring says, for one retrieval
    """A session for one retrieval (its deadline starts now) with the environment's auth, timeout, retries and caps."""
    deadline = _env_number("DXAGENT_DICOMWEB_DEADLINE", 300)
    timeout = _env_number("DXAGENT_DICOMWEB_TIMEOUT", 30)
    attempts = max(1, int(_env_number("DXAGENT_DICOMWEB_RETRIES", 3)))
    max_bytes = int(_env_number("DXAGENT_DICOMWEB_MAX_BYTES", 1 << 30))
    max_json = min(max_bytes, int(_env_number("DXAGENT_DICOMWEB_MAX_JSON_BYTES", 64 << 20)))
    s = _session_class()(deadline, timeout, attempts, max_bytes, max_json)
    if user := os.environ.get("DXAGENT_DICOMWEB_USER"):
        if not os.environ.get("DXAGENT_DICOMWEB_TOKEN"):
            s.auth = (user, os.environ.get("DXAGENT_DICOMWEB_PASSWORD", ""))
    return s


def client(base_url: str, bounded=None):  # -> dicomweb_client.DICOMwebClient
    """A DICOMweb client for `base_url` over a bounded session (a new one unless given); retries are the session's."""
    from dicomweb_client.api import DICOMwebClient

    bounded = bounded if bounded is not None else session()
    headers = {}
    if token := os.environ.get("DXAGENT_DICOMWEB_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    c = DICOMwebClient(base_url, session=bounded, headers=headers or None, timeout=bounded.timeout_s)
    c.set_http_retry_params(retry=False)  # the session retries, within the deadline (dicomweb-client's would not)
    return c


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _one_line(ref: Reference, exc: BaseException, where: str | None = None, bounded=None) -> DicomWebError:
    import requests

    where = where or ref.public()
    if isinstance(exc, DicomWebError):
        return exc
    if isinstance(exc, _Deadline):
        seconds = f"{bounded.deadline_s:g}" if bounded is not None else "the"
        return PacsError(f"{where}: the PACS did not finish within {seconds} s (DXAGENT_DICOMWEB_DEADLINE)")
    if isinstance(exc, _TooBig):
        return PacsError(f"{where}: the PACS sent a reply larger than {_mib(exc.args[0])} (DXAGENT_DICOMWEB_MAX_"
                             "BYTES / DXAGENT_DICOMWEB_MAX_JSON_BYTES)")
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return PacsError(f"{where}: the PACS refused the request ({code}): set DXAGENT_DICOMWEB_TOKEN, or "
                                 "DXAGENT_DICOMWEB_USER and DXAGENT_DICOMWEB_PASSWORD")
        if code == 404:
            return PacsError(f"{where}: the PACS has no such study or series (404)")
        reason = " ".join(str(exc.response.reason or "").split())[:60]
        return PacsError(f"{where}: the PACS answered {code} {reason}".rstrip())
    if isinstance(exc, requests.Timeout):
        seconds = f"{bounded.timeout_s:g} s" if bounded is not None else "its timeout"
        return PacsError(f"{where}: the PACS at {ref.base_url} did not answer within {seconds} "
                             "(DXAGENT_DICOMWEB_TIMEOUT)")
    if isinstance(exc, requests.ConnectionError):
        return PacsError(f"{where}: cannot reach the PACS at {ref.base_url} ({type(exc).__name__})")
    text = " ".join(str(exc).split())[:160] or type(exc).__name__
    return PacsError(f"{where}: {type(exc).__name__}: {text}")


def _uid_of(row: object, tag: str, where: str, what: str) -> str | None:
    """The UID under `tag` in one QIDO row (None where the row has none); a value that is not a DICOM UID (it would
    go into a URL) is refused."""
    if not isinstance(row, dict):
        raise PacsError(f"{where}: the PACS answered the {what} query with something that is not DICOM JSON")
    element = row.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not values or not isinstance(values, list):
        return None
    if not is_uid(values[0]):
        article = "an" if what[0] in "aeiou" else "a"
        raise PacsError(f"{where}: the PACS listed {article} {what} UID that is not a DICOM UID (digits and dots, "
                            "at most 64 characters)")
    return values[0]


def _search(search, bounded, tag: str, cap: int, where: str, what: str, truncate: bool = False) -> list[dict]:
    """QIDO rows, paged here (limit/offset) rather than by dicomweb-client's get_remaining, which pages until the
    server returns an empty page (endless where it ignores offset). Stops at a short page unless the server's Warning
    header says more remain; refuses a page that repeats a UID already listed and a listing past `cap` (or, with
    truncate, stops at `cap` rows: the caller asked for at most that many). Rows without the UID are dropped."""
    rows: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        asked = min(PAGE, cap - len(rows)) if truncate else min(PAGE, cap + 1 - len(rows))
        if asked <= 0:
            return rows
        page = search(limit=asked, offset=offset)
        if not isinstance(page, list):
            raise PacsError(f"{where}: the PACS answered the {what} query with something that is not DICOM JSON")
        for row in page:
            uid = _uid_of(row, tag, where, what)
            if uid is None:
                continue
            if uid in seen:
                raise PacsError(f"{where}: the PACS repeats {_PLURAL[what]} it already listed when paging (it ignores "
                                    "the QIDO offset)")
            seen.add(uid)
            rows.append(row)
        if len(rows) > cap:
            raise PacsError(f"{where}: the PACS lists more than {cap} {_PLURAL[what]}")
        more = "299" in bounded.warning or "additional results" in bounded.warning.lower()
        if not page or (len(page) != asked and not more):
            return rows
        offset += len(page)


def _first(row: dict, tag: str) -> str:
    element = row.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0])[:64] if isinstance(values, list) and values else ""


def _check_uids(ds, study: str, series: str, sop: str, where: str) -> None:
    """The instance the server sent must be the one asked for."""
    got = {k: str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    if got["StudyInstanceUID"] != study:
        raise PacsError(f"{where}: the PACS answered series {series} with an instance of another study")
    if got["SeriesInstanceUID"] != series:
        raise PacsError(f"{where}: the PACS answered series {series} with an instance of another series")
    if got["SOPInstanceUID"] != sop:
        raise PacsError(f"{where}: the PACS answered series {series} with another instance than the one asked "
                            "for")


def fetch(ref: Reference, cache: Path | None = None) -> list[Path]:
    """One local folder per series of the study (or the one series named), every instance retrieved once and checked
    to be the instance asked for before it is cached. Bounded as the module docstring says."""
    import pydicom
    import requests

    root = cache or cache_root() / "dicomweb"
    where = ref.public()
    bounded = session()
    c = client(ref.base_url, bounded)
    try:
        if ref.series:
            series = [ref.series]
        else:
            found = _search(lambda **page: c.search_for_series(ref.study, **page), bounded, _SERIES, MAX_SERIES,
                            where, "series")
            series = [_uid_of(d, _SERIES, where, "series") for d in found]
        if not series:
            raise PacsError(f"{where}: the PACS has no series in this study")
        folders = []
        for s in series:
            found = _search(lambda s=s, **page: c.search_for_instances(ref.study, s, **page), bounded, _SOP,
                            MAX_INSTANCES, where, "instance")
            sops = [_uid_of(d, _SOP, where, "instance") for d in found]
            if not sops:
                raise PacsError(f"{where}: the PACS has no instances in series {s}")
            folder = root / _key(ref.study, s)
            for sop in sops:
                dest = folder / f"{_key(sop)}.dcm"
                if dest.is_file():
                    continue
                try:
                    ds = c.retrieve_instance(ref.study, s, sop)
                except (requests.RequestException, _Deadline, _TooBig):
                    raise
                except Exception as exc:  # a multipart reply or a part that does not decode
                    raise PacsError(f"{where}: the PACS sent an instance of series {s} that does not parse as "
                                        f"DICOM ({type(exc).__name__})") from None
                _check_uids(ds, ref.study, s, sop, where)
                buf = io.BytesIO()
                pydicom.dcmwrite(buf, ds, enforce_file_format=True)
                write_atomic(dest, buf.getvalue())
            folders.append(folder)
        return folders
    except Exception as exc:  # HTTP, connection, deadline, cap, a body that does not parse: one line naming the ref
        raise _one_line(ref, exc, where, bounded) from None
    finally:
        bounded.close()


# a batch manifest may be a QIDO-RS study query: dicomweb://HOST/PATH?modality=CT&date=20260101-20261231[&limit=N]
QUERY_KEYS = {"modality": "ModalitiesInStudy", "date": "StudyDate", "description": "StudyDescription"}
MAX_STUDIES = 10000


def is_query(text: str) -> bool:
    """A DICOMweb URL with search filters and no study: a manifest of the studies it finds."""
    return is_reference(text) and "study" not in parse_qs(urlsplit(str(text)).query)


def query(text: str) -> list[str]:
    """The study references (dicomweb://...?study=UID) a QIDO-RS query finds, oldest first. Filters: modality (a
    modality in the study), date (YYYYMMDD or a range YYYYMMDD-YYYYMMDD, either end open), description (a study
    description, * wildcards), limit (at most that many studies, default and cap 10000)."""
    parts = urlsplit(str(text))
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    unknown = sorted(set(q) - set(QUERY_KEYS) - {"limit"})
    if unknown:
        raise DicomWebError(f"{text}: unknown query parameter(s) {', '.join(unknown)} (use "
                            f"{', '.join(sorted(QUERY_KEYS))}, limit)")
    if "date" in q and not all(d.isdigit() and len(d) == 8 for d in q["date"].split("-") if d):
        raise DicomWebError(f"{q['date'][:40]!r} is not a DICOM date or range (YYYYMMDD, YYYYMMDD-YYYYMMDD)")
    if "limit" in q and not q["limit"].isdigit():
        raise DicomWebError(f"limit={q['limit'][:20]!r} is not a number")
    limit = min(int(q.pop("limit", MAX_STUDIES)), MAX_STUDIES)
    root = parse(urlsplit(str(text))._replace(query="").geturl(), need_study=False)
    filters = {QUERY_KEYS[k]: v for k, v in q.items()}
    where = f"querying {root.public()}"
    bounded = session()
    c = client(root.base_url, bounded)
    try:
        found = _search(lambda **page: c.search_for_studies(search_filters=filters, **page), bounded, _STUDY, limit,
                        where, "study", truncate=True)
    except Exception as exc:
        raise _one_line(root, exc, where, bounded) from None
    finally:
        bounded.close()
    dates = {_uid_of(d, _STUDY, where, "study"): _first(d, "00080020") for d in found}
    studies = sorted(dates, key=lambda u: (dates[u], u))[:limit]
    return [Reference(root.base_url, u).public() for u in studies]


def study_key(reference: str) -> str:
    """A case id for a study reference that carries no UID (UIDs never become file or folder names)."""
    return "study-" + _key(parse(reference).study)[:16]


def resolve(paths: list[str], cache: Path | None = None) -> list[str]:
    """File paths unchanged; each DICOMweb reference replaced by its series folders (retrieved into the cache)."""
    out: list[str] = []
    for p in paths:
        out += [str(f) for f in fetch(parse(p), cache)] if is_reference(str(p)) else [str(p)]
    return out


def push_target(push: str, inputs: list[str]) -> Reference:
    """Where --push stores: "source" (the PACS the input study came from) or a server root dicomweb://HOST/PATH."""
    if push == "source":
        refs = [parse(p) for p in inputs if is_reference(p)]
        if not refs:
            raise DicomWebError("--push source needs an input from a PACS (dicomweb://...); give --push "
                                "dicomweb://HOST/PATH")
        return Reference(refs[0].base_url, "")
    return parse(push, need_study=False)


def store(target: Reference, datasets: list) -> int:
    """STOW-RS the datasets to the server (one request); returns how many it stored. A refused request, a server that
    cannot be reached, or an instance the server reports as failed is one line (DicomWebError)."""
    where = f"storing to {target.public()}"
    bounded = session()
    c = client(target.base_url, bounded)
    try:
        answer = c.store_instances(datasets)
    except Exception as exc:
        raise _one_line(target, exc, where, bounded) from None
    finally:
        bounded.close()
    failed = list(getattr(answer, "FailedSOPSequence", []) or [])
    if failed:
        reason = failed[0].get("FailureReason", "?")
        raise PacsError(f"{where}: the PACS refused {len(failed)} of {len(datasets)} object(s) (reason {reason})")
    return len(datasets)
