"""bench.clip_flip_probe: mirror groups are a scene with its true mirrors and their own captions, batches never split
a group, and the command line trains a probe CLIP and reports every family's edit visibility (fixed seed, a few
steps: an untrained-ish tower already sees an invert and barely a flip; docs/analogy_world_measurements.md, "What its
router tells apart")."""

from __future__ import annotations

import json

import pytest
import torch

import bench.clip_flip_probe as probe
from training.world import clip
from training.world import scenes as world_def


def test_a_mirror_group_is_a_scene_its_two_mirrors_and_their_captions():
    images, captions = probe.mirror_pool(2)
    assert images.shape[0] == len(captions) == 2 * probe.GROUP
    plain, h, v = images[:3]
    assert not torch.equal(plain, h) and not torch.equal(plain, v)  # the scenes are not symmetric
    assert torch.equal(h, plain.flip(1)) and torch.equal(v, plain.flip(0))  # (H, W, 3): columns, then rows
    scene = world_def.sample_scene(world_def.scene_rng("train", 0))
    assert captions[:3] == [world_def.describe(scene), world_def.FAMILIES["hflip"].caption(scene),
                            world_def.FAMILIES["vflip"].caption(scene)]
    tokens = clip.tokenize_pool(clip.make_tokenizer(), captions)  # every word in the world vocabulary
    assert tokens.input_ids.shape[0] == len(captions)


def test_a_scene_whose_mirror_reads_as_itself_is_skipped():
    scenes = [world_def.sample_scene(world_def.scene_rng("train", i)) for i in range(40)]
    ambiguous = [world_def.describe(s) for s in scenes
                 if world_def.describe(s) in (world_def.FAMILIES[m].caption(s) for m in probe.MIRRORS)]
    assert ambiguous, "the first 40 training scenes hold one on a mirror's axis"
    _, captions = probe.mirror_pool(40)
    groups = [captions[i:i + probe.GROUP] for i in range(0, len(captions), probe.GROUP)]
    assert len(groups) == 40 and all(len(set(g)) == probe.GROUP for g in groups)
    assert not set(ambiguous) & {g[0] for g in groups}


def test_batches_hold_whole_groups_and_change_from_step_to_step():
    draw = probe.group_batches(64, groups=200)
    gen = torch.Generator().manual_seed(0)
    first, second = draw(gen), draw(gen)
    assert len(first) == 63  # 21 whole groups of 3
    rows = first.view(-1, probe.GROUP)
    assert torch.equal(rows - rows[:, :1], torch.arange(probe.GROUP).expand_as(rows))
    assert (rows[:, 0] % probe.GROUP == 0).all() and rows.max() < 600
    assert not torch.equal(first, second)
    with pytest.raises(ValueError, match="whole groups"):
        probe.group_batches(2, groups=10)


def test_fit_clip_trains_on_the_indices_it_is_given():
    tokenizer = clip.make_tokenizer()
    cfg = dict(width=32, vision_layers=1, text_layers=1, heads=2, projection_dim=16, steps=2, batch=6, lr=1e-3)
    images, captions = probe.mirror_pool(4)
    pixels, tokens = clip.resized_pool(images), clip.tokenize_pool(tokenizer, captions)
    seen = []

    def batches(gen):
        pick = probe.group_batches(6, 4)(gen)
        seen.append(pick)
        return pick

    model = clip.make_model(cfg, len(tokenizer), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = clip.fit_clip(model, pixels, tokens, cfg, seed=0, batches=batches)
    assert len(seen) == cfg["steps"] and loss > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("vision_model.") for k in changed) and any(k.startswith("text_model.") for k in changed)


