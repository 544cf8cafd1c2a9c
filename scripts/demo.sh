#!/usr/bin/env bash
# Install, then run the agent on the bundled demo cases with the embedded default planner (no server, no key, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/dxagent demo "$@"
