"""The main job on the analogy world: a real B′ from the shipped LoRWeB example workflow, in a real ComfyUI.

    python -m devtools.world_demo                 # what scripts/demo.sh runs
    python -m devtools.world_demo --quick --families invert+recolour_red_blue

1. builds or reuses the world's pretrained models (``python -m training.world build``: autoencoder, world CLIP,
   FLUX.1-Kontext-like backbone; cached under ``outputs/world/``);
2. trains LoRWeB's world preset on the training families (``python -m training.train_lorweb --preset tiny`` with
   :mod:`training.world.presets`), or finishes at once when the same run is already in
   ``outputs/lorweb_world/<key>`` (the key hashes the world models and the settings);
3. runs ``example_workflows/lorweb_kontext_analogy.json`` in a real ComfyUI with the world's models swapped in for the
   downloads, on a held-out scene of each family, and writes ``outputs/world_demo.png``: one row per family,
   A | A′ | B | B′ (ours) | B′ (truth), with the error of our B′ and of doing nothing, and the fractions of the
   cells the edit changes and keeps that our B′ puts right (:mod:`training.world.metrics`; doing nothing scores 0
   and 1, ``-`` where the edit keeps no cell).

What is swapped in the workflow (everything else runs as shipped: LoadImage x3, Four-Panel Composite, VAEEncode,
ReferenceLatent, FluxGuidance, Encode Analogy, Load/Mix LoRA Basis, Apply LoRA, KSampler, VAEDecode, Extract Panel,
SaveImage):

* UNETLoader -> the dev FLUX loader (the world transformer's shapes are not ones ComfyUI's detector knows);
* CLIPVisionLoader -> the dev CLIP-vision loader (the world CLIP's vision tower);
* DualCLIPLoader + CLIPTextEncode -> the world's neutral-prompt conditioning read from a file (the world backbone
  has no language; LoRWeB was trained with that prompt);
* file names of the VAE (the world autoencoder, loaded by ComfyUI's stock VAELoader as a TAESD) and of the basis;
* panel size 64 (the world's), KSampler steps and seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from training.world import build_world, metrics
from training.world.launch import available_cores
from training.world import scenes as world_def
from training.world.data import family_list
from training.world.flux_kontext import CONDITIONING_FILE, comfy_unet_config
from training.world.presets import lorweb_settings, train_lorweb

from .comfy_server import REPO_ROOT, ComfyServer
from .images import load_png, save_png, to_uint8
from .workflow import ui_to_api

WORKFLOW = REPO_ROOT / "example_workflows" / "lorweb_kontext_analogy.json"
DEV_NODES = REPO_ROOT / "devtools" / "comfy_nodes"
FILES = {"flux": "world_flux_kontext.safetensors", "clip": "world_clip_vision.safetensors",
         "vae": "world_taesd.safetensors", "conditioning": "world_neutral_conditioning.safetensors",
         "basis": "world_lorweb_basis.safetensors"}


def install_world_models(world_folder: Path, basis: Path, models: Path) -> None:
    """Write the world's models into a ComfyUI ``models`` folder under the names :data:`FILES` gives."""
    flux = world_folder / "flux_kontext"
    config = json.loads((flux / "transformer" / "config.json").read_text())
    weights = load_file(flux / "transformer" / "diffusion_pytorch_model.safetensors")
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file(weights, models / "diffusion_models" / FILES["flux"],
              metadata={"unet_config": json.dumps(comfy_unet_config(config))})
    install_world_clip_vision(world_folder, models)
    for folder, source, name in (("vae", world_folder / "autoencoder" / "world_taesd.safetensors", FILES["vae"]),
                                 ("text_encoders", flux / CONDITIONING_FILE, FILES["conditioning"]),
                                 ("lorweb", basis, FILES["basis"])):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, models / folder / name)


