"""Load LoRA, Save LoRA and Apply LoRA to Model: the pack's LoRA type in and out of files and onto ComfyUI models."""

from __future__ import annotations

import re
from pathlib import Path

import folder_paths

from ..analogy_core import __version__
from ..analogy_core.lora import LoRAError
from ..analogy_core.lora_formats import SAVE_FORMATS
from ..analogy_core.lora_io import SAVE_DTYPES, load_lora_file, save_lora_file
from . import lora_patch
from .common import CATEGORY, LORA_TYPE

MODES = ("merge", "runtime")


class LoadLoRA:
    DESCRIPTION = ("Reads a LoRA file from models/loras in any common format (diffusers/PEFT, kohya/musubi, "
                   "ai-toolkit, ComfyUI; SD1.5, SDXL, FLUX.1, FLUX.2 dev/klein, Qwen-Image/-Edit) at the widths its "
                   "own shapes imply, including PEFT-format SD1.5 files that ComfyUI's own loader cannot map. Only "
                   ".safetensors files are read (pickle formats are refused).")
    CATEGORY = f"{CATEGORY}/lora"
    FUNCTION = "load"
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("The LoRA, for Apply LoRA to Model or Save LoRA.",
                       "Summary: model family, layers, rank, key format, skipped text-encoder entries.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": ([n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")],
                          {"tooltip": "A .safetensors LoRA in models/loras."}),
        }}

    def load(self, lora_name):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        parsed = load_lora_file(path)
        info = f"{parsed.lora.summary()}; key format {parsed.key_format}"
        if parsed.text_encoder_keys:
            info += (f"; {parsed.text_encoder_keys} text-encoder layers left out (this pack patches the diffusion "
                     "model; use ComfyUI's LoraLoader for CLIP)")
        if parsed.peft_config_source == "adapter_config.json":
            info += ("; alphas from the adapter_config.json beside it (peft), which ComfyUI's own LoraLoader does not "
                     "read: there this file applies at scale 1 per layer")
        if parsed.layers_without_alpha:
            info += (f"; {parsed.layers_without_alpha} layers carry no alpha (none from an .alpha key, the header's "
                     "peft config or an adapter_config.json beside an adapter_model.safetensors): read at scale 1, as "
                     "ComfyUI reads them — if the trainer's lora_alpha differs from r, set strength to "
                     "lora_alpha / r")
        return (parsed.lora, info)


class SaveLoRA:
    DESCRIPTION = ("Writes a LoRA as .safetensors into models/loras with metadata (family, rank, source, pack "
                   "version). The default key format loads in ComfyUI's stock LoraLoader, diffusers and peft.")
    CATEGORY = f"{CATEGORY}/lora"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name relative to models/loras (what LoRA loaders list).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (LORA_TYPE, {"tooltip": "The LoRA to save."}),
            "filename_prefix": ("STRING", {"default": "analogy/lora",
                                           "tooltip": "File name under models/loras; subfolders allowed. A number is "
                                                      "appended unless overwrite is on."}),
            "key_format": (list(SAVE_FORMATS), {
                "default": "auto",
                "tooltip": "auto: kohya keys for SD1.5/SDXL, diffusers/peft keys for FLUX.1 and Qwen-Image, "
                           "ai-toolkit's BFL names for FLUX.2 (what ComfyUI, diffusers and peft all read). peft, "
                           "kohya, comfyui: force one naming.",
            }),
            "overwrite": ("BOOLEAN", {"default": False,
                                      "tooltip": "Write exactly <prefix>.safetensors, replacing an existing file."}),
        }, "optional": {
            "dtype": (list(SAVE_DTYPES), {
                "default": "keep",
                "tooltip": "Tensor precision in the file. keep: as computed (float32 where layers mix dtypes); "
                           "bfloat16/float16 halve the file size.",
            }),
        }}

    def save(self, lora, filename_prefix, key_format, overwrite, dtype="keep"):
        root = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
        path = safe_lora_path(root, filename_prefix, overwrite)
        save_lora_file(lora, path, key_format, dtype=SAVE_DTYPES[dtype])
        name = path.relative_to(root).as_posix()
        return {"ui": {"text": [f"saved {name} ({lora.summary()}, pack {__version__})"]}, "result": (name,)}


