"""Test-only ComfyUI nodes: the development nodes of ``devtools/comfy_nodes`` (shared with the world demo).

ComfyUI imports this folder by path (the tests link it beside the pack), so the real module is loaded from the repo
by file location; this folder stays where the test fixtures look for it.
"""

import importlib.util
import sys
from pathlib import Path

_NAME = "analogy_dev_comfy_nodes"
_PATH = Path(__file__).resolve().parents[2] / "devtools" / "comfy_nodes" / "__init__.py"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
NODE_CLASS_MAPPINGS = sys.modules[_NAME].NODE_CLASS_MAPPINGS
