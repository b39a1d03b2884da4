"""The pack inside a real ComfyUI server: registration, a composite workflow end to end, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analogy_core import composite as cp
from training.data.synthetic import analogy_example, procedural_scene
from devtools.comfy_server import ComfyServer, PromptFailed, PromptRejected
from devtools.images import load_png, save_png
from devtools.workflow import ui_to_api, validate_api_prompt

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parent.parent
PACK_NODES = {
    "AnalogyFourPanelComposite": ("Four-Panel Composite", "analogy/composite"),
    "AnalogyExtractPanel": ("Extract Panel", "analogy/composite"),
    "AnalogyLoadLoRA": ("Load LoRA (Analogy)", "analogy/lora"),
    "AnalogySaveLoRA": ("Save LoRA (Analogy)", "analogy/lora"),
    "AnalogyApplyLoRA": ("Apply LoRA to Model", "analogy/lora"),
    "AnalogyEncode": ("Encode Analogy", "analogy/lorweb"),
    "AnalogyLoadLoRABasis": ("Load LoRA Basis", "analogy/lorweb"),
    "AnalogyMixLoRABasis": ("Mix LoRA Basis", "analogy/lorweb"),
    "AnalogyLoadLoRAHypernetwork": ("Load LoRA Hypernetwork", "analogy/loc"),
    "AnalogyGenerateLoRA": ("Generate LoRA", "analogy/loc"),
    "AnalogyLoadRegionModel": ("Load Region Model", "analogy/regions"),
    "AnalogyLoadInstructionEncoder": ("Load Instruction Encoder (T5)", "analogy/regions"),
    "AnalogyPredictEditRegion": ("Predict Edit Region", "analogy/regions"),
    "AnalogyCompositeByRegion": ("Composite By Region", "analogy/regions"),
    "AnalogyEditTransferContext": ("Edit Transfer Context", "analogy/edit_transfer"),
    "AnalogyEncodePanels": ("VAE Encode Panels (Edit Transfer)", "analogy/edit_transfer"),
}
# Files the example workflows name. Empty stand-ins let the server's enum lists (file names) validate them;
# the workflows that need real weights are validated, not run.
EXAMPLE_MODEL_FILES = ("diffusion_models/flux1-kontext-dev.safetensors", "text_encoders/clip_l.safetensors",
                       "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors", "vae/ae.safetensors",
                       "clip_vision/clip-vit-large-patch14.safetensors", "lorweb/lorweb_model.safetensors",
                       "checkpoints/instruct-pix2pix-00-22000.safetensors", "loc/loc_hypernetwork.safetensors",
                       "checkpoints/v1-5-pruned-emaonly-fp16.safetensors", "regions/region_instructions.safetensors",
                       "regions/region_analogy.safetensors", "text_encoders/flan-t5-base/config.json",
                       "text_encoders/flan-t5-base/model.safetensors",
                       "diffusion_models/flux1-dev.safetensors", "loras/edit_transfer.safetensors",
                       "diffusion_models/flux-2-klein-base-4b.safetensors", "text_encoders/qwen_3_4b.safetensors",
                       "vae/flux2-vae.safetensors", "lorweb/lorweb_flux2_klein.safetensors",
                       "diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors",
                       "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "vae/qwen_image_vae.safetensors",
                       "lorweb/lorweb_qwen_image_edit.safetensors")


def check_node_listing(info: dict) -> None:
    for name, (display, category) in PACK_NODES.items():
        assert name in info, f"{name} missing from /object_info: the pack failed to import"
        node = info[name]
        assert node["display_name"] == display and node["category"] == category
        assert node["description"]
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"])
    ours = {n for n, v in info.items() if v["category"].startswith("analogy")}
    assert ours == set(PACK_NODES), "every node of the pack sits under analogy/ and is listed here"


def test_object_info_lists_every_node(object_info):
    check_node_listing(object_info)
    composite = object_info["AnalogyFourPanelComposite"]
    assert composite["output"] == ["IMAGE", "MASK", "ANALOGY_GEOMETRY"]
    assert composite["input"]["required"]["layout"][0] == ["lorweb", "edit_transfer"]


def test_pack_loads_under_another_folder_name(tmp_path):
    with ComfyServer(tmp_path, pack_name="comfyui_VISUAL-analogy 2") as server:
        check_node_listing(server.object_info())


def write_inputs(comfy, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Save PNGs into the server's input folder; return the tensors exactly as LoadImage will read them."""
    loaded = {}
    for name, image in images.items():
        path = save_png(image, comfy.base_dir / "input" / name)
        loaded[name] = load_png(path).unsqueeze(0)
    return loaded


