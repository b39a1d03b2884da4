"""The quick analogy world and the quick LoRWeB yardstick run, shared by the world tests (built once per session).

The world is built (or reused) under ``outputs/world`` (git-ignored; ``$ANALOGY_WORLD_CACHE`` moves it): a clean
clone builds it, later local runs reuse it when nothing that defines it changed. The LoRWeB run is always fresh: it
is the thing under test.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

LORWEB_MODELS = ["autoencoder", "clip", "flux_kontext"]
SEED = 0


@functools.lru_cache(maxsize=None)
def quick_world():
    from training.world import build_world

    return build_world(LORWEB_MODELS, quick=True, seed=SEED)


@functools.lru_cache(maxsize=None)
def quick_bench() -> tuple[dict, Path]:
    """``python -m bench.analogy_world --methods lorweb --quick`` in this process: (its JSON, its output folder)."""
    from training.world.yardstick.runner import main

    quick_world()
    out = Path(tempfile.mkdtemp(prefix="analogy-world-bench-"))
    atexit.register(shutil.rmtree, out, True)  # a session-wide folder outside pytest's tmp_path: removed at exit
    report = main(["--methods", "lorweb", "--quick", "--seed", str(SEED), "--out", str(out), "--json",
                   str(out / "world.json")])
    return report, out
