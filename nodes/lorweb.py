"""LoRWeB nodes: Load LoRA Basis, Mix LoRA Basis (the ANALOGY they mix comes from Encode Analogy, nodes/analogy.py)."""

from __future__ import annotations

import os

import folder_paths

from ..analogy_core.fingerprint import describe_recorded, recorded_fingerprint
from ..analogy_core.lorweb.basis import BasisError
from ..analogy_core.lorweb.files import find_basis_config, is_basis_file, load_basis_with_settings
from ..analogy_core.heatmap import coefficient_heatmap
from ..analogy_core.lorweb.mix import BLEND_MODES, mix_analogy
from .common import ANALOGY_TYPE, BASIS_TYPE, CATEGORY, LORA_TYPE

BASIS_FOLDER = "lorweb"
folder_paths.add_model_folder_path(BASIS_FOLDER, os.path.join(folder_paths.models_dir, BASIS_FOLDER))
if BASIS_FOLDER in folder_paths.folder_names_and_paths:  # the basis files are .safetensors
    folder_paths.folder_names_and_paths[BASIS_FOLDER] = (folder_paths.folder_names_and_paths[BASIS_FOLDER][0],
                                                         {".safetensors"})


class LoadLoRABasis:
    DESCRIPTION = ("Loads a LoRWeB LoRA basis (the released lorweb_model.safetensors or one trained with "
                   "python -m training.train_lorweb) from models/lorweb or models/loras, validating every tensor, "
                   "with how it must be mixed: the settings the file records, else the official config.yaml beside "
                   "it or one folder up (or at config_path), else the released checkpoint's settings.")
    CATEGORY = f"{CATEGORY}/lorweb"
    FUNCTION = "load"
    RETURN_TYPES = (BASIS_TYPE, "STRING")
    RETURN_NAMES = ("basis", "info")
    OUTPUT_TOOLTIPS = ("The basis: per layer N LoRAs, N keys and a query projection.", "Basis summary.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"basis_name": (basis_names(), {"tooltip": "A basis in models/lorweb, or a file in "
                                                                       "models/loras whose header says it is one."})},
                "optional": {"config_path": ("STRING", {
                    "default": "", "tooltip": "The official config.yaml of this basis (how it must be mixed). Empty: "
                                              "use the settings the file records, else a config.yaml beside the "
                                              "file or one folder up, else the released checkpoint's settings."})}}

    @classmethod
    def IS_CHANGED(cls, basis_name, config_path=""):
        """Reload when the basis or the config.yaml it would use changes on disk."""
        path = basis_path(basis_name)
        config = (config_path.strip() or find_basis_config(path)) if path else None
        return "|".join(f"{p}:{os.path.getmtime(p) if os.path.exists(p) else '-'}" for p in (path, config) if p)

    def load(self, basis_name, config_path=""):
        path = basis_path(basis_name)
        if path is None:
            raise BasisError(f"basis file {basis_name!r} not found in models/lorweb or models/loras")
        basis, note = load_basis_with_settings(path, config_path.strip() or None)
        return (basis, f"{basis.summary()}\n{note}\n{describe_recorded(recorded_fingerprint(basis.metadata))}")


def basis_path(basis_name: str) -> str | None:
    return folder_paths.get_full_path(BASIS_FOLDER, basis_name) or folder_paths.get_full_path("loras", basis_name)


def basis_names() -> list[str]:
    """Every file in models/lorweb plus the files in models/loras whose header says they are a basis (cached)."""
    lora_bases = set()
    for name in folder_paths.get_filename_list("loras"):
        path = folder_paths.get_full_path("loras", name) if name.lower().endswith(".safetensors") else None
        if path and is_basis_file(path):
            lora_bases.add(name)
    return sorted(set(folder_paths.get_filename_list(BASIS_FOLDER)) | lora_bases)


class MixLoRABasis:
    DESCRIPTION = ("Mixes the basis into one LoRA for this analogy, as the basis was trained (by default "
                   "q = W_q·[e_A, e_A', e_B], c = softmax(q·Kᵀ/√d / temperature); tanh, several heads and other "
                   "query modes as its settings say), LoRA = Σ c_n A_n B_n (an exact rank N·r LoRA). Refuses an "
                   "ANALOGY from another encoder than the basis was trained with. Optionally blends a second "
                   "analogy, and draws the coefficients as a heat map.")
    CATEGORY = f"{CATEGORY}/lorweb"
    FUNCTION = "mix"
    RETURN_TYPES = (LORA_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "coefficients", "info")
    OUTPUT_TOOLTIPS = ("The mixed LoRA, for Apply LoRA to Model or Save LoRA.",
                       "Heat map of the mixing coefficients: one row per layer, one column per basis entry "
                       "(each row scaled to its maximum).",
                       "The most used basis entries.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "basis": (BASIS_TYPE, {"tooltip": "From Load LoRA Basis."}),
                "analogy": (ANALOGY_TYPE, {"tooltip": "From Encode Analogy (with A, A' and B)."}),
                "temperature": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                          "tooltip": "Divides the query-key scores before softmax (or tanh): below "
                                                     "1 sharpens the choice of basis entries, above 1 evens it out. "
                                                     "1 = as trained."}),
                "sample": ("INT", {"default": 0, "min": 0, "max": 4095,
                                   "tooltip": "Which item of a batched ANALOGY to mix (one LoRA per model)."}),
            },
            "optional": {
                "analogy_2": (ANALOGY_TYPE, {"tooltip": "A second analogy to blend with the first."}),
                "blend": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Weight of analogy_2 (0 = only the first analogy)."}),
                "blend_mode": (list(BLEND_MODES), {
                    "default": "coefficients",
                    "tooltip": "coefficients: mix the two analogies' coefficients (both edits, weighted). "
                               "query: interpolate the CLIP queries before the softmax."}),
            },
        }

    def mix(self, basis, analogy, temperature, sample, analogy_2=None, blend=0.5, blend_mode="coefficients"):
        result = mix_analogy(basis, analogy, temperature, sample, analogy_2, blend, blend_mode)
        return (result.lora, coefficient_heatmap(result.table), result.report)


NODE_CLASS_MAPPINGS = {
    "AnalogyLoadLoRABasis": LoadLoRABasis,
    "AnalogyMixLoRABasis": MixLoRABasis,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AnalogyLoadLoRABasis": "Load LoRA Basis",
    "AnalogyMixLoRABasis": "Mix LoRA Basis",
}
