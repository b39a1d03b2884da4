"""Regenerate example_workflows/*.json (ComfyUI UI format) and their thumbnails from compact API-style specs below.

    .venv/bin/python -m devtools.make_examples            # JSON laid out with the frontend's sizes, then thumbnails
    .venv/bin/python -m devtools.make_examples --no-browser   # JSON only, with estimated node sizes

Loader nodes carry ``properties.models`` (name, url, directory) from devtools/model_downloads.py, the table the README's
download lists come from, so the frontend offers the downloads of missing files. Widget order comes from a live
server's /object_info, so the JSON matches what the frontend would save. Nodes sit in
columns; within a column they are stacked top-down with room for each node's title bar, so no two nodes
overlap as rendered. With a browser (devtools/browser) the workflows are opened in the frontend once to measure each
node as rendered, laid out again with those heights, and photographed (devtools/make_thumbnails.py).
tests/test_frontend.py checks the result in the frontend; tests/test_comfy_server.py validates it against the server.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .comfy_server import REPO_ROOT, ComfyServer
from .frontend import browser_unavailable, open_workflows
from .make_thumbnails import make_thumbnails
from .model_downloads import models_metadata
from .run_example import write_default_inputs
from .workflow import _input_specs, _is_widget

EXAMPLES_DIR = REPO_ROOT / "example_workflows"
# The A, A' and B every example's Load Image nodes name, shipped so a first run has inputs: copy them into
# ComfyUI/input/ (README "First run").
EXAMPLE_INPUTS_DIR = EXAMPLES_DIR / "input"

# Layout: column x = ORIGIN_X + column * (NODE_WIDTH + COLUMN_GAP); a node's title bar (TITLE_HEIGHT, the
# frontend's LiteGraph.NODE_TITLE_HEIGHT) sits above its `pos`.
ORIGIN_X, ORIGIN_Y = 40, 70
NODE_WIDTH, COLUMN_GAP, ROW_GAP, TITLE_HEIGHT = 340, 90, 40, 30
IMAGE_NODES = {"LoadImage": 260, "SaveImage": 260, "PreviewImage": 260}  # extra height for the image preview
MIN_HEIGHT = {"CLIPTextEncode": 130, "Note": 240}

# node id -> (class_type, inputs (links as [node_id, slot]), (column, top at least), title or None).
# Nodes of one column are stacked in the order they appear here, each at its requested top or below the one before.
COMPOSITE = {
    1: ("LoadImage", {"image": "analogy_a.png"}, (0, 0), "A (before)"),
    2: ("LoadImage", {"image": "analogy_a_prime.png"}, (0, 0), "A' (after)"),
    3: ("LoadImage", {"image": "analogy_b.png"}, (0, 0), "B (to edit)"),
    4: ("AnalogyFourPanelComposite", {"a": [1, 0], "a_prime": [2, 0], "b": [3, 0], "layout": "lorweb",
                                      "panel_size": "match_a", "width": 512, "height": 512, "fit": "center_crop",
                                      "snap": "none", "fill": 0.5}, (1, 470), None),
    5: ("AnalogyExtractPanel", {"image": [4, 0], "geometry": [4, 2], "panel": "bottom_right", "restore_size": True},
        (2, 0), None),
    8: ("MaskToImage", {"mask": [4, 1]}, (2, 0), None),
    7: ("SaveImage", {"images": [5, 0], "filename_prefix": "analogy/panel"}, (3, 0), None),
    6: ("SaveImage", {"images": [4, 0], "filename_prefix": "analogy/composite"}, (3, 0), None),
    9: ("SaveImage", {"images": [8, 0], "filename_prefix": "analogy/mask"}, (3, 0), None),
}

LORWEB_PROMPT = "make it a watercolor painting"
# What every workflow's note says about its files (devtools/model_downloads.py holds the URLs).
DOWNLOADS_NOTE = ("Files: when one is missing, ComfyUI's missing-models dialog offers its download and names its "
                  "folder (the README lists them too).")
CLIP_RENAME = " Save the CLIP vision download (model.safetensors) as clip-vit-large-patch14.safetensors."
KONTEXT_GATED = " FLUX.1-Kontext-dev is gated: accept its licence on Hugging Face first."
LORWEB_NOTE = (
    "LoRWeB on FLUX.1-Kontext: A -> A' applied to B.\n\n" + DOWNLOADS_NOTE + CLIP_RENAME + KONTEXT_GATED + "\n\n"
    "Write a short editing prompt describing the change: LoRWeB needs one; the analogy pair supplies the details "
    "the words miss. Official settings: guidance 2.5, 28 steps; the composite snaps to Kontext's resolutions.")
# FLUX.1-Kontext's loaders and the three images: the first column of both LoRWeB workflows.
KONTEXT_INPUTS = {
    1: ("UNETLoader", {"unet_name": "flux1-kontext-dev.safetensors", "weight_dtype": "default"}, (0, 0),
        "FLUX.1-Kontext [dev]"),
    2: ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                           "type": "flux", "device": "default"}, (0, 0), None),
    3: ("VAELoader", {"vae_name": "ae.safetensors"}, (0, 0), None),
    4: ("CLIPVisionLoader", {"clip_name": "clip-vit-large-patch14.safetensors"}, (0, 0), "CLIP ViT-L/14"),
    5: ("LoadImage", {"image": "analogy_a.png"}, (0, 0), "A (before)"),
    6: ("LoadImage", {"image": "analogy_a_prime.png"}, (0, 0), "A' (after)"),
    7: ("LoadImage", {"image": "analogy_b.png"}, (0, 0), "B (to edit)"),
}
LORWEB = {
    **KONTEXT_INPUTS,
    24: ("Note", {"text": LORWEB_NOTE}, (1, 0), "About this workflow"),
    10: ("CLIPTextEncode", {"text": LORWEB_PROMPT, "clip": [2, 0]}, (1, 310), "Editing prompt (required)"),
    15: ("AnalogyLoadLoRABasis", {"basis_name": "lorweb_model.safetensors"}, (1, 560), None),
    14: ("AnalogyEncode", {"clip_vision": [4, 0], "a": [5, 0], "a_prime": [6, 0], "b": [7, 0]}, (1, 0), None),
    8: ("AnalogyFourPanelComposite", {"a": [5, 0], "a_prime": [6, 0], "b": [7, 0], "layout": "lorweb",
                                      "panel_size": "match_a", "width": 512, "height": 512, "fit": "center_crop",
                                      "snap": "kontext", "fill": 0.5}, (1, 1240), None),
    11: ("ReferenceLatent", {"conditioning": [10, 0], "latent": [9, 0]}, (2, 310), None),
    16: ("AnalogyMixLoRABasis", {"basis": [15, 0], "analogy": [14, 0], "temperature": 1.0, "sample": 0},
         (2, 560), None),
    9: ("VAEEncode", {"pixels": [8, 0], "vae": [3, 0]}, (2, 1240), None),
    12: ("FluxGuidance", {"conditioning": [11, 0], "guidance": 2.5}, (3, 310), None),
    13: ("ConditioningZeroOut", {"conditioning": [10, 0]}, (3, 0), None),
    17: ("AnalogyApplyLoRA", {"model": [1, 0], "lora": [16, 0], "strength": 1.0, "mode": "merge",
                              "allow_partial": False}, (3, 560), None),
    23: ("PreviewImage", {"images": [16, 1]}, (3, 0), "Which basis LoRAs the analogy picked"),
    18: ("KSampler", {"model": [17, 0], "seed": 0, "steps": 28, "cfg": 1.0, "sampler_name": "euler",
                      "scheduler": "simple", "positive": [12, 0], "negative": [13, 0], "latent_image": [9, 0],
                      "denoise": 1.0}, (4, 310), None),
    19: ("VAEDecode", {"samples": [18, 0], "vae": [3, 0]}, (5, 310), None),
    20: ("AnalogyExtractPanel", {"image": [19, 0], "geometry": [8, 2], "panel": "bottom_right",
                                 "restore_size": True}, (5, 0), None),
    21: ("SaveImage", {"images": [20, 0], "filename_prefix": "lorweb/b_prime"}, (6, 310), "B' (result)"),
    22: ("SaveImage", {"images": [19, 0], "filename_prefix": "lorweb/grid"}, (6, 0), None),
}

LOC_NOTE = (
    "LoRA of Change on InstructPix2Pix: the hypernetwork turns A -> A' into a LoRA; applied to the InstructPix2Pix "
    "UNet with B as its image condition it gives B'.\n\n" + DOWNLOADS_NOTE + CLIP_RENAME + " The CLIP vision model must be the "
    "one the hypernetwork was trained with. models/loc/loc_hypernetwork.safetensors has no public download: train "
    "it with python -m training.train_loc (it writes the file into its output_dir).\n\n"
    "The prompt may stay empty: the pair says what to change. With an instruction, raise cfg (e.g. 5). direction "
    "reverse undoes the change; Save LoRA keeps the generated LoRA for any loader.")
LOC = {
    1: ("CheckpointLoaderSimple", {"ckpt_name": "instruct-pix2pix-00-22000.safetensors"}, (0, 0), "InstructPix2Pix"),
    2: ("CLIPVisionLoader", {"clip_name": "clip-vit-large-patch14.safetensors"}, (0, 0), "CLIP ViT-L/14"),
    3: ("LoadImage", {"image": "analogy_a.png"}, (0, 0), "A (before)"),
    4: ("LoadImage", {"image": "analogy_a_prime.png"}, (0, 0), "A' (after)"),
    5: ("LoadImage", {"image": "analogy_b.png"}, (0, 0), "B (to edit)"),
    16: ("Note", {"text": LOC_NOTE}, (1, 0), "About this workflow"),
    6: ("AnalogyLoadLoRAHypernetwork", {"hypernetwork_name": "loc_hypernetwork.safetensors"}, (1, 0), None),
    7: ("AnalogyEncode", {"clip_vision": [2, 0], "a": [3, 0], "a_prime": [4, 0]}, (1, 0), None),
    10: ("CLIPTextEncode", {"text": "", "clip": [1, 1]}, (1, 0), "Instruction (optional)"),
    11: ("CLIPTextEncode", {"text": "", "clip": [1, 1]}, (1, 0), "Negative"),
    8: ("AnalogyGenerateLoRA", {"hypernetwork": [6, 0], "analogy": [7, 0], "direction": "forward", "strength": 1.0,
                                "sample": 0}, (2, 0), None),
    12: ("InstructPixToPixConditioning", {"positive": [10, 0], "negative": [11, 0], "vae": [1, 2], "pixels": [5, 0]},
         (2, 0), None),
    9: ("AnalogyApplyLoRA", {"model": [1, 0], "lora": [8, 0], "strength": 1.0, "mode": "merge",
                             "allow_partial": False}, (3, 0), None),
    13: ("KSampler", {"model": [9, 0], "seed": 0, "steps": 30, "cfg": 1.0, "sampler_name": "ddim",
                      "scheduler": "ddim_uniform", "positive": [12, 0], "negative": [12, 1], "latent_image": [12, 2],
                      "denoise": 1.0}, (3, 0), None),
    14: ("VAEDecode", {"samples": [13, 0], "vae": [1, 2]}, (4, 0), None),
    15: ("SaveImage", {"images": [14, 0], "filename_prefix": "loc/b_prime"}, (4, 0), "B' (result)"),
}

REGION_INPAINT_NOTE = (
    "Predict Edit Region finds where the instruction applies (the learnable region of Ma et al.); SetLatentNoiseMask "
    "lets Stable Diffusion repaint only there, and Composite By Region puts the original pixels back everywhere "
    "else, bit for bit.\n\n" + DOWNLOADS_NOTE + CLIP_RENAME + " FLAN-T5-Base is a folder: models/text_encoders/flan-t5-base/ "
    "also needs config.json, spiece.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json of "
    "google/flan-t5-base. models/regions/region_instructions.safetensors has no public download: train it with "
    "python -m training.train_region --set data=jsonl:<your items.jsonl> (text mode) and rename its "
    "region_predictor.safetensors.\n\nThe instruction "
    "says what to change, the prompt what to paint there. grow widens the region, feather softens its inner edge.")
REGION_INPAINT = {
    1: ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}, (0, 0), "Stable Diffusion 1.5"),
    2: ("CLIPVisionLoader", {"clip_name": "clip-vit-large-patch14.safetensors"}, (0, 0), "CLIP ViT-L/14"),
    3: ("AnalogyLoadRegionModel", {"region_name": "region_instructions.safetensors"}, (0, 0), None),
    4: ("AnalogyLoadInstructionEncoder", {"encoder": "flan-t5-base/model.safetensors"}, (0, 0), "FLAN-T5-Base"),
    5: ("LoadImage", {"image": "analogy_b.png"}, (0, 0), "Image to edit"),
    16: ("Note", {"text": REGION_INPAINT_NOTE}, (1, 0), "About this workflow"),
    6: ("AnalogyPredictEditRegion", {"image": [5, 0], "region_model": [3, 0], "clip_vision": [2, 0], "threshold": 0.5,
                                     "grow": 8, "feather": 8, "instruction": "make the red disc blue",
                                     "instruction_encoder": [4, 0]}, (1, 0), None),
    7: ("CLIPTextEncode", {"text": "a blue disc", "clip": [1, 1]}, (1, 0), "What to paint in the region"),
    8: ("CLIPTextEncode", {"text": "", "clip": [1, 1]}, (1, 0), "Negative"),
    15: ("PreviewImage", {"images": [6, 2]}, (2, 0), "Predicted region"),
    9: ("VAEEncode", {"pixels": [5, 0], "vae": [1, 2]}, (2, 0), None),
    10: ("SetLatentNoiseMask", {"samples": [9, 0], "mask": [6, 1]}, (2, 0), None),
    11: ("KSampler", {"model": [1, 0], "seed": 0, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                      "scheduler": "normal", "positive": [7, 0], "negative": [8, 0], "latent_image": [10, 0],
                      "denoise": 0.9}, (3, 0), None),
    12: ("VAEDecode", {"samples": [11, 0], "vae": [1, 2]}, (3, 0), None),
    13: ("AnalogyCompositeByRegion", {"original": [5, 0], "edited": [12, 0], "mask": [6, 0]}, (3, 0), None),
    14: ("SaveImage", {"images": [13, 0], "filename_prefix": "regions/inpainted"}, (4, 0), "Result"),
}

REGION_ANALOGY_NOTE = (
    "LoRWeB's B' kept only where B should change: Predict Edit Region reads the same ANALOGY (what changed from A to "
    "A') and finds the corresponding region of B; Composite By Region takes B' inside it and B's own pixels, bit for "
    "bit, everywhere else.\n\n" + DOWNLOADS_NOTE + CLIP_RENAME + KONTEXT_GATED + " models/regions/region_analogy.safetensors has no public "
    "download: train it with python -m training.train_region --set mode=analogy --set data=pairs:<your pairs.jsonl> "
    "and rename its "
    "region_predictor.safetensors. The composite stretches panels so that Extract Panel "
    "restores B' at B's exact size.")
REGION_ANALOGY = {
    **KONTEXT_INPUTS,
    24: ("Note", {"text": REGION_ANALOGY_NOTE}, (1, 0), "About this workflow"),
    10: ("CLIPTextEncode", {"text": LORWEB_PROMPT, "clip": [2, 0]}, (1, 0), "Editing prompt (required)"),
    15: ("AnalogyLoadLoRABasis", {"basis_name": "lorweb_model.safetensors"}, (1, 0), None),
    14: ("AnalogyEncode", {"clip_vision": [4, 0], "a": [5, 0], "a_prime": [6, 0], "b": [7, 0]}, (1, 0), None),
    25: ("AnalogyLoadRegionModel", {"region_name": "region_analogy.safetensors"}, (1, 0), None),
    8: ("AnalogyFourPanelComposite", {"a": [5, 0], "a_prime": [6, 0], "b": [7, 0], "layout": "lorweb",
                                      "panel_size": "match_a", "width": 512, "height": 512, "fit": "stretch",
                                      "snap": "kontext", "fill": 0.5}, (1, 0), None),
    11: ("ReferenceLatent", {"conditioning": [10, 0], "latent": [9, 0]}, (2, 0), None),
    16: ("AnalogyMixLoRABasis", {"basis": [15, 0], "analogy": [14, 0], "temperature": 1.0, "sample": 0},
         (2, 0), None),
    9: ("VAEEncode", {"pixels": [8, 0], "vae": [3, 0]}, (2, 0), None),
    26: ("AnalogyPredictEditRegion", {"image": [7, 0], "region_model": [25, 0], "clip_vision": [4, 0],
                                      "threshold": 0.5, "grow": 8, "feather": 8, "instruction": "",
                                      "analogy": [14, 0]}, (2, 0), None),
    12: ("FluxGuidance", {"conditioning": [11, 0], "guidance": 2.5}, (3, 0), None),
    13: ("ConditioningZeroOut", {"conditioning": [10, 0]}, (3, 0), None),
    17: ("AnalogyApplyLoRA", {"model": [1, 0], "lora": [16, 0], "strength": 1.0, "mode": "merge",
                              "allow_partial": False}, (3, 0), None),
    29: ("PreviewImage", {"images": [26, 2]}, (3, 0), "Predicted region of B"),
    18: ("KSampler", {"model": [17, 0], "seed": 0, "steps": 28, "cfg": 1.0, "sampler_name": "euler",
                      "scheduler": "simple", "positive": [12, 0], "negative": [13, 0], "latent_image": [9, 0],
                      "denoise": 1.0}, (4, 0), None),
    19: ("VAEDecode", {"samples": [18, 0], "vae": [3, 0]}, (4, 0), None),
    20: ("AnalogyExtractPanel", {"image": [19, 0], "geometry": [8, 2], "panel": "bottom_right",
                                 "restore_size": True}, (4, 0), None),
    27: ("AnalogyCompositeByRegion", {"original": [7, 0], "edited": [20, 0], "mask": [26, 0]}, (5, 0), None),
    28: ("SaveImage", {"images": [27, 0], "filename_prefix": "regions/b_prime_in_region"}, (5, 0),
         "B' (only inside the region)"),
    21: ("SaveImage", {"images": [20, 0], "filename_prefix": "regions/b_prime_lorweb"}, (6, 0), "B' (LoRWeB alone)"),
}

EDIT_TRANSFER_PROMPT = ("A four-panel image: the top row shows a person before and after raising both arms; the bottom "
                        "row shows another person, who makes the same change.")
EDIT_TRANSFER_NOTE = (
    "Edit Transfer on FLUX.1-dev: A -> A' applied to B by completing the four-panel composite [A A'; B ?].\n\n"
    + DOWNLOADS_NOTE + "\n\nEdit Transfer Context keeps A, A' and B "
    "clean at every step, as the official sampler does (stock inpainting re-noises them); VAE Encode Panels encodes "
    "each panel on its own, as the official inference does. Official settings: 512-px "
    "panels (1024-px composite), guidance 1.0, 35 steps. The prompt may describe the change, or stay empty for a "
    "text-free LoRA.")
EDIT_TRANSFER = {
    1: ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}, (0, 0), "FLUX.1 [dev]"),
    2: ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                           "type": "flux", "device": "default"}, (0, 0), None),
    3: ("VAELoader", {"vae_name": "ae.safetensors"}, (0, 0), None),
    5: ("LoadImage", {"image": "analogy_a.png"}, (0, 0), "A (before)"),
    6: ("LoadImage", {"image": "analogy_a_prime.png"}, (0, 0), "A' (after)"),
    7: ("LoadImage", {"image": "analogy_b.png"}, (0, 0), "B (to edit)"),
    20: ("Note", {"text": EDIT_TRANSFER_NOTE}, (1, 0), "About this workflow"),
    10: ("CLIPTextEncode", {"text": EDIT_TRANSFER_PROMPT, "clip": [2, 0]}, (1, 0), "Prompt (optional)"),
    8: ("AnalogyFourPanelComposite", {"a": [5, 0], "a_prime": [6, 0], "b": [7, 0], "layout": "edit_transfer",
                                      "panel_size": "custom", "width": 512, "height": 512, "fit": "center_crop",
                                      "snap": "multiple_of_16", "fill": 0.5}, (1, 0), None),
    9: ("AnalogyEncodePanels", {"pixels": [8, 0], "vae": [3, 0]}, (2, 0), None),
    11: ("AnalogyEditTransferContext", {"model": [1, 0], "latent": [9, 0], "mask": [8, 1]}, (2, 0), None),
    4: ("LoraLoaderModelOnly", {"model": [11, 0], "lora_name": "edit_transfer.safetensors", "strength_model": 1.0},
        (2, 0), "Edit Transfer LoRA"),
    12: ("FluxGuidance", {"conditioning": [10, 0], "guidance": 1.0}, (3, 0), None),
    13: ("ConditioningZeroOut", {"conditioning": [10, 0]}, (3, 0), None),
    14: ("KSampler", {"model": [4, 0], "seed": 0, "steps": 35, "cfg": 1.0, "sampler_name": "euler",
                      "scheduler": "simple", "positive": [12, 0], "negative": [13, 0], "latent_image": [9, 0],
                      "denoise": 1.0}, (4, 0), None),
    15: ("VAEDecode", {"samples": [14, 0], "vae": [3, 0]}, (5, 0), None),
    16: ("AnalogyExtractPanel", {"image": [15, 0], "geometry": [8, 2], "panel": "bottom_right",
                                 "restore_size": True}, (5, 0), None),
    17: ("SaveImage", {"images": [16, 0], "filename_prefix": "edit_transfer/b_prime"}, (6, 0), "B' (result)"),
    18: ("SaveImage", {"images": [15, 0], "filename_prefix": "edit_transfer/composite"}, (6, 0), None),
}

# LoRWeB on the editors users run today: the same Load → Encode → Mix → Apply chain, the grid given to each model the
# way training/editors.py gives it (and the way its ComfyUI templates take a reference image), 512-px panels in a
# 1024-px grid, the sampler settings of ComfyUI's own template for that model.
UNTESTED_AT_SIZE = ("LoRWeB was published on FLUX.1-Kontext; on this model the nodes are tested on tiny models only "
                    "(README).")
FLUX2_NOTE = (
    "LoRWeB on FLUX.2 [klein] base 4B: A -> A' applied to B.\n\n" + DOWNLOADS_NOTE + CLIP_RENAME
    + " models/lorweb/lorweb_flux2_klein.safetensors has no public download: train it with python -m "
    "training.train_lorweb --preset flux2_klein_24gb (a 24 GB GPU; --backbone flux2:<folder> for a local copy of "
    "FLUX.2-klein-base-4B) and rename its lorweb_basis.safetensors.\n\n"
    "The grid [A A'; B B] reaches FLUX.2 as a reference image (VAE Encode -> ReferenceLatent, on both prompts), as "
    "the trainer gives it; the empty latent and the scheduler have the grid's size. CFG 5 and 20 steps as ComfyUI's "
    "klein base template. " + UNTESTED_AT_SIZE)
FLUX2 = {
    1: ("UNETLoader", {"unet_name": "flux-2-klein-base-4b.safetensors", "weight_dtype": "default"}, (0, 0),
        "FLUX.2 [klein] base 4B"),
    2: ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "flux2", "device": "default"}, (0, 0), None),
    3: ("VAELoader", {"vae_name": "flux2-vae.safetensors"}, (0, 0), None),
    4: ("CLIPVisionLoader", {"clip_name": "clip-vit-large-patch14.safetensors"}, (0, 0), "CLIP ViT-L/14"),
    5: ("LoadImage", {"image": "analogy_a.png"}, (0, 0), "A (before)"),
    6: ("LoadImage", {"image": "analogy_a_prime.png"}, (0, 0), "A' (after)"),
    7: ("LoadImage", {"image": "analogy_b.png"}, (0, 0), "B (to edit)"),
    30: ("Note", {"text": FLUX2_NOTE}, (1, 0), "About this workflow"),
    10: ("CLIPTextEncode", {"text": LORWEB_PROMPT, "clip": [2, 0]}, (1, 0), "Editing prompt (required)"),
    11: ("CLIPTextEncode", {"text": "", "clip": [2, 0]}, (1, 0), "Negative"),
    15: ("AnalogyLoadLoRABasis", {"basis_name": "lorweb_flux2_klein.safetensors"}, (1, 0), None),
    14: ("AnalogyEncode", {"clip_vision": [4, 0], "a": [5, 0], "a_prime": [6, 0], "b": [7, 0]}, (1, 0), None),
    8: ("AnalogyFourPanelComposite", {"a": [5, 0], "a_prime": [6, 0], "b": [7, 0], "layout": "lorweb",
                                      "panel_size": "custom", "width": 512, "height": 512, "fit": "center_crop",
                                      "snap": "multiple_of_16", "fill": 0.5}, (1, 0), None),
    9: ("VAEEncode", {"pixels": [8, 0], "vae": [3, 0]}, (2, 0), None),
    12: ("ReferenceLatent", {"conditioning": [10, 0], "latent": [9, 0]}, (2, 0), "Reference: the grid (prompt)"),
    13: ("ReferenceLatent", {"conditioning": [11, 0], "latent": [9, 0]}, (2, 0), "Reference: the grid (negative)"),
    16: ("AnalogyMixLoRABasis", {"basis": [15, 0], "analogy": [14, 0], "temperature": 1.0, "sample": 0},
         (2, 0), None),
    24: ("EmptyFlux2LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (2, 0), None),
    17: ("AnalogyApplyLoRA", {"model": [1, 0], "lora": [16, 0], "strength": 1.0, "mode": "merge",
                              "allow_partial": False}, (3, 0), None),
    25: ("CFGGuider", {"model": [17, 0], "positive": [12, 0], "negative": [13, 0], "cfg": 5.0}, (3, 0), None),
    26: ("RandomNoise", {"noise_seed": 0}, (3, 0), None),
    27: ("KSamplerSelect", {"sampler_name": "euler"}, (3, 0), None),
    28: ("Flux2Scheduler", {"steps": 20, "width": 1024, "height": 1024}, (3, 0), None),
    23: ("PreviewImage", {"images": [16, 1]}, (3, 0), "Which basis LoRAs the analogy picked"),
    18: ("SamplerCustomAdvanced", {"noise": [26, 0], "guider": [25, 0], "sampler": [27, 0], "sigmas": [28, 0],
                                   "latent_image": [24, 0]}, (4, 0), None),
    19: ("VAEDecode", {"samples": [18, 0], "vae": [3, 0]}, (4, 0), None),
    20: ("AnalogyExtractPanel", {"image": [19, 0], "geometry": [8, 2], "panel": "bottom_right",
                                 "restore_size": True}, (4, 0), None),
    21: ("SaveImage", {"images": [20, 0], "filename_prefix": "lorweb_flux2/b_prime"}, (5, 0), "B' (result)"),
    22: ("SaveImage", {"images": [19, 0], "filename_prefix": "lorweb_flux2/grid"}, (5, 0), None),
}

QWEN_EDIT_NOTE = (
    "LoRWeB on Qwen-Image-Edit-2509: A -> A' applied to B.\n\n" + DOWNLOADS_NOTE + CLIP_RENAME
    + " models/lorweb/lorweb_qwen_image_edit.safetensors has no public download: train it with python -m "
    "training.train_lorweb --preset qwen_image_edit_80gb (an 80 GB GPU; --backbone qwen_image_edit:<folder> for a "
    "local copy of Qwen-Image-Edit-2509) and rename its lorweb_basis.safetensors.\n\n"
    "The grid [A A'; B B] is the input image of TextEncodeQwenImageEditPlus (Qwen2.5-VL reads it with the prompt; "
    "its latent is the reference), as the trainer gives it; VAE Encode of the grid only sets the output's size. The "
    "diffusion model is fp8, so Apply LoRA runs in runtime mode. Shift 3, CFG 2.5, 20 steps as ComfyUI's 2509 "
    "template. " + UNTESTED_AT_SIZE)
QWEN_EDIT = {
    1: ("UNETLoader", {"unet_name": "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "weight_dtype": "default"}, (0, 0),
        "Qwen-Image-Edit-2509"),
    2: ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image",
                       "device": "default"}, (0, 0), None),
    3: ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}, (0, 0), None),
    4: ("CLIPVisionLoader", {"clip_name": "clip-vit-large-patch14.safetensors"}, (0, 0), "CLIP ViT-L/14"),
    5: ("LoadImage", {"image": "analogy_a.png"}, (0, 0), "A (before)"),
    6: ("LoadImage", {"image": "analogy_a_prime.png"}, (0, 0), "A' (after)"),
    7: ("LoadImage", {"image": "analogy_b.png"}, (0, 0), "B (to edit)"),
    30: ("Note", {"text": QWEN_EDIT_NOTE}, (1, 0), "About this workflow"),
    15: ("AnalogyLoadLoRABasis", {"basis_name": "lorweb_qwen_image_edit.safetensors"}, (1, 0), None),
    14: ("AnalogyEncode", {"clip_vision": [4, 0], "a": [5, 0], "a_prime": [6, 0], "b": [7, 0]}, (1, 0), None),
    8: ("AnalogyFourPanelComposite", {"a": [5, 0], "a_prime": [6, 0], "b": [7, 0], "layout": "lorweb",
                                      "panel_size": "custom", "width": 512, "height": 512, "fit": "center_crop",
                                      "snap": "multiple_of_16", "fill": 0.5}, (1, 0), None),
    10: ("TextEncodeQwenImageEditPlus", {"clip": [2, 0], "prompt": LORWEB_PROMPT, "vae": [3, 0], "image1": [8, 0]},
         (2, 0), "Editing prompt (required) + the grid"),
    11: ("TextEncodeQwenImageEditPlus", {"clip": [2, 0], "prompt": "", "vae": [3, 0], "image1": [8, 0]},
         (2, 0), "Negative + the grid"),
    16: ("AnalogyMixLoRABasis", {"basis": [15, 0], "analogy": [14, 0], "temperature": 1.0, "sample": 0},
         (2, 0), None),
    9: ("VAEEncode", {"pixels": [8, 0], "vae": [3, 0]}, (2, 0), None),
    17: ("AnalogyApplyLoRA", {"model": [1, 0], "lora": [16, 0], "strength": 1.0, "mode": "runtime",
                              "allow_partial": False}, (3, 0), None),
    12: ("ModelSamplingAuraFlow", {"model": [17, 0], "shift": 3.0}, (3, 0), None),
    13: ("CFGNorm", {"model": [12, 0], "strength": 1.0}, (3, 0), None),
    23: ("PreviewImage", {"images": [16, 1]}, (3, 0), "Which basis LoRAs the analogy picked"),
    18: ("KSampler", {"model": [13, 0], "seed": 0, "steps": 20, "cfg": 2.5, "sampler_name": "euler",
                      "scheduler": "simple", "positive": [10, 0], "negative": [11, 0], "latent_image": [9, 0],
                      "denoise": 1.0}, (4, 0), None),
    19: ("VAEDecode", {"samples": [18, 0], "vae": [3, 0]}, (4, 0), None),
    20: ("AnalogyExtractPanel", {"image": [19, 0], "geometry": [8, 2], "panel": "bottom_right",
                                 "restore_size": True}, (4, 0), None),
    21: ("SaveImage", {"images": [20, 0], "filename_prefix": "lorweb_qwen/b_prime"}, (5, 0), "B' (result)"),
    22: ("SaveImage", {"images": [19, 0], "filename_prefix": "lorweb_qwen/grid"}, (5, 0), None),
}

EXAMPLES = {"four_panel_composite.json": COMPOSITE, "lorweb_kontext_analogy.json": LORWEB,
            "loc_instructpix2pix.json": LOC, "region_inpaint.json": REGION_INPAINT,
            "region_constrained_analogy.json": REGION_ANALOGY, "edit_transfer_flux_dev.json": EDIT_TRANSFER,
            "lorweb_flux2_klein_analogy.json": FLUX2, "lorweb_qwen_image_edit_analogy.json": QWEN_EDIT}


def estimated_height(class_type: str, slots: int, widgets: int) -> int:
    """Body height (title bar excluded) that holds the node's slots and widget rows in the frontend."""
    height = 40 + 22 * slots + 28 * widgets + IMAGE_NODES.get(class_type, 0)
    return max(height, MIN_HEIGHT.get(class_type, 0))


