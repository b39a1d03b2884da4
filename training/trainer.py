"""The one training loop every trainer of the pack runs on (LoRWeB, LoRA of Change, Edit Transfer, regions).

A method describes itself as a :class:`TrainingTask` — which module trains, its data, its loss, what file it
exports, what samples it draws — and :func:`run` does the rest the same way for all of them:

- config: the task's dataclass, ``--preset``, ``--config file.yaml``, ``--set key=value``;
- Accelerate: mixed precision, gradient accumulation, several processes (DDP), trackers (TensorBoard, …);
- an optimiser over the trainable parameters only (AdamW, or 8-bit AdamW on CUDA; a task may give parameter groups
  their own learning rate), a learning-rate schedule (:mod:`training.lr_schedule`), global grad-norm clipping, and a
  per-step hook (``after_step``, e.g. an EMA);
- batches as a pure function of (seed, step, rank), so resuming and sharding are exact; unreadable items skipped
  and counted, never an empty batch;
- checkpoints (``checkpoints/step_N``: safetensors + JSON, atomic, hashed) and ``--resume`` from the newest intact
  one; the task's artifact (e.g. ``lorweb_basis.safetensors``) rewritten atomically at every checkpoint;
- progress bar, loss log, sample images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from analogy_core.files import write_safetensors_atomic
from training import checkpoints as ckpt
from training import lr_schedule
from training.config import CommonConfig, build_config
from training.data.batching import ReadableItems, StepBatchSampler, collate

log = logging.getLogger("training")


class TrainingTask:
    """What a trainer defines; :func:`run` calls these in order (``dataset`` → ``build`` → loop of ``loss`` →
    ``export``/``write_samples`` at checkpoints). ``dataset`` reads only the config, so bad data stops a run before
    any model loads."""

    name: ClassVar[str] = "task"
    artifact: ClassVar[str] = "model.safetensors"       # the user-facing file in output_dir
    # config flag -> the file a run with that flag on writes instead of ``artifact`` (e.g. a full fine-tune's weights)
    mode_artifacts: ClassVar[dict[str, str]] = {}
    other_artifacts: ClassVar[tuple[str, ...]] = ()     # other files the task writes atomically there (cleaned too)
    config_cls: ClassVar[type[CommonConfig]] = CommonConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    description: ClassVar[str] = ""

    def __init__(self, cfg: CommonConfig, accelerator) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = accelerator.device

    def export_companions(self) -> tuple[str, ...]:
        """Files each ``export`` of this run writes beside the output file as part of it (e.g. a trained encoder):
        ``keep_exports`` keeps their step copies with the output file's, so each step export stays whole."""
        return ()

    def output_file(self) -> str:
        """The file this run writes: the first ``mode_artifacts`` entry whose config flag is on, else ``artifact``."""
        return next((name for flag, name in self.mode_artifacts.items() if getattr(self.cfg, flag)), self.artifact)

    @classmethod
    def every_artifact(cls) -> tuple[str, ...]:
        """Every file the task may write atomically in its output folder (stale temporaries of each are cleaned)."""
        return (cls.artifact, *cls.mode_artifacts.values(), *cls.other_artifacts)

    # -- what each method implements ---------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        """Load the frozen parts, create the trainable ones; return the module Accelerate prepares (its parameters
        with requires_grad are the ones optimised)."""
        raise NotImplementedError

    def dataset(self) -> Dataset:
        """The training data, from the config alone: :func:`run` reads it before :meth:`build`."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The training loss of one micro-batch; ``model`` is what :meth:`build` returned, as prepared (e.g. DDP).
        Draw every random number from ``generator`` (seeded per step and rank) so resumed runs are exact."""
        raise NotImplementedError

    def export(self, model: nn.Module, path: Path, step: int) -> None:
        """Write the user-facing artifact (atomically) from the unwrapped model."""
        raise NotImplementedError

    def write_samples(self, model: nn.Module, batch: dict, step: int, folder: Path) -> None:
        """Optional: draw sample images for ``batch`` (the first readable items) into ``folder``."""

    def summary(self, model: nn.Module) -> str:
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"{self.name}: {count / 1e6:.2f}M trainable parameters"

    def compile_targets(self, model: nn.Module) -> list[nn.Module]:
        """The modules ``torch_compile`` compiles: those whose forward and backward make up most of a step (default:
        the built module). A task whose heavy model is frozen outside it (LoRA of Change's UNet) names that."""
        return [model]

    def after_step(self, model: nn.Module) -> None:
        """Optional: called with the unwrapped model after every optimiser step (e.g. to update an EMA)."""

    def optimizer_groups(self, model: nn.Module) -> list[dict] | None:
        """Optional: AdamW parameter groups with their own options (e.g. ``lr``) covering every trainable parameter;
        None (the default): one group at the config's learning rate."""
        return None

    # -- checkpoint state (defaults: every parameter with requires_grad) ---------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if set(params) != set(tensors):
            missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise ckpt.CheckpointError(f"trainable parameters do not match (missing {missing[:3]}, extra "
                                       f"{extra[:3]}): was the checkpoint written with another config?")
        with torch.no_grad():
            for name, param in params.items():
                if param.shape != tensors[name].shape:
                    raise ckpt.CheckpointError(f"{name}: checkpoint shape {tuple(tensors[name].shape)}, model "
                                               f"{tuple(param.shape)}")
                param.copy_(tensors[name])


def train_every_weight(module: nn.Module, dtype: torch.dtype = torch.float32,
                       only: Collection[str] | None = None) -> None:
    """Unfreeze every weight of ``module`` (a full fine-tune: the world's full ceiling), kept in ``dtype``; with
    ``only`` (parameter names, e.g. ``"...attn1.to_q.weight"``) just those, every other weight frozen."""
    if only is None:
        module.requires_grad_(True)
    else:
        named = dict(module.named_parameters())
        missing = sorted(set(only) - set(named))
        if missing or not only:
            raise ValueError(f"cannot fine-tune only {len(only)} weights: {missing[:3] or 'none named'} "
                             f"{'not in the module' if missing else ''}".rstrip())
        module.requires_grad_(False)
        for name in only:
            named[name].requires_grad_(True)
    for param in module.parameters():
        param.data = param.data.to(dtype)


def export_weights(module: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Every tensor of ``module``'s state dict (float32, its own names) as safetensors, written atomically."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    write_safetensors_atomic(state, path, metadata)


def save_sample_image(pixels: torch.Tensor, folder: Path, step: int) -> Path:
    """``folder/step_NNNNNN.png`` from pixels [H, W, 3] in 0..1 (clamped): how every trainer writes its samples."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.png"
    Image.fromarray((pixels.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype("uint8")).save(path)
    return path


def sample_pairs_image(target: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """One row per sample: the true image [B, H, W, 3] next to the generated one."""
    return torch.cat([torch.cat([t, g], dim=1) for t, g in zip(target, generated)], dim=0)


# ---------------------------------------------------------------------------------------------------------------------
# command line and set-up


def parse_args(task_cls: type[TrainingTask], argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=task_cls.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(task_cls.presets), help="start from a preset")
    parser.add_argument("--config", help="YAML file of config keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    parser.add_argument("--output-dir", help="shortcut for --set output_dir=...")
    parser.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=...")
    parser.add_argument("--backbone", help="shortcut for --set backbone=... (trainers with a backbone; e.g. LoRWeB's "
                                           "flux2:<folder>, qwen_image_edit:<folder>, flux2:tiny)")
    parser.add_argument("--resume", nargs="?", const="latest",
                        help="resume from the newest intact checkpoint ('latest') or a given checkpoint folder "
                             "(a path, or step_NNNNNN of this run's checkpoints/)")
    return parser.parse_args(argv)


def config_from_args(task_cls: type[TrainingTask], args: argparse.Namespace) -> CommonConfig:
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.backbone:
        overrides.append(f"backbone={args.backbone}")
    return build_config(task_cls.config_cls, task_cls.presets, args.preset, args.config, overrides)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run the body without moving the global random states (the generators a checkpoint saves): what comes after
    draws exactly what it would have drawn without it."""
    states = ckpt.global_rng_states()
    try:
        yield
    finally:
        ckpt.set_global_rng_states(states)


def make_accelerator(cfg: CommonConfig, out: Path):
    report_to = cfg.report_to if cfg.report_to not in ("", "none") else None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       log_with=report_to,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


def make_optimizer(cfg: CommonConfig, params: list[nn.Parameter] | list[dict],
                   device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb  # optional dependency: 8-bit AdamW on CUDA only

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            log.warning("bitsandbytes is not installed: using torch AdamW")
    return torch.optim.AdamW(params, **kwargs)


def step_generator(cfg: CommonConfig, micro_step: int, rank: int) -> torch.Generator:
    """The random stream of one micro-batch: a pure function of (seed, micro-step, rank)."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro_step * 101 + rank)


def optimizer_step(accelerator, loss: torch.Tensor, params: list[nn.Parameter], optimizer,
                   max_grad_norm: float) -> float | None:
    """Backward, global grad-norm clipping (when gradients are synchronised), optimiser step. Returns the norm
    before clipping (None on accumulation micro-steps)."""
    accelerator.backward(loss)
    norm = None
    if accelerator.sync_gradients:
        if max_grad_norm > 0:
            norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.detach().float().norm() for p in params if p.grad is not None])))
    optimizer.step()
    optimizer.zero_grad()
    return norm


# ---------------------------------------------------------------------------------------------------------------------
# compiling (torch_compile)


def compile_for_training(task: TrainingTask, model: nn.Module, accelerator=None) -> int:
    """``torch.compile`` each of the task's compile targets in place (``Module.compile``: parameter names, state dicts
    and so checkpoints and exports are those of the eager module). Accelerate's own ``dynamo_backend`` would compile
    the module it prepares, which is not always the one doing the work (LoRA of Change trains H, the UNet runs), so
    a run asking for both is refused, as is FSDP (whose wrapped modules an in-place compile does not support). Under
    DDP the compiled step works; its gradients come out of one compiled backward, so their all-reduce overlaps it
    less than in an eager step."""
    if accelerator is not None:
        check_compilable(accelerator)
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # at most this run's threads in compile workers (a run given one core of a shared machine compiles in-process)
        threads = torch.get_num_threads()
        inductor_config.compile_threads = max(1, min(inductor_config.compile_threads or threads, threads))
    targets = task.compile_targets(model)
    for module in targets:
        module.compile()
    log.info("torch.compile: %s (the first steps compile; samples run eager)",
             ", ".join(type(m).__name__ for m in targets))
    return len(targets)


def check_compilable(accelerator) -> None:
    """Refuse ``torch_compile`` where Accelerate compiles too, or shards with FSDP."""
    from accelerate.utils import DistributedType, DynamoBackend

    plugin = getattr(accelerator.state, "dynamo_plugin", None)
    if plugin is not None and plugin.backend != DynamoBackend.NO:
        name = str(plugin.backend.value).lower()
        raise ValueError(f"torch_compile and Accelerate's dynamo_backend ({name}) both compile: set dynamo_backend to "
                         "'no' in `accelerate config`, or torch_compile=false")
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("torch_compile compiles modules in place, which FSDP's wrapped modules do not support: run "
                         "FSDP with torch_compile=false")


def eager_if_compiled(cfg: CommonConfig):
    """Run compiled modules eagerly inside: the bookkeeping after each step (after-step updates, exports, samples,
    whose other shapes and no gradients would each compile anew)."""
    return torch.compiler.set_stance("force_eager") if cfg.torch_compile else contextlib.nullcontext()


def log_compiled(targets: int) -> None:
    """How dynamo fared over a run that compiled ``targets`` modules (none: nothing to say): more graphs than compiled
    modules means graph breaks (parts run eager between graphs) or recompiles (beyond torch's recompile limit a frame
    runs eager: slower, never wrong)."""
    if not targets:
        return
    # dynamo's own counts (no public equivalent)
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    log.info("torch.compile: %d graphs for %d compiled modules, %d graph breaks", graphs, targets, breaks)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(task: TrainingTask, model, optimizer, step: int) -> Path:
    """Write checkpoints/step_N atomically (all ranks' RNG, main rank's weights and optimiser), then the artifact."""
    accelerator, cfg = task.accelerator, task.cfg
    out = Path(cfg.output_dir)
    folder = out / "checkpoints"
    tmp = folder / f"{ckpt.TMP_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    ckpt.save_rng(tmp / ckpt.rng_file(accelerator.process_index))
    unwrapped = accelerator.unwrap_model(model)
    # Every rank's parameter checksum: data-parallel ranks must hold identical weights (DDP keeps them in sync).
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if max(checksums) - min(checksums) > 1e-9 * max(1.0, abs(checksums[0])):
            raise RuntimeError(f"data-parallel ranks diverged at step {step}: parameter checksums {checksums}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in task.trainable_state(unwrapped).items()}

        save_file(tensors, str(tmp / ckpt.TRAINABLE_FILE), metadata={"step": str(step), "task": task.name})
        ckpt.save_optimizer(optimizer.state_dict(), tmp / ckpt.OPTIMIZER_FILE)
        rng_files = tuple(ckpt.rng_file(r) for r in range(accelerator.num_processes))
        state = {"step": step, "task": task.name, "num_processes": accelerator.num_processes,
                 "param_checksums": checksums}
        ckpt.finalize(tmp, folder / ckpt.checkpoint_name(step), state, optional=rng_files)
        task.export(unwrapped, out / task.output_file(), step)
        if cfg.keep_exports:
            for name in (task.output_file(), *task.export_companions()):
                ckpt.keep_export(out, name, step)
        ckpt.prune(folder, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return folder / ckpt.checkpoint_name(step)


def load_checkpoint(task: TrainingTask, model, optimizer, checkpoint: ckpt.Checkpoint) -> None:
    state, degraded = ckpt.verify(checkpoint)
    if state.get("task", task.name) != task.name:
        raise ckpt.CheckpointError(f"written by the {state['task']} trainer, not {task.name}")
    tensors, _ = ckpt.read_safetensors(checkpoint.path / ckpt.TRAINABLE_FILE)
    task.load_trainable_state(task.accelerator.unwrap_model(model), tensors)
    try:
        optimizer.load_state_dict(ckpt.load_optimizer(checkpoint.path / ckpt.OPTIMIZER_FILE))
    except (ValueError, KeyError, RuntimeError) as err:
        raise ckpt.CheckpointError(f"optimiser state does not fit this run: {err}") from None
    rank_file = ckpt.rng_file(task.accelerator.process_index)
    if rank_file in degraded or not (checkpoint.path / rank_file).is_file():
        log.warning("%s: %s is missing or damaged: global RNG states are not restored. Batches, noise and caption "
                    "dropout come from (seed, step) and stay exact; any other global randomness (e.g. dropout "
                    "layers) will differ from an uninterrupted run.", checkpoint.path.name, rank_file)
    else:
        ckpt.load_rng(checkpoint.path / rank_file)


def explicit_checkpoint(target: Path, output_dir: Path) -> Path:
    """``--resume PATH``: the path as given when it exists, else the same name inside this run (``step_000500`` or
    ``checkpoints/step_000500`` relative to its output folder), so the README's form works from any directory."""
    for path in (target, output_dir / target, output_dir / "checkpoints" / target):
        if path.is_dir():
            return path
    return target


def resume(task: TrainingTask, model, optimizer, target: str) -> int:
    """Load the requested checkpoint, or with 'latest' the newest one that verifies and loads. Returns its step."""
    folder = Path(task.cfg.output_dir) / "checkpoints"
    if target != "latest":
        path = explicit_checkpoint(Path(target), Path(task.cfg.output_dir))
        match = ckpt.STEP_PATTERN.fullmatch(path.name)
        if not match or not path.is_dir():
            raise ckpt.CheckpointError(
                f"{target} is not a checkpoint folder: expected <output_dir>/checkpoints/step_NNNNNN (six or more "
                f"digits), as a path or as step_NNNNNN / checkpoints/step_NNNNNN of this run ({folder})")
        checkpoint = ckpt.Checkpoint(path, int(match.group(1)))
        load_checkpoint(task, model, optimizer, checkpoint)
        log.info("resumed from %s at step %d", checkpoint.path, checkpoint.step)
        return checkpoint.step
    candidates = ckpt.list_checkpoints(folder)
    for checkpoint in candidates:
        try:
            load_checkpoint(task, model, optimizer, checkpoint)
        except (ckpt.CheckpointError, ValueError, OSError) as err:
            log.warning("checkpoint %s is unusable (%s); trying an older one", checkpoint.path.name, err)
            continue
        log.info("resumed from %s at step %d", checkpoint.path, checkpoint.step)
        return checkpoint.step
    if candidates:
        raise ckpt.CheckpointError(f"none of the {len(candidates)} checkpoints in {folder} is intact; see the "
                                   "warnings above (remove them, or start without --resume)")
    log.info("no checkpoint in %s: starting from scratch", folder)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# the loop


def run(task_cls: type[TrainingTask], argv=None) -> dict:
    """Parse the command line and train; returns a history dict (losses, skipped items, steps)."""
    args = parse_args(task_cls, argv)
    cfg = config_from_args(task_cls, args)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for path in ckpt.remove_stale_temporaries(out, task_cls.every_artifact()):
            log.info("removed %s left by an interrupted write", path)
    accelerator.wait_for_everyone()

    task = task_cls(cfg, accelerator)
    with preserved_random_state():  # the data is read first (a wrong spec or unreadable data fails before any model
        data = ReadableItems(task.dataset())  # loads); the model is initialised from the seed as if it had not been
        data.probe(minimum=1)
    model = task.build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"{task.name}: build() returned a module without trainable parameters")
    optimizer = make_optimizer(cfg, task.optimizer_groups(model) or trainable, accelerator.device)
    base_rates = [group["lr"] for group in optimizer.param_groups]  # before a resume loads scheduled ones
    rate_at = lr_schedule.multiplier(cfg.lr_schedule, cfg.lr_warmup_steps, cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    step = resume(task, model, optimizer, args.resume) if args.resume else 0
    compiled = compile_for_training(task, accelerator.unwrap_model(model), accelerator) if cfg.torch_compile else 0

    sampler = StepBatchSampler(len(data), cfg.batch_size, cfg.seed, accelerator.process_index,
                               accelerator.num_processes, start=step * cfg.gradient_accumulation_steps)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    sample_batch = collate(data.first_items(4))

    if accelerator.is_main_process:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if accelerator.log_with:
        accelerator.init_trackers(task.name, config={k: str(v) for k, v in cfg.to_dict().items()})
    log.info("%s, optimiser %s", task.summary(accelerator.unwrap_model(model)), type(optimizer.optimizer).__name__)

    history: dict = {"losses": [], "grad_norms": [], "lrs": [], "skipped": 0, "skip_events": 0, "bad_lines": data.bad_lines,
                     "start_step": step}
    skipped_at: set[int] = set()
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc=task.name)
    batches = iter(loader)
    model.train()
    while step < cfg.max_steps:
        losses, norm = [], None
        lr_schedule.set_rates(optimizer, base_rates, rate_at(step))
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            history["skip_events"] += batch["skipped"]
            skipped_at.update(batch["skipped_at"])
            history["skipped"] = len(skipped_at)
            generator = step_generator(cfg, step * cfg.gradient_accumulation_steps + micro, accelerator.process_index)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = task.loss(model, batch, generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; the last checkpoint "
                                             "is intact (lower the learning rate and --resume)")
                norm = optimizer_step(accelerator, loss, trainable, optimizer, cfg.max_grad_norm)
            losses.append(loss.detach())
        step += 1
        with eager_if_compiled(cfg):  # only the training step runs compiled
            task.after_step(accelerator.unwrap_model(model))
            mean_loss = accelerator.gather(torch.stack(losses).mean().reshape(1)).mean().item()
            history["losses"].append(mean_loss)
            history["grad_norms"].append(norm)
            history["lrs"].append(optimizer.param_groups[0]["lr"])
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                accelerator.log({"loss": mean_loss, "grad_norm": norm or 0.0, "skipped_items": history["skipped"],
                                 "lr": optimizer.param_groups[0]["lr"]}, step=step)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(task, model, optimizer, step)
            if accelerator.is_main_process and (step % cfg.sample_every == 0 or step == cfg.max_steps):
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.eval()
                task.write_samples(unwrapped, sample_batch, step, out / "samples")
                unwrapped.train()
    progress.close()
    log_compiled(compiled)
    if history["skipped"] or data.bad_lines:
        log.warning("skipped %d unreadable items and %d bad index lines (see the warnings above for files and "
                    "reasons)", history["skipped"], data.bad_lines)
    accelerator.end_training()
    if accelerator.is_main_process:
        losses = history["losses"]
        log.info("wrote %s (steps %d..%d, loss %.4f -> %.4f)", out / task.output_file(), history["start_step"], step,
                 losses[0] if losses else math.nan, losses[-1] if losses else math.nan)
    return history


def drop_captions(prompts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by "" with ``probability`` (one draw per sample, from the step's generator)."""
    draws = torch.rand(len(prompts), generator=generator)
    return [p if float(u) >= probability else "" for p, u in zip(prompts, draws)]
