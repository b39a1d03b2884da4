"""``python -m training.train_edit_transfer``: train an Edit Transfer LoRA (the trainer: :mod:`training.edit_transfer`).

The command users type; the options are in :mod:`training.edit_transfer.config`, the loop in :mod:`training.edit_transfer.task`.
"""

import training.world  # noqa: F401  (registers the analogy world's ``world`` data and model specs)
from training.edit_transfer.task import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
