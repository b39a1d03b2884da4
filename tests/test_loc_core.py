"""LoRA of Change hypernetwork (analogy_core.loc): targets, eq. 11 initialisation, per-sample LoRA application,
generation directions, encoder checks and the hypernetwork file."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.lorweb.basis import random_basis
from analogy_core.files import TensorFileError
from analogy_core.layouts import layout_of_diffusers_model, standard_layout
from analogy_core.lora import LoRA, LoRALayer
from analogy_core.lora_io import save_lora_file
from analogy_core.loc import (KIND, MAX_PARAMETER_VALUE, HypernetworkConfig, HypernetworkError, LoRAFactors,
                              attention_targets, batched_lora, build_hypernetwork, generate_lora, is_hypernetwork_file,
                              load_hypernetwork, save_hypernetwork)
from analogy_core.fingerprint import FINGERPRINT_KEY, EncoderFingerprint, EncoderMismatch
from tiny_models import SD_DIFFUSERS, randomize_

ENCODER = EncoderInfo.describe(16, 24, 224, 32, 2)
OTHER_ENCODER = EncoderInfo.describe(16, 24, 224, 16, 2)  # same token width, another model


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**dict(SD_DIFFUSERS, in_channels=8)).eval()
    randomize_(model, seed=1)
    return model


def config_for(model, **overrides) -> HypernetworkConfig:
    values = dict(targets=attention_targets(layout_of_diffusers_model(model)), token_width=24, encoder=ENCODER,
                  token_count=5, width=32, blocks=2, heads=4, rank=2, ffn=64, family="sd15")
    values.update(overrides)
    return HypernetworkConfig(**values)


def perturb_u_b(hypernetwork, seed: int = 0, std: float = 0.05) -> None:
    """Give U_B non-zero weights (what training does), so the generated LoRA is not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.copy_(torch.randn(view.shape, generator=gen) * std)


def analogy(batch: int = 1, seed: int = 0, encoder: EncoderInfo = ENCODER, tokens: int = 5) -> AnalogyEmbedding:
    gen = torch.Generator().manual_seed(seed)
    patch = {r: torch.randn(batch, tokens, encoder.hidden_dim, generator=gen) for r in ("a", "a_prime")}
    embeds = {r: torch.randn(batch, encoder.embed_dim, generator=gen) for r in ("a", "a_prime")}
    return AnalogyEmbedding(encoder, embeds, patch)


def unet_inputs(batch: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 8, 8, 8, generator=gen), torch.tensor([500] * batch),
            torch.randn(batch, 4, 32, generator=gen))


