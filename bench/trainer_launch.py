"""What a world trainer run costs to start: a plain ``python -m`` subprocess against a fork of the launch server
(training/world/launch.py), as a ratio, in one process.

    .venv/bin/python -m bench.trainer_launch [--steps 1] [--repeats 3]

Each run is ``python -m training.train_lorweb --preset tiny --max-steps <steps>`` into a fresh folder (tiny random
backbone, synthetic data: no world needed), so its time is almost all start-up — importing torch, diffusers,
transformers, peft and accelerate, building the models — which is what a yardstick, a ceiling sweep or the test
suite pays dozens of times. The two ways are timed in turn within every repeat (bench.timing); the server's own
start (its one-off import) is timed apart, and the files both ways write are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from bench.timing import interleaved_median_times
from training.world import launch

MODULE = "training.train_lorweb"


def one_run(mode: str, root: Path, steps: int) -> Path:
    """One tiny LoRWeB run by ``mode`` ("plain" or "fork") into a new folder; returns the folder."""
    out = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=root))
    os.environ[launch.PLAIN_SUBPROCESS_ENV] = "1" if mode == "plain" else "0"
    argv = ["--preset", "tiny", "--output-dir", str(out), "--max-steps", str(steps), "--set", "report_to=none",
            "--set", "sample_every=100000"]
    status = launch.run_module(MODULE, argv, out / "train.log", env=dict(os.environ, TQDM_DISABLE="1"))
    if status:
        raise RuntimeError(f"{mode} run failed ({status}): {(out / 'train.log').read_text()[-2000:]}")
    return out


def same_files(a: Path, b: Path) -> bool:
    first, second = (load_file(str(p / "lorweb_basis.safetensors")) for p in (a, b))
    return first.keys() == second.keys() and all(bool((first[k] == second[k]).all()) for k in first)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way (after one warm-up each)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if not launch.forking():
        raise SystemExit("this platform (or ANALOGY_TRAINER_SUBPROCESS=1) has no launch server to compare with")
    with tempfile.TemporaryDirectory(prefix="trainer-launch-") as folder:
        root = Path(folder)
        started = time.perf_counter()
        first = one_run("fork", root, args.steps)  # starts the server: its imports, once
        server_start = time.perf_counter() - started
        identical = same_files(first, one_run("plain", root, args.steps))
        times = interleaved_median_times({mode: (lambda m=mode: one_run(m, root, args.steps))
                                          for mode in ("plain", "fork")}, args.repeats)
    report = {"steps": args.steps, "repeats": args.repeats, "plain_s": round(times["plain"], 2),
              "fork_s": round(times["fork"], 2), "fork_over_plain": round(times["fork"] / times["plain"], 3),
              "first_fork_run_with_server_start_s": round(server_start, 2), "same_basis": identical,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
                         f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