def load(name):
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def composite_prompt(panel: str, **overrides) -> dict:
    settings = dict(layout="lorweb", panel_size="match_a", width=64, height=64, fit="center_crop", snap="none", fill=0.5)
    settings.update(overrides)
    return {
        "1": load("t_a.png"), "2": load("t_ap.png"), "3": load("t_b.png"),
        "4": {"class_type": "AnalogyFourPanelComposite",
              "inputs": {"a": ["1", 0], "a_prime": ["2", 0], "b": ["3", 0], **settings}},
        "5": {"class_type": "AnalogyExtractPanel",
              "inputs": {"image": ["4", 0], "geometry": ["4", 2], "panel": panel, "restore_size": False}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"t_{panel}"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "t_grid"}},
        "8": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 1]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "t_mask"}},
    }


def test_composite_workflow_produces_the_expected_pixels(comfy):
    ex = analogy_example("channel_swap", width=48, height=40)
    inputs = write_inputs(comfy, {"t_a.png": ex["a"], "t_ap.png": ex["a_prime"],
                                  "t_b.png": procedural_scene(11, 72, 40)})  # B is wider: centre-cropped
    history = comfy.run(composite_prompt("top_right", layout="edit_transfer", fill=0.0))
    panel = load_png(comfy.output_files(history, "6")[0])
    assert torch.equal(panel, inputs["t_ap.png"][0]), "top-right panel must be A' pixel for pixel"

    grid = load_png(comfy.output_files(history, "7")[0]).unsqueeze(0)
    expected, mask, _ = cp.four_panel_composite(inputs["t_a.png"], inputs["t_ap.png"], inputs["t_b.png"],
                                                layout="edit_transfer", fill=0.0)
    assert grid.shape == expected.shape == (1, 80, 96, 3)
    assert torch.equal(grid[:, 40:, :48], inputs["t_b.png"][:, :, 12:60])  # centre crop of the wider B
    assert grid[:, 40:, 48:].eq(0).all()
    saved_mask = load_png(comfy.output_files(history, "9")[0])[..., 0]
    assert torch.equal(saved_mask, mask[0])


def test_bottom_right_of_lorweb_grid_is_b(comfy):
    ex = analogy_example("invert", width=32, height=32)
    inputs = write_inputs(comfy, {"t_a.png": ex["a"], "t_ap.png": ex["a_prime"], "t_b.png": ex["b"]})
    history = comfy.run(composite_prompt("bottom_right", panel_size="custom", width=64, height=64, snap="multiple_of_16"))
    panel = load_png(comfy.output_files(history, "6")[0]).unsqueeze(0)
    expected, _, geo = cp.four_panel_composite(inputs["t_a.png"], inputs["t_ap.png"], inputs["t_b.png"],
                                               panel_size=(64, 64), snap="multiple_of_16")
    assert panel.shape == (1, 64, 64, 3)
    # SaveImage truncates to 8 bits: allow one grey level.
    assert (panel - cp.extract_panel(expected, "bottom_right", geo)).abs().max() <= 1 / 255 + 1e-6


