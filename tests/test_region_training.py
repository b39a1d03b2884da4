"""The region trainer's objective (training/train_region.py) against a written-out re-computation with stub encoders,
gradient flow (only the region module and f_sem learn; L_CLIP reaches the region through the blend alone), the data
readers, and a short run of ``python -m training.train_region`` on the analogy world with tiny encoders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.regions import RegionPredictor, RegionSpec, VisionFeatures, load_region_predictor
from training.config import build_config
from training.data.batching import ReadableItems, collate
from training.data.readers import DataError, ItemError
from training.regions.config import PRESETS, RegionConfig
from training.regions.data import GroupedPairs, InstructionJsonl, load_mask
from training.regions.task import analogy_loss, region_loss, text_loss
from training.world.data import WorldRegions

S, GRID, D, TEXT, HIDDEN = 4, 2, 6, 5, 3   # 4-px images, 2x2 patches of 2x2 px


class StubClip(nn.Module):
    """Known, differentiable stand-ins: patch feature = tanh(block pixels @ W), I = mean patch @ V, text embedding =
    letter statistics, ANALOGY tokens = block pixels @ U (first token a 'class' token of zeros)."""

    image_size, grid = S, GRID
    info = EncoderInfo.describe(D, HIDDEN, S, 2, 1)

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(12, D, generator=gen), requires_grad=False)
        self.v = nn.Parameter(torch.randn(D, D, generator=gen), requires_grad=False)
        self.u = nn.Parameter(torch.randn(12, HIDDEN, generator=gen), requires_grad=False)

    device = torch.device("cpu")

    @staticmethod
    def blocks(images):
        b = images.shape[0]
        return images.reshape(b, GRID, 2, GRID, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, GRID * GRID, 12)

    def vision(self, images):
        patches = torch.tanh(self.blocks(images) @ self.w)
        return VisionFeatures(patches.mean(1) @ self.v, patches)

    @staticmethod
    def text(captions):
        rows = [[len(c), c.count("e"), c.count("a"), c.count(" "), sum(map(ord, c)) % 7, 1.0] for c in captions]
        return torch.tensor(rows, dtype=torch.float32)

    def analogy(self, a, a_prime):
        tokens = {r: torch.cat([torch.zeros(x.shape[0], 1, HIDDEN), self.blocks(x) @ self.u], 1)
                  for r, x in (("a", a), ("a_prime", a_prime))}
        return AnalogyEmbedding(self.info, {"a": a.mean((1, 2)), "a_prime": a_prime.mean((1, 2))}, tokens)


class StubEncoder(nn.Module):
    name = "stub-t5"
    width = TEXT

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(26, TEXT, generator=torch.Generator().manual_seed(1)),
                                  requires_grad=False)

    def encode(self, texts):
        words = [t.split() for t in texts]
        length = max(len(w) for w in words)
        tokens, mask = torch.zeros(len(texts), length, TEXT), torch.zeros(len(texts), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                tokens[i, j] = self.table[(ord(w[0]) - 97) % 26] * len(w)
                mask[i, j] = True
        return tokens, mask


def region_model(seed=0, mode="both") -> RegionPredictor:
    torch.manual_seed(seed)
    spec = RegionSpec(dim=D, grid=GRID, image_size=S, text_dim=TEXT if mode != "analogy" else 0,
                      analogy_dim=HIDDEN if mode != "text" else 0)
    net = RegionPredictor(spec, with_sem=mode != "analogy")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    return net


def batch(seed=0, n=3):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, S, S, 3, generator=gen)
    edited = image.clone()
    edited[:, :2, 2:] = torch.rand(n, 2, 2, 3, generator=gen)      # the "generator" changed the top-right patch
    edited += 0.05 * torch.rand(n, S, S, 3, generator=gen)          # and everything else a little
    mask = torch.zeros(n, S, S)
    mask[:, :2, 2:] = 1
    x, x_prime = torch.rand(n, S, S, 3, generator=gen), None
    x_prime = x.clone()
    x_prime[:, 2:, :2] = 1 - x_prime[:, 2:, :2]
    return {"image": image, "edited": edited.clamp(0, 1), "mask": mask, "has_mask": torch.tensor([True, False, True][:n]),
            "instruction": ["make apples red", "remove the bee", "add a hat"][:n],
            "source_caption": ["an apple", "a bee on a flower", "a man"][:n],
            "target_caption": ["a red apple", "a flower", "a man with a hat"][:n],
            "a": torch.rand(n, S, S, 3, generator=gen), "a_prime": torch.rand(n, S, S, 3, generator=gen),
            "x": x, "x_prime": x_prime}


def config(**overrides) -> RegionConfig:
    values = dict(alpha=0.7, beta=1.3, lambda_g=0.5, lambda_d=2.0, lambda_s=0.1, mask_weight=0.0, mode="text",
                  data="jsonl:x")
    values.update(overrides)
    return build_config(RegionConfig, PRESETS, None, None, [f"{k}={v}" for k, v in values.items()])


def cos(x, y):
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


def sim(f):
    unit = f / f.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(1, 2)


def expected_text_loss(net, clip, encoder, b, cfg):
    """Eq. 11 written out: α(L_semEdited + L_semOriginal) + β(λg·L_CLIPg + λd·L_CLIPd + λs·L_CLIPs) (+ mask BCE)."""
    x = b["image"]
    original = clip.vision(x)
    t_o, t_e = clip.text(b["source_caption"]), clip.text(b["target_caption"])
    tokens, token_mask = encoder.encode(b["instruction"])
    out = net(original.patches, "text", tokens, token_mask, semantic=True)
    sem = (1 - cos(out.sem_edited, t_e)).mean() + (1 - cos(out.sem_original, t_o)).mean()
    grid_map = out.probs.reshape(-1, 1, GRID, GRID)
    m = F.interpolate(grid_map, size=(S, S), mode="bilinear", align_corners=False)[:, 0, :, :, None]
    if cfg.straight_through:  # the forward value is the binary region inference uses
        m = (m >= cfg.threshold).float()
    x_res = m * b["edited"] + (1 - m) * x                                      # X_res = M ⊙ X_edit + (1 − M) ⊙ X
    res = clip.vision(x_res)
    g = (1 - cos(res.embeds, t_e)).mean()
    d = (1 - cos(res.embeds - original.embeds, t_e - t_o)).mean()
    s = ((sim(original.patches) - sim(res.patches)) ** 2).sum((1, 2)).mean()
    total = cfg.alpha * sem + cfg.beta * (cfg.lambda_g * g + cfg.lambda_d * d + cfg.lambda_s * s)
    if cfg.mask_weight:
        rows = b["has_mask"]
        target = F.avg_pool2d(b["mask"][rows, None], 2).flatten(1)             # 2x2-px patches
        logit = out.logits[rows]   # log σ(l) and log(1 − σ(l)) = log σ(−l), written stably
        bce = -(target * F.logsigmoid(logit) + (1 - target) * F.logsigmoid(-logit)).mean()
        total = total + cfg.mask_weight * bce
    return total, {"g": g, "d": d, "s": s, "sem": sem}


@pytest.mark.parametrize("mask_weight", [0.0, 0.4])
def test_text_loss_equals_the_written_out_objective(mask_weight):
    net, clip, encoder, b = region_model(), StubClip(), StubEncoder(), batch()
    cfg = config(mask_weight=mask_weight)
    got, parts = text_loss(net, clip, encoder, b, cfg)
    want, terms = expected_text_loss(net, clip, encoder, b, cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, key in (("g", "clip_g"), ("d", "clip_d"), ("s", "clip_s"), ("sem", "sem_align")):
        torch.testing.assert_close(parts[key], terms[name], rtol=1e-5, atol=1e-6)
        assert terms[name] > 1e-4, f"{name} must be active for this comparison to mean anything"


def test_the_straight_through_blend_thresholds_at_the_configured_threshold():
    """``straight_through``: X_res blends with (M ≥ threshold), the threshold the config names. This model's M is
    near 1 (0.71-1.00), so at 0.96 one image's region is partial, where the default 0.5 would take every pixel."""
    net, clip, encoder, b = region_model(), StubClip(), StubEncoder(), batch()
    tokens, token_mask = encoder.encode(b["instruction"])
    probs = net(clip.vision(b["image"]).patches, "text", tokens, token_mask).probs.detach()
    soft = F.interpolate(probs.reshape(-1, 1, GRID, GRID), size=(S, S), mode="bilinear", align_corners=False)
    inside = (soft >= 0.96).flatten(1).float().mean(dim=1)
    assert inside.min() > 0 and (inside < 1).any(), "every image needs some region, one image only part of it"
    cfg = config(straight_through=True, threshold=0.96)
    got, _ = text_loss(net, clip, encoder, b, cfg)
    torch.testing.assert_close(got, expected_text_loss(net, clip, encoder, b, cfg)[0], rtol=1e-5, atol=1e-6)
    soft_loss = text_loss(net, clip, encoder, b, config())[0]
    assert not torch.isclose(got, soft_loss), "the binary region must change the blend, or the check is empty"


