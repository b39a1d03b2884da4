"""python -m training.train_lorweb on the tiny preset: it learns, writes a usable basis, resumes exactly, shards.

Each run is a subprocess (Accelerate keeps process-wide state), started from the repo root like a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analogy_core.lorweb.basis import load_basis
from training.data.analogies import Quads, Relation252K
from training.data.batching import StepBatchSampler
from training.data.readers import ItemError

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def train(out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training.train_lorweb", "--preset", "tiny", "--output-dir", str(out),
           "--set", "report_to=tensorboard", *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, TQDM_DISABLE="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses_from(log: str) -> tuple[float, float]:
    line = next(l for l in log.splitlines() if "loss" in l and "->" in l)
    start, end = line.rsplit("loss ", 1)[1].rstrip(")").split(" -> ")
    return float(start), float(end)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    result = train(out, "--max-steps", "80", "--set", "checkpoint_every=40", "--set", "sample_every=80")
    return out, result.stderr


def test_tiny_training_learns(tiny_run):
    out, log = tiny_run
    first, last = losses_from(log)
    assert last < 0.7 * first, (first, last)
    assert (out / "samples" / "step_000080.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard logs"
    state = json.loads((out / "checkpoints" / "step_000080" / "trainer_state.json").read_text())
    assert state["step"] == 80


def test_written_basis_loads_in_the_mix_path_and_separates_families(tiny_run):
    out, _ = tiny_run
    basis = load_basis(out / "lorweb_basis.safetensors")
    meta = basis.metadata
    assert meta["analogy.kind"] == "lorweb_basis" and meta["analogy.step"] == "80" and meta["analogy.backbone"] == "tiny"
    leaked = [k for k, v in meta.items() if str(out) in v or str(out.parent) in v]
    assert not leaked, f"local paths in the shared basis header: {leaked}"
    assert (basis.num_entries, basis.rank, basis.key_dim) == (8, 2, 16) and len(basis.layers) == 26
    from training.backbone import load_query_encoder
    from training.data.analogies import SyntheticAnalogies

    encoder, data = load_query_encoder("tiny"), SyntheticAnalogies(32)
    loras = {}
    for index in (1000, 1003):  # invert / hflip-family examples (index % 5 picks the family)
        item = data[index]
        query = encoder.encode(item["a"][None], item["a_prime"][None], item["b"][None]).query()
        loras[data.family(index)] = basis.mix(basis.coefficients(query))
    (fam_1, lora_1), (fam_2, lora_2) = loras.items()
    assert fam_1 != fam_2
    path = "transformer_blocks.0.attn.to_q"
    d1, d2 = lora_1.layers[path].delta_weight(), lora_2.layers[path].delta_weight()
    assert d1.abs().max() > 0, "trained B is no longer zero"
    # Measured on the tiny preset after 80 steps: about 7e-4 (its random tiny CLIP separates analogies only weakly;
    # see the README). The point here is that the query really routes: different analogies, different LoRAs.
    assert (d1 - d2).norm() / d1.norm() > 1e-4, "analogies of different families mix different LoRAs"


def test_killed_run_resumes_exactly(tmp_path):
    """Kill a run after its first checkpoint, resume it, and end where an uninterrupted run ends."""
    steps = ["--max-steps", "24", "--set", "checkpoint_every=8", "--set", "sample_every=1000"]
    reference = tmp_path / "reference"
    train(reference, *steps)

    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "training.train_lorweb", "--preset", "tiny", "--output-dir", str(crashed), *steps]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, TQDM_DISABLE="1"))
    deadline = time.monotonic() + 300
    while not (crashed / "checkpoints" / "step_000008").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = sorted(p.name for p in (crashed / "checkpoints").glob("step_*"))
    assert kept and kept[-1] != "step_000024", "killed before the end"

    resumed = train(crashed, *steps, "--resume")
    assert "resumed from" in resumed.stderr
    a = load_basis(reference / "lorweb_basis.safetensors")
    b = load_basis(crashed / "lorweb_basis.safetensors")
    assert b.metadata["analogy.step"] == "24"
    for name, layer in a.layers.items():
        torch.testing.assert_close(b.layers[name].B, layer.B, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.layers[name].keys, layer.keys, rtol=1e-5, atol=1e-7)


def test_two_process_run_keeps_ranks_identical(tmp_path):
    """Two CPU processes (gloo): DDP must keep both ranks' bases identical; the trainer checks checksums."""
    out = tmp_path / "ddp"
    from devtools.comfy_server import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "training.train_lorweb", "--preset", "tiny", "--output-dir", str(out), "--max-steps", "4",
           "--set", "checkpoint_every=2", "--set", "sample_every=1000", "--set", "batch_size=2"]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    for step in (2, 4):
        state = json.loads((out / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text())
        assert state["num_processes"] == 2
        assert state["param_checksums"][0] == state["param_checksums"][1]
    assert load_basis(out / "lorweb_basis.safetensors").metadata["analogy.step"] == "4"


# -- data ---------------------------------------------------------------------------------------------------------


def test_relation252k_layout_gives_all_pairs(tmp_path):
    group = tmp_path / "style_transfer" / "Group1"
    group.mkdir(parents=True)
    entries = []
    for i in range(3):
        pair = np.zeros((40, 80, 3), dtype=np.uint8)
        pair[:, :40] = 40 * i
        pair[:, 40:] = 200 - 40 * i
        Image.fromarray(pair).save(group / f"{i}.png")
        entries.append({"img_name": f"{i}.png", "left_image_description": "x", "right_image_description": "y",
                        "edit_instruction": f"edit {i}"})
    (group / "labels.json").write_text(json.dumps(entries))
    data = Relation252K(tmp_path, 16)
    assert len(data) == 3  # (0,1), (0,2), (1,2)
    item = data[2]
    # the official caption of pair (i, j) = (1, 2) is image i's instruction: it describes a -> a'
    assert item["a"].shape == (16, 16, 3) and item["prompt"] == "edit 1"
    assert Relation252K(tmp_path, 16, caption_source="b")[2]["prompt"] == "edit 2"
    assert torch.allclose(item["a"], torch.full_like(item["a"], 40 / 255))
    assert torch.allclose(item["b_prime"], torch.full_like(item["b"], 120 / 255))


def test_corrupt_and_missing_images_are_skipped_not_fatal(tmp_path):
    from training.make_synthetic_dataset import write_dataset

    index = write_dataset(tmp_path / "quads", per_family=2, size=32, families=["invert", "hflip"])
    records = [json.loads(l) for l in index.read_text().splitlines()]
    (tmp_path / "quads" / records[0]["b"]).write_bytes(b"not a png")
    (tmp_path / "quads" / records[1]["a"]).unlink()
    data = Quads(index, 32)
    for broken in (0, 1):
        with pytest.raises(ItemError, match=r"quads.jsonl:\d+ \((b|a)\)"):
            data[broken]
    assert data[2]["a"].shape == (32, 32, 3)
    result = train(tmp_path / "run", "--max-steps", "3", "--set", f"data=quads:{index}", "--set", "batch_size=4",
                   "--set", "sample_every=1000", "--set", "checkpoint_every=1000")
    assert "skipped" in result.stderr and "unreadable items" in result.stderr


def test_batches_are_a_pure_function_of_step_and_rank():
    a = StepBatchSampler(10, 3, seed=1, rank=0, world=2)
    b = StepBatchSampler(10, 3, seed=1, rank=1, world=2)
    first = [a.batch(k) for k in range(5)] + [b.batch(k) for k in range(5)]
    resumed = StepBatchSampler(10, 3, seed=1, rank=0, world=2, start=3)
    assert next(iter(resumed)) == a.batch(3)
    epoch0 = sorted(a.batch(0) + b.batch(0) + a.batch(1) + [b.batch(1)[0]])
    assert epoch0 == list(range(10)), "one epoch visits every item once across ranks"
    assert first == [a.batch(k) for k in range(5)] + [b.batch(k) for k in range(5)]


def test_official_style_settings_run(tmp_path):
    """bf16 autocast, gradient checkpointing and accumulation (the official switches) on the tiny backbone."""
    out = tmp_path / "official"
    train(out, "--max-steps", "2", "--set", "gradient_checkpointing=true", "--set", "mixed_precision=bf16",
          "--set", "gradient_accumulation_steps=2", "--set", "sample_every=2", "--set", "checkpoint_every=2")
    assert (out / "samples" / "step_000002.png").is_file()
    assert load_basis(out / "lorweb_basis.safetensors").metadata["analogy.step"] == "2"


def test_open_clip_query_encoder_trains(tmp_path):
    """query_encoder = open_clip:<config.json>:<weights.safetensors> (a random tiny open_clip tower)."""
    import open_clip
    from safetensors.torch import save_file

    config = tmp_path / "tiny-open-clip.json"
    config.write_text(json.dumps({
        "embed_dim": 24, "quick_gelu": True,
        "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config)
    weights = tmp_path / "visual.safetensors"
    visual = open_clip.create_model("tiny-open-clip", pretrained=None).visual.state_dict()
    save_file({k: v.contiguous() for k, v in visual.items()}, weights)
    out = tmp_path / "run"
    train(out, "--max-steps", "2", "--set", f"query_encoder=open_clip:{config}:{weights}",
          "--set", "sample_every=2", "--set", "checkpoint_every=2")
    basis = load_basis(out / "lorweb_basis.safetensors")
    assert basis.query_dim == 3 * 24
    assert "embed 24, width 32, 2 layers, patch 14, 56px" in basis.metadata["analogy.encoder"]


def test_trained_file_goes_through_the_nodes(tiny_run, comfy_inproc, monkeypatch):
    """Load LoRA Basis -> Mix LoRA Basis (the node classes) on the trained file, with the trainer's query encoder."""
    out, _ = tiny_run
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    monkeypatch.setattr(lorweb.folder_paths, "get_full_path",
                        lambda folder, name: str(out / name) if folder == "lorweb" else None)
    basis, info = lorweb.LoadLoRABasis().load("lorweb_basis.safetensors")
    assert "N=8 entries of rank 2" in info and "records its training encoder's fingerprint" in info
    from training.backbone import load_query_encoder
    from training.data.analogies import SyntheticAnalogies

    item = SyntheticAnalogies(32)[7]
    analogy = load_query_encoder("tiny").encode(item["a"][None], item["a_prime"][None], item["b"][None])
    lora, heat, text = lorweb.MixLoRABasis().mix(basis, analogy, 1.0, 0)
    assert lora.ranks == {16} and len(lora) == 26 and heat.shape[1:] == (52, 128, 3)
    assert "encoder weights not checked (the ANALOGY carries no encoder fingerprint)" in text


def test_mixing_checks_the_query_encoders_weights(tiny_run):
    """The trainer records its query encoder's fingerprint; an ANALOGY from the same weights mixes, one from the
    same architecture with other weights (OpenAI's CLIP ViT-L/14 against LAION's) is refused, not mixed."""
    import dataclasses

    from analogy_core.fingerprint import EncoderMismatch
    from analogy_core.lorweb.mix import mix_analogy
    from training.backbone import load_query_encoder
    from training.data.analogies import SyntheticAnalogies

    out, _ = tiny_run
    basis = load_basis(out / "lorweb_basis.safetensors")
    item = SyntheticAnalogies(32)[7]
    trained, other = load_query_encoder("tiny", seed=0), load_query_encoder("tiny", seed=1)
    assert trained.info == other.info  # one architecture: the identity alone cannot tell them apart
    analogy = trained.encode(item["a"][None], item["a_prime"][None], item["b"][None])
    result = mix_analogy(basis, dataclasses.replace(analogy, fingerprint=trained.fingerprint()))
    assert "encoder weights match the training encoder (fingerprint distance 0.000)" in result.report
    foreign = other.encode(item["a"][None], item["a_prime"][None], item["b"][None])
    with pytest.raises(EncoderMismatch, match="the ANALOGY's encoder .* is not the encoder this basis was trained"):
        mix_analogy(basis, dataclasses.replace(foreign, fingerprint=other.fingerprint()))
    with pytest.raises(EncoderMismatch, match="analogy_2's encoder"):
        mix_analogy(basis, dataclasses.replace(analogy, fingerprint=trained.fingerprint()),
                    analogy_2=dataclasses.replace(foreign, fingerprint=other.fingerprint()))
