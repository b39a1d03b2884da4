"""``python -m training.train_region``: train the learnable-region predictor (the trainer: :mod:`training.regions`).

The command users type; the options are in :mod:`training.regions.config`, the loop in :mod:`training.regions.task`.
"""

import training.world  # noqa: F401  (registers the analogy world's ``world`` data and model specs)
from training.regions.task import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
