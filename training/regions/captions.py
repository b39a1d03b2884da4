"""The paper's caption step (Ma et al. §3.1, §4), offline, over local models: writes the JSONL train_region reads.

    python -m training.region_captions --input pairs.jsonl --output train.jsonl \\
        --mllm /models/Qwen2.5-VL-7B-Instruct --llm /models/Qwen2.5-7B-Instruct

Each input line is ``{"image": path, ...}`` (paths relative to the input file; written relative to the output file):

* with an ``instruction`` (inference-style data): t_o = MLLM(X) describes the image (unless ``source_caption`` is
  given), then t_e = LLM(t_o, t_ins) describes it after the edit;
* with a ``source_caption`` and no instruction (the paper's training data: plain image-text pairs): the LLM proposes
  an instruction and the matching t_e.

Models are transformers folders (or ids already in the local Hugging Face cache): an image-text-to-text model with a
chat template for the MLLM (the paper: Qwen2.5-VL), a causal LM with a chat template for the LLM (Qwen2.5). Nothing is
downloaded; training never calls these models (or any network). Lines that already have both captions are copied
unchanged unless ``--overwrite``; lines that fail are reported and left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from training.regions.models import _local as resolve

log = logging.getLogger(__name__)

DESCRIBE = "Describe this image in one short sentence (at most 20 words). Answer with the sentence only."
TARGET = ("An image is described as: \"{source}\". It is edited with the instruction: \"{instruction}\". Describe "
          "the edited image in one short sentence, in the same style. Answer with the sentence only.")
PROPOSE = ("An image is described as: \"{source}\". Propose one simple, local edit of this image. Answer with a JSON "
           "object {{\"instruction\": ..., \"target_caption\": ...}}: the edit instruction and the description of "
           "the edited image, one sentence each.")


def clean(text: str) -> str:
    """First line of a model's answer, without quotes or a leading label."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if ":" in line[:20] and line.split(":", 1)[0].lower() in ("description", "answer", "caption", "edited image"):
        line = line.split(":", 1)[1].strip()
    return line.strip("\"' ")


def parse_proposal(text: str) -> tuple[str, str]:
    """The LLM's {"instruction", "target_caption"} answer (the first JSON object in the text)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError(f"no JSON object in the answer {text[:80]!r}")
    value = json.loads(text[start:end + 1])
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) and value[k].strip()
                                              for k in ("instruction", "target_caption")):
        raise ValueError(f"the answer lacks instruction/target_caption strings: {text[:80]!r}")
    return value["instruction"].strip(), value["target_caption"].strip()


def complete_record(record: dict, image_path: Path, describe: Callable[[Path], str] | None,
                    chat: Callable[[str], str], overwrite: bool = False) -> dict:
    """Fill source_caption / instruction / target_caption of one record with the given model calls."""
    out = dict(record)
    if not overwrite and all(isinstance(out.get(k), str) and out[k].strip()
                             for k in ("instruction", "source_caption", "target_caption")):
        return out
    if overwrite or not (isinstance(out.get("source_caption"), str) and out["source_caption"].strip()):
        if describe is None:
            raise ValueError("no source_caption and no --mllm to describe the image")
        out["source_caption"] = clean(describe(image_path))
    instruction = out.get("instruction")
    if isinstance(instruction, str) and instruction.strip():
        out["target_caption"] = clean(chat(TARGET.format(source=out["source_caption"], instruction=instruction)))
    else:
        out["instruction"], out["target_caption"] = parse_proposal(chat(PROPOSE.format(source=out["source_caption"])))
    if not out["source_caption"] or not out["target_caption"]:
        raise ValueError("a model returned an empty caption")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# local models


def _local(spec: str) -> str:
    return resolve(spec)


def load_chat(spec: str, max_new_tokens: int = 80) -> Callable[[str], str]:
    """A causal LM with a chat template, greedy decoding."""
    path = _local(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()

    def chat(prompt: str) -> str:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return chat


def load_describer(spec: str, max_new_tokens: int = 60) -> Callable[[Path], str]:
    """An image-text-to-text model (e.g. Qwen2.5-VL) with its processor's chat template, greedy decoding."""
    path = _local(spec)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()

    def describe(image_path: Path) -> str:
        with Image.open(image_path) as img:
            image = img.convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return describe


def run(input_path: Path, output_path: Path, describe, chat, overwrite: bool = False) -> tuple[int, int]:
    """Caption every line of ``input_path`` into ``output_path`` (written atomically); returns (written, failed)."""
    lines = input_path.read_text().splitlines()
    written, failed, out_lines = 0, 0, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError('expected an object with an "image" path')
            image = (input_path.parent / record["image"]).resolve()
            if not image.is_file():
                raise ValueError(f"{image} does not exist")
            record = complete_record(record, image, describe, chat, overwrite)
            for key in ("image", "edited", "mask"):
                if isinstance(record.get(key), str):
                    target = (input_path.parent / record[key]).resolve()
                    record[key] = os.path.relpath(target, output_path.parent.resolve())
        except (ValueError, OSError) as err:
            failed += 1
            log.warning("skipping %s:%d: %s", input_path, number, err)
            continue
        out_lines.append(json.dumps(record, ensure_ascii=False))
        written += 1
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    tmp.write_text("\n".join(out_lines) + ("\n" if out_lines else ""))
    os.replace(tmp, output_path)
    return written, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--mllm", help="image-text-to-text model folder (needed for lines without source_caption)")
    parser.add_argument("--llm", required=True, help="causal LM folder with a chat template")
    parser.add_argument("--overwrite", action="store_true", help="recompute captions that are already there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    describe = load_describer(args.mllm) if args.mllm else None
    written, failed = run(args.input, args.output, describe, load_chat(args.llm), args.overwrite)
    print(f"wrote {written} records to {args.output} ({failed} skipped)")
    return 0 if written else 1

