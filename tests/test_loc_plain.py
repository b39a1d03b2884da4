"""LoC's plain LoRA (``plain_lora``, training/loc/plain.py) and the ceilings of the LoC and Edit Transfer rows.

The plain LoRA is LoRA of Change's ceiling on the analogy world: one learned LoRA in H's place, trained by the LoC
trainer and written as a standard LoRA file. Checked here: a fresh one changes nothing and its factors have LoRA's
usual scale; training moves it; the file it writes is read back by the pack's LoRA reader onto the right modules
(against a hand-merged weight); the ceilings' settings are the rows' own with one family and what defines a ceiling.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from analogy_core.files import read_safetensors
from analogy_core.layouts import layout_of_diffusers_model
from analogy_core.loc import AttentionTarget, HypernetworkConfig, attention_targets, batched_lora
from analogy_core.lora import LoRA, LoRALayer
from analogy_core.lora_io import load_lora_file, save_lora_file
from training.config import build_config
from training.loc.config import PLAIN_LORA_FILE, PRESETS, LoCConfig
from training.loc.ip2p import load_ip2p
from training.loc.plain import PlainLoRA, load_plain_lora
from training.loc.task import edit_images
from training.world import evaluate as ev
from training.world.registry import World
from training.world.yardstick import ceiling, edit_transfer, loc
from training.world.yardstick.common import Ceiling
from training.world.yardstick.runner import METHODS

TARGETS = (AttentionTarget("blocks.0.attn1", ((6, 6), (6, 6), (6, 6), (6, 6))),
           AttentionTarget("blocks.0.attn2", ((6, 6), (6, 4), (6, 4), (6, 6))))


def plain(seed: int = 0) -> PlainLoRA:
    torch.manual_seed(seed)
    return PlainLoRA(HypernetworkConfig(targets=TARGETS, token_width=4, width=8, heads=2, rank=3, ffn=8))


def test_a_fresh_plain_lora_is_zero_with_lora_scaled_down_factors():
    model = plain()
    factors = model(torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    assert set(factors.layers) == {p for t in TARGETS for p in t.projection_paths()}
    assert factors.batch_size == 2 and torch.equal(factors.update_norm(), torch.zeros(2))
    for path, (down, up) in factors.layers.items():
        assert down.shape[1:] == (3, down.shape[2]) and up.shape[1:] == (up.shape[1], 3)
        bound = 1 / math.sqrt(down.shape[2])  # kaiming-uniform(a=√5): U(±1/√in), as a fresh LoRA's A
        assert down.abs().max() <= bound and down.abs().max() > bound / 4, path


def test_the_same_lora_for_every_pair_and_its_norm_against_the_merged_update():
    model = plain()
    with torch.no_grad():
        for up in model.up:
            up.normal_()
    first = model(torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    second = model(torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    assert first.update_norm()[0] > 0  # the test below compares something
    for path in first.layers:
        for k in range(2):
            assert torch.equal(first.layers[path][k], second.layers[path][k])
    reference = math.sqrt(sum(float((up[0] @ down[0]).detach().pow(2).sum()) for down, up in first.layers.values()))
    assert torch.allclose(first.update_norm(), torch.full((3,), reference), rtol=1e-5)


def test_the_plain_lora_is_generated_without_running_the_image_encoder():
    """The trainer gives a model that does not read the pair blank tokens and never calls the encoder: the factors
    are those the encoded pair gives. A hypernetwork still reads the encoded pair."""
    from training.loc.task import generate_factors

    class Encoder:
        calls = 0

        def encode(self, a, a_prime):
            Encoder.calls += 1
            tokens = {role: x.mean(dim=(1, 2))[:, None, :].expand(-1, 5, -1) for role, x in (("a", a),
                                                                                                ("a_prime", a_prime))}
            return SimpleNamespace(patch_tokens=tokens)

    model, a, a_prime = plain(), torch.rand(3, 8, 8, 4), torch.rand(3, 8, 8, 4)
    with torch.no_grad():
        for up in model.up:
            up.normal_()
    factors = generate_factors(model, Encoder(), a, a_prime, "cpu")
    assert Encoder.calls == 0 and factors.batch_size == 3 and factors.update_norm()[0] > 0
    want = model(torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    for path, (down, up) in want.layers.items():
        assert torch.equal(factors.layers[path][0], down) and torch.equal(factors.layers[path][1], up)

    class Reader(torch.nn.Module):  # a model that reads the pair (as H does)
        def forward(self, tokens_a, tokens_a_prime):
            return tokens_a_prime - tokens_a

    seen = generate_factors(Reader(), Encoder(), a, a_prime, "cpu")
    assert Encoder.calls == 1 and seen.abs().sum() > 0


def test_full_finetune_refuses_what_needs_a_lora_or_a_hypernetwork():
    ok = ["full_finetune=true", "lora_reverse=false", "random_exchange=false"]
    build_config(LoCConfig, PRESETS, "tiny", overrides=ok)
    for bad, says in ((["lora_reverse=true"], "lora_reverse"), (["random_exchange=true"], "random_exchange"),
                      (["plain_lora=true"], "choose one"), (["init_from=h.safetensors"], "init_from")):
        with pytest.raises(ValueError, match=says):
            build_config(LoCConfig, PRESETS, "tiny", overrides=ok + bad)


def test_a_full_finetune_run_trains_and_writes_the_unet(tmp_path, monkeypatch):
    """LoC's full ceiling run (3 tiny steps): no LoRA, no image encoder, every UNet weight trains with eq. (6), the
    UNet is written and loads back through the yardstick's checked loader; its samples are drawn."""
    from training.loc import task
    from training.loc.config import UNET_FILE
    from training.world.yardstick.common import load_weights

    def no_encoder(*args):
        raise AssertionError("a full fine-tune reads no pair through H: it must not load an image encoder")

    monkeypatch.setattr(task, "load_query_encoder", no_encoder)
    out = tmp_path / "full"
    history = task.main(["--preset", "tiny", "--output-dir", str(out), "--max-steps", "3", "--set", "report_to=none",
                         "--set", "sample_every=3", "--set", "full_finetune=true", "--set", "lora_reverse=false",
                         "--set", "random_exchange=false", "--set", "learning_rate=1e-2"])
    assert len(history["losses"]) == 3 and not (out / "loc_hypernetwork.safetensors").exists()
    assert list((out / "samples").glob("*.png")), "the full fine-tune's samples (A | A′ | B | its B′) were not drawn"
    tensors, meta = read_safetensors(out / UNET_FILE)
    assert meta["analogy.kind"] == "loc_unet"
    fresh = load_ip2p("tiny").unet
    reference = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert set(tensors) == set(reference)
    moved = [k for k in reference if not torch.equal(tensors[k], reference[k].float())]
    assert len(moved) > len(reference) // 2 and any(k.startswith("conv_in") for k in moved)  # beyond attention
    load_weights(fresh, out / UNET_FILE)
    assert all(torch.equal(v.float(), tensors[k]) for k, v in fresh.state_dict().items())


