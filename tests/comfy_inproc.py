"""Load ComfyUI's own modules into the test process, and the pack the way ComfyUI loads it (see load_inproc)."""

from __future__ import annotations

from pathlib import Path

from devtools.comfy_server import comfyui_root


def load_inproc():
    """ComfyUI's own Python modules in this process, plus the pack imported the way ComfyUI imports it.

    The ComfyUI tree is appended to sys.path (after the repo root), CPU mode is set before comfy.model_management
    loads, and the pack is loaded from its folder as a package with an unusual name, so its relative imports and
    its `import folder_paths`/`comfy.*` resolve exactly as inside ComfyUI.
    """
    import importlib.util
    import sys
    from types import SimpleNamespace

    root = str(comfyui_root())
    if root not in sys.path:
        sys.path.append(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (must come after args.cpu)
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    name = "analogy pack-under test"
    if name not in sys.modules:
        repo = Path(__file__).resolve().parent.parent
        spec = importlib.util.spec_from_file_location(name, repo / "__init__.py",
                                                      submodule_search_locations=[str(repo)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    pack = sys.modules[name]
    import importlib as _il

    return SimpleNamespace(
        pack=pack,
        core=_il.import_module(f"{name}.analogy_core"),
        lora=_il.import_module(f"{name}.analogy_core.lora"),
        formats=_il.import_module(f"{name}.analogy_core.lora_formats"),
        patch=_il.import_module(f"{name}.nodes.lora_patch"),
        nodes=_il.import_module(f"{name}.nodes.lora"),
        comfy=comfy,
    )


def float32_clip_vision(config_path: Path, config: dict, state=None):
    """ComfyUI's own ClipVisionModel for ``config`` (written to ``config_path``), float32 weights for exact
    comparisons; ``state`` loaded when given (only position ids may be missing). Call after :func:`load_inproc`."""
    import json

    import comfy.cli_args
    import comfy.clip_vision

    config_path.write_text(json.dumps(config))
    previous = comfy.cli_args.args.fp32_text_enc
    comfy.cli_args.args.fp32_text_enc = True
    try:
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config_path))
    finally:
        comfy.cli_args.args.fp32_text_enc = previous
    if state is not None:
        missing, unexpected = clip_vision.load_sd(state)
        assert not [k for k in missing if "position_ids" not in k] and not unexpected, (missing, unexpected)
    return clip_vision
