"""Predict Edit Region's cost relative to one CLIP vision pass, in the paper's setting (same process, interleaved).

    .venv/bin/python -m bench.region_predict              # CLIP ViT-L/14 at 224 px, FLAN-T5-Base, d = 768
    .venv/bin/python -m bench.region_predict --quick      # small random models (seconds)

Random weights with the real architectures' shapes (nothing is downloaded; timing does not depend on the values).
Timed, each as the median of interleaved repeats:

* baseline: one CLIP vision pass over the image (what any CLIP-based node pays);
* region module: cross-attention, self-attention and MLP on the patch features (eqs. 1-3), P_region upsampled to the
  image, threshold, grow and feather — everything the region adds once the encoders have run;
* the whole prediction as Predict Edit Region runs it in text mode: CLIP patch features + T5 instruction tokens +
  region module + masks.
"""

from __future__ import annotations

import argparse
import platform

import torch
from transformers import CLIPConfig, CLIPModel, T5Config, T5EncoderModel

from analogy_core.regions import FrozenClip, InstructionEncoder, RegionPredictor, RegionSpec, region_masks
from bench.timing import interleaved_median_times
from training.regions.models import word_tokenizer

FULL = dict(clip=dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=224, patch_size=14),
                      text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12),
                      projection_dim=768),
            t5=dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu"),
            image=(512, 512))
QUICK = dict(clip=dict(vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                   image_size=112, patch_size=14),
                       text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
                       projection_dim=96),
             t5=dict(d_model=96, d_kv=16, d_ff=192, num_layers=2, num_heads=6, feed_forward_proj="gated-gelu"),
             image=(256, 256))
INSTRUCTION = "make the cup on the left red and leave everything else as it is"


def build(sizes: dict) -> tuple[FrozenClip, InstructionEncoder, RegionPredictor]:
    tokenizer = word_tokenizer(INSTRUCTION.split())
    clip_sizes = sizes["clip"]
    text = dict(clip_sizes["text"], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    clip = FrozenClip(CLIPModel(CLIPConfig(text_config=text, vision_config=clip_sizes["vision"],
                                           projection_dim=clip_sizes["projection_dim"])), tokenizer)
    t5 = InstructionEncoder(T5EncoderModel(T5Config(vocab_size=len(tokenizer), **sizes["t5"])), tokenizer, "t5")
    spec = RegionSpec(dim=clip.dim, grid=clip.grid, image_size=clip.image_size, text_dim=t5.width)
    return clip, t5, RegionPredictor(spec).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small random models")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    torch.manual_seed(0)
    clip, t5, region = build(sizes)
    height, width = sizes["image"]
    image = torch.rand(1, height, width, 3)
    with torch.no_grad():
        patches = clip.vision(image).patches
        tokens, mask = t5.encode([INSTRUCTION])

    def clip_pass():
        with torch.no_grad():
            return clip.vision(image)

    def region_only():
        with torch.no_grad():
            probs = region(patches, "text", tokens, mask).probs
            return region_masks(probs, clip.grid, height, width, 0.5, 8, 8)

    def whole():
        with torch.no_grad():
            features = clip.vision(image).patches
            words, word_mask = t5.encode([INSTRUCTION])
            return region_masks(region(features, "text", words, word_mask).probs, clip.grid, height, width, 0.5, 8, 8)

    times = interleaved_median_times({"clip": clip_pass, "region": region_only, "whole": whole}, args.repeats)
    base = times["clip"]
    params = sum(p.numel() for p in region.parameters())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"setting: {'quick' if args.quick else 'paper (CLIP ViT-L/14 224 px, FLAN-T5-Base, d=768)'}; image "
          f"{width}x{height}; {clip.grid}x{clip.grid} patches; region module {params / 1e6:.2f}M parameters; "
          f"{tokens.shape[1]} instruction tokens")
    print(f"one CLIP vision pass:                {base * 1e3:8.1f} ms  (1.00x)")
    print(f"region module + masks:               {times['region'] * 1e3:8.1f} ms  ({times['region'] / base:.3f}x)")
    print(f"whole prediction (CLIP + T5 + region): {times['whole'] * 1e3:6.1f} ms  ({times['whole'] / base:.2f}x)")


if __name__ == "__main__":
    main()
