"""Training configuration: defaults are the official ones, presets and overrides apply in order, typos fail."""

import json

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


@pytest.mark.parametrize("override, message", [
    ("num_entries=abc", r"num_entries must be an integer, got 'abc' \(str\)"),
    ("max_steps=1.5", r"max_steps must be an integer, got 1\.5 \(float\)"),
    ("rank=true", r"rank must be an integer, got True \(bool\)"),
    ("learning_rate=fast", r"learning_rate must be a number"),
    ("gradient_checkpointing=3", r"gradient_checkpointing must be true or false, got 3 \(int\)"),
    ("learning_rate=-1e-3", r"learning_rate must be a finite number >= 0"),
    ("learning_rate=.nan", r"learning_rate must be a number \(finite\), got nan"),
    ("learning_rate=.inf", r"learning_rate must be a number \(finite\), got inf"),
    ("adam_beta2=1", r"adam_beta2 must be in \[0, 1\)"),
    ("weight_decay=-0.1", r"weight_decay >= 0"),
    ("key_dim=0", r"key_dim must be a positive integer"),
    ("lora_heads=0", r"lora_heads must be a positive integer"),
    ("mixing_coeffs_type=median", r"mixing_coeffs_type must be 'mean' or 'sum'"),
    ("query_mode=bogus", r"unknown query_mode 'bogus'; supported: cat-aa'b"),
    ("lora_heads=3", r"lora_heads \(3\) must divide key_dim \(16\)"),
    ("targets=transformer_blocks.0.*", r"targets must be a list of text .*got 'transformer_blocks\.0\.\*' \(str\)"),
    ("targets=[transformer_blocks.0.*, 3]", r"targets must be a list of text"),
    ("weight_decay=.inf", r"weight_decay must be a number \(finite\), got inf"),
    ("guidance=.nan", r"guidance must be a number \(finite\)"),
    # zero is not a positive integer: keep_checkpoints=0 would prune every checkpoint, batch_size=0 draws nothing
    ("keep_checkpoints=0", r"keep_checkpoints must be a positive integer, got 0"),
    ("batch_size=0", r"batch_size must be a positive integer, got 0"),
    ("max_steps=0", r"max_steps must be a positive integer, got 0"),
    # a multiple of 16 but not of 32: two 24-px panels are not a whole number of 16-px FLUX patches
    ("grid_resolution=48", r"grid_resolution must be a multiple of 32"),
    ("grid_resolution=80", r"grid_resolution must be a multiple of 32"),
])
def test_impossible_values_stop_the_config_before_anything_loads(override, message):
    """The README's promise: an unknown key or an impossible value stops the run before anything loads — these used
    to pass the config and fail in build() (after the backbone loaded) or be stored as the wrong type."""
    assert load_config("tiny", None, ["max_steps=7"]).max_steps == 7  # the same path accepts a good value
    with pytest.raises(ValueError, match=message):
        load_config("tiny", None, [override])


def test_a_yaml_file_of_the_wrong_types_is_refused_by_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("backbone: 7\n")  # --set keeps text for a text key; YAML gives an integer
    with pytest.raises(ValueError, match=r"backbone must be text, got 7 \(int\)"):
        load_config("tiny", path)
    path.write_text("targets: [transformer_blocks.0.*]\nmax_steps: 12\n")  # lists and integers as declared
    assert load_config("tiny", path).max_steps == 12
    path.write_text("report_to:\ndata: null\n")  # YAML's empty values switch a text key off, as before
    cfg = load_config("tiny", path)
    assert (cfg.report_to, cfg.data) == ("", "")  # the trainer reads "" as no tracker, as "none"


def test_a_float_key_takes_an_integer_and_every_method_config_passes_its_own_presets():
    from training.edit_transfer.config import PRESETS as ET, EditTransferConfig
    from training.loc.config import PRESETS as LOC, LoCConfig
    from training.lorweb.config import PRESETS as LORWEB
    from training.regions.config import PRESETS as REGIONS, RegionConfig
    from training.config import build_config

    assert load_config("tiny", None, ["learning_rate=1"]).learning_rate == 1
    assert load_config("tiny", None, ["learning_rate=0"]).learning_rate == 0  # the yardstick's runs at initialisation
    for cls, presets in ((TrainConfig, LORWEB), (LoCConfig, LOC), (EditTransferConfig, ET), (RegionConfig, REGIONS)):
        for name in presets:
            build_config(cls, presets, name)  # validated, no error


