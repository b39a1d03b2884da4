"""Tensor files: the one reader every loader goes through, and atomic writes.

Reading (:func:`read_tensor_file`) accepts safetensors only (never a pickle) and checks the file before any tensor
is loaded, so that a damaged or hostile file ends in a :class:`TensorFileError` that names the file and what is
wrong, never in a Python/torch exception, a huge allocation or a hang:

- the header length is read first and refused above ``max_header_bytes`` (a file cannot make us read a multi-GB
  header), and must fit inside the file;
- the header is strict JSON (UTF-8, no NaN/Infinity, no duplicate keys, not nested beyond what the format uses);
- every entry has a known ``dtype`` name, a ``shape`` of non-negative ints and two ``data_offsets`` ints; its byte
  size equals numel·itemsize, and all entries tile the data area exactly (contiguous, no overlap, nothing after);
- ``__metadata__`` maps strings to strings (the safetensors format allows nothing else);
- only the dtypes a loader asks for load (floating point by default); float8 tensors (E4M3/E5M2, the common
  quantised LoRA storage) are upcast to bfloat16, which holds every float8 value exactly; other formats (packed
  4/6-bit floats, E8M0 scales, integers, complex) are refused by name.

Loaders then check what the tensors mean with the helpers below (:func:`require_keys`, :func:`match_shapes`,
:func:`check_state_dict`, :func:`check_finite`, :func:`low_rank_norm`) and raise their own error class
(``LoRAError``, ``BasisError``, ...). :func:`naming_file` prefixes those errors with the file name. A new loader
(hypernetwork, region predictor) is typically::

    tf = read_tensor_file(path, kind="LoRA of Change hypernetwork")      # structure, dtypes, finite values
    config = json_metadata(tf.metadata, "analogy.config", error=MyError)  # a JSON object or None
    model = MyModel(**config)
    with naming_file(path, MyError):
        model.load_state_dict(check_state_dict(tf.tensors, model.state_dict(), error=MyError))
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

MAX_HEADER_BYTES = 32 * 2**20
"""Default bound on a safetensors header. Real headers are kilobytes to a few MB (kohya's training metadata is the
largest); the safetensors library's own limit is 100 MB."""
MAX_NDIM = 8
TEMP_SUFFIX = ".tmp"
_NAME_MAX = 255  # bytes in one path component on common file systems

MAX_UPDATE_NORM = 1e4
"""Largest accepted Frobenius norm of one layer's weight update (scale·up·down at strength 1), which bounds how much
the update can amplify that layer's input. Trained LoRAs are around 0.1-100 per layer and trained weights' own
norms are of that order; an update beyond 1e4 is meaningless and drives a model to non-finite outputs."""


class TensorFileError(ValueError):
    """A tensor file is missing, of an unsafe format, truncated, corrupt or holds something that cannot be used."""


# safetensors dtype name -> (torch dtype or None where this torch lacks it, bits per element)
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 64), "F32": (torch.float32, 32), "F16": (torch.float16, 16), "BF16": (torch.bfloat16, 16),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "I64": (torch.int64, 64), "I32": (torch.int32, 32), "I16": (torch.int16, 16), "I8": (torch.int8, 8),
    "U8": (torch.uint8, 8), "BOOL": (torch.bool, 8), "U16": (getattr(torch, "uint16", None), 16),
    "U32": (getattr(torch, "uint32", None), 32), "U64": (getattr(torch, "uint64", None), 64),
    "C64": (torch.complex64, 64),
}
# known to the safetensors format but not loadable as plain tensors here
_UNSUPPORTED_DTYPES = {
    "F8_E8M0": "8-bit exponent-only block scales (MX formats)", "F4": "packed 4-bit floats",
    "F6_E2M3": "packed 6-bit floats", "F6_E3M2": "packed 6-bit floats", "C128": "complex128",
}
FLOAT8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"} | FLOAT8_DTYPES)
"""What weight files (LoRAs, bases, checkpoints) may store; float8 is upcast to bfloat16 on load."""
ANY_DTYPE = frozenset(name for name, (dtype, _) in _DTYPES.items() if dtype is not None)
FLOAT8_UPCAST = torch.bfloat16  # 8 exponent / 7 mantissa bits: every E4M3/E5M2(FNUZ) value is exactly representable


