#!/usr/bin/env bash
# Install, then run the test suite (real images from ../shared/data/realcases are used where present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache  # the layers contract in pyproject.toml ([tool.importlinter])
exec .venv/bin/python -m pytest -q "$@"
