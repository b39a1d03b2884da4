"""Training configuration: defaults are the official ones, presets and overrides apply in order, typos fail."""

import pytest

from training.lorweb.config import TrainConfig, load_config


def test_official_defaults():
    cfg = TrainConfig()
    assert (cfg.num_entries, cfg.rank, cfg.key_dim) == (32, 4, 128)
    assert (cfg.batch_size, cfg.max_steps, cfg.learning_rate, cfg.weight_decay) == (6, 10_000, 1e-3, 0.05)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.mixed_precision, cfg.caption_dropout) == (0.9, 0.99, "bf16", 0.05)
    assert cfg.gradient_checkpointing and cfg.use_8bit_adam and cfg.timestep_sampling == "official"
    assert (cfg.adam_epsilon, cfg.max_grad_norm, cfg.panel_fit, cfg.caption_source) == (1e-6, 1.0, "stretch", "a")
    assert not cfg.bidirectional_analogy
    assert cfg.targets == ["transformer_blocks.*", "single_transformer_blocks.*"]


def test_precedence_and_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 50\nlearning_rate: 0.01\n")
    cfg = load_config("tiny", path, ["max_steps=7", "targets=[transformer_blocks.0.*]"])
    assert cfg.backbone == "tiny" and cfg.learning_rate == 0.01 and cfg.max_steps == 7
    assert cfg.targets == ["transformer_blocks.0.*"]
    with pytest.raises(ValueError, match="unknown config key 'max_step'"):
        load_config(None, None, ["max_step=3"])
    with pytest.raises(ValueError, match="multiple of 32"):
        load_config("tiny", None, ["grid_resolution=100"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("huge")
