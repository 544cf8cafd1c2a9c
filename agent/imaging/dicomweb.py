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
DXAGENT_DICOMWEB_PASSWORD (basic auth). DXAGENT_DICOMWEB_TIMEOUT (seconds per request, default 30) and
DXAGENT_DICOMWEB_RETRIES (attempts on 408/429/503/504, default 3). Credentials never go into a URL, a log or the trace.

Every failure is one line (`DicomWebError`, a UserError): a malformed reference, a server that cannot be reached, a
refused request (401/403), a study or series the server does not have, an instance that does not parse.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from agent.core.errors import UserError
from agent.core.files import cache_root, write_atomic

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"


class DicomWebError(UserError, RuntimeError):
    """A DICOMweb reference could not be resolved; the message is one line."""


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
        if uid and not all(c.isdigit() or c == "." for c in uid):
            raise DicomWebError(f"{uid[:70]!r} is not a DICOM UID (digits and dots)")
    base = f"{SCHEMES[parts.scheme.lower()]}://{parts.netloc}{parts.path.rstrip('/')}"
    return Reference(base, study, series)


def _key(*uids: str) -> str:
    return hashlib.sha256("|".join(uids).encode()).hexdigest()[:24]


def client(base_url: str):  # -> dicomweb_client.DICOMwebClient
    """A DICOMweb client for `base_url` with the environment's auth, timeout and retries."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    headers = {}
    if token := os.environ.get("DXAGENT_DICOMWEB_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    elif user := os.environ.get("DXAGENT_DICOMWEB_USER"):
        session.auth = (user, os.environ.get("DXAGENT_DICOMWEB_PASSWORD", ""))
    timeout = float(os.environ.get("DXAGENT_DICOMWEB_TIMEOUT", "30"))
    c = DICOMwebClient(base_url, session=session, headers=headers or None, timeout=timeout)
    attempts = int(os.environ.get("DXAGENT_DICOMWEB_RETRIES", "3"))
    c.set_http_retry_params(retry=attempts > 1, max_attempts=max(1, attempts), wait_exponential_multiplier=200)
    return c


def _one_line(ref: Reference, exc: BaseException, where: str | None = None) -> DicomWebError:
    import requests

    where = where or ref.public()
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return DicomWebError(f"{where}: the PACS refused the request ({code}): set DXAGENT_DICOMWEB_TOKEN, or "
                                 "DXAGENT_DICOMWEB_USER and DXAGENT_DICOMWEB_PASSWORD")
        if code == 404:
            return DicomWebError(f"{where}: the PACS has no such study or series (404)")
        return DicomWebError(f"{where}: the PACS answered {code} {exc.response.reason}")
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return DicomWebError(f"{where}: cannot reach the PACS at {ref.base_url} ({type(exc).__name__})")
    text = " ".join(str(exc).split())[:160] or type(exc).__name__
    return DicomWebError(f"{where}: {type(exc).__name__}: {text}")


def _uids(found: list[dict], tag: str) -> list[str]:
    return [str(d[tag]["Value"][0]) for d in found if d.get(tag, {}).get("Value")]


def fetch(ref: Reference, cache: Path | None = None) -> list[Path]:
    """One local folder per series of the study (or the one series named), every instance retrieved once."""
    import pydicom

    root = cache or cache_root() / "dicomweb"
    c = client(ref.base_url)
    try:
        series = [ref.series] if ref.series else _uids(c.search_for_series(ref.study, get_remaining=True), _SERIES)
        if not series:
            raise DicomWebError(f"{ref.public()}: the PACS has no series in this study")
        folders = []
        for s in series:
            sops = _uids(c.search_for_instances(ref.study, s, get_remaining=True), _SOP)
            if not sops:
                raise DicomWebError(f"{ref.public()}: the PACS has no instances in series {s}")
            folder = root / _key(ref.study, s)
            for sop in sops:
                dest = folder / f"{_key(sop)}.dcm"
                if dest.is_file():
                    continue
                ds = c.retrieve_instance(ref.study, s, sop)
                buf = io.BytesIO()
                pydicom.dcmwrite(buf, ds, enforce_file_format=True)
                write_atomic(dest, buf.getvalue())
            folders.append(folder)
        return folders
    except DicomWebError:
        raise
    except Exception as exc:  # HTTP, connection, a body that does not parse: one line naming the reference
        raise _one_line(ref, exc) from None


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
    c = client(root.base_url)
    try:
        found = c.search_for_studies(search_filters=filters, limit=limit, get_remaining=limit > 100)
    except Exception as exc:
        raise _one_line(root, exc, f"querying {root.public()}") from None
    dates = {str(d[_STUDY]["Value"][0]): str((d.get("00080020", {}).get("Value") or [""])[0]) for d in found
             if d.get(_STUDY, {}).get("Value")}
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
    c = client(target.base_url)
    where = f"storing to {target.public()}"
    try:
        answer = c.store_instances(datasets)
    except Exception as exc:
        raise _one_line(target, exc, where) from None
    failed = list(getattr(answer, "FailedSOPSequence", []) or [])
    if failed:
        reason = failed[0].get("FailureReason", "?")
        raise DicomWebError(f"{where}: the PACS refused {len(failed)} of {len(datasets)} object(s) (reason {reason})")
    return len(datasets)
