"""The settings LoRWeB trains with on the analogy world (the yardstick's and the demo's), passed to
``python -m training.train_lorweb --preset tiny`` as ``--set key=value`` overrides.

    python -m training.train_lorweb --preset tiny $(python -m training.world.presets <world folder>)  # by hand

Why these values: 128-px grids of 64-px panels (the world's panel); N=16 basis entries of rank 4 for 7 training
families (the official N=32 serves hundreds of tasks); neutral prompt (``data=world``), no caption dropout (the
prompt carries nothing); ``logit_normal`` timesteps as the world backbone was pretrained with; guidance 2.5, the
shipped example workflow's value (the world backbone ignores guidance: it was pretrained over 1..4); plain AdamW in
float32 (CPU).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

from training import checkpoints as ckpt
from training.world.launch import run_module, thread_env
from training.world.scenes import WORLD_VERSION

REPO = Path(__file__).resolve().parent.parent.parent

LORWEB_WORLD: dict[str, object] = dict(
    data="world", grid_resolution=128, num_entries=16, rank=4, key_dim=32, batch_size=8, max_steps=1000,
    learning_rate=2e-3, use_8bit_adam=False, mixed_precision="no", gradient_checkpointing=False, caption_dropout=0.0,
    num_workers=0, checkpoint_every=250, keep_checkpoints=1, sample_every=1000, sample_steps=8, log_every=20,
    report_to="none", timestep_sampling="logit_normal", guidance=2.5)
# Learning rate 2e-3 on both worlds (6e-3 until 2026-12-03 on the quick world, 2026-12-04 on the full one), measured
# (README): on the quick world, seeds 0 / 1 / 2, the routing gap rose from 0.09 / 0.17 / 0.18 to 0.24 / 0.27 / 0.22
# and the kept cells from 0.54 / 0.76 / 0.74 to 0.65 / 0.71 / 0.78, edited cells 0.04 / 0.07 / 0.03 -> 0.03 / 0.04 /
# 0.03; on the full world, seed 0, edited 0.09 -> 0.15, kept 0.59 -> 0.60, per-family error 1.66x -> 1.36x no edit,
# routing gap 0.18 -> 0.35. The 256-wide probes all ran at 2e-3.
# The CI-sized run the tests use (on the quick world): the same preset, 400 steps.
LORWEB_WORLD_QUICK: dict[str, object] = {**LORWEB_WORLD, "max_steps": 400,
                                         "checkpoint_every": 400, "sample_every": 400}


# The LoRA ceiling of LoRWeB's row (training/world/yardstick/ceiling.py): a basis of ONE entry is a plain LoRA (the
# softmax over one key is 1 whatever the query, so keys and query projection get no gradient) of rank 16 x 4 = 64, the
# preset's per-layer rank budget, trained on one family alone (``data=world:families=<f>``), with the issue's "generous
# CPU budget": 1,200 steps at learning rate 2e-3 on both worlds (until 2026-12-04: 1,000 / 400 steps at 6e-3). Why,
# measured on the quick world v2, seed 0 (README, "The ceilings"): on the 96-wide backbone 1,200 steps instead of 400
# took invert from 0.305 to 0.66 edited cells and 2e-3 instead of 6e-3 another +0.18 (0.844), the recolour from 0.04 /
# 0.91 to 0.85 / 0.98; on the 256-wide one 6e-3 diverged once where 2e-3 did not.
LORWEB_CEILING_STEPS = {"full": 1200, "quick": 1200}
LORWEB_CEILING_RATE = 2e-3
# Every world run trains eager (no ``torch_compile``), measured (README, "Compiling"): alone, a compiled step of
# the world's transformers is 0.64-0.78x an eager one (``python -m bench.compile_step``), but in the yardstick's two
# lanes on these 2 cores the compiled LoRWeB ceilings took 0.90-0.98x their eager seconds once compiled (+95-114 s
# for each cold compile) and slowed the rows beside them to 1.2-1.4x
# (bench/results/analogy_world_v2_full_compiled_ceilings_partial_s0.json): no time saved, and it would change every
# ceiling's cache key.


def lorweb_settings(world_folder: str, quick: bool = False) -> dict[str, object]:
    """The full key -> value settings for a world folder (backbone and query encoder included)."""
    spec = f"world:{world_folder}"
    return {"backbone": spec, "query_encoder": spec, **(LORWEB_WORLD_QUICK if quick else LORWEB_WORLD)}


def lorweb_ceiling_settings(world_folder: str, family: str, quick: bool = False, seed: int = 0) -> dict[str, object]:
    """The settings of LoRWeB's LoRA ceiling for one family: the world preset with one basis entry of the preset's
    per-layer rank (``num_entries x rank``), trained on ``family`` alone."""
    settings = lorweb_settings(world_folder, quick)
    steps = LORWEB_CEILING_STEPS["quick" if quick else "full"]
    return {**settings, "learning_rate": LORWEB_CEILING_RATE,
            "num_entries": 1, "rank": int(settings["num_entries"]) * int(settings["rank"]),
            "data": f"world:families={family}", "max_steps": steps, "checkpoint_every": steps, "sample_every": steps,
            "seed": seed}


def set_arguments(settings: dict[str, object]) -> list[str]:
    """``--set key=value`` arguments for the trainer's command line."""
    out: list[str] = []
    for key, value in settings.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{key}={text}"]
    return out


