"""The built-in world models (registered on import): autoencoder, world CLIP, FLUX.1-Kontext-like backbone.

Settings are per world size: ``full`` (the yardstick and the demo; a few minutes on 2 CPU cores) and ``quick`` (the
CI-sized world of the tests). Changing a value changes the model's cache key, so the next build redoes that model
and the models depending on it.
"""

from __future__ import annotations

from training.world import autoencoder, clip, flux_dev, flux_kontext, instruct_pix2pix, region_t5
from training.world.registry import WorldModel, register

# ``cost``: the seconds each model took to build on the full world v2 on 2 cores (README), which orders a side-by-side
# build (the costliest ready model first); it changes no model.
PANEL = 64  # world panel side in pixels: 8 x 8 cells = an 8 x 8 latent (a cell per latent pixel), 4 x 4 FLUX tokens

register(WorldModel(
    "autoencoder", autoencoder.build, depends=(), version=2, cost=3,
    description="TAESD-architecture autoencoder (f=8, 16 latent channels), set by hand: exact on the world's cells",
    configs={size: dict(panel=PANEL, width=16, pool=512) for size in ("full", "quick")}))

register(WorldModel(
    "clip", lambda ctx: clip.train_clip(ctx.config, ctx.seed, ctx.folder), depends=(), version=1, cost=123,
    description="tiny CLIP (vision + text) trained contrastively on world images and procedural captions",
    configs={"full": dict(width=64, vision_layers=3, text_layers=2, heads=2, projection_dim=32, pool=2000,
                          steps=600, batch=64, lr=2e-3),
             "quick": dict(width=64, vision_layers=3, text_layers=2, heads=2, projection_dim=32, pool=600,
                           steps=200, batch=64, lr=2e-3)}))

register(WorldModel(
    "flux_kontext", flux_kontext.build, depends=("autoencoder",), version=1, cost=203,
    description="FLUX.1-Kontext-like transformer pretrained to copy grids (B′ = B) and draw a new last panel",
    configs={"full": dict(panel=PANEL, heads=3, double_blocks=2, single_blocks=2, pool=2000, steps=1000,
                          batch_copy=8, batch_complete=4, complete_weight=1.0, lr=2e-3, eval_grids=16,
                          eval_steps=8),
             "quick": dict(panel=PANEL, heads=3, double_blocks=2, single_blocks=2, pool=1000, steps=600,
                           batch_copy=8, batch_complete=4, complete_weight=1.0, lr=2e-3, eval_grids=8,
                           eval_steps=8)}))

register(WorldModel(
    "flux_dev", flux_dev.build, depends=("autoencoder",), version=1, cost=61,
    description="FLUX.1-dev-like transformer pretrained to complete grids by copying ([A A; B ?] inpainted with B) and "
                "to draw world grids (Edit Transfer's base)",
    configs={"full": dict(panel=PANEL, heads=3, double_blocks=2, single_blocks=2, pool=2000, steps=1000,
                          batch_copy=8, batch_generate=2, generate_weight=0.25, generate_from=0.5, lr=2e-3, eval_grids=16,
                          eval_steps=8),
             "quick": dict(panel=PANEL, heads=3, double_blocks=2, single_blocks=2, pool=1000, steps=600,
                           batch_copy=8, batch_generate=2, generate_weight=0.25, generate_from=0.5, lr=2e-3, eval_grids=8,
                           eval_steps=8)}))

# Probe settings of the InstructPix2Pix-like UNet (``--world-set instruct_pix2pix.<name>=...``); these defaults build the
# UNet of version 1. Measured on LoC's rank-4 LoRA ceiling, none lifts it near the issue's target (README, "What limits
# LoC's ceiling"): transformer layers per block, the neutral prompt's position-embedding scale (the cross-attention's
# keys), the self-attention's initial query = key gain (0: diffusers' initialisation), and Fourier position channels at
# the UNet's input (``position_frequencies``, 0: none, as InstructPix2Pix) or added to every self-attention's input
# (``attention_positions``, 0: none).
IP2P_PROBES = dict(transformer_layers=1, prompt_position_std=0.0, self_attention_gain=0.0, position_frequencies=0,
                   attention_positions=0)

register(WorldModel(
    "instruct_pix2pix", instruct_pix2pix.build, depends=("autoencoder",), version=1, cost=477,
    late_settings=dict(position_frequencies=0, attention_positions=0),
    description="InstructPix2Pix-like SD1.5-architecture UNet (32 input channels) pretrained to copy and draw",
    configs={"full": dict(panel=PANEL, width=64, layers_per_block=1, head_dim=16, groups=16, prediction="v_prediction",
                          **IP2P_PROBES,
                          pool=2000, steps=1500,
                          batch_copy=16, batch_generate=8, generate_weight=0.5, lr=1e-3, eval_images=32,
                          eval_steps=10),
             "quick": dict(panel=PANEL, width=64, layers_per_block=1, head_dim=16, groups=16, prediction="v_prediction",
                           **IP2P_PROBES,
                           pool=600, steps=400,
                           batch_copy=16, batch_generate=8, generate_weight=0.5, lr=1e-3, eval_images=16,
                           eval_steps=10)}))

register(WorldModel(
    "region_t5", region_t5.build_region_t5, depends=(), version=1, cost=0,
    description="tiny T5 encoder over the world's vocabulary (random, frozen): the region predictor's instructions",
    configs={size: dict(d_model=48, d_kv=16, d_ff=96, num_layers=2, num_heads=3, relative_attention_num_buckets=16,
                        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
             for size in ("full", "quick")}))
