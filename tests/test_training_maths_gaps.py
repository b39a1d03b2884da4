"""Pieces of the trainers' maths that a second mutation sweep found unchecked, each against a written-out value.

Each test first shows that the thing it checks changes the result (so the comparison is real), then compares with an
independent re-computation; fixed seeds, CPU, well under a second each.
"""

from __future__ import annotations

import pytest
import torch


def test_edit_transfer_loss_weights_each_sample_by_its_official_timestep_weight():
    """timestep_sampling: official also for Edit Transfer: t_i = 1 − i/1000 with i ~ U{0..998}, and each sample's panel
    MSE weighted by the bell exp(−2((i − 500)/1000)²), shifted to minimum 0 and scaled to mean 1 over the 1000 steps."""
    from stub_backbone import StubBackbone, to_tokens
    from test_edit_transfer_training import PANEL, StubTransformer, batch_of, cfg_for, stub_velocity
    from training.edit_transfer.task import training_loss

    cfg = cfg_for(timestep_sampling="official", caption_dropout=0.0)
    model, batch = StubTransformer(), batch_of()
    got = training_loss(model, StubBackbone(), batch, cfg, torch.Generator().manual_seed(11), "cpu")

    gen = torch.Generator().manual_seed(11)
    torch.rand(len(batch["a"]), generator=gen)                                  # caption dropout (keeps all)
    index = torch.randint(0, 999, (len(batch["a"]),), generator=gen)
    t = 1 - index.float() / 1000
    steps = torch.arange(1000, dtype=torch.float64)
    bell = torch.exp(-2 * ((steps - 500) / 1000) ** 2)
    weight = ((bell - bell.min()) * 1000 / (bell - bell.min()).sum()).float()[index]
    grid = torch.cat([torch.cat([batch["a"], batch["a_prime"]], 2), torch.cat([batch["b"], batch["b_prime"]], 2)], 1)
    x = to_tokens(grid * 2 - 1)
    eps = torch.randn(x.shape, generator=gen)
    m, tt = PANEL.float().view(1, -1, 1), t.view(-1, 1, 1)
    x_t = ((1 - tt) * x + tt * eps) * m + x * (1 - m)
    lengths = torch.tensor([float(len(p)) for p in batch["prompt"]])
    err = ((stub_velocity(model, x_t, t, lengths, cfg.guidance) - (eps - x)) ** 2)[:, PANEL].flatten(1).mean(dim=1)
    assert (weight - 1).abs().max() > 0.05, "the draws must carry weights other than 1, or this checks nothing"
    unweighted = err.mean()
    want = (weight * err).mean()
    assert not torch.isclose(want, unweighted, rtol=1e-3)
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def test_a_batch_of_masks_is_refused_when_any_one_covers_the_whole_image():
    """Every mask of a batch must leave some context: one mask covering the whole image is refused even when the
    others are fine (and a batch of good masks is accepted)."""
    from analogy_core.edit_transfer import EditTransferError, latent_generate_mask

    good = torch.zeros(8, 8)
    good[4:, 4:] = 1
    assert latent_generate_mask(torch.stack([good, good]), 4, 4).shape == (2, 1, 4, 4)
    with pytest.raises(EditTransferError, match="whole image"):
        latent_generate_mask(torch.stack([good, torch.ones(8, 8)]), 4, 4)
    with pytest.raises(EditTransferError, match="selects no pixel"):
        latent_generate_mask(torch.stack([good, torch.zeros(8, 8)]), 4, 4)


def test_the_mask_bce_sends_its_gradient_to_the_region_logits():
    """mask_weight > 0: the BCE on items with a mask trains the region module (its gradient equals the written-out
    objective's, and differs from the gradient without the BCE)."""
    from test_region_training import StubClip, StubEncoder, batch, config, expected_text_loss, region_model
    from training.regions.task import text_loss

    clip, encoder, b = StubClip(), StubEncoder(), batch()

    def grads(cfg, written_out: bool):
        net = region_model(mode="text")
        loss = expected_text_loss(net, clip, encoder, b, cfg)[0] if written_out else text_loss(net, clip, encoder,
                                                                                                 b, cfg)[0]
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    with_bce, without = config(mask_weight=0.4), config(mask_weight=0.0)
    want = grads(with_bce, written_out=True)
    assert (want - grads(without, written_out=True)).abs().max() > 1e-4, "the BCE must move the gradient"
    torch.testing.assert_close(grads(with_bce, written_out=False), want, rtol=1e-4, atol=1e-6)