# What may change when a world run is continued (``resume``): its length and bookkeeping, not what it learns.
# (``torch_compile`` too: compiled steps round float sums otherwise, as another thread count does, and learn the same.)
RESUMABLE_CHANGES = frozenset({"max_steps", "checkpoint_every", "keep_checkpoints", "keep_exports", "sample_every",
                               "log_every", "output_dir", "report_to", "torch_compile"})


def _same_place(recorded: str, given: str) -> bool:
    """Whether two settings name one existing file or folder by different spellings (a symlink, a relative path),
    after the same ``world:`` prefix if any."""
    prefix = "world:"
    if recorded.startswith(prefix) != given.startswith(prefix):
        return False
    if recorded.startswith(prefix):
        recorded, given = recorded[len(prefix):], given[len(prefix):]
    first, second = Path(recorded), Path(given)
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def _same_setting(recorded: object, given: object) -> bool:
    """Whether a run's recorded config value equals a ``--set`` value (read as the trainer reads it); paths are
    compared as the places they name."""
    if isinstance(recorded, str) and isinstance(given, str) and recorded != given and _same_place(recorded, given):
        return True
    if isinstance(given, str) and not isinstance(recorded, str):
        given = yaml.safe_load(given)
    if isinstance(recorded, bool) or isinstance(given, bool):
        return str(recorded).lower() == str(given).lower()
    try:
        return float(recorded) == float(given)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return json.dumps(recorded, default=str) == json.dumps(given, default=str)


class RunSettingsChanged(ValueError):
    """A run asked to continue with settings other than its own."""


# the training task behind each trainer module run_trainer starts: its config class and ``tiny`` preset say what a
# setting left out of a run's ``--set`` list is
TRAINER_TASKS = {"training.train_lorweb": ("training.lorweb.task", "LoRWeBTask"),
                 "training.train_loc": ("training.loc.task", "LoCTask"),
                 "training.train_edit_transfer": ("training.edit_transfer.task", "EditTransferTask"),
                 "training.train_region": ("training.regions.task", "RegionTask")}


def preset_defaults(module: str) -> dict[str, object]:
    """The settings a ``python -m <module> --preset tiny`` run has before any ``--set``."""
    if module not in TRAINER_TASKS:
        raise ValueError(f"no trainer task is known for {module!r}; expected one of {sorted(TRAINER_TASKS)}")
    task_module, name = TRAINER_TASKS[module]
    task = getattr(importlib.import_module(task_module), name)
    return task.config_cls().update(task.presets["tiny"]).to_dict()


