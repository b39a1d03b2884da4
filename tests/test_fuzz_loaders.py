"""Property-based fuzz test of every tensor-file loader (tests/loader_cases.py) and of the T5 folder: valid files
mutated at the tensor, header-JSON and byte level, and every field of each loader's JSON config (header configs,
config.json, tokenizer files) set to odd values or deleted, must either load into something usable or fail with one
of the pack's errors naming the file; never a Python/torch/transformers exception.

Budgets (the defaults keep the file under a minute of CPU on 2 cores, about 20 s of it importing diffusers and
transformers): ``FUZZ_EXAMPLES`` mutated files per loader (800 shared among the loaders, at least 200 each; 3000
before the sweeps came); ``FUZZ_SWEEP_KINDS`` / ``FUZZ_T5_SWEEP_KINDS`` kinds of odd value (null, list, object,
huge integer, NaN-ish string, deep JSON, ...) each config field gets besides being deleted and set to plausible
neighbours (all 10 / 4), ``FUZZ_SWEEP_ALL=1`` every odd value on every field; ``FUZZ_T5_EXAMPLES`` mutated T5
weight files (60). ``FUZZ_RANDOM=1`` draws new examples instead of the fixed (derandomised) sequence.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as save_bytes

from analogy_core.regions import InstructionEncoder, RegionError
from loader_cases import LOADER_CASES, LoaderCase, check_t5, save_t5_folder

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", max(200, 800 // len(LOADER_CASES))))
FILE_NAME = "fuzzed file.safetensors"

FILL_VALUES = (float("nan"), float("inf"), float("-inf"), 1e20, -1e30, 3e38, 65504.0, 0.0, 1e-40, -1.0)
DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8,
          torch.int64, torch.bool, torch.uint8)
KEY_SUFFIXES = (".alpha", ".lora_keys", ".dora_scale", ".lora_A.weight", ".lora_up.weight", ".hada_w1_a", "x", "",
                ".lora_B", ".att_lora_to_q.weight", ".lora_mid.weight")
DTYPE_NAMES = ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "I64", "U8", "BOOL",
               "C64", "f32", "", "F32 ")
METADATA_KEYS = ("lora_adapter_metadata", "analogy.family", "analogy.lorweb_settings", "ss_base_model_version",
                 "modelspec.architecture", "analogy.fits", "analogy.kind", "format", "other")
ODD_JSON_TEXTS = (
    "null", "[]", "{", "1", '"text"', "{}", '{"r": 0}', '{"r": -2, "lora_alpha": 4}', '{"lora_alpha": "x"}',
    '{"r": 4, "lora_alpha": 1e400}', '{"r": 2, "lora_alpha": 2, "alpha_pattern": {"(": 1}}',
    '{"r": 2, "lora_alpha": 2, "alpha_pattern": {"(a+)+$": 1}}', '{"r": 2, "lora_alpha": 2, "alpha_pattern": []}',
    '{"r": 2, "lora_alpha": 2, "rank_pattern": {"to_q": 0}}', '{"r": 2, "lora_alpha": NaN}',
    '{"r": 2, "lora_alpha": 2, "use_rslora": true, "alpha_pattern": {"transformer_blocks.0.attn.to_q": 1e30}}',
    '{"transformer.r": 2, "transformer.lora_alpha": null}', '{"unet.lora_alpha": 4, "unet.alpha_pattern": {"x": "y"}}',
    '{"mixing": "tanh"}', '{"heads": 0}', '{"temperature": -1}', '{"query_mode": 5}',
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, "sd15", "sdxl", "flux", "unknown", "zzz", "",
    "\u00e9\u00e8", "a" * 3000,
)


def odd_json_value():
    """Values that do not belong where the fuzzer puts them (any JSON type, edge numbers)."""
    scalars = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**63, 2**64, 10**30]),
                        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(DTYPE_NAMES),
                        st.none(), st.booleans(), st.text(max_size=8))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                        max_leaves=6)


# -- mutations ---------------------------------------------------------------------------------------------------------


def mutate_tensors(draw, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    keys = sorted(tensors)
    key = draw(st.sampled_from(keys)) if keys else None
    kind = draw(st.sampled_from(["drop", "rename", "reshape", "fill", "fill_one", "dtype", "scalar", "extra",
                                 "metadata", "scale"]))
    if key is None and kind not in ("extra", "metadata"):
        kind = "extra"
    if kind == "drop":
        del tensors[key]
    elif kind == "rename":
        new = draw(st.sampled_from([key[:-1], key + "x", key.replace("lora", "lroa"), key.split(".", 1)[-1],
                                    "lora_te_" + key, key.replace(".", "_")]))
        tensors[new] = tensors.pop(key)
    elif kind == "reshape":
        t = tensors[key]
        choice = draw(st.sampled_from(["flatten", "drop_last", "unsqueeze", "empty0", "empty_last", "transpose",
                                       "repeat", "slice"]))
        if choice == "flatten":
            t = t.flatten()
        elif choice == "drop_last" and t.ndim and t.shape[-1]:
            t = t[..., 0]
        elif choice == "unsqueeze":
            t = t.unsqueeze(draw(st.integers(0, t.ndim)))
        elif choice == "empty0" and t.ndim:
            t = t[:0]
        elif choice == "empty_last" and t.ndim:
            t = t[..., :0]
        elif choice == "transpose" and t.ndim >= 2:
            t = t.transpose(0, 1)
        elif choice == "repeat" and t.ndim:
            t = torch.cat([t, t], dim=draw(st.integers(0, t.ndim - 1)))
        elif choice == "slice" and t.ndim and t.shape[0] > 1:
            t = t[: t.shape[0] // 2]
        tensors[key] = t.contiguous()
    elif kind in ("fill", "fill_one"):
        t = tensors[key].float().clone()
        value = draw(st.sampled_from(FILL_VALUES))
        if kind == "fill" or t.numel() == 0:
            t.fill_(value)
        else:
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
        tensors[key] = t.to(tensors[key].dtype) if tensors[key].is_floating_point() else t
    elif kind == "scale":
        tensors[key] = (tensors[key].float() * draw(st.sampled_from([1e3, 1e6, 1e12, 1e20, -1e8, 0.0])))
    elif kind == "dtype":
        tensors[key] = tensors[key].float().to(draw(st.sampled_from(DTYPES)))
    elif kind == "scalar":
        tensors[key] = torch.tensor(draw(st.sampled_from(FILL_VALUES)))
    elif kind == "extra":
        base = key.rsplit(".", 2)[0] if key else "layer"
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        tensors[base + draw(st.sampled_from(KEY_SUFFIXES))] = torch.full(shape, draw(st.sampled_from(FILL_VALUES)))
    else:  # metadata
        metadata[draw(st.sampled_from(METADATA_KEYS))] = draw(st.sampled_from(ODD_JSON_TEXTS))


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the metadata in sorted order (the library writes it in hash order, which differs
    between calls and would make the byte-level mutations, and so hypothesis' draws, irreproducible)."""
    # (metadata None when empty: safetensors 0.8 writes invalid JSON for no tensors with empty metadata)
    header, data = split(save_bytes(tensors, metadata=metadata or None))
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    return join(json.dumps(header), data)


