"""Every registered world builder runs end to end on a two-step config (dependencies first) and writes what its
loader reads (the backbone builders load their result back with the trainers' loaders to measure copying). The
suite's quick world only builds LoRWeB's models; this keeps the others (InstructPix2Pix-like, FLUX.1-dev-like,
region T5) from rotting between full bench runs. Their quality is the yardstick's business."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from training.world.registry import WORLD_MODELS, BuildContext, build_order

SHRINK = {"steps": 2, "pool": 8, "batch": 4, "batch_copy": 2, "batch_complete": 1, "batch_generate": 1,
          "eval_grids": 2, "eval_images": 2, "eval_steps": 2}


def shrunk(config: dict) -> dict:
    return {k: SHRINK.get(k, v) for k, v in config.items()}


def finite_numbers(value) -> bool:
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def hand_set_autoencoder(shift: float | None = None, scale: float | None = None):
    """The world autoencoder with its hand-set weights (what its build writes), optionally a latent shift and scale."""
    from training.world.autoencoder import build_autoencoder, initialise

    ae = build_autoencoder()
    initialise(ae, 0)
    if shift is not None:
        ae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return ae


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-builders")
    out = {}
    for name in build_order(list(WORLD_MODELS)):
        model = WORLD_MODELS[name]
        folder = root / name
        folder.mkdir()
        metrics = model.build(BuildContext(name, folder, shrunk(model.configs["quick"]), 0, True,
                                           {d: root / d for d in model.depends}))
        out[name] = (folder, metrics)
    return out


@pytest.mark.parametrize("name", sorted(WORLD_MODELS))
def test_builder_runs_and_reports_finite_metrics(built, name):
    folder, metrics = built[name]
    json.dumps(metrics)
    assert finite_numbers(metrics), metrics
    assert any(folder.iterdir()), f"{name} wrote nothing"


def test_world_pretraining_rate_warms_up_linearly_then_decays_to_five_percent():
    """warmup_cosine over 100 steps (5 warm-up steps): the rate factor is (step + 1) / 5 for the first five steps (the
    first step already learns), 1 at the end of the warm-up, then a cosine down to 0.05 (written out here)."""
    import torch

    from training.world.schedule import warmup_cosine

    optimiser = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimiser, 100)
    rates = []
    for _ in range(100):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    assert rates[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert rates[52] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert rates[-1] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert all(a >= b for a, b in itertools.pairwise(rates[4:])), "no rise after the warm-up"


def test_the_world_autoencoders_model_latents_are_shifted_then_scaled():
    """``CellCodec.model_latents`` gives the latents the world's transformers train on, diffusers' convention:
    (z − shift_factor) · scaling_factor, with a shift and a scale that change them (the order then matters)."""
    import torch

    from training.world.autoencoder import CellCodec

    ae = hand_set_autoencoder(shift=0.3, scale=2.5)
    codec = CellCodec(ae)
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latents
    got = codec.model_latents(images)
    assert (got - z).abs().max() > 0.1, "shift and scale must change the latents, or this checks nothing"
    torch.testing.assert_close(got, (z - 0.3) * 2.5, rtol=1e-5, atol=1e-4)


def test_the_kontext_completion_objective_keeps_three_panels_and_draws_the_fourth():
    """``completion_grids``: the target grid is [s1 s2; s3 s4], its reference [s1 s2; s3 s3] (LoRWeB's layout), each
    the grid of those panels (``grid_tokens``), so the two differ in the bottom-right panel only."""
    import torch

    from training.world.flux_kontext import completion_grids, grid_tokens

    panels = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1, 2, 3], [4, 3, 1, 0]])
    target, reference = completion_grids(panels, index)
    torch.testing.assert_close(target, grid_tokens(panels, index))
    torch.testing.assert_close(reference, grid_tokens(panels, torch.tensor([[0, 1, 2, 2], [4, 3, 1, 1]])))
    assert not torch.equal(target, reference)
    assert torch.equal(index, torch.tensor([[0, 1, 2, 3], [4, 3, 1, 0]])), "the index is not changed in place"


def test_the_world_clips_pictures_are_what_clips_image_processor_gives():
    """``normalise(resized_pool(x))``, the world CLIP's input done in two steps, equals CLIPImageProcessor's whole
    pipeline (resize, crop, rescale, CLIP's mean and std) on the same uint8 pictures."""
    import numpy as np
    import torch
    from transformers import CLIPImageProcessor

    from training.world.clip import normalise, resized_pool

    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    ours = normalise(resized_pool(images))
    arrays = list((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    theirs = processor(images=[np.asarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02)


def test_grid_tokens_are_the_packed_latents_of_the_grid_image():
    """``grid_tokens`` (the Kontext-like and FLUX.1-dev-like pretraining grids, built from panel latents) equals
    encoding the 2 x 2 grid image [s1 s2; s3 s4] with the world autoencoder and packing it, panel for panel."""
    import torch

    from training.backbone import pack
    from training.world.autoencoder import CellCodec
    from training.world.flux_kontext import grid_tokens

    codec = CellCodec(hand_set_autoencoder())
    panels = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    grid = torch.cat([torch.cat([panels[0], panels[1]], 1), torch.cat([panels[2], panels[3]], 1)], 0)[None]
    tokens = grid_tokens(codec.model_latents(panels), torch.tensor([[0, 1, 2, 3]]))
    torch.testing.assert_close(tokens, pack(codec.model_latents(grid)), rtol=1e-5, atol=1e-5)
    swapped = grid_tokens(codec.model_latents(panels), torch.tensor([[0, 1, 3, 2]]))
    assert not torch.allclose(swapped, tokens, atol=1e-3), "the panels differ, so their order shows"


def test_kontext_reference_tokens_carry_index_1_in_pretraining_and_in_the_yardsticks_sampler():
    """FLUX.1-Kontext marks context tokens with index 1 in the first id coordinate: the world's Kontext pretraining
    (``velocity``) and the yardstick's sampler (``sample_grids``) give the target ids (0, row, col) and the reference
    ids (1, row, col), as the LoRWeB trainer does."""
    import torch

    from training.backbone import token_ids
    from training.world import evaluate
    from training.world.flux_kontext import velocity

    seen = []

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, hidden_states, img_ids, **kwargs):
            seen.append(img_ids.clone())
            return (hidden_states * 0,)

    side, tokens = 4, 4
    want = torch.cat([token_ids(side, side, 0), token_ids(side, side, 1)])
    x = torch.zeros(1, tokens, 8)
    velocity(Transformer(), x, x.clone(), torch.ones(1), torch.zeros(1, 2, 8), torch.zeros(1, 8), torch.ones(1), side)
    assert torch.equal(seen[-1], want)

    class Backbone:
        transformer, vae_factor = Transformer(), 8

        def encode_images(self, images):
            return torch.zeros(len(images), tokens, 8)

        def encode_prompts(self, prompts, device):
            return torch.zeros(len(prompts), 2, 8), torch.zeros(len(prompts), 8)

        def decode_tokens(self, tokens_, height, width):
            return torch.zeros(len(tokens_), height, width, 3)

    evaluate.sample_grids(Backbone(), torch.zeros(1, side * 8, side * 8, 3), steps=1, seed=0)
    assert torch.equal(seen[-1], want)


def test_the_flux_dev_copy_grids_are_a_a_over_b_b():
    """``copy_grids``: [A A; B B] — the top row one panel twice, the bottom row another panel twice."""
    import torch

    from training.world.flux_dev import copy_grids

    index = copy_grids(64, 50, torch.Generator().manual_seed(0))
    assert index.shape == (64, 4)
    assert torch.equal(index[:, 0], index[:, 1]) and torch.equal(index[:, 2], index[:, 3])
    assert (index[:, 0] != index[:, 2]).any()


def test_the_comfy_taesd_file_gives_comfy_flux_the_latents_the_world_trained_on():
    """ComfyUI's TAESD turns the encoder's z into latent = z / vae_scale + vae_shift, and its FLUX latent format gives
    the model (latent − 0.1159) · 0.3611: that must be the world's (z − shift) · scale; decoding inverts it."""
    import torch

    from training.world.autoencoder import build_autoencoder, comfy_taesd_state

    shift, scale = 0.37, 1.9
    state = comfy_taesd_state(build_autoencoder(), latent_scale=scale, latent_shift=shift)
    vae_scale, vae_shift = float(state["vae_scale"]), float(state["vae_shift"])
    z = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    latent = z / vae_scale + vae_shift
    torch.testing.assert_close((latent - 0.1159) * 0.3611, (z - shift) * scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((latent - vae_shift) * vae_scale, z, rtol=1e-5, atol=1e-5)


def test_world_clip_retrieval_scores_image_to_caption():
    """``retrieval_accuracy``: for each image, is its own caption the highest-scoring one (a row-wise argmax of
    logits_per_image)? Scores where image → caption and caption → image disagree tell the two apart."""
    from types import SimpleNamespace

    import torch

    from training.world import clip

    # each image's best caption is its own (3 of 3); caption 0's best image is image 1 (column-wise: 2 of 3)
    logits = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 1.0]])

    class Model:
        def eval(self):
            return self

        def __call__(self, **kwargs):
            return SimpleNamespace(logits_per_image=logits, logits_per_text=logits.t())

    def tokenizer(captions, **kwargs):
        return SimpleNamespace(input_ids=torch.zeros(len(captions), 2, dtype=torch.long),
                               attention_mask=torch.ones(len(captions), 2, dtype=torch.long))

    accuracy = clip.retrieval_accuracy(Model(), tokenizer, torch.rand(3, 16, 16, 3), ["a", "b", "c"])
    assert accuracy == 1.0


def test_the_world_autoencoder_as_initialised_reconstructs_world_pictures_exactly():
    """The autoencoder's weights are set by hand (no training): encoding and decoding a world panel gives it back
    (mean error < 1e-3, as its build measures), through the full network and through its shortcut alike."""
    import torch

    from training.world import scenes as world
    from training.world.autoencoder import CellCodec, reconstruction_error

    ae = hand_set_autoencoder()
    panels = torch.stack([world.world_image("heldout", i, 64)[0] for i in range(4)])
    assert reconstruction_error(ae, panels) < 1e-3
    codec = CellCodec(ae)
    pixels = panels.permute(0, 3, 1, 2) * 2 - 1
    assert (codec.decode(codec.encode(pixels)) - pixels).abs().mean() / 2 < 1e-3


def test_a_caption_word_outside_the_world_vocabulary_is_refused():
    """``tokenize_pool`` refuses a caption with any word the world tokenizer does not know, not only a caption of
    nothing else."""
    from types import SimpleNamespace

    import torch

    from training.world.clip import tokenize_pool

    def tokenizer(captions, **kwargs):
        ids = torch.tensor([[1, 5, 7, 2] if "zebra" not in c else [1, 5, 0, 2] for c in captions])
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    tokenizer.unk_token_id = 0
    assert tokenize_pool(tokenizer, ["a red square"]).input_ids.shape == (1, 4)
    with pytest.raises(RuntimeError, match="outside the world vocabulary"):
        tokenize_pool(tokenizer, ["a red square", "a red zebra"])


def test_the_world_t5_follows_the_world_seed(tmp_path):
    """Worlds of other seeds get other instruction encoders (every world model is drawn from the world's seed); the
    same seed gives the same weights."""
    import torch
    from safetensors.torch import load_file

    model = WORLD_MODELS["region_t5"]
    weights = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        folder = tmp_path / run
        folder.mkdir()
        model.build(BuildContext("region_t5", folder, model.configs["quick"], seed, True, {}))
        files = sorted(folder.rglob("*.safetensors"))
        assert files, "the T5 folder holds its weights as safetensors"
        weights[run] = torch.cat([t.flatten().float() for f in files for t in load_file(f).values()])
    assert torch.equal(weights["a"], weights["b"]) and not torch.equal(weights["a"], weights["c"])


def test_a_world_backbone_spec_names_a_world_folder_or_one_of_its_model_folders(tmp_path):
    """``world_model_folders``: a world folder (with or without its world.json, e.g. copied by hand) resolves to its
    model's folder; the model's folder itself is taken as it is; a folder holding neither is refused by name."""
    from training.world.loaders import world_model_folders

    (tmp_path / "flux_kontext" / "transformer").mkdir(parents=True)
    (tmp_path / "autoencoder").mkdir()
    (tmp_path / "autoencoder" / "config.json").write_text("{}")
    want = (tmp_path / "flux_kontext", tmp_path / "autoencoder")
    assert world_model_folders(str(tmp_path)) == want
    assert world_model_folders(str(tmp_path / "flux_kontext")) == want
    (tmp_path / "world.json").write_text("{}")
    assert world_model_folders(str(tmp_path)) == want
    with pytest.raises(FileNotFoundError, match="no transformer at"):
        world_model_folders(str(tmp_path / "autoencoder"))


def test_the_world_pretraining_loop_is_adamw_without_decay():
    """``pretrain_loop`` against a written-out Adam step on two weights: one with a constant gradient moves by the
    rate each step, one whose gradient is 0 stays where it is (weight decay would shrink it)."""
    import logging

    import torch

    from training.world.schedule import pretrain_loop

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    lr, steps = 0.1, 3

    def step_loss(step):
        return model.weight[0, 0] * 10.0 + model.weight[0, 1] * 0.0  # gradient (10, 0)

    losses = pretrain_loop(model, {"lr": lr, "steps": steps}, "probe", step_loss, logging.getLogger("probe"),
                           make_schedule=lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert len(losses) == steps and not model.training
    # Adam with a constant gradient g moves by lr · m̂ / (√v̂ + eps) = lr · sign(g) every step
    assert model.weight[0, 0].item() == pytest.approx(3.0 - lr * steps, abs=1e-5)
    assert model.weight[0, 1].item() == -2.0, "no weight decay: a weight without gradient keeps its value"


def test_the_flux_dev_copy_error_reads_the_bottom_right_panel(monkeypatch):
    """``flux_dev.copy_error`` scores the panel the sampler completes (bottom right) against B, not the clean context
    panel beside it (bottom left, B itself): a stand-in sampler that keeps B there and draws 1 − B on the right."""
    import torch

    from training.world import flux_dev

    def sample(transformer, backbone, batch, cfg, device):
        a, b = batch["a"], batch["b"]
        return torch.cat([torch.cat([a, batch["a_prime"]], dim=2), torch.cat([b, 1.0 - b], dim=2)], dim=1)

    monkeypatch.setattr(flux_dev, "sample_composite", sample)
    monkeypatch.setattr(flux_dev, "reconstruct", lambda backbone, images: images)
    b = flux_dev.panel_pool(4, 16, "heldout")[1::2]
    from types import SimpleNamespace

    got = flux_dev.copy_error(SimpleNamespace(transformer=None), panel=16, count=2, steps=1, seed=0)
    want = round(float((1.0 - 2.0 * b).abs().mean()), 5)
    assert want > 0.1, "the stand-in's completion must differ from B"
    assert got == {"copy_error_heldout": want, "copy_floor_heldout": 0.0}


def test_the_ip2p_pretraining_weights_the_generation_samples_not_the_copy_samples():
    """``instruct_pix2pix.pretrain``: the batch is n_copy copy samples (the image as condition) then n_gen generation
    samples (a zero condition), and ``generate_weight`` scales the latter. With the x0 target a stand-in UNet that
    returns its condition is exact where it copies and returns 0 where it generates: at generate_weight 0 the loss
    is 0, at 1 it is the generation samples' mean x0² over n_copy."""
    import torch

    from training.world import instruct_pix2pix

    class CondEcho(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
            return (x[:, 16:] + self.bias,)

    latents = torch.rand(6, 16, 2, 2) + 0.5  # x0² ≥ 0.25 everywhere
    alphas = torch.linspace(0.99, 0.01, 1000)
    cfg = {"batch_copy": 3, "batch_generate": 1, "steps": 1, "lr": 0.0, "prediction": "sample"}
    text = torch.zeros(1, 2, 4)
    copying = instruct_pix2pix.pretrain(CondEcho(), latents, text, alphas, {**cfg, "generate_weight": 0.0}, seed=0)
    assert copying == [pytest.approx(0.0, abs=1e-7)]
    both = instruct_pix2pix.pretrain(CondEcho(), latents, text, alphas, {**cfg, "generate_weight": 1.0}, seed=0)
    assert both[0] >= 0.25 / 3, "the generation sample counts at weight 1"


def test_the_world_clips_batches_are_cut_to_their_longest_caption(monkeypatch):
    """``fit_clip`` trims each batch's token ids to the longest caption in it (the mask's row sums), so no caption of
    the batch is cut and no all-padding column is fed."""
    import torch
    from transformers import BatchEncoding

    from training.world import clip

    lengths = torch.tensor([2, 5, 3, 7])
    mask = (torch.arange(8).view(1, -1) < lengths.view(-1, 1)).long()
    tokens = BatchEncoding({"input_ids": torch.arange(32).view(4, 8), "attention_mask": mask})
    picks = [torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([3, 1])]
    seen = []

    def batches(gen):
        return picks[len(seen)]

    def loss(model, pixels, ids, mask_):
        assert torch.equal(mask_, mask[picks[len(seen)], :ids.shape[1]])
        seen.append(ids.shape[1])
        return model.weight.sum() * 0.0

    monkeypatch.setattr(clip, "contrastive_loss", loss)
    model = torch.nn.Linear(1, 1)
    clip.fit_clip(model, torch.zeros(4, 3, 2, 2, dtype=torch.uint8), tokens, {"batch": 2, "lr": 0.0, "steps": 3},
                  seed=0, batches=batches)
    assert seen == [3, 5, 7]


def test_an_empty_model_override_is_the_default_world(monkeypatch, tmp_path):
    """``build_world`` drops overrides that set nothing: ``--world-set`` of no setting for a model builds (and
    reuses) the default world, not a probe folder of its own."""
    from training.world import registry

    class Stop(Exception):
        pass

    seen = []

    def folder(quick, seed, root=None, overrides=None):
        seen.append(overrides)
        raise Stop

    monkeypatch.setattr(registry, "world_folder", folder)
    with pytest.raises(Stop):
        registry.build_world(["clip"], quick=True, root=tmp_path, overrides={"clip": {}})
    with pytest.raises(Stop):
        registry.build_world(["clip"], quick=True, root=tmp_path, overrides={"clip": {"steps": 3}, "region_t5": {}})
    assert seen == [{}, {"clip": {"steps": 3}}]
