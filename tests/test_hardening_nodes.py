"""Issue 10's smaller items: Extract Panel on thin letterboxed B, half-precision and non-finite IMAGE input, the
composite's memory guard, file modes of saved LoRAs/bases, and Save LoRA's file names."""

from __future__ import annotations

import importlib
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from analogy_core import composite as cp
from analogy_core.lorweb.basis import random_basis
from analogy_core.layouts import flux_layout
from analogy_core.lora import LoRA, LoRAError, LoRALayer
from analogy_core.lora_io import load_lora_file, save_lora_file
from tiny_models import FLUX_DIFFUSERS

REPO = Path(__file__).resolve().parent.parent


def solid(color, width, height, batch=1):
    return torch.tensor(color, dtype=torch.float32).expand(batch, height, width, 3).clone()


# -- Extract Panel: restore_size -----------------------------------------------------------------------------------


def test_restore_size_on_a_thin_letterboxed_b_from_a_smaller_decode():
    a = solid([0.9, 0.9, 0.9], 256, 256)
    b = solid([0.1, 0.8, 0.3], 1000, 2)  # letterboxed into a 256x256 panel it is 1 pixel tall
    grid, _, geometry = cp.four_panel_composite(a, a, b, fit="pad", fill=0.5)
    box = geometry.boxes["b"]
    assert (box.panel_h, box.source_w, box.source_h) == (1, 1000, 2)
    same = cp.extract_panel(grid, "bottom_right", geometry, restore_size=True)
    assert same.shape == (1, 2, 1000, 3)
    torch.testing.assert_close(same, b, atol=2e-3, rtol=0)  # from a full-size result B comes back
    decoded = cp.resize(grid, 128, 128)  # a 4x smaller decode: B's strip rounds to zero rows without the fix
    small = cp.extract_panel(decoded, "bottom_right", geometry, restore_size=True)
    assert small.shape == (1, 2, 1000, 3) and torch.isfinite(small).all()
    # the row taken is the (blurred) strip, not pure fill grey (exactly 0.5): pulled towards B's red 0.1, green 0.8
    assert small[..., 0].max() < 0.49 and small[..., 1].min() > 0.51


# -- dtypes and non-finite pixels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_composite_and_extract(dtype):
    gen = torch.Generator().manual_seed(0)
    a, ap, b = (torch.rand(1, 30, 50, 3, generator=gen).to(dtype) for _ in range(3))
    half = cp.four_panel_composite(a, ap, b, panel_size=(40, 24), fit="pad")
    full = cp.four_panel_composite(a.float(), ap.float(), b.float(), panel_size=(40, 24), fit="pad")
    assert half[0].dtype == torch.float32 and half[0].std() > 0.1  # resized, real content
    assert torch.equal(half[0], full[0]) and half[2] == full[2]
    restored = cp.extract_panel(half[0].to(dtype), "bottom_right", half[2], restore_size=True)
    reference = cp.extract_panel(half[0].to(dtype).float(), "bottom_right", half[2], restore_size=True)
    assert restored.shape == (1, 30, 50, 3) and torch.equal(restored, reference)


def test_non_finite_and_out_of_range_pixels_are_sanitised(caplog):
    a = torch.full((1, 4, 4, 3), 0.25)
    a[0, 0, 0, 0], a[0, 0, 1, 0], a[0, 0, 2, 0] = float("nan"), float("inf"), float("-inf")
    a[0, 0, 3, 0], a[0, 1, 0, 0] = 2.0, -1.0
    with caplog.at_level(logging.WARNING):
        grid, _, _ = cp.four_panel_composite(a, a, a)  # same size: no resize, the pixels are copied
    assert torch.isfinite(grid).all() and grid.min() >= 0 and grid.max() <= 1
    assert grid[0, 0, :4, 0].tolist() == [0.0, 1.0, 0.0, 1.0] and grid[0, 1, 0, 0] == 0.0
    assert grid[0, 2, 2, 1] == 0.25  # everything else is untouched
    assert "3 NaN/Inf pixel values replaced" in caplog.text
    panel = cp.extract_panel(a, "top_left")
    assert torch.isfinite(panel).all() and panel[0, 0, 0, 0] == 0.0


# -- memory guard -----------------------------------------------------------------------------------------------------


def test_composite_refuses_sizes_beyond_the_memory_limit_before_allocating():
    tiny = torch.rand(3, 8, 8, 3)
    with pytest.raises(cp.CompositeError, match=r"8192x8192 composite of 3 image\(s\) would need about 4.7 GB.*4 GB "
                                                r"limit; use a smaller panel size"):
        cp.four_panel_composite(tiny, tiny, tiny, panel_size=(4096, 4096))
    cp.check_composite_size(1, 4096, 4096)  # one item at the node's maximum panel is allowed (~1.6 GB)
    with pytest.raises(cp.CompositeError, match="would need about"):
        huge_a = torch.rand(1, 1, 1, 3).expand(1, 30000, 30000, 3)  # a view: no memory, no pixel read
        cp.four_panel_composite(huge_a, tiny[:1], tiny[:1], panel_size=None)  # panels take A's size
    assert cp.four_panel_composite(tiny, tiny, tiny, panel_size=(64, 64))[0].shape == (3, 128, 128, 3)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak-RSS reset needs Linux /proc")