def split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header_text: str, data: bytes) -> bytes:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def mutate_header(draw, blob: bytes) -> bytes:
    header, data = split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["field", "delete_field", "entry", "metadata", "shift", "swap", "deep", "duplicate"]))
    if kind in ("field", "delete_field", "entry", "shift", "swap", "duplicate") and not names:
        kind = "metadata"
    name = draw(st.sampled_from(names)) if names else None
    if kind == "field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(st.one_of(odd_json_value(), st.lists(st.integers(-3, 2**20), max_size=4)))
    elif kind == "delete_field":
        del header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "entry":
        header[name] = draw(odd_json_value())
    elif kind == "metadata":
        header["__metadata__"] = draw(st.one_of(odd_json_value(), st.dictionaries(
            st.sampled_from(METADATA_KEYS), odd_json_value(), max_size=2)))
    elif kind == "shift":
        delta = draw(st.integers(-64, 64))
        header[name]["data_offsets"] = [o + delta for o in header[name]["data_offsets"]]
    elif kind == "swap":
        other = draw(st.sampled_from(names))
        header[name]["data_offsets"], header[other]["data_offsets"] = (header[other]["data_offsets"],
                                                                       header[name]["data_offsets"])
    text = json.dumps(header)
    if kind == "deep":
        depth = draw(st.sampled_from([50, 100_000]))  # never near the recursion limit: same draws each run
        text = text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    elif kind == "duplicate":
        text = text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    return join(text, data)


