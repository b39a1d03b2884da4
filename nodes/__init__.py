"""ComfyUI node classes of the pack. Each submodule wraps one topic of ``analogy_core`` and lists its nodes."""

from . import analogy, composite, edit_transfer, loc, lora, lorweb, regions

_MODULES = (composite, lora, analogy, lorweb, loc, edit_transfer, regions)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in _MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
