"""LoRWeB nodes: Encode Analogy, Load LoRA Basis, Mix LoRA Basis."""

from __future__ import annotations

import os

import torch

import comfy.model_management
import folder_paths

from ..analogy_core.analogy import AnalogyEmbedding, AnalogyError, EncoderInfo, batch_roles, split_roles
from ..analogy_core.basis import BasisError, load_basis
from ..analogy_core.heatmap import coefficient_heatmap
from .common import ANALOGY_TYPE, BASIS_TYPE, CATEGORY, LORA_TYPE

BASIS_FOLDER = "lorweb"
folder_paths.add_model_folder_path(BASIS_FOLDER, os.path.join(folder_paths.models_dir, BASIS_FOLDER))
if BASIS_FOLDER in folder_paths.folder_names_and_paths:  # the basis files are .safetensors
    folder_paths.folder_names_and_paths[BASIS_FOLDER] = (folder_paths.folder_names_and_paths[BASIS_FOLDER][0],
                                                         {".safetensors"})


def encoder_info(clip_vision) -> EncoderInfo:
    """Identity of ComfyUI's CLIP_VISION model, read from its weights."""
    model = clip_vision.model
    patch = model.vision_model.embeddings.patch_embedding.weight
    projection = getattr(model, "visual_projection", None)
    embed_dim = projection.weight.shape[0] if hasattr(projection, "weight") else patch.shape[0]
    return EncoderInfo.describe(embed_dim, patch.shape[0], clip_vision.image_size, patch.shape[-1],
                                len(model.vision_model.encoder.layers))


def encode_with_comfy(clip_vision, images: dict[str, torch.Tensor]) -> AnalogyEmbedding:
    """One batched pass of ComfyUI's CLIP vision model over the officially preprocessed images."""
    if getattr(clip_vision, "return_all_hidden_states", False):
        raise AnalogyError("this CLIP_VISION is a SigLIP model; LoRWeB was trained with CLIP ViT-L/14 "
                           "(clip_vision/clip-vit-large-patch14)")
    pixels, spans = batch_roles(images)
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    with torch.no_grad():
        out = clip_vision.model(pixel_values=pixels.to(clip_vision.load_device), intermediate_output=-2)
    embeds, tokens = out[2].float().cpu(), out[1].float().cpu()
    return AnalogyEmbedding(encoder_info(clip_vision), split_roles(embeds, spans), split_roles(tokens, spans))


class EncodeAnalogy:
    DESCRIPTION = ("Encodes the example pair A -> A' and the query B with a CLIP vision model (one batched pass, "
                   "preprocessed exactly like the official LoRWeB code). The ANALOGY output carries each image's "
                   "projected embedding and patch tokens plus the encoder's identity.")
    CATEGORY = f"{CATEGORY}/lorweb"
    FUNCTION = "encode"
    RETURN_TYPES = (ANALOGY_TYPE, "STRING")
    RETURN_NAMES = ("analogy", "info")
    OUTPUT_TOOLTIPS = ("Embeddings of A, A' (and B) for Mix LoRA Basis and the other analogy nodes.",
                       "Encoder name and dimensions.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP vision encoder; LoRWeB uses CLIP ViT-L/14 "
                                                           "(openai/clip-vit-large-patch14)."}),
                "a": ("IMAGE", {"tooltip": "A: the example before the change."}),
                "a_prime": ("IMAGE", {"tooltip": "A': the example after the change."}),
            },
            "optional": {
                "b": ("IMAGE", {"tooltip": "B: the image to edit (needed by LoRWeB; pair-only methods skip it)."}),
            },
        }

    def encode(self, clip_vision, a, a_prime, b=None):
        images = {"a": a, "a_prime": a_prime}
        if b is not None:
            images["b"] = b
        analogy = encode_with_comfy(clip_vision, images)
        info = f"{analogy.encoder.name}: {', '.join(analogy.roles)}, batch {analogy.batch_size}, " \
               f"embeds {analogy.encoder.embed_dim}-d, tokens {tuple(analogy.patch_tokens['a'].shape[1:])}"
        return (analogy, info)


