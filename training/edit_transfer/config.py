"""EditTransferConfig and its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.config import CommonConfig, FourPanelSettings

LORA_FILE = "edit_transfer_lora.safetensors"
TRANSFORMER_FILE = "edit_transfer_transformer.safetensors"  # written instead of the LoRA with full_finetune
CONTEXTS = ("clean", "renoise")  # official sampler / ComfyUI's stock inpainting


@dataclass
class EditTransferConfig(FourPanelSettings, CommonConfig):
    # a local diffusers folder of FLUX.1-dev (transformer/, vae/, text_encoder*/, tokenizer*/) or a cached model id;
    # "tiny" builds random small models (tests, smoke runs); "flux2:<folder or id>" (or "flux2:tiny") trains on FLUX.2
    backbone: str = "black-forest-labs/FLUX.1-dev"
    output_dir: str = "outputs/edit_transfer"
    # folder:<dir> (official: four-panel images + same-named .txt), quads:<file.jsonl>, relation252k:<dir>, world,
    # synthetic
    data: str = "folder:data/edit_transfer"
    grid_resolution: int = 1024      # official: 1024-px composites of 512-px panels
    panel_fit: str = "stretch"       # how a panel (or an official composite) of another aspect ratio is made square
    rank: int = 16                   # official: linear 16, linear_alpha 16
    lora_alpha: float = 16.0
    # EditTransfer++'s text-decoupled stage only (every training prompt empty); its best-worst contrastive refinement
    # and condition compression are not implemented
    text_free: bool = False
    # True: train every weight of the transformer instead of a LoRA (rank and lora_alpha unused; the EMA, when on,
    # averages them all) and write the whole transformer as edit_transfer_transformer.safetensors: the analogy world's
    # full fine-tune ceiling (training/world/yardstick/ceiling.py). A fine-tuned 12B FLUX.1-dev is not what this pack
    # ships; the option exists to measure what the backbone can learn.
    full_finetune: bool = False
    caption_dropout: float = 0.05    # official: caption_dropout_rate 0.05 (ignored when text_free)
    timestep_sampling: str = "logit_normal"  # official: ai-toolkit's "sigmoid" = sigmoid(N(0, 1)), unweighted
    guidance: float = 1.0            # FLUX.1-dev guidance embedding while training (ai-toolkit: 1.0)
    # T5 tokens of the prompt, padded to at least this many (no truncation): 256 is what ComfyUI feeds FLUX
    # (comfy/text_encoders/flux.py, T5 min_length 256), so the LoRA trains on the text length it meets there; FLUX
    # attends to the padding (no mask). 512: the official training's padding (ai-toolkit, max_sequence_length 512).
    t5_length: int = 256
    batch_size: int = 4
    max_steps: int = 6000
    learning_rate: float = 1e-4
    # optimiser as the released config trains (ai-toolkit "adamw8bit": bitsandbytes AdamW8bit with eps 1e-6 and its
    # default weight decay 0.01, betas (0.9, 0.999)); 8-bit on CUDA with bitsandbytes, else torch AdamW; grad-norm
    # clip 1.0. The paper's text says Adam; the released config is what trained the released file.
    adam_epsilon: float = 1e-6
    weight_decay: float = 0.01
    use_8bit_adam: bool = True
    # EMA of the LoRA weights after every step, as the released config (ema_decay 0.99): the exported file and the
    # samples hold the averaged weights; 0 switches it off (the raw weights are exported).
    ema_decay: float = 0.99
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    sample_steps: int = 35           # official inference: 35 steps, guidance 1.0
    sample_shift: bool = True        # FLUX.1-dev's resolution-dependent time shift when sampling
    checkpoint_every: int = 500
    sample_every: int = 250

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if not (isinstance(self.t5_length, int) and 1 <= self.t5_length <= 4096):
            raise ValueError(f"t5_length must be an integer in 1..4096, got {self.t5_length!r}")
        if self.backbone.partition(":")[0] == "qwen_image_edit":
            raise ValueError("Edit Transfer trains on FLUX.1-dev (as published) or FLUX.2 (backbone flux2:<folder>); "
                             "Qwen-Image-Edit takes its input images as references, not as one four-panel canvas")
        if not (isinstance(self.rank, int) and self.rank >= 1) or not self.lora_alpha > 0:
            raise ValueError(f"rank must be a positive integer and lora_alpha positive, got {self.rank}, "
                             f"{self.lora_alpha}")


PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    # The whole pipeline on a CPU in under a minute: random tiny FLUX-architecture backbone, VAE and text encoders,
    # synthetic analogies generated on the fly.
    "tiny": dict(backbone="tiny", data="synthetic", grid_resolution=64, rank=4, lora_alpha=4.0, batch_size=4,
                 max_steps=60, learning_rate=1e-3, mixed_precision="no", gradient_checkpointing=False,
                 num_workers=0, checkpoint_every=30, sample_every=30, sample_steps=4, log_every=10,
                 output_dir="outputs/edit_transfer_tiny"),
}
