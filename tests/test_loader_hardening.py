"""Issue 19, loaders: every crash class found by mutating files of the newer loaders (Load LoRA Hypernetwork, Load
Region Model) and by sweeping the header configs of all of them, and every meaningless file they accepted, ends in
the pack's own error naming the file and what is wrong. Each test here failed (crash or acceptance) before the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from analogy_core.basis import BasisError, load_basis
from analogy_core.loc import HypernetworkError, load_hypernetwork
from analogy_core.lora import LoRAError
from analogy_core.lora_io import load_lora_file
from analogy_core.regions import RegionError, load_region_predictor
from loader_cases import basis_samples, hypernetwork_samples, lora_samples, region_samples


def write(path: Path, tensors: dict, metadata: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def with_config(sample, key: str, edit) -> tuple[dict, dict]:
    """A sample whose JSON config under metadata ``key`` went through ``edit`` (in place)."""
    tensors, metadata = sample
    config = json.loads(metadata[key])
    edit(config)
    return tensors, {**metadata, key: json.dumps(config)}


# -- Load LoRA Hypernetwork -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [["clip"], {"clip": 1}], ids=["list", "object"])
def test_hypernetwork_encoder_family_of_another_type_is_refused(tmp_path, family):
    """Was TypeError (membership test of an unhashable value)."""
    sample = with_config(hypernetwork_samples()[0], "analogy.loc", lambda c: c["encoder"].update(family=family))
    path = write(tmp_path / "h.safetensors", *sample)
    with pytest.raises(HypernetworkError, match=r"^h\.safetensors: the recorded encoder's family is a JSON "):
        load_hypernetwork(path)


def test_hypernetwork_target_that_is_no_attention_layer_is_refused(tmp_path):
    """Was accepted: the LoRA it generated named layers no UNet has."""
    sample = with_config(hypernetwork_samples()[0], "analogy.loc", lambda c: c["targets"][0].__setitem__(0, "x/../y"))
    path = write(tmp_path / "h.safetensors", *sample)
    with pytest.raises(HypernetworkError, match=r"^h\.safetensors: target 'x/\.\./y' is not the path of an attention"):
        load_hypernetwork(path)


# -- Load Region Model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["mean", "std"])
def test_region_mean_or_std_holding_a_huge_integer_is_refused(tmp_path, field):
    """Was OverflowError (math.isfinite on a 401-digit integer)."""
    sample = with_config(region_samples()[0], "analogy.region_spec", lambda c: c.update({field: [10**400, 1, 1]}))
    path = write(tmp_path / "r.safetensors", *sample)
    with pytest.raises(RegionError, match=rf"^r\.safetensors: region spec {field} must be three numbers .*a huge "):
        load_region_predictor(path)


def test_region_encoder_family_of_another_type_is_refused(tmp_path):
    sample = with_config(region_samples()[0], "analogy.region_spec", lambda c: c["encoder"].update(family=["clip"]))
    path = write(tmp_path / "r.safetensors", *sample)
    with pytest.raises(RegionError, match=r"^r\.safetensors: region spec encoder\.family must be one of"):
        load_region_predictor(path)


# -- Load LoRA Basis and Load LoRA (configs in their headers, found by the same field sweep) --------------------------


@pytest.mark.parametrize("family", [["clip"], {"clip": 1}], ids=["list", "object"])
def test_basis_settings_encoder_family_of_another_type_is_refused(tmp_path, family):
    """Was TypeError (membership test of an unhashable value)."""
    sample = with_config(basis_samples()[0], "analogy.lorweb_settings", lambda c: c.update(encoder_family=family))
    path = write(tmp_path / "b.safetensors", *sample)
    with pytest.raises(BasisError, match=r"^b\.safetensors: encoder_family must be one of .*, got a JSON "):
        load_basis(path)


def test_basis_settings_that_do_not_fit_its_widths_are_refused_at_load(tmp_path):
    """Was accepted, then failed at the first mix (lora_heads must divide the key width)."""
    sample = with_config(basis_samples()[0], "analogy.lorweb_settings", lambda c: c.update(lora_heads=3))
    path = write(tmp_path / "b.safetensors", *sample)
    with pytest.raises(BasisError, match=r"^b\.safetensors: lora_heads=3 does not divide the basis' key width 8"):
        load_basis(path)


@pytest.mark.parametrize("field", ["r", "lora_alpha"])
def test_peft_metadata_holding_a_huge_integer_is_refused(tmp_path, field):
    """Was OverflowError (an integer of 400 digits converted to float)."""
    tensors, metadata = next(s for s in lora_samples() if "lora_adapter_metadata" in s[1])
    sample = with_config((tensors, metadata), "lora_adapter_metadata", lambda c: c.update({field: 10**400}))
    path = write(tmp_path / "l.safetensors", *sample)
    with pytest.raises(LoRAError, match=rf"^l\.safetensors: lora_adapter_metadata: {field} is a huge integer"):
        load_lora_file(path)
