"""The built-in world models (registered on import): autoencoder, world CLIP, FLUX.1-Kontext-like backbone.

Settings are per world size: ``full`` (the yardstick and the demo; a few minutes on 2 CPU cores) and ``quick`` (the
CI-sized world of the tests). Changing a value changes the model's cache key, so the next build redoes that model
and the models depending on it.
"""

from __future__ import annotations

from training.world import autoencoder, clip, flux_kontext
from training.world.registry import WorldModel, register

PANEL = 64  # world panel side in pixels: 16 x 16 cells, an 8 x 8 latent, 4 x 4 FLUX tokens

register(WorldModel(
    "autoencoder", autoencoder.build, depends=(), version=1,
    description="TAESD-architecture autoencoder (f=8, 16 latent channels): set encoder, trained decoder",
    configs={"full": dict(panel=PANEL, decoder_width=32, pool=2000, steps=1200, batch=32, lr=3e-3),
             "quick": dict(panel=PANEL, decoder_width=32, pool=1000, steps=400, batch=32, lr=3e-3)}))

register(WorldModel(
    "clip", lambda ctx: clip.train_clip(ctx.config, ctx.seed, ctx.folder), depends=(), version=1,
    description="tiny CLIP (vision + text) trained contrastively on world images and procedural captions",
    configs={"full": dict(width=64, vision_layers=3, text_layers=2, heads=2, projection_dim=32, pool=2000,
                          steps=600, batch=64, lr=2e-3),
             "quick": dict(width=64, vision_layers=3, text_layers=2, heads=2, projection_dim=32, pool=600,
                           steps=200, batch=64, lr=2e-3)}))

register(WorldModel(
    "flux_kontext", flux_kontext.build, depends=("autoencoder",), version=1,
    description="FLUX.1-Kontext-like transformer pretrained to copy (reference grid = target) and draw world grids",
    configs={"full": dict(panel=PANEL, heads=3, double_blocks=2, single_blocks=2, pool=2000, steps=1000,
                          batch_copy=8, batch_generate=2, generate_weight=0.25, generate_from=0.5, lr=2e-3,
                          eval_grids=16, eval_steps=8),
             "quick": dict(panel=PANEL, heads=3, double_blocks=2, single_blocks=2, pool=1000, steps=600,
                           batch_copy=8, batch_generate=2, generate_weight=0.25, generate_from=0.5, lr=2e-3,
                           eval_grids=8, eval_steps=8)}))
