"""LoRA of Change training data and runs: MagicBrush parquet shards (a fixture with the hub's column layout), JSONL
and folder pairs with unreadable items, and ``python -m training.train_loc`` on the tiny preset (artifact, resume,
``--init-from``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analogy_core.files import read_safetensors
from analogy_core.loc import load_hypernetwork
from training.data.batching import ReadableItems
from training.data.pairs import FolderPairs, JsonlPairs, MagicBrush
from training.data.readers import DataError, ItemError
from training.loc.data import make_pair_dataset

pytestmark = pytest.mark.slow


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_magicbrush(root: Path, rows: dict[str, list[dict]], old_names: bool = False) -> None:
    """Shards as the hub distributes them: data/<split>-NNNNN-of-NNNNN-<hash>.parquet, images as {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    source, target = ("input_img", "output_img") if old_names else ("source_img", "target_img")
    schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), (source, image), ("mask_img", image),
                        ("instruction", pa.string()), (target, image)])
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        table = pa.table({
            "img_id": [str(i) for i in range(len(items))], "turn_index": [1] * len(items),
            source: [{"bytes": r["a"], "path": None} for r in items],
            "mask_img": [{"bytes": png_bytes((255, 255, 255)), "path": None} for _ in items],
            "instruction": [r["text"] for r in items],
            target: [{"bytes": r["b"], "path": None} for r in items]}, schema=schema)
        pq.write_table(table, root / "data" / f"{name}.parquet", row_group_size=2)


def test_magicbrush_shards_as_distributed(tmp_path):
    good = [{"a": png_bytes((10 * i, 0, 0)), "b": png_bytes((0, 10 * i, 0)), "text": f"edit {i}"} for i in range(5)]
    broken = dict(good[0], b=b"not an image")
    empty = dict(good[0], a=b"")
    write_magicbrush(tmp_path, {"train-00000-of-00002-abc": good[:3],
                                "train-00001-of-00002-def": [good[3], broken, empty, good[4]],
                                "dev-00000-of-00001-xyz": good[:1]})
    data = MagicBrush(tmp_path, 8)
    assert len(data) == 7 and len(data.row_groups) == 4, "two shards, row groups of 2 rows"
    item = data[6]
    assert item["prompt"] == "edit 4" and item["a"].shape == (8, 8, 3)
    assert torch.allclose(item["a"][0, 0], torch.tensor([40 / 255, 0, 0])) and item["a_prime"][0, 0, 1] > 0
    assert data[1]["prompt"] == "edit 1" and data[3]["prompt"] == "edit 3"
    with pytest.raises(ItemError, match=r"train-00001-of-00002-def.parquet row 1 of row group 0 \(target_img\): "
                                        "unreadable image"):
        data[4]
    with pytest.raises(ItemError, match="source_img holds no image bytes"):
        data[5]
    readable = ReadableItems(data)
    assert readable[4]["skipped"] == 2 and readable[5]["skipped"] == 1 and readable[5]["prompt"] == "edit 4"
    assert len(MagicBrush(tmp_path, 8, split="dev")) == 1
    assert len(make_pair_dataset(f"magicbrush:{tmp_path}", 8)) == 7


def test_magicbrush_early_column_names_and_wrong_files(tmp_path):
    rows = [{"a": png_bytes((200, 0, 0)), "b": png_bytes((0, 0, 200)), "text": "make it blue"}]
    write_magicbrush(tmp_path / "old", {"train-00000-of-00001": rows}, old_names=True)
    item = MagicBrush(tmp_path / "old", 8)[0]
    assert item["a"][0, 0, 0] > 0.7 and item["a_prime"][0, 0, 2] > 0.7 and item["prompt"] == "make it blue"
    with pytest.raises(DataError, match="no test-\\*.parquet shards"):
        MagicBrush(tmp_path / "old" / "data", 8, split="test")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "other" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other" / "data" / "train-0.parquet")
    with pytest.raises(DataError, match="no MagicBrush image columns"):
        MagicBrush(tmp_path / "other", 8)


def write_png(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), colour, dtype=np.uint8)).save(path)


