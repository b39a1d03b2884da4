"""LoRWeB settings: read from the official config.yaml and from basis metadata, refused clearly when unsupported; basis
files told apart by header; config.yaml found beside the basis or one folder up."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.lorweb import files as basis_files
from analogy_core.lorweb.basis import BasisError, random_basis
from analogy_core.lorweb.files import find_basis_config, is_basis_file, load_basis_with_settings
from analogy_core.lorweb.settings import (
    OFFICIAL,
    LoRWeBSettings,
    LoRWeBSettingsError,
    build_query,
    parse_lorweb_config,
    query_width,
    read_lorweb_config,
)

SHAPES = {"transformer_blocks.0.attn.to_q": (16, 12), "single_transformer_blocks.0.proj_out": (12, 20)}


def official_config(**network_kwargs) -> str:
    """An official ai-toolkit training config (the layout run.py saves as config.yaml), with these network_kwargs."""
    kwargs = {"loras_num": 6, "lora_keys_dim": 8, "lora_heads": 1, "lora_softmax": True, "mixing_coeffs_type": "mean",
              "external_query": True, "pooling_type": "avg", "query_projection_type": "linear",
              "external_query_model": "openai/clip-vit-large-patch14", "query_mode": "cat-aa'b"}
    kwargs.update(network_kwargs)
    lines = "\n".join(f"          {k}: {v!r}" if isinstance(v, str) else f"          {k}: {str(v).lower()}"
                      for k, v in kwargs.items() if v is not None)
    return textwrap.dedent("""\
        job: extension
        config:
          name: lorweb_model
          process:
            - type: sd_trainer
              training_folder: output
              network:
                type: attlora
                linear: 2
                linear_alpha: 2
                network_kwargs:
        """) + lines + "\nmeta:\n  name: lorweb_model\n  version: '1.0'\n"


def write_basis(path, query_dim=3 * 768, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    basis = random_basis(SHAPES, num_entries=6, rank=2, key_dim=8, query_dim=query_dim, seed=1, **kwargs)
    save_file({k: v.contiguous() for k, v in basis.state_dict().items()}, path)  # released style: no metadata
    return path


def test_official_defaults_are_the_released_checkpoints():
    s = LoRWeBSettings()
    assert s == OFFICIAL
    assert (s.lora_heads, s.lora_softmax, s.mixing_coeffs_type, s.pooling_type, s.query_projection_type,
            s.query_mode, s.external_query_model, s.encoder_family) == (
        1, True, "mean", "avg", "linear", "cat-aa'b", "openai/clip-vit-large-patch14", "clip")
    assert s.encoder_name is None and s.source == "official defaults"  # defaults bind the family only
    assert s.query_width(768) == 2304 and query_width("a'-a", 768) == 768 and query_width("ca'-ca+cb", 512) == 512


def test_config_yaml_is_read_like_the_official_inference(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(official_config(lora_heads=2, lora_softmax=False, mixing_coeffs_type="sum", query_mode="ca'-ca",
                                    pooling_type="max", external_query_model="google/siglip2-base-patch16-224"))
    config = read_lorweb_config(path)
    s = config.settings
    assert (s.lora_heads, s.lora_softmax, s.mixing_coeffs_type, s.query_mode, s.pooling_type) == (
        2, False, "sum", "ca'-ca", "max")
    assert (s.encoder_family, s.encoder_name, s.encoder_embed_dim) == ("siglip2", "SigLIP2 ViT-B/16", 768)
    assert (config.num_entries, config.key_dim, config.rank) == (6, 8, 2) and str(path) in s.source
    # absent keys take the official values; run.py's CLI spelling of booleans is accepted
    path.write_text(official_config(lora_heads=None, lora_softmax="false", mixing_coeffs_type=None,
                                    query_mode=None))
    s = read_lorweb_config(path).settings
    assert (s.lora_heads, s.lora_softmax, s.mixing_coeffs_type, s.query_mode) == (1, False, "mean", "cat-aa'b")
    assert s.encoder_name == "CLIP ViT-L/14"  # a named model binds the exact encoder


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_heads": 0}, "lora_heads must be a positive integer"),
    ({"lora_heads": True}, "lora_heads must be a positive integer"),
    ({"lora_softmax": "maybe"}, "lora_softmax must be true"),
    ({"mixing_coeffs_type": "max"}, "mixing_coeffs_type must be 'mean' or 'sum'"),
    ({"pooling_type": "median"}, "pooling_type must be 'avg' or 'max'"),
    ({"query_projection_type": "none"}, "query_projection_type 'none' is not supported"),
    ({"query_mode": "caa'b"}, r"query_mode \"caa'b\" \(a query from the composite with B' blanked"),
    ({"query_mode": "cat-paa'b"}, "patch-token sequences"),
    ({"query_mode": "b-a"}, "unknown query_mode 'b-a'"),
    ({"external_query": False}, "external_query=False .* is not supported"),
    ({"external_query_model": "facebook/vit-mae-base"}, "external_query_model 'facebook/vit-mae-base': cannot tell"),
])
def test_unsupported_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(LoRWeBSettingsError, match=message):
        LoRWeBSettings.from_network_kwargs(kwargs, source="config.yaml")


@pytest.mark.parametrize("document, message", [
    ({"config": {"name": "x"}}, "expected config.process"),
    ({"config": {"process": []}}, r"expected config.process\[0\]"),
    ({"config": {"process": [{"network": {"type": "lora", "network_kwargs": {}}}]}}, "type 'lora' is not a LoRWeB"),
    ({"config": {"process": [{"network": {"type": "attlora"}}]}}, "network.network_kwargs"),
    ({"config": {"process": [{"network": {"network_kwargs": {"loras_num": "32"}}}]}}, "loras_num must be an int"),
])
def test_malformed_configs_are_explained(document, message):
    with pytest.raises(LoRWeBSettingsError, match=message):
        parse_lorweb_config(document)


def test_metadata_round_trip_and_the_first_trainers_record():
    info = EncoderInfo.describe(32, 64, 224, 14, 3)
    s = LoRWeBSettings(lora_heads=2, lora_softmax=False, mixing_coeffs_type="sum", query_mode="a'-a+b",
                       source="trainer").for_encoder(info, "/models/tiny-clip")
    back = LoRWeBSettings.from_metadata(s.to_metadata())
    assert back == s and back.query_mode == "ca'-ca+cb" and back.encoder_name == info.name
    assert back.external_query_model == "/models/tiny-clip" and back.source == "trainer"
    legacy = LoRWeBSettings.from_metadata({"analogy.encoder": info.name})  # files written before the settings key
    assert legacy.encoder_name == info.name and legacy.query_mode == "cat-aa'b" and legacy.source == "basis metadata"
    assert LoRWeBSettings.from_metadata({}).source == "official defaults"
    with pytest.raises(LoRWeBSettingsError, match="does not know: lora_rank"):
        LoRWeBSettings.from_metadata({"analogy.lorweb_settings": '{"lora_rank": 4}'})


def test_query_modes_are_the_official_ones():
    gen = torch.Generator().manual_seed(0)
    e = {r: torch.randn(2, 5, generator=gen) for r in ("a", "a_prime", "b")}
    embedding = AnalogyEmbedding(EncoderInfo.describe(5, 8, 224, 14, 2), e)
    torch.testing.assert_close(build_query(embedding, "cat-aa'b"), torch.cat([e["a"], e["a_prime"], e["b"]], dim=1))
    torch.testing.assert_close(build_query(embedding, "a'-a"), e["a_prime"] - e["a"])
    torch.testing.assert_close(build_query(embedding, "a'-a+b"), e["a_prime"] - e["a"] + e["b"])
    pair = AnalogyEmbedding(embedding.encoder, {r: e[r] for r in ("a", "a_prime")})
    assert build_query(pair, "ca'-ca").shape == (2, 5)  # B is not needed for a'-a
    with pytest.raises(ValueError, match="no b image"):
        build_query(pair, "cat-aa'b")


def test_encoder_checks():
    clip_l = EncoderInfo.describe(768, 1024, 224, 14, 24)
    clip_336 = EncoderInfo.describe(768, 1024, 336, 14, 24)
    siglip2 = EncoderInfo.describe(768, 768, 224, 16, 12, family="siglip2")
    assert (clip_l.name, siglip2.name, siglip2.family) == ("CLIP ViT-L/14", "SigLIP2 ViT-B/16", "siglip2")
    OFFICIAL.check_encoder(clip_l)
    OFFICIAL.check_encoder(clip_336)  # defaults bind the family only
    with pytest.raises(LoRWeBSettingsError, match=r"trained with queries from a CLIP model .* SigLIP2 ViT-B/16"):
        OFFICIAL.check_encoder(siglip2)
    named = LoRWeBSettings.from_network_kwargs({"external_query_model": "openai/clip-vit-large-patch14"})
    with pytest.raises(LoRWeBSettingsError, match=r"queries from CLIP ViT-L/14 .* CLIP ViT-L/14@336"):
        named.check_encoder(clip_336)
    with pytest.raises(ValueError, match="unknown image-encoder family 'vit'"):
        EncoderInfo.describe(768, 768, 224, 16, 12, family="vit")


# -- files ------------------------------------------------------------------------------------------------------------
def test_bases_are_told_from_loras_by_header_and_cached(tmp_path, monkeypatch):
    released = write_basis(tmp_path / "released.safetensors")
    own = random_basis(SHAPES, num_entries=2, rank=2, key_dim=8, query_dim=12).save(tmp_path / "own.safetensors")
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.ones(2, 4), "transformer.x.lora_B.weight": torch.ones(4, 2)}, lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert [is_basis_file(p) for p in (released, own, lora, junk, tmp_path / "missing.safetensors")] == [
        True, True, False, False, False]

    reads = []
    real = basis_files._read_is_basis
    monkeypatch.setattr(basis_files, "_read_is_basis", lambda path: reads.append(path) or real(path))
    assert is_basis_file(lora) is False and is_basis_file(released) is True and reads == []  # served from the cache
    write_basis(lora)  # the LoRA is replaced by a basis: new size and mtime, read again
    os.utime(lora, ns=(1, 1))
    assert is_basis_file(lora) is True and reads == [str(lora)]
    same = tmp_path / "same.safetensors"  # rewritten in place at the same size: its new mtime alone says so
    save_file({"x.weight": torch.ones(2)}, same, metadata={"analogy.kind": "lorweb_basiz"})
    assert is_basis_file(same) is False
    data = same.read_bytes().replace(b"lorweb_basiz", b"lorweb_basis")
    same.write_bytes(data)
    os.utime(same, ns=(2, 2))
    assert same.stat().st_size == len(data) and is_basis_file(same) is True and reads[-1] == str(same)


def test_config_is_found_beside_or_one_folder_up(tmp_path):
    beside = write_basis(tmp_path / "run" / "lorweb_model.safetensors")
    assert find_basis_config(beside) is None
    (tmp_path / "config.yaml").write_text(official_config())  # the released layout: config.yaml above the weights
    assert find_basis_config(beside) == (tmp_path / "config.yaml").resolve()
    (tmp_path / "run" / "config.yaml").write_text(official_config())
    assert find_basis_config(beside) == (tmp_path / "run" / "config.yaml").resolve()


def test_load_with_settings_precedence(tmp_path):
    path = write_basis(tmp_path / "lorweb_model" / "lorweb_model.safetensors")
    basis, note = load_basis_with_settings(path)
    assert basis.settings == OFFICIAL and note == "settings: official defaults"
    (tmp_path / "config.yaml").write_text(official_config(lora_softmax=False, lora_heads=2))
    basis, note = load_basis_with_settings(path)
    assert (basis.settings.lora_softmax, basis.settings.lora_heads) == (False, 2) and "config.yaml" in note
    explicit = tmp_path / "elsewhere.yaml"
    explicit.write_text(official_config(mixing_coeffs_type="sum"))
    basis, note = load_basis_with_settings(path, explicit)
    assert basis.settings.mixing_coeffs_type == "sum" and basis.settings.lora_softmax and "elsewhere.yaml" in note

    # a file that records its settings keeps them over a config.yaml found by location ...
    recorded = basis.save(tmp_path / "lorweb_model" / "own.safetensors")
    basis, note = load_basis_with_settings(recorded)
    assert basis.settings.mixing_coeffs_type == "sum" and basis.settings.lora_softmax and "ignored" in note
    # ... and an explicit config.yaml that contradicts them is an error
    with pytest.raises(BasisError, match="contradicts the settings recorded in own.safetensors"):
        load_basis_with_settings(recorded, tmp_path / "config.yaml")


@pytest.mark.parametrize("changes, message", [
    ({"loras_num": 32}, "loras_num=32 but the basis has 6"),
    ({"lora_keys_dim": 128}, "lora_keys_dim=128 but the basis has 8"),
    ({"lora_heads": 3}, "lora_heads=3 does not divide the basis' key width 8"),
    ({"query_mode": "ca'-ca"}, "the basis takes 2304-d queries but CLIP ViT-L/14 with query_mode ca'-ca gives 768-d"),
])
def test_a_config_of_another_basis_is_refused(tmp_path, changes, message):
    path = write_basis(tmp_path / "b.safetensors")
    (tmp_path / "config.yaml").write_text(official_config(**changes))
    with pytest.raises(BasisError, match=message + r".*\(found next to the basis; pass the right one"):
        load_basis_with_settings(path)


# -- the Mix LoRA Basis policy, without ComfyUI -------------------------------------------------------------------------
def test_mix_policy_reports_entries_by_magnitude_and_checks_its_inputs():
    from analogy_core.lorweb.mix import mix_analogy, top_entries

    info = EncoderInfo.describe(4, 8, 224, 14, 2)
    basis = random_basis(SHAPES, num_entries=6, rank=2, key_dim=8, query_dim=12, seed=2).with_settings(
        LoRWeBSettings(lora_softmax=False))
    gen = torch.Generator().manual_seed(0)
    analogy = AnalogyEmbedding(info, {r: torch.randn(2, 4, generator=gen) * 5 for r in ("a", "a_prime", "b")})
    result = mix_analogy(basis, analogy, sample=1)
    signed = torch.cat(list(result.coefficients.values()))
    assert (signed < 0).any() and torch.equal(result.table, signed.abs())  # tanh: signed mix, magnitudes drawn
    first = signed.abs().mean(0).argmax().item()
    assert result.report.endswith(top_entries(result.coefficients))
    assert top_entries(result.coefficients).startswith(f"mean coefficient of the top entries: #{first}="
                                                       f"{signed.mean(0)[first]:.3f}")
    torch.testing.assert_close(signed, torch.cat(list(basis.coefficients(settings_query(basis, analogy, 1)).values())))
    with pytest.raises(ValueError, match="blend_mode must be one of"):
        mix_analogy(basis, analogy, analogy_2=analogy, blend_mode="median")
    with pytest.raises(ValueError, match="blend must be between 0 and 1"):
        mix_analogy(basis, analogy, analogy_2=analogy, blend=1.5)
    with pytest.raises(ValueError, match="sample 2 is out of range: the ANALOGY holds 2"):
        mix_analogy(basis, analogy, sample=2)
    # a blend of batched analogies mixes item `sample` of each (item 0 of analogy_2 only when it holds fewer)
    second = AnalogyEmbedding(info, {r: torch.randn(2, 4, generator=gen) * 5 for r in ("a", "a_prime", "b")})
    blended = mix_analogy(basis, analogy, sample=1, analogy_2=second, blend=0.25).coefficients
    c1, c2 = (basis.coefficients(settings_query(basis, a, 1)) for a in (analogy, second))
    assert not torch.allclose(c2[next(iter(c2))], basis.coefficients(settings_query(basis, second, 0))[next(iter(c2))])
    for key in blended:
        torch.testing.assert_close(blended[key], 0.75 * c1[key] + 0.25 * c2[key])
    single = AnalogyEmbedding(info, {r: second.image_embeds[r][:1] for r in ("a", "a_prime", "b")})
    c_single = basis.coefficients(settings_query(basis, single, 0))
    for key, value in mix_analogy(basis, analogy, sample=1, analogy_2=single, blend=0.25).coefficients.items():
        torch.testing.assert_close(value, 0.75 * c1[key] + 0.25 * c_single[key])
    other = AnalogyEmbedding(info, {r: torch.randn(1, 4) for r in ("a", "a_prime")})  # no B for cat-aa'b
    with pytest.raises(ValueError, match="no b image"):
        mix_analogy(basis, analogy, analogy_2=other)


def settings_query(basis, analogy, sample):
    return torch.cat([analogy.image_embeds[r][sample: sample + 1] for r in ("a", "a_prime", "b")], dim=1)
