"""One LoRWeB training step of the yardstick's ceilings (forward + backward), with and without the query encoder.

    .venv/bin/python -m bench.lorweb_ceiling_step [--world outputs/world/v2-full-s0] [--repeats 10] [--json F]

A ceiling trains a one-entry basis (or, for the full ceiling, the whole transformer), whose mixing coefficient is 1
whatever the analogy query, so the trainer no longer runs the frozen CLIP on A, A′ and B
(:func:`analogy_core.lorweb.layer.reads_query`). Timed in turn within every repeat on the world's own models and one
batch of the ceiling's data (batch 8, ``invert``): ``encoder`` — the step as before, the query encoded (forced) —
against ``skipped`` — the step as trained now; each for the LoRA and the full ceiling. Both give the same loss (checked
here; the tests check it bit for bit on a stub).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from types import SimpleNamespace

import torch

from analogy_core.lorweb.layer import LoRWeBLinear
from bench.timing import interleaved_median_times
from training.data.batching import collate
from training.lorweb.task import LoRWeBTask
from training.trainer import config_from_args, parse_args
from training.world.presets import lorweb_ceiling_settings, set_arguments
from training.world.scenes import WORLD_VERSION


def ceiling_task(world: str, full: bool) -> tuple[LoRWeBTask, torch.nn.Module, dict]:
    settings = lorweb_ceiling_settings(world, "invert", "quick" in Path(world).name, 0)
    if full:
        settings = {**settings, "full_finetune": True}
    argv = ["--preset", "tiny", *set_arguments(settings), "--output-dir", "/tmp/unused"]
    cfg = config_from_args(LoRWeBTask, parse_args(LoRWeBTask, argv))
    task = LoRWeBTask(cfg, SimpleNamespace(device=torch.device("cpu")))
    data = task.dataset()
    model = task.build()
    return task, model, collate([data[i] for i in range(cfg.batch_size)])


def step(task: LoRWeBTask, model: torch.nn.Module, batch: dict) -> float:
    model.zero_grad(set_to_none=True)
    loss = task.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    return loss.item()


def forced_encoder(fn):
    """``fn`` run as if every LoRWeB layer read the query (the step before the skip); a full fine-tune's model has
    no LoRWeB layer, so its query is forced through ``reads_query`` on the task module instead."""
    def run():
        import training.lorweb.task as task_module

        saved_layer, saved_task = LoRWeBLinear.reads_query, task_module.reads_query
        LoRWeBLinear.reads_query = property(lambda self: True)
        task_module.reads_query = lambda model: True
        try:
            return fn()
        finally:
            LoRWeBLinear.reads_query, task_module.reads_query = saved_layer, saved_task
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default=f"outputs/world/v{WORLD_VERSION}-full-s0")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = {"world": args.world, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "ceilings": {}}
    for kind, full in (("lora", False), ("full", True)):
        task, model, batch = ceiling_task(args.world, full)
        fns = {"encoder": forced_encoder(lambda: step(task, model, batch)), "skipped": lambda: step(task, model, batch)}
        losses = {name: fn() for name, fn in fns.items()}
        if losses["encoder"] != losses["skipped"]:
            raise AssertionError(f"the skip changed the {kind} ceiling's loss: {losses}")
        times = interleaved_median_times(fns, args.repeats)
        report["ceilings"][kind] = {"seconds": {k: round(v, 4) for k, v in times.items()},
                                    "skipped_over_encoder": round(times["skipped"] / times["encoder"], 3)}
        print(f"{kind} ceiling step: encoder {times['encoder']:.3f} s, skipped {times['skipped']:.3f} s "
              f"({times['skipped'] / times['encoder']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