def test_jsonl_and_folder_pairs(tmp_path):
    write_png(tmp_path / "img" / "a0.png", (255, 0, 0))
    write_png(tmp_path / "img" / "b0.png", (0, 0, 255))
    (tmp_path / "img" / "broken.png").write_bytes(b"junk")
    lines = [json.dumps({"a": "img/a0.png", "a_prime": "img/b0.png", "prompt": "make it blue"}), "not json",
             json.dumps({"a": "img/a0.png"}), json.dumps({"a": "img/broken.png", "a_prime": "img/b0.png"})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    pairs = JsonlPairs(tmp_path / "pairs.jsonl", 8)
    assert len(pairs) == 2 and pairs[0]["prompt"] == "make it blue" and pairs[0]["a"][0, 0, 0] > 0.99
    with pytest.raises(ItemError, match=r"pairs.jsonl:4 \(a\).*broken.png: unreadable image"):
        pairs[1]
    write_png(tmp_path / "folder" / "before" / "x.png", (0, 255, 0))
    write_png(tmp_path / "folder" / "after" / "x.png", (255, 255, 0))
    (tmp_path / "folder" / "after" / "x.txt").write_text("make it yellow\n")
    write_png(tmp_path / "folder" / "before" / "lonely.png", (0, 0, 0))
    folder = make_pair_dataset(f"pairs:{tmp_path / 'folder'}", 8)
    assert isinstance(folder, FolderPairs) and len(folder) == 1 and folder[0]["prompt"] == "make it yellow"
    with pytest.raises(ValueError, match="loc data must be one of .*magicbrush:<folder|file.parquet>"):
        make_pair_dataset("parquet:x", 8)


# -- runs -------------------------------------------------------------------------------------------------------------


def train(out: Path, *extra: str) -> dict:
    from training.train_loc import main  # the command users type: it registers the world data

    return main(["--preset", "tiny", "--output-dir", str(out), "--set", "report_to=none",
                 "--set", "sample_every=1000", "--set", "sample_steps=1", *extra])


@pytest.fixture(scope="module")
def run_of_three(tmp_path_factory):
    out = tmp_path_factory.mktemp("loc_run")
    history = train(out, "--max-steps", "3", "--set", "checkpoint_every=2")
    return out, history


def test_tiny_run_writes_a_loadable_hypernetwork(run_of_three):
    out, history = run_of_three
    assert len(history["losses"]) == 3 and all(np.isfinite(history["losses"]))
    hypernetwork = load_hypernetwork(out / "loc_hypernetwork.safetensors")
    assert hypernetwork.config.family == "sd15" and hypernetwork.config.rank == 2
    assert hypernetwork.config.encoder is not None and hypernetwork.config.token_count == 50
    trained_u_b = [view for name, view in hypernetwork.u_b_parameters() if "weight" in name]
    assert any(v.abs().max() > 0 for v in trained_u_b), "training moved U_B away from zero"
    tensors, meta = read_safetensors(out / "loc_hypernetwork.safetensors")
    assert meta["analogy.step"] == "3" and meta["analogy.backbone"] == "tiny"
    assert json.loads(meta["analogy.config"])["data"] == "world"


def test_resume_and_init_from(run_of_three, tmp_path):
    out, _ = run_of_three
    reference = read_safetensors(out / "loc_hypernetwork.safetensors")[0]
    resumed = tmp_path / "resumed"
    train(resumed, "--max-steps", "2")
    history = train(resumed, "--max-steps", "3", "--resume")
    assert history["start_step"] == 2
    for key, value in read_safetensors(resumed / "loc_hypernetwork.safetensors")[0].items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-7)
    # stage 2 starts from stage 1's weights (learning rate 0 keeps them, so the export equals the start)
    stage2 = tmp_path / "stage2"
    train(stage2, "--max-steps", "1", "--init-from", str(out / "loc_hypernetwork.safetensors"),
          "--set", "learning_rate=0")
    for key, value in read_safetensors(stage2 / "loc_hypernetwork.safetensors")[0].items():
        assert torch.equal(value, reference[key]), key
    with pytest.raises(Exception, match="does not match this run"):
        train(tmp_path / "bad", "--max-steps", "1", "--init-from", str(out / "loc_hypernetwork.safetensors"),
              "--set", "rank=3")