def install_world_clip_vision(world_folder: Path, models: Path) -> None:
    """The world CLIP's vision tower as ``models/clip_vision/<FILES["clip"]>`` (the dev loader's header format)."""
    clip_config = json.loads((world_folder / "clip" / "config.json").read_text())["vision_config"]
    clip = load_file(world_folder / "clip" / "model.safetensors")
    vision = {k: v for k, v in clip.items() if k.startswith(("vision_model.", "visual_projection."))}
    header = {key: clip_config[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                 "num_hidden_layers", "patch_size", "image_size", "projection_dim",
                                                 "hidden_act", "layer_norm_eps") if key in clip_config}
    header.update(model_type="clip_vision_model", num_channels=3)
    (models / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file(vision, models / "clip_vision" / FILES["clip"], metadata={"clip_config": json.dumps(header)})


def world_prompt(object_info: dict, images: dict[str, str], panel: int, steps: int, seed: int) -> dict:
    """The shipped workflow in API format with the world's models swapped in (see the module docstring)."""
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), object_info)
    by_type = {node["class_type"]: key for key, node in prompt.items()}
    swaps = {"UNETLoader": ("AnalogyTestTinyFluxLoader", {"unet_name": FILES["flux"]}),
             "CLIPVisionLoader": ("AnalogyTestTinyClipVisionLoader", {"clip_name": FILES["clip"]}),
             "CLIPTextEncode": ("AnalogyTestConditioningFile", {"file_name": FILES["conditioning"]})}
    for class_type, (replacement, inputs) in swaps.items():
        prompt[by_type[class_type]] = {"class_type": replacement, "inputs": inputs}
    del prompt[by_type["DualCLIPLoader"]]
    prompt[by_type["VAELoader"]]["inputs"]["vae_name"] = FILES["vae"]
    prompt[by_type["AnalogyLoadLoRABasis"]]["inputs"]["basis_name"] = FILES["basis"]
    prompt[by_type["AnalogyFourPanelComposite"]]["inputs"].update(panel_size="custom", width=panel, height=panel,
                                                                   snap="multiple_of_16")
    prompt[by_type["KSampler"]]["inputs"].update(steps=steps, seed=seed)
    loads = sorted(key for key, node in prompt.items() if node["class_type"] == "LoadImage")
    for key in loads:  # the workflow's LoadImage nodes read analogy_a / analogy_a_prime / analogy_b
        name = prompt[key]["inputs"]["image"]
        role = {"analogy_a.png": "a", "analogy_a_prime.png": "a_prime", "analogy_b.png": "b"}[name]
        prompt[key]["inputs"]["image"] = images[role]
    return prompt