def check_resumable(out: Path, settings: dict[str, object], module: str | None = None) -> None:
    """Refuse to continue the run in ``out`` with settings other than its own (beyond :data:`RESUMABLE_CHANGES`), or
    with a ``max_steps`` below a checkpoint it already has (its files would be of more steps than asked): the
    continued run would no longer be one run of those settings. With the trainer ``module``, a setting the run was
    given that ``settings`` leaves out must be the preset's own (a run of ``hidden=128`` is not one asked without
    it). A folder without a run passes."""
    recorded_file = out / "config.json"
    if not recorded_file.is_file():
        return
    recorded = json.loads(recorded_file.read_text())
    # keys the run recorded only: a run from before a setting existed is judged on the settings it had
    defaults = {k: v for k, v in preset_defaults(module).items() if k in recorded} if module else {}
    asked = {**defaults, **settings}
    changed = {key: (recorded.get(key, "<not set>"), value) for key, value in asked.items()
               if key not in RESUMABLE_CHANGES and not _same_setting(recorded.get(key), value)}
    if changed:
        listed = "; ".join(f"{key}: the run has {old!r}, asked {new!r}" for key, (old, new) in sorted(changed.items()))
        raise RunSettingsChanged(f"cannot continue the run in {out} with other settings ({listed}); only its length "
                                 f"and bookkeeping ({', '.join(sorted(RESUMABLE_CHANGES))}) may change — use another "
                                 "--out")
    reached = max((c.step for c in ckpt.list_checkpoints(out / "checkpoints")), default=0)
    if "max_steps" in settings and reached > int(settings["max_steps"]):  # type: ignore[call-overload]
        raise RunSettingsChanged(f"cannot continue the run in {out} to max_steps={settings['max_steps']}: it already "
                                 f"has a checkpoint at step {reached} — ask for at least {reached} steps, or use "
                                 "another --out")


_lane_threads: int | None = None  # torch threads of the runs started without a count (:func:`lane_threads`)


@contextlib.contextmanager
def lane_threads(threads: int):
    """Within the block, :func:`run_trainer` runs started without a thread count get ``threads`` (the yardstick's
    rows, holding one lane beside the ceilings)."""
    global _lane_threads
    saved, _lane_threads = _lane_threads, threads
    try:
        yield
    finally:
        _lane_threads = saved


def run_trainer(module: str, settings: dict[str, object], out: Path, max_steps: int | None = None,
                resume: bool = False, threads: int | None = None) -> float:
    """``python -m <module> --preset tiny --set k=v ... --output-dir out [--max-steps N] [--resume]`` in a process of
    its own (Accelerate keeps process-wide state; :func:`training.world.launch.run_module`), logged to
    ``out/train.log`` (appended to when resuming); returns the seconds it took. Every world run of every trainer goes
    through here. ``resume`` continues the run already in ``out`` (its newest checkpoint; a finished run returns at
    once, a longer ``max_steps`` extends it) after :func:`check_resumable`. ``threads``: a run started beside others
    (:class:`training.world.yardstick.ceiling.CeilingQueue`), with that many torch threads (default: those of the
    enclosing :func:`lane_threads`, else the process's)."""
    if resume:
        check_resumable(out, {**settings, **({"max_steps": max_steps} if max_steps is not None else {})}, module)
    argv = ["--preset", "tiny", *set_arguments(settings), "--output-dir", str(out),
            *(["--max-steps", str(max_steps)] if max_steps is not None else []), *(["--resume"] if resume else [])]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = dict(os.environ, TQDM_DISABLE="1")
    threads = _lane_threads if threads is None else threads
    if threads is not None:
        env = thread_env(threads, env)
    status = run_module(module, argv, out / "train.log", append=resume, cwd=REPO, env=env)
    if status:
        raise RuntimeError(f"python -m {module} {' '.join(argv)} failed ({status}):\n"
                           f"{(out / 'train.log').read_text()[-3000:]}")
    return time.monotonic() - started


def train_lorweb(world_folder: str, out: Path, quick: bool = False, seed: int = 0, max_steps: int | None = None,
                 resume: bool = False, overrides: dict[str, object] | None = None) -> float:
    """LoRWeB's world preset (:func:`run_trainer`); ``resume`` continues (or finishes at once) a run already in
    ``out``."""
    settings = {**lorweb_settings(world_folder, quick), "seed": seed, **(overrides or {})}
    return run_trainer("training.train_lorweb", settings, out, int(max_steps or settings["max_steps"]), resume)


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else f"outputs/world/v{WORLD_VERSION}-full-s0"
    print(" ".join(set_arguments(lorweb_settings(folder, "--quick" in sys.argv))))