def test_every_world_row_and_ceiling_setting_passes_its_trainers_config():
    """The yardstick's runs hand their settings to the trainers as --set text (training/world/presets.py
    set_arguments); each must pass the trainer's config checks, the one-step runs at initialisation (learning rate
    0) included — a check too strict for them once failed only in the slow world tests."""
    from training.config import build_config
    from training.edit_transfer.config import PRESETS as ET, EditTransferConfig
    from training.loc.config import PRESETS as LOC, LoCConfig
    from training.lorweb.config import PRESETS as LORWEB
    from training.regions.config import PRESETS as REGIONS, RegionConfig
    from training.world.presets import lorweb_ceiling_settings, lorweb_settings, set_arguments
    from training.world.yardstick.edit_transfer import et_ceiling_settings, et_settings
    from training.world.yardstick.loc import loc_settings
    from training.world.yardstick.regions import REGION_WORLD, REGION_WORLD_QUICK

    world = "outputs/world/v2-quick-s0"
    runs = []
    for quick in (False, True):
        runs += [(TrainConfig, LORWEB, lorweb_settings(world, quick)),
                 (TrainConfig, LORWEB, lorweb_ceiling_settings(world, "invert", quick)),
                 (EditTransferConfig, ET, et_settings(world, quick)),
                 (EditTransferConfig, ET, et_ceiling_settings(world, "hflip", quick, 0, False)),
                 (LoCConfig, LOC, loc_settings(world, quick)),
                 (RegionConfig, REGIONS, {**(REGION_WORLD_QUICK if quick else REGION_WORLD), "mode": "text"})]
    for cls, presets, settings in runs:
        for variant in (settings, {**settings, "learning_rate": 0.0}):
            cfg = build_config(cls, presets, "tiny", overrides=set_arguments(variant)[1::2])  # the "k=v" of each --set
            assert cfg.max_steps == int(settings.get("max_steps", cfg.max_steps))


def test_the_world_region_preset_widens_the_token_mlp_to_four_times_the_world_clip():
    """The regions row and ``--preset tiny`` read the world CLIP's features through a token MLP four times their
    width (measured: at their width analogy mode missed the IoU target at one seed of three, four times as wide at
    none); a world CLIP of another width must move it."""
    from training.regions.config import PRESETS
    from training.world import models  # noqa: F401  (registers the world models)
    from training.world.registry import WORLD_MODELS

    widths = {size: config["projection_dim"] for size, config in WORLD_MODELS["clip"].configs.items()}
    assert set(widths) == {"full", "quick"}
    assert all(PRESETS["tiny"]["hidden"] == 4 * width for width in widths.values()), widths
    assert "hidden" not in PRESETS["paper"] and "hidden" not in PRESETS["pack"]  # ViT-L/14: the default, d


def test_a_good_grid_resolution_and_one_kept_checkpoint_pass():
    """The boundaries of the checks above: 1 is a positive integer and 96 a multiple of 32 (three 16-px patches
    per panel)."""
    cfg = load_config("tiny", None, ["keep_checkpoints=1", "batch_size=1", "grid_resolution=96"])
    assert (cfg.keep_checkpoints, cfg.batch_size, cfg.grid_resolution) == (1, 1, 96)


def test_the_basis_headers_config_keeps_no_local_path_of_the_data_backbone_or_encoder(tmp_path):
    """shareable_config (the config recorded in a LoRWeB basis header) keeps only the file/folder names of the data,
    backbone and query-encoder specs, so a shared basis never carries this machine's paths; model names stay."""
    from training.lorweb.task import shareable_config

    backbone, encoder = tmp_path / "models" / "flux", tmp_path / "models" / "clip"
    cfg = load_config("tiny", None, [f"data=quads:{tmp_path}/d/quads.jsonl", "max_steps=7"])
    cfg.backbone, cfg.query_encoder = str(backbone), f"open_clip:ViT-L-14:{encoder}"
    assert str(tmp_path) in cfg.data, "the config under test holds a local path"
    shared = shareable_config(cfg)
    assert (shared["data"], shared["backbone"], shared["query_encoder"]) == (
        "quads:quads.jsonl", "flux", "open_clip:ViT-L-14:clip")
    assert str(tmp_path) not in json.dumps(shared) and "output_dir" not in shared
    assert shared["max_steps"] == 7
    assert shareable_config(load_config("tiny", None, ["data=world"]))["data"] == "world"



TRAINERS = ("lorweb", "loc", "edit_transfer", "regions")


def _build(trainer: str, overrides: list[str]):
    from training.config import build_config
    from training.edit_transfer import config as edit_transfer
    from training.loc import config as loc
    from training.regions import config as regions

    if trainer == "lorweb":
        return load_config("tiny", None, overrides)
    if trainer == "loc":
        return build_config(loc.LoCConfig, loc.PRESETS, "tiny", None, overrides)
    if trainer == "edit_transfer":
        return build_config(edit_transfer.EditTransferConfig, edit_transfer.PRESETS, "tiny", None, overrides)
    return build_config(regions.RegionConfig, regions.PRESETS, None, None, ["data=jsonl:x", *overrides])