def test_mismatched_batches_fail_with_the_packs_message(comfy):
    ex = analogy_example("invert", width=16, height=16)
    write_inputs(comfy, {"t_a.png": ex["a"], "t_ap.png": ex["a_prime"], "t_b.png": ex["b"]})
    prompt = composite_prompt("bottom_right")
    prompt["10"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}}
    prompt["11"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["3", 0], "amount": 3}}
    prompt["4"]["inputs"].update(a=["10", 0], b=["11", 0])
    with pytest.raises(PromptFailed) as failure:
        comfy.run(prompt)
    error = failure.value.error
    assert error["node_type"] == "AnalogyFourPanelComposite"
    assert "batch sizes must be 1 or all equal: a has 2, a_prime has 1, b has 3" in error["exception_message"]


def test_invalid_prompt_is_rejected_with_http_400(comfy):
    prompt = composite_prompt("bottom_right", layout="diagonal")
    with pytest.raises(PromptRejected) as rejected:
        comfy.queue(prompt)
    assert rejected.value.status == 400
    errors = rejected.value.body["node_errors"]["4"]["errors"]
    assert any("layout" in json.dumps(e) and "diagonal" in json.dumps(e) for e in errors)


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows").glob("*.json")), ids=lambda p: p.name)
def test_example_workflows_match_the_server(comfy, object_info, path):
    ex = analogy_example("invert", width=32, height=32)
    write_inputs(comfy, {"analogy_a.png": ex["a"], "analogy_a_prime.png": ex["a_prime"], "analogy_b.png": ex["b"]})
    for name in EXAMPLE_MODEL_FILES:
        stand_in = comfy.base_dir / "models" / name
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.touch()
    info = comfy.object_info()  # fresh: file lists include the files just written
    prompt = ui_to_api(json.loads(path.read_text()), info)
    assert prompt, "workflow converted to an empty prompt"
    assert validate_api_prompt(prompt, info) == []
    workflow = json.loads(path.read_text())
    assert {n["type"] for n in workflow["nodes"]} - {"Note"} == {n["class_type"] for n in prompt.values()}
    # the socket types a saved workflow carries are the server's (the frontend connects links by them): every link's
    # type and every node's output types are what object_info says that node puts out
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, origin, slot, _, _, link_type in workflow["links"]:
        declared = info[nodes[origin]["type"]]["output"][slot]
        assert link_type == declared, f"link {link_id} from {nodes[origin]['type']}: {link_type}, server {declared}"
    for node in workflow["nodes"]:
        if node["type"] in info:
            declared = info[node["type"]]["output"]
            assert [o["type"] for o in node.get("outputs", [])] == declared[:len(node.get("outputs", []))], node["type"]


def test_restore_size_without_geometry_is_a_clear_error(comfy):
    ex = analogy_example("invert", width=16, height=16)
    write_inputs(comfy, {"t_a.png": ex["a"], "t_ap.png": ex["a_prime"], "t_b.png": ex["b"]})
    prompt = composite_prompt("bottom_right")
    prompt["5"]["inputs"].pop("geometry")
    prompt["5"]["inputs"]["restore_size"] = True
    with pytest.raises(PromptFailed, match="restore_size needs the geometry output of Four-Panel Composite"):
        comfy.run(prompt)


def test_the_demo_workflow_runs_end_to_end(comfy, object_info):
    """The README's main job: the composite example workflow, as shipped, on the built-in images."""
    from devtools.run_example import INPUT_NAMES, write_default_inputs

    write_default_inputs(comfy.base_dir / "input")
    workflow = json.loads((REPO / "example_workflows" / "four_panel_composite.json").read_text())
    history = comfy.run(ui_to_api(workflow, comfy.object_info()))
    panel_node = next(k for k, v in history["outputs"].items()
                      if "panel" in v["images"][0]["filename"])
    panel = load_png(comfy.output_files(history, panel_node)[0])
    b = load_png(comfy.base_dir / "input" / INPUT_NAMES["b"])
    assert torch.equal(panel, b), "lorweb layout: bottom-right, restored to B's size, is B itself"
