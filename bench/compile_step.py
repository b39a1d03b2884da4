"""One training step (forward + backward) eager against ``torch_compile`` (the trainers' setting), per world run.

    .venv/bin/python -m bench.compile_step [--runs lorweb_row,et_lora,...] [--world outputs/world/v2-full-s0]
                                           [--repeats 10] [--json F]

Each run is a trainer's task built from the settings the yardstick gives it on that world (the row, its LoRA
ceiling on ``invert``, its full fine-tune ceiling), one process, one batch of 8 per step drawn from its data. The
task's ``compile_targets`` are compiled in place as the trainer does (``training.trainer.compile_for_training``); the
eager variant runs the same compiled modules under ``torch.compiler.set_stance("force_eager")``, so the two are
timed in turn within every repeat on the same weights (``bench.timing``). The first compiled step (the compile, or a
load from torch's on-disk cache) is reported apart as ``first_compiled_step_seconds``. Both give the same loss to
1e-5 (checked here). The world's own runs stay eager: measured in the yardstick's lanes, these steps saved no time
(``training/world/presets.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path

import torch

from bench.ceiling_step import training_step
from bench.timing import interleaved_median_times
from training.trainer import compile_for_training
from training.world.scenes import WORLD_VERSION


def run_settings(run: str, world: str) -> tuple[type, dict]:
    """(task class, settings) of ``run`` = ``<row>_<row|lora|full>`` as the yardstick trains it on ``world`` (the
    ceilings on ``invert``, seed 0)."""
    from training.world import presets
    from training.world.registry import open_world
    from training.world.yardstick import edit_transfer as et
    from training.world.yardstick import loc, lorweb

    opened = open_world(world)
    quick = opened.quick
    row, kind = run.rsplit("_", 1)
    rows = {"lorweb": ("training.lorweb.task", "LoRWeBTask", lambda: presets.lorweb_settings(world, quick),
                       lorweb.CEILING),
            "loc": ("training.loc.task", "LoCTask", lambda: loc.loc_settings(world, quick), loc.CEILING),
            "et": ("training.edit_transfer.task", "EditTransferTask", lambda: et.et_settings(world, quick),
                   et.row_ceiling("edit_transfer"))}
    if row not in rows or kind not in ("row", "lora", "full"):
        raise ValueError(f"unknown run {run!r}; expected <lorweb|loc|et>_<row|lora|full>")
    module, name, row_settings, ceiling = rows[row]
    task = getattr(importlib.import_module(module), name)
    if kind == "row":
        return task, row_settings()
    return task, (ceiling if kind == "lora" else ceiling.full).settings(opened, quick, "invert", 0)


def compiled_step(run: str, world: str):
    """One training step of ``run`` (``bench.ceiling_step.training_step``) with its task's compile targets compiled
    in place, as the trainer compiles them."""
    task_cls, settings = run_settings(run, world)
    step = training_step(task_cls, {**settings, "torch_compile": True})
    compile_for_training(step.task, step.model)
    return step


def eager(step):
    def run() -> float:
        with torch.compiler.set_stance("force_eager"):
            return step()
    return run


RUNS = ("lorweb_row", "lorweb_lora", "lorweb_full", "et_row", "et_lora", "et_full", "loc_row", "loc_lora", "loc_full")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--world", default=f"outputs/world/v{WORLD_VERSION}-full-s0")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = {"world": args.world, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "runs": {}}
    for run in args.runs.split(","):
        torch._dynamo.reset()  # each run compiles (or loads from torch's disk cache) its own graphs
        step = compiled_step(run, args.world)
        eager_loss = eager(step)()
        start = time.perf_counter()
        compiled_loss = step()
        first = time.perf_counter() - start
        if abs(compiled_loss - eager_loss) > 1e-5 * max(1.0, abs(eager_loss)):
            raise AssertionError(f"{run}: the compiled step's loss {compiled_loss} is not the eager {eager_loss}")
        times = interleaved_median_times({"eager": eager(step), "compiled": step}, args.repeats)
        ratio = times["compiled"] / times["eager"]
        report["runs"][run] = {"seconds": {k: round(v, 4) for k, v in times.items()},
                               "compiled_over_eager": round(ratio, 3), "first_compiled_step_seconds": round(first, 1)}
        print(f"{run}: eager {times['eager']:.4f} s, compiled {times['compiled']:.4f} s ({ratio:.2f}x); first "
              f"compiled step {first:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
