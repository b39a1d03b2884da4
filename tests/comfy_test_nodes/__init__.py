"""Test-only ComfyUI nodes (loaded beside the pack by the integration tests; never shipped to users).

A tiny SD1.5 checkpoint has no text encoder, so prompts are replaced by seeded random conditioning.
"""

import torch


class TestConditioning:
    CATEGORY = "_test_support"
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 77, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 768, "min": 1, "max": 8192})}}

    def make(self, seed, tokens, width):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=gen), {}]],)


NODE_CLASS_MAPPINGS = {"AnalogyTestConditioning": TestConditioning}
