"""The analogy world: scenes, pretrained world models, the ``world`` data and model specs, and the yardstick.

It uses the methods (``training.<method>``) and nobody in production uses it: importing it registers its data source
(:mod:`training.world.data`) and model loaders (:mod:`training.world.loaders`), which the ``python -m training.train_*``
commands do.

    python -m training.world build [--quick] [--seed N]

* :mod:`training.world.scenes` — the world itself: scenes of flat-colour cells, edit families with exact masks,
  training/held-out splits of families and scenes.
* :mod:`training.world.registry` — the world-model registry (:func:`register`, :class:`WorldModel`) and the cached
  world folder (:func:`build_world`, :func:`open_world`).
* :mod:`training.world.models` — the built-in models: ``autoencoder`` (TAESD architecture), ``clip`` (the world
  CLIP), ``flux_kontext`` (FLUX.1-Kontext-like backbone, LoRWeB's), ``instruct_pix2pix`` (SD1.5-architecture UNet,
  LoRA of Change's), ``flux_dev`` (FLUX.1-dev-like backbone, Edit Transfer's), ``region_t5`` (the region
  predictor's instruction encoder); each pretrained only to draw and copy (:mod:`training.world.schedule` holds the
  shared loop).
* :mod:`training.world.data` and :mod:`training.world.loaders` — the ``world`` data source and model specs;
  :mod:`training.world.presets` — the methods' world settings and :func:`~training.world.presets.run_trainer`,
  through which every method's world run goes; :mod:`training.world.evaluate` — sampling and errors.
* :mod:`training.world.yardstick` — every method's row of ``python -m bench.analogy_world`` and its runner.
"""

from training.world import data, loaders, models  # noqa: F401  (register the world's data source, loaders, models)
from training.world.registry import WORLD_MODELS, BuildContext, World, WorldModel, build_world, open_world, register

__all__ = ["WORLD_MODELS", "BuildContext", "World", "WorldModel", "build_world", "open_world", "register"]