class LoadLoRABasis:
    DESCRIPTION = ("Loads a LoRWeB LoRA basis (the released lorweb_model.safetensors or one trained with "
                   "python -m training.train_lorweb) from models/lorweb or models/loras, validating every tensor.")
    CATEGORY = f"{CATEGORY}/lorweb"
    FUNCTION = "load"
    RETURN_TYPES = (BASIS_TYPE, "STRING")
    RETURN_NAMES = ("basis", "info")
    OUTPUT_TOOLTIPS = ("The basis: per layer N LoRAs, N keys and a query projection.", "Basis summary.")

    @classmethod
    def INPUT_TYPES(cls):
        names = sorted(set(folder_paths.get_filename_list(BASIS_FOLDER)) | set(folder_paths.get_filename_list("loras")))
        return {"required": {"basis_name": (names, {"tooltip": "A basis file in models/lorweb (or models/loras)."})}}

    def load(self, basis_name):
        path = folder_paths.get_full_path(BASIS_FOLDER, basis_name) or folder_paths.get_full_path("loras", basis_name)
        if path is None:
            raise BasisError(f"basis file {basis_name!r} not found in models/lorweb or models/loras")
        basis = load_basis(path)
        return (basis, basis.summary())


class MixLoRABasis:
    DESCRIPTION = ("Mixes the basis into one LoRA for this analogy: per layer q = W_q·[e_A, e_A', e_B], "
                   "c = softmax(q·Kᵀ/√d / temperature), LoRA = Σ c_n A_n B_n (an exact rank N·r LoRA). "
                   "Optionally blends a second analogy, and draws the coefficients as a heat map.")
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
                                          "tooltip": "Softmax temperature: below 1 sharpens the choice of basis "
                                                     "entries, above 1 evens it out. 1 = as trained."}),
                "sample": ("INT", {"default": 0, "min": 0, "max": 4095,
                                   "tooltip": "Which item of a batched ANALOGY to mix (one LoRA per model)."}),
            },
            "optional": {
                "analogy_2": (ANALOGY_TYPE, {"tooltip": "A second analogy to blend with the first."}),
                "blend": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Weight of analogy_2 (0 = only the first analogy)."}),
                "blend_mode": (["coefficients", "query"], {
                    "default": "coefficients",
                    "tooltip": "coefficients: mix the two analogies' coefficients (both edits, weighted). "
                               "query: interpolate the CLIP queries before the softmax."}),
            },
        }

    def mix(self, basis, analogy, temperature, sample, analogy_2=None, blend=0.5, blend_mode="coefficients"):
        query = self._query(basis, analogy, sample)
        if analogy_2 is not None and blend > 0:
            query_2 = self._query(basis, analogy_2, sample if sample < analogy_2.batch_size else 0)
            if blend_mode == "query":
                coefficients = basis.coefficients((1 - blend) * query + blend * query_2, temperature)
            else:
                c1 = basis.coefficients(query, temperature)
                c2 = basis.coefficients(query_2, temperature)
                coefficients = {k: (1 - blend) * c1[k] + blend * c2[k] for k in c1}
        else:
            coefficients = basis.coefficients(query, temperature)
        lora = basis.mix(coefficients)
        table = torch.cat([c for c in coefficients.values()], dim=0)  # [layers, N]
        heat = coefficient_heatmap(table)
        usage = table.mean(dim=0)
        top = torch.topk(usage, k=min(5, usage.numel()))
        info = (f"{lora.summary()}; mean coefficient of the top entries: "
                + ", ".join(f"#{i}={v:.3f}" for v, i in zip(top.values.tolist(), top.indices.tolist())))
        return (lora, heat, info)

    @staticmethod
    def _query(basis, analogy, sample) -> torch.Tensor:
        if not 0 <= sample < analogy.batch_size:
            raise AnalogyError(f"sample {sample} is out of range: the ANALOGY holds {analogy.batch_size} item(s)")
        query = analogy.query()[sample: sample + 1]
        if query.shape[-1] != basis.query_dim:
            raise BasisError(f"the basis expects {basis.query_dim}-d queries (3 images x {basis.query_dim // 3}) "
                             f"but the ANALOGY from {analogy.encoder.name} gives {query.shape[-1]}-d "
                             f"(3 x {analogy.encoder.embed_dim}); use the encoder the basis was trained with "
                             "(CLIP ViT-L/14 for the released LoRWeB basis)")
        expected = basis.metadata.get("analogy.encoder")
        if expected and expected != analogy.encoder.name:
            raise BasisError(f"the basis was trained with {expected} but the ANALOGY comes from "
                             f"{analogy.encoder.name}")
        return query


NODE_CLASS_MAPPINGS = {
    "AnalogyEncode": EncodeAnalogy,
    "AnalogyLoadLoRABasis": LoadLoRABasis,
    "AnalogyMixLoRABasis": MixLoRABasis,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AnalogyEncode": "Encode Analogy",
    "AnalogyLoadLoRABasis": "Load LoRA Basis",
    "AnalogyMixLoRABasis": "Mix LoRA Basis",
}
