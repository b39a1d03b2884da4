"""Thumbnails for ComfyUI's template browser: ``example_workflows/<name>.jpg`` beside each ``<name>.json``.

    .venv/bin/python -m devtools.make_thumbnails

Each picture is a screenshot of the workflow as ComfyUI's own frontend shows it after loading (headless Chromium,
devtools/browser, the view fitted to all nodes), scaled down and saved as a JPEG of at most 100 KB. The JPEG comment
records the SHA-256 of the JSON it shows; tests/test_frontend.py checks that it matches the current file.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

from .comfy_server import ComfyServer
from .frontend import browser_unavailable, open_workflows
from .run_example import write_default_inputs

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
VIEWPORT = (2000, 1375)   # browser window the graph is fitted into
WIDTH = 1000              # thumbnail width in pixels
MAX_BYTES = 100 * 1024


def workflow_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def to_jpeg(png: Path, comment: str, width: int = WIDTH, max_bytes: int = MAX_BYTES) -> bytes:
    """The screenshot scaled to `width`, at the best JPEG quality that stays within `max_bytes`."""
    with Image.open(png) as shot:
        image = shot.convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    for quality in range(90, 30, -5):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, optimize=True, progressive=True, comment=comment.encode())
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
    raise ValueError(f"{png.name}: no JPEG quality keeps it within {max_bytes} bytes at {width} px")


def make_thumbnails(server: ComfyServer, workflows: list[Path]) -> list[Path]:
    """Screenshot every workflow in one browser; write `<name>.jpg` beside each JSON."""
    written = []
    with tempfile.TemporaryDirectory(prefix="thumbnails-") as tmp:
        open_workflows(server.url, workflows, screenshots=Path(tmp), size=VIEWPORT)
        for path in workflows:
            target = path.with_suffix(".jpg")
            target.write_bytes(to_jpeg(Path(tmp) / f"{path.stem}.png", workflow_hash(path)))
            written.append(target)
            print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KB)")
    return written


def main() -> int:
    why = browser_unavailable()
    if why:
        print(f"cannot make thumbnails: {why}", file=sys.stderr)
        return 1

    base = Path(tempfile.mkdtemp(prefix="analogy-thumbnails-"))
    write_default_inputs(base / "input")  # the images the examples load, shown in their LoadImage previews
    with ComfyServer(base) as server:
        make_thumbnails(server, sorted(EXAMPLES_DIR.glob("*.json")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
