"""ComfyUI entry point of the visual-analogy node pack.

ComfyUI imports this folder as a package under whatever name the folder has, so everything below is imported
relatively: the pack never reaches for ComfyUI's own top-level ``nodes``/``utils`` modules by accident.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
