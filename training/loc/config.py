"""LoCConfig and its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.config import CommonConfig

HYPERNETWORK_FILE = "loc_hypernetwork.safetensors"
ENCODER_FILE = "loc_image_encoder.safetensors"   # written only when the image encoder trains
PLAIN_LORA_FILE = "loc_plain_lora.safetensors"   # written instead of the hypernetwork with plain_lora
UNET_FILE = "loc_unet.safetensors"               # written instead of the hypernetwork with full_finetune
LOSS_SPACES = ("epsilon", "x0", "x0_clamped")
QUERY_SOURCES = ("flips", "dataset")
FINETUNE_SCOPES = ("unet", "attention")  # full_finetune: every UNet weight, or the attention projections only


@dataclass
class LoCConfig(CommonConfig):
    # frozen InstructPix2Pix: a local diffusers folder (unet/ with 8 input channels, vae/, text_encoder/, tokenizer/,
    # scheduler/) or a model id already in the Hugging Face cache (timbrooks/instruct-pix2pix); "tiny": random
    backbone: str = "timbrooks/instruct-pix2pix"
    # encoder of A and A′ (its patch tokens feed H): a transformers CLIP vision folder or cached id,
    # "open_clip:<arch>:<weights.safetensors>", or "tiny". Use the CLIP vision model your ComfyUI workflow loads.
    image_encoder: str = "openai/clip-vit-large-patch14"
    output_dir: str = "outputs/loc"
    # data: "magicbrush:<folder|file.parquet>", "pairs:<file.jsonl|folder>" or "world" (see training/loc/data.py)
    data: str = "magicbrush:data/MagicBrush"
    magicbrush_split: str = "train"
    world_instructions: bool = False
    resolution: int = 512                 # paper: 512 x 512
    image_fit: str = "center_crop"        # how other aspect ratios become square ("stretch" ignores the aspect)
    # hypernetwork (paper: width 512, M = 6 blocks, 8 heads; rank not stated, see analogy_core/loc.py)
    rank: int = 4
    width: int = 512
    blocks: int = 6
    heads: int = 8
    ffn: int = 2048
    # Not in the paper: > 0 softly caps every generated update at update_bound x the norm of the weight it patches
    # (‖ΔW_p‖ ≤ c‖W_p‖; the norms are read from the backbone and stored in the hypernetwork file, see
    # analogy_core/loc.py). 0 (default): unbounded, as the paper.
    update_bound: float = 0.0
    # objective
    # Eqs. 6-7 are written in clean-image space; on an ε-prediction UNet that weights each step's ε-MSE by
    # (1 − ᾱ)/ᾱ (214 at t = 999; steps t ≥ 500 carry 98 % of the weight). Default "epsilon": the ε-MSE, weight 1 at
    # every step (bounded; the usual SD objective). "x0": the literal eqs. 6-7. "x0_clamped": the x0 form with the
    # per-step weight clamped at x0_weight_max (min((1 − ᾱ)/ᾱ, max) · ε-MSE).
    loss_space: str = "epsilon"
    x0_weight_max: float = 5.0
    lora_reverse: bool = True             # eq. 7 (off: eq. 6 only, the paper's ablation without LoRA Reverse)
    random_exchange: bool = True          # (A, A′) -> (A′, A) with exchange_probability
    exchange_probability: float = 0.5
    flip_probability: float = 0.5         # B, B′ = horizontal flips of A, A′ with this probability
    # Where B and B′ come from. "flips" (the paper, paired data only): one random flip of A and A′. "dataset": the
    # data's own B and B′ (a quad source: world, quads, relation252k, synthetic, folder), B another image edited the
    # same way, so the LoRA cannot carry A′'s appearance; random exchange then swaps both pairs. Not in the paper,
    # which trains on pairs because quads are scarce.
    query_source: str = "flips"
    # Eqs. 6-8 have no text: the LoRA must carry the edit, so by default every prompt is "" (as at inference, where
    # the example workflow runs with an empty prompt). True: the data's instruction conditions the term that edits in
    # its direction (our earlier variant; InstructPix2Pix can then do the edit from the text and H learns less).
    text_conditioning: bool = False
    text_dropout: float = 0.05            # with text_conditioning: instruction -> "" (classifier-free guidance)
    # E trainable: the paper optimises all of H, its encoder E included. 0 (default): E frozen, because the ANALOGY a
    # user feeds the hypernetwork comes from the CLIP vision model loaded in ComfyUI (Encode Analogy), so a trained
    # file works with that stock model; a trained E would have to ship and be loaded instead (written next to the
    # hypernetwork as loc_image_encoder.safetensors, transformers keys, which ComfyUI's Load CLIP Vision reads).
    # > 0: E trains at this rate (e.g. 1e-6, a tenth of H's paper rate; transformers encoders only).
    image_encoder_learning_rate: float = 0.0
    init_from: str = ""                   # two-stage training: a hypernetwork file or checkpoint folder
    # True: train one plain LoRA of `rank` on the same projections instead of H (the same for every pair; written as
    # a standard LoRA file, loc_plain_lora.safetensors): LoC's ceiling on the analogy world (training/loc/plain.py)
    plain_lora: bool = False
    # True: no LoRA at all; train every weight of the UNet with eq. (6) (LoRA Reverse has no LoRA to negate, so it
    # must be off) and write the UNet (loc_unet.safetensors): LoC's full fine-tune ceiling on the analogy world
    full_finetune: bool = False
    # with full_finetune, which weights train: "unet" (every one) or "attention" (only the q/k/v/out weights of the
    # attention projections H patches, at full rank: a probe separating where LoC's LoRA sits from its rank)
    finetune_scope: str = "unet"
    sample_steps: int = 20                # DDIM steps of the sample images
    # optimisation (paper: AdamW, lr 1e-5, batch 96 on 8 GPUs, 80 epochs, 512 px)
    batch_size: int = 12
    max_steps: int = 7500                 # ~80 epochs of MagicBrush (8,807 pairs) at batch 96
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True   # on the frozen UNet (gradients flow through it to H)

    def validate(self) -> None:
        super().validate()
        if self.loss_space not in LOSS_SPACES:
            raise ValueError(f"loss_space must be one of {LOSS_SPACES}, got {self.loss_space!r}")
        if not self.image_encoder_learning_rate >= 0:
            raise ValueError(f"image_encoder_learning_rate must be >= 0, got {self.image_encoder_learning_rate}")
        if self.query_source not in QUERY_SOURCES:
            raise ValueError(f"query_source must be one of {QUERY_SOURCES}, got {self.query_source!r}")
        if not 0 <= self.update_bound <= 1000:
            raise ValueError(f"update_bound must be 0 (unbounded) or a ratio in (0, 1000], got {self.update_bound}")
        if self.update_bound > 0 and (self.plain_lora or self.full_finetune):
            raise ValueError("update_bound bounds the updates H generates: plain_lora and full_finetune train none")
        if not self.x0_weight_max > 0:
            raise ValueError(f"x0_weight_max must be positive, got {self.x0_weight_max}")
        for mode in ("plain_lora", "full_finetune"):
            if getattr(self, mode) and (self.init_from or self.image_encoder_learning_rate > 0):
                raise ValueError(f"{mode} trains without H: init_from (a hypernetwork) and image_encoder_learning_rate "
                                 "(H's encoder) do not apply to it")
        if self.finetune_scope not in FINETUNE_SCOPES:
            raise ValueError(f"finetune_scope must be one of {FINETUNE_SCOPES}, got {self.finetune_scope!r}")
        if self.finetune_scope != "unet" and not self.full_finetune:
            raise ValueError(f"finetune_scope={self.finetune_scope!r} chooses the weights a full fine-tune trains: "
                             "it needs full_finetune=true")
        if self.plain_lora and self.full_finetune:
            raise ValueError("plain_lora and full_finetune are two different ceilings: choose one")
        if self.full_finetune and (self.lora_reverse or self.random_exchange):
            raise ValueError("full_finetune trains the UNet itself with eq. (6): set lora_reverse and random_exchange "
                             "to false (LoRA Reverse negates a LoRA, and there is none)")
        if self.image_fit not in ("stretch", "center_crop"):
            raise ValueError(f"image_fit must be stretch or center_crop, got {self.image_fit!r}")
        for key in ("exchange_probability", "flip_probability", "text_dropout"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("rank", "width", "blocks", "heads", "ffn", "resolution", "sample_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # The whole pipeline on a CPU in well under a minute: random tiny InstructPix2Pix, VAE, text and image encoders,
    # and pairs of the analogy world generated on the fly.
    "tiny": dict(backbone="tiny", image_encoder="tiny", data="world", resolution=32, rank=2, width=32, blocks=2,
                 heads=4, ffn=64, batch_size=4, max_steps=40, learning_rate=1e-3, weight_decay=0.0,
                 mixed_precision="no", gradient_checkpointing=False, num_workers=0, checkpoint_every=20,
                 sample_every=40, sample_steps=4, log_every=10, report_to="tensorboard",
                 output_dir="outputs/loc_tiny"),
}
