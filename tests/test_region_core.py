"""The region predictor's maths (analogy_core/regions.py), each piece against a re-computation written out here from
the paper's equations (Ma et al., eqs. 1-11), plus masks, compositing and the checkpoint file."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from analogy_core.files import TensorFileError, write_safetensors_atomic
from analogy_core.regions import (KIND, SPEC_KEY, LossWeights, RegionError, RegionPredictor, RegionSpec, attend, blend,
                                  clip_direction_loss, clip_guidance_loss, clip_loss, clip_pixels, clip_structure_loss,
                                  composite_by_mask, cosine_distance, edit_mask, feather, grow, iou, load_region_predictor,
                                  patch_targets, probability_image, region_bce, region_masks, region_metadata,
                                  save_region_predictor, self_similarity, sem_align_loss)

D, GRID, TEXT, HIDDEN = 6, 3, 5, 4


def spec(**overrides) -> RegionSpec:
    values = dict(dim=D, grid=GRID, image_size=12, text_dim=TEXT, analogy_dim=HIDDEN, hidden=7)
    return RegionSpec(**{**values, **overrides})


def model(seed: int = 0, **overrides) -> RegionPredictor:
    torch.manual_seed(seed)
    net = RegionPredictor(spec(**overrides), with_sem=True)
    with torch.no_grad():  # larger weights than the default init, so that attention is far from uniform
        for p in net.parameters():
            p.mul_(3.0)
    return net


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cos(x, y):
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


def softmax_rows(scores):
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def mlp(layers, x):
    first, last = layers[0], layers[2]
    return gelu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias


# -- the module: equations 1-3 and the conditions ----------------------------------------------------------------------


def written_out(net: RegionPredictor, patches, condition, mask=None):
    """Eqs. 1-3 with explicit matrices (no nn.Module call), and f_sem of both feature sets; with ``residual`` each
    attention's input is added to its output, with ``positions`` the learned position vectors to the patches; f_sem
    of eq. 5 reads the raw patches F_img."""
    raw = patches
    if net.spec.positions:
        patches = patches + net.position
    wq, wk, wv = (getattr(net.cross, n).weight.T for n in "qkv")
    scores = (patches @ wq) @ (condition @ wk).transpose(1, 2) / math.sqrt(D)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    edited = softmax_rows(scores) @ (condition @ wv)                                  # F_Editedimg
    if net.spec.residual:
        edited = patches + edited
    sq, sk, sv = (getattr(net.self_attn, n).weight.T for n in "qkv")
    region = softmax_rows((edited @ sq) @ (edited @ sk).transpose(1, 2) / math.sqrt(D)) @ (edited @ sv)
    if net.spec.residual:
        region = edited + region
    probs = 1 / (1 + torch.exp(-mlp(net.head, region).squeeze(-1)))                   # P_region
    sem = lambda f: mlp(net.f_sem.net, f).mean(dim=1)                                # noqa: E731
    return edited, region, probs, sem(edited), sem(raw)


@pytest.mark.parametrize("residual,positions", [(False, False), (True, False), (True, True)])
def test_text_mode_follows_equations_1_to_3(residual, positions):
    net = model(residual=residual, positions=positions)
    patches, tokens = rand(2, GRID ** 2, D, seed=1), rand(2, 4, TEXT, seed=2)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = net(patches, "text", tokens, mask, semantic=True)
    condition = tokens @ net.text_proj.weight.T + net.text_proj.bias                 # T5 width 5 -> d = 6
    edited, region, probs, sem_e, sem_o = written_out(net, patches, condition, mask)
    for got, want in ((out.edited, edited), (out.region, region), (out.probs, probs), (out.sem_edited, sem_e),
                      (out.sem_original, sem_o)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert out.probs.std() > 0.01, "the prediction must depend on the patch"
    tokens_padded = tokens.clone()
    tokens_padded[0, 3] += 100.0   # a masked token must not matter, an unmasked one must
    assert torch.allclose(net(patches, "text", tokens_padded, mask).probs, out.probs)
    tokens_padded[0, 1] += 1.0
    assert not torch.allclose(net(patches, "text", tokens_padded, mask).probs[0], out.probs[0])


def test_no_projection_when_the_widths_agree():
    net = model(text_dim=D)
    assert not any(n.startswith("text_proj") for n, _ in net.named_parameters()), "paper: T5 width = CLIP width"
    patches, tokens = rand(1, GRID ** 2, D, seed=3), rand(1, 3, D, seed=4)
    torch.testing.assert_close(net(patches, "text", tokens).probs, written_out(net, patches, tokens)[2])


@pytest.mark.parametrize("residual,positions", [(False, False), (True, True)])
def test_analogy_condition_is_the_pair_per_position(residual, positions):
    net = model(residual=residual, positions=positions)
    a, a_prime = rand(2, GRID ** 2 + 1, HIDDEN, seed=5), rand(2, GRID ** 2 + 1, HIDDEN, seed=6)
    patches = rand(2, GRID ** 2, D, seed=7)
    condition = torch.cat([a, a_prime - a], -1) @ net.analogy_proj.weight.T + net.analogy_proj.bias
    if positions:
        condition = condition + net.analogy_position
    torch.testing.assert_close(net(patches, "analogy", a, a_prime).probs, written_out(net, patches, condition)[2])
    assert not torch.allclose(net(patches, "analogy", a, a).probs, net(patches, "analogy", a, a_prime).probs), \
        "what changed from A to A' must reach the region"


def test_one_condition_serves_a_batch_and_bad_inputs_are_refused():
    net = model()
    patches, tokens = rand(3, GRID ** 2, D, seed=8), rand(1, 2, TEXT, seed=9)
    batched = net(patches, "text", tokens).probs
    for i in range(3):
        torch.testing.assert_close(batched[i], net(patches[i:i + 1], "text", tokens).probs[0])
    with pytest.raises(RegionError, match="patch features must be"):
        net(rand(1, 4, D), "text", tokens)
    with pytest.raises(RegionError, match="instruction features must be"):
        net(patches, "text", rand(1, 2, TEXT + 1))
    with pytest.raises(RegionError, match="instruction is empty"):
        net(patches[:1], "text", tokens, torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(RegionError, match="not trained in analogy mode"):
        model(analogy_dim=0)(patches, "analogy", rand(1, 2, HIDDEN), rand(1, 2, HIDDEN))
    with pytest.raises(RegionError, match="not trained with instructions"):
        model(text_dim=0)(patches, "text", tokens)


def test_attend_is_scaled_dot_product_attention():
    q, k, v = rand(2, 3, 4, seed=1), rand(2, 5, 4, seed=2), rand(2, 5, 4, seed=3)
    torch.testing.assert_close(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


# -- losses: equations 4-10 --------------------------------------------------------------------------------------------


def test_semantic_alignment_is_two_cosine_distances():
    sem_e, sem_o, t_e, t_o = (rand(3, D, seed=s) for s in range(4))
    total, parts = sem_align_loss(sem_e, sem_o, t_e, t_o)
    want_e, want_o = (1 - cos(sem_e, t_e)).mean(), (1 - cos(sem_o, t_o)).mean()
    torch.testing.assert_close(parts["sem_edited"], want_e)
    torch.testing.assert_close(parts["sem_original"], want_o)
    torch.testing.assert_close(total, want_e + want_o)
    assert not torch.isclose(want_e, (1 - cos(sem_e, t_o)).mean()), "T_e and T_o must not be interchangeable here"


def test_blend_is_m_times_edit_plus_one_minus_m_times_x():
    m = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(0))
    x_edit, x = rand(2, 4, 5, 3, seed=1), rand(2, 4, 5, 3, seed=2)
    got = blend(m, x_edit, x)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                want = m[b, i, j] * x_edit[b, i, j] + (1 - m[b, i, j]) * x[b, i, j]
                torch.testing.assert_close(got[b, i, j], want)


def test_clip_guidance_and_direction():
    i_res, i_ori, t_e, t_o = (rand(3, D, seed=s) for s in range(4))
    torch.testing.assert_close(clip_guidance_loss(i_res, t_e), (1 - cos(i_res, t_e)).mean())
    want = (1 - cos(i_res - i_ori, t_e - t_o)).mean()
    torch.testing.assert_close(clip_direction_loss(i_res, i_ori, t_e, t_o), want)
    assert not torch.isclose(want, (1 - cos(i_ori - i_res, t_e - t_o)).mean()), "the direction has a sign"


def test_structure_loss_is_the_summed_squared_difference_of_cosine_similarity_matrices():
    f_img, f_res = rand(2, 4, D, seed=1), rand(2, 4, D, seed=2)
    per_image = []
    for b in range(2):
        total = 0.0
        for i in range(4):
            for j in range(4):
                s_img = float(f_img[b, i] @ f_img[b, j] / (f_img[b, i].norm() * f_img[b, j].norm()))
                s_res = float(f_res[b, i] @ f_res[b, j] / (f_res[b, i].norm() * f_res[b, j].norm()))
                total += (s_img - s_res) ** 2
        per_image.append(total)
    assert clip_structure_loss(f_img, f_res).item() == pytest.approx(sum(per_image) / 2, rel=1e-5)
    assert clip_structure_loss(f_img, f_img).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(self_similarity(f_img)[0, 1, 2], cos(f_img[0, 1], f_img[0, 2]))


def test_clip_loss_weights_each_term():
    i_res, i_ori, t_e, t_o = (rand(2, D, seed=s) for s in range(4))
    f_img, f_res = rand(2, 4, D, seed=5), rand(2, 4, D, seed=6)
    weights = LossWeights(lambda_g=0.3, lambda_d=2.0, lambda_s=0.01)
    total, parts = clip_loss(weights, i_res, i_ori, f_img, f_res, t_e, t_o)
    want = (0.3 * clip_guidance_loss(i_res, t_e) + 2.0 * clip_direction_loss(i_res, i_ori, t_e, t_o)
            + 0.01 * clip_structure_loss(f_img, f_res))
    torch.testing.assert_close(total, want)
    assert set(parts) == {"clip_g", "clip_d", "clip_s"}
    torch.testing.assert_close(cosine_distance(i_res, t_e), 1 - cos(i_res, t_e))


# -- analogy targets, masks, compositing -------------------------------------------------------------------------------


def test_edit_mask_and_patch_targets():
    before = torch.zeros(1, 6, 6, 3)
    after = before.clone()
    after[0, 0:2, 0:3, 1] = 0.5       # 6 pixels changed in the top-left 2x2-pixel patches (grid 3 on 6 px)
    after[0, 5, 5, 0] = 0.01          # below the tolerance
    mask = edit_mask(before, after, tolerance=0.02)
    assert int(mask.sum()) == 6 and not mask[0, 5, 5]
    assert not edit_mask(after, after).any(), "at the default tolerance 0 an unchanged pixel is not an edit"
    exact = edit_mask(before, after, tolerance=0.5)  # a change of exactly the tolerance is not more than it
    assert not exact.any() and int(edit_mask(before, after, tolerance=0.25).sum()) == 6
    targets = patch_targets(mask, 3).reshape(3, 3)
    want = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(targets, want)
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([[1.0, 0.5, 0.0]])
    p = torch.sigmoid(logits)
    want_bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(region_bce(logits, target), want_bce)


def test_probability_image_upsamples_the_patch_grid():
    probs = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    soft = probability_image(probs, 2, 8, 8)
    assert soft.shape == (1, 8, 8)
    assert soft[0, 1, 6] == 1.0 and soft[0, 6, 1] == 0.0 and soft[0, 1, 1] == 0.0, "patch (0, 1) is the top right"
    assert torch.allclose(soft, F.interpolate(probs.view(1, 1, 2, 2), (8, 8), mode="bilinear").squeeze(1))


def test_grow_shrink_and_feather():
    binary = torch.zeros(1, 9, 9, dtype=torch.bool)
    binary[0, 3:6, 3:6] = True
    assert int(grow(binary, 1).sum()) == 25 and int(grow(binary, -1).sum()) == 1
    assert torch.equal(grow(binary, 0), binary)
    soft = feather(binary, 2)
    assert torch.equal(soft > 0, binary), "feathering stays inside the binary region"
    assert soft[0, 4, 4] == 1.0 and soft[0, 3, 3] == 0.5
    masks = region_masks(torch.tensor([[0.2, 0.9, 0.4, 0.6]]), 2, 4, 4, threshold=0.5, grow_pixels=0)
    assert torch.equal(masks.binary, (masks.probability >= 0.5).float())
    at = region_masks(torch.full((1, 4), 0.5), 2, 4, 4, threshold=0.5).binary  # "reaches the threshold" (the node's
    below = region_masks(torch.full((1, 4), 0.49), 2, 4, 4, threshold=0.5).binary  # tooltip) is in the region
    assert at.eq(1).all() and below.eq(0).all()


def test_composite_keeps_the_outside_bit_for_bit():
    original = torch.rand(2, 5, 6, 3, generator=torch.Generator().manual_seed(1))
    edited = torch.rand(2, 5, 6, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 5, 6)
    mask[:, 1:3, 2:5] = 1.0
    mask[:, 3, 2] = 0.25
    out = composite_by_mask(original, edited, mask)
    outside, inside = mask == 0, mask == 1
    assert torch.equal(out[outside], original[outside]) and torch.equal(out[inside], edited[inside])
    torch.testing.assert_close(out[:, 3, 2], 0.25 * edited[:, 3, 2] + 0.75 * original[:, 3, 2])
    assert not torch.equal(out, original)


def test_iou():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2] = True
    b[0, 1:3] = True
    assert iou(a, b).tolist() == [pytest.approx(1 / 3), 1.0]


def test_clip_pixels_resize_whole_image_and_are_differentiable():
    image = torch.rand(1, 10, 20, 3, requires_grad=True)
    pixels = clip_pixels(image, 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert pixels.shape == (1, 3, 8, 8)
    want = (F.interpolate(image.detach().movedim(-1, 1), (8, 8), mode="bicubic", antialias=True) - 0.5) / 0.25
    torch.testing.assert_close(pixels.detach(), want)
    pixels.sum().backward()
    assert image.grad.abs().sum() > 0


# -- checkpoint file ---------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_leaves_f_sem_out(tmp_path):
    net = model()
    path = save_region_predictor(net, tmp_path / "r.safetensors", {"analogy.step": "3"})
    loaded = load_region_predictor(path)
    assert loaded.f_sem is None and loaded.spec == net.spec
    patches, tokens = rand(1, GRID ** 2, D, seed=1), rand(1, 2, TEXT, seed=2)
    torch.testing.assert_close(loaded(patches, "text", tokens).probs, net(patches, "text", tokens).probs)


def test_loader_refuses_other_files_and_bad_specs(tmp_path):
    net = model()
    state = net.inference_state_dict()
    write_safetensors_atomic(state, tmp_path / "lora.safetensors", {"analogy.kind": "lorweb_basis"})
    with pytest.raises(RegionError, match="lora.safetensors: this is not a region predictor"):
        load_region_predictor(tmp_path / "lora.safetensors")
    bad = region_metadata(net.spec)
    bad[SPEC_KEY] = bad[SPEC_KEY].replace('"grid": 3', '"grid": 300000')
    write_safetensors_atomic(state, tmp_path / "grid.safetensors", bad)
    with pytest.raises(RegionError, match="grid must be an integer"):
        load_region_predictor(tmp_path / "grid.safetensors")
    state["head.0.weight"] = state["head.0.weight"][:, :-1]
    write_safetensors_atomic(state, tmp_path / "shape.safetensors", region_metadata(net.spec))
    with pytest.raises(RegionError, match="head.0.weight"):
        load_region_predictor(tmp_path / "shape.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(TensorFileError):
        load_region_predictor(tmp_path / "x.ckpt")
    assert KIND == "region_predictor"


def test_check_encoder_refuses_every_other_field_than_the_name():
    """A CLIP of another input size (ViT-L/14@336 for ViT-L/14), patch, widths, depth or family is refused; the name
    is only a label."""
    from dataclasses import asdict, replace

    from analogy_core.analogy import EncoderInfo
    from analogy_core.regions import check_encoder

    trained = EncoderInfo.describe(768, 1024, 224, 14, 24)
    assert trained.name == "CLIP ViT-L/14"
    region = spec(encoder=asdict(trained))
    check_encoder(region, trained)
    check_encoder(region, replace(trained, name="my ViT-L/14 copy"))
    for field, value in [("image_size", 336), ("patch_size", 16), ("embed_dim", 512), ("hidden_dim", 768),
                         ("num_layers", 12), ("family", "siglip")]:
        with pytest.raises(RegionError, match="the region predictor was trained with CLIP ViT-L/14"):
            check_encoder(region, replace(trained, **{field: value}))


def test_sincos_positions_written_out():
    """Channel 4k + j of patch (row y, column x) on a 3-wide grid, 10 channels: sin/cos of x·ω_k, then of y·ω_k,
    ω_k = 3^(−k/2) for k = 0, 1; the two channels left over are 0."""
    from analogy_core.regions import sincos_positions

    table = sincos_positions(3, 10)
    assert table.shape == (9, 10)
    for patch in range(9):
        y, x = divmod(patch, 3)
        omega = [1.0, 3 ** -0.5]
        expected = [math.sin(x * omega[0]), math.sin(x * omega[1]), math.cos(x * omega[0]), math.cos(x * omega[1]),
                    math.sin(y * omega[0]), math.sin(y * omega[1]), math.cos(y * omega[0]), math.cos(y * omega[1]),
                    0.0, 0.0]
        torch.testing.assert_close(table[patch], torch.tensor(expected), rtol=0, atol=1e-6)
    gram = sincos_positions(8, 32) @ sincos_positions(8, 32).T  # a patch is nearest itself, then its neighbours
    centre = gram[3 * 8 + 3].view(8, 8)
    assert centre[3, 3] == centre.max() and centre[3, 4] > centre[3, 6] and centre[4, 3] > centre[6, 3]


def test_position_init_sets_the_learned_positions_and_is_checked():
    from analogy_core.regions import sincos_positions

    region = RegionPredictor(spec(residual=True, positions=True))
    torch.testing.assert_close(region.position.data, sincos_positions(GRID, D))
    assert region.analogy_position[0].abs().max() == 0  # the ANALOGY's class token has no grid position
    torch.testing.assert_close(region.analogy_position.data[1:], sincos_positions(GRID, D))
    old = RegionPredictor(spec(residual=True, positions=True), position_init="random")
    assert 0 < old.position.std() < 0.05
    region.load_state_dict({**old.state_dict(), "position": region.position.data,
                            "analogy_position": region.analogy_position.data})  # only the positions differ
    patches, tokens = rand(2, GRID ** 2, D), rand(2, 4, TEXT, seed=1)
    assert (region(patches, "text", tokens).logits - old(patches, "text", tokens).logits).abs().max() > 1e-3
    with pytest.raises(RegionError, match="position_init must be one of"):
        RegionPredictor(spec(positions=True), position_init="learned")