def test_the_memory_estimate_covers_the_measured_peak():
    """Peak RSS growth of a fresh process building a 1024x1024-panel composite (the worst fit, pad) stays within the
    documented estimate, and the estimate is not wildly pessimistic. The peak is reset just before the composite
    (/proc/self/clear_refs), so import-time peaks do not hide it."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        torch.set_num_threads(1)
        from analogy_core.composite import four_panel_composite

        def status(field):
            with open("/proc/self/status") as f:
                return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024

        images = [torch.rand(1, 1500, 1000, 3) for _ in range(3)]
        four_panel_composite(*[i[:, :64, :64] for i in images], panel_size=(64, 64), fit="pad")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status("VmRSS:")
        out = four_panel_composite(*images, panel_size=(1024, 1024), fit="pad", layout="edit_transfer")
        print(status("VmHWM:") - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    estimate = cp.composite_bytes(1, 1024, 1024)
    assert 0.5 * estimate < grown <= 1.1 * estimate, (grown, estimate)


def test_node_panel_maximum(comfy_inproc):
    node = importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.composite").FourPanelComposite
    required = node.INPUT_TYPES()["required"]
    assert required["width"][1]["max"] == required["height"][1]["max"] == 4096
    cp.check_composite_size(1, 4096, 4096)


def test_node_custom_panel_size_is_width_by_height(comfy_inproc):
    node = importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.composite").FourPanelComposite()
    a = solid([0.2, 0.4, 0.6], 40, 40)
    composite, mask, geometry = node.compose(a, a, a, "edit_transfer", "custom", 48, 24, "stretch", "none", 0.5)
    assert (geometry.panel_width, geometry.panel_height) == (48, 24)
    assert composite.shape == (1, 48, 96, 3) and mask.shape == (1, 48, 96)  # two panels high, two wide
    assert mask[0, 24:, 48:].min() == 1 and mask[0, :24].max() == 0  # the blank panel is the bottom-right one
    assert composite[0, 24:, 48:].unique().tolist() == [0.5]
    # the fill widget sets the blank panel's grey (and the letterbox's)
    grey = node.compose(a, a, a, "edit_transfer", "custom", 48, 24, "pad", "none", 0.25)[0]
    assert grey[0, 24:, 48:].unique().tolist() == [0.25]
    assert grey[0, 0, 0].tolist() == [0.25] * 3 and grey[0, 12, 24].tolist() == pytest.approx([0.2, 0.4, 0.6])


# -- saved files: permissions and names --------------------------------------------------------------------------------


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def small_lora() -> LoRA:
    gen = torch.Generator().manual_seed(1)
    return LoRA({"transformer_blocks.0.attn.to_q": LoRALayer(torch.randn(2, 32, generator=gen) * 0.1,
                                                             torch.randn(32, 2, generator=gen) * 0.1)},
                family="flux")


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_loras_and_bases_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    lora_path = save_lora_file(small_lora(), tmp_path / "lora.safetensors", "peft")
    basis_path = random_basis({"transformer_blocks.0.attn.to_q": (32, 32)}, num_entries=2, rank=2, key_dim=4,
                              query_dim=6).save(tmp_path / "basis.safetensors")
    for path in (lora_path, basis_path):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_save_lora_names(tmp_path, comfy_inproc, monkeypatch):
    nodes = comfy_inproc.nodes
    LoRAError = comfy_inproc.lora.LoRAError  # the class of the pack as ComfyUI imports it  # noqa: N806
    root = tmp_path.resolve()
    long_name = "n" * 230
    path = nodes.safe_lora_path(root, f"deep/{long_name}", overwrite=False)
    assert path.name == f"{long_name}_00001.safetensors"
    saved = save_lora_file(small_lora(), path, "peft")  # the temporary file's name fits too
    assert len(saved.name) == 248 and load_lora_file(saved, flux_layout(**FLUX_DIFFUSERS)).lora.layers
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    with pytest.raises(LoRAError, match="is 240 bytes long; at most 237 fit in a file name"):
        nodes.safe_lora_path(root, "n" * 240, overwrite=False)
    # the suffix counts against the file's name only: a long file name in a folder is refused, a long folder is not
    with pytest.raises(LoRAError, match="is 240 bytes long; at most 237 fit in a file name"):
        nodes.safe_lora_path(root, "dir/" + "n" * 240, overwrite=False)
    assert nodes.safe_lora_path(root, "f" * 250 + "/x", overwrite=False) == root / ("f" * 250) / "x_00001.safetensors"
    assert nodes.safe_lora_path(root, "n" * 243, overwrite=True).name == "n" * 243 + ".safetensors"

    for escape in ("a/ .. /x", "a/..  /x", "../x", " .. ", "a/.../x"):
        with pytest.raises(LoRAError, match="must be a relative name inside models/loras"):
            nodes.safe_lora_path(root, escape, overwrite=False)
    assert nodes.safe_lora_path(root, "a/ . /x. ", overwrite=True) == root / "a" / "x.safetensors"
    with pytest.raises(LoRAError, match="filename_prefix is empty"):
        nodes.safe_lora_path(root, " / ", overwrite=True)

    import folder_paths  # through the node itself, as a workflow saves it

    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: [str(root)])
    result = nodes.SaveLoRA().save(small_lora(), "node/" + long_name, "auto", False)
    assert result["result"] == (f"node/{long_name}_00001.safetensors",) and (root / result["result"][0]).is_file()