def test_an_attention_scoped_full_finetune_trains_only_the_projections_h_patches(tmp_path):
    """``finetune_scope=attention``: the full-rank counterpart of LoC's LoRA — exactly the q/k/v/out weights of H's
    targets train (no bias, no conv, no norm); everything else is written back unchanged."""
    from training.loc import task
    from training.loc.config import UNET_FILE

    out = tmp_path / "attention"
    history = task.main(["--preset", "tiny", "--output-dir", str(out), "--max-steps", "2", "--set", "report_to=none",
                         "--set", "sample_every=1000", "--set", "full_finetune=true", "--set", "lora_reverse=false",
                         "--set", "random_exchange=false", "--set", "learning_rate=1e-2",
                         "--set", "finetune_scope=attention"])
    assert len(history["losses"]) == 2
    tensors, _ = read_safetensors(out / UNET_FILE)
    fresh = load_ip2p("tiny").unet
    reference = {k: v.float() for k, v in fresh.state_dict().items()}
    targets = attention_targets(layout_of_diffusers_model(fresh))
    expected = {f"{p}.weight" for t in targets for p in t.projection_paths()}
    moved = {k for k in reference if not torch.equal(tensors[k], reference[k])}
    assert moved == expected and len(expected) % 4 == 0 and expected  # every projection moved, nothing else


def test_finetune_scope_is_checked():
    ok = ["full_finetune=true", "lora_reverse=false", "random_exchange=false"]
    build_config(LoCConfig, PRESETS, "tiny", overrides=ok + ["finetune_scope=attention"])
    with pytest.raises(ValueError, match="finetune_scope must be one of"):
        build_config(LoCConfig, PRESETS, "tiny", overrides=ok + ["finetune_scope=convs"])
    with pytest.raises(ValueError, match="needs full_finetune=true"):
        build_config(LoCConfig, PRESETS, "tiny", overrides=["plain_lora=true", "finetune_scope=attention"])
    with pytest.raises(ValueError, match="not in the module"):
        from training.trainer import train_every_weight
        train_every_weight(torch.nn.Linear(2, 2), only=["bias", "nope.weight"])


