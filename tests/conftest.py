from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import realcases_root, serve_http  # noqa: E402

from agent.core.files import cache_root  # noqa: E402
from agent.store.artifacts import ArtifactStore  # noqa: E402


@pytest.fixture
def realcases() -> Path:
    root = realcases_root()
    if root is None:
        pytest.skip("../shared/data/realcases is absent (set DXAGENT_REALCASES)")
    return root


@pytest.fixture(scope="session")
def yolo_trained(tmp_path_factory) -> tuple[Path, Path]:
    """A yolo11n trained on generated discs and frames (tests/makers/yolo.py, ~100 s once per session): (its card.yaml,
    the cache root its ultralytics settings were written under)."""
    if importlib.util.find_spec("ultralytics") is None:  # find_spec: importing ultralytics probes the network
        pytest.skip("ultralytics is not installed (the [yolo] extra)")
    from makers import yolo as yolo_maker

    cache = tmp_path_factory.mktemp("yolo-cache")
    src = tmp_path_factory.mktemp("yolo-src")
    # The trained folder (card, weights, dataset) is kept between sessions, keyed by the maker's code and the
    # ultralytics/torch versions: the tests check loading and detecting with real weights the project trains, not
    # the training itself, which a bare machine still pays once (about 50-100 s here).
    key = hashlib.sha1(Path(yolo_maker.__file__).read_bytes() + "|".join(
        importlib.metadata.version(d) for d in ("ultralytics", "torch")).encode()).hexdigest()[:16]
    kept = cache_root() / "test-fixtures" / f"yolo-{key}"
    if (kept / "card.yaml").is_file():
        shutil.copytree(kept, src, dirs_exist_ok=True)
        return src / "card.yaml", cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DXAGENT_CACHE", str(cache))
        card = yolo_maker.make(src)
    part = kept.with_name(f"{kept.name}.{os.getpid()}.partial")
    shutil.copytree(src, part, ignore=shutil.ignore_patterns("runs", ".hash-cache"), dirs_exist_ok=True)
    try:
        part.rename(kept)  # another session may have kept its own meanwhile: either is fine
    except OSError:
        shutil.rmtree(part, ignore_errors=True)
    return card, cache


