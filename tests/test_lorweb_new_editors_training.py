"""python -m training.train_lorweb --backbone flux2:tiny | qwen_image_edit:tiny: the reference grid given the way each
editor's diffusers pipeline gives a reference image (checked against the pipelines' own helpers), a few steps end to
end on the synthetic data source, exact resume, and a basis file that records its family and that Load LoRA Basis,
Mix LoRA Basis and Apply LoRA to Model use on the right model and refuse on the other by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import Flux2KleinPipeline, QwenImageEditPlusPipeline
from safetensors.torch import load_file
from test_lora_comfy import rel_err
from test_lora_new_editors import RUNNERS, _pack, comfy_out
from tiny_models import tiny_flux2_pair, tiny_qwen_pair

from analogy_core.layouts import layout_of_diffusers_model
from analogy_core.lorweb.basis import basis_targets, load_basis
from training.backbone import load_query_encoder
from training.editors import Flux2Backbone, QwenImageEditBackbone, backbone_family, load_editor
from training.lorweb.config import load_config
from training.lorweb.task import main as train_lorweb

GRID = 64


def grid_images(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, GRID, GRID, 3, generator=torch.Generator().manual_seed(seed))


def test_flux2_takes_the_grid_as_its_pipeline_takes_a_reference_image():
    backbone = load_editor("flux2:tiny")
    pipe = Flux2KleinPipeline  # the ids, patchify and packing helpers are the same in Flux2Pipeline
    target, reference = grid_images(1), grid_images(2)
    # the pipeline's VAE path: _encode_vae_image (VAE mode, 2x2 patchify, batch-norm statistics), then _pack_latents
    fake = SimpleNamespace(vae=backbone.vae, _patchify_latents=pipe._patchify_latents)
    with torch.no_grad():
        latents = pipe._encode_vae_image(fake, reference.permute(0, 3, 1, 2) * 2 - 1, None)
    assert torch.allclose(backbone.encode_images(reference), pipe._pack_latents(latents), atol=1e-6)
    # ids: the target (T = 0), then the first reference image (T = 10), text (0, 0, 0, l)
    x_t, ref = backbone.encode_images(target), backbone.encode_images(reference)
    text, _ = backbone.encode_prompts(["make it red", "x"], "cpu")
    latent_ids = pipe._prepare_latent_ids(latents)
    img_ids = torch.cat([latent_ids, pipe._prepare_image_ids([latents[:1]]).expand(2, -1, -1)], dim=1)
    t, guidance = torch.tensor([0.3, 0.8]), torch.tensor([2.5, 2.5])
    with torch.no_grad():
        expected = backbone.transformer(hidden_states=torch.cat([x_t, ref], dim=1), encoder_hidden_states=text,
                                        timestep=t, img_ids=img_ids, txt_ids=pipe._prepare_text_ids(text),
                                        guidance=guidance, return_dict=False)[0][:, : x_t.shape[1]]
        got = backbone.predict(backbone.transformer, x_t, ref, t, text, None, guidance, GRID)
        without_reference = backbone.transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=t,
                                                 img_ids=latent_ids, txt_ids=pipe._prepare_text_ids(text),
                                                 guidance=guidance, return_dict=False)[0]
    assert torch.equal(got, expected)
    assert (got - without_reference).abs().max() > 1e-3, "the reference grid changes the prediction"
    # decoding inverts the packing: the VAE decodes the pipeline's unpatchified latents
    std = torch.sqrt(backbone.vae.bn.running_var.view(1, -1, 1, 1) + backbone.vae.config.batch_norm_eps)
    unpatched = pipe._unpatchify_latents(latents * std + backbone.vae.bn.running_mean.view(1, -1, 1, 1))
    with torch.no_grad():
        decoded = ((backbone.vae.decode(unpatched).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(backbone.decode_tokens(ref, GRID, GRID), decoded, atol=1e-5)


def test_qwen_image_edit_takes_the_grid_as_its_pipeline_takes_an_input_image():
    backbone = load_editor("qwen_image_edit:tiny")
    pipe = QwenImageEditPlusPipeline
    target, reference = grid_images(3), grid_images(4)
    fake = SimpleNamespace(vae=backbone.vae, latent_channels=backbone.vae.config.z_dim)
    with torch.no_grad():
        latents = pipe._encode_vae_image(fake, (reference.permute(0, 3, 1, 2) * 2 - 1).unsqueeze(2), None)
    b, c, _, h, w = latents.shape
    packed = pipe._pack_latents(latents, b, c, h, w)
    assert torch.allclose(backbone.encode_images(reference), packed, atol=1e-6)
    x_t = backbone.encode_images(target)
    text, _ = backbone.encode_prompts(["make it red", "x"], "cpu", reference)
    mask = torch.ones(text.shape[:2], dtype=torch.long)
    # img_shapes as QwenImageEditPlusPipeline.__call__ lists them: the output, then each input image, in tokens
    img_shapes = [[(1, h // 2, w // 2), (1, h // 2, w // 2)]] * b
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = backbone.transformer(hidden_states=torch.cat([x_t, packed], dim=1), encoder_hidden_states=text,
                                        encoder_hidden_states_mask=mask, timestep=t, img_shapes=img_shapes,
                                        return_dict=False)[0][:, : x_t.shape[1]]
        got = backbone.predict(backbone.transformer, x_t, packed, t, text, None, None, GRID)
        without_image = backbone.transformer(hidden_states=x_t, encoder_hidden_states=text,
                                             encoder_hidden_states_mask=mask, timestep=t,
                                             img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    assert torch.equal(got, expected)
    assert (got - without_image).abs().max() > 1e-3, "the input image changes the prediction"
    unpacked = pipe._unpack_latents(packed, GRID * 2, GRID * 2, 4)  # vae_scale_factor 2 here: 4 = 2 x packing
    mean = torch.tensor(backbone.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(backbone.vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        decoded = ((backbone.vae.decode(unpacked * std + mean).sample[:, :, 0] + 1) / 2).clamp(0, 1)
    assert torch.allclose(backbone.decode_tokens(packed, GRID, GRID), decoded.permute(0, 2, 3, 1), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# the trainer end to end

SPECS = {"flux2": "flux2:tiny", "qwen_image": "qwen_image_edit:tiny"}


def train(out, spec: str, steps: int, *extra: str) -> dict:
    return train_lorweb(["--preset", "tiny", "--backbone", spec, "--output-dir", str(out), "--max-steps", str(steps),
                         "--set", "batch_size=2", "--set", "checkpoint_every=2", "--set", "sample_every=100",
                         "--set", "report_to=none", *extra])


@pytest.fixture(scope="module", params=list(SPECS))
def trained(request, tmp_path_factory):
    """(family, spec, output folder of 4 straight steps, output folder of 2 steps then --resume to 4)."""
    family, spec = request.param, SPECS[request.param]
    straight, resumed = tmp_path_factory.mktemp(f"{family}_straight"), tmp_path_factory.mktemp(f"{family}_resumed")
    history = train(straight, spec, 4)
    assert len(history["losses"]) == 4 and all(torch.isfinite(torch.tensor(history["losses"])))
    train(resumed, spec, 2)
    assert train(resumed, spec, 4, "--resume")["start_step"] == 2
    return family, spec, straight, resumed


def test_the_basis_records_its_family_covers_every_block_linear_and_resumes_exactly(trained):
    family, spec, straight, resumed = trained
    basis = load_basis(straight / "lorweb_basis.safetensors")
    assert basis.family == family
    meta = basis.metadata
    assert meta["analogy.family"] == family and meta["analogy.backbone"] == spec
    assert meta["analogy.backbone_family"] == spec.split(":")[0] and meta["analogy.step"] == "4"
    transformer = load_editor(spec).transformer
    assert set(basis.layers) == set(basis_targets(layout_of_diffusers_model(transformer)))
    a = load_file(str(straight / "lorweb_basis.safetensors"))
    b = load_file(str(resumed / "lorweb_basis.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is exact"
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_B")), "training moved the basis"


def test_load_mix_apply_on_its_family_and_refused_on_the_other(trained, comfy_inproc, monkeypatch):
    family, _, straight, _ = trained
    nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    monkeypatch.setattr(nodes.folder_paths, "get_full_path",
                        lambda folder, name: str(straight / name) if folder == "lorweb" else None)
    basis, info = nodes.LoadLoRABasis().load("lorweb_basis.safetensors")
    assert basis.family == family and f"LoRA basis for {family}" in info
    encoder = load_query_encoder("tiny")
    images = {r: grid_images(10 + i, 1)[:, :32, :32] for i, r in enumerate(("a", "a_prime", "b"))}
    analogy = encoder.encode(images["a"], images["a_prime"], images["b"])
    lora, _, _ = nodes.MixLoRABasis().mix(basis, analogy, 1.0, 0)
    pairs = {"flux2": tiny_flux2_pair, "qwen_image": tiny_qwen_pair}
    _, own = pairs[family](comfy_inproc.comfy, seed=61)  # the tests' twin: same width, more blocks than trained
    patched, report = comfy_inproc.nodes.ApplyLoRAToModel().apply(own, lora, 1.0, "merge", False)
    assert f"matched {len(lora)}/{len(lora)} LoRA layers of the {family} model" in report
    inp = RUNNERS[family][0](seed=7)
    assert rel_err(comfy_out(patched, family, inp), comfy_out(own, family, inp)) > 1e-4, "the trained mix acts"
    other = "qwen_image" if family == "flux2" else "flux2"
    _, foreign = pairs[other](comfy_inproc.comfy, seed=62)
    with pytest.raises(ValueError, match=f"this LoRA is for {family} but the model is {other}"):
        comfy_inproc.nodes.ApplyLoRAToModel().apply(foreign, lora, 1.0, "merge", False)


def test_the_gpu_presets_validate_and_train_for_their_family():
    expected = {"flux2_klein_24gb": "flux2", "flux2_klein_80gb": "flux2", "qwen_image_edit_80gb": "qwen_image"}
    for preset, family in expected.items():
        cfg = load_config(preset)
        assert backbone_family(cfg.backbone) == family
        assert cfg.batch_size * cfg.gradient_accumulation_steps == 6, "the official effective batch"
        assert (cfg.mixed_precision, cfg.use_8bit_adam, cfg.gradient_checkpointing) == ("bf16", True, True)


@pytest.mark.parametrize("family", ["flux2", "qwen_image"])
def test_the_training_forward_is_comfyuis_reference_conditioning(comfy_inproc, family):
    """What the trainer computes with the grid as reference (diffusers) equals ComfyUI's own model given the grid's
    latent as ``ref_latents`` (what ReferenceLatent feeds FLUX.2 and TextEncodeQwenImageEditPlus feeds Qwen-Image-Edit),
    on the tiny twins: so a basis trained here sees at inference the conditioning it was trained with."""
    pairs = {"flux2": tiny_flux2_pair, "qwen_image": tiny_qwen_pair}
    model, patcher = pairs[family](comfy_inproc.comfy, seed=71)
    comfy_model = patcher.model.diffusion_model
    gen = torch.Generator().manual_seed(72)
    batch, side = 2, 4  # tokens per grid side (square: see qwen_inputs in test_lora_new_editors)
    t, text = torch.tensor([0.3, 0.8]), torch.randn(batch, 5, 24, generator=gen)
    if family == "flux2":
        backbone = Flux2Backbone(model, load_editor("flux2:tiny").vae, None)
        x_t, ref = (torch.randn(batch, side * side, 16, generator=gen) for _ in range(2))
        guidance = torch.tensor([2.5, 2.5])

        def image(tokens):  # ComfyUI's FLUX.2 latent: the packed channels, one token per latent pixel
            return tokens.transpose(1, 2).reshape(batch, 16, side, side)

        def comfy(refs):
            with torch.no_grad():
                out = comfy_model(image(x_t), t, text, guidance=guidance, ref_latents=refs)
            return out.reshape(batch, 16, -1).transpose(1, 2)
    else:
        backbone = QwenImageEditBackbone(model, load_editor("qwen_image_edit:tiny").vae, None)
        x_lat, ref_lat = (torch.randn(batch, 4, 1, 2 * side, 2 * side, generator=gen) for _ in range(2))
        x_t, ref, guidance = _pack(x_lat), _pack(ref_lat), None

        def comfy(refs):
            with torch.no_grad():
                return _pack(comfy_model(x_lat, t, text, ref_latents=refs))
    grid = side * backbone.token_pixels
    with torch.no_grad():
        ours = backbone.predict(model, x_t, ref, t, text, None, guidance, grid)
        alone = backbone.predict(model, x_t, None, t, text, None, guidance, grid)  # Edit Transfer's single image
    theirs, theirs_alone = comfy([image(ref)] if family == "flux2" else [ref_lat]), comfy(None)
    assert rel_err(theirs_alone, theirs) > 0.01, "the reference changes ComfyUI's output"
    assert rel_err(ours, theirs) <= 1e-5, rel_err(ours, theirs)
    assert rel_err(alone, theirs_alone) <= 1e-5, rel_err(alone, theirs_alone)
