"""ComfyUI entry point of the visual-analogy node pack.

ComfyUI imports this folder as a package under whatever name the folder has, so everything below is imported
relatively: the pack never reaches for ComfyUI's own top-level ``nodes``/``utils`` modules by accident. Outside
ComfyUI (tests, training, tools that import the repo as a package) there is no ``folder_paths`` module and no node is
registered, so the ComfyUI-free code stays importable.
"""

import importlib.util

if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# Served by ComfyUI at /extensions/<folder name>/: only the node help pages (web/docs/<NodeName>.md and their pictures),
# which the frontend's node help panel reads. No JavaScript lives there, so the frontend loads no extension from it.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
