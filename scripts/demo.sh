#!/usr/bin/env bash
# The main job on its built-in default (installs what it needs into .venv/ first):
#  1. trains a LoRWeB basis with the tiny preset (random tiny FLUX-architecture backbone, synthetic analogies, CPU,
#     about a minute) -> outputs/lorweb_tiny/lorweb_basis.safetensors and a sample grid in outputs/lorweb_tiny/samples/
#  2. runs the four-panel composite example workflow headless through a real ComfyUI -> outputs/*.png
# Extra arguments go to the trainer, e.g. `bash scripts/demo.sh --max-steps 40`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m training.train_lorweb --preset tiny "$@"
.venv/bin/python -m devtools.run_example
