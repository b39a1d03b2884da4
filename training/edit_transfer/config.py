"""EditTransferConfig and its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.config import CommonConfig, FourPanelSettings

LORA_FILE = "edit_transfer_lora.safetensors"
CONTEXTS = ("clean", "renoise")  # official sampler / ComfyUI's stock inpainting


@dataclass
class EditTransferConfig(FourPanelSettings, CommonConfig):
    # a local diffusers folder of FLUX.1-dev (transformer/, vae/, text_encoder*/, tokenizer*/) or a cached model id;
    # "tiny" builds random small models (tests, smoke runs)
    backbone: str = "black-forest-labs/FLUX.1-dev"
    output_dir: str = "outputs/edit_transfer"
    # folder:<dir> (official: four-panel images + same-named .txt), quads:<file.jsonl>, relation252k:<dir>, world,
    # synthetic
    data: str = "folder:data/edit_transfer"
    grid_resolution: int = 1024      # official: 1024-px composites of 512-px panels
    panel_fit: str = "stretch"       # how a panel (or an official composite) of another aspect ratio is made square
    rank: int = 16                   # official: linear 16, linear_alpha 16
    lora_alpha: float = 16.0
    text_free: bool = False          # EditTransfer++: every training prompt empty
    caption_dropout: float = 0.05    # official: caption_dropout_rate 0.05 (ignored when text_free)
    timestep_sampling: str = "logit_normal"  # official: ai-toolkit's "sigmoid" = sigmoid(N(0, 1)), unweighted
    guidance: float = 1.0            # FLUX.1-dev guidance embedding while training (ai-toolkit: 1.0)
    batch_size: int = 4
    max_steps: int = 6000
    learning_rate: float = 1e-4
    # optimiser: Adam without weight decay, as the paper states (CommonConfig's defaults: betas (0.9, 0.999), eps
    # 1e-8, grad-norm clip 1.0, torch AdamW)
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    sample_steps: int = 35           # official inference: 35 steps, guidance 1.0
    sample_shift: bool = True        # FLUX.1-dev's resolution-dependent time shift when sampling
    checkpoint_every: int = 500
    sample_every: int = 250

    def validate(self) -> None:
        super().validate()
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
