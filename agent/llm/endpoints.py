"""Named OpenAI-compatible endpoints: the planner, the narrator and the `vlm_ask` tool may each use a different one.

A TOML file (`$DXAGENT_ENDPOINTS`, else `~/.config/dxagent/endpoints.toml`) names them:

    [endpoints.vlm]
    base_url = "http://127.0.0.1:8080/v1"
    model = "qwen2.5-vl-7b-instruct"
    api_key_env = "MY_VLM_KEY"        # the key is read from this variable, never written in the file
    vision = true                      # it takes image parts; stated, never guessed from the model's name
    intended_use = "research VQA on radiographs"
    timeout_s = 60
    retries = 2
    max_tokens_per_run = 4000          # completion + prompt tokens one run may spend on this endpoint
    image_max_px = 768                 # long side of the pictures sent (downscaled, never enlarged)
    max_images = 3
    redact_corners = false             # black out the four corners (where burned-in text usually sits)

and environment variables override or replace the file, per field: `DXAGENT_<NAME>_BASE_URL`, `_MODEL`, `_API_KEY`,
`_VISION` (1/true/yes), `_TIMEOUT_S`, `_RETRIES`, `_MAX_TOKENS_PER_RUN`, `_IMAGE_MAX_PX`, `_MAX_IMAGES`,
`_REDACT_CORNERS` (NAME upper-cased: `DXAGENT_VLM_BASE_URL`). An endpoint with no base URL or model is not configured.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from agent.llm.backends import LLMUnavailable, public_url


class EndpointError(LLMUnavailable):
    """A named endpoint's configuration is unusable: one line for the user (exit 2, like any unusable backend)."""


class Endpoint(BaseModel):
    name: str
    base_url: str
    model: str
    api_key: str = Field(default="none", repr=False, exclude=True)  # never dumped into a trace
    vision: bool = False
    intended_use: str = "research use: answers about images from a general or medical vision-language model"
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    max_tokens_per_run: int = Field(default=8000, gt=0)
    image_max_px: int = Field(default=768, ge=32, le=4096)
    max_images: int = Field(default=3, ge=1, le=16)
    redact_corners: bool = False

    def public(self) -> dict:
        """What a trace or evidence may hold: no key, no credentials in the URL."""
        return self.model_dump() | {"base_url": public_url(self.base_url)}


_FIELDS = ("base_url", "model", "api_key", "vision", "timeout_s", "retries", "max_tokens_per_run", "image_max_px",
           "max_images", "redact_corners", "intended_use")


def config_path() -> Path:
    return Path(os.environ.get("DXAGENT_ENDPOINTS") or Path.home() / ".config" / "dxagent" / "endpoints.toml")


def _file_entries() -> dict[str, dict]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EndpointError(f"{path.name}: not a readable TOML file ({str(exc)[:120]})") from None
    entries = data.get("endpoints", {})
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise EndpointError(f"{path.name}: expected [endpoints.NAME] tables")
    return entries


def _invalid(name: str, exc: ValidationError) -> EndpointError:
    err = exc.errors()[0]
    return EndpointError(f"endpoint {name!r}: {'.'.join(map(str, err['loc']))}: {err['msg']}")


def _truthy(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


def _raw(name: str) -> dict:
    """The file entry of `name` with the environment's overrides (no validation, no key from the file)."""
    raw = dict(_file_entries().get(name, {}))
    key_env = raw.pop("api_key_env", None)
    if "api_key" in raw:
        raise EndpointError(f"{config_path().name}: [endpoints.{name}] holds an api_key; name the variable that holds "
                            "it with api_key_env instead")
    if key_env:
        raw["api_key"] = os.environ.get(str(key_env), "none")
    for f in _FIELDS:
        v = os.environ.get(f"DXAGENT_{name.upper()}_{f.upper()}")
        if v is not None:
            raw[f] = _truthy(v) if f in ("vision", "redact_corners") else v
    return raw


def token_budget(name: str) -> int | None:
    """max_tokens_per_run of endpoint `name` when it is set (file or DXAGENT_<NAME>_MAX_TOKENS_PER_RUN), else None."""
    v = _raw(name).get("max_tokens_per_run")
    if v is None:
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if n <= 0:
        raise EndpointError(f"endpoint {name!r}: max_tokens_per_run must be a positive integer, not {v!r}")
    return n


def load(name: str) -> Endpoint | None:
    """The endpoint called `name` (file entry, then environment overrides), or None when it is not configured."""
    raw = _raw(name)
    if not raw.get("base_url") or not raw.get("model"):
        return None
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise EndpointError(f"endpoint {name!r}: unknown setting(s) {', '.join(sorted(unknown))}")
    try:
        return Endpoint(name=name, **raw)
    except ValidationError as exc:
        raise _invalid(name, exc) from None


class Vision(BaseModel):
    """How an endpoint is sent pictures (the part of its settings that the planner needs)."""

    image_max_px: int = Field(default=768, ge=32, le=4096)
    max_images: int = Field(default=3, ge=1, le=16)
    redact_corners: bool = False


def vision_settings(name: str) -> Vision | None:
    """The picture settings of endpoint `name` when it is declared vision-capable (file or DXAGENT_<NAME>_VISION),
    whether or not its URL comes from the file; None when it is not declared vision-capable."""
    raw = _raw(name)
    if not (raw.get("vision") is True or (isinstance(raw.get("vision"), str) and _truthy(raw["vision"]))):
        return None
    try:
        return Vision(**{k: raw[k] for k in raw if k in Vision.model_fields})
    except ValidationError as exc:
        raise _invalid(name, exc) from None
