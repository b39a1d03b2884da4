"""The one registry of training-data sources and of model specs: every trainer reads the same kinds through it,
refusals name what was expected, and the analogy world plugs in from above (registered on import) with the items
each trainer drew before the registry existed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import training.world  # noqa: F401  (registers the world's data source and model specs)
from training.data.readers import DataError
from training.data.sources import PAIR_ROLES, Request, Source, open_source, register, sources_for
from training.edit_transfer.data import make_edit_transfer_dataset
from training.loc.data import make_pair_dataset
from training.lorweb.data import make_dataset
from training.model_specs import register_loader, registered_loader
from training.regions.data import make_region_dataset
from training.world import scenes


def write_quads(folder) -> str:
    for i in range(4):
        Image.fromarray(np.full((12, 12, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    record = {"a": "0.png", "a_prime": "1.png", "b": "2.png", "b_prime": "3.png", "prompt": "p"}
    (folder / "quads.jsonl").write_text(json.dumps(record) + "\n")
    return f"quads:{folder / 'quads.jsonl'}"


def test_every_trainer_reads_a_shared_kind_through_the_registry(tmp_path):
    spec = write_quads(tmp_path)
    quad = make_dataset(spec, 8)[0]
    assert set(quad) >= {"a", "a_prime", "b", "b_prime", "prompt"} and quad["a"].shape == (8, 8, 3)
    for data in (make_edit_transfer_dataset(spec, 8), make_pair_dataset(spec, 8)):
        assert torch.equal(data[0]["a"], quad["a"]) and torch.equal(data[0]["a_prime"], quad["a_prime"])


def test_refusals_name_what_was_expected():
    with pytest.raises(ValueError, match=r"lorweb data must be one of .*quads:<file.jsonl>.*; got 'nope:x'"):
        make_dataset("nope:x", 8)
    with pytest.raises(ValueError, match="'pairs' data gives a, a_prime but lorweb needs a, a_prime, b, b_prime"):
        make_dataset("pairs:x.jsonl", 8)
    with pytest.raises(ValueError, match=r"write it as quads:<file.jsonl>"):
        make_edit_transfer_dataset("quads", 8)
    with pytest.raises(ValueError, match=r"'jsonl' data gives image but regions needs a, a_prime, x, x_prime"):
        make_region_dataset("jsonl:x.jsonl", "analogy", 8, need_edited=False)
    with pytest.raises(DataError, match="cannot read the quads index"):
        make_dataset("quads:/no/such/file.jsonl", 8)


def test_a_method_only_source_serves_that_method_first(tmp_path):
    opened = []
    register(Source("probe_kind", lambda loc, r: opened.append((loc, r.method)) or [1], PAIR_ROLES, "probe_kind:<x>",
                    needs_location=True, method="loc"))
    assert make_pair_dataset("probe_kind:here", 8) == [1] and opened == [("here", "loc")]
    assert "probe_kind" not in {s.kind for s in sources_for("edit_transfer", PAIR_ROLES)}
    with pytest.raises(ValueError, match="edit_transfer data must be one of"):
        open_source("probe_kind:here", Request("edit_transfer", 8), PAIR_ROLES)


def test_the_world_source_gives_each_trainer_the_items_it_drew_before():
    """Item i = example i // F of family i % F; LoRWeB's prompt is neutral, Edit Transfer's the instruction, LoRA of
    Change's its ``world_instructions`` setting; lengths (the sampler's permutation) as each trainer had them."""
    families = scenes.families("train")
    lorweb, edit, loc = make_dataset("world", 64), make_edit_transfer_dataset("world", 64), make_pair_dataset("world", 64)
    index = len(families) + 2
    truth = scenes.example(families[2], "train", 1, 64)
    for data in (lorweb, edit, loc):
        assert torch.equal(data[index]["a"], truth.a) and torch.equal(data[index]["a_prime"], truth.a_prime)
    assert lorweb[index]["prompt"] == "" and loc[index]["prompt"] == ""
    assert edit[index]["prompt"] == truth.instruction != ""
    assert make_pair_dataset("world", 64, world_instructions=True)[index]["prompt"] == truth.instruction
    assert (len(lorweb), len(edit), len(loc)) == (1 << 20, 4096, 4096)
    invert = make_dataset("world:families=invert,prompt=instruction", 64)[1]
    assert invert["prompt"] == scenes.get_family("invert").instruction and invert["family"] == "invert"
    assert torch.equal(invert["b_prime"], scenes.example("invert", "train", 1, 64).b_prime)
    region = make_region_dataset("world", "text", 32, need_edited=False, world_scenes=4)
    assert {"image", "x", "x_prime", "a", "a_prime", "mask"} <= set(region[0])


def test_model_specs_reach_the_loader_registered_for_their_scheme():
    calls = []
    register_loader("backbone", "probe", lambda rest, **kwargs: calls.append((rest, kwargs)) or "loaded")
    assert registered_loader("backbone", "probe:some/folder")(dtype="x") == "loaded"
    assert calls == [("some/folder", {"dtype": "x"})]
    # the scheme ends at the first colon: a Windows path or a spec of its own keeps the rest whole
    registered_loader("backbone", "probe:C:/worlds/v2")(dtype="y")
    assert calls[-1] == ("C:/worlds/v2", {"dtype": "y"})
    assert registered_loader("backbone", "tiny") is None and registered_loader("query_encoder", "probe:x") is None
    assert registered_loader("backbone", "open_clip:ViT-L-14:w.safetensors") is None
    for kind in ("backbone", "query_encoder", "ip2p", "clip", "instruction_encoder"):
        assert registered_loader(kind, "world:/some/world") is not None, kind
    with pytest.raises(ValueError, match="model kind must be one of"):
        register_loader("vae", "probe", lambda rest: None)
