"""Edit Transfer training: config and presets (:mod:`.config`), data adapter (:mod:`.data`), the task (:mod:`.task`).

    python -m training.train_edit_transfer --preset tiny
"""