def test_a_difference_within_the_tolerance_is_not_an_analogy_target():
    """Pixels of x′ that move by no more than ``diff_tolerance`` (here 0.005 everywhere) are not part of the region
    the analogy loss teaches; only the inverted corner is."""
    net, clip, b = region_model(mode="analogy"), StubClip(), batch()
    b["x_prime"] = (b["x_prime"] + 0.005).clamp(max=1.0)
    loose = config(mode="analogy", diff_tolerance=0.01, data="pairs:x")
    got, parts = analogy_loss(net, clip, b, loose)
    out = net(clip.vision(b["x"]).patches, "analogy", *(clip.analogy(b["a"], b["a_prime"]).patch_tokens[k]
                                                          for k in ("a", "a_prime")))
    corner = torch.zeros(len(b["x"]), S, S)
    corner[:, 2:, :2] = 1.0
    target = F.avg_pool2d(corner[:, None], 2).flatten(1)
    want = -(target * F.logsigmoid(out.logits) + (1 - target) * F.logsigmoid(-out.logits)).mean()
    torch.testing.assert_close(parts["analogy_bce"], want, rtol=1e-5, atol=1e-6)
    strict = analogy_loss(net, clip, b, config(mode="analogy", diff_tolerance=0.0, data="pairs:x"))[1]
    assert not torch.isclose(strict["analogy_bce"], want), "at tolerance 0 every pixel differs: another target"


