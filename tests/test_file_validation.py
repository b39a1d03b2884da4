"""The tensor-file validation layer (analogy_core.files) and what the LoRA and basis loaders refuse on top of it.

Each case of issue 10's list has a test here: a valid file is built, one thing is damaged, and the exact refusal
(a pack error naming the file and what is wrong) is asserted; formats that must load (float8) load exactly.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from analogy_core.lorweb.basis import BasisError, load_basis, random_basis
from analogy_core.files import (MAX_UPDATE_NORM, TensorFileError, check_finite, check_state_dict, json_metadata,
                                low_rank_norm, match_shapes, naming_file, read_header, read_tensor_file,
                                require_keys, stale_temp_files, write_safetensors_atomic)
from analogy_core.layouts import flux_layout
from analogy_core.lora import LoRAError
from analogy_core.lora_io import load_lora_file
from tiny_models import FLUX_DIFFUSERS

GEN = torch.Generator().manual_seed(0)
KEY = "transformer.transformer_blocks.0.attn.to_q"


def rand(*shape, scale=0.1):
    return torch.randn(*shape, generator=GEN) * scale


@pytest.fixture(scope="module")
def tiny_flux():
    return flux_layout(**FLUX_DIFFUSERS)


def lora_tensors(down=None, up=None, **extra):
    tensors = {f"{KEY}.lora_A.weight": rand(2, 32) if down is None else down,
               f"{KEY}.lora_B.weight": rand(32, 2) if up is None else up}
    tensors.update({f"{KEY}.{k}": v for k, v in extra.items()})
    return tensors


def write_raw(path, header: dict | str, data: bytes = b"", header_len: int | None = None):
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def header_of(tensors, metadata=None) -> tuple[dict, bytes]:
    blob = save_bytes(tensors, metadata=metadata)
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


# -- the header --------------------------------------------------------------------------------------------------------


def test_a_valid_file_reads_with_its_metadata_and_stored_dtypes(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.float16)}, path, metadata={"k": "v"})
    tf = read_tensor_file(path, "test file")
    assert tf.metadata == {"k": "v"} and tf.stored_dtypes == {"w": "F32", "b": "F16"}
    assert torch.equal(tf.tensors["w"], torch.ones(2, 3)) and tf.tensors["b"].dtype == torch.float16
    header = read_header(path)
    assert header.entries["w"].shape == (2, 3) and header.entries["w"].end - header.entries["w"].begin == 24


def test_header_length_is_bounded_before_the_header_is_read(tmp_path):
    path = write_raw(tmp_path / "big.safetensors", "{" + " " * 40_000 + "}")  # a valid, padded 40 kB header
    assert read_tensor_file(path).tensors == {}
    with pytest.raises(TensorFileError, match=r"big.safetensors: the header declares 40002 bytes, more than the 1024"):
        read_tensor_file(path, max_header_bytes=1024)
    # the 8-byte length prefix counts: a header declared to end just past the file is truncated, not corrupt JSON
    short = write_raw(tmp_path / "short.safetensors", "{}", data=b"\0" * 4, header_len=8)
    with pytest.raises(TensorFileError, match=r"short.safetensors: not a safetensors .*or truncated \(the header "
                                              r"declares 8 bytes in a 14-byte file\)"):
        read_tensor_file(short)
    declared = write_raw(tmp_path / "declared.safetensors", "{}", header_len=3 * 2**30)  # a 3 GB header in 10 bytes
    with pytest.raises(TensorFileError, match=r"declared.safetensors: not a safetensors .*declares 3221225472 bytes"):
        read_tensor_file(declared)


@pytest.mark.parametrize("change, message", [
    (lambda h: h["w"].pop("data_offsets"), "tensor 'w': header entry has no data_offsets"),
    (lambda h: h["w"].update(dtype="F4"), r"tensor 'w' is stored as F4 \(packed 4-bit floats\), which this pack"),
    (lambda h: h["w"].update(dtype="F8_E8M0"), "stored as F8_E8M0 .*block scales"),
    (lambda h: h["w"].update(dtype="Q4_K"), "tensor 'w': unknown dtype 'Q4_K'"),
    (lambda h: h["w"].update(dtype=7), "tensor 'w': dtype is a JSON number, expected a name"),
    (lambda h: h["w"].update(shape=[2, -3]), "tensor 'w': shape .* non-negative"),
    (lambda h: h["w"].update(shape=[2, 3.0]), "tensor 'w': shape .* non-negative"),
    (lambda h: h["w"].update(shape=[4, 4]),
     r"tensor 'w': shape \[4, 4\] of F32 needs 64 bytes but data_offsets span 24"),
    (lambda h: h["w"].update(shape=[2, 2]),  # fewer bytes than its span: the span's tail would be read as nothing
     r"tensor 'w': shape \[2, 2\] of F32 needs 16 bytes but data_offsets span 24"),
    (lambda h: h["w"].update(data_offsets=[0, "24"]), "tensor 'w': data_offsets .* is not a pair of ints"),
    (lambda h: h["w"].update(data_offsets=[0, 10**6]), r"data_offsets \[0, 1000000\] lie outside the file's 36-byte"),
    (lambda h: (h["w"].update(data_offsets=[0, 24]), h["b"].update(data_offsets=[12, 24])), "overlaps the previous"),
    (lambda h: h.update(w=[1, 2]), "tensor 'w': header entry is a JSON array"),
    (lambda h: h.update(__metadata__={"n": 5}), "header metadata 'n' is a JSON number; .* only string values"),
    (lambda h: h.update(__metadata__={"n": None}), "header metadata 'n' is a JSON null"),
    (lambda h: h.update(__metadata__=["x"]), "the header's __metadata__ is a JSON array"),
])
def test_damaged_headers_get_named_errors(tmp_path, change, message):
    header, data = header_of({"w": torch.ones(2, 3), "b": torch.ones(3)})
    change(header)
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(TensorFileError, match="^bad.safetensors: .*" + message):
        read_tensor_file(path)


def test_structural_json_damage(tmp_path):
    header, data = header_of({"w": torch.ones(2)})
    text = json.dumps(header)
    cases = {
        "deep": (text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested far deeper"),
        "duplicate": (text[:-1] + ', "w": ' + json.dumps(header["w"]) + "}", "key 'w' appears twice"),
        "nan": (text.replace("[0, 8]", "[0, NaN]"), "not JSON: NaN is not valid JSON"),
        "latin1": (text.replace('"w"', '"\udcff"'), "not UTF-8"),
        "array": ("[1, 2]", "a JSON list, expected an object"),
    }
    for name, (text, message) in cases.items():
        raw = text.encode(errors="surrogateescape")
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        with pytest.raises(TensorFileError, match=f"^{name}.safetensors: corrupt safetensors header.*{message}"):
            read_tensor_file(path)


def test_gaps_and_trailing_bytes(tmp_path):
    header, data = header_of({"w": torch.ones(2), "b": torch.ones(2)})
    path = write_raw(tmp_path / "tail.safetensors", header, data + b"\0" * 8)
    with pytest.raises(TensorFileError, match="describes 16 bytes of tensor data but the file holds 24"):
        read_tensor_file(path)
    header["b"]["data_offsets"] = [12, 20]
    header["w"]["data_offsets"] = [0, 8]
    path = write_raw(tmp_path / "gap.safetensors", header, data + b"\0" * 4)
    with pytest.raises(TensorFileError, match="leaves a gap before it"):
        read_tensor_file(path)


def test_dtypes_the_caller_does_not_accept_are_refused_by_name(tmp_path):
    path = tmp_path / "ints.safetensors"
    save_file(lora_tensors(up=torch.ones(32, 2, dtype=torch.int64)), path)
    with pytest.raises(TensorFileError, match="is stored as I64; a LoRA basis must hold BF16, F16, F32"):
        read_tensor_file(path, "LoRA basis")
    with pytest.raises(LoRAError, match="ints.safetensors: layer .* up is stored as torch.int64; LoRA weights are "
                                        "floating point"):
        load_lora_file(path)


# -- float8 and other real dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_loras_load_exactly_upcast(tmp_path, tiny_flux, dtype):
    down, up = rand(2, 32, scale=0.5).to(dtype), rand(32, 2, scale=0.5).to(dtype)
    assert down.float().abs().sum() > 0  # the values survive float8 rounding: the comparison below means something
    path = tmp_path / "f8.safetensors"
    save_file(lora_tensors(down, up, alpha=torch.tensor(1.0)), path)
    tf = read_tensor_file(path)
    key = f"{KEY}.lora_A.weight"
    assert tf.stored_dtypes[key] in ("F8_E4M3", "F8_E5M2") and tf.tensors[key].dtype == torch.bfloat16
    layer = load_lora_file(path, tiny_flux).lora.layers["transformer_blocks.0.attn.to_q"]
    torch.testing.assert_close(layer.delta_weight(torch.float64), 0.5 * up.double() @ down.double(), rtol=0, atol=0)


def test_float8_basis_loads(tmp_path):
    basis = random_basis({"transformer_blocks.0.attn.to_q": (32, 32)}, num_entries=3, rank=2, key_dim=4, query_dim=6)
    path = tmp_path / "f8basis.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in basis.state_dict().items()}, path)
    loaded = load_basis(path).layers["transformer_blocks.0.attn.to_q"]
    expected = basis.layers["transformer_blocks.0.attn.to_q"].A.to(torch.float8_e4m3fn).float()
    assert expected.abs().sum() > 0 and torch.equal(loaded.A.float(), expected)


# -- what the LoRA loader refuses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tensors, message", [
    (lora_tensors(down=rand(32)), r"down \[32\] and up \[32, 2\] must both be 2-D"),
    (lora_tensors(down=torch.zeros(0, 32), up=torch.zeros(32, 0)), "has rank 0"),
    (lora_tensors(down=rand(2, 0)), "has an empty dimension"),
    (lora_tensors(alpha=torch.ones(3)), r"alpha must be one finite number, got a tensor of shape \[3\]"),
    (lora_tensors(alpha=torch.tensor(float("nan"))), "alpha must be one finite number"),
    (lora_tensors(down=torch.full((2, 32), 1e20), up=torch.full((32, 2), 1e20)),
     r"the update's norm is 6.4e\+41, beyond"),
    (lora_tensors(alpha=torch.tensor(1e9)), "the update's norm is .*, beyond the 10000"),
    (lora_tensors(down=rand(2, 32, 3, 3), up=rand(32, 2, 3, 3)), "a conv LoRA's up must have a 1x1 kernel"),
])
def test_meaningless_loras_are_refused(tmp_path, tiny_flux, tensors, message):
    path = tmp_path / "bad lora.safetensors"
    save_file(tensors, path)
    with pytest.raises(LoRAError, match="^bad lora.safetensors: layer .*" + message):
        load_lora_file(path, tiny_flux)


def test_large_but_sane_updates_still_load(tmp_path, tiny_flux):
    """The norm bound leaves room: a strong update (norm ~ 2000, far above trained LoRAs) loads."""
    path = tmp_path / "strong.safetensors"
    save_file(lora_tensors(torch.full((2, 32), 8.0), torch.full((32, 2), 4.0)), path)
    layer = load_lora_file(path, tiny_flux).lora.layers["transformer_blocks.0.attn.to_q"]
    assert 1000 < low_rank_norm(layer.up, layer.down, layer.scale) < MAX_UPDATE_NORM


@pytest.mark.parametrize("metadata, message", [
    ('{"r": 0, "lora_alpha": 2}', "r is 0, expected a positive integer"),
    ('{"r": 2, "lora_alpha": "x"}', "lora_alpha is 'x', expected a number"),
    ('{"r": 2, "lora_alpha": 2, "alpha_pattern": {"(": 1}}', r"alpha_pattern key '\(' is not a module name"),
    ('{"r": 2, "lora_alpha": 2, "alpha_pattern": {"(a+)+$": 1}}', "alpha_pattern key .* is not a module name"),
    ('{"r": 2, "lora_alpha": 2, "alpha_pattern": []}', "alpha_pattern is a list, expected an object"),
    ('{"r": 2, "lora_alpha": 2, "rank_pattern": {"to_q": 0}}', "rank_pattern.* is 0, expected a positive integer"),
    ("[1, 2]", "'lora_adapter_metadata' is a JSON array, expected an object"),
    ("{" * 50_000, "'lora_adapter_metadata' is (not valid JSON|JSON nested far too deeply)"),
])
def test_bad_peft_metadata_is_refused(tmp_path, tiny_flux, metadata, message):
    path = tmp_path / "meta.safetensors"
    save_file(lora_tensors(), path, metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(LoRAError, match="^meta.safetensors: .*" + message):
        load_lora_file(path, tiny_flux)


def test_peft_metadata_null_counts_as_absent_and_patterns_set_alpha(tmp_path, tiny_flux):
    other = "transformer.transformer_blocks.0.attn.to_k"
    tensors = {**lora_tensors(), f"{other}.lora_A.weight": rand(2, 32), f"{other}.lora_B.weight": rand(32, 2)}
    path = tmp_path / "peft.safetensors"
    save_file(tensors, path, metadata={"lora_adapter_metadata": "null"})
    assert {layer.scale for layer in load_lora_file(path, tiny_flux).lora.layers.values()} == {1.0}
    config = {"r": 2, "lora_alpha": 4, "alpha_pattern": {"transformer_blocks.0.attn.to_q": 1}}
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(config)})
    layers = load_lora_file(path, tiny_flux).lora.layers
    assert layers["transformer_blocks.0.attn.to_q"].scale == 0.5  # alpha_pattern's 1 / r
    assert layers["transformer_blocks.0.attn.to_k"].scale == 2.0  # lora_alpha 4 / r


# -- what the basis loader refuses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(num_entries=0), "a basis needs at least one entry.*N=0"),
    (dict(key_dim=0), "a basis needs at least one entry.*d=0"),
    (dict(rank=0), "a basis needs at least one entry.*r=0"),
])
def test_empty_bases_are_refused(tmp_path, change, message):
    settings = dict(num_entries=3, rank=2, key_dim=4, query_dim=6) | change
    basis = random_basis({"transformer_blocks.0.attn.to_q": (32, 32)}, **settings)
    path = tmp_path / "empty.safetensors"
    save_file(basis.state_dict(), path)
    with pytest.raises(BasisError, match="^empty.safetensors: .*" + message):
        load_basis(path)


@pytest.mark.parametrize("role, value, message", [
    ("lora_A", 1e12, r"entry 0: the update's norm is .*, beyond the 10000"),
    ("lora_keys", 1e30, r"lora_keys holds values up to 1e\+30, beyond the 10000"),
    ("att_lora_to_q.weight", -1e8, r"att_lora_to_q holds values up to 1e\+08"),
])
def test_absurd_basis_values_are_refused(tmp_path, role, value, message):
    basis = random_basis({"transformer_blocks.0.attn.to_q": (32, 32)}, num_entries=3, rank=2, key_dim=4, query_dim=6)
    tensors = basis.state_dict()
    key = f"transformer.transformer_blocks.0.attn.to_q.{role}"
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    if role == "lora_A":
        tensors[key][0] = value
    path = tmp_path / "absurd.safetensors"
    save_file(tensors, path)
    with pytest.raises(BasisError, match="^absurd.safetensors: .*" + message):
        load_basis(path)


def test_bad_recorded_settings_are_refused_at_load(tmp_path):
    basis = random_basis({"transformer_blocks.0.attn.to_q": (32, 32)}, num_entries=3, rank=2, key_dim=4, query_dim=6)
    path = tmp_path / "settings.safetensors"
    save_file(basis.state_dict(), path, metadata={"analogy.lorweb_settings": "[" * 10_000})
    with pytest.raises(BasisError, match="^settings.safetensors: header metadata 'analogy.lorweb_settings'"):
        load_basis(path)
    save_file(basis.state_dict(), path, metadata={"analogy.family": "sd3"})
    with pytest.raises(BasisError, match="^settings.safetensors: the header's analogy.family 'sd3' is not one of"):
        load_basis(path)


# -- the magnitude check's maths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("up_shape, down_shape, scale", [((40, 3), (3, 24), 0.7), ((16, 4, 1, 1), (4, 8, 3, 3), -2.0),
                                                          ((5, 1), (1, 7), 1e20)])
def test_low_rank_norm_equals_the_dense_norm(up_shape, down_shape, scale):
    up, down = rand(*up_shape, scale=1.0), rand(*down_shape, scale=1.0)
    dense = (scale * up.flatten(1).double() @ down.flatten(1).double()).norm().item()
    assert dense > 0
    assert math.isclose(low_rank_norm(up, down, scale), dense, rel_tol=1e-5)
    bound = low_rank_norm(up, down, scale, limit=math.inf)  # the cheap bound ‖U‖‖D‖ is an upper bound
    assert bound >= dense * (1 - 1e-6)
    huge = low_rank_norm(up * 1e30, down * 1e30, 1.0)  # no overflow: 1e60 · the norm, as a Python float
    assert math.isclose(huge, dense / abs(scale) * 1e60, rel_tol=1e-5)
    assert low_rank_norm(up, down.clone().fill_(float("nan"))) == math.inf


# -- helpers other loaders use ---------------------------------------------------------------------------------------


def test_helpers_for_new_loaders(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = {k: v.double() * 3 for k, v in module.state_dict().items()}
    loaded = check_state_dict(state, module.state_dict(), error=LoRAError)
    assert all(loaded[k].dtype == torch.float32 for k in loaded)
    module.load_state_dict(loaded)
    assert torch.equal(module[0].weight, state["0.weight"].float())
    with pytest.raises(LoRAError, match=r"1 expected tensors are missing, e.g. \['2.bias'\]"):
        check_state_dict({k: v for k, v in state.items() if k != "2.bias"}, module.state_dict(), error=LoRAError)
    with pytest.raises(TensorFileError, match=r"tensor '0.weight' has shape \[4, 8\], expected \[8, 4\]"):
        check_state_dict({**state, "0.weight": state["0.weight"].t()}, module.state_dict())
    with pytest.raises(TensorFileError, match="tensors are not expected here"):
        check_state_dict({**state, "extra": torch.ones(1)}, module.state_dict())
    with pytest.raises(TensorFileError, match="tensor '2.bias' contains NaN or Inf"):
        check_state_dict({**state, "2.bias": torch.tensor([0.0, float("inf")])}, module.state_dict())

    dims = match_shapes({"w1": torch.ones(8, 4), "w2": torch.ones(2, 8)}, {"w1": ("hidden", 4), "w2": (None, "hidden")})
    assert dims == {"hidden": 8}
    with pytest.raises(TensorFileError, match=r"tensor 'w2' has shape \[2, 6\], expected \[\*, hidden=8\]"):
        match_shapes({"w1": torch.ones(8, 4), "w2": torch.ones(2, 6)}, {"w1": ("hidden", 4), "w2": (None, "hidden")})
    require_keys({"a": 1, "b": 2}, ["a"], optional=["b"])
    with pytest.raises(TensorFileError, match="max_abs|beyond the accepted 10"):
        check_finite({"x": torch.tensor([11.0])}, max_abs=10)
    assert json_metadata({"c": "null"}, "c") is None and json_metadata({"c": '{"a": 1}'}, "c") == {"a": 1}

    path = tmp_path / "model.safetensors"
    with pytest.raises(LoRAError, match="^model.safetensors: boom"):
        with naming_file(path, LoRAError):
            raise LoRAError("boom")


def test_atomic_write_leaves_no_temp_and_finds_stale_ones(tmp_path):
    path = write_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    stale = tmp_path / ".out.safetensors.0123456789abcdef.tmp"
    stale.write_bytes(b"partial")
    (tmp_path / ".other.safetensors.0123456789abcdef.tmp").write_bytes(b"x")
    assert stale_temp_files(path) == [stale]


def test_header_probes_go_through_the_checked_layer_and_never_raise(tmp_path):
    """Listing a folder asks three loaders "is this yours?" (basis, hypernetwork, region model): one checked header
    read (analogy_core.files.probe_header) answers, and no file, however broken, makes a listing raise."""
    from analogy_core.files import probe_header
    from analogy_core.loc import is_hypernetwork_file
    from analogy_core.lorweb.files import is_basis_file
    from analogy_core.regions import is_region_file

    mine = tmp_path / "mine.safetensors"
    save_file({"w": torch.ones(2)}, str(mine), metadata={"analogy.kind": "region_predictor"})
    assert probe_header(mine).metadata["analogy.kind"] == "region_predictor" and list(probe_header(mine).entries) == ["w"]
    assert is_region_file(mine) and not is_hypernetwork_file(mine) and not is_basis_file(mine)
    header = save_bytes({"w": torch.ones(2)})
    broken = {"garbage.safetensors": b"\x00" * 3, "truncated.safetensors": header[:-4],
              "lying.safetensors": struct.pack("<Q", 10**12) + b"{}", "pickle.ckpt": b"\x80\x04K\x01.",
              "not_json.safetensors": struct.pack("<Q", 4) + b"{{{{"}
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
    for path in [*(tmp_path / name for name in broken), tmp_path / "missing.safetensors", tmp_path]:
        assert probe_header(path) is None, path.name
        assert not (is_region_file(path) or is_hypernetwork_file(path) or is_basis_file(path)), path.name
