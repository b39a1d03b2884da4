"""The main job's mechanism in the real ComfyUI: the shipped LoRWeB workflow with the quick world's models swapped in
for the downloads (devtools/world_demo.py), the world autoencoder through ComfyUI's stock VAELoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.world import scenes as world
from devtools.images import load_png, save_png
from devtools.world_demo import FILES, b_prime_node, install_world_models, world_prompt
from world_fixtures import quick_bench, quick_world

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
PANEL = world.REFERENCE_SIZE


@pytest.fixture(scope="module")
def installed(comfy):
    built = quick_world()
    _, out = quick_bench()
    install_world_models(built.root, out / "lorweb" / "train" / "lorweb_basis.safetensors", comfy.base_dir / "models")
    return built


def test_stock_vae_loader_reads_the_world_autoencoder(comfy, installed):
    """VAELoader -> VAEEncode -> VAEDecode in ComfyUI equals the world autoencoder's round trip (8-bit output)."""
    from training.world.autoencoder import load_world_autoencoder

    ex = world.example("remove_discs", "heldout", 0, PANEL)
    grid = torch.cat([torch.cat([ex.a, ex.b], 1), torch.cat([ex.b_prime, ex.a_prime], 1)], 0)
    save_png(grid, comfy.base_dir / "input" / "world_vae_grid.png")
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": FILES["vae"]}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "world_vae_grid.png"}},
              "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
              "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
              "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "world_vae"}}}
    ours = load_png(comfy.output_files(comfy.run(prompt), "5")[0])
    codec = load_world_autoencoder(installed.path("autoencoder"))
    pixels = load_png(comfy.base_dir / "input" / "world_vae_grid.png").permute(2, 0, 1)[None] * 2 - 1
    expected = ((codec.decode(codec.encode(pixels)) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0)
    assert (ours - expected).abs().max() <= 1.5 / 255, "ComfyUI's 64-wide TAESD equals the trained network"
    assert (ours - grid).abs().max() <= 2.5 / 255, "and it reconstructs the world exactly (world v2, 8-bit)"


def run_b_prime(comfy, family: str, bypass_lora: bool = False) -> tuple[np.ndarray, world.Example]:
    ex = world.example(family, "heldout", 0, PANEL)
    images = {}
    for role in ("a", "a_prime", "b"):
        images[role] = f"world_test_{family}_{role}.png"
        save_png(getattr(ex, role), comfy.base_dir / "input" / images[role])
    prompt = world_prompt(comfy.object_info(), images, PANEL, steps=8, seed=0)
    if bypass_lora:
        by_type = {node["class_type"]: key for key, node in prompt.items()}
        ksampler = prompt[by_type["KSampler"]]["inputs"]
        ksampler["model"] = prompt[by_type["AnalogyApplyLoRA"]]["inputs"]["model"]
    node = b_prime_node(prompt)
    for key, n in prompt.items():
        if n["class_type"] == "SaveImage":
            n["inputs"]["filename_prefix"] = f"world_test_{family}_{bypass_lora}_{key}"
    history = comfy.run(prompt)
    return np.asarray(Image.open(comfy.output_files(history, node)[0]), dtype=np.float32) / 255, ex


def test_shipped_workflow_edits_b_with_the_world_models(comfy, installed):
    """The shipped example, world models swapped in: without the LoRA it returns B (the backbone copies); with the
    trained basis it moves B′ toward the truth on a held-out scene of a training family."""
    base, ex = run_b_prime(comfy, "invert", bypass_lora=True)
    b, truth = ex.b.numpy(), ex.b_prime.numpy()
    assert base.shape == (PANEL, PANEL, 3)
    assert np.abs(base - b).mean() < 0.06, "the base copies B"
    edited, _ = run_b_prime(comfy, "invert")
    no_edit = np.abs(b - truth).mean()
    assert np.abs(edited - truth).mean() < 0.7 * no_edit, (np.abs(edited - truth).mean(), no_edit)
