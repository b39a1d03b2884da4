"""Learnable-region training: config and presets (:mod:`.config`), data adapter and its JSONL formats (:mod:`.data`),
the task (:mod:`.task`), its frozen encoders (:mod:`.models`), the offline caption step (:mod:`.captions`).

    python -m training.train_region --preset tiny
"""