NAME_MAX = 255  # bytes in one file or folder name on common file systems


def safe_lora_path(root: Path, prefix: str, overwrite: bool) -> Path:
    """A path inside ``root`` for ``prefix``: no traversal, no odd characters, names that fit the file system,
    numbered unless overwriting."""
    prefix = prefix.strip().replace("\\", "/")
    if prefix.endswith(".safetensors"):
        prefix = prefix[: -len(".safetensors")]
    parts = [p.strip() for p in prefix.split("/")]  # "a/ .. /x" is a traversal too
    if any(p and set(p) == {"."} and p != "." for p in parts):
        raise LoRAError(f"filename_prefix {prefix!r} must be a relative name inside models/loras (no '..')")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise LoRAError("filename_prefix is empty; give a name such as analogy/lora")
    # odd characters become "_"; trailing dots/spaces go (Windows drops them, so "x." would be "x" there)
    parts = [re.sub(r"[^\w\-. ]", "_", p).rstrip(". ") or "_" for p in parts]
    suffix = ".safetensors" if overwrite else "_00001.safetensors"
    for i, part in enumerate(parts):
        room = NAME_MAX - (len(suffix) if i == len(parts) - 1 else 0)
        if len(part.encode()) > room:
            raise LoRAError(f"filename_prefix: the name {part[:40]!r}... is {len(part.encode())} bytes long; at most "
                            f"{room} fit in a file name here")
    base = root.joinpath(*parts)
    if root not in base.resolve().parents:
        raise LoRAError(f"filename_prefix {prefix!r} points outside models/loras")
    if overwrite:
        return base.with_name(base.name + ".safetensors")
    counter = 1
    while True:
        candidate = base.with_name(f"{base.name}_{counter:05d}.safetensors")
        if not candidate.exists():
            return candidate
        counter += 1


class ApplyLoRAToModel:
    DESCRIPTION = ("Applies a LoRA to a diffusion model (on a clone; the input model is untouched). merge patches "
                   "the weights through ComfyUI's own LoRA mechanism; runtime adds the low-rank update in the forward "
                   "pass (for fp8/quantised bases, and to switch LoRAs without re-merging). Fails if LoRA layers match "
                   "nothing in the model (unless allow_partial is on) or do not fit its weights' shapes (naming the "
                   "layer).")
    CATEGORY = f"{CATEGORY}/lora"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.", "How many layers matched, mode and strength.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to patch (SD1.5, SDXL, FLUX.1, FLUX.2 or "
                                           "Qwen-Image)."}),
            "lora": (LORA_TYPE, {"tooltip": "A LoRA from Load LoRA, Mix LoRA Basis or Generate LoRA."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Multiplier of the update; negative reverses it (-1 = LoRA Reverse)."}),
            "mode": (list(MODES), {"default": "merge",
                                   "tooltip": "merge: patch weights (fastest sampling). runtime: add the low-rank "
                                              "product in the forward pass, base weights untouched."}),
            "allow_partial": ("BOOLEAN", {"default": False,
                                          "tooltip": "Apply the layers that match even if some LoRA layers match "
                                                     "nothing in this model (experts only)."}),
        }}

    def apply(self, model, lora, strength, mode, allow_partial):
        if mode not in MODES:
            raise LoRAError(f"mode must be one of {MODES}, got {mode!r}")
        lora.check_finite()
        apply_fn = lora_patch.apply_merge if mode == "merge" else lora_patch.apply_runtime
        patched, info = apply_fn(model, lora, strength, allow_partial)
        return (patched, info)


NODE_CLASS_MAPPINGS = {
    "AnalogyLoadLoRA": LoadLoRA,
    "AnalogySaveLoRA": SaveLoRA,
    "AnalogyApplyLoRA": ApplyLoRAToModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AnalogyLoadLoRA": "Load LoRA (Analogy)",
    "AnalogySaveLoRA": "Save LoRA (Analogy)",
    "AnalogyApplyLoRA": "Apply LoRA to Model",
}