def mutate_bytes(draw, blob: bytes) -> bytes:
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    kind = draw(st.sampled_from(["truncate", "flip_header", "flip_any", "header_len", "append", "insert"]))
    if kind == "truncate":
        return blob[:draw(st.one_of(st.integers(8, len(blob) - 1), st.sampled_from([0, 7])))]
    if kind in ("flip_header", "flip_any"):
        data = bytearray(blob)
        limit = header_end if kind == "flip_header" else len(blob)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, limit - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "header_len":
        value = draw(st.one_of(st.sampled_from([0, 1, 2, 2**31, 2**40, 2**63, len(blob), len(blob) - 8]),
                               st.integers(header_end - 8 - 16, header_end - 8 + 16)))
        return struct.pack("<Q", max(0, value) % 2**64) + blob[8:]
    if kind == "append":
        return blob + draw(st.binary(min_size=1, max_size=16))
    position = draw(st.integers(0, len(blob)))
    return blob[:position] + draw(st.binary(min_size=1, max_size=8)) + blob[position:]


def fuzzed_file(draw, case: LoaderCase) -> bytes:
    samples = case.samples()
    tensors, metadata = samples[draw(st.integers(0, len(samples) - 1))]
    tensors, metadata = dict(tensors), dict(metadata)
    levels = draw(st.lists(st.sampled_from(["tensors", "header", "bytes"]), min_size=1, max_size=3))
    for _ in range(levels.count("tensors")):
        mutate_tensors(draw, tensors, metadata)
    blob = serialise(tensors, metadata)
    for level in levels:
        mutate = {"header": mutate_header, "bytes": mutate_bytes}.get(level)
        if mutate is None:
            continue
        try:
            blob = mutate(draw, blob)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, struct.error):
            pass  # an earlier mutation left nothing this one can work on (e.g. no JSON header): keep the bytes
    return blob


# -- the property -----------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only cost time (much of it on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_outcome(case: LoaderCase, path, reasons: Counter | None = None) -> str:
    """'loaded' or 'refused'; anything but the case's errors (with the file named) propagates and fails the test."""
    try:
        result = case.load(path)
    except case.errors as err:
        assert str(err).startswith(f"{path.name}: "), f"error does not name the file: {err}"
        if reasons is not None:  # the message without names and numbers: a rough category
            text = re.sub(r"'[^']*'|\[[^\]]*\]|\(.*?\)|[-\d.e+]*\d", "_", str(err)[len(path.name) + 2:])
            reasons[f"{type(err).__name__}: {text[:90]}"] += 1
        return "refused"
    case.check(result)
    return "loaded"


