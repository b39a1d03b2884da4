"""Configuration of the region trainer (``python -m training.train_region``) and its presets.

The paper (Ma et al., §3.3-4) fixes the losses and the encoders (CLIP ViT-L/14, FLAN-T5-Base) but publishes no loss
weights, learning rate or batch size beyond "batch 256 on 8 A100s"; the defaults below are ours and say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analogy_core.regions import POSITION_INITS
from training.config import CommonConfig

MODES = ("text", "analogy", "both")
ATTENTION_INITS = ("calibrated", "torch")


@dataclass
class RegionConfig(CommonConfig):
    output_dir: str = "outputs/region"
    # data: "jsonl:<file>" (text mode: image, instruction, source/target captions, optional edited image and mask),
    # "pairs:<file>" (analogy mode: before/after pairs grouped by edit), or "world" (the analogy world's local
    # families on training scenes; both modes).
    data: str = "jsonl:data/regions/train.jsonl"
    mode: str = "text"                 # text (the paper), analogy (beyond the paper) or both (world data only)
    # frozen encoders: a local transformers folder or an id already in the Hugging Face cache (nothing downloads);
    # "world" = the analogy world's CLIP and instruction encoder, "tiny" = random small models (tests)
    clip: str = "openai/clip-vit-large-patch14"      # CLIPModel (vision + text): F_img, I, T_o, T_e (paper)
    instruction_encoder: str = "google/flan-t5-base"  # T5 encoder for the instruction tokens (paper)
    resolution: int = 224              # training images are resized to this square (the CLIP input is square)
    hidden: int = 0                    # token-wise MLP / f_sem width; 0 = d
    # The defaults are the pack's form (preset "pack"); preset "paper" switches both off (the paper's equations).
    # F_Editedimg = F_img + CrossAttn(...), F_imgRegion = F_Editedimg + SelfAttn(...): residual connections the
    # paper's equations 1-2 do not have
    residual: bool = True
    # a learned vector per patch added to F_img (and per ANALOGY token): not in the paper; the world's "add a square
    # at the top left" was not learnt without it (f_sem of eq. 5 always reads the raw patches)
    positions: bool = True
    # how those positions start: "sincos" (2-D sin-cos positions, analogy_core.regions.sincos_positions: neighbouring
    # patches start alike) or "random" (N(0, 0.02²), the pack's init until 2026-12-07). On the analogy world sincos
    # raised analogy mode's IoU at all three seeds (docs/analogy_world_measurements.md, "Regions in analogy mode")
    position_init: str = "sincos"
    # "calibrated": at the first step of a fresh run, W_Q and W_K of both attentions are scaled so their scores on
    # that batch have unit std (torch's default init leaves them nearly constant: the softmaxes average); "torch":
    # torch's default init only
    attention_init: str = "calibrated"
    # train on the mask inference uses: the blend X_res = M ⊙ X_edit + (1 − M) ⊙ X (the pack's first-order stand-in for
    # the paper's generator, whose X_res the CLIP losses of eqs. 7-9 read) takes M = (P_region ≥ threshold) in the
    # forward pass with the soft mask's gradient (straight-through); false: M is the soft mask. The paper thresholds
    # P_region before its generator and publishes no gradient path; neither choice is the paper's
    straight_through: bool = False
    # loss weights (eq. 11: α·L_semAlign + β·L_CLIP; eq. 10: λg, λd, λs). Not published; LearnRegion uses 1 for its
    # three CLIP terms with a *mean* structure loss; eq. 9 sums the squares of an N×N matrix, so λs ~ 1/N² matches it.
    alpha: float = 1.0
    beta: float = 1.0
    lambda_g: float = 1.0
    lambda_d: float = 1.0
    lambda_s: float = 1.0 / 256 ** 2   # N = 256 patches for ViT-L/14 at 224 px
    # beyond the paper: BCE of P_region against a given mask (text mode, items that have one), and analogy mode's
    # BCE against the exemplar-pair difference
    mask_weight: float = 0.0
    analogy_weight: float = 1.0
    diff_tolerance: float = 0.02       # a pixel belongs to an A→A' difference when a channel moves more than this
    world_editor: str = "redraw"       # world data, text mode: what X_edit is (see training/regions/data.py)
    world_scenes: int = 4096           # world data: training scenes drawn per family (index range)
    threshold: float = 0.5             # binary region for samples and IoU
    threads: int = 0                   # torch CPU threads (0: torch's default; 1 is often faster on a busy CPU)
    # optimisation
    batch_size: int = 32
    max_steps: int = 20_000
    learning_rate: float = 1e-4
    weight_decay: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 px, got {self.resolution}")
        for key in ("alpha", "beta", "lambda_g", "lambda_d", "lambda_s", "mask_weight", "analogy_weight"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        if not 0 <= self.diff_tolerance < 1 or not 0 < self.threshold < 1:
            raise ValueError("diff_tolerance must be in [0, 1) and threshold in (0, 1)")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an integer >= 0, got {self.threads!r}")
        if self.position_init not in POSITION_INITS:
            raise ValueError(f"position_init must be one of {POSITION_INITS}, got {self.position_init!r}")
        if self.attention_init not in ATTENTION_INITS:
            raise ValueError(f"attention_init must be one of {ATTENTION_INITS}, got {self.attention_init!r}")
        if self.mode == "both" and self.data != "world":
            raise ValueError("mode both needs data that has instructions and pairs for every item: data=world")


PRESETS: dict[str, dict[str, Any]] = {
    # the paper's form: equations 1-2 without residual connections, no learned positions
    "paper": dict(residual=False, positions=False),
    # the pack's form (the config's defaults): residual connections and learned positions
    "pack": {},
    # The analogy world on a CPU in a few minutes: the world's CLIP and instruction encoder, both modes. The token
    # MLP is four times as wide as the world CLIP's 32-wide features (the usual transformer ratio): at the default
    # width (= d, 768 for ViT-L/14 but 32 here) analogy mode missed the IoU target at one seed of three, four times as
    # wide it met it at all three on one machine, at one of three on another's rebuilt worlds, and there at all three
    # once the positions started as sin-cos ones (position_init); the removed discs stay hard at either width
    # (docs/analogy_world_measurements.md, "Regions in analogy mode")
    "tiny": dict(data="world", mode="both", clip="world", instruction_encoder="world", resolution=64, batch_size=16,
                 hidden=128,
                 max_steps=300, learning_rate=2e-3, weight_decay=0.0, lambda_s=1.0 / 64 ** 2, num_workers=0,
                 checkpoint_every=100, sample_every=100, log_every=10, report_to="tensorboard",
                 output_dir="outputs/region_tiny"),
}
