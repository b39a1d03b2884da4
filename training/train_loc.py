"""``python -m training.train_loc``: train a LoRA of Change hypernetwork (the trainer: :mod:`training.loc`).

The command users type; the options are in :mod:`training.loc.config`, the loop in :mod:`training.loc.task`.
"""

import training.world  # noqa: F401  (registers the analogy world's ``world`` data and model specs)
from training.loc.task import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
