"""Train a LoRWeB LoRA basis on FLUX.1-Kontext with Accelerate.

    python -m training.train_lorweb --preset tiny                    # CPU smoke run, about a minute
    python -m training.train_lorweb --config my.yaml --set max_steps=2000
    accelerate launch -m training.train_lorweb --config my.yaml      # several GPUs / machines
    python -m training.train_lorweb --config my.yaml --resume        # continue from the last checkpoint

Per step: target grid [a a'; b b'] and reference grid [a a'; b b] are VAE-encoded; the target is noised with one
timestep per sample (flow matching, x_t = (1-t)·x0 + t·noise); the reference tokens are appended as clean Kontext
context (position index 1); the transformer, whose targeted linears carry the LoRWeB basis mixed by the CLIP query of
(a, a', b), predicts noise - x0 on the target tokens (MSE over all four quadrants). Only the basis, keys and query
projections train. Outputs in ``output_dir``: ``lorweb_basis.safetensors`` (the file Load LoRA Basis reads),
``checkpoints/step_N`` (full state for --resume), ``samples/step_N.png``, ``logs/`` (TensorBoard).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from analogy_core import __version__
from analogy_core.lorweb_layer import export_basis, inject_lorweb, lorweb_layers, set_query
from analogy_core.encoders import ImageEncoder
from training.backbone import Backbone, load_backbone, load_query_encoder, token_ids
from training.config import TrainConfig, load_config
from training.data import StepBatchSampler, collate, make_dataset

log = logging.getLogger("train_lorweb")
BASIS_FILE = "lorweb_basis.safetensors"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["official", "tiny"], help="start from a preset (default: official)")
    parser.add_argument("--config", help="YAML file of config keys (see training/config.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    parser.add_argument("--output-dir", help="shortcut for --set output_dir=...")
    parser.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=...")
    parser.add_argument("--resume", nargs="?", const="latest", help="resume from 'latest' or a checkpoint folder")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# maths of one step


def sample_timesteps(kind: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Flow-matching times in (0, 1). "weighted": logit-normal (more weight mid-trajectory); "uniform"."""
    if kind == "weighted":
        return torch.sigmoid(torch.randn(batch, generator=generator))
    if kind == "uniform":
        return torch.rand(batch, generator=generator).clamp(1e-3, 1 - 1e-3)
    raise ValueError(f"timestep_sampling must be weighted or uniform, got {kind!r}")


