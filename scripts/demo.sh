#!/usr/bin/env bash
# The main job: a real edit B′ from the shipped LoRWeB workflow in a real ComfyUI, on the analogy world
# (installs what it needs into .venv/ first). See README "The analogy world".
#  1. builds or reuses the world's pretrained models (autoencoder, world CLIP, FLUX.1-Kontext-like backbone)
#     -> outputs/world/v2-full-s0/ (a few minutes the first time; cached afterwards)
#  2. trains LoRWeB's world preset on the training families, or reuses the finished run -> outputs/lorweb_world/<key>/
#  3. runs example_workflows/lorweb_kontext_analogy.json in a real ComfyUI with the world's models in place of the
#     downloads, on a held-out scene of every family -> outputs/world_demo.png: A | A' | B | B' (ours) | B' (truth),
#     with the errors printed.
# Extra arguments go to devtools.world_demo, e.g. `bash scripts/demo.sh --families train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m devtools.world_demo "$@"
