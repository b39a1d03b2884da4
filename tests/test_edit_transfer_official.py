"""Edit Transfer as the released config trains and the official inference encodes: EMA of the LoRA weights, the
optimiser, T5 padding as ComfyUI feeds FLUX, per-panel VAE encoding, and a text-free LoRA used with a prompt."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from analogy_core.edit_transfer import CleanContext, EditTransferError, encode_panels, latent_generate_mask
from training.backbone import load_backbone, t5_token_ids
from training.config import build_config
from training.edit_transfer.task import PRESETS, EditTransferConfig, add_lora, sample_composite
from training.ema import ParameterEMA


def test_defaults_are_the_released_configs():
    cfg = EditTransferConfig()
    assert (cfg.ema_decay, cfg.adam_epsilon, cfg.weight_decay, cfg.use_8bit_adam) == (0.99, 1e-6, 0.01, True)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.learning_rate, cfg.t5_length) == (0.9, 0.999, 1e-4, 256)


def test_ema_update_against_the_written_out_average():
    model = nn.Linear(3, 2)
    frozen = nn.Parameter(torch.ones(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    ema = ParameterEMA(model, 0.9)
    assert set(ema.shadow) == {"weight", "bias"}
    expected = model.weight.detach().clone()
    for k in range(3):
        with torch.no_grad():
            model.weight.add_(float(k + 1))
        ema.update(model)
        expected = 0.9 * expected + 0.1 * model.weight.detach()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    assert not torch.allclose(ema.shadow["weight"], model.weight)     # the average is not the raw weight
    raw = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), raw)              # restored afterwards
    other = ParameterEMA(nn.Linear(3, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["weight"], expected)


def test_t5_ids_are_what_comfyui_feeds_flux(comfy_inproc):
    """ComfyUI's own FLUX T5 tokenizer (comfy/text_encoders/flux.py) against t5_token_ids with the same vocabulary:
    padded to 256, a long prompt kept whole; the 512-token (diffusers/ai-toolkit) padding differs."""
    from pathlib import Path

    import comfy.text_encoders.flux as flux
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(str(Path(flux.__file__).parent / "t5_tokenizer"))
    comfy_tokenizer = flux.T5XXLTokenizer()
    for prompt in ("make the sky red", " ".join(["word"] * 400)):
        theirs = [item[0] for item in comfy_tokenizer.tokenize_with_weights(prompt)[0]]
        ours = t5_token_ids(tokenizer, [prompt], 256)[0].tolist()
        assert ours == theirs and len(ours) >= 256
    assert t5_token_ids(tokenizer, ["make the sky red"]).shape[1] == 512


def test_the_trainer_passes_its_t5_length():
    from stub_backbone import StubBackbone
    from training.edit_transfer.task import training_loss

    backbone = StubBackbone()
    cfg = build_config(EditTransferConfig, PRESETS, "tiny", None, ["t5_length=300"])
    cfg.grid_resolution = 8
    gen = torch.Generator().manual_seed(0)
    batch = {r: torch.rand(2, 4, 4, 3, generator=gen) for r in ("a", "a_prime", "b", "b_prime")}
    batch["prompt"] = ["x", "y"]
    training_loss(_zero_velocity, backbone, batch, cfg, gen, "cpu")
    assert backbone.t5_length == 300


def _zero_velocity(hidden_states, **kwargs):
    return (hidden_states * 0,)


def stub_encode(image: torch.Tensor) -> torch.Tensor:
    """A VAE-like encoder whose 3x3 blur crosses panel seams: IMAGE [B, H, W, 3] -> [B, 3, H/2, W/2]."""
    x = image.permute(0, 3, 1, 2)
    return F.avg_pool2d(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), 2)


def test_per_panel_encoding_tiles_each_panels_own_latent():
    image = torch.rand(2, 8, 12, 3, generator=torch.Generator().manual_seed(0))
    got = encode_panels(image, stub_encode, multiple=2)
    written = torch.zeros(2, 3, 4, 6)
    for r in range(2):
        for c in range(2):
            written[:, :, 2 * r:2 * r + 2, 3 * c:3 * c + 3] = stub_encode(image[:, 4 * r:4 * r + 4, 6 * c:6 * c + 6])
    torch.testing.assert_close(got, written)
    assert not torch.allclose(got, stub_encode(image))                   # the whole composite differs at the seams
    try:
        encode_panels(torch.rand(1, 10, 12, 3), stub_encode, multiple=4)
    except EditTransferError as err:
        assert "multiples of 4" in str(err)
    else:
        raise AssertionError("a composite whose panels are not multiples of the VAE factor is refused")


def test_encode_panels_node(comfy_inproc):
    import importlib

    module = importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.edit_transfer")

    class StubVAE:
        downscale_ratio = 2

        def encode(self, pixels):
            return stub_encode(pixels)

    image = torch.rand(1, 8, 8, 4)
    latent = module.EncodePanels().encode(image, StubVAE())[0]["samples"]
    torch.testing.assert_close(latent, encode_panels(image[..., :3], stub_encode, 2))


def test_a_text_free_lora_takes_a_prompt_at_inference():
    """Trained text-free, used with a prompt: sampling runs, stays finite, and the prompt reaches the model."""
    backbone = load_backbone("tiny", torch.float32, seed=0)
    add_lora(backbone.transformer, rank=4, alpha=4.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in backbone.transformer.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    cfg = build_config(EditTransferConfig, PRESETS, "tiny", None, ["text_free=true", "sample_steps=2"])
    images = {r: torch.rand(1, 32, 32, 3, generator=gen) for r in ("a", "a_prime", "b", "b_prime")}
    batch = images | {"prompt": ["make it red"]}
    empty = sample_composite(backbone.transformer, backbone, batch, cfg, "cpu", seed=0)
    prompted = sample_composite(backbone.transformer, backbone, batch, cfg, "cpu", seed=0, prompts=["make it red"])
    assert torch.isfinite(prompted).all() and prompted.shape == empty.shape
    assert not torch.allclose(prompted, empty)


def test_the_exported_file_holds_the_ema_and_a_checkpoint_restores_it(tmp_path):
    from types import SimpleNamespace

    from analogy_core.layouts import flux_layout
    from analogy_core.lora_io import load_lora_file
    from training.backbone import TINY_TRANSFORMER
    from training.edit_transfer.task import EditTransferTask, export_lora

    cfg = build_config(EditTransferConfig, PRESETS, "tiny", None, [])
    task = EditTransferTask(cfg, SimpleNamespace(device=torch.device("cpu")))
    model = task.build()
    lora_params = [p for p in model.parameters() if p.requires_grad]
    for k in range(3):                                   # three "optimiser steps"
        with torch.no_grad():
            for p in lora_params:
                p.add_(0.1 * (k + 1))
        task.after_step(model)
    task.export(model, tmp_path / "lora.safetensors", 3)
    saved = load_lora_file(tmp_path / "lora.safetensors", flux_layout(**TINY_TRANSFORMER)).lora
    with task.ema.applied(model):
        averaged = export_lora(model)
    raw = export_lora(model)
    name = next(iter(saved.layers))
    torch.testing.assert_close(saved.layers[name].delta_weight(), averaged.layers[name].delta_weight(), rtol=1e-4,
                               atol=1e-6)
    assert not torch.allclose(saved.layers[name].delta_weight(), raw.layers[name].delta_weight(), atol=1e-6)

    state = task.trainable_state(model)                  # what a checkpoint holds: raw + ema.*
    assert any(k.startswith("ema.") for k in state) and any(not k.startswith("ema.") for k in state)
    other = EditTransferTask(cfg, SimpleNamespace(device=torch.device("cpu")))
    other_model = other.build()
    other.load_trainable_state(other_model, {k: v.clone() for k, v in state.items()})
    for key, value in task.ema.shadow.items():
        torch.testing.assert_close(other.ema.shadow[key], value)


def test_the_latent_mask_binarises_at_one_half_then_samples_nearest():
    """As the official pipeline: a pixel of exactly 0.5 is generated (binarised with >= 0.5), and the pixel mask is
    resized by nearest-neighbour sampling — a one-pixel stripe at pixel 2 of 8 lands on latent 1 of 4 (indices
    0, 2, 4, 6 sampled), where a bilinear resize would average it away."""
    half = torch.zeros(1, 8, 8)
    half[:, 4:, 4:] = 0.5
    want = torch.tensor([[False] * 4] * 2 + [[False, False, True, True]] * 2)
    assert latent_generate_mask(half, 4, 4)[0, 0].equal(want)
    stripe = torch.zeros(1, 8, 8)
    stripe[:, :, 2] = 1.0
    got = latent_generate_mask(stripe, 4, 4)[0, 0]
    assert got.equal(torch.tensor([[False, True, False, False]] * 4))


def test_the_context_is_scaled_so_the_model_sees_the_clean_latent():
    """``model_input`` with an input scale s (what a sampler's preconditioning multiplies x by; 1 for FLUX): the
    context is clean / s, so that s · input is the clean latent; the generated panel is x untouched."""
    clean = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    generate = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    generate[..., 2:, 2:] = True
    context = CleanContext(clean, generate)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([0.25, 2.0]).view(2, 1, 1, 1)
    got = context.model_input(x, input_scale=scale)
    keep = generate.expand_as(x)
    assert torch.equal(got[keep], x[keep])
    torch.testing.assert_close((got * scale)[~keep], clean[~keep])
    assert not torch.allclose(got[~keep], clean[~keep]), "the scale must change the input, or the check is empty"
    torch.testing.assert_close(context.model_input(x)[~keep], clean[~keep])


def test_the_latent_mask_maps_height_to_rows_and_width_to_columns():
    """On a non-square composite (16 × 24 px → 4 × 6 latents) latent (i, j) reads pixel (⌊i·H/h⌋, ⌊j·W/w⌋) of the
    binarised mask, written out here; a mask whose region edges fall inside the latent cells."""
    height, width, h, w = 16, 24, 4, 6
    mask = torch.zeros(2, height, width)
    mask[:, 5:, 10:] = 0.5
    mask[:, 9:, 13:] = 1.0
    mask[1, :, :3] = 0.49
    got = latent_generate_mask(mask, h, w)
    written = torch.zeros(2, 1, h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            written[:, 0, i, j] = mask[:, i * height // h, j * width // w] >= 0.5
    assert written.any() and not written.all()
    assert not torch.equal(written, mask[:, None, 3::4, 3::4] >= 0.5)   # another sampling point would differ
    assert got.shape == (2, 1, h, w) and torch.equal(got, written)


def test_masks_and_latents_tile_the_way_comfyui_repeats_a_batch():
    """Two masks for four latents: latent k takes mask k mod 2 (ComfyUI's repeat_to_batch_size tiles, it does not
    interleave); the context latents tile the same way over a larger sampler batch."""
    clean = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    generate = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    generate[0, 0, 0, 0] = True
    generate[1, 0, 1, 1] = True
    context = CleanContext(clean.repeat(2, 1, 1, 1), generate)
    got = context.model_input(torch.full((4, 1, 2, 2), -1.0))
    for k in range(4):
        want = torch.where(generate[k % 2], -1.0, float(k % 2))
        assert torch.equal(got[k], want), k
    tiled = CleanContext(clean, generate[:1]).model_input(torch.full((4, 1, 2, 2), -1.0))
    assert [float(tiled[k, 0, 1, 1]) for k in range(4)] == [0.0, 1.0, 0.0, 1.0]