@pytest.mark.parametrize("case", LOADER_CASES, ids=[c.name for c in LOADER_CASES])
def test_mutated_files_load_or_fail_with_a_pack_error(case, tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp(f"fuzz-{case.name}") / FILE_NAME
    for tensors, metadata in case.samples():  # the samples themselves load: mutations start from valid files
        path.write_bytes(serialise(tensors, metadata))
        assert load_outcome(case, path) == "loaded"
    outcomes = {"loaded": 0, "refused": 0}
    reasons: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def run(data):
        path.write_bytes(fuzzed_file(data.draw, case))
        outcomes[load_outcome(case, path, reasons)] += 1

    run()
    print(f"\n{case.name}: {sum(outcomes.values())} mutated files, {outcomes}; most frequent refusals:")
    for reason, count in reasons.most_common(12):
        print(f"  {count:6d}  {reason}")
    # the mutations reach both outcomes: a fuzzer that only produced unreadable files would prove little
    assert outcomes["loaded"] > 0.02 * EXAMPLES and outcomes["refused"] > 0.3 * EXAMPLES, outcomes


# -- field-by-field sweeps of the JSON configs (headers, config.json, tokenizer files) --------------------------------


class Raw(str):
    """JSON text put into a document verbatim: what json.dumps cannot write (1e400, NaN, deep nesting)."""


DELETE = object()
ODD_KINDS: dict[str, tuple] = {  # what a field of a config gets instead of its value, by kind (first: always)
    "null": (None,),
    "boolean": (True, False),
    "negative": (-1, -0.0, -2**63),
    "huge integer": (10**400, 2**63, -10**400, 2**31),
    "edge number": (Raw("1e400"), 0, 1e308, 0.5, Raw("-1e400"), 1),
    "string": ("x", "", "\u00e9" * 3),
    "NaN-ish string": ("NaN", "Infinity", "-1", "1e30"),
    "list": (["clip"], [], [1, 2], [None]),
    "object": ({"a": None}, {}, {"": [[]]}),
    "deep or unparsable": (Raw("[" * 100_000 + "]" * 100_000), Raw("[" * 500 + "]" * 500), Raw("NaN"),
                           Raw("1" * 5000)),
}
EXTRA_ODD = [v for values in ODD_KINDS.values() for v in values[1:]]  # one of these per field, in turn
SWEEP_KINDS = int(os.environ.get("FUZZ_SWEEP_KINDS", len(ODD_KINDS)))  # kinds of odd value per field; the T5 folder
T5_SWEEP_KINDS = int(os.environ.get("FUZZ_T5_SWEEP_KINDS", 4))         # takes fewer, in turn
SWEEP_ALL = bool(os.environ.get("FUZZ_SWEEP_ALL"))  # every value of every kind on every field (slow)


def dumps(document) -> str:
    raws: dict[str, str] = {}

    def swap(value):
        if isinstance(value, Raw):
            marker = f"@@raw{len(raws)}@@"
            raws[json.dumps(marker)] = str(value)
            return marker
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(document))
    for marker, raw in raws.items():
        text = text.replace(marker, raw)
    return text


def field_paths(document, prefix: tuple = (), depth: int = 8) -> list[tuple]:
    """Every field (object key; the first item of a list: the others have its structure) down to ``depth``."""
    if isinstance(document, dict):
        children = list(document.items())
    elif isinstance(document, list) and document:
        children = [(0, document[0])]
    else:
        return []
    paths = []
    for key, value in children:
        paths.append((*prefix, key))
        if depth > 1:
            paths += field_paths(value, (*prefix, key), depth - 1)
    return paths


def replaced(document, path: tuple, value):
    """A copy of ``document`` with the field at ``path`` set to ``value`` (or deleted: DELETE)."""
    copy = json.loads(json.dumps(document))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


