"""LoRA of Change nodes: Load LoRA Hypernetwork, Generate LoRA."""

from __future__ import annotations

import os

import folder_paths

from ..analogy_core.fingerprint import describe_recorded
from ..analogy_core.loc import DIRECTIONS, HypernetworkError, check_encoder_weights, generate_lora, load_hypernetwork
from .common import ANALOGY_TYPE, CATEGORY, LORA_TYPE

HYPERNETWORK_TYPE = "ANALOGY_LOC_HYPERNETWORK"
HYPERNETWORK_FOLDER = "loc"
folder_paths.add_model_folder_path(HYPERNETWORK_FOLDER, os.path.join(folder_paths.models_dir, HYPERNETWORK_FOLDER))
if HYPERNETWORK_FOLDER in folder_paths.folder_names_and_paths:  # hypernetwork files are .safetensors only
    folder_paths.folder_names_and_paths[HYPERNETWORK_FOLDER] = (
        folder_paths.folder_names_and_paths[HYPERNETWORK_FOLDER][0], {".safetensors"})


class LoadLoRAHypernetwork:
    DESCRIPTION = ("Loads a LoRA of Change hypernetwork (trained with python -m training.train_loc) from models/loc. "
                   "Only .safetensors files are read; the architecture, the UNet layers it generates LoRAs for and "
                   "the image encoder it was trained with come from the file's header, and every tensor is checked "
                   "against them before anything is built.")
    CATEGORY = f"{CATEGORY}/loc"
    FUNCTION = "load"
    RETURN_TYPES = (HYPERNETWORK_TYPE, "STRING")
    RETURN_NAMES = ("hypernetwork", "info")
    OUTPUT_TOOLTIPS = ("The hypernetwork H, for Generate LoRA.",
                       "Architecture, target layers, rank and the image encoder it expects.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hypernetwork_name": (folder_paths.get_filename_list(HYPERNETWORK_FOLDER), {
            "tooltip": "A .safetensors hypernetwork in models/loc (loc_hypernetwork.safetensors from training)."})}}

    def load(self, hypernetwork_name):
        path = folder_paths.get_full_path(HYPERNETWORK_FOLDER, hypernetwork_name)
        if path is None:
            raise HypernetworkError(f"hypernetwork file {hypernetwork_name!r} not found in models/loc")
        hypernetwork = load_hypernetwork(path)
        return (hypernetwork, f"{hypernetwork.config.describe()}; "
                              f"{describe_recorded(hypernetwork.encoder_fingerprint)}")


class GenerateLoRA:
    DESCRIPTION = ("LoRA of Change: the hypernetwork turns the example pair A -> A' into a LoRA for every attention "
                   "projection (q, k, v, out) of an InstructPix2Pix UNet. Apply it with Apply LoRA to Model and "
                   "use B as the InstructPixToPixConditioning image to get B'; the same LoRA edits any query image "
                   "and can be saved with Save LoRA. direction: forward H(A, A'); reverse -H(A, A') (LoRA Reverse: "
                   "undoes the change); swapped H(A', A). Refuses an ANALOGY from another encoder than the "
                   "hypernetwork was trained with, or from an encoder of the same architecture with other weights "
                   "(told by the encoder fingerprint the hypernetwork file records).")
    CATEGORY = f"{CATEGORY}/loc"
    FUNCTION = "generate"
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("The generated LoRA (SD1.5 InstructPix2Pix layers), for Apply LoRA to Model or Save LoRA.",
                       "LoRA summary and direction.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "hypernetwork": (HYPERNETWORK_TYPE, {"tooltip": "From Load LoRA Hypernetwork."}),
            "analogy": (ANALOGY_TYPE, {"tooltip": "From Encode Analogy with A and A' (B is not needed), encoded "
                                                  "with the CLIP vision model the hypernetwork was trained with."}),
            "direction": (list(DIRECTIONS), {"default": "forward",
                                             "tooltip": "forward: H(A, A'), the change A -> A'. reverse: -H(A, A') "
                                                        "(LoRA Reverse), the change undone. swapped: H(A', A), the "
                                                        "hypernetwork asked for A' -> A."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Multiplies the generated update (before Apply LoRA's own strength)."}),
            "sample": ("INT", {"default": 0, "min": 0, "max": 4095,
                               "tooltip": "Which item of a batched ANALOGY to turn into a LoRA (one LoRA per "
                                          "model)."}),
        }}

    def generate(self, hypernetwork, analogy, direction, strength, sample):
        lora = generate_lora(hypernetwork, analogy, direction, strength, sample)
        return (lora, f"{lora.summary()}; direction {direction}, strength {strength:g}, item {sample} of "
                      f"{analogy.batch_size}; {check_encoder_weights(hypernetwork, analogy)}")


NODE_CLASS_MAPPINGS = {
    "AnalogyLoadLoRAHypernetwork": LoadLoRAHypernetwork,
    "AnalogyGenerateLoRA": GenerateLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AnalogyLoadLoRAHypernetwork": "Load LoRA Hypernetwork",
    "AnalogyGenerateLoRA": "Generate LoRA",
}
