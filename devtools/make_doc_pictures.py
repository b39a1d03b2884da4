"""Pictures for the node help pages (``web/docs/``), from real runs of the pack's nodes in a real ComfyUI.

    .venv/bin/python -m devtools.make_doc_pictures

    .venv/bin/python -m devtools.make_doc_pictures --only mix region   # some of them

* Four-Panel Composite: the shipped ``four_panel_composite.json`` run on a held-out scene of the analogy world, in
  both layouts.
* Mix LoRA Basis: the shipped LoRWeB workflow with the quick world's models swapped in (as ``devtools.world_demo``
  runs it, with the demo's LoRWeB run, trained here when missing) on held-out scenes of three training families; each
  row shows A, A′, B, the B′ it drew and the node's ``coefficients`` output.
* Predict Edit Region: two region models trained here on the quick world (text mode and analogy mode, the bench's
  600-step setting, cached under ``outputs/doc_pictures``), run by Predict Edit Region in ComfyUI on held-out scenes
  of the local training families; each row shows B, the true edit region and the two predictions, with their IoU.

Pictures are PNGs of at most 60 KB (tests/test_node_docs.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from analogy_core.regions import iou
from training.world import build_world
from training.world import scenes as world_def
from training.world.loaders import T5_FOLDER
from training.world.presets import run_trainer, train_lorweb
from training.world.yardstick.regions import REGION_WORLD, region_settings

from .comfy_server import REPO_ROOT, ComfyServer
from .images import load_png, save_png, to_uint8
from .workflow import ui_to_api
from .world_demo import (
    DEV_NODES,
    FILES,
    b_prime_node,
    install_world_clip_vision,
    install_world_models,
    lorweb_run_folder,
    world_prompt,
)

DOCS = REPO_ROOT / "web" / "docs"
COMPOSITE_WORKFLOW = REPO_ROOT / "example_workflows" / "four_panel_composite.json"
FAMILY, INDEX, PANEL = "recolour_green_magenta", 0, 128  # a held-out family: the change is easy to see
LABEL_HEIGHT = 22
WORLD_PANEL = world_def.REFERENCE_SIZE  # the world models' panel size
SCALE = 2                               # world panels are drawn at twice their size (nearest), so cells stay sharp
MIX_FAMILIES = ("invert", "recolour_red_blue", "add_square_top_left")  # training families, held-out scenes
REGION_FAMILIES = ("recolour_red_blue", "add_square_top_left", "remove_discs")  # the local training families
REGION_THRESHOLD = 0.5                  # the bench's
CACHE = REPO_ROOT / "outputs" / "doc_pictures"


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


def enlarged(image: torch.Tensor, height: int | None = None) -> Image.Image:
    """IMAGE [H, W, 3] -> PIL, scaled by :data:`SCALE` (or to ``height``) with nearest neighbours."""
    picture = Image.fromarray(to_uint8(image))
    size = (picture.width * SCALE, picture.height * SCALE) if height is None else \
        (max(1, round(picture.width * height / picture.height)), height)
    return picture.resize(size, Image.NEAREST)


def stacked(rows: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (32, 32, 36))
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet


def save_sheet(sheet: Image.Image, out: Path) -> Path:
    """A PNG small enough for the docs: palette-quantised (the world's flat colours survive it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def save_inputs(base: Path, family: str) -> tuple[world_def.Example, dict[str, str]]:
    """The held-out scene ``INDEX`` of ``family`` at the world's panel size, as input PNGs; (example, role -> name)."""
    example = world_def.example(family, "heldout", INDEX, WORLD_PANEL)
    names = {role: f"{family}_{role}.png" for role in ("a", "a_prime", "b")}
    for role, name in names.items():
        save_png(getattr(example, role), base / "input" / name)
    return example, names


def mix_heat_maps(out: Path) -> Path:
    """The LoRWeB workflow on the quick world; per family A, A′, B, B′ and Mix LoRA Basis's coefficient heat map."""
    world = build_world(["autoencoder", "clip", "flux_kontext"], quick=True, seed=0)
    run = lorweb_run_folder(world, quick=True, seed=0)
    train_lorweb(str(world.root), run, quick=True, seed=0, resume=True)  # returns at once when the run is complete
    base = Path(tempfile.mkdtemp(prefix="analogy-doc-pictures-"))
    install_world_models(world.root, run / "lorweb_basis.safetensors", base / "models")
    rows = []
    with ComfyServer(base, extra_nodes={"analogy_dev_nodes": DEV_NODES}) as server:
        info = server.object_info()
        for family in MIX_FAMILIES:
            example, names = save_inputs(base, family)
            prompt = world_prompt(info, names, WORLD_PANEL, steps=8, seed=0)
            mix = _node_id(prompt, "AnalogyMixLoRABasis")
            prompt["heat_map"] = {"class_type": "SaveImage",
                                  "inputs": {"images": [mix, 1], "filename_prefix": f"doc/{family}_heat"}}
            drawn = b_prime_node(prompt)
            history = server.run(prompt)
            b_prime = load_png(server.output_files(history, drawn)[0])
            heat = load_png(server.output_files(history, "heat_map")[0])
            panels = [enlarged(getattr(example, r)) for r in ("a", "a_prime", "b")] + [enlarged(b_prime)]
            rows.append(labelled(panels + [enlarged(heat, height=WORLD_PANEL * SCALE)],
                                 ["A", "A'", "B", "B' drawn", f"{family}: layers x entries"]))
    shutil.rmtree(base, ignore_errors=True)
    return save_sheet(stacked(rows), out)


def trained_region_model(world, mode: str) -> Path:
    """A region model of ``mode`` trained on ``world`` with the bench's full setting; cached by world and setting."""
    settings = {**region_settings(str(world.root)), "mode": mode, "seed": 0}
    key = json.dumps({"models": {n: world.builds[n]["key"] for n in ("clip", T5_FOLDER)},
                      "settings": {k: v for k, v in settings.items() if k not in ("clip", "instruction_encoder")}},
                     sort_keys=True)
    run = CACHE / f"region_{mode}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    checkpoint = run / "region_predictor.safetensors"
    if not checkpoint.is_file():
        run_trainer("training.train_region", settings, run, int(REGION_WORLD["max_steps"]), resume=run.is_dir())
    return checkpoint


def region_prompt(names: dict[str, str], instruction: str) -> dict:
    """Predict Edit Region on B in text mode (the family's instruction) and in analogy mode (A → A′)."""
    def load(role):
        return {"class_type": "LoadImage", "inputs": {"image": names[role]}}

    def predict(model: str, **condition):
        return {"class_type": "AnalogyPredictEditRegion",
                "inputs": {"image": ["b", 0], "region_model": [model, 0], "clip_vision": ["clip", 0],
                           "threshold": REGION_THRESHOLD, "grow": 0, "feather": 0, **condition}}

    prompt = {"clip": {"class_type": "AnalogyTestTinyClipVisionLoader", "inputs": {"clip_name": FILES["clip"]}},
              "t5": {"class_type": "AnalogyLoadInstructionEncoder",
                     "inputs": {"encoder": f"{T5_FOLDER}/model.safetensors"}},
              "text_model": {"class_type": "AnalogyLoadRegionModel", "inputs": {"region_name": "world_text.safetensors"}},
              "analogy_model": {"class_type": "AnalogyLoadRegionModel",
                                "inputs": {"region_name": "world_analogy.safetensors"}},
              "a": load("a"), "a_prime": load("a_prime"), "b": load("b"),
              "encode": {"class_type": "AnalogyEncode", "inputs": {"clip_vision": ["clip", 0], "a": ["a", 0],
                                                                   "a_prime": ["a_prime", 0], "b": ["b", 0]}},
              "text": predict("text_model", instruction=instruction, instruction_encoder=["t5", 0]),
              "analogy": predict("analogy_model", analogy=["encode", 0])}
    for mode in ("text", "analogy"):
        prompt[f"{mode}_mask"] = {"class_type": "MaskToImage", "inputs": {"mask": [mode, 1]}}
        for output, source in (("preview", [mode, 2]), ("binary", [f"{mode}_mask", 0])):
            prompt[f"{mode}_{output}_save"] = {"class_type": "SaveImage",
                                               "inputs": {"images": source, "filename_prefix": f"doc/{mode}_{output}"}}
    return prompt


def outside_darkened(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image at full brightness inside ``mask``, at a quarter outside (any object colour stays visible)."""
    return torch.where(mask[..., None].bool(), image, 0.25 * image)


def region_previews(out: Path) -> Path:
    """Predict Edit Region in ComfyUI on the quick world: per family B, the true region and both modes' previews."""
    world = build_world(["clip", T5_FOLDER], quick=True, seed=0)
    models = {mode: trained_region_model(world, mode) for mode in ("text", "analogy")}
    base = Path(tempfile.mkdtemp(prefix="analogy-doc-pictures-"))
    install_world_clip_vision(world.root, base / "models")
    shutil.copytree(world.path(T5_FOLDER), base / "models" / "text_encoders" / T5_FOLDER)
    (base / "models" / "regions").mkdir(parents=True)
    for mode, checkpoint in models.items():
        shutil.copyfile(checkpoint, base / "models" / "regions" / f"world_{mode}.safetensors")
    rows = []
    with ComfyServer(base, extra_nodes={"analogy_dev_nodes": DEV_NODES}) as server:
        for family in REGION_FAMILIES:
            example, names = save_inputs(base, family)
            history = server.run(region_prompt(names, example.instruction))
            shown = [enlarged(example.b), enlarged(outside_darkened(example.b, example.mask))]
            labels = ["B", "true region (lit)"]
            for mode in ("text", "analogy"):
                preview = load_png(server.output_files(history, f"{mode}_preview_save")[0])
                binary = load_png(server.output_files(history, f"{mode}_binary_save")[0])[..., 0] > 0.5
                score = float(iou(binary[None], example.mask[None].bool())[0])
                shown.append(enlarged(preview))
                labels.append(f"{mode} mode, IoU {score:.2f}")
                print(f"{family}: {mode} mode IoU {score:.3f}")
            rows.append(labelled(shown, labels))
    shutil.rmtree(base, ignore_errors=True)
    return save_sheet(stacked(rows), out)


PICTURES = {"composite": ("AnalogyFourPanelComposite.png", four_panel_layouts),
            "mix": ("AnalogyMixLoRABasis.png", mix_heat_maps),
            "region": ("AnalogyPredictEditRegion.png", region_previews)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(PICTURES), default=sorted(PICTURES))
    args = parser.parse_args(argv)
    for name in args.only:
        file_name, make = PICTURES[name]
        path = make(DOCS / file_name)
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
