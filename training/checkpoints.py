"""Training checkpoints that survive crashes: safetensors + JSON only (no pickle), atomic, verified before use.

A checkpoint is a folder ``checkpoints/step_NNNNNN/`` holding

- ``trainable.safetensors``   the trained parameters (nothing of the frozen backbone),
- ``optimizer.safetensors``   the optimiser's state tensors, its hyper-parameters as JSON in the header,
- ``rng_<rank>.safetensors``  each process's global RNG states (torch, CUDA, numpy, python),
- ``trainer_state.json``      step, process count, parameter checksums and the SHA-256 of every file above.

It is written into ``.tmp_step_NNNNNN`` and renamed only after ``trainer_state.json`` (written last) is in place, so
a folder named ``step_*`` is always complete; a kill during the write leaves a ``.tmp_*`` folder that the next start
removes. Before resuming, a checkpoint is verified against its recorded hashes; a damaged one is skipped in favour
of the newest intact one, and the log says which and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from analogy_core.files import read_safetensors, stale_temp_files

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STEP_PATTERN = re.compile(r"step_(\d{6,})")
TMP_PREFIX = ".tmp_step_"
EXPORT_TMP_PREFIX = ".tmp_export_"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged, or does not fit the run."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def step_export_name(artifact: str, step: int) -> str:
    """The name a checkpoint's copy of the output file takes with ``keep_exports``:
    ``lorweb_basis.safetensors`` at step 2000 -> ``lorweb_basis.step_002000.safetensors``."""
    path = Path(artifact)
    return f"{path.stem}.{checkpoint_name(step)}{path.suffix}"


def export_step(name: str, artifact: str) -> int | None:
    """The step of a step export's file name (``step_export_name(artifact, N)`` -> N); None for any other name."""
    stem, suffix = Path(artifact).stem, Path(artifact).suffix
    if not (name.startswith(f"{stem}.") and name.endswith(suffix)):
        return None
    match = STEP_PATTERN.fullmatch(name[len(stem) + 1:len(name) - len(suffix)])
    return int(match.group(1)) if match else None


def step_exports(output_dir: Path, artifact: str) -> list[tuple[int, Path]]:
    """(step, path) of every kept step export of ``artifact`` in ``output_dir``, oldest first."""
    path = Path(artifact)
    found = [(export_step(candidate.name, artifact), candidate)
             for candidate in output_dir.glob(f"{path.stem}.step_*{path.suffix}")]
    return sorted((step, candidate) for step, candidate in found if step is not None)


def companion_path(path: Path, artifact: str, companion: str) -> Path:
    """Where the ``companion`` file of an export at ``path`` lies: beside the output file ``artifact`` under its own
    name, beside a step export (``<artifact stem>.step_N``) under its step name (see ``export_companions``)."""
    if path.name == artifact:
        return path.with_name(companion)
    step = export_step(path.name, artifact)
    if step is None:
        raise ValueError(f"{path.name!r} is neither {artifact!r} nor one of its step exports")
    return path.with_name(step_export_name(companion, step))


def keep_export(output_dir: Path, artifact: str, step: int) -> Path:
    """Copy the output file just exported to its step name, atomically (a temporary file, then a rename)."""
    source = output_dir / artifact
    target = output_dir / step_export_name(artifact, step)
    tmp = target.with_name(f"{EXPORT_TMP_PREFIX}{target.name}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target


def list_checkpoints(folder: Path) -> list[Checkpoint]:
    """Checkpoints under ``folder``, newest first. Anything not named exactly ``step_<digits>`` is ignored."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STEP_PATTERN.fullmatch(path.name)
        if match and path.is_dir():
            found.append(Checkpoint(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temporaries(output_dir: Path, artifacts: tuple[str, ...] = ()) -> list[Path]:
    """Delete what killed writes leave behind: ``checkpoints/.tmp_step_*`` folders, and the temporary files of the
    atomic writes of ``artifacts`` (ours and the safetensors library's; the run owns its output folder)."""
    removed = []
    for path in (output_dir / "checkpoints").glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for path in output_dir.glob(EXPORT_TMP_PREFIX + "*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    for name in artifacts:
        for path in stale_temp_files(output_dir / name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prune(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder)[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# state <-> safetensors


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint header")


def save_optimizer(state: dict, path: Path) -> None:
    """An optimiser ``state_dict()`` as safetensors: tensors under ``state.<param>.<name>``, the rest as JSON."""
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    header = {"param_groups": state["param_groups"], "scalars": scalars}
    save_file(tensors, str(path), metadata={"optimizer": json.dumps(header, default=_jsonable)})


def load_optimizer(path: Path) -> dict:
    tensors, metadata = read_safetensors(path)
    try:
        header = json.loads(metadata["optimizer"])
        groups = header["param_groups"]
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: optimiser header unreadable: {err}") from None
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in header.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": groups}


def global_rng_states() -> dict[str, Any]:
    """This process's global generators: Python, NumPy, torch on the CPU and on every CUDA device (only the trainer's
    own generators are needed for exact batches and noise; these cover everything else, e.g. dropout)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_global_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`global_rng_states` took (CUDA states only onto as many devices as they were taken from)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    cuda = states["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_rng(path: Path) -> None:
    """:func:`global_rng_states` written as safetensors (tensors) with JSON metadata (NumPy's scalars, Python's)."""
    states = global_rng_states()
    tensors = {"torch_cpu": states["torch_cpu"], **{f"cuda.{i}": s for i, s in enumerate(states["cuda"])}}
    kind, keys, pos, has_gauss, cached = states["numpy"]
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps(states["python"], default=_jsonable)}
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    tensors, meta = read_safetensors(path)
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    version, internal, gauss = json.loads(meta["python"])
    cuda = sorted((int(k.split(".")[1]), t) for k, t in tensors.items() if k.startswith("cuda."))  # by device number
    set_global_rng_states({
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "torch_cpu": tensors["torch_cpu"], "cuda": [t for _, t in cuda]})


def rng_file(rank: int) -> str:
    return f"rng_{rank}.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# writing and verifying


def finalize(tmp: Path, final: Path, state: dict[str, Any], optional: tuple[str, ...]) -> None:
    """Record the hash of every file in ``tmp``, write the state file last, then rename ``tmp`` to ``final``."""
    files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != STATE_FILE}
    state = dict(state, format=FORMAT_VERSION, files=files, optional=[n for n in optional if n in files])
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if final.exists():  # a re-run of the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)


def read_state(checkpoint: Checkpoint) -> dict[str, Any]:
    path = checkpoint.path / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} missing or unreadable ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{path.name} is not a checkpoint record of format {FORMAT_VERSION}")
    if state.get("step") != checkpoint.step:
        raise CheckpointError(f"{path.name} records step {state.get('step')} but the folder is step {checkpoint.step}")
    return state


def verify(checkpoint: Checkpoint) -> tuple[dict[str, Any], list[str]]:
    """(state record, names of optional files that are missing or damaged). Raises CheckpointError when a required
    file is missing or does not match its recorded hash."""
    state = read_state(checkpoint)
    optional = set(state.get("optional", []))
    degraded = []
    for name, digest in state["files"].items():
        path = checkpoint.path / name
        ok = path.is_file() and sha256(path) == digest
        if ok:
            continue
        if name in optional:
            degraded.append(name)
        else:
            raise CheckpointError(f"{name} is {'damaged' if path.exists() else 'missing'}")
    for required in (TRAINABLE_FILE, OPTIMIZER_FILE):
        if required not in state["files"]:
            raise CheckpointError(f"the record lists no {required}")
    return state, degraded
