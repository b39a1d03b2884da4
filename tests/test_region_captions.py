"""The offline caption step (training/region_captions.py): which model is asked what, what is written, and the local
chat-model plumbing on a tiny random causal LM saved here (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.regions.captions import PROPOSE, TARGET, clean, load_chat, parse_proposal, run


def write_inputs(folder, lines):
    (folder / "img").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "img" / "x.png")
    path = folder / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) if isinstance(line, dict) else line for line in lines))
    return path


def test_captions_follow_the_papers_two_steps(tmp_path):
    asked = []

    def describe(image):
        asked.append(("mllm", image.name))
        return "Description: a cat on a sofa\nmore text"

    def chat(prompt):
        asked.append(("llm", prompt))
        if "Propose" in prompt:
            return 'Sure: {"instruction": "add a hat", "target_caption": "a cat with a hat on a sofa"}'
        return '"a dog on a sofa"'

    source = write_inputs(tmp_path, [
        {"image": "img/x.png", "instruction": "turn the cat into a dog"},          # MLLM then LLM
        {"image": "img/x.png", "source_caption": "a cat on a sofa"},                 # LLM proposes the edit
        {"image": "img/x.png", "instruction": "i", "source_caption": "s", "target_caption": "t"},  # kept as is
        {"image": "img/missing.png", "instruction": "x"}, "not json"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    written, failed = run(source, out_dir / "train.jsonl", describe, chat)
    assert (written, failed) == (3, 2)
    records = [json.loads(l) for l in (out_dir / "train.jsonl").read_text().splitlines()]
    assert records[0] == {"image": "../img/x.png", "instruction": "turn the cat into a dog",
                          "source_caption": "a cat on a sofa", "target_caption": "a dog on a sofa"}
    assert records[1]["instruction"] == "add a hat" and records[1]["target_caption"] == "a cat with a hat on a sofa"
    assert records[2]["target_caption"] == "t"
    assert asked[0] == ("mllm", "x.png")
    assert asked[1] == ("llm", TARGET.format(source="a cat on a sofa", instruction="turn the cat into a dog"))
    assert asked[2] == ("llm", PROPOSE.format(source="a cat on a sofa"))
    assert len(asked) == 3, "complete records ask no model"


def test_answer_parsing():
    assert clean('  "A red car."  \nand more') == "A red car."
    with pytest.raises(ValueError):
        parse_proposal("no json here")
    with pytest.raises(ValueError):
        parse_proposal('{"instruction": ""}')


def test_local_chat_model_generates_offline(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training.regions.models import word_tokenizer

    tokenizer = word_tokenizer("an image is described as edited with the instruction describe a cat dog".split())
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "llm", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "llm")
    chat = load_chat(str(tmp_path / "llm"), max_new_tokens=4)
    answer = chat("describe a cat")
    assert isinstance(answer, str) and answer == chat("describe a cat"), "greedy decoding is deterministic"


def test_overwrite_describes_the_image_again_and_edits_that_description(tmp_path):
    """--overwrite recomputes captions that are already there: the MLLM describes the image again (replacing the old
    source caption) and the target caption is the LLM's edit of that new description, not of the old one."""
    asked = []

    def describe(image):
        asked.append(("mllm", image.name))
        return "a dog on a sofa"

    def chat(prompt):
        asked.append(("llm", prompt))
        return "a dog with a hat on a sofa"

    record = {"image": "img/x.png", "instruction": "add a hat", "source_caption": "old", "target_caption": "older"}
    source = write_inputs(tmp_path, [record])
    assert run(source, tmp_path / "kept.jsonl", describe, chat) == (1, 0)
    assert json.loads((tmp_path / "kept.jsonl").read_text())["source_caption"] == "old" and not asked, \
        "without --overwrite a complete record is kept as is"
    assert run(source, tmp_path / "redone.jsonl", describe, chat, overwrite=True) == (1, 0)
    redone = json.loads((tmp_path / "redone.jsonl").read_text())
    assert redone == {"image": "img/x.png", "instruction": "add a hat", "source_caption": "a dog on a sofa",
                      "target_caption": "a dog with a hat on a sofa"}
    assert asked == [("mllm", "x.png"), ("llm", TARGET.format(source="a dog on a sofa", instruction="add a hat"))]


def test_every_path_of_a_record_is_rebased_to_the_output_files_folder(tmp_path):
    """image, edited and mask are relative to the input file; each is written relative to the output file (here one
    folder down: ``../``), other fields are left alone."""
    record = {"image": "img/x.png", "edited": "img/x.png", "mask": "img/x.png", "instruction": "i",
              "source_caption": "s", "target_caption": "t", "group": "img/x.png"}
    source = write_inputs(tmp_path, [record])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert run(source, out_dir / "train.jsonl", None, None) == (1, 0)
    written = json.loads((out_dir / "train.jsonl").read_text())
    assert written == {**record, "image": "../img/x.png", "edited": "../img/x.png", "mask": "../img/x.png"}
    assert all((out_dir / written[k]).resolve() == (tmp_path / "img" / "x.png").resolve()
               for k in ("image", "edited", "mask"))