def run_unet(model, inputs, factors=None):
    with torch.no_grad(), batched_lora(model, factors):
        return model(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


# -- targets and initialisation ---------------------------------------------------------------------------------------


def test_sd15_targets_are_its_32_attention_layers_at_real_widths():
    targets = attention_targets(standard_layout("sd15"))
    assert len(targets) == 32
    assert sum(t.path.endswith("attn1") for t in targets) == 16 == sum(t.path.endswith("attn2") for t in targets)
    widths = {320, 640, 1280}
    for target in targets:
        (q_out, q_in), (k_out, k_in), (v_out, v_in), (o_out, o_in) = target.shapes
        assert q_out == q_in == o_out == o_in and q_in in widths
        if target.path.endswith("attn2"):  # cross-attention k/v read the 768-d CLIP text context
            assert (k_out, k_in) == (v_out, v_in) == (q_in, 768)
        else:
            assert (k_out, k_in) == (v_out, v_in) == (q_in, q_in)
    config = HypernetworkConfig(targets, token_width=1024)
    with torch.device("meta"):
        from analogy_core.loc import LoRAHypernetwork

        model = LoRAHypernetwork(config)
    assert len(model.heads) == 32 and model.queries.shape == (32, 512) and len(model.decoder.layers) == 6
    assert model.decoder.layers[0].self_attn.num_heads == 8
    assert model.fuse.weight.shape == (512, 2 * 1024)
    # one head per layer producing U_A (r x in) and U_B (out x r) for q, k, v, out at r = 4
    first = targets[1]  # attn2 of the first block: in widths 320, 768, 768, 320
    assert model.heads[1].weight.shape == (4 * (320 + 768 + 768 + 320) + 4 * 4 * 320, 512)


def test_heads_start_as_eq_11_u_a_random_u_b_zero(unet):
    hypernetwork = build_hypernetwork(config_for(unet), seed=0)
    r = hypernetwork.config.rank
    for target, head in zip(hypernetwork.config.targets, hypernetwork.heads):
        split = target.down_width(r)
        assert torch.equal(head.weight[split:], torch.zeros_like(head.weight[split:])), "U_B part starts at zero"
        assert torch.count_nonzero(head.bias) == 0
        assert torch.count_nonzero(head.weight[:split]) == head.weight[:split].numel(), "U_A part is random"
        # U_A rows of the q projection: std 1/sqrt(3 · in · width), LoRA's usual scale for unit features
        in_q = target.shapes[0][1]
        rows = head.weight[: r * in_q]
        want = 1 / math.sqrt(3 * in_q * hypernetwork.config.width)
        assert 0.7 * want < rows.std().item() < 1.3 * want


def test_head_outputs_are_read_in_the_files_layout(unet):
    """A head's output is [U_A of each projection (r x in, row-major) ..., U_B of each (out x r) ...]: the layout
    every saved hypernetwork was trained in. Pinned with zero weights and a counting bias (a relabelling of the
    outputs trains as well from scratch, but decodes a saved file into scrambled factors)."""
    hypernetwork = build_hypernetwork(config_for(unet), seed=0)
    assert hypernetwork.config.update_caps() is None  # no soft bound rescales U_B here
    with torch.no_grad():
        for head in hypernetwork.heads:
            head.weight.zero_()
            head.bias.copy_(torch.arange(head.bias.numel(), dtype=head.bias.dtype))
    a = analogy()
    factors = hypernetwork(a.patch_tokens["a"], a.patch_tokens["a_prime"])
    r = hypernetwork.config.rank
    for target in hypernetwork.config.targets:
        offset = 0
        expected = {}
        for path, (_, in_f) in zip(target.projection_paths(), target.shapes):
            expected[path] = [torch.arange(offset, offset + r * in_f, dtype=torch.float32).view(r, in_f)]
            offset += r * in_f
        for path, (out_f, _) in zip(target.projection_paths(), target.shapes):
            expected[path].append(torch.arange(offset, offset + out_f * r, dtype=torch.float32).view(out_f, r))
            offset += out_f * r
        for path, (down, up) in expected.items():
            got_down, got_up = factors.layers[path]
            torch.testing.assert_close(got_down[0], down)
            torch.testing.assert_close(got_up[0], up)


def test_a_fresh_hypernetwork_generates_zero_and_leaves_the_unet_bit_identical(unet):
    hypernetwork = build_hypernetwork(config_for(unet), seed=0)
    item = analogy(batch=3)
    factors = hypernetwork(item.patch_tokens["a"], item.patch_tokens["a_prime"])
    assert len(factors.layers) == 4 * len(hypernetwork.config.targets)
    for down, up in factors.layers.values():
        assert torch.count_nonzero(up) == 0 and torch.count_nonzero(down) > 0
    inputs = unet_inputs(3)
    base = run_unet(unet, inputs)
    assert base.std() > 0.1, "the tiny UNet computes something"
    assert torch.equal(run_unet(unet, inputs, factors), base), "a zero LoRA changes nothing, bit for bit"
    lora = generate_lora(hypernetwork, item, sample=1)
    assert lora.source == "generated" and lora.family == "sd15" and len(lora) == len(factors.layers)
    assert all(torch.count_nonzero(layer.delta_weight()) == 0 for layer in lora.layers.values())
    # the comparison above is not void: the same H with U_B set does change the output
    perturb_u_b(hypernetwork)
    changed = hypernetwork(item.patch_tokens["a"], item.patch_tokens["a_prime"])
    assert (run_unet(unet, inputs, changed) - base).abs().max() > 1e-3


# -- per-sample application -------------------------------------------------------------------------------------------


def merged(model, factors: LoRAFactors, sample: int):
    """A copy of the UNet with sample ``sample``'s LoRA merged into its weights: W + s · up @ down."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for path, (down, up) in factors.layers.items():
            weight = copy_.get_submodule(path).weight
            weight += factors.scale[sample] * up[sample] @ down[sample]
    return copy_


def test_one_lora_per_sample_equals_merging_each_samples_lora(unet):
    hypernetwork = build_hypernetwork(config_for(unet), seed=1)
    perturb_u_b(hypernetwork, std=0.1)
    item = analogy(batch=3, seed=4)
    with torch.no_grad():
        factors = hypernetwork(item.patch_tokens["a"], item.patch_tokens["a_prime"]).scaled(
            torch.tensor([1.0, -0.5, 2.0]))
    inputs = unet_inputs(3)
    got = run_unet(unet, inputs, factors)
    base = run_unet(unet, inputs)
    for b in range(3):
        want = merged(unet, factors, b)(inputs[0][b:b + 1], inputs[1][b:b + 1],
                                         encoder_hidden_states=inputs[2][b:b + 1]).sample.detach()
        assert (want - base[b:b + 1]).abs().max() > 1e-3, "each sample's LoRA changes its output"
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-4, atol=1e-5)
    # a batch k times the LoRA batch (CFG's [uncond; cond]) takes LoRA i mod B
    doubled = tuple(torch.cat([x, x]) for x in inputs)
    torch.testing.assert_close(run_unet(unet, doubled, factors), torch.cat([got, got]), rtol=1e-4, atol=1e-5)
    with pytest.raises(HypernetworkError, match="does not fit 3 generated LoRAs"):
        run_unet(unet, tuple(x[:2] for x in inputs), factors)


# -- generation -------------------------------------------------------------------------------------------------------


def deltas(lora: LoRA) -> dict[str, torch.Tensor]:
    return {k: v.delta_weight() for k, v in lora.layers.items()}


def test_directions_strength_and_batched_analogies(unet):
    hypernetwork = build_hypernetwork(config_for(unet), seed=2)
    perturb_u_b(hypernetwork)
    item = analogy(batch=2, seed=5)
    forward = deltas(generate_lora(hypernetwork, item, "forward", 1.0, sample=1))
    reverse = deltas(generate_lora(hypernetwork, item, "reverse", 1.0, sample=1))
    swapped = deltas(generate_lora(hypernetwork, item, "swapped", 1.0, sample=1))
    half = deltas(generate_lora(hypernetwork, item, "forward", 0.5, sample=1))
    first = deltas(generate_lora(hypernetwork, item, "forward", 1.0, sample=0))
    key = next(iter(forward))
    assert forward[key].abs().max() > 0
    for name, delta in forward.items():
        torch.testing.assert_close(reverse[name], -delta)              # LoRA Reverse: −H(A, A′)
        torch.testing.assert_close(half[name], 0.5 * delta)
    factors = hypernetwork(item.patch_tokens["a_prime"][1:], item.patch_tokens["a"][1:])  # H(A′, A) by hand
    for name, (down, up) in factors.layers.items():
        torch.testing.assert_close(swapped[name], up[0] @ down[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(swapped[key], forward[key]) and not torch.allclose(first[key], forward[key])


@pytest.mark.parametrize("case, message", [
    ("width", "reads 24-d patch tokens .* gives 40-d tokens"),
    ("identity", "trained on tokens of .*same width, another model"),
    ("tokens", "trained on 5 tokens per image, the ANALOGY has 7"),
    ("no_tokens", "no patch tokens for a, a_prime"),
    ("sample", "sample 2 is out of range: the ANALOGY holds 2 item"),
    ("direction", "direction must be one of"),
])
def test_generation_refuses_what_does_not_fit(unet, case, message):
    hypernetwork = build_hypernetwork(config_for(unet), seed=0)
    item, kwargs = analogy(batch=2), {}
    if case == "width":
        item = analogy(encoder=EncoderInfo.describe(16, 40, 224, 32, 2))
    elif case == "identity":
        item = analogy(encoder=OTHER_ENCODER)
    elif case == "tokens":
        item = analogy(tokens=7)
    elif case == "no_tokens":
        item = AnalogyEmbedding(ENCODER, item.image_embeds)
    elif case == "sample":
        kwargs = dict(sample=2)
    else:
        kwargs = dict(direction="sideways")
    with pytest.raises(HypernetworkError, match=message):
        generate_lora(hypernetwork, item, **kwargs)


# -- files ------------------------------------------------------------------------------------------------------------


def test_hypernetwork_file_round_trip(unet, tmp_path):
    hypernetwork = build_hypernetwork(config_for(unet), seed=3)
    perturb_u_b(hypernetwork)
    path = save_hypernetwork(hypernetwork, tmp_path / "h.safetensors", {"analogy.step": "7"})
    assert is_hypernetwork_file(path)
    loaded = load_hypernetwork(path)
    assert loaded.config == hypernetwork.config and not any(p.requires_grad for p in loaded.parameters())
    for name, value in hypernetwork.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    item = analogy()
    torch.testing.assert_close(deltas(generate_lora(loaded, item))["down_blocks.0.attentions.0.transformer_blocks.0"
                                                                   ".attn1.to_q"],
                               deltas(generate_lora(hypernetwork, item))["down_blocks.0.attentions.0.transformer_"
                                                                         "blocks.0.attn1.to_q"])
    half = load_hypernetwork(save_hypernetwork(hypernetwork, tmp_path / "bf16.safetensors", dtype=torch.bfloat16))
    assert half.fuse.weight.dtype == torch.float32 and half.config == hypernetwork.config


def header_of(hypernetwork) -> dict[str, str]:
    from analogy_core.loc import hypernetwork_metadata

    return hypernetwork_metadata(hypernetwork.config)


@pytest.mark.parametrize("case, message", [
    ("basis", "not a LoRA of Change hypernetwork: it is a LoRWeB LoRA basis"),
    ("lora", "not a LoRA of Change hypernetwork: it is an ordinary LoRA"),
    ("no_config", "has no 'analogy.loc' config"),
    ("bad_config", "the hypernetwork config's targets must be"),
    ("shape", "has shape"),
    ("missing", "expected tensors are missing"),
    ("huge", "beyond the accepted"),
    ("pickle", "pickles"),
    ("fingerprint", "'analogy.encoder_fingerprint': .* embeds must be 64 numbers within"),
])
def test_loader_refuses_other_and_damaged_files(unet, tmp_path, case, message):
    hypernetwork = build_hypernetwork(config_for(unet), seed=0)
    tensors = {k: v.contiguous() for k, v in hypernetwork.state_dict().items()}
    header = header_of(hypernetwork)
    path = tmp_path / "file.safetensors"
    if case == "basis":
        basis = random_basis({"transformer_blocks.0.attn.to_q": (8, 8)}, num_entries=2, rank=1, key_dim=4,
                             query_dim=6)
        basis.save(path)
    elif case == "lora":
        layer = LoRALayer(torch.randn(2, 32), torch.randn(32, 2))
        save_lora_file(LoRA({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": layer}, "sd15"), path)
    else:
        if case == "no_config":
            header.pop("analogy.loc")
        elif case == "bad_config":
            config = json.loads(header["analogy.loc"])
            config["targets"] = "everything"
            header["analogy.loc"] = json.dumps(config)
        elif case == "shape":
            tensors["heads.0.weight"] = tensors["heads.0.weight"][:-1].contiguous()
        elif case == "missing":
            tensors.pop("queries")
        elif case == "huge":
            tensors["fuse.weight"] = tensors["fuse.weight"] * (10 * MAX_PARAMETER_VALUE)
        elif case == "pickle":
            path = tmp_path / "file.pt"
        elif case == "fingerprint":
            recorded = fingerprint(0).to_json()
            header[FINGERPRINT_KEY] = json.dumps({**recorded, "embeds": recorded["embeds"][:5]})
        save_file(tensors, path, metadata=header)
    with pytest.raises((HypernetworkError, TensorFileError), match=message) as info:
        load_hypernetwork(path)
    assert str(info.value).startswith(path.name), "errors name the file"
    assert case in ("basis", "lora", "pickle") or header.get("analogy.kind", KIND) == KIND


def test_update_norms_and_the_consistency_gap(unet):
    from analogy_core.loc import consistency_gap

    hypernetwork = build_hypernetwork(config_for(unet), seed=4)
    item = analogy(batch=2, seed=6)
    tokens = item.patch_tokens["a"], item.patch_tokens["a_prime"]
    assert torch.isnan(consistency_gap(hypernetwork, *tokens)).all(), "undefined for a fresh H (H = 0)"
    perturb_u_b(hypernetwork)
    forward = hypernetwork(*tokens)
    swapped = hypernetwork(*reversed(tokens))
    for b in range(2):  # plain re-computation from dense updates
        dense = {k: u[b] @ d[b] for k, (d, u) in forward.layers.items()}
        other = {k: u[b] @ d[b] for k, (d, u) in swapped.layers.items()}
        norm = torch.sqrt(sum((w ** 2).sum() for w in dense.values()))
        summed = torch.sqrt(sum(((w + other[k]) ** 2).sum() for k, w in dense.items()))
        torch.testing.assert_close(forward.update_norm()[b], norm, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(forward.update_norm(swapped)[b], summed, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(consistency_gap(hypernetwork, *tokens)[b], summed / norm, rtol=1e-4, atol=1e-8)
    # exactly reversing LoRAs have gap 0; equal ones gap 2
    torch.testing.assert_close(forward.update_norm(forward.scaled(-1.0)), torch.zeros(2), atol=1e-3 * norm.item(),
                               rtol=0)
    torch.testing.assert_close(forward.update_norm(forward) / forward.update_norm(), torch.full((2,), 2.0))


def fingerprint(seed: int) -> EncoderFingerprint:
    gen = torch.Generator().manual_seed(seed)
    return EncoderFingerprint.of(torch.randn(ENCODER.embed_dim, generator=gen),
                                 torch.randn(5, ENCODER.hidden_dim, generator=gen))


def test_the_file_records_its_encoders_fingerprint_and_generation_checks_it(unet, tmp_path):
    """An ANALOGY from the right architecture with other weights (stock CLIP for an H trained with its own image
    encoder) is refused; the same weights, or an ANALOGY or file without a fingerprint, generate as before."""
    import dataclasses

    hypernetwork = build_hypernetwork(config_for(unet), seed=3)
    perturb_u_b(hypernetwork)
    hypernetwork.encoder_fingerprint = fingerprint(0)
    loaded = load_hypernetwork(save_hypernetwork(hypernetwork, tmp_path / "h.safetensors"))
    assert loaded.encoder_fingerprint == fingerprint(0)
    item = analogy()
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    unchecked = deltas(generate_lora(loaded, item))[path]
    assert unchecked.abs().max() > 0
    same = deltas(generate_lora(loaded, dataclasses.replace(item, fingerprint=fingerprint(0))))[path]
    assert torch.equal(same, unchecked)
    with pytest.raises(EncoderMismatch, match=r"the ANALOGY's encoder \(.*\) is not the encoder this hypernetwork "
                                              r"was trained with: same architecture, other weights"):
        generate_lora(loaded, dataclasses.replace(item, fingerprint=fingerprint(1)))
    hypernetwork.encoder_fingerprint = None  # an older file: nothing to compare, nothing refused
    older = load_hypernetwork(save_hypernetwork(hypernetwork, tmp_path / "old.safetensors"))
    assert older.encoder_fingerprint is None
    assert torch.equal(deltas(generate_lora(older, dataclasses.replace(item, fingerprint=fingerprint(1))))[path],
                       unchecked)
