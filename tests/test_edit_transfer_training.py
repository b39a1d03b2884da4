"""The Edit Transfer training objective, sampler and data, each piece against a plain re-computation written here.

Stub VAE / text encoders / transformer make every intermediate value known (as in test_lorweb_training_maths), so
noise outside the bottom-right panel, a loss over the whole grid, a target of the wrong sign, captions always
dropped, a sampler that re-noises the context (or forgets to) all fail here. Gradient flow is checked on the real
tiny FLUX backbone with its peft LoRA.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from training import flow
from training.backbone import load_backbone, pack
from training.config import build_config
from training.data.readers import ItemError
from training.data.analogies import FourPanelFolder, split_quadrants
from training.edit_transfer.data import make_edit_transfer_dataset
from training.edit_transfer.task import (PRESETS, EditTransferConfig, add_lora, four_panels, lora_targets,
                                          panel_objective, panel_token_mask, sample_composite, training_loss,
                                          training_prompts)
from stub_backbone import StubBackbone, from_tokens, to_tokens

S = 4  # panel side in pixels: the grid is 8 x 8 pixels = 4 x 4 tokens of the stub VAE


class StubTransformer(nn.Module):
    """A deterministic function of every input FLUX receives; every token sees every other (like attention)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 12)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(3)
            for p in self.proj.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.calls = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                return_dict=False):
        self.calls.append(dict(hidden=hidden_states.detach().clone(), timestep=timestep.clone(),
                               text=encoder_hidden_states.clone(), img_ids=img_ids.clone()))
        extra = encoder_hidden_states.mean(dim=(1, 2)) + pooled_projections.mean(dim=1) + 3 * timestep + guidance
        mixed = hidden_states + 0.3 * hidden_states.mean(dim=1, keepdim=True)
        return (self.proj(mixed) + 0.1 * extra.view(-1, 1, 1),)


def batch_of(n: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    roles = {r: torch.rand(n, S, S, 3, generator=gen) for r in ("a", "a_prime", "b", "b_prime")}
    return {**roles, "prompt": ["raise both arms", "make it red", "x"][:n]}


def cfg_for(**overrides) -> EditTransferConfig:
    cfg = build_config(EditTransferConfig, PRESETS, "tiny", None, [f"{k}={v}" for k, v in overrides.items()])
    cfg.grid_resolution = 2 * S  # below the validated minimum on purpose: the stubs work on 8-px grids
    return cfg


def stub_velocity(model: StubTransformer, x, t, lengths, guidance):
    extra = lengths + lengths * 0.5 + 3 * t + guidance
    return model.proj(x + 0.3 * x.mean(dim=1, keepdim=True)) + 0.1 * extra.view(-1, 1, 1)


# the bottom-right panel in stub tokens (4 x 4 tokens, row-major): rows 2-3, columns 2-3
PANEL = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool).flatten()


# ---------------------------------------------------------------------------------------------------------------------
# the objective


def test_masked_noise_is_the_paper_equation():
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 16, 12, generator=gen), torch.randn(3, 16, 12, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.97])
    m = PANEL.float().view(1, -1, 1)
    got = flow.add_noise_masked(x, eps, t, m)
    want = ((1 - t.view(-1, 1, 1)) * x + t.view(-1, 1, 1) * eps) * m + x * (1 - m)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, ~PANEL], x[:, ~PANEL]), "outside the panel x_t is the clean latent, bit for bit"
    assert (got[:, PANEL] - x[:, PANEL]).abs().min() > 0 or t.min() == 0


