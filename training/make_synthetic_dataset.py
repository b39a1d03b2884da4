"""Write a small analogy dataset of procedural images: quads (a, a', b, b') plus a prompt, as PNGs and a JSONL index.

    python -m training.make_synthetic_dataset --out data/synthetic --per-family 16

Each line of ``quads.jsonl`` is {"a", "a_prime", "b", "b_prime", "prompt", "family"} with paths relative to the
file; that is the plain-quads format the training scripts read. Useful to smoke-test a training set-up offline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.synthetic import PROMPTS, TRANSFORMS, analogy_example


def write_dataset(out: Path, per_family: int, size: int, families: list[str], seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    index = out / "quads.jsonl"
    with open(index, "w") as handle:
        for f_idx, family in enumerate(families):
            for i in range(per_family):
                base = seed + 10_000 * f_idx + 2 * i
                quad = analogy_example(family, seed_a=base, seed_b=base + 1, width=size, height=size)
                record = {"prompt": PROMPTS.get(family, family), "family": family}
                for role, image in quad.items():
                    name = f"{family}_{i:04d}_{role}.png"
                    array = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                    Image.fromarray(array).save(out / name)
                    record[role] = name
                handle.write(json.dumps(record) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--per-family", type=int, default=16, help="quads per transformation family")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--families", nargs="+", default=sorted(TRANSFORMS), choices=sorted(TRANSFORMS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    index = write_dataset(args.out, args.per_family, args.size, args.families, args.seed)
    print(f"wrote {args.per_family * len(args.families)} quads to {index}")


if __name__ == "__main__":
    main()
