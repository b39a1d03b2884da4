"""Pictures for the node help pages (``web/docs/``), from real runs of the pack's nodes in a real ComfyUI.

    .venv/bin/python -m devtools.make_doc_pictures             # Four-Panel Composite: both layouts (no model)
    .venv/bin/python -m devtools.make_doc_pictures --heatmap   # + Mix LoRA Basis's heat map (the world demo's run)

The composite is the shipped ``four_panel_composite.json`` run on a held-out scene of the analogy world. The heat map
is the coefficient output of Mix LoRA Basis in the shipped LoRWeB workflow run on the world's models, exactly as
``devtools.world_demo`` runs it (run ``python -m devtools.world_demo --quick`` first: it builds the quick world and
trains its LoRWeB basis; this reuses both). Pictures are PNGs of at most 60 KB.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from analogy_core import world as world_def

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


def lorweb_heatmap(out: Path, steps: int = 8, seed: int = 0) -> Path:
    """Mix LoRA Basis's coefficient heat map from the LoRWeB example workflow run on the quick world's models."""
    from training.world import build_world

    from .world_demo import DEV_NODES, install_world_models, lorweb_run_folder, world_prompt

    world = build_world(["autoencoder", "clip", "flux_kontext"], quick=True, seed=seed)
    basis = lorweb_run_folder(world, True, seed) / "lorweb_basis.safetensors"
    if not basis.is_file():
        raise SystemExit(f"no trained world basis at {basis}: run `python -m devtools.world_demo --quick` first")
    panel = world_def.REFERENCE_SIZE
    base = Path(tempfile.mkdtemp(prefix="analogy-doc-heatmap-"))
    install_world_models(world.root, basis, base / "models")
    example = world_def.example(FAMILY, "heldout", INDEX, panel)
    images = {role: f"world_{role}.png" for role in ("a", "a_prime", "b")}
    for role, name in images.items():
        save_png(getattr(example, role), base / "input" / name)
    with ComfyServer(base, extra_nodes={"analogy_dev_nodes": DEV_NODES}) as server:
        prompt = world_prompt(server.object_info(), images, panel, steps, seed)
        mix = _node_id(prompt, "AnalogyMixLoRABasis")
        preview = _consumer(prompt, mix, 1, "PreviewImage")
        prompt[preview] = {"class_type": "SaveImage", "inputs": {"images": [mix, 1], "filename_prefix": "doc/heat"}}
        history = server.run(prompt)
        heat = Image.fromarray(to_uint8(load_png(server.output_files(history, preview)[0])))
    scale = max(1, 480 // heat.width)
    heat = heat.resize((heat.width * scale, heat.height * scale), Image.NEAREST)
    labelled([heat], [f"{FAMILY}: layers (rows) x basis entries (columns)"]).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heatmap", action="store_true", help="also Mix LoRA Basis's heat map (needs the world demo)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    made = [four_panel_layouts(DOCS / "AnalogyFourPanelComposite.png")]
    if args.heatmap:
        made.append(lorweb_heatmap(DOCS / "AnalogyMixLoRABasis.png"))
    for path in made:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
