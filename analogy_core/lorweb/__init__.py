"""LoRWeB (LoRA basis + router): the basis file (:mod:`.basis`, :mod:`.files`), the layer that mixes it in training
(:mod:`.layer`), the exact rank-N·r mixed LoRA (:mod:`.mix`) and the mixing settings read from basis files and the
official ``config.yaml`` (:mod:`.settings`)."""
