"""The analogy world's pretrained models: built by the pack's own code, deterministic from a seed, cached.

    python -m training.world build [--quick] [--seed N]

* :mod:`training.world.registry` — the world-model registry (:func:`register`, :class:`WorldModel`) and the cached
  world folder (:func:`build_world`, :func:`open_world`).
* :mod:`training.world.models` — the built-in models: ``autoencoder`` (TAESD architecture), ``clip`` (the world
  CLIP), ``flux_kontext`` (FLUX.1-Kontext-like backbone).
* :mod:`training.world.data` — the ``world`` data spec of the trainers; :mod:`training.world.presets` — the settings
  LoRWeB trains with on the world; :mod:`training.world.evaluate` — sampling and errors for the yardstick.
"""

from training.world.registry import WORLD_MODELS, BuildContext, World, WorldModel, build_world, open_world, register

__all__ = ["WORLD_MODELS", "BuildContext", "World", "WorldModel", "build_world", "open_world", "register"]
from training.world import models  # noqa: E402,F401  (registers the built-in world models)
