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

from training.data.batching import ReadableItems, collate


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
                                                  {"edit_instruction": "no image name"}]))
    broken = tmp_path / "broken" / "Group1"
    broken.mkdir(parents=True)
    (broken / "labels.json").write_text("{oops")
    with caplog.at_level(logging.WARNING):
        data = Relation252K(tmp_path, 8)
    assert "labels.json unreadable" in caplog.text and len(data) == 3
    with pytest.raises(ItemError, match="too narrow"):
        data[0]
    with pytest.raises(ItemError, match="without a string img_name"):
        data[1]
