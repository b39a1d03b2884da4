"""Run an example workflow headless through a real ComfyUI and copy its results to ``outputs/``.

    python -m devtools.run_example                      # the four-panel composite example on built-in images
    python -m devtools.run_example --workflow example_workflows/four_panel_composite.json --keep-server-dir

The built-in A, A', B are procedural pictures (A' = A with colours inverted), written into the server's input folder
under the file names the example workflows load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from training.data.synthetic import analogy_example

from .comfy_server import REPO_ROOT, ComfyServer
from .images import save_png
from .workflow import ui_to_api, validate_api_prompt

DEFAULT_WORKFLOW = REPO_ROOT / "example_workflows" / "four_panel_composite.json"
INPUT_NAMES = {"a": "analogy_a.png", "a_prime": "analogy_a_prime.png", "b": "analogy_b.png"}


def write_default_inputs(input_dir: Path, transform: str = "invert") -> None:
    example = analogy_example(transform, width=320, height=256)
    for role, name in INPUT_NAMES.items():
        save_png(example[role], input_dir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="UI-format workflow JSON")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs", help="where result images are copied")
    parser.add_argument("--transform", default="invert", help="change shown by the built-in A -> A' example")
    parser.add_argument("--keep-server-dir", action="store_true", help="keep ComfyUI's base directory and log")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="analogy-comfy-"))
    write_default_inputs(base / "input", args.transform)
    started = time.monotonic()
    with ComfyServer(base) as server:
        prompt = ui_to_api(json.loads(args.workflow.read_text()), server.object_info())
        problems = validate_api_prompt(prompt, server.object_info())
        if problems:
            print("workflow does not match this server:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        history = server.run(prompt)
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for node_id, output in history["outputs"].items():
            if "images" not in output:
                continue
            for src in server.output_files(history, node_id):
                dest = args.out / src.name
                shutil.copyfile(src, dest)
                written.append(dest)
    print(f"ran {args.workflow.name} in the real ComfyUI ({time.monotonic() - started:.1f}s); results:")
    for path in written:
        print(f"  {path}")
    if args.keep_server_dir:
        print(f"server directory kept at {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
