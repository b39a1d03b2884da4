"""Tiny diffusers models and their ComfyUI twins with identical weights (built from small configs, no downloads)."""

from __future__ import annotations

import torch

SD_DIFFUSERS = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
SD_COMFY = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 0], transformer_depth_output=[1, 1, 0, 0], transformer_depth_middle=1,
    context_dim=32, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None,
    use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
)
FLUX_DIFFUSERS = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                      axes_dims_rope=(4, 6, 6))
FLUX_COMFY = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=20, context_in_dim=24,
                  hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                  theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every weight set explicitly: matrices ~ N(0, fan_in^-1/2), biases small, 1-D scales near 1 (never 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in ** 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            else:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))


def comfy_model(comfy, model_config_cls, unet_config: dict, state_dict: dict):
    """A ComfyUI ModelPatcher over a BaseModel built from ``unet_config`` with the given diffusion_model weights."""
    config = model_config_cls(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    missing, unexpected = base.diffusion_model.load_state_dict(state_dict, strict=False)
    assert not unexpected and not missing, (missing[:5], unexpected[:5])
    base.diffusion_model.float()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def tiny_sd_pair(comfy, seed: int = 0):
    """(diffusers UNet2DConditionModel, ComfyUI SD15 ModelPatcher) with the same weights."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**SD_DIFFUSERS).eval()
    randomize_(unet, seed)
    mapping = comfy.utils.unet_to_diffusers(dict(SD_COMFY))  # diffusers key -> LDM key
    source = unet.state_dict()
    state = {mapping[k]: v.clone() for k, v in source.items() if k in mapping}
    assert len(state) == len(source), sorted(set(source) - set(mapping))[:5]
    return unet, comfy_model(comfy, comfy.supported_models.SD15, SD_COMFY, state)


def tiny_flux_pair(comfy, seed: int = 0):
    """(diffusers FluxTransformer2DModel, ComfyUI Flux ModelPatcher) with the same weights."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**FLUX_DIFFUSERS).eval()
    randomize_(model, seed)
    mapping = comfy.utils.flux_to_diffusers(dict(FLUX_COMFY))  # diffusers key -> BFL key (+ slice / function)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        target = mapping[key]
        if isinstance(target, str):
            state[target] = value.clone()
            continue
        bfl_key, sl = target[0], target[1]
        if sl is None:  # norm_out: BFL stores (shift, scale), diffusers (scale, shift)
            fn = target[2]
            state[bfl_key] = fn(value.clone())
            continue
        dim, offset, size = sl
        full = state.setdefault(bfl_key, torch.zeros(0))
        needed = offset + size
        if full.shape[0] < needed:
            grown = torch.zeros((needed, *value.shape[1:]), dtype=value.dtype)
            grown[: full.shape[0]] = full if full.numel() else grown[:0]
            state[bfl_key] = full = grown
        full.narrow(dim, offset, size).copy_(value)
    return model, comfy_model(comfy, comfy.supported_models.Flux, FLUX_COMFY, state)
