"""Development ComfyUI nodes (loaded beside the pack by the integration tests and the world demo; never shipped).

They stand in for what needs real weights: prompts (a tiny checkpoint has no text encoder, so conditioning is
seeded random, or read from a file such as the analogy world's neutral conditioning), and loaders for tiny FLUX and
CLIP vision models, whose shapes ComfyUI's own detectors refuse (they assume FLUX.1's 24 heads of 128 and a 24-layer
ViT-L). The loaders build ComfyUI's own model classes from a config stored in the file's safetensors header, the way
comfy.sd does for detected models; the FLUX loader also reads diffusers-named weights, converted with ComfyUI's own
key map (``comfy.utils.flux_to_diffusers``). This folder is a custom-node folder: ``ComfyServer(extra_nodes=...)``
links it beside the pack; ``tests/comfy_test_nodes`` re-exports it for the tests.
"""


import json

import torch
from safetensors import safe_open
import tempfile


class TestConditioning:
    CATEGORY = "_test_support"
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 77, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 768, "min": 1, "max": 8192})},
                "optional": {"pooled_width": ("INT", {"default": 0, "min": 0, "max": 8192})}}

    def make(self, seed, tokens, width, pooled_width=0):
        gen = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled_width, generator=gen)} if pooled_width else {}
        return ([[torch.randn(1, tokens, width, generator=gen), extra]],)


def _header(path):
    with safe_open(path, "pt") as handle:
        return handle.metadata() or {}


class TestTinyFluxLoader:
    CATEGORY = "_test_support"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths  # ComfyUI's own modules exist only inside a ComfyUI process

        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, unet_name):
        import comfy.model_management  # ComfyUI's own modules exist only inside a ComfyUI process
        import comfy.model_patcher  # ComfyUI's own modules exist only inside a ComfyUI process
        import comfy.supported_models  # ComfyUI's own modules exist only inside a ComfyUI process
        import comfy.utils  # ComfyUI's own modules exist only inside a ComfyUI process
        import folder_paths  # ComfyUI's own modules exist only inside a ComfyUI process

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        unet_config = json.loads(_header(path)["unet_config"])
        # FLUX.1, or FLUX.2 (whose detector in ComfyUI 0.3.75 fixes 48 heads of 128, i.e. the full width)
        cls = comfy.supported_models.Flux2 if unet_config.get("image_model") == "flux2" else comfy.supported_models.Flux
        config = cls(dict(unet_config))
        config.set_inference_dtype(torch.float32, None)
        state = comfy.utils.load_torch_file(path)
        if "x_embedder.weight" in state:  # diffusers names: convert with ComfyUI's own key map
            state = _diffusers_flux_to_native(state, unet_config)
        model = config.get_model(state, "")
        model.load_model_weights(state, "")
        device = comfy.model_management.get_torch_device()
        return (comfy.model_patcher.ModelPatcher(model, load_device=device,
                                                 offload_device=comfy.model_management.unet_offload_device()),)


def _diffusers_flux_to_native(state: dict, unet_config: dict) -> dict:
    """diffusers FluxTransformer2DModel weights -> BFL names (fused q/k/v and linear1 assembled from slices)."""
    import comfy.utils  # ComfyUI's own modules exist only inside a ComfyUI process

    native: dict = {}
    for key, target in comfy.utils.flux_to_diffusers(dict(unet_config)).items():
        if key not in state:
            continue
        value = state[key]
        if isinstance(target, str):
            native[target] = value
        elif target[1] is None:  # (native key, None, function): e.g. FLUX's swapped scale/shift halves
            native[target[0]] = target[2](value)
        else:
            native_key, (dim, offset, size) = target[0], target[1]
            parts = native.setdefault(native_key, [])
            parts.append((offset, value))
    for key, value in list(native.items()):
        if isinstance(value, list):
            native[key] = torch.cat([v for _, v in sorted(value, key=lambda item: item[0])], dim=0)
    return native


class TestTinyClipVisionLoader:
    CATEGORY = "_test_support"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP_VISION",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths  # ComfyUI's own modules exist only inside a ComfyUI process

        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    def load(self, clip_name):
        import comfy.clip_vision  # ComfyUI's own modules exist only inside a ComfyUI process
        import comfy.utils  # ComfyUI's own modules exist only inside a ComfyUI process
        import folder_paths  # ComfyUI's own modules exist only inside a ComfyUI process

        path = folder_paths.get_full_path_or_raise("clip_vision", clip_name)
        with tempfile.TemporaryDirectory() as folder:
            config = f"{folder}/config.json"
            with open(config, "w") as handle:
                handle.write(_header(path)["clip_config"])
            clip_vision = comfy.clip_vision.ClipVisionModel(config)
        missing, unexpected = clip_vision.load_sd(comfy.utils.load_torch_file(path))
        if [k for k in missing if "position_ids" not in k] or unexpected:
            raise RuntimeError(f"tiny clip vision file does not fit: {missing[:3]} {unexpected[:3]}")
        return (clip_vision,)


class ConditioningFile:
    """FLUX conditioning read from a safetensors file in ``models/text_encoders`` holding ``context`` [1, T, D] and
    ``pooled`` [1, P] (the analogy world writes its neutral prompt's conditioning this way)."""

    CATEGORY = "_test_support"
    FUNCTION = "load"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths  # ComfyUI's own modules exist only inside a ComfyUI process

        return {"required": {"file_name": (folder_paths.get_filename_list("text_encoders"),)}}

    def load(self, file_name):
        import comfy.utils  # ComfyUI's own modules exist only inside a ComfyUI process
        import folder_paths  # ComfyUI's own modules exist only inside a ComfyUI process

        tensors = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("text_encoders", file_name))
        if set(tensors) != {"context", "pooled"}:
            raise ValueError(f"{file_name}: expected tensors 'context' and 'pooled', got {sorted(tensors)}")
        return ([[tensors["context"].float(), {"pooled_output": tensors["pooled"].float()}]],)


NODE_CLASS_MAPPINGS = {"AnalogyTestConditioningFile": ConditioningFile,
                       "AnalogyTestConditioning": TestConditioning, "AnalogyTestTinyFluxLoader": TestTinyFluxLoader,
                       "AnalogyTestTinyClipVisionLoader": TestTinyClipVisionLoader}
