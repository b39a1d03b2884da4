#!/usr/bin/env bash
# The test suite: installs what it needs into .venv/, then runs pytest (unit tests + a real ComfyUI server).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k composite`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