def grids(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Target [a a'; b b'] and Kontext reference [a a'; b b] as IMAGE tensors [B, 2S, 2S, 3]."""
    top = torch.cat([batch["a"], batch["a_prime"]], dim=2)
    target = torch.cat([top, torch.cat([batch["b"], batch["b_prime"]], dim=2)], dim=1)
    reference = torch.cat([top, torch.cat([batch["b"], batch["b"]], dim=2)], dim=1)
    return target, reference


def predict(transformer, backbone_ids, x_t, reference, t, text, pooled, guidance):
    """Transformer velocity for the target tokens, with the reference tokens appended as clean context."""
    img_ids, txt_ids = backbone_ids
    tokens = x_t.shape[1]
    out = transformer(hidden_states=torch.cat([x_t, reference], dim=1), encoder_hidden_states=text,
                      pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                      guidance=guidance, return_dict=False)[0]
    return out[:, :tokens]


def position_ids(backbone: Backbone, grid_size: int, text_tokens: int, device):
    latent = grid_size // backbone.vae_factor
    img_ids = torch.cat([token_ids(latent, latent, 0), token_ids(latent, latent, 1)]).to(device)
    return img_ids, torch.zeros(text_tokens, 3, device=device)


def training_loss(transformer, backbone: Backbone, query_encoder: ImageEncoder, batch: dict, cfg: TrainConfig,
                  generator: torch.Generator, device) -> torch.Tensor:
    target, reference = grids(batch)
    x0 = backbone.encode_images(target).to(device)
    ref_tokens = backbone.encode_images(reference).to(device)
    prompts = [p if torch.rand(1, generator=generator).item() >= cfg.caption_dropout else "" for p in batch["prompt"]]
    text, pooled = backbone.encode_prompts(prompts, device)
    query = query_encoder.encode(batch["a"], batch["a_prime"], batch["b"]).query().to(device)
    b = x0.shape[0]
    t = sample_timesteps(cfg.timestep_sampling, b, generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    x_t = (1 - t.view(b, 1, 1)) * x0 + t.view(b, 1, 1) * noise
    guidance = torch.full((b,), cfg.guidance, device=device)
    set_query(transformer, query)
    ids = position_ids(backbone, cfg.grid_resolution, text.shape[1], device)
    pred = predict(transformer, ids, x_t, ref_tokens, t, text, pooled, guidance)
    return F.mse_loss(pred.float(), (noise - x0).float())


@torch.no_grad()
def sample_grid(transformer, backbone: Backbone, query_encoder: ImageEncoder, batch: dict, cfg: TrainConfig,
                device) -> torch.Tensor:
    """Euler flow sampling of the target grid from noise; returns [B, 2S, 2S, 3] (bottom-right = predicted b')."""
    _, reference = grids(batch)
    ref_tokens = backbone.encode_images(reference).to(device)
    text, pooled = backbone.encode_prompts(batch["prompt"], device)
    set_query(transformer, query_encoder.encode(batch["a"], batch["a_prime"], batch["b"]).query().to(device))
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(ref_tokens.shape, generator=gen).to(device, ref_tokens.dtype)
    times = torch.linspace(1.0, 0.0, cfg.sample_steps + 1)
    ids = position_ids(backbone, cfg.grid_resolution, text.shape[1], device)
    guidance = torch.full((x.shape[0],), cfg.guidance, device=device)
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = torch.full((x.shape[0],), float(t_now), device=device)
        x = x + (t_next - t_now) * predict(transformer, ids, x, ref_tokens, t, text, pooled, guidance)
    size = cfg.grid_resolution
    return backbone.decode_tokens(x, size, size)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def basis_metadata(cfg: TrainConfig, step: int, query_encoder: ImageEncoder) -> dict[str, str]:
    encoder = query_encoder.info
    return {"analogy.backbone": cfg.backbone, "analogy.targets": json.dumps(cfg.targets),
            "analogy.encoder": encoder.name, "analogy.query": "cat(a, a_prime, b)", "analogy.step": str(step),
            "analogy.pack_version": __version__, "analogy.config": json.dumps(cfg.to_dict())}


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = sorted(output_dir.glob("checkpoints/step_*"), key=lambda p: int(p.name.split("_")[1]))
    return steps[-1] if steps else None


def save_checkpoint(accelerator, model, cfg: TrainConfig, step: int, query_encoder: ImageEncoder) -> Path:
    """Full state into checkpoints/step_N (written to a temporary folder, then renamed), plus the basis file."""
    out = Path(cfg.output_dir)
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = out / "checkpoints" / f".tmp_step_{step:06d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Every rank's parameter checksum: data-parallel ranks must hold identical bases (DDP keeps them in sync).
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        if max(checksums) - min(checksums) > 1e-9 * max(1.0, abs(checksums[0])):
            raise RuntimeError(f"data-parallel ranks diverged at step {step}: parameter checksums {checksums}")
        state = {"step": step, "num_processes": accelerator.num_processes, "param_checksums": checksums}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        basis = export_basis(accelerator.unwrap_model(model), metadata=basis_metadata(cfg, step, query_encoder))
        basis.save(out / BASIS_FILE)  # atomic (temp file + rename)
        for old in sorted(out.glob("checkpoints/step_*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def register_state_hooks(accelerator, model):
    """Save/load only the basis parameters in accelerate's state (not the frozen multi-GB backbone)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            export_basis(accelerator.unwrap_model(model)).save(Path(output_dir) / "basis.safetensors")
        weights.clear()

    def load_hook(models, input_dir):
        from analogy_core.basis import load_basis

        basis = load_basis(Path(input_dir) / "basis.safetensors")
        for name, layer in lorweb_layers(accelerator.unwrap_model(model)).items():
            layer.load_basis_layer(basis.layers[name])
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def make_optimizer(cfg: TrainConfig, params, device):
    if cfg.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                       weight_decay=cfg.weight_decay)
        except ImportError:
            log.warning("bitsandbytes is not installed: using torch AdamW")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg = load_config(args.preset, args.config, overrides)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    report_to = cfg.report_to if cfg.report_to not in ("", "none") else None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_with=report_to,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    set_seed(cfg.seed)
    device = accelerator.device

    backbone = load_backbone(cfg.backbone, torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32,
                             cfg.seed)
    query_encoder = load_query_encoder(cfg.query_encoder, cfg.seed).to(device)
    for module in (backbone.vae, backbone.clip_text, backbone.t5):
        module.to(device)
    transformer = backbone.transformer
    inject_lorweb(transformer, cfg.targets, num_entries=cfg.num_entries, rank=cfg.rank, key_dim=cfg.key_dim,
                  query_dim=3 * query_encoder.embed_dim)
    transformer.to(device)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable, device)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    register_state_hooks(accelerator, transformer)

    step = 0
    if args.resume:
        checkpoint = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
        if checkpoint is None:
            log.info("no checkpoint in %s: starting from scratch", out)
        else:
            accelerator.load_state(str(checkpoint))
            step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
            log.info("resumed from %s at step %d", checkpoint, step)

    dataset = make_dataset(cfg.data, cfg.panel_resolution)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, accelerator.process_index,
                               accelerator.num_processes, start=step * cfg.gradient_accumulation_steps)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    sample_batch = collate([dataset[i] for i in range(min(4, len(dataset)))])

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if report_to:
        accelerator.init_trackers("lorweb", config={k: str(v) for k, v in cfg.to_dict().items()})
    log.info("LoRWeB basis on %d layers, N=%d r=%d d=%d, %.2fM trainable parameters, %s",
             len(lorweb_layers(accelerator.unwrap_model(transformer))), cfg.num_entries, cfg.rank, cfg.key_dim,
             sum(p.numel() for p in trainable) / 1e6, type(optimizer.optimizer).__name__)

    history: dict = {"losses": [], "skipped": 0, "start_step": step}
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc="lorweb")
    batches = iter(loader)
    transformer.train()
    while step < cfg.max_steps:
        losses = []
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            history["skipped"] += batch["skipped"]
            if "a" not in batch:
                continue
            k = step * cfg.gradient_accumulation_steps + micro
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k * 101 + accelerator.process_index)
            with accelerator.accumulate(transformer):
                with accelerator.autocast():
                    loss = training_loss(transformer, backbone, query_encoder, batch, cfg, generator, device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
        step += 1
        mean_loss = accelerator.gather(torch.stack(losses).mean().reshape(1)).mean().item() if losses else float("nan")
        history["losses"].append(mean_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            accelerator.log({"loss": mean_loss, "skipped_items": history["skipped"]}, step=step)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint(accelerator, transformer, cfg, step, query_encoder)
        if accelerator.is_main_process and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            write_samples(accelerator.unwrap_model(transformer), backbone, query_encoder, sample_batch, cfg, step,
                          device)
    progress.close()
    if history["skipped"]:
        log.warning("skipped %d unreadable items", history["skipped"])
    accelerator.end_training()
    if accelerator.is_main_process:
        log.info("wrote %s (steps %d..%d, loss %.4f -> %.4f)", out / BASIS_FILE, history["start_step"], step,
                 history["losses"][0] if history["losses"] else math.nan,
                 history["losses"][-1] if history["losses"] else math.nan)
    return history


def write_samples(model, backbone, query_encoder, batch, cfg, step, device):
    from PIL import Image

    model.eval()
    generated = sample_grid(model, backbone, query_encoder, batch, cfg, device).cpu()
    model.train()
    target, _ = grids(batch)
    # one row per sample: the true grid [a a'; b b'] next to the generated one (bottom-right = predicted b')
    rows = torch.cat([torch.cat([t, g], dim=1) for t, g in zip(target, generated)], dim=0)
    path = Path(cfg.output_dir) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rows.numpy() * 255).round().astype("uint8")).save(path)


if __name__ == "__main__":
    main()
    sys.exit(0)