def b_prime_node(prompt: dict) -> str:
    extract = next(k for k, n in prompt.items() if n["class_type"] == "AnalogyExtractPanel")
    return next(k for k, n in prompt.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"][0] == extract)


def labelled_rows(rows: list[torch.Tensor], labels: list[str], panel: int, width: int = 190):
    grid = to_uint8(torch.cat(rows, dim=0))
    header = 14
    canvas = Image.new("RGB", (grid.shape[1] + width, grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (width, header))
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(("A", "A'", "B", "B' (ours)", "B' (truth)")):
        draw.text((width + col * panel + 4, 1), title, fill="black")
    for i, text in enumerate(labels):
        draw.text((4, header + i * panel + 4), text, fill="black")
    return canvas


def run_demo(world_folder: Path, basis: Path, out: Path, families: list[str], index: int, steps: int, seed: int,
             keep: bool = False) -> dict[str, dict]:
    panel = world_def.REFERENCE_SIZE
    base = Path(tempfile.mkdtemp(prefix="analogy-world-demo-"))
    install_world_models(world_folder, basis, base / "models")
    examples = {f: world_def.example(f, "heldout", index, panel) for f in families}
    for family, ex in examples.items():
        for role in ("a", "a_prime", "b"):
            save_png(getattr(ex, role), base / "input" / f"world_{family}_{role}.png")
    figures, rows, labels = {}, [], []
    started = time.monotonic()
    with ComfyServer(base, extra_nodes={"analogy_dev_nodes": DEV_NODES}) as server:
        info = server.object_info()
        for family, ex in examples.items():
            images = {role: f"world_{family}_{role}.png" for role in ("a", "a_prime", "b")}
            prompt = world_prompt(info, images, panel, steps, seed)
            node = b_prime_node(prompt)
            for key, n in prompt.items():
                if n["class_type"] == "SaveImage":
                    n["inputs"]["filename_prefix"] = f"world_demo/{family}_{key}"
            history = server.run(prompt)
            ours = load_png(server.output_files(history, node)[0])
            truth = load_png(save_png(ex.b_prime, base / "truth.png"))  # the 8-bit truth, as ComfyUI sees images
            error = float((ours - truth).abs().mean())
            no_edit = float((load_png(save_png(ex.b, base / "b.png")) - truth).abs().mean())
            cells = metrics.cell_scores(ours, ex.b_prime, ex.b)  # changed/kept cells from the exact B and B′
            figures[family] = {"error": error, "no_edit": no_edit, **cells}
            split = world_def.get_family(family).split
            print(f"{family:26s} ({split:7s}) error {error:.4f}   no edit {no_edit:.4f}   "
                  f"cells {metrics.format_scores(cells)}")
            rows.append(torch.cat([ex.a, ex.a_prime, ex.b, ours, ex.b_prime], dim=1))
            labels.append(f"{family}\n({split} family)\nerror {error:.3f} (no edit {no_edit:.3f})\n"
                          f"cells: {metrics.format_scores(cells)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled_rows(rows, labels, panel).save(out)
    print(f"ran {WORKFLOW.name} in the real ComfyUI for {len(examples)} held-out scenes "
          f"({time.monotonic() - started:.0f} s); picture: {out}")
    if keep:
        print(f"server directory kept at {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return figures


def lorweb_run_folder(world, quick: bool, seed: int) -> Path:
    """Where the demo's LoRWeB run lives: keyed by the world models it trains on and its settings."""
    settings = {k: v for k, v in lorweb_settings("", quick).items() if k not in ("backbone", "query_encoder")}
    payload = json.dumps({"models": {n: world.builds[n]["key"] for n in ("autoencoder", "clip", "flux_kontext")},
                          "settings": settings, "seed": seed}, sort_keys=True)
    return REPO_ROOT / "outputs" / "lorweb_world" / hashlib.sha256(payload.encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI-sized world and LoRWeB run")
    parser.add_argument("--seed", type=int, default=0, help="world and training seed")
    parser.add_argument("--world-root", type=Path, help="parent folder of cached worlds (default outputs/world)")
    parser.add_argument("--basis", type=Path, help="use this basis instead of training (must fit the world)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "world_demo.png")
    parser.add_argument("--families", default="all", help="train, heldout, all or names joined by +")
    parser.add_argument("--index", type=int, default=0, help="which held-out scene pair of each family")
    parser.add_argument("--sampler-steps", type=int, default=8, help="KSampler steps")
    parser.add_argument("--keep-server-dir", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.monotonic()
    world = build_world(["autoencoder", "clip", "flux_kontext"], quick=args.quick, seed=args.seed,
                        root=args.world_root, jobs=available_cores())  # CLIP beside the backbone
    basis = args.basis
    if basis is None:
        run = lorweb_run_folder(world, args.quick, args.seed)
        print(f"training LoRWeB on the world (or finishing the run in {run}) ...", flush=True)
        seconds = train_lorweb(str(world.root), run, args.quick, args.seed, resume=True)
        print(f"LoRWeB ready in {seconds:.0f} s (log: {run / 'train.log'})", flush=True)
        basis = run / "lorweb_basis.safetensors"
    run_demo(world.root, basis, args.out, list(family_list(args.families)), args.index, args.sampler_steps,
             args.seed, args.keep_server_dir)
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
