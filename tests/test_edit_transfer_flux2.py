"""Edit Transfer's trainer on FLUX.2 (tiny models, no downloads): the bottom-right panel of the four-panel composite is
where FLUX.2's tokens sit, the objective equals its written-out form with the transformer called as Flux2Pipeline
denoises one image, a few steps run end to end, and the LoRA file is a FLUX.2 LoRA that ComfyUI's stock loader maps
onto its Flux2 model entirely."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline
from test_lora_comfy import rel_err
from test_lora_new_editors import RUNNERS, comfy_out
from tiny_models import tiny_flux2_pair

from analogy_core.lora_io import load_lora_file
from training import flow
from training.config import build_config
from training.edit_transfer.task import PRESETS, EditTransferConfig, four_panels, panel_token_mask, training_loss
from training.edit_transfer.task import main as train_edit_transfer
from training.editors import load_editor
from training.trainer import drop_captions

SPEC = "flux2:tiny"


def cfg_for(**overrides) -> EditTransferConfig:
    values = [f"{k}={v}" for k, v in {"backbone": SPEC, **overrides}.items()]
    return build_config(EditTransferConfig, PRESETS, "tiny", None, values)


def batch_of(n: int = 2, seed: int = 0, side: int = 32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    roles = {r: torch.rand(n, side, side, 3, generator=gen) for r in ("a", "a_prime", "b", "b_prime")}
    return {**roles, "prompt": ["make it red", "flip it"][:n]}


def test_the_panel_mask_is_the_bottom_right_panel_of_flux2s_tokens():
    backbone, cfg = load_editor(SPEC), cfg_for()
    mask = panel_token_mask(cfg.grid_resolution // backbone.vae_factor).view(-1)
    ids, _ = backbone.position_ids(cfg.grid_resolution, 1, "cpu", reference=False)
    side = cfg.grid_resolution // backbone.token_pixels
    assert ids.shape[0] == mask.shape[0] == side * side
    expected = ((ids[:, 1] >= side // 2) & (ids[:, 2] >= side // 2)).float()
    assert torch.equal(mask, expected) and mask.sum() == side * side // 4


def test_the_objective_is_the_written_out_one_on_flux2():
    backbone, cfg = load_editor(SPEC), cfg_for()
    batch = batch_of()
    loss = training_loss(backbone.transformer, backbone, batch, cfg, torch.Generator().manual_seed(5), "cpu")
    # by hand, the draws in the documented order: caption dropout, timesteps, noise
    gen = torch.Generator().manual_seed(5)
    prompts = drop_captions(batch["prompt"], cfg.caption_dropout, gen)
    t, weight = flow.sample_timesteps(cfg.timestep_sampling, 2, gen)
    x0 = backbone.encode_images(four_panels(batch))
    noise = torch.randn(x0.shape, generator=gen)
    mask = panel_token_mask(cfg.grid_resolution // backbone.vae_factor)
    x_t = ((1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise) * mask + x0 * (1 - mask)
    text, _ = backbone.encode_prompts(prompts, "cpu")
    side = cfg.grid_resolution // backbone.token_pixels
    latent_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(2, 1, side, side))  # one image, T = 0
    with torch.no_grad():
        pred = backbone.transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t, img_ids=latent_ids,
                                    txt_ids=Flux2KleinPipeline._prepare_text_ids(text),
                                    guidance=torch.full((2,), cfg.guidance), return_dict=False)[0]
    err = (pred - (noise - x0)) ** 2 * weight.view(-1, 1, 1) * mask
    expected = err.sum() / mask.expand_as(err).sum()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


def test_qwen_image_edit_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="Qwen-Image-Edit takes its input images as references"):
        cfg_for(backbone="qwen_image_edit:tiny")


def test_a_tiny_flux2_run_writes_a_flux2_lora_the_stock_loader_maps(tmp_path, comfy_inproc):
    import comfy.sd
    import comfy.utils

    out = tmp_path / "run"
    history = train_edit_transfer(["--preset", "tiny", "--backbone", SPEC, "--output-dir", str(out), "--max-steps",
                                   "3", "--set", "batch_size=2", "--set", "sample_every=3", "--set", "report_to=none"])
    assert len(history["losses"]) == 3
    path = out / "edit_transfer_lora.safetensors"
    parsed = load_lora_file(path)
    assert parsed.lora.family == "flux2" and parsed.key_format == "native"
    assert parsed.lora.metadata["ss_base_model_version"] == "flux2"
    assert len(parsed.lora) == 12 + 2 * 2, "every linear of the tiny FLUX.2's one double and two single blocks"
    assert (out / "samples" / "step_000003.png").is_file()
    _, patcher = tiny_flux2_pair(comfy_inproc.comfy, seed=81)
    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    strength = 30.0  # three steps barely move B from zero: amplified so the comparison has something to compare
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, state, strength, 0.0)
    assert len(stock.patches) == sum(k.endswith(".lora_A.weight") for k in state), "every key is mapped"
    ours, report = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, parsed.lora, strength, "merge", False)
    assert f"matched {len(parsed.lora)}/{len(parsed.lora)}" in report
    inp = RUNNERS["flux2"][0](seed=8)
    stock_out = comfy_out(stock, "flux2", inp)
    assert rel_err(stock_out, comfy_out(patcher, "flux2", inp)) > 1e-3, "the trained LoRA changes the output"
    assert rel_err(stock_out, comfy_out(ours, "flux2", inp)) <= 1e-5


def test_the_configured_guidance_reaches_flux2():
    """The tiny FLUX.2 embeds guidance (like FLUX.2-dev): the objective with guidance 3.5 is the written-out one with
    3.5 per sample, not the default 1.0."""
    backbone, batch = load_editor(SPEC), batch_of()
    assert backbone.transformer.config.guidance_embeds
    losses = {g: training_loss(backbone.transformer, backbone, batch, cfg_for(guidance=g),
                               torch.Generator().manual_seed(5), "cpu") for g in (1.0, 3.5)}
    assert not torch.isclose(losses[1.0], losses[3.5], rtol=1e-4), losses
    cfg = cfg_for(guidance=3.5)
    gen = torch.Generator().manual_seed(5)
    prompts = drop_captions(batch["prompt"], cfg.caption_dropout, gen)
    t, weight = flow.sample_timesteps(cfg.timestep_sampling, 2, gen)
    x0 = backbone.encode_images(four_panels(batch))
    noise = torch.randn(x0.shape, generator=gen)
    mask = panel_token_mask(cfg.grid_resolution // backbone.vae_factor)
    x_t = ((1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise) * mask + x0 * (1 - mask)
    text, _ = backbone.encode_prompts(prompts, "cpu")
    side = cfg.grid_resolution // backbone.token_pixels
    with torch.no_grad():
        pred = backbone.transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t,
                                    img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(2, 1, side, side)),
                                    txt_ids=Flux2KleinPipeline._prepare_text_ids(text),
                                    guidance=torch.full((2,), 3.5), return_dict=False)[0]
    err = (pred - (noise - x0)) ** 2 * weight.view(-1, 1, 1) * mask
    assert torch.allclose(losses[3.5], err.sum() / mask.expand_as(err).sum(), rtol=1e-5)
