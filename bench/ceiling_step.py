"""One training step of the yardstick's ceilings (forward + backward), with and without the frozen image encoder.

    .venv/bin/python -m bench.ceiling_step [--row lorweb|loc] [--world outputs/world/v2-full-s0] [--repeats 10]
                                           [--json F]

A ceiling trains one LoRA the same for every analogy, so the row's image encoder has nothing to tell it: LoRWeB's
one-entry basis mixes with coefficient 1 whatever the query (and its full fine-tune has no basis at all,
:func:`analogy_core.lorweb.layer.reads_query`); LoRA of Change's plain LoRA ignores the pair's tokens
(``PlainLoRA.reads_pair``; its full fine-tune never ran the encoder). Since 2026-12-07 the trainers no longer run the
encoder for them. Timed in turn within every repeat on the world's own models and one batch of the ceiling's data
(batch 8, ``invert``): ``encoder`` — the step as before, the encoder run (forced) — against ``skipped`` — the step as
trained now. Both give the same loss (checked here; the tests check the gradients bit for bit on stubs).

LoRWeB's LoRA ceiling also times ``mixing``: the encoder skipped, but each one-entry layer computing its coefficients
(all exactly 1) and scaling by them, its keys and query projection trained (to zero gradients), as it did until the
layer skipped and froze them (2026-12-07, stop 61); ``encoder`` trains them too. The loss is checked equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.timing import interleaved_median_times
from training.data.batching import collate
from training.trainer import config_from_args, parse_args
from training.world.presets import set_arguments
from training.world.scenes import WORLD_VERSION


def lorweb_task(world: str, quick: bool, full: bool):
    from training.lorweb.task import LoRWeBTask
    from training.world.presets import lorweb_ceiling_settings

    settings = lorweb_ceiling_settings(world, "invert", quick, 0)
    return LoRWeBTask, {**settings, "full_finetune": True} if full else settings


def loc_task(world: str, quick: bool, full: bool):
    from training.loc.task import LoCTask
    from training.world.yardstick.loc import loc_ceiling_settings

    if full:
        raise ValueError("LoRA of Change's full fine-tune ceiling never ran the encoder: nothing to compare")
    return LoCTask, loc_ceiling_settings(world, "invert", quick, 0)


ROWS = {"lorweb": (lorweb_task, ("lora", "full")), "loc": (loc_task, ("lora",))}


@contextlib.contextmanager
def keys_trained(model):
    """The keys and query projection of ``model``'s one-entry LoRWeB layers trained (to zero gradients), as they were
    before the layer froze them."""
    from analogy_core.lorweb.layer import LoRWeBLinear

    unused = [p for m in model.modules() if isinstance(m, LoRWeBLinear) for p in (m.lora_keys, m.att_lora_to_q.weight)
              if not p.requires_grad]
    for param in unused:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in unused:
            param.requires_grad_(False)


@contextlib.contextmanager
def encoder_forced(row: str, model):
    """The step as it was before the skip: every model reads the encoder's output (LoRWeB's keys trained)."""
    saved = []
    with contextlib.ExitStack() as stack:
        if row == "lorweb":
            import training.lorweb.task as task_module
            from analogy_core.lorweb.layer import LoRWeBLinear

            saved = [(LoRWeBLinear, "reads_query", LoRWeBLinear.reads_query),
                     (task_module, "reads_query", task_module.reads_query)]
            LoRWeBLinear.reads_query = property(lambda self: True)
            task_module.reads_query = lambda model: True
            stack.enter_context(keys_trained(model))
        else:
            from training.loc.plain import PlainLoRA

            saved = [(PlainLoRA, "reads_pair", PlainLoRA.reads_pair)]
            PlainLoRA.reads_pair = True
        try:
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)


@contextlib.contextmanager
def layers_mixing(model):
    """LoRWeB's one-entry layers of ``model`` computing and applying their coefficients, their keys and projection
    trained (to zero gradients), the encoder still skipped: the step as it was before the layer skipped its mixing."""
    import training.lorweb.task as task_module
    from analogy_core.lorweb.layer import LoRWeBLinear, lorweb_layers

    def zero_query(model, batch_size, device=None):  # blank_query without its check (the layers claim to read it)
        width = next(iter(lorweb_layers(model).values())).att_lora_to_q.in_features
        return torch.zeros(batch_size, width, device=device)

    saved = [(LoRWeBLinear, "reads_query", LoRWeBLinear.reads_query),
             (task_module, "reads_query", task_module.reads_query),
             (task_module, "blank_query", task_module.blank_query)]
    LoRWeBLinear.reads_query = property(lambda self: True)
    task_module.reads_query = lambda model: False
    task_module.blank_query = zero_query
    try:
        with keys_trained(model):
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def ceiling_step(row: str, world: str, full: bool):
    """A function running one training step of ``row``'s LoRA (or full) ceiling on ``invert``."""
    task_cls, settings = ROWS[row][0](world, "quick" in Path(world).name, full)
    return training_step(task_cls, settings)


def training_step(task_cls, settings: dict[str, object]):
    """A function running one training step (forward + backward, no optimiser step) of ``task_cls`` with the trainer
    settings ``settings`` on the first batch of its data, the same batch and noise every call; ``.model`` and
    ``.task`` are what it trains."""
    argv = ["--preset", "tiny", *set_arguments(settings), "--output-dir", "/tmp/unused"]
    cfg = config_from_args(task_cls, parse_args(task_cls, argv))
    task = task_cls(cfg, SimpleNamespace(device=torch.device("cpu")))
    data = task.dataset()
    model = task.build()
    batch = collate([data[i] for i in range(cfg.batch_size)])

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = task.loss(model, batch, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.item()
    step.model, step.task = model, task  # type: ignore[attr-defined]
    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", choices=sorted(ROWS), default="lorweb")
    parser.add_argument("--world", default=f"outputs/world/v{WORLD_VERSION}-full-s0")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = {"row": args.row, "world": args.world, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "ceilings": {}}
    for kind in ROWS[args.row][1]:
        step = ceiling_step(args.row, args.world, kind == "full")

        def forced():
            with encoder_forced(args.row, step.model):
                return step()
        fns = {"encoder": forced, "skipped": step}
        if args.row == "lorweb" and kind == "lora":
            def mixing():
                with layers_mixing(step.model):
                    return step()
            fns["mixing"] = mixing
        losses = {name: fn() for name, fn in fns.items()}
        if len(set(losses.values())) != 1:
            raise AssertionError(f"the skip changed the {kind} ceiling's loss: {losses}")
        times = interleaved_median_times(fns, args.repeats)
        report["ceilings"][kind] = {"seconds": {k: round(v, 4) for k, v in times.items()},
                                    "skipped_over_encoder": round(times["skipped"] / times["encoder"], 3)}
        if "mixing" in times:
            report["ceilings"][kind]["skipped_over_mixing"] = round(times["skipped"] / times["mixing"], 3)
            print(f"{args.row} {kind} ceiling step: mixing {times['mixing']:.3f} s, skipped {times['skipped']:.3f} s "
                  f"({times['skipped'] / times['mixing']:.2f}x)")
        print(f"{args.row} {kind} ceiling step: encoder {times['encoder']:.3f} s, skipped {times['skipped']:.3f} s "
              f"({times['skipped'] / times['encoder']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
