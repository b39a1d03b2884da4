"""Training data readers: every kind of unreadable item is skipped with its file (and line) named, batches never come
out empty, and a dataset with too few readable items is refused before training starts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.readers import DataError, ItemError, load_rgb, to_panel

from training.data.analogies import Quads, Relation252K
from training.data.pairs import JsonlPairs
from training.regions.data import GroupedPairs, InstructionJsonl

from training.data.batching import ReadableItems, StepBatchSampler, collate


def write_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def quads(tmp_path):
    """A quads folder with 6 good records; returns (folder, write_index(lines))."""
    for i in range(4):
        write_png(tmp_path / f"{i}.png", np.full((20, 24, 3), 40 * i))
    good = {"a": "0.png", "a_prime": "1.png", "b": "2.png", "b_prime": "3.png", "prompt": "p"}

    def write_index(lines):
        index = tmp_path / "quads.jsonl"
        index.write_text("\n".join(lines) + "\n")
        return index

    return tmp_path, good, write_index


def test_load_rgb_turns_every_failure_into_an_item_error(tmp_path, monkeypatch):
    write_png(tmp_path / "thin.png", np.zeros((30, 1, 3)))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_png(tmp_path / "big.png", np.zeros((64, 64, 3)))
    with pytest.raises(ItemError, match="smaller than 8 px"):
        load_rgb(tmp_path / "thin.png")
    # the limit's boundary: 8 px is the smallest side read, 7 px is refused
    write_png(tmp_path / "eight.png", np.zeros((8, 30, 3)))
    write_png(tmp_path / "seven.png", np.zeros((30, 7, 3)))
    assert load_rgb(tmp_path / "eight.png").shape == (8, 30, 3)
    with pytest.raises(ItemError, match="7x30 px is smaller than 8 px"):
        load_rgb(tmp_path / "seven.png")
    with pytest.raises(ItemError, match="unreadable image"):
        load_rgb(tmp_path / "junk.png")
    with pytest.raises(ItemError, match="unreadable image"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(ItemError, match="must be a string"):
        load_rgb(17)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 > 2 x 100: PIL's DecompressionBombError
    with pytest.raises(ItemError, match="decompression bomb"):
        load_rgb(tmp_path / "big.png")


def test_panels_stretch_by_default_or_crop(tmp_path):
    image = torch.zeros(10, 20, 3)
    image[:, :5] = 1.0  # a white left quarter
    stretched, cropped = to_panel(image, 8, "stretch"), to_panel(image, 8, "center_crop")
    assert stretched.shape == cropped.shape == (8, 8, 3)
    assert stretched[:, 0].min() > 0.9, "stretch keeps the whole width (the official panels)"
    assert cropped[:, 0].max() < 0.1, "center_crop cuts the left quarter away"


def test_bad_jsonl_lines_are_skipped_with_file_and_line(quads, caplog):
    folder, good, write_index = quads
    lines = [json.dumps(good), "{not json", json.dumps([1, 2]), json.dumps({**good, "b": 5}),
             json.dumps({"a": "0.png"}), "", json.dumps(good)]
    with caplog.at_level(logging.WARNING):
        data = Quads(write_index(lines), 16)
    assert len(data) == 2 and data.bad_lines == 4
    for number, reason in ((2, "not JSON"), (3, "JSON object"), (4, "must be strings"), (5, "lacks")):
        assert f"quads.jsonl:{number}: " in caplog.text and reason in caplog.text


def test_quads_without_one_usable_record_are_refused(quads):
    _, _, write_index = quads
    with pytest.raises(DataError, match="no usable record"):
        Quads(write_index(["{bad", "[]"]), 16)


def test_unreadable_items_are_passed_over_and_batches_never_empty(quads, caplog):
    folder, good, write_index = quads
    broken = {**good, "b": "missing.png"}
    data = Quads(write_index([json.dumps(broken)] * 3 + [json.dumps(good)] * 2), 16)
    items = ReadableItems(data)
    with caplog.at_level(logging.WARNING):
        first = items[0]
    assert first["skipped"] == 3 and first["a"].shape == (16, 16, 3)
    assert "quads.jsonl:1 (b)" in caplog.text
    samples = items.first_items(4)  # the first items are all unreadable: sample grids still get readable ones
    assert len(samples) == 2 and all("a" in s for s in samples)
    batch = collate([items[i] for i in range(5)])
    assert batch["a"].shape[0] == 5 and batch["skipped"] == 3 + 2 + 1 + 0 + 0


def test_mostly_unreadable_dataset_is_refused_up_front(quads):
    folder, good, write_index = quads
    broken = {**good, "a_prime": "missing.png"}
    data = Quads(write_index([json.dumps(broken)] * 9 + [json.dumps(good)]), 16)
    with pytest.raises(DataError, match="1 of 10 probed items are readable"):
        ReadableItems(data).probe()


def test_relation252k_skips_broken_tasks_and_entries(tmp_path, caplog):
    good = tmp_path / "good" / "Group1"
    good.mkdir(parents=True)
    write_png(good / "0.png", np.zeros((16, 32, 3)))
    write_png(good / "1.png", np.full((16, 12, 3), 255))  # halves of 6 px: no usable before|after pair
    (good / "labels.json").write_text(json.dumps([{"img_name": "0.png", "edit_instruction": "e0"},
                                                  {"img_name": "1.png", "edit_instruction": "e1"},
                                                  {"edit_instruction": "no image name"}, "not an object", 7]))
    broken = tmp_path / "broken" / "Group1"
    broken.mkdir(parents=True)
    (broken / "labels.json").write_text("{oops")
    with caplog.at_level(logging.WARNING):
        data = Relation252K(tmp_path, 8)
    assert "labels.json unreadable" in caplog.text and len(data) == 3
    # counted where the probe and the closing line read them: the broken file once, each non-object entry once
    assert data.bad_lines == 3 and ReadableItems(data).bad_lines == 3
    assert "2 labels.json entries are not objects" in caplog.text
    with pytest.raises(ItemError, match="too narrow"):
        data[0]
    with pytest.raises(ItemError, match="without a string img_name"):
        data[1]


# -- bad lines of every JSONL reader are skipped and counted (issue 19: a nested line used to stop every trainer with
# a RecursionError, one non-UTF-8 byte used to refuse the whole file) ------------------------------------------------

NESTED = "[" * 100_000 + "]" * 100_000  # deeper than json's recursion limit


def jsonl_readers(folder):
    """(name, good record, open(index)) for every JSONL reader of the training package."""
    for i in range(2):
        write_png(folder / f"{i}.png", np.full((20, 24, 3), 90 * i))
    quad = {"a": "0.png", "a_prime": "1.png", "b": "0.png", "b_prime": "1.png", "prompt": "p"}
    text = {"image": "0.png", "instruction": "i", "source_caption": "s", "target_caption": "t"}
    return [("quads", quad, lambda index: Quads(index, 16)),
            ("pairs", {"a": "0.png", "a_prime": "1.png"}, lambda index: JsonlPairs(index, 16)),
            ("region text", text, lambda index: InstructionJsonl(index, 16, need_edited=False)),
            ("region pairs", {"a": "0.png", "a_prime": "1.png", "group": "g"}, lambda index: GroupedPairs(index, 16))]


@pytest.mark.parametrize("which", range(4))
def test_nested_and_non_utf8_lines_are_skipped_and_counted(tmp_path, which, caplog):
    name, good, open_index = jsonl_readers(tmp_path)[which]
    index = tmp_path / "index.jsonl"
    index.write_bytes(b"\n".join([json.dumps(good).encode(), NESTED.encode(), b'{"a": "\xff\xfe.png"}',
                                  json.dumps(good).encode(), b""]))
    with caplog.at_level(logging.WARNING):
        data = open_index(index)
    assert len(data) == 2 and data.bad_lines == 2, name
    assert "index.jsonl:2: JSON nested too deeply" in caplog.text
    assert "index.jsonl:3: not UTF-8 text (byte 7 of the line)" in caplog.text
    assert data[1] is not None  # the lines after the bad ones are read


def test_a_nested_relation252k_labels_file_skips_its_task(tmp_path, caplog):
    for task, labels in (("good", [{"img_name": "x.png", "edit_instruction": "e"}] * 2), ("deep", None)):
        folder = tmp_path / task / "Group1"
        folder.mkdir(parents=True)
        write_png(folder / "x.png", np.zeros((16, 32, 3)))
        (folder / "labels.json").write_text(json.dumps(labels) if labels else NESTED)
    with caplog.at_level(logging.WARNING):
        data = Relation252K(tmp_path, 8)
    assert len(data) == 1 and "nested too deeply" in caplog.text and "deep" in caplog.text
    assert data.bad_lines == 1


def test_the_pre_training_check_logs_what_it_found(quads, caplog):
    folder, good, write_index = quads
    index = write_index([json.dumps(good), json.dumps({**good, "a": "missing.png"}), json.dumps(good), "{bad"])
    with caplog.at_level(logging.INFO):
        errors = ReadableItems(Quads(index, 16)).probe()
    assert len(errors) == 1
    assert "data check: 1 of 3 probed items unreadable" in caplog.text and "missing.png" in caplog.text
    assert "1 bad index lines skipped" in caplog.text


def test_the_ranks_micro_batches_tile_the_one_process_stream():
    """Micro-batch k of W processes of batch B is micro-batch k of one process of batch W x B, cut in rank order:
    no rank repeats another's items and the data order does not depend on the process count."""
    size, batch, world = 50, 3, 4
    single = StepBatchSampler(size, batch * world, seed=5)
    ranks = [StepBatchSampler(size, batch, seed=5, rank=r, world=world) for r in range(world)]
    for k in range(12):  # 144 positions: across two epoch boundaries
        assert sum((s.batch(k) for s in ranks), []) == single.batch(k), k
    drawn = [i for k in range(4) for s in ranks for i in s.batch(k)]  # 48 of the first epoch's 50
    assert len(drawn) == len(set(drawn)) == 48
    resumed = StepBatchSampler(size, batch, seed=5, rank=2, world=world, start=7)
    assert next(iter(resumed)) == ranks[2].batch(7)


