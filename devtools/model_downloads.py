"""The model files the example workflows load: where each one goes and where to download it. One table.

``devtools/make_examples.py`` writes ``properties.models`` (ComfyUI's portable model metadata: ``name``, ``url``,
``directory``) onto every loader node from it, so the frontend's missing-models dialog offers the download; the
README's download tables are rendered from it (``python -m devtools.model_downloads`` rewrites them between their
``<!-- downloads:<workflow> -->`` markers, ``tests/test_model_downloads.py`` checks they are current); and
``tests/test_frontend.py`` checks that the dialog lists exactly the downloadable files of each workflow.

Nothing in the pack downloads anything: the URLs are metadata for the frontend, which shows them to the user.
``source`` says where the repository and file name were confirmed (read 2026-12-01; the FLUX.2 and Qwen-Image-Edit
rows 2026-12-02). Files with no public download (trained by the user) have ``url = None``: no metadata is written for
them, and the workflow's note says how to make them.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
HF = "https://huggingface.co"
# What ComfyUI frontend 1.32.9 offers to download (its MissingModelsWarning): other hosts or suffixes are shown with
# an error instead of a button.
ALLOWED_URL_PREFIXES = ("https://civitai.com/", "https://huggingface.co/", "http://localhost:")
ALLOWED_SUFFIXES = (".safetensors", ".sft")
PACK_FOLDERS = ("lorweb", "loc", "regions")  # model folders the pack registers (nodes/); ComfyUI does not create them
TEMPLATES = "ComfyUI's own template {} (comfyui-workflow-templates 0.7.25, the version ComfyUI 0.3.75 pins)"


@dataclass(frozen=True)
class ModelFile:
    """One file a workflow's widget names, as a user must place it under ComfyUI's ``models/``."""

    name: str  # the widget value (relative to the folder)
    directory: str  # ComfyUI model folder name (folder_paths), e.g. "diffusion_models"
    url: str | None  # official direct download, None when there is none (trained by the user)
    repository: str  # where it comes from, as the README names it
    source: str  # where the repository and file name were confirmed
    how: str = ""  # extra instructions for the README (renaming, companion files, how to make it)
    companions: tuple[str, ...] = ()  # other files of the same repository the folder needs (a transformers folder)

    @property
    def saved_as(self) -> str:
        """The file name the URL downloads as (differs from ``name`` when the user must rename it)."""
        return self.url.split("?")[0].rsplit("/", 1)[-1] if self.url else ""

    def metadata(self) -> dict[str, str]:
        """The ``properties.models`` entry for a loader node."""
        assert self.url, f"{self.name} has no public download"
        return {"name": self.name, "url": self.url, "directory": self.directory}


FLUX_KONTEXT = ModelFile(
    "flux1-kontext-dev.safetensors", "diffusion_models",
    f"{HF}/black-forest-labs/FLUX.1-Kontext-dev/resolve/main/flux1-kontext-dev.safetensors",
    "black-forest-labs/FLUX.1-Kontext-dev",
    "the official repository's file list (https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/tree/main; "
    "gated: accept the licence there first); NVlabs/LoRWeB README (commit 54d8e27) names this base model",
    "gated (accept the licence on the model page first); an fp8 version works too (use Apply LoRA's `runtime` mode)")
FLUX_DEV = ModelFile(
    "flux1-dev.safetensors", "diffusion_models", f"{HF}/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
    "Comfy-Org/flux1-dev (black-forest-labs/FLUX.1-dev)", TEMPLATES.format("flux_redux_model_example.json"),
    "or an fp8 version")
CLIP_L = ModelFile(
    "clip_l.safetensors", "text_encoders",
    f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    "comfyanonymous/flux_text_encoders", TEMPLATES.format("flux_kontext_dev_basic.json"))
T5XXL = ModelFile(
    "t5xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders",
    f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors",
    "comfyanonymous/flux_text_encoders", TEMPLATES.format("flux_kontext_dev_basic.json"))
FLUX_VAE = ModelFile(
    "ae.safetensors", "vae", f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
    "the FLUX VAE (Comfy-Org/Lumina_Image_2.0_Repackaged)", TEMPLATES.format("flux_kontext_dev_basic.json"))
CLIP_VIT_L = ModelFile(
    "clip-vit-large-patch14.safetensors", "clip_vision",
    f"{HF}/openai/clip-vit-large-patch14/resolve/main/model.safetensors",
    "openai/clip-vit-large-patch14",
    "the official repository's file list (https://huggingface.co/openai/clip-vit-large-patch14/tree/main: "
    "model.safetensors); the encoder of LoRWeB's released basis (NVlabs/LoRWeB LoRWeB_default_PROMPTS.yaml)",
    "downloads as `model.safetensors`: rename it to `clip-vit-large-patch14.safetensors`")
LORWEB_BASIS = ModelFile(
    "lorweb_model.safetensors", "lorweb",
    f"{HF}/hilamanor/lorweb/resolve/main/lorweb_model/lorweb_model.safetensors",
    "hilamanor/lorweb",
    "NVlabs/LoRWeB README (commit 54d8e27): the model badge links https://huggingface.co/hilamanor/lorweb, and its "
    "inference command for that checkpoint reads `-w lorweb_model/lorweb_model.safetensors -c config.yaml`",
    "optionally the release's [`config.yaml`](https://huggingface.co/hilamanor/lorweb/resolve/main/config.yaml) "
    "beside it or one folder up (without it Load LoRA Basis uses the released settings, which are the same)")
EDIT_TRANSFER_LORA = ModelFile(
    "edit_transfer.safetensors", "loras", f"{HF}/CUC-MIPG/EditTransfer/resolve/main/edit_transfer.safetensors",
    "CUC-MIPG/EditTransfer",
    "the official repository's file list (https://huggingface.co/CUC-MIPG/EditTransfer/tree/main: "
    "edit_transfer.safetensors, 172 MB), linked from the CUC-MIPG/Edit-Transfer README",
    "or yours (`edit_transfer_lora.safetensors` from `python -m training.train_edit_transfer`, renamed)")
INSTRUCT_PIX2PIX = ModelFile(
    "instruct-pix2pix-00-22000.safetensors", "checkpoints",
    f"{HF}/timbrooks/instruct-pix2pix/resolve/main/instruct-pix2pix-00-22000.safetensors",
    "timbrooks/instruct-pix2pix",
    "the official repository's file list (https://huggingface.co/timbrooks/instruct-pix2pix/tree/main)")
SD15 = ModelFile(
    "v1-5-pruned-emaonly-fp16.safetensors", "checkpoints",
    f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
    "Comfy-Org/stable-diffusion-v1-5-archive", TEMPLATES.format("gligen_textbox_example.json"),
    "any SD1.5 checkpoint works")
FLAN_T5 = ModelFile(
    "flan-t5-base/model.safetensors", "text_encoders",
    f"{HF}/google/flan-t5-base/resolve/main/model.safetensors",
    "google/flan-t5-base",
    "the official repository's file list (https://huggingface.co/google/flan-t5-base/tree/main: model.safetensors, "
    "config.json, spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json)",
    "the whole transformers folder `flan-t5-base/`: put `model.safetensors` there together with `config.json`, "
    "`spiece.model`, `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` of the same repository",
    ("config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
LOC_HYPERNETWORK = ModelFile(
    "loc_hypernetwork.safetensors", "loc", None, "yours", "no public weights exist (README, LoRA of Change)",
    "`python -m training.train_loc --set backbone=<InstructPix2Pix diffusers folder> --set data=magicbrush:<MagicBrush "
    "folder>` (on a workstation: [Training](#lora-of-change-hypernetwork); the defaults read `timbrooks/instruct-pix2pix` "
    "and CLIP ViT-L/14 from the Hugging Face cache and MagicBrush from `data/MagicBrush`) writes it into its "
    "`output_dir`")
REGION_TEXT = ModelFile(
    "region_instructions.safetensors", "regions", None, "yours", "no public weights exist (README, regions)",
    "`python -m training.train_region --set data=jsonl:<your items.jsonl>` (text mode; on a workstation: "
    "[Training](#region-predictor); the defaults read CLIP ViT-L/14 and `google/flan-t5-base` from the Hugging Face "
    "cache, `--set clip=<folder> --set instruction_encoder=<folder>` reads local copies) writes "
    "`region_predictor.safetensors`; rename it")
REGION_ANALOGY = ModelFile(
    "region_analogy.safetensors", "regions", None, "yours", "no public weights exist (README, regions)",
    "`python -m training.train_region --set mode=analogy --set data=pairs:<your pairs.jsonl>` (on a workstation: "
    "[Training](#region-predictor); the default reads CLIP ViT-L/14 from the Hugging Face cache, `--set clip=<folder>` "
    "a local copy) writes `region_predictor.safetensors`; rename it")

# FLUX.2 [klein] base 4B: the model the flux2_klein_24gb preset trains on (black-forest-labs/FLUX.2-klein-base-4B).
KLEIN_TEMPLATE = ("ComfyUI's own template image_flux2_klein_text_to_image.json (Comfy-Org/workflow_templates, commit "
                  "2f8fc9b; newer than the templates ComfyUI 0.3.75 pins): the properties.models of its {} node")
FLUX2_KLEIN_BASE = ModelFile(
    "flux-2-klein-base-4b.safetensors", "diffusion_models",
    f"{HF}/Comfy-Org/flux2-klein/resolve/main/split_files/diffusion_models/flux-2-klein-base-4b.safetensors",
    "Comfy-Org/flux2-klein (black-forest-labs/FLUX.2-klein-base-4B)", KLEIN_TEMPLATE.format("UNETLoader"),
    "the undistilled base model the `flux2_klein_24gb` preset trains on (not the 4-step distilled `flux-2-klein-4b`)")
QWEN3_4B = ModelFile(
    "qwen_3_4b.safetensors", "text_encoders",
    f"{HF}/Comfy-Org/flux2-klein/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
    "Comfy-Org/flux2-klein", KLEIN_TEMPLATE.format("CLIPLoader (type flux2)"))
FLUX2_VAE = ModelFile(
    "flux2-vae.safetensors", "vae", f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors",
    "the FLUX.2 VAE (Comfy-Org/flux2-dev)",
    KLEIN_TEMPLATE.format("VAELoader") + "; also " + TEMPLATES.format("image_flux2.json"))
LORWEB_FLUX2_KLEIN = ModelFile(
    "lorweb_flux2_klein.safetensors", "lorweb", None, "yours",
    "no public weights exist (README, LoRWeB on FLUX.2 and Qwen-Image-Edit)",
    "`python -m training.train_lorweb --preset flux2_klein_24gb` (add `--backbone flux2:<folder>` for a local "
    "diffusers copy of FLUX.2-klein-base-4B) writes `lorweb_basis.safetensors`; rename it")
# Qwen-Image-Edit-2509: the model the qwen_image_edit_80gb preset trains on (Qwen/Qwen-Image-Edit-2509).
QWEN_EDIT_2509 = ModelFile(
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "diffusion_models",
    f"{HF}/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/"
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    "Comfy-Org/Qwen-Image-Edit_ComfyUI (Qwen/Qwen-Image-Edit-2509)", TEMPLATES.format("image_qwen_image_edit_2509.json"),
    "fp8 weights: the workflow applies the basis in Apply LoRA's `runtime` mode")
QWEN_VL_7B = ModelFile(
    "qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders",
    f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "Comfy-Org/Qwen-Image_ComfyUI", TEMPLATES.format("image_qwen_image_edit_2509.json"))
QWEN_VAE = ModelFile(
    "qwen_image_vae.safetensors", "vae",
    f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors",
    "Comfy-Org/Qwen-Image_ComfyUI", TEMPLATES.format("image_qwen_image_edit_2509.json"))
LORWEB_QWEN_EDIT = ModelFile(
    "lorweb_qwen_image_edit.safetensors", "lorweb", None, "yours",
    "no public weights exist (README, LoRWeB on FLUX.2 and Qwen-Image-Edit)",
    "`python -m training.train_lorweb --preset qwen_image_edit_80gb` (add `--backbone qwen_image_edit:<folder>` for a "
    "local diffusers copy of Qwen-Image-Edit-2509) writes `lorweb_basis.safetensors`; rename it")

KONTEXT_FILES = (FLUX_KONTEXT, CLIP_L, T5XXL, FLUX_VAE, CLIP_VIT_L, LORWEB_BASIS)
WORKFLOW_FILES: dict[str, tuple[ModelFile, ...]] = {
    "four_panel_composite.json": (),
    "lorweb_kontext_analogy.json": KONTEXT_FILES,
    "loc_instructpix2pix.json": (INSTRUCT_PIX2PIX, CLIP_VIT_L, LOC_HYPERNETWORK),
    "edit_transfer_flux_dev.json": (FLUX_DEV, CLIP_L, T5XXL, FLUX_VAE, EDIT_TRANSFER_LORA),
    "region_inpaint.json": (SD15, CLIP_VIT_L, FLAN_T5, REGION_TEXT),
    "region_constrained_analogy.json": KONTEXT_FILES + (REGION_ANALOGY,),
    "lorweb_flux2_klein_analogy.json": (FLUX2_KLEIN_BASE, QWEN3_4B, FLUX2_VAE, CLIP_VIT_L, LORWEB_FLUX2_KLEIN),
    "lorweb_qwen_image_edit_analogy.json": (QWEN_EDIT_2509, QWEN_VL_7B, QWEN_VAE, CLIP_VIT_L, LORWEB_QWEN_EDIT),
}
ALL_FILES: dict[str, ModelFile] = {f.name: f for files in WORKFLOW_FILES.values() for f in files}


def downloadable(workflow: str) -> list[ModelFile]:
    """The files of a workflow the frontend can offer to download."""
    return [f for f in WORKFLOW_FILES[workflow] if f.url]


def models_metadata(widget_values: list) -> list[dict[str, str]]:
    """``properties.models`` for a loader node: one entry per downloadable file its widgets name."""
    return [ALL_FILES[v].metadata() for v in widget_values if isinstance(v, str) and v in ALL_FILES
            and ALL_FILES[v].url]


# -- the README's download tables ---------------------------------------------------------------------------------
def readme_table(workflow: str) -> str:
    """The markdown download table of one workflow."""
    rows = ["| File | Put it in | Source |", "|---|---|---|"]
    for f in WORKFLOW_FILES[workflow]:
        where = f"`models/{f.directory}/`" + (" (make the folder)" if f.directory in PACK_FOLDERS else "")
        source = f"[{f.repository}]({f.url})" if f.url else f.repository
        rows.append(f"| `{f.name}` | {where} | {source}{' — ' + f.how if f.how else ''} |")
    return "\n".join(rows)


# A table never runs past its own end marker, so a newly added empty pair of markers is filled in too.
MARKER = re.compile(r"(<!-- downloads:(?P<workflow>[\w.]+) -->\n)(?P<table>(?:(?!<!-- /downloads -->).)*?)"
                    r"\n?<!-- /downloads -->", re.DOTALL)


def render_readme(text: str) -> str:
    """The README with every marked download table regenerated from the table above."""
    return MARKER.sub(lambda m: m[1] + readme_table(m["workflow"]) + "\n<!-- /downloads -->", text)


def readme_workflows(text: str) -> list[str]:
    """The workflows whose download tables the README marks."""
    return [m["workflow"] for m in MARKER.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the README's download tables from devtools/model_downloads.py")
    parser.add_argument("--check", action="store_true", help="only report whether the README is current")
    args = parser.parse_args(argv)
    text = README.read_text()
    rendered = render_readme(text)
    if args.check:
        print("README download tables are current" if rendered == text else "README download tables are stale")
        return int(rendered != text)
    README.write_text(rendered)
    print(f"wrote {len(readme_workflows(rendered))} download tables into {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
