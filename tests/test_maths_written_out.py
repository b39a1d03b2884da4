"""Three computations pinned against a written-out reference or the library they must agree with, each with inputs
that make every part of it matter: LoRA of Change's H = S ∘ D ∘ P (which tokens are fused in which order, which
decoder query feeds which layer's head), the region losses' CLIP features (transformers' own image and text
features), and the FLUX token packing and position ids the LoRWeB and Edit Transfer trainers use (diffusers' FLUX
pipeline, on a grid that is not square, so rows and columns cannot be confused)."""

from __future__ import annotations

import pytest
import torch

from analogy_core.layouts import layout_of_diffusers_model
from analogy_core.loc import HypernetworkConfig, attention_targets, build_hypernetwork
from tiny_models import SD_DIFFUSERS, randomize_


# -- LoRA of Change: H(A, A′) = S(D(queries, P([A, A′]))) -------------------------------------------------------------


@pytest.fixture(scope="module")
def hypernetwork():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**dict(SD_DIFFUSERS, in_channels=8)).eval()
    randomize_(unet, seed=1)
    config = HypernetworkConfig(targets=attention_targets(layout_of_diffusers_model(unet)), token_width=6,
                                token_count=5, width=16, blocks=1, heads=2, rank=2, ffn=32, family="sd15")
    model = build_hypernetwork(config, seed=0).eval()
    randomize_(model, seed=2)  # every parameter, U_B (zero at initialisation, eq. 11) and norms too
    return model


def written_out_factors(model, tokens_a: torch.Tensor, tokens_a_prime: torch.Tensor) -> dict[str, tuple]:
    """The paper's H by hand: f = W_P [A; A′] + b (A's tokens first), D over the learned queries with f as memory,
    layer i's head reading decoder output i, each head's output laid out as [U_A of q, k, v, out (r x in each),
    U_B of q, k, v, out (out x r each)]."""
    width = model.config.token_width
    weight, bias = model.fuse.weight, model.fuse.bias
    memory = tokens_a @ weight[:, :width].T + tokens_a_prime @ weight[:, width:].T + bias
    primitives = model.decoder(model.queries.expand(tokens_a.shape[0], -1, -1), memory)
    assert not torch.allclose(primitives[:, 0], primitives[:, 1]), "each layer's query must give its own output"
    r, out = model.config.rank, {}
    for i, target in enumerate(model.config.targets):
        flat = primitives[:, i] @ model.heads[i].weight.T + model.heads[i].bias
        offset = 0
        downs = []
        for _, in_features in target.shapes:
            downs.append(flat[:, offset: offset + r * in_features].reshape(-1, r, in_features))
            offset += r * in_features
        for path, (out_features, _), down in zip(target.projection_paths(), target.shapes, downs):
            out[path] = (down, flat[:, offset: offset + out_features * r].reshape(-1, out_features, r))
            offset += out_features * r
        assert offset == flat.shape[1]
    return out


def test_the_hypernetwork_is_s_of_d_of_p_as_written_out(hypernetwork):
    assert hypernetwork.config.update_caps() is None  # no soft bound rescales U_B here
    gen = torch.Generator().manual_seed(3)
    tokens_a, tokens_a_prime = (torch.randn(2, 5, 6, generator=gen) for _ in range(2))
    with torch.no_grad():
        factors = hypernetwork(tokens_a, tokens_a_prime)
        swapped = hypernetwork(tokens_a_prime, tokens_a)
        expected = written_out_factors(hypernetwork, tokens_a, tokens_a_prime)
    some_path = next(iter(expected))
    assert factors.layers[some_path][1].abs().max() > 1e-3  # a live LoRA (U_B non-zero)
    assert not torch.allclose(swapped.layers[some_path][0], factors.layers[some_path][0])  # A and A′ have roles
    assert set(factors.layers) == set(expected)
    for path, (down, up) in expected.items():
        torch.testing.assert_close(factors.layers[path][0], down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(factors.layers[path][1], up, rtol=1e-5, atol=1e-6)


# -- the region losses' CLIP features: transformers' own -------------------------------------------------------------


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 a model output whose pooler_output holds them."""
    return output if torch.is_tensor(output) else output.pooler_output


def test_frozen_clip_features_are_transformers_clip_features():
    from analogy_core.regions import clip_pixels
    from training.regions.models import tiny_clip

    clip = tiny_clip(0)
    model = clip.model
    randomize_(model, seed=4)  # norms and biases away from their identity values too
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 40, 48, 3, generator=gen)
    features = clip.vision(images)
    pixels = clip_pixels(images, clip.image_size)
    with torch.no_grad():
        expected_image = _features(model.get_image_features(pixel_values=pixels))
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
        expected_patches = model.visual_projection(model.vision_model.post_layernorm(hidden[:, 1:]))
    assert not torch.allclose(features.patches[:, 0], features.patches[:, 1])  # patches differ: a live encoder
    torch.testing.assert_close(features.embeds, expected_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.patches, expected_patches, rtol=1e-5, atol=1e-6)

    captions = ["a red square", "a blue disc on a green background"]
    batch = clip.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_text = _features(model.get_text_features(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"]))
    text = clip.text(captions)
    assert not torch.allclose(text[0], text[1])
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-6)


# -- FLUX packing and position ids: diffusers' pipeline ---------------------------------------------------------------


def test_packed_latents_and_their_position_ids_are_the_flux_pipelines():
    from diffusers import FluxPipeline

    from training.backbone import pack, token_ids, unpack

    batch, channels, height, width = 2, 4, 6, 10  # a 3 x 5 token grid: rows and columns differ
    latents = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(6))
    packed = pack(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, batch, channels, height, width))
    torch.testing.assert_close(unpack(packed, height, width), latents)
    for index in (0, 1):  # Kontext marks the reference image's tokens with index 1
        ids = token_ids(height, width, index)
        expected = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        expected[:, 0] = index
        torch.testing.assert_close(ids, expected)
    assert token_ids(height, width)[5].tolist() == [0.0, 1.0, 0.0]  # token 5: row 1, column 0 of 5 columns


def test_coefficient_heatmap_normalises_each_layer_by_its_largest_coefficient():
    """Rows are layers, columns basis entries; each row divided by its maximum, then coloured along the ramp
    (0 the first anchor, 1 the last, in between linear between neighbouring anchors)."""
    from analogy_core.heatmap import _RAMP, coefficient_heatmap, colourise

    coefficients = torch.tensor([[0.1, 0.4, 0.2], [0.3, 0.3, 0.6]])
    image = coefficient_heatmap(coefficients, cell_width=4, row_height=2)
    assert image.shape == (1, 4, 12, 3)
    expected = torch.tensor([[0.25, 1.0, 0.5], [0.5, 0.5, 1.0]])
    torch.testing.assert_close(colourise(torch.tensor([0.0, 1.0, 0.125])),
                               torch.stack([_RAMP[0], _RAMP[-1], (_RAMP[0] + _RAMP[1]) / 2]))
    for row in range(2):
        for entry in range(3):
            cell = image[0, 2 * row:2 * row + 2, 4 * entry:4 * entry + 4]
            torch.testing.assert_close(cell, colourise(expected[row, entry]).expand(2, 4, 3))