def _chromium() -> str | None:
    for name in (os.environ.get("DXAGENT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright (its own browser download is never used) for the HTML pages' tests."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [dev] extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (scripts/install.sh installs it): the browser tests are skipped")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")

# --- OpenAI-compatible endpoints for tests/test_openai_backend.py: a real llama-cpp-python server
# --- serving SmolLM2, and a scripted fake that injects faults. Both listen on 127.0.0.1 only.

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def _loopback_without_proxy():
    """httpx (under openai) honours *_PROXY variables: keep 127.0.0.1 traffic direct."""
    old = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    for k, v in old.items():
        os.environ[k] = ",".join(x for x in (v, "127.0.0.1", "localhost") if x)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory, _loopback_without_proxy):
    """llama-cpp-python's OpenAI-compatible server with SmolLM2-135M and native tool calling."""
    missing = [m for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context",
                           "pydantic_settings") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] is not installed (missing {', '.join(missing)})")
    from agent.llm.backends import LLMUnavailable, smollm_gguf

    try:
        model = smollm_gguf()
    except LLMUnavailable as exc:
        pytest.skip(str(exc))
    port, alias = free_port(), "smollm2-135m"
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    threads = str(max(1, (os.cpu_count() or 2) // 2))  # 2 threads on 2 busy cores stall llama.cpp 5-10x
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--chat_format", "chatml-function-calling",
           "--n_threads", threads, "--n_threads_batch", threads, "--seed", "0", "--verbose", "False"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with _NO_PROXY.open(f"{base}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer /v1/models within 60 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield SimpleNamespace(base_url=base, model=alias, log=log, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Reply:
    """One scripted answer of the fake server."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0  # seconds to wait before answering (capped by the server's max_delay)


def _completion(message: dict[str, Any], finish: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish,
                     "logprobs": None}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57},
    }).encode()


class FakeOpenAI:
    """A loopback OpenAI-compatible /v1/chat/completions that replays a script, for fault injection.

    Each POST consumes the next `Reply` of `script` (an empty script answers 400, which clients do not
    retry); `requests` records every request (path, headers, JSON body) so tests can check what was sent.
    """

    max_delay = 10.0

    def __init__(self):
        self.script: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.releases = 0  # release() calls so far: a delayed reply is sent once this passes its count at arrival
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(Reply(body=json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]})
                                 .encode()) if self.path.rstrip("/").endswith("/models") else Reply(404, b"{}"))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode(errors="replace")}
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    reply = fake.script.pop(0) if fake.script else fake.error(400, "fake server: script exhausted")
                    releases = fake.releases
                if fake.wait(min(reply.delay, fake.max_delay), releases):
                    return
                self._send(reply)

            def _send(self, reply: Reply):
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd, self.base_url, self.thread = serve_http(Handler)

    def reset(self, *replies: Reply) -> FakeOpenAI:
        with self.lock:
            self.script, self.requests = list(replies), []
        return self

    def wait(self, seconds: float, releases: int) -> bool:
        """A delayed reply's wait: `seconds`, or less once `release()` is called; True when the server is closing."""
        end = time.monotonic() + seconds
        while self.releases == releases and (left := end - time.monotonic()) > 0:
            if self.stop.wait(min(left, 0.05)):
                return True
        return self.stop.is_set()

    def release(self):
        """Send the replies held back by their delay now: a test that has checked what it waited for ends the clients'
        requests at once instead of waiting out the delay (replies asked for later wait as scripted)."""
        with self.lock:
            self.releases += 1

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    # reply builders
    @staticmethod
    def text(content: str) -> Reply:
        return Reply(body=_completion({"content": content}, "stop"))

    @staticmethod
    def call(name: str, arguments: dict[str, Any] | str) -> Reply:
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return Reply(body=_completion({"content": None, "tool_calls": [
            {"id": "call_fake_1", "type": "function", "function": {"name": name, "arguments": args}}]}, "tool_calls"))

    @staticmethod
    def error(status: int, message: str) -> Reply:
        return Reply(status, json.dumps({"error": {"message": message, "type": "fake_error", "code": None}}).encode())

    @staticmethod
    def garbage(content_type: str = "application/json") -> Reply:
        return Reply(body=b"<html>\x00not json {{{", content_type=content_type)

    @classmethod
    def slow(cls, seconds: float) -> Reply:
        return Reply(body=cls.text("too late").body, delay=seconds)


@pytest.fixture(scope="session")
def _fake_openai_server(_loopback_without_proxy):
    server = FakeOpenAI()
    yield server
    server.close()


@pytest.fixture
def fake_openai(_fake_openai_server) -> FakeOpenAI:
    """The session's fake server with an empty script and no recorded requests."""
    return _fake_openai_server.reset()


@pytest.fixture(scope="session")
def pg():
    """One throwaway PostgreSQL server for the session (tests/pgcluster.py); skipped, with the reason, where none can
    be started. Each test takes a fresh database from it (`pg.new_database()`)."""
    from pgcluster import PgCluster

    why = PgCluster.why_not()
    if why:
        pytest.skip(why)
    cluster = PgCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_kind(request) -> str:
    """The trace-store and replay families run on both databases."""
    if request.param == "postgresql":
        request.getfixturevalue("pg")
    return request.param


@pytest.fixture
def where(store_kind, tmp_path, request):
    """A fresh, empty trace store of `store_kind` (helpers.StoreAt)."""
    from helpers import StoreAt

    if store_kind == "sqlite":
        return StoreAt(tmp_path / "traces")
    pg = request.getfixturevalue("pg")
    return StoreAt(tmp_path / "traces", pg.new_database(), pg)
