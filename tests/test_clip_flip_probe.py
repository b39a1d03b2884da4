"""bench.clip_flip_probe: mirror groups are a scene with its true mirrors and their own captions, batches never split
a group, and the command line trains a probe CLIP and reports every family's edit visibility (fixed seed, a few
steps: an untrained-ish tower already sees an invert and barely a flip, README "What its router tells apart")."""

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
    assert len(set(captions[:3])) == 3, captions[:3]  # layout is what the captions say apart
    assert captions[0] == world_def.describe(world_def.sample_scene(world_def.scene_rng("train", 0)))
    tokens = clip.tokenize_pool(clip.make_tokenizer(), captions)  # every word in the world vocabulary
    assert tokens.input_ids.shape[0] == len(captions)


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


def test_the_command_reports_every_familys_visibility(tmp_path):
    report = probe.main(["--steps", "2", "--mirror-negatives", "--examples", "2", "--json", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == report
    assert set(report["edit_visibility"]) == set(world_def.families("all"))
    assert report["config"]["steps"] == 2 and report["mirror_negatives"] and report["examples"] == 2
    seen = report["edit_visibility"]
    assert seen["invert"] > 10 * seen["hflip"], seen  # what the world CLIP's recipe sees: colour, not layout
    assert 0 <= report["retrieval_top1_heldout_64"] <= 1
    with pytest.raises(SystemExit, match="at least 2"):
        probe.main(["--examples", "1"])
    with pytest.raises(ValueError, match="standard deviation"):
        probe.train_probe(dict(report["config"]), 0, False, -1.0)
