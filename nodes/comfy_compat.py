"""Every ComfyUI API whose form differs between the hosts the pack supports, in one place.

Tested on ComfyUI 0.3.75 (the CI host) and written against the newer Comfy-Org/ComfyUI sources (0.38): each helper
checks for the feature instead of comparing version numbers, so nodes never branch on the host themselves.
tests/test_comfy_contract.py pins the host behaviour this module relies on and exercises the newer branches with
fakes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterable, Iterator

import torch

import comfy.clip_vision
import comfy.model_base
import comfy.model_management
import comfy.model_patcher

log = logging.getLogger(__name__)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_models(patchers: Iterable) -> None:
    """Load ModelPatchers onto their compute device through ComfyUI's memory manager (which also evicts others).

    ``load_models_gpu([...])`` is the API in every host; the single-model ``load_model_gpu`` is a thin legacy wrapper
    that newer hosts may drop."""
    patchers = list(patchers)
    management = comfy.model_management
    if hasattr(management, "load_models_gpu"):
        management.load_models_gpu(patchers)
    else:  # hosts older than the list form
        for patcher in patchers:
            management.load_model_gpu(patcher)


def clip_preprocess(image: torch.Tensor, **kwargs) -> torch.Tensor:
    """ComfyUI's CLIP image preprocessing. Newer hosts define it in ``comfy.clip_model`` and keep an alias in
    ``comfy.clip_vision`` marked for removal; 0.3.75 has it only in ``comfy.clip_vision``."""
    import comfy.clip_model  # ComfyUI's own modules exist only inside a ComfyUI process

    function = getattr(comfy.clip_model, "clip_preprocess", None) or getattr(comfy.clip_vision, "clip_preprocess")
    return function(image, **kwargs)


def clip_vision_model_type(clip_vision) -> str:
    """The encoder kind of a CLIP_VISION object, in ComfyUI's own config names: clip_vision_model,
    siglip_vision_model, siglip2_vision_model, dinov2, dinov3 (newer hosts store ``model_type``; 0.3.75 does not)."""
    model_type = getattr(clip_vision, "model_type", None)
    if model_type:
        return model_type
    if getattr(clip_vision, "return_all_hidden_states", False):  # 0.3.75 sets this for siglip_vision_model only
        return "siglip_vision_model"
    name = type(getattr(clip_vision, "model", None)).__name__.lower()
    return "dinov2" if "dino" in name else "clip_vision_model"


def model_family(model_patcher) -> str:
    """sd15 / sdxl / flux (FLUX.1: dev, schnell, Fill, Kontext) / flux2 (FLUX.2 dev and klein) / qwen_image
    (Qwen-Image, Qwen-Image-Edit) for a ComfyUI MODEL; any other model is named after its class (chroma, hidream,
    sd20, ...) so LoRAs for the pack's families are refused there.

    ComfyUI derives Flux2, Chroma, ChromaRadiance and (in newer hosts) LongCatImage from ``model_base.Flux``, so an
    isinstance test would take them for FLUX.1; every FLUX.1 variant is built as ``model_base.Flux`` itself."""
    base = model_patcher.model
    config = getattr(base, "model_config", None)
    config_name = type(config).__name__.lower() if config is not None else ""
    flux = getattr(comfy.model_base, "Flux", None)
    if flux is not None and type(base) is flux:
        image_model = (getattr(config, "unet_config", None) or {}).get("image_model", "flux")
        return "flux" if image_model == "flux" else str(image_model)
    sdxl = getattr(comfy.model_base, "SDXL", None)
    if sdxl is not None and isinstance(base, sdxl):
        return "sdxl"
    if config_name.startswith("sd15"):  # SD15, SD15_instructpix2pix
        return "sd15"
    qwen = getattr(comfy.model_base, "QwenImage", None)
    if qwen is not None and type(base) is qwen:  # Qwen-Image and Qwen-Image-Edit (2509, 2511): one class
        return "qwen_image"
    if type(base) is not getattr(comfy.model_base, "BaseModel", None) and isinstance(base, torch.nn.Module):
        return type(base).__name__.lower()
    return config_name or "unknown"


def compute_dtype(base_model) -> torch.dtype:
    """The dtype a ComfyUI BaseModel computes in (its manual-cast dtype for fp8/quantised storage)."""
    dtype = None
    if hasattr(base_model, "get_dtype_inference"):  # newer hosts
        dtype = base_model.get_dtype_inference()
    if dtype is None:
        dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
    return dtype if dtype in FLOAT_DTYPES else torch.bfloat16


def new_patcher(module: torch.nn.Module, load_device, offload_device):
    """A ModelPatcher for an auxiliary module, of the class ComfyUI uses for its own auxiliary models: newer hosts
    point ``CoreModelPatcher`` at ModelPatcherDynamic when dynamic VRAM is on (which reroutes CPU devices to the
    plain ModelPatcher); 0.3.75 has only ModelPatcher."""
    cls = getattr(comfy.model_patcher, "CoreModelPatcher", None) or comfy.model_patcher.ModelPatcher
    return cls(module, load_device=load_device, offload_device=offload_device)


_said_compiler = False
_compiler_lock = threading.Lock()
_compiler_pauses = 0            # model calls now inside model_compiler_paused, over every thread
_compiler_was_disabled = False  # the switch as the first of them found it


@contextlib.contextmanager
def model_compiler_paused() -> Iterator[None]:
    """Run with the Comfy model compiler off (newer hosts, CUDA, dynamic VRAM: ``comfy/model_prefetch.py``), then
    restore the switch. Its CUDA graphs replay a block's kernels without running Python, so forward hooks that were
    (or were not) present at capture would be replayed (or skipped) on later calls. The host reads
    ``args.disable_comfy_compiler`` on every call; hosts without the compiler (0.3.75) are left untouched.
    The switch is process-wide while newer hosts sample on several GPUs at once (one thread each): it is restored when
    the last overlapping pause ends, to what the first one found, so one thread's end never turns the compiler back
    on under another's model call."""
    global _said_compiler, _compiler_pauses, _compiler_was_disabled
    try:
        from comfy.cli_args import args  # ComfyUI's own modules exist only inside a ComfyUI process
    except Exception:  # no ComfyUI argument parser: nothing to switch
        yield
        return
    if not hasattr(args, "disable_comfy_compiler"):
        yield
        return
    with _compiler_lock:
        if _compiler_pauses == 0:
            _compiler_was_disabled = bool(args.disable_comfy_compiler)
            if not _compiler_was_disabled and not _said_compiler:
                _said_compiler = True
                log.info("runtime LoRA: the Comfy model compiler is paused while a model with a runtime LoRA runs "
                         "(forward hooks cannot live inside its CUDA graphs); use merge mode to keep it")
        _compiler_pauses += 1
        args.disable_comfy_compiler = True
    try:
        yield
    finally:
        with _compiler_lock:
            _compiler_pauses -= 1
            if _compiler_pauses == 0:
                args.disable_comfy_compiler = _compiler_was_disabled