def test_the_region_trainer_calibrates_the_attention_on_its_first_batch(monkeypatch):
    """attention_init: calibrated — the first loss call rescales W_Q, W_K on that batch (exactly what
    calibrate_attention does), once; attention_init: torch leaves torch's initialisation alone."""
    import copy
    from types import SimpleNamespace

    import training.regions.task as region_task
    from test_region_training import D, StubClip, StubEncoder, batch, config

    class Clip(StubClip):
        dim = D

    monkeypatch.setattr(region_task, "load_clip", lambda spec, seed: Clip())
    monkeypatch.setattr(region_task, "load_instruction_encoder", lambda spec, seed: StubEncoder())
    accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m,
                                  reduce=lambda t, how: t)
    b = batch()

    def first_steps(init):
        task = region_task.RegionTask(config(attention_init=init, threads=0), accelerator)
        model = task.build()
        initial = copy.deepcopy(model)
        task.loss(model, b, torch.Generator().manual_seed(0))
        after_first = copy.deepcopy(model.state_dict())
        task.loss(model, b, torch.Generator().manual_seed(0))
        return initial, after_first, model.state_dict()

    reference, first, second = first_steps("calibrated")
    start = copy.deepcopy(reference.state_dict())
    tokens, mask = StubEncoder().encode(b["instruction"])
    reference.calibrate_attention(Clip().vision(b["image"]).patches, "text", tokens, mask)
    assert [k for k in start if not torch.equal(start[k], first[k])], "calibration must change the attention weights"
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(first[k], v)
    assert all(torch.equal(first[k], second[k]) for k in first), "calibrated once, on the first batch only"
    initial, first, _ = first_steps("torch")
    assert all(torch.equal(v, first[k]) for k, v in initial.state_dict().items())


def test_the_configured_guidance_reaches_flux1_in_the_edit_transfer_loss():
    """FLUX.1's guidance embedding gets cfg.guidance (1.0 officially; any other configured value must arrive too)."""
    from stub_backbone import StubBackbone
    from test_edit_transfer_training import StubTransformer, batch_of, cfg_for, expected_loss
    from training.edit_transfer.task import training_loss

    cfg = cfg_for(guidance=2.5, caption_dropout=0.0)
    model, batch = StubTransformer(), batch_of()
    want, _ = expected_loss(model, batch, cfg, seed=11)
    assert not torch.isclose(want, expected_loss(model, batch, cfg_for(caption_dropout=0.0), seed=11)[0])
    got = training_loss(model, StubBackbone(), batch, cfg, torch.Generator().manual_seed(11), "cpu")
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def test_an_ema_checkpoint_missing_some_averages_is_refused():
    """Resuming needs every averaged tensor: a checkpoint with fewer (or other) EMA names is refused, not half-loaded."""
    from torch import nn

    from training.ema import ParameterEMA

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    ema = ParameterEMA(model, 0.9)
    full = {k: v + 1 for k, v in ema.state_dict().items()}
    ema.load_state_dict(full)
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in full.items())
    for missing in list(full):
        with pytest.raises(ValueError, match="EMA holds"):
            ParameterEMA(model, 0.9).load_state_dict({k: v for k, v in full.items() if k != missing})


def test_dataset_quads_must_have_the_shape_of_a():
    """query_source: dataset — a b or b′ of another shape than a is refused with its shape named."""
    from training.loc.task import dataset_quads

    a = torch.zeros(2, 4, 4, 3)
    ok = {"a": a, "a_prime": a, "b": a, "b_prime": a}
    assert dataset_quads(ok) is ok
    for key in ("b", "b_prime"):
        with pytest.raises(ValueError, match=key):
            dataset_quads(ok | {key: torch.zeros(2, 4, 6, 3)})


def test_euler_sample_walks_the_given_times_and_refuses_a_wrong_count():
    """``times`` replaces the equal steps (Σ (t_next − t_now)·v(t_now) for v = t), and a count other than steps + 1
    is refused instead of silently integrating a different schedule."""
    from training.flow import euler_sample

    noise = torch.zeros(2, 3)
    velocity = lambda x, t: t.view(-1, 1).expand_as(x)                  # noqa: E731 — v depends on t only
    equal = euler_sample(velocity, noise, 2)
    shifted = euler_sample(velocity, noise, 2, times=torch.tensor([1.0, 0.3, 0.0]))
    assert not torch.allclose(equal, shifted), "the times must change the result, or this checks nothing"
    torch.testing.assert_close(equal, torch.full((2, 3), -0.5 * 1.0 - 0.5 * 0.5))
    torch.testing.assert_close(shifted, torch.full((2, 3), -0.7 * 1.0 - 0.3 * 0.3))
    for wrong in (torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.6, 0.3, 0.0])):
        with pytest.raises(ValueError, match="steps \\+ 1 = 3"):
            euler_sample(velocity, noise, 2, times=wrong)