def test_panel_token_mask_is_the_packed_latent_panel():
    """The token mask equals FLUX's packing of a latent-space bottom-right mask (for any latent side)."""
    for side in (8, 16, 64):
        latent = torch.zeros(1, 1, side, side)
        latent[..., side // 2:, side // 2:] = 1
        packed = pack(latent)  # [1, N, 4]: every token's 4 latent pixels
        assert (packed.min(dim=2).values == packed.max(dim=2).values).all(), "the panel edge falls between tokens"
        torch.testing.assert_close(panel_token_mask(side)[..., 0], packed[..., 0])
    assert torch.equal(panel_token_mask(8).flatten().bool(), PANEL)


def expected_loss(model: StubTransformer, batch: dict, cfg, seed: int) -> tuple[torch.Tensor, dict]:
    """The Edit Transfer objective written out, drawing the random numbers in the trainer's documented order."""
    gen = torch.Generator().manual_seed(seed)
    if cfg.text_free:
        prompts = [""] * len(batch["a"])
    else:
        keep = torch.rand(len(batch["a"]), generator=gen)
        prompts = [p if float(u) >= cfg.caption_dropout else "" for p, u in zip(batch["prompt"], keep)]
    t = torch.sigmoid(torch.randn(len(batch["a"]), generator=gen))         # logit-normal, unweighted
    grid = torch.cat([torch.cat([batch["a"], batch["a_prime"]], 2), torch.cat([batch["b"], batch["b_prime"]], 2)], 1)
    x = to_tokens(grid * 2 - 1)
    eps = torch.randn(x.shape, generator=gen)
    m = PANEL.float().view(1, -1, 1)
    tt = t.view(-1, 1, 1)
    x_t = ((1 - tt) * x + tt * eps) * m + x * (1 - m)
    lengths = torch.tensor([float(len(p)) for p in prompts])
    pred = stub_velocity(model, x_t, t, lengths, cfg.guidance)
    loss = ((pred - (eps - x)) ** 2)[:, PANEL].mean()                        # the bottom-right panel only
    return loss, dict(x_t=x_t, t=t, lengths=lengths, eps=eps, x=x)


@pytest.mark.parametrize("text_free", [False, True])
def test_training_loss_equals_the_written_out_objective(text_free):
    cfg = cfg_for(text_free=text_free, caption_dropout=0.4)
    model, batch = StubTransformer(), batch_of()
    got = training_loss(model, StubBackbone(), batch, cfg, torch.Generator().manual_seed(11), "cpu")
    want, parts = expected_loss(model, batch, cfg, seed=11)
    assert got.item() > 0 and torch.allclose(got, want, rtol=1e-5), (got, want)
    call = model.calls[0]
    torch.testing.assert_close(call["hidden"], parts["x_t"])
    torch.testing.assert_close(call["timestep"], parts["t"])
    torch.testing.assert_close(call["text"][:, 0, 0], parts["lengths"])
    assert (call["img_ids"][:, 0] == 0).all() and call["img_ids"].shape == (16, 3), "one image, index 0"
    if text_free:
        assert (parts["lengths"] == 0).all()


def test_the_loss_reads_every_input_it_should():
    """Sanity of the set-up: A, A', B, B' and the caption each change the loss (else the comparisons are void)."""
    cfg = cfg_for(caption_dropout=0.0)

    def loss(batch):
        return training_loss(StubTransformer(), StubBackbone(), batch, cfg, torch.Generator().manual_seed(5), "cpu")

    base = loss(batch_of())
    for change in ("a", "a_prime", "b", "b_prime", "prompt"):
        batch = batch_of()
        batch[change] = ["other words"] * 3 if change == "prompt" else batch[change].flip(1)
        assert not torch.isclose(loss(batch), base), f"{change} does not reach the loss"
    text_free = cfg_for(text_free=True)
    batch = batch_of()
    batch["prompt"] = ["other words"] * 3
    assert torch.isclose(training_loss(StubTransformer(), StubBackbone(), batch, text_free,
                                       torch.Generator().manual_seed(5), "cpu"),
                         training_loss(StubTransformer(), StubBackbone(), batch_of(), text_free,
                                       torch.Generator().manual_seed(5), "cpu")), "text-free ignores the caption"


def test_text_free_prompts_are_empty_and_draw_nothing():
    batch = {"prompt": ["a", "b", "c"]}
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert training_prompts(batch, cfg_for(text_free=True), gen) == ["", "", ""]
    assert torch.equal(gen.get_state(), state)
    kept = training_prompts(batch, cfg_for(caption_dropout=0.0), gen)
    assert kept == ["a", "b", "c"]


@pytest.fixture(scope="module")
def tiny_flux():
    """The tiny preset's real FLUX backbone with the peft LoRA, B made non-zero so every factor gets gradients."""
    backbone = load_backbone("tiny", torch.float32, seed=0)
    transformer = backbone.transformer
    add_lora(transformer, rank=4, alpha=4.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return backbone, transformer


def objective_inputs(backbone, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    data = {r: torch.rand(batch, 16, 16, 3, generator=gen) for r in ("a", "a_prime", "b", "b_prime")}
    x0 = backbone.encode_images(four_panels(data))
    text, pooled = backbone.encode_prompts(["raise arms"] * batch, "cpu")
    noise = torch.randn(x0.shape, generator=gen)
    return x0, noise, torch.tensor([0.3, 0.8][:batch]), torch.ones(batch), panel_token_mask(16), text, pooled


def loss_and_grads(transformer, x0, noise, t, w, mask, text, pooled):
    transformer.zero_grad(set_to_none=True)
    loss = panel_objective(transformer, x0, noise, t, w, mask, text, pooled, 1.0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_noise_and_loss_touch_only_the_bottom_right_panel(tiny_flux):
    """Replacing the noise outside the panel (which is also the velocity target's only other part there) changes
    neither the loss nor any gradient; changing it inside the panel does."""
    backbone, transformer = tiny_flux
    x0, noise, t, w, mask, text, pooled = objective_inputs(backbone)
    panel = mask.bool().expand_as(noise)
    loss, grads = loss_and_grads(transformer, x0, noise, t, w, mask, text, pooled)
    outside = torch.where(panel, noise, torch.randn(noise.shape, generator=torch.Generator().manual_seed(9)) * 5)
    loss2, grads2 = loss_and_grads(transformer, x0, outside, t, w, mask, text, pooled)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[k], grads2[k]) for k in grads)
    inside = torch.where(panel, noise.flip(1), noise)
    loss3, grads3 = loss_and_grads(transformer, x0, inside, t, w, mask, text, pooled)
    assert not torch.isclose(loss, loss3) and any(not torch.equal(grads[k], grads3[k]) for k in grads)
    # and the MSE is over the panel only: a target differing outside it gives the same value
    pred = torch.randn_like(noise)
    target = flow.velocity_target(x0, noise)
    other = torch.where(panel, target, target + 3.0)
    assert torch.equal(flow.weighted_mse(pred, target, w, mask), flow.weighted_mse(pred, other, w, mask))


def test_gradients_reach_only_the_lora(tiny_flux):
    backbone, transformer = tiny_flux
    _, grads = loss_and_grads(transformer, *objective_inputs(backbone, seed=2))
    lora_params = {n for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert set(grads) == lora_params and len(lora_params) == 2 * len(lora_targets(transformer))
    assert all(grads[n].abs().sum() > 0 for n in lora_params), "every LoRA factor learns"
    assert all(not p.requires_grad for n, p in transformer.named_parameters() if n not in lora_params)
    for module in (backbone.vae, backbone.clip_text, backbone.t5):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert len(lora_targets(transformer)) == 1 * 14 + 2 * 6, "every linear of the double and single blocks"


# ---------------------------------------------------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("context", ["clean", "renoise"])
def test_sampler_is_the_official_loop_or_stock_inpainting(context):
    """clean: context latents start clean and are reset to them after every step; renoise: they follow
    (1 - t) x_clean + t ε with the sampler's own noise (ComfyUI's stock inpainting)."""
    cfg = cfg_for(sample_steps=3, sample_shift=False)
    model, batch = StubTransformer(), batch_of()
    got = sample_composite(model, StubBackbone(), batch, cfg, "cpu", seed=9, context=context)
    composite = torch.cat([torch.cat([batch["a"], batch["a_prime"]], 2),
                           torch.cat([batch["b"], torch.full_like(batch["b"], 0.5)], 2)], 1)
    clean = to_tokens(composite * 2 - 1)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(9))
    m = PANEL.float().view(1, -1, 1)
    lengths = torch.tensor([float(len(p)) for p in batch["prompt"]])
    x = noise * m + clean * (1 - m) if context == "clean" else noise
    seen = []
    for k in range(3):
        t_now, t_next = 1 - k / 3, 1 - (k + 1) / 3
        seen.append(x.clone())
        x = x + (t_next - t_now) * stub_velocity(model, x, torch.full((3,), t_now), lengths, cfg.guidance)
        ctx = clean if context == "clean" else (1 - t_next) * clean + t_next * noise
        x = x * m + ctx * (1 - m)
    torch.testing.assert_close(got, (from_tokens(x, 2 * S, 2 * S) + 1) / 2, rtol=1e-5, atol=1e-6)
    for call, expected_input in zip(model.calls, seen):
        torch.testing.assert_close(call["hidden"], expected_input)
    first = model.calls[0]["hidden"][:, ~PANEL]
    if context == "clean":
        torch.testing.assert_close(first, clean[:, ~PANEL])  # the model sees the clean context from the first call
    else:
        assert (first - clean[:, ~PANEL]).abs().mean() > 0.3
    assert [float(c["timestep"][0]) for c in model.calls] == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_official_schedule_is_diffusers_flux_dev():
    from diffusers import FlowMatchEulerDiscreteScheduler
    import numpy as np

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    for steps, tokens in ((35, 4096), (4, 64)):
        mu = flow.flux_mu(tokens)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(flow.shifted_times(steps, mu), scheduler.sigmas.float())
    assert flow.flux_mu(4096) == pytest.approx(1.15)


# ---------------------------------------------------------------------------------------------------------------------
# data


def write_composite(path, colours, size=40):
    image = Image.new("RGB", (2 * size, 2 * size))
    for (x, y), colour in zip(((0, 0), (size, 0), (0, size), (size, size)), colours):
        image.paste(Image.new("RGB", (size, size), colour), (x, y))
    image.save(path)


def test_official_folder_format(tmp_path, caplog):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    write_composite(tmp_path / "pose_1.png", colours)
    (tmp_path / "pose_1.txt").write_text("  A four-panel image: the person raises both arms.\n")
    write_composite(tmp_path / "pose_2.jpg", colours[::-1])
    (tmp_path / "notes.md").write_text("ignored")
    data = make_edit_transfer_dataset(f"folder:{tmp_path}", 16)
    assert isinstance(data, FourPanelFolder) and len(data) == 2
    assert "1 of 2 images" in caplog.text and "pose_2.jpg" in caplog.text
    item = data[0]
    assert item["prompt"] == "A four-panel image: the person raises both arms."
    for role, colour in zip(("a", "a_prime", "b", "b_prime"), colours):
        assert item[role].shape == (16, 16, 3)
        torch.testing.assert_close(item[role][8, 8], torch.tensor(colour, dtype=torch.float32) / 255)
    assert data[1]["prompt"] == ""
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ItemError, match="broken.png"):
        FourPanelFolder(tmp_path, 16)[0]
    with pytest.raises(ValueError, match="four-panel images"):
        make_edit_transfer_dataset(f"folder:{tmp_path / 'missing'}", 16)


def test_quadrants_and_composite_round_trip():
    batch = batch_of(2)
    grid = four_panels(batch)
    parts = split_quadrants(grid[1])
    for role in ("a", "a_prime", "b", "b_prime"):
        assert torch.equal(parts[role], batch[role][1])
    assert torch.equal(four_panels(batch, bottom_right="grey")[:, S:, S:], torch.full((2, S, S, 3), 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# the command line, end to end


@pytest.mark.slow
def test_tiny_run_writes_a_lora_with_the_packs_metadata(tmp_path):
    """``python -m training.train_edit_transfer --preset tiny`` (3 steps): checkpoint, samples, and a LoRA file over
    every block linear that the pack's loader reads, with the run's metadata and no local paths."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open

    from analogy_core.layouts import flux_layout
    from analogy_core.lora_io import load_lora_file
    from training.backbone import TINY_TRANSFORMER

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train_edit_transfer", "--preset", "tiny", "--output-dir", str(out),
           "--max-steps", "3", "--set", "checkpoint_every=3", "--set", "sample_every=3", "--set", "report_to=none",
           "--set", "text_free=true"]
    result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TQDM_DISABLE="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Edit Transfer LoRA on 26 layers, rank 4, alpha 4, text-free" in result.stderr
    assert (out / "checkpoints" / "step_000003").is_dir() and (out / "samples" / "step_000003.png").is_file()
    path = out / "edit_transfer_lora.safetensors"
    lora = load_lora_file(path, flux_layout(**TINY_TRANSFORMER)).lora
    assert len(lora) == 26 and lora.ranks == {4}
    assert any(layer.up.abs().sum() > 0 for layer in lora.layers.values()), "three Adam steps moved B off zero"
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["analogy.method"] == "edit_transfer" and meta["analogy.text_free"] == "true"
    assert meta["analogy.source"] == "trained" and meta["analogy.family"] == "flux"
    assert meta["analogy.step"] == "3" and str(tmp_path) not in json.dumps(meta)


def test_command_line_numbers_in_exponent_form():
    """``--set learning_rate=1e-3`` is a number (YAML 1.1 alone would read it as text and the optimiser would fail)."""
    cfg = build_config(EditTransferConfig, PRESETS, "tiny", None, ["learning_rate=1e-3", "lora_alpha=16"])
    assert cfg.learning_rate == 0.001 and isinstance(cfg.lora_alpha, float | int) and cfg.lora_alpha == 16
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        build_config(EditTransferConfig, PRESETS, "tiny", None, ["learning_rate=fast"])


def test_a_full_finetune_run_trains_and_writes_the_whole_transformer(tmp_path):
    """``full_finetune`` (the world's full fine-tune ceiling): every transformer weight trains with the same
    objective, the EMA averages them all, and the written transformer loads back into a fresh backbone."""
    from analogy_core.files import check_state_dict, read_safetensors
    from training.backbone import load_frozen_backbone
    from training.edit_transfer.task import main

    out = tmp_path / "full"
    history = main(["--preset", "tiny", "--output-dir", str(out), "--max-steps", "3", "--set", "report_to=none",
                    "--set", "sample_every=1000", "--set", "full_finetune=true", "--set", "ema_decay=0.5"])
    assert len(history["losses"]) == 3
    assert (out / "edit_transfer_transformer.safetensors").is_file()
    assert not (out / "edit_transfer_lora.safetensors").exists()
    tensors, meta = read_safetensors(out / "edit_transfer_transformer.safetensors")
    assert meta["analogy.kind"] == "edit_transfer_transformer" and meta["analogy.step"] == "3"
    fresh = load_frozen_backbone("tiny", "no", 0, "cpu").transformer
    reference = fresh.state_dict()
    assert set(tensors) == set(reference)  # the whole transformer, diffusers names, no adapter
    moved = [k for k in reference if not torch.equal(tensors[k], reference[k].float())]
    assert len(moved) > len(reference) // 2, "training moved most weights (not only a LoRA's)"
    assert any(k.startswith(("x_embedder", "proj_out", "time_text_embed")) for k in moved)  # beyond the blocks
    fresh.load_state_dict(check_state_dict(tensors, reference))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value.float(), tensors[key]), key


def test_the_sampler_shifts_its_times_by_the_composites_token_count():
    """sample_shift (FLUX.1-dev's pipelines): the model is called at shifted_times(steps, flux_mu(N)), N the number
    of the composite's latent tokens (16 here; each token is 12 wide, so the token width would give other times)."""
    cfg = cfg_for(sample_steps=3, sample_shift=True)
    model, batch = StubTransformer(), batch_of()
    sample_composite(model, StubBackbone(), batch, cfg, "cpu", seed=9)
    times = flow.shifted_times(3, flow.flux_mu(16))
    assert not torch.allclose(times, flow.shifted_times(3, flow.flux_mu(12)))
    assert not torch.allclose(times, torch.linspace(1, 0, 4))
    seen = torch.tensor([float(c["timestep"][0]) for c in model.calls])
    torch.testing.assert_close(seen, times[:-1])
