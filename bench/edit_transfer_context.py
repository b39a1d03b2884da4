"""What Edit Transfer Context adds to a sampling step, as a ratio to the step, at FLUX.1-dev shapes (CPU).

    .venv/bin/python -m bench.edit_transfer_context            # 1024-px composite (the official size), ~3 minutes
    .venv/bin/python -m bench.edit_transfer_context --quick    # 512-px composite

In one process:
- node: the node's work per model call — its APPLY_MODEL wrapper (ComfyUI's own FLUX model sampling for the input
  preconditioning, clean context in, clean context out) around an executor that returns at once, on the latent of a
  1024-px composite ([B, 16, 128, 128]), batch 1 (FLUX.1-dev's guidance-distilled sampling, cfg 1) and 2 (cfg > 1);
  also its once-per-sampling SAMPLER_SAMPLE wrapper;
- step: one FLUX.1-dev double block and one single block (diffusers' own block classes at the real widths: hidden
  3072, 24 heads, MLP 12288) on that composite's 4,096 image tokens + 512 text tokens, bfloat16; a step of the full
  model is estimated as 19 double + 38 single blocks (embeddings and the final layer left out, so the estimate is a
  lower bound on the step and the printed ratio an upper bound on the overhead). The full 12B model does not fit
  this machine; the blocks are timed once each (each takes tens of seconds on 2 cores);
- end to end in ComfyUI's KSampler on the tiny test FLUX (hidden 32), with and without the node: the worst case,
  where the model costs almost nothing.
Goal: node <= 2 % of a step at FLUX shapes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

from bench.timing import interleaved_median_times
from devtools.comfy_server import comfyui_root
from diffusers.models.embeddings import FluxPosEmbed
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

REPO = Path(__file__).resolve().parent.parent
PACK = "analogy_pack_bench"


def load_comfy_and_pack():
    """ComfyUI's modules (CPU mode) and the pack imported as a package, as ComfyUI imports it."""
    sys.path.append(str(comfyui_root()))
    import comfy.cli_args  # ComfyUI's own modules exist only inside a ComfyUI process

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import comfy.supported_models  # ComfyUI's own modules exist only inside a ComfyUI process

    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.nodes.edit_transfer"), importlib.import_module(
        f"{PACK}.analogy_core.edit_transfer")


class InstantExecutor:
    """Stands in for the model call: returns its input (the denoised estimate costs the node nothing here)."""

    def __init__(self, base):
        self.class_obj = base

    def __call__(self, x, *args, **kwargs):
        return x