def test_fit_clip_by_default_draws_the_world_clips_batches():
    """The world CLIP's build goes through fit_clip: its default batches are randperm(pool)[:batch] each step, drawn
    from one generator seeded with the build's seed (a changed draw would change every world's CLIP)."""
    tokenizer = clip.make_tokenizer()
    cfg = dict(width=32, vision_layers=1, text_layers=1, heads=2, projection_dim=16, steps=3, batch=5, lr=1e-3)
    images, captions = clip.world_pool("train", 12)
    pixels, tokens = clip.resized_pool(images), clip.tokenize_pool(tokenizer, captions)
    default, by_hand = clip.make_model(cfg, len(tokenizer), 0), clip.make_model(cfg, len(tokenizer), 0)
    start = {k: v.clone() for k, v in default.state_dict().items()}
    clip.fit_clip(default, pixels, tokens, cfg, seed=7)
    clip.fit_clip(by_hand, pixels, tokens, cfg, seed=7, batches=lambda gen: torch.randperm(12, generator=gen)[:5])
    assert any(not torch.equal(v, start[k]) for k, v in default.state_dict().items())
    for key, value in default.state_dict().items():
        assert torch.equal(value, by_hand.state_dict()[key]), key


def test_position_std_redraws_the_vision_position_embeddings_only():
    cfg = dict(width=32, vision_layers=1, text_layers=1, heads=2, projection_dim=16)
    kept, redrawn = probe.probe_model(cfg, 50, 0, 0.0), probe.probe_model(cfg, 50, 0, 1.0)
    assert all(torch.equal(v, clip.make_model(cfg, 50, 0).state_dict()[k]) for k, v in kept.state_dict().items())
    position = "vision_model.embeddings.position_embedding.weight"
    assert float(redrawn.state_dict()[position].std()) == pytest.approx(1.0, abs=0.1)
    assert float(kept.state_dict()[position].std()) < 0.1
    assert [k for k, v in redrawn.state_dict().items() if not torch.equal(v, kept.state_dict()[k])] == [position]
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="standard deviation"):
            probe.probe_model(cfg, 50, 0, bad)


def test_the_command_reports_every_familys_visibility(tmp_path, monkeypatch):
    pools = []
    plain_pool = probe.plain_pool
    monkeypatch.setattr(probe, "plain_pool", lambda split, count: pools.append(split) or plain_pool(split, count))
    report = probe.main(["--steps", "2", "--mirror-negatives", "--examples", "2", "--json", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == report
    assert set(report["edit_visibility"]) == set(world_def.families("all"))
    assert report["config"]["steps"] == 2 and report["mirror_negatives"] and report["examples"] == 2
    assert report["batch_images"] == 63 and report["pool_images"] == 600 and report["settings"] == "quick"
    seen = report["edit_visibility"]
    assert seen["invert"] > 10 * seen["hflip"], seen  # what the world CLIP's recipe sees: colour, not layout
    assert 0 <= report["retrieval_top1_heldout_64"] <= 1
    assert pools == ["heldout"], "the plain retrieval figure is measured on held-out scenes"
    with pytest.raises(SystemExit, match="at least 2"):
        probe.main(["--examples", "1"])
    with pytest.raises(SystemExit, match="standard deviation"):
        probe.main(["--position-std", "nan"])
    world_recipe = probe.main(["--steps", "1", "--examples", "2"])
    assert not world_recipe["mirror_negatives"] and world_recipe["batch_images"] == 64
    assert set(world_recipe["edit_visibility"]) == set(world_def.families("all"))


def test_save_writes_the_trained_probe_clip_as_a_world_clip_folder(tmp_path):
    """--save DIR: the CLIP the report measured, as a world CLIP folder (CLIPModel, tokenizer, vision tower) that the
    region trainer's FrozenClip reads; an existing folder is refused, never overwritten."""
    from transformers import CLIPModel

    from analogy_core.regions import FrozenClip

    folder = tmp_path / "probe_clip"
    report = probe.main(["--steps", "2", "--mirror-negatives", "--examples", "2", "--save", str(folder)])
    assert report["saved"] == str(folder) and json.loads((folder / "probe.json").read_text()) == report
    saved = CLIPModel.from_pretrained(folder, local_files_only=True)
    untrained = clip.make_model(report["config"], saved.config.text_config.vocab_size, 0)
    assert any(not torch.equal(v, untrained.state_dict()[k]) for k, v in saved.state_dict().items())  # trained
    assert probe.visibility(saved, 2) == report["edit_visibility"]          # the very CLIP the report measured
    assert (folder / clip.VISION_FOLDER / "config.json").is_file()
    frozen = FrozenClip.from_folder(folder)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in frozen.model.state_dict().items())
    with pytest.raises(SystemExit, match="exists"):
        probe.main(["--steps", "1", "--examples", "2", "--save", str(folder)])