def test_loc_edit_images_conditions_each_image_on_its_own_prompt():
    """LoC's sampler reads the prompts it is given (one per image, through the UNet's cross-attention), and no prompt
    means the empty one: against DDIM written with the text states of those prompts."""
    from test_loc_training_maths import stub_backbone
    from training.loc.task import ddim_sample, edit_images

    backbone = stub_backbone()
    backbone.decode = lambda latents: latents.permute(0, 2, 3, 1)       # the latents themselves, as an image
    images = torch.rand(2, 4, 4, 3, generator=torch.Generator().manual_seed(3))
    prompts = ["make it red", "add a hat"]

    def written_out(texts: list[str]) -> torch.Tensor:
        z, condition = backbone.encode_images(images)
        text = backbone.encode_prompts(texts, "cpu")
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
        x0 = ddim_sample(lambda x, t: backbone.predict_x0(x, condition, t, text), noise, backbone.alphas_cumprod, 3)
        return x0.permute(0, 2, 3, 1)

    with_prompts = edit_images(backbone, None, images, 3, 5, prompts)
    assert (with_prompts - edit_images(backbone, None, images, 3, 5)).abs().max() > 1e-3, \
        "the prompts must change B′, or this checks nothing"
    torch.testing.assert_close(with_prompts, written_out(prompts))
    torch.testing.assert_close(edit_images(backbone, None, images, 3, 5), written_out(["", ""]))
    swapped = edit_images(backbone, None, images, 3, 5, prompts[::-1])
    assert (swapped - with_prompts).abs().max() > 1e-3, "each image must read its own prompt"


def test_predict_text_returns_the_soft_region_not_a_thresholded_one():
    """Text mode's prediction is P_region upsampled (values between 0 and 1), the yardstick thresholds it itself:
    against the module's probabilities written through :func:`probability_image`."""
    from analogy_core.regions import probability_image
    from test_region_training import GRID, S, StubClip, StubEncoder, region_model
    from training.regions.task import predict_text

    clip, encoder, net = StubClip(), StubEncoder(), region_model(mode="text")
    images = torch.rand(3, S, S, 3, generator=torch.Generator().manual_seed(4))
    instructions = ["make apples red", "remove the bee", "add a hat"]
    got = predict_text(net, clip, encoder, images, instructions)

    tokens, mask = encoder.encode(instructions)
    with torch.no_grad():
        probs = net(clip.vision(images).patches, "text", tokens, mask).probs
    want = probability_image(probs, GRID, S, S)
    assert ((want > 0.02) & (want < 0.98)).float().mean() > 0.5, "the map must be soft, or this checks nothing"
    other = predict_text(net, clip, encoder, images, instructions[::-1])
    assert (other - got).abs().max() > 1e-4, "the instruction must change the region"
    assert got.shape == (3, S, S)
    torch.testing.assert_close(got, want)


def test_flux_backbone_normalises_latents_as_flux_pipelines_do():
    """FLUX's VAE has shift 0.1159 and scale 0.3611 (the tiny preset 0 and 1, which hide the order): encode_images
    gives FluxPipeline's (mode − shift) · scale, packed, and decode_tokens inverts it before the VAE decodes."""
    from diffusers import FluxPipeline

    from training.backbone import load_backbone

    backbone = load_backbone("tiny")
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    plain = backbone.encode_images(images)
    backbone.vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    tokens = backbone.encode_images(images)
    assert (tokens - plain).abs().max() > 0.05, "shift and scale must change the latents, or this checks nothing"
    with torch.no_grad():
        mode = backbone.vae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
        want = FluxPipeline._pack_latents((mode - 0.1159) * 0.3611, *mode.shape)
        decoded = ((backbone.vae.decode(mode).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(tokens, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backbone.decode_tokens(tokens, 32, 32), decoded, rtol=1e-4, atol=1e-5)
