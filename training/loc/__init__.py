"""LoRA of Change training: config and presets (:mod:`.config`), data adapter (:mod:`.data`), the task (:mod:`.task`),
its frozen InstructPix2Pix backbone (:mod:`.ip2p`).

    python -m training.train_loc --preset tiny
"""