def test_plain_lora_refuses_what_belongs_to_a_hypernetwork():
    for key, value in (("init_from", "h.safetensors"), ("image_encoder_learning_rate", 1e-6)):
        with pytest.raises(ValueError, match="plain_lora"):
            build_config(LoCConfig, PRESETS, "tiny", overrides=["plain_lora=true", f"{key}={value}"])
    build_config(LoCConfig, PRESETS, "tiny", overrides=["plain_lora=true"])  # alone it is fine


# -- a tiny run -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, dict]:
    from training.train_loc import main  # the command users type: it registers the world data

    out = tmp_path_factory.mktemp("plain_run")
    history = main(["--preset", "tiny", "--output-dir", str(out), "--max-steps", "3", "--set", "report_to=none",
                    "--set", "sample_every=1000", "--set", "learning_rate=1e-2", "--set", "plain_lora=true",
                    "--set", "lora_reverse=false", "--set", "random_exchange=false"])
    return out, history


def test_a_plain_run_writes_a_standard_lora_file_not_a_hypernetwork(plain_run):
    out, history = plain_run
    assert len(history["losses"]) == 3 and all(math.isfinite(v) for v in history["losses"])
    assert (out / PLAIN_LORA_FILE).is_file() and not (out / "loc_hypernetwork.safetensors").exists()
    backbone = load_ip2p("tiny")
    layout = layout_of_diffusers_model(backbone.unet)
    parsed = load_lora_file(out / PLAIN_LORA_FILE, layout)
    lora = parsed.lora
    expected = {path for target in attention_targets(layout) for path in target.projection_paths()}
    assert set(lora.layers) == expected and lora.family == "sd15"
    metadata = read_safetensors(out / PLAIN_LORA_FILE)[1]
    assert metadata["analogy.source"] == "trained" and metadata["analogy.step"] == "3"
    assert parsed.key_format == "kohya"  # the family's usual format (ComfyUI's LoraLoader reads it)
    assert any(layer.up.abs().max() > 0 for layer in lora.layers.values()), "training moved U_B away from zero"


def test_the_file_read_back_patches_the_modules_it_was_trained_for(plain_run):
    out, _ = plain_run
    backbone = load_ip2p("tiny")
    factors = load_plain_lora(out / PLAIN_LORA_FILE, layout_of_diffusers_model(backbone.unet))
    torch.manual_seed(0)
    changed = 0
    for path, (down, up) in factors.layers.items():
        module = backbone.unet.get_submodule(path)
        x = torch.randn(2, 5, module.in_features)
        with torch.no_grad(), batched_lora(backbone.unet, factors):
            patched = module(x)
        merged = F.linear(x, module.weight + up[0] @ down[0], module.bias)  # W + U_B U_A, by hand
        torch.testing.assert_close(patched, merged, rtol=1e-5, atol=1e-6)
        changed += not torch.allclose(patched, module(x))
    assert changed > 0  # the LoRA changes the projections it patches


def test_reading_a_plain_lora_file_folds_each_layers_alpha_over_rank(tmp_path):
    """A file of another trainer (alpha ≠ rank) gives the update alpha/r · up·down on the right module paths."""
    backbone = load_ip2p("tiny")
    layout = layout_of_diffusers_model(backbone.unet)
    paths = [p for t in attention_targets(layout) for p in t.projection_paths()][:3]
    torch.manual_seed(1)
    layers = {}
    for k, path in enumerate(paths):
        out_features, in_features = layout.shapes[path]
        layers[path] = LoRALayer(torch.randn(2, in_features), torch.randn(out_features, 2), scale=0.5 + k)
    save_lora_file(LoRA(layers, family="sd15"), tmp_path / "other.safetensors")
    factors = load_plain_lora(tmp_path / "other.safetensors", layout)
    assert set(factors.layers) == set(paths)
    for path, layer in layers.items():
        down, up = factors.layers[path]
        torch.testing.assert_close(up[0] @ down[0], layer.scale * layer.up @ layer.down, rtol=1e-5, atol=1e-5)


