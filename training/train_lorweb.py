"""``python -m training.train_lorweb``: train a LoRWeB LoRA basis (the trainer: :mod:`training.lorweb`).

The command users type; the options are in :mod:`training.lorweb.config`, the loop in :mod:`training.lorweb.task`.
"""

import training.world  # noqa: F401  (registers the analogy world's ``world`` data and model specs)
from training.lorweb.task import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
