"""How far the encoder fingerprint moves (``analogy_core.fingerprint``): the threshold the nodes refuse at, 0.1, sits
between what storing the same weights in fewer bits does and what training or another initialisation does.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.encoder_fingerprint --world outputs/world/<world> \\
        [--run <a LoC run that trained its image encoder>/loc/train] --json F

Rows: the world's CLIP stored in float16, bfloat16 and float8 (e4m3, as ComfyUI's ``--fp8_e4m3fn-text-enc`` stores
it) and read back as float32; the same architecture initialised from another seed; and, with ``--run``, every
image encoder E that run kept (``loc_image_encoder.step_N.safetensors``, trained with its hypernetwork). Each row
gives the fingerprint distance to the world's CLIP and, per part, the relative change; ``full_tokens`` is the
relative change of the probe's whole token matrix (what the three projected parts summarise). A trained E's row adds
``update_change``: how much the H exported with it changes its LoRA when fed the stock CLIP's tokens instead of
E's (two held-out pairs of each training family), i.e. what a user who encodes with the wrong one would get.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from analogy_core.encoders import ImageEncoder
from analogy_core.fingerprint import SAME_ENCODER_DISTANCE, probe_image
from analogy_core.loc import generated_updates
from bench.row_curve import write_report
from training import checkpoints as ckpt
from training.backbone import load_query_encoder
from training.loc.config import HYPERNETWORK_FILE
from training.world import evaluate as ev
from training.world import scenes as world
from training.world.registry import open_world
from training.world.yardstick.loc import PANEL, load_run_model, tokens


def stored_as(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy whose weight matrices went through ``dtype`` storage (norms and biases stay float32, as ComfyUI's
    fp8 text-encoder storage keeps them)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(dtype).float())
    return out


def probe_tokens(encoder: ImageEncoder) -> torch.Tensor:
    """The probe picture's whole token matrix [T, W] (what the fingerprint's parts summarise)."""
    return encoder.encode_images({"a": probe_image()}).patch_tokens["a"][0].double()


class Reference:
    """The encoder every row is measured against: its fingerprint and probe tokens, taken once."""

    def __init__(self, encoder: ImageEncoder):
        self.fingerprint, self.tokens = encoder.fingerprint(), probe_tokens(encoder)

    def row(self, encoder: ImageEncoder) -> dict[str, float]:
        parts = encoder.fingerprint().part_distances(self.fingerprint)
        tokens = probe_tokens(encoder)
        return {"distance": round(max(parts.values()), 5), **{k: round(v, 5) for k, v in parts.items()},
                "full_tokens": round(float((tokens - self.tokens).norm() / self.tokens.norm()), 5)}


def measure(world: Path, run: Path | None = None) -> dict:
    rows = measure_encoder(load_query_encoder(open_world(world).spec), run)
    return {"world": str(world), "run": None if run is None else str(run), "threshold": SAME_ENCODER_DISTANCE,
            "rows": rows}


def measure_encoder(stock: ImageEncoder, run: Path | None = None) -> dict[str, dict[str, float]]:
    """The rows of the report for a transformers CLIP ``stock`` (and the image encoders ``run`` kept)."""
    reference = Reference(stock)
    rows = {f"stored as {name}": reference.row(ImageEncoder(stored_as(stock.model, dtype), "transformers"))
            for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                ("float8_e4m3fn", torch.float8_e4m3fn))}
    other = copy.deepcopy(stock.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # same architecture, weights drawn afresh at each tensor's own scale
        for p in other.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * p.std().clamp_min(1e-3) + p.mean())
    rows["another initialisation"] = reference.row(ImageEncoder(other, "transformers"))
    if run is not None:
        pairs = [item for family in world.families("train") for item in ev.examples(family, 2, PANEL)]
        for step, path in ckpt.step_exports(run, HYPERNETWORK_FILE):
            hypernetwork, trained = load_run_model(path, None, stock, trained_encoder=True)
            rows[f"trained E, step {step}"] = {**reference.row(trained),
                                               "update_change": update_change(hypernetwork, trained, stock, pairs)}
    return rows


@torch.no_grad()
def update_change(hypernetwork, trained: ImageEncoder, stock: ImageEncoder, pairs: list) -> float:
    """What the check guards against: H's generated ΔW from the stock encoder's tokens against from its own E's,
    ‖ΔW_stock − ΔW_E‖ / ‖ΔW_E‖ over ``pairs`` (0: the stock encoder would serve as well)."""
    own = generated_updates(hypernetwork(*tokens(trained, pairs))).double()
    other = generated_updates(hypernetwork(*tokens(stock, pairs))).double()
    return round(float((other - own).norm() / own.norm()), 5)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, required=True, help="a built world folder (its CLIP is the reference)")
    parser.add_argument("--run", type=Path, help="a LoC run that trained its image encoder with keep_exports")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    report = measure(args.world, args.run)
    report["seconds"] = round(time.monotonic() - started, 1)
    for name, values in report["rows"].items():
        print(f"{name:28s} distance {values['distance']:.4f}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "distance"))
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
