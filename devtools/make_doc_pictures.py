"""Pictures for the node help pages (``web/docs/``), from real runs of the pack's nodes in a real ComfyUI.

    .venv/bin/python -m devtools.make_doc_pictures

Four-Panel Composite: the shipped ``four_panel_composite.json`` run on a held-out scene of the analogy world, in both
layouts. Pictures are PNGs of at most 60 KB (tests/test_node_docs.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from training.world import scenes as world_def

from .comfy_server import REPO_ROOT, ComfyServer
from .images import load_png, save_png, to_uint8
from .workflow import ui_to_api

DOCS = REPO_ROOT / "web" / "docs"
COMPOSITE_WORKFLOW = REPO_ROOT / "example_workflows" / "four_panel_composite.json"
FAMILY, INDEX, PANEL = "recolour_green_magenta", 0, 128  # a held-out family: the change is easy to see
LABEL_HEIGHT = 22


def _node_id(prompt: dict, class_type: str) -> str:
    return next(key for key, node in prompt.items() if node["class_type"] == class_type)


def _consumer(prompt: dict, origin: str, slot: int, class_type: str) -> str:
    return next(key for key, node in prompt.items() if node["class_type"] == class_type
                and [origin, slot] in node["inputs"].values())


def labelled(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """Images side by side, each with a caption below."""
    gap = 8
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    sheet = Image.new("RGB", (width, max(i.height for i in images) + LABEL_HEIGHT), (32, 32, 36))
    draw, x = ImageDraw.Draw(sheet), 0
    for image, label in zip(images, labels):
        sheet.paste(image, (x, 0))
        draw.text((x + 4, image.height + 5), label, fill=(225, 225, 225))
        x += image.width + gap
    return sheet


def four_panel_layouts(out: Path) -> Path:
    """Run the shipped composite workflow on a world scene in both layouts; save them side by side."""
    example = world_def.example(FAMILY, "heldout", INDEX, PANEL)
    base = Path(tempfile.mkdtemp(prefix="analogy-doc-pictures-"))
    for role, name in (("a", "analogy_a.png"), ("a_prime", "analogy_a_prime.png"), ("b", "analogy_b.png")):
        save_png(getattr(example, role), base / "input" / name)
    composites = []
    with ComfyServer(base) as server:
        prompt = ui_to_api(json.loads(COMPOSITE_WORKFLOW.read_text()), server.object_info())
        composite = _node_id(prompt, "AnalogyFourPanelComposite")
        saver = _consumer(prompt, composite, 0, "SaveImage")
        for layout in ("lorweb", "edit_transfer"):
            prompt[composite]["inputs"].update(layout=layout, panel_size="custom", width=PANEL, height=PANEL)
            prompt[saver]["inputs"]["filename_prefix"] = f"doc/{layout}"
            history = server.run(prompt)
            composites.append(Image.fromarray(to_uint8(load_png(server.output_files(history, saver)[0]))))
    sheet = labelled(composites, ["lorweb layout: a copy of B", "edit_transfer layout: a blank panel"])
    sheet.save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    path = four_panel_layouts(DOCS / "AnalogyFourPanelComposite.png")
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
