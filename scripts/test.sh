#!/usr/bin/env bash
# The test suite: installs what it needs into .venv/, then runs pytest (unit tests + a real ComfyUI server).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k composite`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# the pack's own .pyc once, on every core: where PYTHONDONTWRITEBYTECODE is set (this CI machine) each of the suite's
# processes (workers, ComfyUI servers, trainer runs) would otherwise compile every module it imports
.venv/bin/python -m compileall -q -j 0 __init__.py analogy_core nodes training bench devtools tests > /dev/null || true
exec .venv/bin/python -m pytest "$@"