def test_every_input_reaches_the_text_loss():
    net, clip, encoder, cfg = region_model(), StubClip(), StubEncoder(), config()
    base = text_loss(net, clip, encoder, batch(), cfg)[0]
    for key in ("image", "edited", "instruction", "source_caption", "target_caption"):
        b = batch()
        b[key] = b[key].flip(2) if isinstance(b[key], torch.Tensor) else [t + " now" for t in b[key]]
        assert not torch.isclose(text_loss(net, clip, encoder, b, cfg)[0], base), f"{key} does not reach the loss"


def test_analogy_loss_is_bce_against_the_query_pairs_difference():
    net, clip, b = region_model(mode="analogy"), StubClip(), batch()
    cfg = config(mode="analogy", analogy_weight=0.8, diff_tolerance=0.01, data="pairs:x")
    got, parts = analogy_loss(net, clip, b, cfg)
    tokens = clip.analogy(b["a"], b["a_prime"]).patch_tokens
    out = net(clip.vision(b["x"]).patches, "analogy", tokens["a"], tokens["a_prime"])
    changed = ((b["x_prime"] - b["x"]).abs().amax(-1) > 0.01).float()
    target = F.avg_pool2d(changed[:, None], 2).flatten(1)
    want = -(target * F.logsigmoid(out.logits) + (1 - target) * F.logsigmoid(-out.logits)).mean()
    assert target.sum() > 0 and (target < 1).any()
    torch.testing.assert_close(got, 0.8 * want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["analogy_bce"], want, rtol=1e-5, atol=1e-6)
    b2 = dict(b, a_prime=b["a"])
    assert not torch.isclose(analogy_loss(net, clip, b2, cfg)[0], got), "the exemplar's change must matter"


