#!/usr/bin/env bash
# Install, then run the test suite (real images from ../shared/data/realcases are used where present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache  # the layers contract in pyproject.toml ([tool.importlinter])
# Two pytest workers (pytest-xdist), one test file each at a time (module fixtures are not built twice): on this 2-core
# machine 994 s against 1,288 s in one process (2026-12-07, idle), as many tests wait on servers, subprocesses and
# start-ups; three workers took 1,231 s (2026-12-07, session 39: the cores thrash). DXAGENT_TEST_WORKERS=0 runs them
# in this process.
exec .venv/bin/python -m pytest -q -n "${DXAGENT_TEST_WORKERS:-2}" --dist loadfile "$@"
