"""Regenerate example_workflows/*.json (ComfyUI UI format) from compact API-style specs below.

    .venv/bin/python -m devtools.make_examples

Widget order comes from a live server's /object_info, so the JSON matches what the frontend would save.
tests/test_comfy_server.py validates every example workflow against the server.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .comfy_server import REPO_ROOT, ComfyServer
from .workflow import _input_specs, _is_widget

# node id -> (class_type, inputs (links as [node_id, slot]), position, title or None)
COMPOSITE = {
    1: ("LoadImage", {"image": "analogy_a.png"}, (40, 40), "A (before)"),
    2: ("LoadImage", {"image": "analogy_a_prime.png"}, (40, 420), "A' (after)"),
    3: ("LoadImage", {"image": "analogy_b.png"}, (40, 800), "B (to edit)"),
    4: ("AnalogyFourPanelComposite", {"a": [1, 0], "a_prime": [2, 0], "b": [3, 0], "layout": "lorweb",
                                      "panel_size": "match_a", "width": 512, "height": 512, "fit": "center_crop",
                                      "snap": "none", "fill": 0.5}, (420, 300), None),
    5: ("AnalogyExtractPanel", {"image": [4, 0], "geometry": [4, 2], "panel": "bottom_right", "restore_size": True},
        (820, 300), None),
    6: ("SaveImage", {"images": [4, 0], "filename_prefix": "analogy/composite"}, (820, 560), None),
    7: ("SaveImage", {"images": [5, 0], "filename_prefix": "analogy/panel"}, (1180, 300), None),
    8: ("MaskToImage", {"mask": [4, 1]}, (820, 860), None),
    9: ("SaveImage", {"images": [8, 0], "filename_prefix": "analogy/mask"}, (1180, 860), None),
}

LORWEB_PROMPT = "make it a watercolor painting"
LORWEB = {
    1: ("UNETLoader", {"unet_name": "flux1-kontext-dev.safetensors", "weight_dtype": "default"}, (40, 40),
        "FLUX.1-Kontext [dev]"),
    2: ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                           "type": "flux", "device": "default"}, (40, 200), None),
    3: ("VAELoader", {"vae_name": "ae.safetensors"}, (40, 380), None),
    4: ("CLIPVisionLoader", {"clip_name": "clip-vit-large-patch14.safetensors"}, (40, 500), "CLIP ViT-L/14"),
    5: ("LoadImage", {"image": "analogy_a.png"}, (40, 640), "A (before)"),
    6: ("LoadImage", {"image": "analogy_a_prime.png"}, (40, 1040), "A' (after)"),
    7: ("LoadImage", {"image": "analogy_b.png"}, (40, 1440), "B (to edit)"),
    8: ("AnalogyFourPanelComposite", {"a": [5, 0], "a_prime": [6, 0], "b": [7, 0], "layout": "lorweb",
                                      "panel_size": "match_a", "width": 512, "height": 512, "fit": "center_crop",
                                      "snap": "kontext", "fill": 0.5}, (420, 900), None),
    9: ("VAEEncode", {"pixels": [8, 0], "vae": [3, 0]}, (800, 900), None),
    10: ("CLIPTextEncode", {"text": LORWEB_PROMPT, "clip": [2, 0]}, (420, 200), "Editing prompt (required)"),
    11: ("ReferenceLatent", {"conditioning": [10, 0], "latent": [9, 0]}, (800, 200), None),
    12: ("FluxGuidance", {"conditioning": [11, 0], "guidance": 2.5}, (1100, 200), None),
    13: ("ConditioningZeroOut", {"conditioning": [10, 0]}, (1100, 340), None),
    14: ("AnalogyEncode", {"clip_vision": [4, 0], "a": [5, 0], "a_prime": [6, 0], "b": [7, 0]}, (420, 560), None),
    15: ("AnalogyLoadLoRABasis", {"basis_name": "lorweb_model.safetensors"}, (420, 440), None),
    16: ("AnalogyMixLoRABasis", {"basis": [15, 0], "analogy": [14, 0], "temperature": 1.0, "sample": 0},
         (800, 480), None),
    17: ("AnalogyApplyLoRA", {"model": [1, 0], "lora": [16, 0], "strength": 1.0, "mode": "merge",
                              "allow_partial": False}, (1100, 480), None),
    18: ("KSampler", {"model": [17, 0], "seed": 0, "steps": 28, "cfg": 1.0, "sampler_name": "euler",
                      "scheduler": "simple", "positive": [12, 0], "negative": [13, 0], "latent_image": [9, 0],
                      "denoise": 1.0}, (1420, 300), None),
    19: ("VAEDecode", {"samples": [18, 0], "vae": [3, 0]}, (1760, 300), None),
    20: ("AnalogyExtractPanel", {"image": [19, 0], "geometry": [8, 2], "panel": "bottom_right",
                                 "restore_size": True}, (1760, 460), None),
    21: ("SaveImage", {"images": [20, 0], "filename_prefix": "lorweb/b_prime"}, (2060, 300), "B' (result)"),
    22: ("SaveImage", {"images": [19, 0], "filename_prefix": "lorweb/grid"}, (2060, 640), None),
    23: ("PreviewImage", {"images": [16, 1]}, (1100, 700), "Which basis LoRAs the analogy picked"),
}
NOTES = {
    "lorweb_kontext_analogy.json": (
        "LoRWeB on FLUX.1-Kontext: A -> A' applied to B.\n\nFiles (see README): models/diffusion_models/"
        "flux1-kontext-dev.safetensors, models/text_encoders/clip_l + t5xxl, models/vae/ae.safetensors, "
        "models/clip_vision/clip-vit-large-patch14.safetensors, models/lorweb/lorweb_model.safetensors.\n\n"
        "Write a short editing prompt describing the change: LoRWeB needs one; the analogy pair supplies the details "
        "the words miss. Official settings: guidance 2.5, 28 steps; the composite snaps to Kontext's resolutions."),
}


def api_to_ui(spec: dict, object_info: dict, note: str | None = None) -> dict:
    """A UI-format workflow (litegraph JSON) for an API-style spec."""
    nodes, links = [], []
    link_id = 0
    outputs: dict[tuple[int, int], list[int]] = {}
    for node_id, (class_type, inputs, _, _) in spec.items():
        for value in inputs.values():
            if isinstance(value, list):
                link_id += 1
                outputs.setdefault((value[0], value[1]), []).append(link_id)
                links.append([link_id, value[0], value[1], node_id, None, None])
    by_target = {(l[3], l[0]): l for l in links}
    for order, (node_id, (class_type, inputs, pos, title)) in enumerate(spec.items()):
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
        slots = max(len(ui_inputs), len(ui_outputs))
        height = 40 + 22 * slots + 28 * len(widgets) + (260 if class_type in ("LoadImage", "PreviewImage",
                                                                                  "SaveImage") else 0)
        node = {"id": node_id, "type": class_type, "pos": [int(pos[0] * 1.3), pos[1]], "size": [340, height], "flags": {},
                "order": order, "mode": 0, "inputs": ui_inputs, "outputs": ui_outputs,
                "properties": {"Node name for S&R": class_type}, "widgets_values": widgets}
        if title:
            node["title"] = title
        nodes.append(node)
    last_id = max(spec)
    if note:
        last_id += 1
        nodes.append({"id": last_id, "type": "Note", "pos": [420, 1300], "size": [420, 220], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [note]})
    return {"last_node_id": last_id, "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}}, "version": 0.4}


def main() -> None:
    examples = {"four_panel_composite.json": COMPOSITE, "lorweb_kontext_analogy.json": LORWEB}
    with ComfyServer(Path(tempfile.mkdtemp(prefix="analogy-examples-"))) as server:
        info = server.object_info()
    for name, spec in examples.items():
        path = REPO_ROOT / "example_workflows" / name
        path.write_text(json.dumps(api_to_ui(spec, info, NOTES.get(name)), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