def test_both_modes_add_up():
    net, clip, encoder, b = region_model(), StubClip(), StubEncoder(), batch()
    cfg = config(mode="both", data="world")
    total, _ = region_loss(net, clip, encoder, b, cfg)
    torch.testing.assert_close(total, text_loss(net, clip, encoder, b, cfg)[0] + analogy_loss(net, clip, b, cfg)[0])


def grads(net):
    return {n: p.grad for n, p in net.named_parameters()}


def test_gradients_reach_only_the_region_module_and_f_sem():
    from training.regions.models import tiny_clip, tiny_t5
    from training.regions.task import region_spec

    clip, encoder = tiny_clip(0), tiny_t5(1)
    cfg = config(mode="both", data="world", mask_weight=0.5)
    torch.manual_seed(0)
    net = RegionPredictor(region_spec(cfg, clip, encoder), with_sem=True)
    b = batch()
    b = {k: (F.interpolate(v.movedim(-1, 1), size=(32, 32)).movedim(1, -1) if isinstance(v, torch.Tensor)
             and v.ndim == 4 else v) for k, v in b.items()}
    b["mask"] = F.interpolate(b["mask"][:, None], size=(32, 32))[:, 0]
    loss, _ = region_loss(net, clip, encoder, b, cfg)
    loss.backward()
    missing = [n for n, g in grads(net).items() if g is None or g.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"
    frozen = [n for n, p in list(clip.model.named_parameters()) + list(encoder.model.named_parameters())
              if p.requires_grad or p.grad is not None]
    assert not frozen, f"the frozen encoders must not train: {frozen[:3]}"


def test_clip_loss_reaches_the_region_only_through_the_blend():
    clip, encoder = StubClip(), StubEncoder()
    cfg = config(alpha=0.0, beta=1.0)
    net = region_model(mode="text")
    text_loss(net, clip, encoder, batch(), cfg)[0].backward()
    head = net.head[2].weight.grad
    assert head is not None and head.abs().sum() > 0, "L_CLIP must train the region head"
    net.zero_grad()
    b = batch()
    b["edited"] = b["image"].clone()            # X_edit = X: the region cannot change X_res
    text_loss(net, clip, encoder, b, cfg)[0].backward()
    assert all(g is None or g.abs().sum() == 0 for g in grads(net).values())


# -- data --------------------------------------------------------------------------------------------------------------


def _png(path, array):
    Image.fromarray(array).save(path)
    return path.name


def test_instruction_jsonl_reads_optional_fields_and_skips_bad_items(tmp_path):
    rng = np.random.default_rng(0)
    image = _png(tmp_path / "x.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    edited = _png(tmp_path / "e.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    mask_array = np.zeros((20, 30), np.uint8)
    mask_array[:10] = 255
    mask = _png(tmp_path / "m.png", mask_array)
    base = {"image": image, "instruction": "make it red", "source_caption": "a", "target_caption": "b"}
    lines = [dict(base, edited=edited, mask=mask), dict(base, edited=edited), base, dict(base, image="missing.png",
             edited=edited), {"image": image}, "not json"]
    index = tmp_path / "train.jsonl"
    index.write_text("\n".join(json.dumps(l) if isinstance(l, dict) else l for l in lines))
    data = InstructionJsonl(index, 16, need_edited=True)
    assert len(data) == 4, "the record without captions and the non-JSON line are skipped at load"
    first = data[0]
    assert first["image"].shape == (16, 16, 3) and bool(first["has_mask"])
    assert first["mask"][:8].min() == 1 and first["mask"][8:].max() == 0
    assert not bool(data[1]["has_mask"]) and data[1]["mask"].sum() == 0
    with pytest.raises(ItemError, match=r"train.jsonl:3: no \"edited\" image"):
        data[2]
    with pytest.raises(ItemError, match=r"train.jsonl:4 \(image\)"):
        data[3]
    readable = ReadableItems(data)
    items = [readable[i] for i in range(4)]
    assert sum(i["skipped"] for i in items) == 3
    assert collate(items)["image"].shape == (4, 16, 16, 3)
    assert InstructionJsonl(index, 16, need_edited=False)[2]["edited"].shape == (16, 16, 3)
    (tmp_path / "empty.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="no usable record"):
        InstructionJsonl(tmp_path / "empty.jsonl", 16, True)


def test_grouped_pairs_take_the_exemplar_from_the_same_group(tmp_path):
    names = []
    for i in range(3):
        names.append((_png(tmp_path / f"b{i}.png", np.full((12, 12, 3), 10 * i, np.uint8)),
                      _png(tmp_path / f"a{i}.png", np.full((12, 12, 3), 10 * i + 5, np.uint8))))
    lines = [{"a": names[0][0], "a_prime": names[0][1], "group": "red"},
             {"a": names[1][0], "a_prime": names[1][1], "prompt": "blue"},
             {"a": names[2][0], "a_prime": names[2][1], "group": "red"}]
    index = tmp_path / "pairs.jsonl"
    index.write_text("\n".join(json.dumps(l) for l in lines))
    data = GroupedPairs(index, 8)
    first, second = data[0], data[1]
    assert torch.equal(first["x"], torch.full((8, 8, 3), 0.0)) and torch.allclose(first["a"], torch.full((8, 8, 3), 20 / 255))
    assert torch.equal(second["a"], second["x"]), "a group of one pair is its own exemplar"


def test_world_items_use_a_pairs_and_never_b():
    data = WorldRegions(32, scenes=8, editor="redraw")
    item = data[0]
    assert item["family"] in data.families and item["instruction"]
    assert torch.equal(item["x"], item["image"]) and torch.equal(item["mask"], (item["x"] != item["x_prime"]).any(-1).float())
    assert item["mask"].sum() > 0 and not torch.equal(item["a"], item["x"]), "the exemplar is another scene"
    changed_outside = ((item["edited"] - item["x"]).abs().amax(-1) > 0)[item["mask"] == 0]
    assert changed_outside.any(), "the redrawn X_edit differs from X outside the edit too"
    assert torch.equal(WorldRegions(32, scenes=8, editor="truth")[0]["edited"], item["x_prime"])


def test_world_items_are_the_examples_a_scenes_and_the_next_examples_as_exemplar():
    """Item k of a family is scenes.example(family, k)'s A -> A′ (scene seed 2k, never B's 2k + 1), and its exemplar
    is example k + 1's A -> A′ (the next scene, wrapping at ``scenes``)."""
    from training.world import scenes as world

    data = WorldRegions(32, scenes=4, editor="truth")
    count = len(data.families)
    for k in range(4):
        for i, family in enumerate(data.families):
            item, ex, nxt = data[k * count + i], world.example(family, "train", k, 32), \
                world.example(family, "train", (k + 1) % 4, 32)
            assert not torch.equal(ex.a, ex.b), "A and B are different scenes: the test tells them apart"
            assert item["family"] == family and item["instruction"] == ex.instruction
            assert torch.equal(item["x"], ex.a) and torch.equal(item["x_prime"], ex.a_prime)
            assert torch.equal(item["a"], nxt.a) and torch.equal(item["a_prime"], nxt.a_prime)
            assert item["source_caption"] == ex.captions["a"] and item["target_caption"] == ex.captions["a_prime"]


def _redrawn_background_tint(item):
    """The redrawn X_edit's pixels: each is an object's exact palette colour or the scene's background colour plus one
    tint (the same for every background pixel); returns that tint (checked to be one colour, within ±0.04)."""
    from training.world import scenes as world

    edited = item["edited"].reshape(-1, 3)
    palette = torch.tensor(list(world.COLOURS.values()))
    is_object = (edited[:, None, :] == palette[None]).all(-1).any(-1)
    assert is_object.any(), "the redrawn objects keep their exact palette colours"
    backgrounds = torch.unique(edited[~is_object], dim=0)
    assert backgrounds.shape[0] == 1, f"one tinted background colour, got {backgrounds.tolist()}"
    scene_background = next(v for v in world.BACKGROUNDS.values()
                            if (backgrounds[0] - torch.tensor(v)).abs().max() <= 0.04 + 1e-6)
    tint = backgrounds[0] - torch.tensor(scene_background)
    assert tint.abs().max() > 0, "the background is tinted"
    return tint


def test_world_redrawn_edits_tint_the_background_only_and_differently_per_scene():
    """editor=redraw: X_edit keeps the objects' palette colours and shifts the background by a small tint (the
    module's "background tint offset"), drawn from the scene's own seed: scenes of one family get different tints."""
    data = WorldRegions(32, scenes=4, editor="redraw")
    count = len(data.families)
    for i, family in enumerate(data.families):
        tints = [_redrawn_background_tint(data[k * count + i]) for k in range(4)]
        assert all(not torch.allclose(tints[a], tints[b]) for a in range(4) for b in range(a)), (family, tints)


def test_world_inpainted_edits_are_the_truth_where_the_edit_is_and_the_redraw_elsewhere():
    """editor=inpaint: what a generator told the region would paint: A′ exactly on the pixels the edit changes (the
    edit in place, not moved with the redraw), the redrawn edited scene everywhere else."""
    count = len(WorldRegions(32, scenes=4).families)
    for index in range(2 * count):
        redrawn, inpainted = WorldRegions(32, scenes=4, editor="redraw")[index], \
            WorldRegions(32, scenes=4, editor="inpaint")[index]
        inside = inpainted["mask"].bool()
        assert torch.equal(inpainted["edited"][inside], inpainted["x_prime"][inside])
        assert torch.equal(inpainted["edited"][~inside], redrawn["edited"][~inside])
        assert not torch.equal(inpainted["edited"][~inside], inpainted["x"][~inside]), "jittered outside the edit"
    with pytest.raises(ValueError, match="world_editor must be one of"):
        WorldRegions(32, editor="paint")


# -- a short run of the trainer ------------------------------------------------------------------------------------------


def test_train_region_runs_resumes_and_writes_a_loadable_checkpoint(tmp_path):
    from training import train_region

    common = ["--preset", "tiny", "--set", "clip=tiny", "--set", "instruction_encoder=tiny", "--set", "resolution=32",
              "--set", "batch_size=2", "--set", "checkpoint_every=2", "--set", "sample_every=4", "--set",
              "report_to=none", "--set", "world_scenes=16"]
    full = train_region.main([*common, "--output-dir", str(tmp_path / "full"), "--max-steps", "4"])
    assert all(math.isfinite(v) for v in full["losses"])
    model = load_region_predictor(tmp_path / "full" / "region_predictor.safetensors")
    assert model.spec.modes == ("text", "analogy") and model.f_sem is None
    from training.regions.models import load_clip  # the file records the fingerprint of the CLIP it trained with

    assert model.encoder_fingerprint.distance(load_clip("tiny", 0).fingerprint()) < 1e-6
    assert model.encoder_fingerprint.distance(load_clip("tiny", 1).fingerprint()) > 0.5
    assert (tmp_path / "full" / "samples" / "step_000004.png").is_file()
    train_region.main([*common, "--output-dir", str(tmp_path / "part"), "--max-steps", "2"])
    resumed = train_region.main([*common, "--output-dir", str(tmp_path / "part"), "--max-steps", "4", "--resume"])
    assert resumed["start_step"] == 2
    again = load_region_predictor(tmp_path / "part" / "region_predictor.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_confinement_keeps_b_outside_the_region_and_measures_both_sides():
    from training.world.yardstick.regions import confinement

    gen = torch.Generator().manual_seed(0)
    b, edited = torch.rand(2, 6, 6, 3, generator=gen), torch.rand(2, 6, 6, 3, generator=gen)
    truth = b.clone()
    true_mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    true_mask[:, :3] = True
    truth[true_mask] = edited[true_mask]            # the edit is right inside the true region, B elsewhere
    region = torch.zeros(2, 6, 6, dtype=torch.bool)
    region[:, :2] = True                            # the predicted region misses one row of the true one
    confined, stats = confinement(b, edited, truth, region, true_mask)
    assert torch.equal(confined[~region], b[~region]) and torch.equal(confined[region], edited[region])
    assert stats["outside_region_max_change_from_b"] == 0.0
    assert stats["confined_error_outside_true"] == 0.0 and stats["unconfined_error_inside_true"] == 0.0
    missed = (b - truth).abs().mean(-1)[:, 2].mean()
    assert stats["confined_error_inside_true"] == pytest.approx(float(missed) / 3, rel=1e-5)
    assert stats["unconfined_error_outside_true"] == pytest.approx(float((edited - truth).abs().mean(-1)[:, 3:].mean()))


def test_mask_bce_targets_are_the_fraction_of_each_patch_inside_the_mask():
    """A mask covering part of a patch gives that patch a fractional target (here 1/4), not a rounded one."""
    net, clip, encoder, b = region_model(), StubClip(), StubEncoder(), batch()
    b["mask"][:, 3, 0] = 1.0                          # one pixel of the bottom-left 2x2 patch
    cfg = config(mask_weight=0.4)
    got, _ = text_loss(net, clip, encoder, b, cfg)
    want, _ = expected_text_loss(net, clip, encoder, b, cfg)
    target = F.avg_pool2d(b["mask"][:, None], 2).flatten(1)
    assert ((target > 0) & (target < 1)).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mask_images_are_binarised_at_half_grey(tmp_path):
    """An antialiased mask: a pixel belongs to the region when it is lighter than mid-grey, not whenever it is
    not black."""
    levels = [0, 40, 127, 128, 200, 255]
    Image.fromarray(np.array([levels] * 6, dtype=np.uint8)).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png", 6)
    assert mask.shape == (6, 6) and mask.dtype == torch.float32
    assert mask[0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0] and torch.equal(mask, mask[:1].expand(6, 6))


def test_the_trainer_starts_the_positions_as_its_config_says(tmp_path):
    """One step at learning rate 0 exports the positions the run started from."""
    from analogy_core.regions import sincos_positions
    from training import train_region

    assert RegionConfig().position_init == "sincos"
    with pytest.raises(ValueError, match="position_init must be one of"):
        RegionConfig(position_init="zeros").validate()
    common = ["--preset", "tiny", "--set", "clip=tiny", "--set", "instruction_encoder=tiny", "--set", "resolution=32",
              "--set", "batch_size=2", "--set", "report_to=none", "--set", "world_scenes=16", "--set",
              "learning_rate=0", "--set", "checkpoint_every=1", "--set", "sample_every=100", "--max-steps", "1"]
    for init in ("sincos", "random"):
        train_region.main([*common, "--set", f"position_init={init}", "--output-dir", str(tmp_path / init)])
        model = load_region_predictor(tmp_path / init / "region_predictor.safetensors")
        table = sincos_positions(model.spec.grid, model.spec.dim)
        assert torch.equal(model.position.data, table) == (init == "sincos"), init
        assert torch.equal(model.analogy_position.data[1:], table) == (init == "sincos"), init


def test_redraw_moves_and_resizes_each_object_by_up_to_jitter_either_way():
    """X_edit's redraw (``editor=redraw``): over seeds, each object's move in x and y and its resize take every value
    from −jitter to +jitter (a one-sided range would bias every redraw left, up and smaller), the tint within ±tint."""
    from training.world import scenes as world
    from training.world.data import redraw

    obj = world.Obj("square", "red", 24, 24, 12)            # far from the borders: no clipping
    scene = world.Scene(next(iter(world.BACKGROUNDS)), (obj,))
    moves = {"x": set(), "y": set(), "size": set()}
    for seed in range(200):
        moved, tint = redraw(scene, seed, jitter=2, tint=0.04)
        new = moved.objects[0]
        moves["x"].add(new.x - obj.x), moves["y"].add(new.y - obj.y), moves["size"].add(new.size - obj.size)
        assert np.abs(tint).max() <= 0.04
    assert moves == {key: {-2, -1, 0, 1, 2} for key in moves}