def test_the_synthetic_dataset_writes_b_from_another_scene_edited_as_a(tmp_path):
    """``make_synthetic_dataset``: each quad's B is another scene than A, and A′, B′ are A, B with the family's edit
    (here invert: 1 − x, exact up to the PNG's 8 bits)."""
    from training.make_synthetic_dataset import write_dataset

    index = write_dataset(tmp_path / "quads", per_family=2, size=16, families=["invert"])
    for line in index.read_text().splitlines():
        record = json.loads(line)
        quad = {role: np.asarray(Image.open(index.parent / record[role]), dtype=np.float32) / 255
                for role in ("a", "a_prime", "b", "b_prime")}
        assert np.abs(quad["a"] - quad["b"]).mean() > 0.05, "B is a scene of its own"
        assert np.abs(quad["a_prime"] - (1 - quad["a"])).max() <= 1 / 255 + 1e-6
        assert np.abs(quad["b_prime"] - (1 - quad["b"])).max() <= 1 / 255 + 1e-6


def test_half_readable_data_passes_the_probe_and_less_than_half_is_refused(quads):
    """The probe's limit is "at least half readable": 5 of 10 passes, 4 of 10 is refused."""
    folder, good, write_index = quads
    broken = {**good, "a_prime": "missing.png"}
    half = Quads(write_index([json.dumps(broken), json.dumps(good)] * 5), 16)
    assert len(ReadableItems(half).probe()) == 5
    fewer = Quads(write_index([json.dumps(broken)] * 6 + [json.dumps(good)] * 4), 16)
    with pytest.raises(DataError, match="4 of 10 probed items are readable"):
        ReadableItems(fewer).probe()


