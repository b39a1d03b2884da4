"""ComfyUI-free model code of the visual-analogy pack: composites, LoRA maths, bases, encoders.

Shared by the ComfyUI nodes (``nodes/``) and the training scripts (``training/``). Never imports ComfyUI.
Modules inside this package import each other relatively, so it works both as the top-level package ``analogy_core``
(training, tests) and as ``<pack folder>.analogy_core`` inside ComfyUI.
"""

__version__ = "0.1.0"
