"""The region predictor on the analogy world: its encoders and the IoU evaluation the bench reports.

* CLIP: the world's CLIP (vision + text, trained contrastively on world images and their procedural captions).
* Instruction encoder: a tiny T5 encoder over the world's vocabulary, random and frozen (built from a fixed seed and
  cached as a transformers folder, the format Load Instruction Encoder reads). It knows no language: which words
  matter is learnt by the region module, as with any frozen encoder.
* Evaluation: held-out scenes of the local families; the region is predicted on B (text: the family's instruction;
  analogy: the example's own A → A′ as the exemplar) and compared with the true edit mask of B.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from analogy_core.regions import FrozenClip, InstructionEncoder, iou
from training.region_models import save_instruction_encoder, tiny_t5

CACHE = Path(os.environ.get("ANALOGY_WORLD_CACHE", "outputs/world"))
T5_FOLDER = "region_t5"
WORLD_T5 = dict(d_model=48, d_kv=16, d_ff=96, num_layers=2, num_heads=3, relative_attention_num_buckets=16,
                relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
T5_SEED = 1234


def world_vocabulary() -> list[str]:
    """The words of the world's captions and instructions (the world CLIP's vocabulary)."""
    from analogy_core import world

    return world.caption_words()


def world_clip() -> FrozenClip:
    raise NotImplementedError("the analogy world's CLIP is not available yet")


def world_instruction_encoder(cache: Path | None = None) -> InstructionEncoder:
    folder = (cache or CACHE) / T5_FOLDER
    if not (folder / "config.json").is_file():
        save_instruction_encoder(tiny_t5(T5_SEED, world_vocabulary(), WORLD_T5), folder)
    return InstructionEncoder.from_folder(folder)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def evaluation_examples(family: str, count: int, size: int, split: str = "heldout") -> list:
    from analogy_core import world

    return [world.example(family, split, k, size) for k in range(count)]


@torch.no_grad()
def world_iou(model, clip: FrozenClip, encoder: InstructionEncoder | None, families: list[str], count: int,
              size: int, threshold: float = 0.5, split: str = "heldout") -> dict[str, dict[str, float]]:
    """Mean IoU of the binary region on B with B's true edit mask, per family and mode ("text", "analogy")."""
    from training.train_region import predict_analogy, predict_text

    spec = model.spec
    out: dict[str, dict[str, float]] = {}
    for family in families:
        examples = evaluation_examples(family, count, size, split)
        b = torch.stack([ex.b for ex in examples])
        truth = torch.stack([ex.mask for ex in examples])
        scores = {}
        if spec.text_dim and encoder is not None:
            soft = predict_text(model, clip, encoder, b, [ex.instruction for ex in examples])
            scores["text"] = float(iou(soft >= threshold, truth).mean())
        if spec.analogy_dim:
            a, a_prime = torch.stack([ex.a for ex in examples]), torch.stack([ex.a_prime for ex in examples])
            soft = predict_analogy(model, clip, a, a_prime, b)
            scores["analogy"] = float(iou(soft >= threshold, truth).mean())
        out[family] = scores
    return out