def test_a_quads_prompt_of_another_type_is_kept_as_text(quads):
    """A prompt written as a number (or any JSON value) is the text of that value, never dropped."""
    folder, good, write_index = quads
    data = Quads(write_index([json.dumps({**good, "prompt": 42}), json.dumps({**good, "prompt": ["red", 1]})]), 16)
    assert data[0]["prompt"] == "42" and data[1]["prompt"] == "['red', 1]"


def test_a_relation252k_pair_of_odd_width_splits_into_two_equal_halves(tmp_path):
    """An image 2w + 1 px wide is before | after of w px each (the odd column dropped), so both halves are scaled
    alike: the after half is its own w px, not w + 1."""
    group = tmp_path / "g" / "Group1"
    group.mkdir(parents=True)
    image = np.zeros((16, 33, 3))
    image[:, 16:32] = 255
    image[:, 32] = 0          # the odd last column, dark: read into the after half it would darken its edge
    write_png(group / "0.png", image)
    (group / "labels.json").write_text(json.dumps([{"img_name": "0.png", "edit_instruction": "e"}] * 2))
    item = Relation252K(tmp_path, 16, fit="stretch")[0]
    assert torch.equal(item["a"], torch.zeros(16, 16, 3)) and torch.equal(item["a_prime"], torch.ones(16, 16, 3))


def test_jsonl_pairs_read_instruction_as_the_prompt_where_there_is_none(tmp_path):
    """MagicBrush-style lines give their text as "instruction": that is the prompt unless "prompt" is there."""
    for i in range(2):
        write_png(tmp_path / f"{i}.png", np.full((16, 16, 3), 90 * i))
    index = tmp_path / "pairs.jsonl"
    lines = [{"a": "0.png", "a_prime": "1.png", "instruction": "make it grey"},
             {"a": "0.png", "a_prime": "1.png", "instruction": "x", "prompt": "the prompt"}]
    index.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = JsonlPairs(index, 16)
    assert data[0]["prompt"] == "make it grey" and data[1]["prompt"] == "the prompt"


def test_the_synthetic_dataset_draws_new_scenes_for_every_quad(tmp_path):
    """No scene is used twice in a family: quad i's B is not quad i + 1's A."""
    from training.make_synthetic_dataset import write_dataset

    index = write_dataset(tmp_path / "quads", per_family=3, size=16, families=["invert"])
    images = [np.asarray(Image.open(index.parent / json.loads(line)[role]), dtype=np.float32)
              for line in index.read_text().splitlines() for role in ("a", "b")]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 1, (i, j)