def neighbours(value) -> list:
    """Plausible values of the same type next to ``value`` (a size off by one, a name misspelt)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 2 * value, -value]
    if isinstance(value, float):
        return [value * 2, -value, 0.0]
    if isinstance(value, str):
        return [value + "x", value.upper(), ""]
    if isinstance(value, list):
        return [[], value[:-1], value + value[-1:]]
    return [{}]


def sweep(document, kinds: int = len(ODD_KINDS), depth: int = 8):
    """(label, document) for every field of ``document`` deleted, set to its neighbours and to odd values: the first
    value of ``kinds`` kinds of ODD_KINDS (taken in turn from field to field when fewer than all) and one of the other
    values in turn, or every value with FUZZ_SWEEP_ALL."""
    names = list(ODD_KINDS)
    for turn, path in enumerate(field_paths(document, depth=depth)):
        value = functools.reduce(lambda node, key: node[key], path, document)
        if SWEEP_ALL:
            odd = [v for values in ODD_KINDS.values() for v in values]
        else:
            chosen = [names[(turn * kinds + i) % len(names)] for i in range(min(kinds, len(names)))]
            odd = [ODD_KINDS[k][0] for k in chosen] + [EXTRA_ODD[turn % len(EXTRA_ODD)]]
        for new in (DELETE, *neighbours(value), *odd):
            label = "deleted" if new is DELETE else show(new)
            yield f"{'.'.join(map(str, path))} = {label}", replaced(document, path, new)


def show(value) -> str:
    text = str(value) if isinstance(value, Raw) else repr(value) if not isinstance(value, int) or abs(value) < 10**20 \
        else "<huge int>"
    return text[:30] + ("..." if len(text) > 30 else "")


def sweep_outcomes(cases, attempt) -> Counter:
    """Run ``attempt(document)`` -> 'loaded'/'refused' for each (label, document); every other outcome (a crash, an
    unnamed error, a check failing) is collected and reported together."""
    outcomes: Counter[str] = Counter()
    failures = []
    for label, document in cases:
        try:
            outcomes[attempt(document)] += 1
        except Exception as err:  # noqa: BLE001 - the failures are the test's finding
            failures.append(f"{label}: {type(err).__name__}: {str(err)[:160]}")
    assert not failures, f"{len(failures)} cases neither loaded nor failed with the pack's error:\n" + "\n".join(
        failures[:25])
    return outcomes


@pytest.mark.parametrize("case", [c for c in LOADER_CASES if c.configs], ids=lambda c: c.name)
def test_every_config_field_odd_or_missing_loads_or_fails_with_a_pack_error(case, tmp_path, one_thread):
    """Each field of the method's header config (e.g. encoder.family, mean, targets[0][1]) set to odd values or
    deleted, and each header metadata string replaced or deleted: a usable load or the loader's own error."""
    path = tmp_path / FILE_NAME
    outcomes: Counter[str] = Counter()

    def attempt(tensors, metadata):
        path.write_bytes(serialise(tensors, metadata))
        return load_outcome(case, path)

    swept: set[str] = set()
    for tensors, metadata in case.samples():  # each config and metadata key swept in the first sample holding it
        for key in (k for k in case.configs if k in metadata and k not in swept):
            cases = sweep(json.loads(metadata[key]), SWEEP_KINDS)
            outcomes += sweep_outcomes(cases, lambda doc: attempt(tensors, {**metadata, key: dumps(doc)}))
        strings = {k: v for k, v in metadata.items() if k not in swept}
        cases = ((label, {**metadata, **meta}) for label, meta in sweep(strings, SWEEP_KINDS, depth=1))
        outcomes += sweep_outcomes(cases, lambda meta: attempt(tensors, {
            k: v if isinstance(v, str) else dumps(v) for k, v in meta.items()}))
        swept |= metadata.keys()
    print(f"\n{case.name}: {sum(outcomes.values())} swept headers, {dict(outcomes)}")
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0, outcomes


# -- the T5 folder of Load Instruction Encoder ---------------------------------------------------------------------

T5_EXAMPLES = int(os.environ.get("FUZZ_T5_EXAMPLES", 60))  # mutated weight files


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory) -> dict[str, bytes]:
    folder = save_t5_folder(tmp_path_factory.mktemp("t5") / "t5", seed=1)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def t5_outcome(folder: Path, files: dict[str, bytes]) -> str:
    """Write ``files`` as the folder, load it: 'loaded' (and usable) or 'refused' (RegionError naming the folder)."""
    for old in folder.iterdir():
        old.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    try:
        encoder = InstructionEncoder.from_folder(folder)
    except RegionError as err:
        assert str(err).startswith(f"{folder.name}/") or str(err).startswith(f"{folder.name}: "), err
        return "refused"
    check_t5(encoder)
    return "loaded"