def node_costs(node, core, side: int, repeats: int) -> dict[str, float]:
    import comfy.model_sampling  # ComfyUI's own modules exist only inside a ComfyUI process
    import comfy.supported_models  # ComfyUI's own modules exist only inside a ComfyUI process

    config = comfy.supported_models.Flux({"image_model": "flux", "guidance_embed": True})

    class Base:  # what the wrapper reads from ComfyUI's BaseModel: its model_sampling (FLUX: shift 1.15, CONST)
        model_sampling = type("ModelSampling", (comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST),
                              {})(config)

    latent = side // 8
    mask = torch.zeros(1, side, side)
    mask[:, side // 2:, side // 2:] = 1
    context = core.CleanContext.from_pixel_mask(torch.randn(1, 16, latent, latent), mask)
    wrapper, result = node.ContextWrapper(context), node.ResultWrapper(context)
    executor = InstantExecutor(Base())
    sample = lambda *args, **kwargs: args[4]  # noqa: E731  (the sampler's output: the noise tensor it got)
    calls = {}
    for batch in (1, 2):
        x = torch.randn(batch, 16, latent, latent)
        sigma = torch.full((batch,), 0.6)
        options = {"cond_or_uncond": [0] * batch}
        calls[f"apply_model wrapper, batch {batch}"] = (
            lambda x=x, sigma=sigma, options=options: wrapper(executor, x, sigma, None, None, None, options))
    final = torch.randn(1, 16, latent, latent)
    calls["sampler_sample wrapper (once per sampling)"] = lambda: result(sample, None, None, {}, None, final)
    return interleaved_median_times(calls, repeats)


def block_costs(side: int) -> tuple[float, float]:
    torch.manual_seed(0)
    tokens, text = (side // 16) ** 2, 512
    dtype = torch.bfloat16
    double = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(dtype).eval()
    single = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(dtype).eval()
    ids = torch.zeros(text + tokens, 3)
    grid = torch.arange(side // 16)
    ids[text:, 1] = grid.repeat_interleave(side // 16).float()
    ids[text:, 2] = grid.repeat(side // 16).float()
    rotary = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    image = torch.randn(1, tokens, 3072, dtype=dtype)
    context = torch.randn(1, text, 3072, dtype=dtype)
    temb = torch.randn(1, 3072, dtype=dtype)
    with torch.no_grad():
        start = time.perf_counter()
        double(hidden_states=image, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)
        t_double = time.perf_counter() - start
        start = time.perf_counter()
        single(hidden_states=image, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)
        t_single = time.perf_counter() - start
    return t_double, t_single


def end_to_end(node, steps: int, repeats: int) -> dict[str, float]:
    """KSampler on the tiny test FLUX (tests/tiny_models.py), 64-px composite, with and without the node."""
    sys.path.insert(0, str(REPO / "tests"))
    import comfy.sample  # ComfyUI's own modules exist only inside a ComfyUI process
    # the tests' tiny-model builders (tests/ is put on sys.path at run time)
    from tiny_models import FLUX_COMFY, tiny_flux_pair

    _, patcher = tiny_flux_pair(sys.modules["comfy"], seed=0)
    latent = torch.randn(1, 16, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, 32:, 32:] = 1
    patched = node.EditTransferContext().apply(patcher, {"samples": latent}, mask)[0]
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 5, FLUX_COMFY["context_in_dim"], generator=gen),
             {"pooled_output": torch.randn(1, FLUX_COMFY["vec_in_dim"], generator=gen), "guidance": 1.0}]]
    noise = torch.randn(latent.shape, generator=gen)

    def run(model):
        return lambda: comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent,
                                           disable_pbar=True, seed=0)

    return interleaved_median_times({"KSampler, stock": run(patcher), "KSampler, with the node": run(patched)},
                                    repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512-px composite instead of 1024")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    side = 512 if args.quick else 1024
    node, core = load_comfy_and_pack()
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; composite "
          f"{side}x{side} px, latent [B, 16, {side // 8}, {side // 8}]")
    costs = node_costs(node, core, side, args.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: on a busy machine torch's thread pool can stall far longer than the op
    single_thread = node_costs(node, core, side, args.repeats)
    torch.set_num_threads(threads)
    t_double, t_single = block_costs(side)
    step = 19 * t_double + 38 * t_single
    print(f"FLUX.1-dev blocks (bfloat16, {(side // 16) ** 2} image + 512 text tokens): double {t_double:.2f} s, "
          f"single {t_single:.2f} s -> step >= {step:.1f} s (19 double + 38 single)")
    for name, seconds in costs.items():
        print(f"  {name:45s} {seconds * 1e3:8.3f} ms = {seconds / step:.2e} of a step ({100 * seconds / step:.5f} %)"
              f"; with 1 thread {single_thread[name] * 1e3:.3f} ms")
    timings = end_to_end(node, steps=8, repeats=max(5, args.repeats // 3))
    stock, ours = timings["KSampler, stock"], timings["KSampler, with the node"]
    print(f"tiny FLUX (hidden 32), KSampler 8 steps: stock {stock * 1e3:.1f} ms, with the node {ours * 1e3:.1f} ms "
          f"-> {ours / stock:.3f}x")
    worst = max(costs[f"apply_model wrapper, batch {b}"] for b in (1, 2)) / step
    print(f"goal <= 2 % of a step at FLUX shapes: {'met' if worst <= 0.02 else 'NOT met'} ({100 * worst:.5f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
