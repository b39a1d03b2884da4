"""Edit Transfer Context: ComfyUI's stock samplers run the official Edit Transfer update (clean context latents).

The MODEL is cloned and given two wrappers (``comfy.patcher_extension``, the same API in 0.3.75 and 0.38):
- APPLY_MODEL: before each model call the context part of the sampler's latent is replaced by the composite's clean
  latent (in the model's latent space: ``process_latent_in`` of the VAE latent, divided by the model's input
  preconditioning, which is 1 for FLUX), and the denoised estimate of the context is the clean latent;
- SAMPLER_SAMPLE: the sampler's result gets the clean context too (the official loop ends with a reset; samplers
  such as dpm_fast stop at sigma_min instead of 0 and would otherwise leave a trace of noise there).
The bottom-right panel follows whatever sampler, scheduler, CFG and batch the user picks. The maths lives in
``analogy_core.edit_transfer``.
"""

from __future__ import annotations

import torch

import comfy.patcher_extension

from ..analogy_core.edit_transfer import CleanContext, EditTransferError, encode_panels
from .common import CATEGORY

WRAPPER_KEY = "analogy_edit_transfer_context"


class ContextWrapper:
    """APPLY_MODEL wrapper: clean context in, clean context out."""

    def __init__(self, context: CleanContext):
        self.context = context

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        groups = len(transformer_options.get("cond_or_uncond") or ()) or 1
        model_sampling = executor.class_obj.model_sampling
        ones = torch.ones((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        input_scale = model_sampling.calculate_input(t, ones)  # 1 for flow models (FLUX)
        x = self.context.model_input(x, groups, input_scale)
        denoised = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        return self.context.denoised(denoised, groups)


class ResultWrapper:
    """SAMPLER_SAMPLE wrapper: the sampled latent (model space) with the clean context."""

    def __init__(self, context: CleanContext):
        self.context = context

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        return self.context.denoised(executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs))


class EditTransferContext:
    DESCRIPTION = (
        "Makes any KSampler / SamplerCustom run the official Edit Transfer sampler on a four-panel composite: A, A' "
        "and B stay clean latents at every step (as in training), only the masked bottom-right panel is denoised. "
        "Stock inpainting (Set Latent Noise Mask) instead shows the model a re-noised context at each step. Connect "
        "the composite's latent both here and to the sampler's latent_image.")
    CATEGORY = f"{CATEGORY}/edit_transfer"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model (a clone) whose sampling keeps the context clean.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The FLUX.1-dev model (with the Edit Transfer LoRA before or after this "
                                           "node)."}),
            "latent": ("LATENT", {"tooltip": "The VAE-encoded four-panel composite [A A'; B ?]: the clean context."}),
            "mask": ("MASK", {"tooltip": "1 on the panel to generate (the mask output of Four-Panel Composite)."}),
        }}

    def apply(self, model, latent, mask):
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            raise EditTransferError("latent: expected a LATENT (a dict with 'samples'), e.g. from VAE Encode")
        samples = latent["samples"]
        if samples.ndim != 4 or samples.is_nested:
            raise EditTransferError(f"latent: expected image latents [batch, channels, height, width], got "
                                    f"{tuple(samples.shape)}")
        clean = model.model.process_latent_in(samples.float())
        context = CleanContext.from_pixel_mask(clean, mask)
        patched = model.clone()
        kinds = comfy.patcher_extension.WrappersMP
        for kind, wrapper in ((kinds.APPLY_MODEL, ContextWrapper), (kinds.SAMPLER_SAMPLE, ResultWrapper)):
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)  # a second context node replaces the first
            patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper(context))
        return (patched,)


class EncodePanels:
    DESCRIPTION = (
        "VAE-encodes a four-panel composite the way the official Edit Transfer inference does: each panel on its own, "
        "the four latents tiled. (VAE Encode on the whole composite lets the latents near the seams see the "
        "neighbouring panel.) Use it where VAE Encode would take the composite.")
    CATEGORY = f"{CATEGORY}/edit_transfer"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The composite's latent: the four panels' latents tiled [A A'; B ?].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The four-panel composite (Four-Panel Composite's image)."}),
            "vae": ("VAE", {"tooltip": "The FLUX VAE."}),
        }}

    def encode(self, pixels, vae):
        ratio = getattr(vae, "downscale_ratio", 8)
        factor = ratio if isinstance(ratio, int) and ratio > 0 else 8
        return ({"samples": encode_panels(pixels, lambda panel: vae.encode(panel[..., :3]), factor)},)


NODE_CLASS_MAPPINGS = {"AnalogyEditTransferContext": EditTransferContext,
                       "AnalogyEncodePanels": EncodePanels}
NODE_DISPLAY_NAME_MAPPINGS = {"AnalogyEditTransferContext": "Edit Transfer Context",
                              "AnalogyEncodePanels": "VAE Encode Panels (Edit Transfer)"}