@pytest.mark.parametrize("name,depth", [("config.json", 8), ("tokenizer_config.json", 8), ("tokenizer.json", 3)])
def test_t5_folder_json_fields_odd_or_missing(t5_files, tmp_path, one_thread, name, depth):
    """Each field of config.json and of the tokenizer files set to odd values or deleted (the tokenizer's vocabulary,
    merges and templates to 3 levels): a usable encoder or RegionError naming the folder."""
    folder = tmp_path / "t5"
    folder.mkdir()
    document = json.loads(t5_files[name])
    cases = sweep(document, T5_SWEEP_KINDS, depth)
    outcomes = sweep_outcomes(cases, lambda doc: t5_outcome(folder, {**t5_files, name: dumps(doc).encode()}))
    print(f"\n{name}: {sum(outcomes.values())} swept files, {dict(outcomes)}")
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0, outcomes


def test_t5_folder_mutated_weights_and_missing_files(t5_files, tmp_path, one_thread):
    """model.safetensors mutated at the tensor, header and byte level (as the loaders above), and each file of the
    folder missing: a usable encoder or RegionError naming the folder and file."""
    folder = tmp_path / "t5"
    folder.mkdir()
    for name in t5_files:  # without its tokenizer_config.json, a folder is read with T5's tokenizer class
        outcome = t5_outcome(folder, {k: v for k, v in t5_files.items() if k != name})
        assert outcome == "refused" or name == "tokenizer_config.json", name
    weights = load_file_bytes(t5_files["model.safetensors"])
    case = LoaderCase("t5_weights", lambda: [weights], None, ())
    outcomes: Counter[str] = Counter()

    @settings(max_examples=T5_EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def run(data):
        outcomes[t5_outcome(folder, {**t5_files, "model.safetensors": fuzzed_file(data.draw, case)})] += 1

    run()
    print(f"\nT5 weights: {sum(outcomes.values())} mutated files, {dict(outcomes)}")
    # Both paths must be exercised. How many of the 60 mutations stay loadable depends on what ran before in the same
    # process (1 after the Edit Transfer test files, 2+ alone; cause not yet found), so the load side asks for one.
    assert outcomes["loaded"] >= 1 and outcomes["refused"] > 0.3 * T5_EXAMPLES, outcomes


def load_file_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, _ = split(blob)
    return safetensors_load(blob), header.get("__metadata__", {})


# -- a peft adapter folder (adapter_model.safetensors + adapter_config.json) -----------------------------------------


def test_peft_adapter_config_fields_odd_or_missing(tmp_path, one_thread):
    """Each field of peft's adapter_config.json (as LoraConfig.to_dict writes it, with alpha and rank patterns) set to
    odd values or deleted: a usable LoRA or the loader's own error naming the weights file."""
    from peft import LoraConfig

    tensors, _ = next(sample for sample in LOADER_CASES[0].samples() if "lora_adapter_metadata" in sample[1])
    folder = tmp_path / "adapter"
    folder.mkdir()
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(serialise({"base_model.model." + k.split(".", 1)[1]: v for k, v in tensors.items()}, {}))
    paths = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in tensors})
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k"], rank_pattern={paths[0]: 2},
                        alpha_pattern={paths[0]: 1.5}).to_dict()
    document = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    lora_case = LOADER_CASES[0]

    def attempt(doc):
        (folder / "adapter_config.json").write_text(dumps(doc))
        return load_outcome(lora_case, weights)

    assert attempt(document) == "loaded"
    # the fields it shares with the header config are swept with every kind in the LoRA case above
    outcomes = sweep_outcomes(sweep(document, T5_SWEEP_KINDS), attempt)
    print(f"\nadapter_config.json: {sum(outcomes.values())} swept files, {dict(outcomes)}")
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0, outcomes