@dataclass(frozen=True)
class TensorInfo:
    dtype: str             # safetensors name, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    begin: int             # byte offsets within the data area
    end: int


@dataclass(frozen=True)
class TensorHeader:
    """A checked safetensors header: what the file declares, before anything is loaded."""

    entries: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int        # byte position of the data area in the file


@dataclass(frozen=True)
class TensorFile:
    path: Path
    kind: str                      # what the caller expects, for messages ("LoRA", "LoRA basis", ...)
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    stored_dtypes: dict[str, str]  # key -> safetensors dtype as stored (float8 tensors are loaded upcast)

    def error(self, message: str, error: type[ValueError] = TensorFileError) -> ValueError:
        """An ``error`` naming this file, to raise."""
        return error(f"{self.path.name}: {message}")


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_tensor_file(path: str | os.PathLike, kind: str = "tensor file", *,
                     dtypes: Collection[str] = FLOAT_DTYPES, max_header_bytes: int = MAX_HEADER_BYTES,
                     finite: bool = True, keys: Callable[[str], bool] | None = None) -> TensorFile:
    """Check and load every tensor (on CPU) and the header metadata of a .safetensors file.

    ``dtypes``: the safetensors dtype names the caller accepts (others are refused by name). ``finite``: refuse
    floating-point tensors holding NaN or Inf (loaders that check values themselves may pass False). ``keys``: load
    only the tensors whose key it accepts (the whole header is still checked, and ``stored_dtypes`` lists every key),
    e.g. a T5 encoder out of a full encoder-decoder checkpoint.
    Raises :class:`TensorFileError` (message starts with the file name) for anything wrong with the file.
    """
    path = Path(path)
    header = read_header(path, kind, max_header_bytes=max_header_bytes)
    for key, info in header.entries.items():
        if info.dtype not in dtypes:
            allowed = ", ".join(sorted(dtypes))
            raise _fail(path, f"tensor {key[:200]!r} is stored as {info.dtype}; a {kind} must hold {allowed} tensors")
    wanted = [key for key in header.entries if keys is None or keys(key)]
    tensors = _load(path, wanted)
    for key in wanted:
        if header.entries[key].dtype in FLOAT8_DTYPES:
            tensors[key] = tensors[key].to(FLOAT8_UPCAST)
    if finite:
        try:
            check_finite(tensors)
        except TensorFileError as err:
            raise _fail(path, str(err)) from None
    stored = {key: info.dtype for key, info in header.entries.items()}
    return TensorFile(path, kind, tensors, header.metadata, stored)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checked .safetensors file of any loadable dtype, values unchecked."""
    tf = read_tensor_file(path, dtypes=ANY_DTYPE, finite=False)
    return tf.tensors, tf.metadata


def probe_header(path: str | os.PathLike) -> TensorHeader | None:
    """The checked header of a file when it is a readable safetensors file, else None: for listings that sort files
    by what their header says (a probe never raises; loading the file reports what is wrong with it)."""
    try:
        return read_header(path)
    except (TensorFileError, OSError):
        return None


def read_header(path: str | os.PathLike, kind: str = "tensor file", *,
                max_header_bytes: int = MAX_HEADER_BYTES) -> TensorHeader:
    """Read and check only the header (bounded read): every declared dtype, shape and offset against the file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _fail(path, f"{path.suffix} files are Python pickles, which can run arbitrary code when loaded; only "
                          ".safetensors files are accepted (convert it with a trusted tool)")
    if not path.is_file():
        raise TensorFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 8:
        raise _fail(path, f"{size} bytes is too short to be a safetensors file")
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len < 2 or 8 + header_len > size:
            raise _fail(path, f"not a safetensors {kind}, or truncated (the header declares {header_len} bytes in a "
                              f"{size}-byte file)")
        if header_len > max_header_bytes:
            raise _fail(path, f"the header declares {header_len} bytes, more than the {max_header_bytes} accepted "
                              "for a safetensors header")
        raw = handle.read(header_len)
    parsed = _parse_json(path, raw)
    if not isinstance(parsed, dict):
        raise _fail(path, f"corrupt safetensors header (a JSON {type(parsed).__name__}, expected an object)")
    metadata = _check_metadata(path, parsed.pop("__metadata__", {}))
    data_len = size - 8 - header_len
    entries = {key: _check_entry(path, key, value, data_len) for key, value in parsed.items()}
    _check_tiling(path, entries, data_len)
    return TensorHeader(entries, metadata, 8 + header_len)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(duplicate)
    return result


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(path: Path, raw: bytes, what: str = "safetensors header") -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, f"corrupt {what} (not UTF-8 text)") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as err:
        raise _fail(path, f"corrupt {what} (key {str(err)[:200]!r} appears twice)") from None
    except RecursionError:
        raise _fail(path, f"corrupt {what} (JSON nested far deeper than the format uses)") from None
    except ValueError as err:  # JSONDecodeError, oversized integer literals
        raise _fail(path, f"corrupt {what} (not JSON: {str(err)[:120]})") from None


