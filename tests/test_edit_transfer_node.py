"""Edit Transfer Context inside ComfyUI's own samplers against a plain re-implementation of the official loop.

The official inference (CUC-MIPG/Edit-Transfer, ``toolkit/pipeline_flux_inpaint.py``, the authors' modified
FluxInpaintPipeline) is written out below on the diffusers twin of a tiny FLUX model: image latents normalised and
packed, the mask binarised and nearest-resized to the latent grid, initial latents = noise on the panel and the clean
image elsewhere, and after every Euler step the unmasked latents reset to the clean image (never re-noised). Our node
runs on the ComfyUI twin (same weights) inside ComfyUI's KSampler / SamplerCustom code; the results must agree within
1e-4, and ComfyUI's stock inpainting (a noise mask, which re-noises the context) must differ measurably, so the
comparison cannot pass vacuously.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from tiny_models import FLUX_COMFY, tiny_flux_pair

SHIFT, SCALE = 0.1159, 0.3611  # FLUX VAE latent normalisation (diffusers vae.config, ComfyUI latent_formats.Flux)
LATENT = 8                      # latent side: a 64-px composite of 32-px panels
TEXT = 5


@pytest.fixture(scope="module")
def setup(comfy_inproc):
    model, patcher = tiny_flux_pair(comfy_inproc.comfy, seed=4)
    node_module = importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.edit_transfer")
    return model, patcher, node_module


def conditioning(seed: int, guidance: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, TEXT, FLUX_COMFY["context_in_dim"], generator=gen)
    pooled = torch.randn(1, FLUX_COMFY["vec_in_dim"], generator=gen)
    return [[ctx, {"pooled_output": pooled, "guidance": guidance}]]


def composite_latent(batch: int, seed: int = 0) -> torch.Tensor:
    """A raw VAE latent of the composite (what VAEEncode outputs)."""
    return torch.randn(batch, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def panel_mask(batch: int) -> torch.Tensor:
    mask = torch.zeros(batch, 8 * LATENT, 8 * LATENT)
    mask[:, 4 * LATENT:, 4 * LATENT:] = 1.0
    return mask


def noise_like(latent: torch.Tensor, seed: int = 7) -> torch.Tensor:
    return torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# the official loop, written out


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


@torch.no_grad()
def official_loop(model, raw_latent, mask, noise, sigmas, positive, negative=None, cfg=1.0):
    b, c, h, w = raw_latent.shape
    image = pack((raw_latent - SHIFT) * SCALE)
    keep = (mask >= 0.5).float().unsqueeze(1)                                 # binarise, then nearest resize
    m = pack(F.interpolate(keep, size=(h, w)).repeat(1, c, 1, 1))
    latents = pack(noise) * m + image * (1 - m)                                # prepare_latents
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3)

    def velocity(cond, x, sigma):
        ctx, extra = cond[0]
        return model(hidden_states=x, encoder_hidden_states=ctx.expand(b, -1, -1),
                     pooled_projections=extra["pooled_output"].expand(b, -1), timestep=sigma.expand(b),
                     img_ids=img_ids, txt_ids=torch.zeros(ctx.shape[1], 3),
                     guidance=torch.full((b,), extra["guidance"])).sample

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = velocity(positive, latents, sigma)
        if cfg != 1.0:
            v_uncond = velocity(negative, latents, sigma)
            v = v_uncond + cfg * (v - v_uncond)
        latents = latents + (sigma_next - sigma) * v                           # FlowMatchEulerDiscreteScheduler.step
        latents = (1 - m) * image + m * latents                                # reset to the CLEAN context
    return unpack(latents, h, w) / SCALE + SHIFT


def official_sigmas(steps: int, tokens: int) -> torch.Tensor:
    """The official schedule: sigmas linspace(1, 1/steps), shifted with FLUX.1-dev's dynamic mu, terminal 0 (by
    diffusers' own scheduler with FLUX.1-dev's scheduler config)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.float()


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI side


