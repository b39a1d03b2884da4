"""Test-only ComfyUI nodes (loaded beside the pack by the integration tests; never shipped to users).

They stand in for what needs real weights: prompts (a tiny checkpoint has no text encoder, so conditioning is
seeded random), and loaders for tiny FLUX and CLIP vision models, whose shapes ComfyUI's own detectors refuse
(they assume FLUX.1's 24 heads of 128 and a 24-layer ViT-L). The loaders build ComfyUI's own model classes from a
config stored in the file's safetensors header, the way comfy.sd does for detected models.
"""

import json

import torch


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
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.metadata() or {}


class TestTinyFluxLoader:
    CATEGORY = "_test_support"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, unet_name):
        import comfy.model_management
        import comfy.model_patcher
        import comfy.supported_models
        import comfy.utils
        import folder_paths

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        config = comfy.supported_models.Flux(json.loads(_header(path)["unet_config"]))
        config.set_inference_dtype(torch.float32, None)
        state = comfy.utils.load_torch_file(path)
        model = config.get_model(state, "")
        model.load_model_weights(state, "")
        device = comfy.model_management.get_torch_device()
        return (comfy.model_patcher.ModelPatcher(model, load_device=device,
                                                 offload_device=comfy.model_management.unet_offload_device()),)


class TestTinyClipVisionLoader:
    CATEGORY = "_test_support"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP_VISION",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    def load(self, clip_name):
        import tempfile

        import comfy.clip_vision
        import comfy.utils
        import folder_paths

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


NODE_CLASS_MAPPINGS = {"AnalogyTestConditioning": TestConditioning, "AnalogyTestTinyFluxLoader": TestTinyFluxLoader,
                       "AnalogyTestTinyClipVisionLoader": TestTinyClipVisionLoader}
