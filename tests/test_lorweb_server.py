"""The shipped LoRWeB example workflow, run in the real ComfyUI server on tiny models.

Only what needs real weights is swapped: the FLUX and CLIP-vision loaders become test loaders for tiny models
(ComfyUI's detectors assume full-size shapes), the text encoder becomes seeded random conditioning, and the VAE is a
random 16-channel TAESD. Everything else — Four-Panel Composite, VAEEncode, ReferenceLatent (Kontext), FluxGuidance,
Encode Analogy, Load/Mix LoRA Basis, Apply LoRA, KSampler, Extract Panel — is the example as shipped.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.workflow import ui_to_api
from test_comfy_server import REPO
from test_encode_analogy import TINY_CLIP
from test_lorweb_reference import official_basis_file
from tiny_models import FLUX_COMFY, randomize_, tiny_flux_pair

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def tiny_files(comfy, comfy_inproc):
    """Tiny FLUX, CLIP vision, TAEF1-style VAE and a LoRWeB basis (official layout) in the server's model folders."""
    from devtools.run_example import write_default_inputs
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    import comfy.taesd.taesd as taesd

    models = comfy.base_dir / "models"
    for folder in ("diffusion_models", "clip_vision", "vae", "lorweb"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    diffusers_flux, patcher = tiny_flux_pair(comfy_inproc.comfy, seed=3)
    save_file({k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()},
              models / "diffusion_models" / "tiny_flux.safetensors", metadata={"unet_config": json.dumps(FLUX_COMFY)})
    official_basis_file(diffusers_flux, models / "lorweb" / "tiny_basis.safetensors", seed=5,
                        emb=TINY_CLIP["projection_dim"])

    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP))
    randomize_(clip, seed=6)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, models / "clip_vision" / "tiny_clip.safetensors",
              metadata={"clip_config": json.dumps(dict(TINY_CLIP, model_type="clip_vision_model"))})

    vae = taesd.TAESD(latent_channels=16)
    randomize_(vae, seed=7)
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("vae_")}
    state.update(vae_scale=torch.tensor(1.0), vae_shift=torch.tensor(0.0))
    save_file(state, models / "vae" / "tiny_taef1.safetensors")
    write_default_inputs(comfy.base_dir / "input")


def example_prompt(comfy) -> dict[str, dict]:
    workflow = json.loads((REPO / "example_workflows" / "lorweb_kontext_analogy.json").read_text())
    prompt = ui_to_api(workflow, comfy.object_info())
    by_type = {node["class_type"]: key for key, node in prompt.items()}
    swaps = {
        "UNETLoader": ("AnalogyTestTinyFluxLoader", {"unet_name": "tiny_flux.safetensors"}),
        "CLIPVisionLoader": ("AnalogyTestTinyClipVisionLoader", {"clip_name": "tiny_clip.safetensors"}),
        "CLIPTextEncode": ("AnalogyTestConditioning", {"seed": 1, "tokens": 8, "width": FLUX_COMFY["context_in_dim"],
                                                       "pooled_width": FLUX_COMFY["vec_in_dim"]}),
    }
    for class_type, (replacement, inputs) in swaps.items():
        prompt[by_type[class_type]] = {"class_type": replacement, "inputs": inputs}
    del prompt[by_type["DualCLIPLoader"]]
    prompt[by_type["VAELoader"]]["inputs"]["vae_name"] = "tiny_taef1.safetensors"
    prompt[by_type["AnalogyLoadLoRABasis"]]["inputs"]["basis_name"] = "tiny_basis.safetensors"
    prompt[by_type["AnalogyFourPanelComposite"]]["inputs"].update(panel_size="custom", width=64, height=64,
                                                                   snap="multiple_of_16")
    prompt[by_type["KSampler"]]["inputs"].update(steps=2, seed=11)
    return prompt


def b_prime(comfy, prompt, prefix, strength=None, mode=None, bypass_lora=False) -> np.ndarray:
    prompt = copy.deepcopy(prompt)
    by_type = {node["class_type"]: key for key, node in prompt.items()}
    apply = prompt[by_type["AnalogyApplyLoRA"]]["inputs"]
    if strength is not None:
        apply["strength"] = strength
    if mode is not None:
        apply["mode"] = mode
    if bypass_lora:  # the sampler takes the loader's model directly
        prompt[by_type["KSampler"]]["inputs"]["model"] = apply["model"]
    saves = [key for key, node in prompt.items() if node["class_type"] == "SaveImage"]
    for key in saves:
        prompt[key]["inputs"]["filename_prefix"] = f"{prefix}_{key}"
    history = comfy.run(prompt)
    panel_node = next(key for key in saves if prompt[key]["inputs"]["images"][0] == by_type["AnalogyExtractPanel"])
    return np.asarray(Image.open(comfy.output_files(history, panel_node)[0]), dtype=np.int16)


def test_example_workflow_runs_and_the_analogy_changes_b(comfy, tiny_files):
    prompt = example_prompt(comfy)
    base = b_prime(comfy, prompt, "base", bypass_lora=True)
    b = Image.open(comfy.base_dir / "input" / "analogy_b.png")
    side = min(b.size)  # the example centre-crops panels to squares; restore_size gives that crop at B's scale
    assert base.shape == (side, side, 3), (base.shape, b.size)
    assert base.std() > 3, "the tiny model must draw something"

    zero = b_prime(comfy, prompt, "zero", strength=0.0)
    assert np.array_equal(zero, base), "strength 0 reproduces the base image bit for bit"
    merged = b_prime(comfy, prompt, "merge", strength=1.0, mode="merge")
    assert np.abs(merged - base).mean() > 1.0, "the mixed LoRA must change B'"
    runtime = b_prime(comfy, prompt, "runtime", strength=1.0, mode="runtime")
    assert np.abs(runtime - merged).max() <= 1, "runtime mode equals merge (8-bit rounding aside)"