def comfy_sample(comfy, patcher, latent, noise, steps, positive, negative, cfg=1.0, sampler="euler",
                 scheduler="simple", noise_mask=None, callback=None):
    import comfy.sample

    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               noise_mask=noise_mask, callback=callback, disable_pbar=True, seed=0)


def comfy_sigmas(comfy, patcher, scheduler: str, steps: int) -> torch.Tensor:
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps).float()


def with_context(node_module, patcher, latent, mask):
    return node_module.EditTransferContext().apply(patcher, {"samples": latent}, mask)[0]


class InputRecorder:
    """Records every input the diffusion model receives (a forward pre-hook on ComfyUI's Flux)."""

    def __init__(self, patcher):
        self.inputs = []
        self.handle = patcher.model.diffusion_model.register_forward_pre_hook(
            lambda module, args: self.inputs.append(args[0].detach().clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def panel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a[..., LATENT // 2:, LATENT // 2:] - b[..., LATENT // 2:, LATENT // 2:]).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# tests


def check_ksampler_equals_official_loop(comfy, model, patcher, node_module, batch: int, cfg: float, conditioning,
                                        official_loop) -> None:
    """KSampler with Edit Transfer Context equals ``official_loop`` (the official sampler written out for the
    model's family), keeps A, A′ and B exactly, and differs from ComfyUI's stock inpainting. Shared by the FLUX.1-dev
    and FLUX.2 tests."""
    latent, mask = composite_latent(batch), panel_mask(batch)
    noise = noise_like(latent)
    positive, negative = conditioning(1), conditioning(2)
    steps = 4
    sigmas = comfy_sigmas(comfy, patcher, "simple", steps)
    assert sigmas[0].item() == 1.0, "KSampler starts from pure noise (denoise 1)"
    want = official_loop(model, latent, mask, noise, sigmas, positive, negative, cfg)

    ours = comfy_sample(comfy, with_context(node_module, patcher, latent, mask), latent, noise, steps, positive,
                        negative, cfg)
    assert (ours - want).abs().max().item() <= 1e-4, (ours - want).abs().max().item()
    # the official loop leaves A, A', B exactly as encoded
    keep = torch.ones_like(latent, dtype=torch.bool)
    keep[..., LATENT // 2:, LATENT // 2:] = False
    torch.testing.assert_close(ours[keep], latent[keep], rtol=0, atol=1e-5)

    # ComfyUI's stock inpainting (SetLatentNoiseMask: re-noised context at every step) is measurably different
    stock = comfy_sample(comfy, patcher, latent, noise, steps, positive, negative, cfg,
                         noise_mask=mask.reshape(batch, 1, *mask.shape[-2:]))
    generated = want[..., LATENT // 2:, LATENT // 2:]
    assert generated.std().item() > 0.1, "the tiny model must produce a non-trivial panel"
    assert panel_error(stock, want) > 0.05 * generated.std().item(), (panel_error(stock, want), generated.std())


@pytest.mark.parametrize("batch,cfg", [(1, 1.0), (2, 1.0), (2, 2.5)])
def test_ksampler_with_the_node_equals_the_official_loop(comfy_inproc, setup, batch, cfg):
    model, patcher, node_module = setup
    check_ksampler_equals_official_loop(comfy_inproc.comfy, model, patcher, node_module, batch, cfg, conditioning,
                                        official_loop)


def test_sampler_custom_with_the_official_schedule(comfy_inproc, setup):
    """SamplerCustom path (comfy.samplers.sample) with the official 1/steps-spaced, dynamically shifted sigmas."""
    import comfy.sample
    import comfy.samplers

    model, patcher, node_module = setup
    latent, mask = composite_latent(2, seed=3), panel_mask(1)   # one mask for the whole batch
    noise = noise_like(latent, seed=9)
    sigmas = official_sigmas(5, tokens=(LATENT // 2) ** 2)
    assert sigmas[0].item() == pytest.approx(1.0) and sigmas[-1].item() == 0.0 and len(sigmas) == 6
    positive, negative = conditioning(4), conditioning(5)
    want = official_loop(model, latent, mask, noise, sigmas, positive)
    ours = comfy.sample.sample_custom(with_context(node_module, patcher, latent, mask), noise, 1.0,
                                      comfy.samplers.sampler_object("euler"), sigmas, positive, negative, latent,
                                      disable_pbar=True, seed=0)
    assert (ours - want).abs().max().item() <= 1e-4


# One sampler of each kind ComfyUI offers: first order, ancestral, second order, multistep, SDE, CFG++, LCM, DDIM,
# UniPC, and dpm_fast (which stops at sigma_min); all schedulers run with euler. The whole list (every sampler, with
# and without a noise mask) takes ~4 minutes here: ANALOGY_ALL_SAMPLERS=1 runs it (last run: all passed).
KINDS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "euler_cfg_pp", "lcm", "ddim",
         "uni_pc", "dpm_fast", "res_multistep", "ipndm")


def sampler_runs(comfy, with_noise_mask: bool) -> list[tuple[str, str]]:
    import comfy.samplers

    everything = os.environ.get("ANALOGY_ALL_SAMPLERS") == "1"
    samplers = comfy.samplers.KSampler.SAMPLERS if everything else [s for s in KINDS if s != "euler"]
    if with_noise_mask and not everything:
        samplers = ["euler_ancestral", "dpmpp_2m"]
    runs = [(name, "simple") for name in samplers]
    if not with_noise_mask or everything:
        runs += [("euler", name) for name in comfy.samplers.KSampler.SCHEDULERS]
    return runs


@pytest.mark.parametrize("with_noise_mask", [False, True])
def test_every_kind_of_sampler_feeds_the_model_the_clean_context(comfy_inproc, setup, with_noise_mask):
    """Every model call of each sampler sees the clean context (cond and uncond of a batch of 2), and the result keeps
    it; with a noise mask on the latent too (the node overrides the re-noised context)."""
    _, patcher, node_module = setup
    comfy = comfy_inproc.comfy
    latent, mask = composite_latent(2, seed=5), panel_mask(2)
    clean = (latent - SHIFT) * SCALE
    context = torch.ones_like(latent, dtype=torch.bool)
    context[..., LATENT // 2:, LATENT // 2:] = False
    patched = with_context(node_module, patcher, latent, mask)
    positive, negative = conditioning(6), conditioning(7)
    noise_mask = mask.reshape(2, 1, *mask.shape[-2:]) if with_noise_mask else None
    for sampler, scheduler in sampler_runs(comfy, with_noise_mask):
        with InputRecorder(patcher) as recorder:
            out = comfy_sample(comfy, patched, latent, noise_like(latent), 3, positive, negative, cfg=1.5,
                               sampler=sampler, scheduler=scheduler, noise_mask=noise_mask)
        assert recorder.inputs, f"{sampler}/{scheduler}: the model was never called"
        for x in recorder.inputs:
            assert x.shape[0] == 4, "cond and uncond batched"
            for half in x.chunk(2):
                torch.testing.assert_close(half[context], clean[context], rtol=0, atol=1e-6,
                                           msg=f"{sampler}/{scheduler}: the model saw a noisy context")
        assert torch.isfinite(out).all(), f"{sampler}/{scheduler}"
        torch.testing.assert_close(out[context], latent[context], rtol=0, atol=1e-4,
                                   msg=f"{sampler}/{scheduler}: the context did not stay clean")


def test_stock_inpainting_shows_the_model_a_noisy_context(comfy_inproc, setup):
    """Why the node exists: without it, the model's context input is the re-noised latent (sanity of the recorder)."""
    _, patcher, _ = setup
    latent, mask = composite_latent(1, seed=8), panel_mask(1)
    clean = (latent - SHIFT) * SCALE
    with InputRecorder(patcher) as recorder:
        comfy_sample(comfy_inproc.comfy, patcher, latent, noise_like(latent), 3, conditioning(1), conditioning(2),
                     noise_mask=mask.reshape(1, 1, *mask.shape[-2:]))
    first = recorder.inputs[0][..., : LATENT // 2, :]
    assert (first - clean[..., : LATENT // 2, :]).abs().mean() > 0.5


def test_second_node_replaces_the_first(comfy_inproc, setup):
    _, patcher, node_module = setup
    import comfy.patcher_extension

    key = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    once = with_context(node_module, patcher, composite_latent(1), panel_mask(1))
    twice = with_context(node_module, once, composite_latent(1, seed=2), panel_mask(1))
    assert len(twice.get_wrappers(key, node_module.WRAPPER_KEY)) == 1
    assert len(once.get_wrappers(key, node_module.WRAPPER_KEY)) == 1 and not patcher.get_wrappers(
        key, node_module.WRAPPER_KEY), "the input models are untouched"


def test_bad_inputs_are_refused_kindly(comfy_inproc, setup):
    _, patcher, node_module = setup
    node = node_module.EditTransferContext()
    error = importlib.import_module(f"{comfy_inproc.pack.__name__}.analogy_core.edit_transfer").EditTransferError
    with pytest.raises(error, match="selects no pixel"):
        node.apply(patcher, {"samples": composite_latent(1)}, torch.zeros(1, 64, 64))
    with pytest.raises(error, match="whole image"):
        node.apply(patcher, {"samples": composite_latent(1)}, torch.ones(1, 64, 64))
    with pytest.raises(error, match="LATENT"):
        node.apply(patcher, composite_latent(1), panel_mask(1))
    with pytest.raises(error, match="LATENT"):
        node.apply(patcher, {"samples": None}, panel_mask(1))
    with pytest.raises(error, match="expected image latents"):  # a video latent [batch, channels, frames, h, w]
        node.apply(patcher, {"samples": composite_latent(1)[:, :, None]}, panel_mask(1))
    with pytest.raises(error, match="3 masks but the latent 2"):
        node.apply(patcher, {"samples": composite_latent(2)}, panel_mask(3))
    # a sampler latent of another size than the context: refused at the first model call, saying what to connect
    patched = with_context(node_module, patcher, composite_latent(1), panel_mask(1))
    other = torch.randn(1, 16, LATENT, 2 * LATENT)
    with pytest.raises(error, match="connect the same composite latent"):
        comfy_sample(comfy_inproc.comfy, patched, other, noise_like(other), 2, conditioning(1), conditioning(2))


def context_wrapper_and_recorder(comfy_inproc, setup, latent, class_obj=None):
    """The APPLY_MODEL wrapper Edit Transfer Context adds for ``latent``, an executor that records each x the model
    is given (and returns it) on ``class_obj`` (default: the test's FLUX model), and that record."""
    _, patcher, node_module = setup
    patched = with_context(node_module, patcher, latent, panel_mask(len(latent)))
    [wrapper] = patched.get_all_wrappers(comfy_inproc.comfy.patcher_extension.WrappersMP.APPLY_MODEL)
    seen: list[torch.Tensor] = []

    def executor(x, *args, **kwargs):
        seen.append(x)
        return x

    executor.class_obj = patcher.model if class_obj is None else class_obj
    return wrapper, executor, seen


def test_cond_and_uncond_in_one_batch_each_get_the_whole_context(comfy_inproc, setup):
    """ComfyUI may run cond and uncond as one batch (``cond_or_uncond`` = [0, 1]): each half is the whole latent
    batch, so a context of two latents fits a model batch of four, and must not be paired up with a batch of two."""
    _, patcher, _ = setup
    error = importlib.import_module(f"{comfy_inproc.pack.__name__}.analogy_core.edit_transfer").EditTransferError
    latent = composite_latent(2)
    wrapper, executor, seen = context_wrapper_and_recorder(comfy_inproc, setup, latent)
    options = {"cond_or_uncond": [0, 1]}
    x = torch.randn(4, *latent.shape[1:], generator=torch.Generator().manual_seed(1))
    wrapper(executor, x, torch.ones(4), transformer_options=options)
    clean = patcher.model.process_latent_in(latent)
    context = torch.ones_like(latent[0], dtype=torch.bool)
    context[..., LATENT // 2:, LATENT // 2:] = False
    for row, source in enumerate((0, 1, 0, 1)):  # cond: latents 0, 1; uncond: latents 0, 1
        torch.testing.assert_close(seen[0][row][context], clean[source][context])
    with pytest.raises(error, match="holds 2 latents but the sampler runs a batch of 1"):
        wrapper(executor, x[:2], torch.ones(2), transformer_options=options)


def test_the_context_is_divided_by_the_models_input_preconditioning(comfy_inproc, setup):
    """For a model whose input is preconditioned (an ε model scales x by 1/√(σ² + 1); FLUX by 1), the wrapper hands
    the model the clean context divided by that scale, so that the model itself sees the clean latent; the panel
    to generate stays the sampler's."""
    from types import SimpleNamespace

    _, patcher, _ = setup
    latent = composite_latent(1)
    sampling = SimpleNamespace(calculate_input=lambda sigma, x: x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5)
    wrapper, executor, seen = context_wrapper_and_recorder(comfy_inproc, setup, latent,
                                                           SimpleNamespace(model_sampling=sampling))
    x = torch.randn(1, *latent.shape[1:], generator=torch.Generator().manual_seed(2))
    wrapper(executor, x, torch.full((1,), 2.0), transformer_options={})
    clean = patcher.model.process_latent_in(latent)
    context = torch.ones_like(latent[0], dtype=torch.bool)
    context[..., LATENT // 2:, LATENT // 2:] = False
    assert clean[0][context].abs().max() > 0.1, "the context must hold something to scale"
    torch.testing.assert_close(seen[0][0][context], clean[0][context] * 5 ** 0.5)
    torch.testing.assert_close(seen[0][0][~context], x[0][~context])


def test_every_steps_denoised_preview_holds_the_clean_context(comfy_inproc, setup):
    """The sampler's callback (ComfyUI's live preview, SamplerCustom's denoised output) sees A, A′ and B clean."""
    _, patcher, node_module = setup
    latent = composite_latent(1)
    patched = with_context(node_module, patcher, latent, panel_mask(1))
    clean = patcher.model.process_latent_in(latent)
    seen: list[torch.Tensor] = []
    comfy_sample(comfy_inproc.comfy, patched, latent, noise_like(latent), 3, conditioning(1), conditioning(2),
                 callback=lambda step, x0, x, total: seen.append(x0.clone()))
    assert len(seen) == 3
    context = torch.ones_like(latent, dtype=torch.bool)
    context[..., LATENT // 2:, LATENT // 2:] = False
    for x0 in seen:
        assert not torch.allclose(x0[..., LATENT // 2:, LATENT // 2:], clean[..., LATENT // 2:, LATENT // 2:])
        torch.testing.assert_close(x0[context], clean[context])


class StubVAE:
    """Encodes by taking every 8th pixel (channels first); ``downscale_ratio`` only when given."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def encode(self, pixels):
        assert pixels.shape[-1] == 3, "the VAE gets RGB"
        return pixels.movedim(-1, 1)[:, :, ::8, ::8]


@pytest.mark.parametrize("attributes", [{}, {"downscale_ratio": 0}, {"downscale_ratio": 8}])
def test_encode_panels_reads_the_vaes_factor_else_8(comfy_inproc, attributes):
    node_module = importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.edit_transfer")
    core = importlib.import_module(f"{comfy_inproc.pack.__name__}.analogy_core.edit_transfer")
    composite = torch.rand(1, 16, 16, 4, generator=torch.Generator().manual_seed(2))  # RGBA: alpha is dropped
    vae = StubVAE(**attributes)
    [latent] = node_module.EncodePanels().encode(composite, vae)
    assert torch.equal(latent["samples"], core.encode_panels(composite[..., :3], vae.encode, 8))
