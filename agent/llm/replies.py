"""An endpoint's reply, bounded while it is read. The OpenAI SDK reads a whole reply into memory before anything
sees it (a 50 MB reply was read, re-asked twice and stored three times), and its timeout applies to each read, so a
reply that trickles a byte at a time never times out. `http_client(timeout_s)` is the SDK's own default client with
one response hook that wraps the body's byte stream:

* more than `stored_text_cap()` bytes (DXAGENT_MAX_STORED_REPLY_BYTES, 256 KiB: the most a trace stores of one reply,
  so what is read is what is recorded) -> `ReplyTooLarge`;
* not finished within the client timeout of its headers -> `ReplyTooSlow`;
* compressed although asked for identity (a size read could not bound) -> `ReplyTooLarge`.

Both derive from the SDK's own error class, which it raises without retrying: a retry would only be as large or as
slow again. The message is one line; the planner records it instead of the reply. (dxagent does not stream replies;
a streamed one would be bounded the same way, as a whole.)
"""

from __future__ import annotations

import sys
import time
from typing import Any

import openai

from agent.core.files import size_text, stored_text_cap


class ReplyTooLarge(openai.OpenAIError):
    """The endpoint's reply is over the cap; not read further."""


class ReplyTooSlow(openai.OpenAIError):
    """The endpoint's reply did not end within the client timeout."""


def _httpx(response: Any) -> Any:
    """The httpx flavour the SDK uses (httpx2 for openai 3, httpx before): the module of the response it made."""
    return sys.modules[type(response).__module__.partition(".")[0]]


def bound_response(cap: int, seconds: float):
    """A response hook: the body of each reply is read through a counter that stops it at `cap` bytes or
    `seconds` after its headers."""

    def hook(response: Any) -> None:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ReplyTooLarge(f"the endpoint sent a {encoding}-compressed reply although asked for none; its size "
                                "could not be bounded while reading, so it was not read")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            response.close()
            raise ReplyTooLarge(f"the endpoint's reply is {size_text(int(declared))}, over {size_text(cap)} "
                                "(DXAGENT_MAX_STORED_REPLY_BYTES): not read")
        inner, deadline = response.stream, time.monotonic() + seconds

        class Bounded(_httpx(response).SyncByteStream):
            def __iter__(self):
                size = 0
                for chunk in inner:
                    size += len(chunk)
                    if size > cap:
                        raise ReplyTooLarge(f"the endpoint's reply is over {size_text(cap)} "
                                            "(DXAGENT_MAX_STORED_REPLY_BYTES): not read further")
                    if time.monotonic() > deadline:
                        raise ReplyTooSlow(f"the endpoint's reply had not finished within {seconds:.0f} s of its "
                                           f"headers ({size_text(size)} so far): not read further")
                    yield chunk

            def close(self) -> None:
                inner.close()

        response.stream = Bounded()

    return hook


def http_client(timeout_s: float) -> Any:
    """The SDK's default HTTP client (its connection limits, redirects and proxy settings), with the bound."""
    return openai.DefaultHttpxClient(timeout=timeout_s,
                                     event_hooks={"response": [bound_response(stored_text_cap(), timeout_s)]})
