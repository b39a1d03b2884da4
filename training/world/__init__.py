"""The analogy world's pretrained models: built by the pack's own code, deterministic from a seed, cached.

    python -m training.world build [--quick] [--seed N]

* :mod:`training.world.registry` — the world-model registry (:func:`register`, :class:`WorldModel`) and the cached
  world folder (:func:`build_world`, :func:`open_world`).
* :mod:`training.world.models` — the built-in models: ``autoencoder`` (TAESD architecture), ``clip`` (the world
  CLIP), ``flux_kontext`` (FLUX.1-Kontext-like backbone, LoRWeB's), ``instruct_pix2pix`` (SD1.5-architecture UNet,
  LoRA of Change's), ``flux_dev`` (FLUX.1-dev-like backbone, Edit Transfer's), ``region_t5`` (the region
  predictor's instruction encoder); each pretrained only to draw and copy (:mod:`training.world.schedule` holds the
  shared loop).
* :mod:`training.world.data` — the ``world`` data spec of the trainers; :mod:`training.world.presets` — LoRWeB's
  world settings and :func:`~training.world.presets.run_trainer`, through which every method's world run goes;
  :mod:`training.world.evaluate` — sampling and errors for the yardstick; ``loc_eval`` and ``edit_transfer_eval``
  (and :mod:`training.region_world`) — the other methods' rows of ``bench.analogy_world``.
"""

from training.world.registry import WORLD_MODELS, BuildContext, World, WorldModel, build_world, open_world, register

__all__ = ["WORLD_MODELS", "BuildContext", "World", "WorldModel", "build_world", "open_world", "register"]
from training.world import models  # noqa: E402,F401  (registers the built-in world models)