MAX_JSON_BYTES = 16 * 2**20
"""Default bound on a JSON side file (config.json, tokenizer_config.json, ...): real ones are bytes to a few MB."""


def read_json_file(path: str | os.PathLike, *, name: str | None = None, max_bytes: int = MAX_JSON_BYTES,
                   error: type[ValueError] = TensorFileError) -> object:
    """A JSON file parsed as strictly as a safetensors header (UTF-8, no NaN/Infinity, no duplicate keys, no deep
    nesting), read only up to ``max_bytes``. Every problem is an ``error`` whose message starts with ``name`` (default:
    the file name). The value may be of any JSON type: callers check its fields."""
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise error(f"{name}: no such file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{name}: cannot be read ({err.strerror or err})") from None
    if len(raw) > max_bytes:
        raise error(f"{name}: more than the {max_bytes} bytes accepted for this JSON file")
    try:
        return _parse_json(path, raw, "JSON")
    except TensorFileError as err:
        raise error(f"{name}: {str(err)[len(path.name) + 2:]}") from None


def show_value(value: object, limit: int = 40) -> str:
    """A JSON value for an error message, short whatever it holds: no repr of deep nesting (RecursionError) or of a
    10**400 integer (Python refuses str() beyond 4300 digits)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {_json_type(value)} of {len(value)} item{'s' if len(value) != 1 else ''}"
    if type(value) is int and abs(value) > 10**12:
        return "a huge integer"
    if isinstance(value, str):
        return repr(value[:limit] + ("..." if len(value) > limit else ""))
    return "null" if value is None else repr(value)[:limit]


def _check_metadata(path: Path, metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise _fail(path, f"the header's __metadata__ is a JSON {_json_type(metadata)}, expected an object of "
                          "strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _fail(path, f"header metadata {key!r} is a JSON {_json_type(value)}; the safetensors format "
                              "allows only string values")
    return metadata


def _check_entry(path: Path, key: str, entry: object, data_len: int) -> TensorInfo:
    where = f"tensor {key[:200]!r}"
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: header entry is a JSON {_json_type(entry)}, expected an object with dtype, "
                          "shape and data_offsets")
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in entry]
    if missing:
        raise _fail(path, f"{where}: header entry has no {' / '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _fail(path, f"{where}: dtype is a JSON {_json_type(dtype)}, expected a name such as F32")
    if dtype in _UNSUPPORTED_DTYPES:
        raise _fail(path, f"{where} is stored as {dtype} ({_UNSUPPORTED_DTYPES[dtype]}), which this pack cannot load")
    if dtype not in _DTYPES:
        raise _fail(path, f"{where}: unknown dtype {dtype[:40]!r}")
    torch_dtype, bits = _DTYPES[dtype]
    if torch_dtype is None:
        raise _fail(path, f"{where} is stored as {dtype}, which this torch version cannot hold")
    if not _is_int_list(shape) or len(shape) > MAX_NDIM or any(not 0 <= d < 2**63 for d in shape):
        raise _fail(path, f"{where}: shape {str(shape)[:80]} is not a list of at most {MAX_NDIM} non-negative "
                          "64-bit ints")
    if not _is_int_list(offsets) or len(offsets) != 2:
        raise _fail(path, f"{where}: data_offsets {str(offsets)[:80]} is not a pair of ints")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _fail(path, f"{where}: data_offsets [{begin}, {end}] lie outside the file's {data_len}-byte data area "
                          "(truncated or corrupt)")
    nbytes = math.prod(shape) * bits // 8
    if end - begin != nbytes:
        raise _fail(path, f"{where}: shape {list(shape)} of {dtype} needs {nbytes} bytes but data_offsets span "
                          f"{end - begin}")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_tiling(path: Path, entries: dict[str, TensorInfo], data_len: int) -> None:
    """The tensors cover the data area exactly once, in some order (what the safetensors format requires)."""
    position = 0
    for key, info in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise _fail(path, f"tensor {key[:200]!r}: data_offsets [{info.begin}, {info.end}] {problem} (corrupt "
                              "header)")
        position = info.end
    if position != data_len:
        raise _fail(path, f"the header describes {position} bytes of tensor data but the file holds {data_len} "
                          "(truncated, or extra bytes appended)")


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _load(path: Path, keys: Collection[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except MemoryError:
        raise _fail(path, f"not enough memory to load {path.stat().st_size} bytes of tensors") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:  # e.g. the file changed after the check
        raise _fail(path, f"not a readable safetensors file (truncated or corrupt?): {err}") from None


def _fail(path: Path, message: str) -> TensorFileError:
    return TensorFileError(f"{path.name}: {message}")


# ---------------------------------------------------------------------------------------------------------------------
# Checks loaders run on what they read (messages without the file name; see naming_file)


@contextmanager
def naming_file(path: str | os.PathLike, *errors: type[ValueError]) -> Iterator[None]:
    """Re-raise ``errors`` (and :class:`TensorFileError`) raised inside with the file name in front."""
    name = Path(path).name
    try:
        yield
    except (TensorFileError, *errors) as err:
        message = str(err)
        if message.startswith(f"{name}: "):
            raise
        raise type(err)(f"{name}: {message}") from None


def require_keys(tensors: Mapping[str, object], required: Collection[str], optional: Collection[str] = (), *,
                 allow_extra: bool = False, error: type[ValueError] = TensorFileError) -> None:
    """Every ``required`` key present; no keys beyond ``required`` and ``optional`` unless ``allow_extra``."""
    missing = sorted(set(required) - tensors.keys())
    if missing:
        raise error(f"{len(missing)} expected tensors are missing, e.g. {missing[:3]}")
    if not allow_extra:
        extra = sorted(tensors.keys() - set(required) - set(optional))
        if extra:
            raise error(f"{len(extra)} tensors are not expected here, e.g. {extra[:3]}")


def match_shapes(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Sequence[int | str | None]],
                 dims: Mapping[str, int] | None = None, *, error: type[ValueError] = TensorFileError
                 ) -> dict[str, int]:
    """Check shapes against a spec of ints (exact), names (must agree wherever they appear) and None (any size).

    ``match_shapes(t, {"w1": ("hidden", 64), "w2": (8, "hidden")})`` returns ``{"hidden": ...}``; sizes given in
    ``dims`` are fixed beforehand. Named sizes must be at least 1. Missing keys are refused.
    """
    found = dict(dims or {})
    for key, expected in spec.items():
        if key not in tensors:
            raise error(f"tensor {key!r} is missing")
        shape = tuple(tensors[key].shape)
        if len(shape) != len(expected):
            raise error(f"tensor {key!r} has shape {list(shape)}, expected {len(expected)} dims {list(expected)}")
        for size, want in zip(shape, expected):
            if isinstance(want, str):
                if size < 1:
                    raise error(f"tensor {key!r} has shape {list(shape)}: {want} must be at least 1")
                want = found.setdefault(want, size)
            if want is not None and size != want:
                raise error(f"tensor {key!r} has shape {list(shape)}, expected {_spec_text(expected, found)}")
    return found


def _spec_text(expected: Sequence[int | str | None], found: Mapping[str, int]) -> str:
    return "[" + ", ".join(f"{d}={found[d]}" if isinstance(d, str) and d in found else "*" if d is None else str(d)
                           for d in expected) + "]"


def check_state_dict(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *,
                     error: type[ValueError] = TensorFileError, allow_missing: Collection[str] = ()
                     ) -> dict[str, torch.Tensor]:
    """Tensors ready for ``module.load_state_dict``: same keys (``allow_missing`` may be absent) and shapes as
    ``reference`` (e.g. ``module.state_dict()``), floating point where the reference is, finite, cast to the
    reference's dtype."""
    require_keys(tensors, set(reference) - set(allow_missing), optional=reference.keys(), error=error)
    out: dict[str, torch.Tensor] = {}
    cast: dict[int, torch.Tensor] = {}  # one tensor under two names (tied weights) stays one tensor
    for key, tensor in tensors.items():
        want = reference[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise error(f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(want.shape)}")
        if want.is_floating_point() != tensor.is_floating_point():
            raise error(f"tensor {key!r} is {tensor.dtype}, expected {want.dtype}")
        if id(tensor) not in cast:
            cast[id(tensor)] = tensor.to(want.dtype)
        out[key] = cast[id(tensor)]
    check_finite(out, error=error)
    return out


def check_finite(tensors: Mapping[str, torch.Tensor], *, max_abs: float | None = None,
                 error: type[ValueError] = TensorFileError) -> None:
    """Refuse floating-point tensors holding NaN/Inf, or (with ``max_abs``) values beyond ±max_abs."""
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue
        if tensor.dtype in _FLOAT8_TORCH:
            tensor = tensor.to(FLOAT8_UPCAST)
        if not torch.isfinite(tensor).all():
            raise error(f"tensor {key!r} contains NaN or Inf values")
        if max_abs is not None:
            peak = tensor.abs().max().item()
            if peak > max_abs:
                raise error(f"tensor {key!r} holds values up to {peak:.3g}, beyond the accepted {max_abs:g}")


def load_checked_module(build: Callable[[], "torch.nn.Module"], tensors: Mapping[str, torch.Tensor], *,
                        max_abs: float, error: type[ValueError] = TensorFileError) -> "torch.nn.Module":
    """The module ``build()`` makes, with ``tensors`` as its weights, in eval mode and frozen: built on the meta device,
    so nothing is allocated before every tensor has been checked against it (keys, shapes, dtypes, finite, within
    ±max_abs); the checked tensors then become its parameters (``assign``: no second copy, nothing left random)."""
    with torch.device("meta"):
        model = build()
    state = check_state_dict(tensors, model.state_dict(), error=error)
    check_finite(state, max_abs=max_abs, error=error)
    model.load_state_dict(state, strict=True, assign=True)
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:  # a buffer the module computes itself: such a module cannot be built this way (a bug, not the file)
        raise RuntimeError(f"{type(model).__name__} has tensors no file provides: {unset[:3]}")
    return model.eval().requires_grad_(False)


_FLOAT8_TORCH = frozenset(_DTYPES[name][0] for name in FLOAT8_DTYPES if _DTYPES[name][0] is not None)


def as_float(tensor: torch.Tensor) -> torch.Tensor:
    """float8 tensors upcast (exactly) to bfloat16, so that every torch op works on them; others unchanged."""
    return tensor.to(FLOAT8_UPCAST) if tensor.dtype in _FLOAT8_TORCH else tensor


def low_rank_norm(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0, *, limit: float | None = None) -> float:
    """Frobenius norm of ``scale · up @ down`` (up [out, r(,1,1)], down [r, in(, kh, kw)]) without forming it.

    Exact from the r×r Gram matrices: ‖U D‖² = Σ (UᵀU ⊙ D Dᵀ), factors normalised by their largest entry first so
    nothing overflows; non-finite factors give inf. With ``limit``, the cheap bound ‖U‖·‖D‖ (one pass over the
    factors) is returned instead where it is within the limit, so the r² work is only done for suspicious layers.
    """
    u = as_float(up).reshape(up.shape[0], -1).float()
    d = as_float(down).reshape(down.shape[0], -1).float()
    if u.numel() == 0 or d.numel() == 0 or scale == 0:
        return 0.0
    u_max, d_max = u.abs().max().item(), d.abs().max().item()
    if not (math.isfinite(u_max) and math.isfinite(d_max) and math.isfinite(scale)):
        return math.inf
    if u_max == 0 or d_max == 0:
        return 0.0
    u, d = u / u_max, d / d_max
    factor = abs(scale) * u_max * d_max
    if limit is not None:
        bound = factor * u.norm().item() * d.norm().item()
        if bound <= limit:
            return bound
    squared = ((u.t() @ u) * (d @ d.t())).sum().item()
    return factor * math.sqrt(max(squared, 0.0))


def check_low_rank_norm(up: torch.Tensor, down: torch.Tensor, scale: float, where: str, *,
                        error: type[ValueError] = TensorFileError, limit: float = MAX_UPDATE_NORM) -> None:
    """Refuse an update ``scale · up @ down`` whose Frobenius norm exceeds ``limit`` (or is not finite)."""
    norm = low_rank_norm(up, down, scale, limit=limit)
    if not norm <= limit:
        raise error(f"{where}: the update's norm is {norm:.3g}, beyond the {limit:g} that any usable LoRA stays far "
                    "below (absurd factor or alpha values?)")


def is_json_number(value: object) -> bool:
    """A finite JSON number that converts to float: no bool, no NaN, no integer of 400 digits (OverflowError)."""
    if type(value) is int:
        return abs(value) <= 10**300
    return type(value) is float and math.isfinite(value)


def json_metadata(metadata: Mapping[str, str], key: str, *, error: type[ValueError] = TensorFileError
                  ) -> dict | None:
    """The JSON object stored as the string ``metadata[key]``; None when absent, empty or JSON null."""
    raw = metadata.get(key)
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise error(f"header metadata {key!r} is JSON nested far too deeply") from None
    except ValueError:
        raise error(f"header metadata {key!r} is not valid JSON") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise error(f"header metadata {key!r} is a JSON {_json_type(value)}, expected an object")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                             metadata: dict[str, str] | None = None) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file.

    The file gets the permissions of any other new file (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp, mode = _create_temp(path)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.chmod(tmp, mode)  # safetensors >= 0.6 writes 0600 files whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _create_temp(path: Path) -> tuple[Path, int]:
    """``.<name>.<random>.tmp`` next to ``path`` (name shortened to fit NAME_MAX), and the permission bits a new
    file gets here (0666 minus the umask, as the kernel applied it to this one: no racy os.umask call)."""
    stem = _temp_stem(path)
    while True:
        tmp = path.with_name(f".{stem}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


_SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors >= 0.6 writes .tmpXXXXXX, then renames


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files that killed :func:`write_safetensors_atomic` calls for ``path`` left behind: ours
    (``.<name>.<16 hex>.tmp``) and the safetensors library's own (``.tmpXXXXXX``, not attributable to one target,
    so only delete those where no other writer works in the folder, e.g. a training run's own output folder)."""
    path = Path(path)
    stem = _temp_stem(path)
    if not path.parent.is_dir():
        return []
    ours = [p for p in path.parent.glob(f".{_glob_escape(stem)}.*{TEMP_SUFFIX}")
            if len(p.name) == len(stem) + 2 + 16 + len(TEMP_SUFFIX)]
    library = [p for p in path.parent.glob(".tmp*") if _SAFETENSORS_TEMP.fullmatch(p.name) and p.is_file()]
    return sorted(ours + library)


def _temp_stem(path: Path) -> str:
    room = _NAME_MAX - len("..") - 16 - len(TEMP_SUFFIX)  # dots, 16 hex digits, suffix
    return path.name.encode()[:room].decode(errors="ignore")


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
