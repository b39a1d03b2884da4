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


# FLUX.2 (dev / klein structure: shared modulations, SwiGLU MLPs, fused single blocks) and Qwen-Image(-Edit), tiny.
FLUX2_DIFFUSERS = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=24, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                       rope_theta=2000, guidance_embeds=True)
FLUX2_COMFY = dict(image_model="flux2", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=24,
                   hidden_size=32, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 4, 4, 4],
                   theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True,
                   mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0)
QWEN_DIFFUSERS = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
QWEN_COMFY = dict(image_model="qwen_image", **QWEN_DIFFUSERS)

# diffusers Flux2Transformer2DModel -> BFL (ComfyUI) names, written out here independently of the pack's tables
_FLUX2_RENAMES = (
    (r"time_guidance_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
    (r"time_guidance_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
    (r"time_guidance_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
    (r"time_guidance_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear", r"\1.lin"),
    (r"x_embedder", "img_in"), (r"context_embedder", "txt_in"), (r"proj_out", "final_layer.linear"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_in", r"double_blocks.\1.img_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_out", r"double_blocks.\1.img_mlp.2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2"),
)
_FLUX2_SINGLE_RENAMES = (
    (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_out", r"single_blocks.\1.linear2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
)
_FLUX2_QKV = {"to_q": ("img", 0), "to_k": ("img", 1), "to_v": ("img", 2),
              "add_q_proj": ("txt", 0), "add_k_proj": ("txt", 1), "add_v_proj": ("txt", 2)}


def flux2_native_state(state: dict) -> dict:
    """diffusers FLUX.2 weights in BFL names: q/k/v stacked into qkv, norm_out's (scale, shift) as (shift, scale)."""
    import re

    native, qkv = {}, {}
    for key, value in state.items():
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)"
                             r"\.weight", key)
        if match:
            side, index = _FLUX2_QKV[match[2]]
            qkv.setdefault(f"double_blocks.{match[1]}.{side}_attn.qkv.weight", {})[index] = value
            continue
        if key == "norm_out.linear.weight":
            scale, shift = value.chunk(2)
            native["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
            continue
        renamed = key
        for pattern, target in (_FLUX2_SINGLE_RENAMES if key.startswith("single_transformer") else _FLUX2_RENAMES):
            renamed, count = re.subn(rf"^{pattern}", target, renamed)
            if count:
                break
        assert renamed != key, key
        native[renamed] = value
    for key, parts in qkv.items():
        native[key] = torch.cat([parts[i] for i in range(3)])
    return native


def tiny_flux2_pair(comfy, seed: int = 0):
    """(diffusers Flux2Transformer2DModel, ComfyUI Flux2 ModelPatcher) with the same weights."""
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(**FLUX2_DIFFUSERS).eval()
    randomize_(model, seed)
    state = flux2_native_state({k: v.clone() for k, v in model.state_dict().items()})
    return model, comfy_model(comfy, comfy.supported_models.Flux2, FLUX2_COMFY, state)


def tiny_qwen_pair(comfy, seed: int = 0):
    """(diffusers QwenImageTransformer2DModel, ComfyUI QwenImage ModelPatcher) with the same weights (ComfyUI uses
    diffusers' module names for this model)."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**QWEN_DIFFUSERS).eval()
    randomize_(model, seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, comfy_model(comfy, comfy.supported_models.QwenImage, QWEN_COMFY, state)
