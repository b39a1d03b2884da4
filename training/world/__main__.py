"""Build (or reuse) the analogy world's pretrained models.

    python -m training.world build                  # the full world (the yardstick's and the demo's)
    python -m training.world build --quick          # the CI-sized world
    python -m training.world build --models clip --seed 1 --root /tmp/worlds
    python -m training.world build --jobs 1                  # one model after another (default: the cores available)
    python -m training.world build --quick --world-set flux_kontext.heads=6   # a probe world, in its own folder
    python -m training.world list                   # registered world models

Prints the world folder; pass it to the trainers as ``--set backbone=world:<folder>`` /
``--set query_encoder=world:<folder>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from training.world import WORLD_MODELS, build_world
from training.world.launch import available_cores
from training.world.registry import parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or reuse world models")
    build.add_argument("--quick", action="store_true", help="the CI-sized world")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--root", type=Path, help="parent folder of worlds (default outputs/world or "
                                                 "$ANALOGY_WORLD_CACHE)")
    build.add_argument("--models", help="comma-separated world models (default: all registered)")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.add_argument("--jobs", type=int, metavar="N", help="build N models at a time, each a process with the "
                       "cores shared out, each as soon as the models it depends on are built (default: the cores "
                       "available; 1, --force or --world-set: one after another in this process, each with every "
                       "core)")
    build.add_argument("--world-set", action="append", metavar="MODEL.SETTING=VALUE",
                       help="change one model's setting (repeatable); built in a folder of its own")
    sub.add_parser("list", help="list the registered world models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.command == "list":
        for name, model in WORLD_MODELS.items():
            print(f"{name:14s} depends on {', '.join(model.depends) or '-':14s} {model.description}")
        return 0
    torch.manual_seed(args.seed)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    try:
        overrides = parse_overrides(args.world_set)
    except ValueError as err:
        parser.error(str(err))
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    jobs = available_cores() if args.jobs is None else args.jobs
    world = build_world(models, quick=args.quick, seed=args.seed, root=args.root, force=args.force,
                        overrides=overrides, jobs=jobs)
    print(json.dumps({name: {"seconds": r["seconds"], **r["metrics"]} for name, r in world.builds.items()},
                     indent=2))
    print(world.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
