"""Layout and packaging rules: one dependency list, ComfyUI-free core, training runnable from the repo root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMFY_MODULES = ("comfy", "folder_paths", "nodes", "server", "execution", "comfy_extras", "comfy_api")


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_requirements_files_agree_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert requirement_lines(REPO / "requirements.txt") == project["dependencies"]
    training = project["optional-dependencies"]["training"]
    assert requirement_lines(REPO / "requirements" / "training.txt") == training
    assert requirement_lines(REPO / "requirements" / "gpu.txt") == project["optional-dependencies"]["gpu"]
    everything = project["dependencies"] + training
    for name in ("torch", "diffusers", "transformers", "peft", "safetensors", "open_clip_torch", "accelerate", "einops"):
        assert any(dep.startswith(name) for dep in everything), name


def test_node_requirements_cover_what_the_nodes_import():
    """requirements.txt is what ComfyUI-Manager installs: every third-party module the pack's ComfyUI side imports
    must be in it or come with ComfyUI itself; training-only modules must not be imported there."""
    import ast

    comfy_provides = {"torch", "numpy", "yaml", "PIL", "safetensors", "transformers", "einops", "comfy",
                      "folder_paths", "comfy_api", "comfy_extras", "node_helpers", "server", "latent_preview"}
    declared = {line.split(">")[0].split("=")[0].split(";")[0].strip().replace("-", "_")
                for line in requirement_lines(REPO / "requirements.txt")}
    training_only = {"accelerate", "peft", "open_clip", "bitsandbytes", "tensorboard", "tqdm"}
    offenders = []
    for path in [REPO / "__init__.py", *(REPO / "nodes").rglob("*.py"), *(REPO / "analogy_core").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in comfy_provides or top in declared:
                    continue
                if top in training_only and id(node) not in module_level:
                    continue  # imported inside a training-only helper, never on the nodes' path
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


def test_comfy_registry_section():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert tool["PublisherId"] and tool["DisplayName"] and "Icon" in tool


def test_registry_icon_is_shipped_in_the_repo():
    """[tool.comfy] Icon is the raw URL of a file of this repository (main branch): a square PNG of at most
    400 x 400 px, as the registry asks."""
    from PIL import Image

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    repository = project["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    icon = project["tool"]["comfy"]["Icon"]
    assert icon.startswith(prefix), icon
    path = REPO / icon.removeprefix(prefix)
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == image.height <= 400


def run_comfy_validate(folder: Path) -> subprocess.CompletedProcess:
    comfy = Path(sys.executable).parent / "comfy"
    if not comfy.is_file():
        pytest.fail("comfy-cli is not installed: run `bash scripts/setup_env.sh` (requirements/test.txt lists it)")
    return subprocess.run([str(comfy), "--skip-prompt", "node", "validate"], cwd=folder, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, DO_NOT_TRACK="1"))


def test_comfy_node_validate_passes():
    """What the registry runs before publishing (`comfy node validate`, offline): pyproject.toml parses with a
    version, and ruff's security rules (exec, eval, several statements on a line) find nothing."""
    done = run_comfy_validate(REPO)
    said = done.stdout + done.stderr  # comfy-cli prints its verdicts through rich, to stderr when not a terminal
    assert done.returncode == 0, said
    assert "All validation checks passed" in said and "Security warnings" not in said, said


def test_comfy_node_validate_catches_a_broken_pyproject(tmp_path):
    """The check above can fail: without a project version it does."""
    text = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace('version = "0.1.0"\n', "", 1))
    done = run_comfy_validate(tmp_path)
    assert done.returncode != 0 and "version" in done.stdout + done.stderr


def test_top_level_layout():
    for name in ("__init__.py", "nodes", "training", "pyproject.toml", "README.md", "example_workflows", "tests",
                 "LICENSE", "bench/README.md", ".ci/run"):
        assert (REPO / name).exists(), name


def test_core_imports_without_comfyui():
    """Every analogy_core module imports in a fresh interpreter and pulls in no ComfyUI module."""
    modules = sorted(p.stem for p in (REPO / "analogy_core").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('analogy_core.' + m)\n"
        f"bad = [m for m in {COMFY_MODULES!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_training_module_runs_from_repo_root(tmp_path):
    out = tmp_path / "synthetic"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['make_synthetic_dataset', '--out', {str(out)!r}, '--per-family', '2', '--size', '32']\n"
        "runpy.run_module('training.make_synthetic_dataset', run_name='__main__')\n"
        f"bad = [m for m in {COMFY_MODULES!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    records = [json.loads(line) for line in (out / "quads.jsonl").read_text().splitlines()]
    assert len(records) == 10 and {r["family"] for r in records} == {"invert", "grayscale", "channel_swap",
                                                                     "hflip", "vflip"}
    assert all((out / r[k]).is_file() for r in records for k in ("a", "a_prime", "b", "b_prime"))


def test_pack_module_uses_only_relative_imports():
    """Inside ComfyUI the pack is imported under its folder name: absolute imports of our own packages would break
    (or pick up ComfyUI's top-level `nodes`)."""
    offenders = []
    for path in [REPO / "__init__.py", *(REPO / "nodes").rglob("*.py"), *(REPO / "analogy_core").rglob("*.py")]:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("from nodes", "import nodes", "from analogy_core", "import analogy_core")):
                offenders.append(f"{path.relative_to(REPO)}: {stripped}")
    assert not offenders, offenders


def test_every_image_the_example_workflows_load_is_shipped(tmp_path):
    """A first run has inputs: every Load Image node of every example workflow names an image shipped in
    ``example_workflows/input/`` (the README's "First run" copies them into ComfyUI/input/), and those are the images
    devtools writes — an A, an A′ that is A inverted (so the pair shows a change), and a B."""
    import numpy as np
    from PIL import Image

    from devtools.make_examples import EXAMPLE_INPUTS_DIR
    from devtools.run_example import INPUT_NAMES, write_default_inputs

    named = set()
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                named.add(node["widgets_values"][0])
    assert named == set(INPUT_NAMES.values()), named
    shipped = {p.name for p in EXAMPLE_INPUTS_DIR.glob("*.png")}
    assert named <= shipped, f"not shipped in {EXAMPLE_INPUTS_DIR}: {sorted(named - shipped)}"

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    a, a_prime = (pixels(EXAMPLE_INPUTS_DIR / INPUT_NAMES[role]) for role in ("a", "a_prime"))
    assert np.abs(a - a_prime).mean() > 30, "A′ must differ from A"
    assert np.abs(255 - a - a_prime).max() <= 1, "A′ is A inverted"
    fresh = tmp_path / "input"
    write_default_inputs(fresh)
    for name in named:
        # the images are float maths (sigmoid, sqrt, cos) rounded to 8 bits: another CPU or torch build may round a
        # handful of values the other way (measured: 1 of 245,760, by 1); a stale image differs everywhere
        difference = np.abs(pixels(fresh / name) - pixels(EXAMPLE_INPUTS_DIR / name))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, \
            f"{name} is stale: run python -m devtools.make_examples"