# every trainer's shared settings (training.config.CommonConfig): the last good value, the first bad one
COMMON_LIMITS = [
    ("max_grad_norm=0", "max_grad_norm=-0.1", r"max_grad_norm must be >= 0 \(0 = no clipping\)"),
    ("adam_beta1=0", "adam_beta1=1", r"adam_beta1 must be in \[0, 1\)"),
    ("adam_beta2=0.999", "adam_beta2=-0.1", r"adam_beta2 must be in \[0, 1\)"),
    ("adam_epsilon=1e-12", "adam_epsilon=0", r"adam_epsilon must be > 0"),
    ("weight_decay=0", "weight_decay=-1e-4", r"weight_decay >= 0"),
    ("learning_rate=0", "learning_rate=-1e-6", r"learning_rate must be a finite number >= 0"),
    *[(f"{key}=1", f"{key}=0", rf"{key} must be a positive integer, got 0")
      for key in ("batch_size", "gradient_accumulation_steps", "checkpoint_every", "sample_every", "log_every",
                  "keep_checkpoints")],
]

# each trainer's own settings
OWN_LIMITS = [
    # caption dropout is a probability: 1 (every caption dropped) is one, beyond it is not
    ("lorweb", "caption_dropout=1", "caption_dropout=1.01", r"caption_dropout must be in \[0, 1\]"),
    ("edit_transfer", "caption_dropout=1", "caption_dropout=-0.01", r"caption_dropout must be in \[0, 1\]"),
    # an EMA decay of 1 would never move the averaged weights off their start
    ("edit_transfer", "ema_decay=0.999", "ema_decay=1", r"ema_decay must be in \[0, 1\)"),
    ("edit_transfer", "t5_length=4096", "t5_length=4097", r"t5_length must be an integer in 1\.\.4096"),
    ("edit_transfer", "lora_alpha=0.5", "lora_alpha=0", r"lora_alpha positive"),
    ("lorweb", "rank=1", "rank=0", r"rank must be a positive integer, got 0"),
    # a full fine-tune has no basis, so the basis' heads need not divide its key width
    ("lorweb", "full_finetune=true,lora_heads=3", "lora_heads=3", r"lora_heads \(3\) must divide key_dim"),
    ("lorweb", "num_entries=1", "num_entries=0", r"num_entries must be a positive integer, got 0"),
    ("loc", "update_bound=1000", "update_bound=1000.5", r"update_bound must be 0 \(unbounded\) or a ratio"),
    ("loc", "x0_weight_max=0.01", "x0_weight_max=0", r"x0_weight_max must be positive"),
    ("loc", "image_encoder_learning_rate=0", "image_encoder_learning_rate=-1e-5",
     r"image_encoder_learning_rate must be >= 0"),
    *[("loc", f"{key}=1", f"{key}=1.01", rf"{key} must be in \[0, 1\]")
      for key in ("exchange_probability", "flip_probability", "text_dropout")],
    *[("loc", f"{key}=0", f"{key}=-0.01", rf"{key} must be in \[0, 1\]")
      for key in ("exchange_probability", "flip_probability", "text_dropout")],
    *[("loc", f"{key}=1", f"{key}=0", rf"{key} must be a positive integer, got 0")
      for key in ("rank", "blocks", "sample_steps")],
    # H's update bound bounds what H generates: the ceilings (no H) have nothing to bound
    ("loc", "update_bound=0,full_finetune=true,lora_reverse=false,random_exchange=false",
     "update_bound=2,full_finetune=true,lora_reverse=false,random_exchange=false", r"update_bound bounds the updates"),
    ("loc", "update_bound=0,plain_lora=true", "update_bound=2,plain_lora=true", r"update_bound bounds the updates"),
    # mode both reads instructions and pairs of every item: only the world's data has both
    ("regions", "mode=both,data=world", "mode=both", r"mode both needs data that has instructions and pairs"),
    *[("regions", f"{key}=0", f"{key}=-0.01", rf"{key} must be a number >= 0")
      for key in ("alpha", "beta", "lambda_g", "lambda_d", "lambda_s", "mask_weight", "analogy_weight")],
    ("regions", "diff_tolerance=0", "diff_tolerance=1", r"diff_tolerance must be in \[0, 1\)"),
    ("regions", "threshold=0.99", "threshold=1", r"threshold in \(0, 1\)"),
    ("regions", "threshold=0.01", "threshold=0", r"threshold in \(0, 1\)"),
    ("regions", "resolution=8", "resolution=7", r"resolution must be at least 8 px"),
]


@pytest.mark.parametrize("trainer, good, bad, message",
                         [(t, *limit) for t in TRAINERS for limit in COMMON_LIMITS] + OWN_LIMITS)
def test_each_trainers_limits_take_the_boundary_and_refuse_beyond_it(trainer, good, bad, message):
    """The last good value passes (and is the value the config holds) and the first bad one is refused with its
    message, per trainer; ``good`` and ``bad`` may set several keys (comma-separated)."""
    cfg = _build(trainer, good.split(","))
    for key, value in (item.split("=") for item in good.split(",")):
        held = getattr(cfg, key)
        assert held == (value == "true" if isinstance(held, bool) else type(held)(value)), (key, held)
    with pytest.raises(ValueError, match=message):
        _build(trainer, bad.split(","))
