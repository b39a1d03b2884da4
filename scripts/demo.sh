#!/usr/bin/env bash
# The main job on its built-in default: run the example workflow headless through a real ComfyUI and write the
# result images to outputs/. Installs what it needs into .venv/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m devtools.run_example "$@"
