"""Issue 19, loaders: every crash class found by mutating files of the newer loaders (Load Instruction Encoder's T5
folder, Load LoRA Hypernetwork, Load Region Model), and every meaningless file they accepted, ends in the pack's own
error naming the file and what is wrong. Each test here failed (crash or acceptance) before the fix."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analogy_core.lorweb.basis import BasisError, load_basis
from analogy_core.loc import HypernetworkError, load_hypernetwork
from analogy_core.lora import LoRAError
from analogy_core.lora_io import load_lora_file
from analogy_core.regions import InstructionEncoder, RegionError, load_region_predictor
from loader_cases import (T5_TEXTS, T5_WORDS, basis_samples, check_t5, hypernetwork_samples, lora_samples,
                          region_samples, save_t5_folder, t5_model, t5_tokenizer)

FOLDER = "t5 folder"


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


# -- Load Instruction Encoder (T5 folder) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    return save_t5_folder(tmp_path_factory.mktemp("t5") / FOLDER, seed=3)


@pytest.fixture
def folder(t5_folder, tmp_path) -> Path:
    """A fresh copy of the valid folder to damage."""
    return Path(shutil.copytree(t5_folder, tmp_path / FOLDER))


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(edit(value) if callable(edit) else edit))


def edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def refused(folder: Path, pattern: str) -> None:
    """Loading ``folder`` raises RegionError naming the folder (and file) and matching ``pattern``."""
    with pytest.raises(RegionError) as info:
        InstructionEncoder.from_folder(folder)
    assert str(info.value).startswith(f"{FOLDER}"), info.value
    assert re.search(pattern, str(info.value)), info.value


def test_a_valid_t5_folder_loads_exactly_the_saved_encoder(t5_folder):
    encoder = InstructionEncoder.from_folder(t5_folder)
    check_t5(encoder)
    reference = t5_model(len(t5_tokenizer()), seed=3)
    batch = t5_tokenizer()(list(T5_TEXTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
    features, mask = encoder.encode(list(T5_TEXTS))
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    assert mask.tolist() == batch["attention_mask"].bool().tolist()


def test_a_full_seq2seq_checkpoint_and_a_sharded_one_load_the_encoder_only(tmp_path):
    """google/flan-t5-* folders hold the decoder and an untied LM head too (skipped), larger ones in shards."""
    from safetensors.torch import load_file, save_file
    from transformers import T5ForConditionalGeneration

    tokenizer = t5_tokenizer()
    torch.manual_seed(5)
    full = T5ForConditionalGeneration(t5_model(len(tokenizer)).config).eval()
    batch = tokenizer(list(T5_TEXTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = full.encoder(**batch).last_hidden_state
    for name, shard in (("full", None), ("sharded", "4KB")):
        folder = tmp_path / name
        full.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        tokenizer.save_pretrained(folder)
        assert (folder / "model.safetensors.index.json").is_file() == bool(shard)
        if not shard:  # FLAN-T5 unties its LM head (tie_word_embeddings false): its file holds lm_head.weight
            weights = load_file(folder / "model.safetensors")
            weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
            save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        features = InstructionEncoder.from_folder(folder).encode(list(T5_TEXTS))[0]
        torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_the_analogy_world_t5_folder_still_loads(tmp_path):
    """The world's instruction T5 uses a word-level tokenizer with T5's special ids: it stays accepted."""
    from training.regions.models import save_instruction_encoder, tiny_t5

    encoder = tiny_t5(seed=4)
    loaded = InstructionEncoder.from_folder(save_instruction_encoder(encoder, tmp_path / "world_t5"))
    torch.testing.assert_close(loaded.encode(["make it red"])[0], encoder.encode(["make it red"])[0], rtol=0, atol=0)


# crash classes of the issue: each escaped as a Python/torch/transformers exception before
def test_truncated_weights_are_refused_by_name(folder):  # was SafetensorError
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(folder, r"^t5 folder/model\.safetensors: .*truncated")


def test_weights_of_other_shapes_than_the_config_are_refused(folder):  # was RuntimeError (size mismatch)
    edit_json(folder / "config.json", lambda c: {**c, "d_ff": c["d_ff"] * 2})
    refused(folder, r"^t5 folder/model\.safetensors: tensor '.*' has shape .*config\.json describes")


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", "2", "num_heads is '2', expected an integer"),            # was TypeError
    ("feed_forward_proj", "gated-nope", "feed_forward_proj is 'gated-nope'"),  # was KeyError
    ("vocab_size", 10**400, "vocab_size is a huge integer"),
    ("d_model", None, "d_model is null"),
    ("relative_attention_num_buckets", [8], "relative_attention_num_buckets is a JSON array"),
    ("layer_norm_epsilon", "1e-6", "layer_norm_epsilon is '1e-6'"),
    ("model_type", "bert", "model_type is 'bert', expected \"t5\""),
])
def test_config_fields_of_the_wrong_type_or_range_are_refused(folder, field, value, message):
    edit_json(folder / "config.json", lambda c: {**c, field: value})
    refused(folder, rf"^t5 folder/config\.json: {re.escape(message)}")


def test_a_config_that_is_not_an_object_is_refused(folder):  # was AttributeError
    edit_json(folder / "config.json", [1, 2])
    refused(folder, r"^t5 folder/config\.json: a JSON list, expected an object")


def test_deeply_nested_config_is_refused(folder):  # was RecursionError
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[:-2] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(folder, r"^t5 folder/config\.json: corrupt JSON \(JSON nested far deeper")


# meaningless folders that loaded before (with random weights, or NaN features giving an empty mask)
@pytest.mark.parametrize("kind", ["lora", "basis", "nothing"])
def test_weights_file_holding_no_t5_encoder_is_refused(folder, kind):
    samples = {"lora": lora_samples()[0], "basis": basis_samples()[0], "nothing": ({}, {"format": "pt"})}
    tensors, metadata = samples[kind]
    write(folder / "model.safetensors", tensors, metadata)
    refused(folder, r"^t5 folder/model\.safetensors: holds no T5 encoder weights \((it is a LoRA|it is a "
                    r"lorweb_basis file|no tensors at all)")


def test_a_missing_weight_is_refused(folder):
    edit_weights(folder, lambda t: t.pop("encoder.block.0.layer.1.DenseReluDense.wo.weight"))
    refused(folder, r"^t5 folder/model\.safetensors: 1 expected tensors are missing, e\.g\. "
                    r"\['encoder\.block\.0\.layer\.1\.DenseReluDense\.wo\.weight'\]")


def test_a_config_with_more_layers_than_the_weights_is_refused(folder):
    edit_json(folder / "config.json", lambda c: {**c, "num_layers": c["num_layers"] + 1})
    refused(folder, r"^t5 folder/model\.safetensors: \d+ expected tensors are missing, e\.g\. \['encoder\.block\.1\.")


def test_an_unknown_tensor_is_refused(folder):
    edit_weights(folder, lambda t: t.update({"encoder.block.9.extra": torch.zeros(2)}))
    refused(folder, r"^t5 folder/model\.safetensors: .*not expected here, e\.g\. \['encoder\.block\.9\.extra'\]")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_absurd_weights_are_refused(folder, value):
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    edit_weights(folder, lambda t: t[key].view(-1).__setitem__(3, value))
    refused(folder, rf"^t5 folder/model\.safetensors: tensor '{re.escape(key)}' (contains NaN or Inf|holds values "
                    r"up to 1e\+30)")


def test_an_encoder_whose_features_ignore_the_instruction_is_refused(folder):
    edit_weights(folder, lambda t: t["encoder.final_layer_norm.weight"].zero_())
    refused(folder, r"^t5 folder: the encoder gives every token of a probe instruction the same features")


def test_a_tokenizer_whose_ids_exceed_the_vocabulary_is_refused(folder):  # was IndexError in Predict Edit Region
    words = [f"w{i}" for i in range(100)]
    t5_tokenizer(words).save_pretrained(folder)
    refused(folder, r"^t5 folder/tokenizer\.json: token ids reach \d+ but the model has \d+ embeddings")


def test_a_tokenizer_one_id_past_the_vocabulary_is_refused(folder):
    """The boundary: a largest id equal to vocab_size is one past the embedding table."""
    tokenizer = t5_tokenizer([*T5_WORDS, "one_more"])
    assert max(tokenizer.get_vocab().values()) == len(t5_tokenizer()) == 22
    tokenizer.save_pretrained(folder)
    refused(folder, r"^t5 folder/tokenizer\.json: token ids reach 22 but the model has 22 embeddings")


def test_one_table_under_both_names_loads_and_two_different_tables_are_refused(folder):
    def tie(tensors, shift):
        table = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight")).clone()
        tensors["shared.weight"], tensors["encoder.embed_tokens.weight"] = table, table + shift

    edit_weights(folder, lambda t: tie(t, 0.0))  # some exporters write the tied table twice
    check_t5(InstructionEncoder.from_folder(folder))
    edit_weights(folder, lambda t: tie(t, 0.5))
    refused(folder, r"^t5 folder/model\.safetensors: shared\.weight and encoder\.embed_tokens\.weight hold two "
                    "different embedding tables")


def test_a_tokenizer_of_another_kind_is_refused(folder):
    edit_json(folder / "tokenizer_config.json", lambda c: {**c, "tokenizer_class": "BertTokenizer"})
    refused(folder, r"^t5 folder/tokenizer_config\.json: tokenizer_class is 'BertTokenizer'")


def test_a_tokenizer_without_t5_special_ids_is_refused(folder):
    edit_json(folder / "tokenizer.json", lambda t: {**t, "post_processor": None})  # no </s> appended
    edit_json(folder / "tokenizer_config.json", lambda c: {**c, "tokenizer_class": "PreTrainedTokenizerFast"})
    refused(folder, r"^t5 folder/tokenizer\.json: an instruction does not end with </s>")


@pytest.mark.parametrize("text,message", [  # the first was KeyError: 'added_tokens'
    ('{"model": {"type": "Unigram", "vocab": 5}}', r"/tokenizer\.json: \"added_tokens\" must be a list"),
    ('{"added_tokens": [], "model": {"type": "Unigram", "vocab": 5}}',
     r": cannot read its tokenizer \(tokenizer\.json, tokenizer_config\.json\): Exception: "),
    ('{"added_tokens": [], "model": ' + "[" * 100_000 + "]" * 100_000 + "}", r"/tokenizer\.json: corrupt JSON"),
])
def test_a_damaged_tokenizer_file_is_refused(folder, text, message):
    (folder / "tokenizer.json").write_text(text)
    refused(folder, rf"^t5 folder{message}")


def test_pickle_weights_only_are_refused(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    refused(folder, r"^t5 folder: no model\.safetensors .*pytorch_model\.bin is a pickle")


def test_a_single_weights_file_of_another_name_is_refused_with_the_name_it_needs(folder):
    """Load Instruction Encoder lists a T5 folder by any .safetensors file in it (a user who saved
    flan-t5-base.safetensors sees the folder), but the loader reads model.safetensors: the refusal says so."""
    (folder / "model.safetensors").rename(folder / "flan-t5-base.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")  # beside it: the rename is still what to do
    refused(folder, r"^t5 folder: no model\.safetensors .*flan-t5-base\.safetensors is not read under that name: "
                    r"a single weights file must be named model\.safetensors")
    (folder / "flan-t5-base.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    refused(folder, r"model-00001-of-00002\.safetensors is a shard: its model\.safetensors\.index\.json is missing")


def test_a_folder_without_its_tokenizer_or_with_another_models_is_refused(folder):
    InstructionEncoder.from_folder(folder)  # the copy loads before it is damaged
    pad = json.loads((folder / "config.json").read_text()).get("pad_token_id", 0)
    edit_json(folder / "config.json", lambda c: {**c, "pad_token_id": pad + 2})
    refused(folder, rf"^t5 folder/tokenizer\.json: the padding token has id {pad}, config\.json says {pad + 2}; "
                    r"not this model's T5 tokenizer")
    edit_json(folder / "config.json", lambda c: {**c, "pad_token_id": pad})
    (folder / "tokenizer.json").unlink()
    refused(folder, r"^t5 folder: no tokenizer\.json \(save the tokenizer with a recent transformers' save_pretrained\)")


def test_an_encoder_whose_probe_features_overflow_is_refused():
    """Weights are capped at ±1e4 when read, so a real folder rarely gets here; the check itself, on a stub whose
    output is infinite (and on one that is finite: it passes)."""
    from types import SimpleNamespace

    from analogy_core.t5_folder import check_probe

    class Stub(torch.nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.value = value

        def forward(self, input_ids, attention_mask):
            hidden = torch.arange(input_ids.numel(), dtype=torch.float32).view(*input_ids.shape, 1).expand(-1, -1, 4)
            return SimpleNamespace(last_hidden_state=hidden * self.value)

    check_probe(Stub(1.0), t5_tokenizer(), FOLDER, RegionError)
    with pytest.raises(RegionError, match=r"^t5 folder: the encoder's features of a probe instruction are not finite"):
        check_probe(Stub(float("inf")), t5_tokenizer(), FOLDER, RegionError)


def test_a_region_file_without_its_spec_is_refused(tmp_path):
    tensors, metadata = region_samples()[0]
    load_region_predictor(write(tmp_path / "ok.safetensors", tensors, metadata))  # the sample itself loads
    metadata = {k: v for k, v in metadata.items() if k != "analogy.region_spec"}
    with pytest.raises(RegionError, match=r"^r\.safetensors: the header has no 'analogy\.region_spec'"):
        load_region_predictor(write(tmp_path / "r.safetensors", tensors, metadata))