def layout(spec: dict, heights: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Top-left `pos` of every node: columns left to right, each stacked top-down with room for the title bars."""
    bottoms: dict[int, int] = {}
    positions = {}
    for node_id, (_, _, (column, top), _) in spec.items():
        y = max(ORIGIN_Y + top, bottoms.get(column, ORIGIN_Y))
        positions[node_id] = (ORIGIN_X + column * (NODE_WIDTH + COLUMN_GAP), y)
        bottoms[column] = y + heights[node_id] + ROW_GAP + TITLE_HEIGHT
    return positions


def _note(node_id: int, text: str, title: str | None) -> dict:
    node = {"id": node_id, "type": "Note", "flags": {}, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [text]}
    return node | ({"title": title} if title else {})


def api_to_ui(spec: dict, object_info: dict, heights: dict[int, int] | None = None) -> dict:
    """A UI-format workflow (litegraph JSON) for an API-style spec; `heights` overrides the estimated node heights."""
    nodes, links = [], []
    link_id = 0
    outputs: dict[tuple[int, int], list[int]] = {}
    for node_id, (_, inputs, _, _) in spec.items():
        for value in inputs.values():
            if isinstance(value, list):
                link_id += 1
                outputs.setdefault((value[0], value[1]), []).append(link_id)
                links.append([link_id, value[0], value[1], node_id, None, None])
    by_target = {(l[3], l[0]): l for l in links}
    estimated = {}
    for node_id, (class_type, inputs, _, title) in spec.items():
        if class_type == "Note":
            nodes.append(_note(node_id, inputs["text"], title))
            estimated[node_id] = estimated_height("Note", 0, 1)
            continue
        info = object_info[class_type]
        ui_inputs, widgets = [], []
        for name, input_spec in _input_specs(info):
            value = inputs.get(name)
            kind = input_spec[0]
            if isinstance(value, list):
                link = next(l for (target, _), l in by_target.items() if target == node_id
                            and l[1] == value[0] and l[2] == value[1] and l[4] is None)
                link[4] = len(ui_inputs)
                link[5] = object_info[spec[value[0]][0]]["output"][value[1]]
                ui_inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO", "link": link[0]})
            elif _is_widget(input_spec):
                if value is None:
                    options = input_spec[1] if len(input_spec) > 1 else {}
                    value = options.get("default", kind[0] if isinstance(kind, list) else None)
                widgets.append(value)
                options = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
                if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")
        ui_outputs = [{"name": out_name, "type": out_type, "links": outputs.get((node_id, slot), []),
                       "slot_index": slot}
                      for slot, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))]
        estimated[node_id] = estimated_height(class_type, max(len(ui_inputs), len(ui_outputs)), len(widgets))
        properties = {"Node name for S&R": class_type}
        models = models_metadata(widgets)  # the frontend's missing-models dialog offers these downloads
        if models:
            properties["models"] = models
        node = {"id": node_id, "type": class_type, "flags": {}, "mode": 0, "inputs": ui_inputs,
                "outputs": ui_outputs, "properties": properties, "widgets_values": widgets}
        if title:
            node["title"] = title
        nodes.append(node)
    final = {node_id: max(estimated[node_id], (heights or {}).get(node_id, 0)) for node_id in spec}
    positions = layout(spec, final)
    for order, node in enumerate(nodes):
        node.update(pos=list(positions[node["id"]]), size=[NODE_WIDTH, final[node["id"]]], order=order)
    # No extra.ds: without a stored view the frontend fits the whole graph into the window on load.
    return {"last_node_id": max(spec), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def write(examples: dict, object_info: dict, heights: dict[str, dict[int, int]] | None = None) -> list[Path]:
    paths = []
    for name, spec in examples.items():
        path = EXAMPLES_DIR / name
        path.write_text(json.dumps(api_to_ui(spec, object_info, (heights or {}).get(name)), indent=1) + "\n")
        paths.append(path)
    return paths


def measured_heights(server: ComfyServer, paths: list[Path]) -> dict[str, dict[int, int]]:
    """Each node's body height as the frontend renders it (getBounding minus the title bar)."""
    report = open_workflows(server.url, paths)
    return {f"{stem}.json": {node["id"]: int(node["bounding"][3]) - TITLE_HEIGHT for node in facts["nodes"]}
            for stem, facts in report["workflows"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-browser", action="store_true", help="estimated sizes only; no thumbnails")
    args = parser.parse_args(argv)
    why = None if args.no_browser else browser_unavailable()
    if why:
        print(f"no browser ({why}): writing JSON with estimated sizes, thumbnails not refreshed")
    base = Path(tempfile.mkdtemp(prefix="analogy-examples-"))
    write_default_inputs(base / "input")
    with ComfyServer(base) as server:
        info = server.object_info()
        paths = write(EXAMPLES, info)
        if not (args.no_browser or why):
            paths = write(EXAMPLES, info, measured_heights(server, paths))

            make_thumbnails(server, paths)
    write_default_inputs(EXAMPLE_INPUTS_DIR)
    paths += sorted(EXAMPLE_INPUTS_DIR.glob("*.png"))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
