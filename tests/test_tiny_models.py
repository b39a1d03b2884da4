"""The tiny ComfyUI twins compute what their diffusers originals compute (so later comparisons mean something)."""

import torch

from tiny_models import tiny_flux_pair, tiny_sd_pair


def test_sd_twin_matches_diffusers(comfy_inproc):
    unet, patcher = tiny_sd_pair(comfy_inproc.comfy)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        out = patcher.model.diffusion_model(x, timesteps=t, context=ctx)
    assert ref.std() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def flux_inputs(seed=0, batch=2, h=4, w=4, txt=5):
    """Matching inputs for diffusers FluxTransformer2DModel and ComfyUI's Flux.forward_orig (packed tokens)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, h * w, 64, generator=gen)
    txt_tokens = torch.randn(batch, txt, 24, generator=gen)
    pooled = torch.randn(batch, 20, generator=gen)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3)
    txt_ids = torch.zeros(txt, 3)
    t = torch.tensor([0.3] * batch)
    guidance = torch.tensor([2.5] * batch)
    return dict(img=img, txt=txt_tokens, y=pooled, img_ids=img_ids, txt_ids=txt_ids, t=t, guidance=guidance)


def run_diffusers_flux(model, inp):
    return model(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
                 timestep=inp["t"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"]).sample


def run_comfy_flux(flux, inp):
    b = inp["img"].shape[0]
    return flux.forward_orig(inp["img"], inp["img_ids"].expand(b, -1, -1), inp["txt"],
                             inp["txt_ids"].expand(b, -1, -1), inp["t"], inp["y"], guidance=inp["guidance"])


def test_flux_twin_matches_diffusers(comfy_inproc):
    model, patcher = tiny_flux_pair(comfy_inproc.comfy)
    inp = flux_inputs()
    with torch.no_grad():
        ref = run_diffusers_flux(model, inp)
        out = run_comfy_flux(patcher.model.diffusion_model, inp)
    assert ref.std() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