# -- the rows' ceilings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quick", [False, True])
def test_the_loc_ceiling_is_one_plain_lora_of_h_rank_taught_one_family(quick):
    row = loc.loc_settings("/w", quick)
    settings = loc.loc_ceiling_settings("/w", "hflip", quick, seed=3)
    assert settings["plain_lora"] is True and settings["rank"] == row["rank"]
    assert settings["lora_reverse"] is False and settings["random_exchange"] is False  # eq. (6) alone
    assert settings["data"] == "world:families=hflip" and settings["seed"] == 3
    assert settings["max_steps"] == row["max_steps"] == (300 if quick else 1500)
    full = loc.CEILING.full.settings(_world(), quick, "hflip", 3)
    assert full == {**loc.loc_ceiling_settings("/w", "hflip", quick, 3), "plain_lora": False, "full_finetune": True,
                    "learning_rate": 0.001}
    # a plain LoRA at its own rate: H's row rate is lower because each U_B entry sums `width` head features
    assert settings["learning_rate"] == loc.PLAIN_LORA_RATE == 1e-3 and row["learning_rate"] == 1e-4
    same = {k: v for k, v in settings.items() if k not in ("plain_lora", "lora_reverse", "random_exchange", "data",
                                                            "seed", "checkpoint_every", "sample_every",
                                                            "learning_rate")}
    assert same == {k: v for k, v in row.items() if k in same}


@pytest.mark.parametrize("row", list(edit_transfer.ROWS))
def test_an_edit_transfer_ceiling_is_the_rows_run_on_one_family(row):
    text_free = edit_transfer.ROWS[row]["text_free"]
    row_ceiling = edit_transfer.row_ceiling(row)
    settings = row_ceiling.settings(_world(), True, "invert", 2)
    assert settings == {**edit_transfer.et_settings("/w", True, text_free), "data": "world:families=invert",
                        "seed": 2}
    # the full fine-tune: the same run training every weight, at the backbone's own pretraining rate
    full = row_ceiling.full.settings(_world(), True, "invert", 2)
    assert full == {**settings, "full_finetune": True, "learning_rate": 0.002}
    assert row_ceiling.full.shared_as == f"{row_ceiling.shared_as}_full"


def test_every_lora_row_has_a_ceiling_and_the_two_samplers_share_their_runs():
    assert {name for name, m in METHODS.items() if m.ceiling is None} == {"regions"}  # no LoRA of its own
    assert all(m.ceiling.full is not None for m in METHODS.values() if m.ceiling)  # and each a full fine-tune
    shared = {name: METHODS[name].ceiling.shared_as or name for name in METHODS if METHODS[name].ceiling}
    assert shared["edit_transfer"] == shared["edit_transfer_stock_inpaint"] != shared["edit_transfer_textfree"]
    with pytest.raises(ValueError, match="cannot be overridden"):
        ceiling.parse_setting_overrides(["plain_lora=false"])


class _world:
    root = Path("/w")
    quick = True
    builds = {"flux_dev": {"key": "d", "config": {"lr": 0.002}},
              "instruct_pix2pix": {"key": "i", "config": {"lr": 0.001}}}


TINY = dict(backbone="tiny", image_encoder="tiny", resolution=32, width=32, blocks=2, heads=4, ffn=64, batch_size=2,
            sample_steps=1, report_to="none")


def test_the_loc_ceiling_end_to_end_on_the_tiny_backbone(tmp_path, monkeypatch):
    """The ceiling's path with the real trainer (a subprocess, ``plain_lora``) and the row's sampler on the tiny
    InstructPix2Pix: trained once, its LoRA file read back and sampled, cached for the next call."""
    monkeypatch.delenv(ceiling.ENV_ROOT, raising=False)
    backbone = load_ip2p("tiny")

    def settings(world, quick, family, seed):
        return {**loc.loc_ceiling_settings(world.root, family, quick, seed), **TINY, "max_steps": 2,
                "checkpoint_every": 2, "sample_every": 2}

    def sample(world, quick, folder, items, seed):
        return loc.plain_lora_b_prime(backbone, folder, items, 2, seed)

    tiny = Ceiling("training.train_loc", ("instruct_pix2pix",), settings, sample)
    world = World(tmp_path / "v2-quick-s0", True, 0, {"instruct_pix2pix": {"key": "k"}})
    items = ev.examples("invert", 2, 32)
    first = ceiling.family_ceiling("loc", tiny, world, "invert", items, 0)
    lora = first["lora"]
    assert first["cached"] is False and lora["train_steps"] == 2 and lora["kept_cells"] is None
    assert first["b_prime"].shape == (2, 32, 32, 3) and torch.isfinite(first["b_prime"]).all()
    base = edit_images(backbone, None, ev.stack(items, "b"), 2, 0)
    assert not torch.equal(first["b_prime"], base)  # the trained LoRA reached the sampler
    folder = next((world.root / "ceilings").glob("loc-invert-*"))
    assert (folder / PLAIN_LORA_FILE).is_file() and not (folder / "checkpoints").exists()
    again = ceiling.family_ceiling("loc", tiny, world, "invert", items, 0)
    assert again["cached"] is True and torch.equal(again["b_prime"], first["b_prime"])
