"""The shipped Edit Transfer example workflow, run in the real ComfyUI server on tiny models.

Only what needs real weights is swapped: the FLUX loader becomes the test loader for a tiny FLUX (ComfyUI's detector
assumes full-size shapes), the text encoder becomes seeded random conditioning, the VAE is a random 16-channel TAESD,
and the LoRA file is a tiny one in the released file's exact key layout. Everything else — LoadImage, Four-Panel
Composite (edit_transfer), VAEEncode, Edit Transfer Context, ComfyUI's stock LoraLoaderModelOnly, FluxGuidance,
KSampler, VAEDecode, Extract Panel, SaveImage — is the example as shipped.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from devtools.workflow import ui_to_api
from test_comfy_server import REPO
from test_edit_transfer_lora import released_layout_file
from tiny_models import FLUX_COMFY, randomize_, tiny_flux_pair

pytestmark = pytest.mark.comfy
PANEL = 64  # px: a 128-px composite, a 16 x 16 latent


@pytest.fixture(scope="module")
def tiny_files(comfy, comfy_inproc):
    """Tiny FLUX, a TAEF1-style VAE and a released-layout Edit Transfer LoRA in the server's model folders."""
    from devtools.run_example import write_default_inputs

    import comfy.taesd.taesd as taesd

    models = comfy.base_dir / "models"
    for folder in ("diffusion_models", "vae", "loras"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    diffusers_flux, patcher = tiny_flux_pair(comfy_inproc.comfy, seed=13)
    save_file({k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()},
              models / "diffusion_models" / "tiny_flux_et.safetensors",
              metadata={"unet_config": json.dumps(FLUX_COMFY)})
    released_layout_file(diffusers_flux, models / "loras" / "tiny_edit_transfer.safetensors", seed=14, scale=0.15)
    vae = taesd.TAESD(latent_channels=16)
    randomize_(vae, seed=15)
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("vae_")}
    state.update(vae_scale=torch.tensor(1.0), vae_shift=torch.tensor(0.0))
    save_file(state, models / "vae" / "tiny_taef1_et.safetensors")
    write_default_inputs(comfy.base_dir / "input")


def example_prompt(comfy) -> dict[str, dict]:
    workflow = json.loads((REPO / "example_workflows" / "edit_transfer_flux_dev.json").read_text())
    prompt = ui_to_api(workflow, comfy.object_info())
    by_type = {node["class_type"]: key for key, node in prompt.items()}
    prompt[by_type["UNETLoader"]] = {"class_type": "AnalogyTestTinyFluxLoader",
                                     "inputs": {"unet_name": "tiny_flux_et.safetensors"}}
    prompt[by_type["CLIPTextEncode"]] = {"class_type": "AnalogyTestConditioning", "inputs": {
        "seed": 1, "tokens": 8, "width": FLUX_COMFY["context_in_dim"], "pooled_width": FLUX_COMFY["vec_in_dim"]}}
    del prompt[by_type["DualCLIPLoader"]]
    prompt[by_type["VAELoader"]]["inputs"]["vae_name"] = "tiny_taef1_et.safetensors"
    prompt[by_type["LoraLoaderModelOnly"]]["inputs"]["lora_name"] = "tiny_edit_transfer.safetensors"
    prompt[by_type["AnalogyFourPanelComposite"]]["inputs"].update(width=PANEL, height=PANEL)
    prompt[by_type["KSampler"]]["inputs"].update(steps=3, seed=11)
    # test-only: the composite's latent and the sampled latent, to compare their context panels
    prompt["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [by_type["AnalogyEncodePanels"], 0],
                                                            "filename_prefix": "composite_latent"}}
    prompt["901"] = {"class_type": "SaveLatent", "inputs": {"samples": [by_type["KSampler"], 0],
                                                            "filename_prefix": "sampled_latent"}}
    return prompt


def run(comfy, prompt, prefix, lora_strength=None, stock_inpainting=False) -> dict[str, np.ndarray | torch.Tensor]:
    """Run a variant; returns B' (Extract Panel) and the decoded composite as int16 arrays, and the composite's and
    the sampled latents."""
    prompt = copy.deepcopy(prompt)
    by_type = {node["class_type"]: key for key, node in prompt.items()}
    if lora_strength is not None:
        prompt[by_type["LoraLoaderModelOnly"]]["inputs"]["strength_model"] = lora_strength
    if stock_inpainting:  # ComfyUI's own inpainting: no context node, a noise mask on the latent
        context = prompt[by_type["AnalogyEditTransferContext"]]["inputs"]
        prompt[by_type["LoraLoaderModelOnly"]]["inputs"]["model"] = context["model"]
        prompt["902"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": context["latent"],
                                                                        "mask": context["mask"]}}
        prompt[by_type["KSampler"]]["inputs"]["latent_image"] = ["902", 0]
        del prompt[by_type["AnalogyEditTransferContext"]]
    saves = {key: node for key, node in prompt.items() if node["class_type"] in ("SaveImage", "SaveLatent")}
    for key, node in saves.items():
        node["inputs"]["filename_prefix"] = f"et_{prefix}_{key}"
    history = comfy.run(prompt)
    out = {}
    for key, node in saves.items():
        if node["class_type"] == "SaveLatent":
            [found] = history["outputs"][key]["latents"]
            path = comfy.base_dir / found["type"] / found["subfolder"] / found["filename"]
            out["clean" if key == "900" else "sampled"] = load_file(str(path))["latent_tensor"]
            continue
        source = prompt[node["inputs"]["images"][0]]["class_type"]
        name = {"AnalogyExtractPanel": "b_prime", "VAEDecode": "composite"}[source]
        out[name] = np.asarray(Image.open(comfy.output_files(history, key)[0]), dtype=np.int16)
    return out


def test_example_workflow_runs_with_the_clean_context(comfy, tiny_files):
    prompt = example_prompt(comfy)
    ours = run(comfy, prompt, "ours")
    b = Image.open(comfy.base_dir / "input" / "analogy_b.png")
    side = min(b.size)  # panels are centre-cropped squares; restore_size gives that crop at B's scale
    assert ours["b_prime"].shape == (side, side, 3)
    assert ours["composite"].shape == (2 * PANEL, 2 * PANEL, 3)
    assert ours["b_prime"].std() > 3, "the tiny model must draw something"

    # the sampled latent keeps A, A' and B exactly as encoded; only the bottom-right panel is generated
    clean, sampled = ours["clean"], ours["sampled"]
    half = clean.shape[-1] // 2
    context = torch.ones_like(clean, dtype=torch.bool)
    context[..., half:, half:] = False
    assert (sampled[context] - clean[context]).abs().max() <= 1e-4
    assert (sampled[~context] - clean[~context]).abs().mean() > 0.1

    without_lora = run(comfy, prompt, "nolora", lora_strength=0.0)
    assert np.abs(ours["b_prime"] - without_lora["b_prime"]).mean() > 1.0, "the LoRA must change B'"

    stock = run(comfy, prompt, "stock", stock_inpainting=True)
    assert np.abs(ours["b_prime"] - stock["b_prime"]).mean() > 1.0, "stock re-noising inpainting differs"
