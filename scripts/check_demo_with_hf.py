#!/usr/bin/env python3
"""Loads the qsens demo set with HF transformers and runs every sample through it.

Usage: python3 scripts/check_demo_with_hf.py DEMO_DIR [--json OUT.json]

DEMO_DIR is what `cargo run --release --bin demo-assets -- DEMO_DIR` wrote. Needs torch,
transformers (>= 4.57, with Qwen3-VL) and Pillow; it is not run by the test suite. It checks that:
- AutoTokenizer / AutoProcessor load the folder offline, and the special tokens' ids match config.json;
- the chat template renders the Qwen3-VL text for [user: [image, prompt], assistant: caption];
- Qwen3VLForConditionalGeneration loads with no missing or unexpected keys and a tied lm_head;
- every image goes through the processor and a forward pass with labels gives a finite loss.
With --json it writes, per sample, the rendered text, input_ids, image_grid_thw and loss, as a
reference for the Rust pipeline.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

PROMPT = "Describe this image."
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("--json", type=Path, help="write per-sample results here")
    args = ap.parse_args()
    model_dir = args.demo_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())
    coco = json.loads((args.demo_dir / "captions.json").read_text())

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    for t in SPECIAL:
        assert tok.encode(t, add_special_tokens=False) == [ids[t]], t
    assert ids["<|image_pad|>"] == config["image_token_id"]
    assert ids["<|video_pad|>"] == config["video_token_id"]
    assert ids["<|vision_start|>"] == config["vision_start_token_id"]
    assert ids["<|vision_end|>"] == config["vision_end_token_id"]
    assert len(tok) <= config["text_config"]["vocab_size"]
    for ann in coco["annotations"]:
        assert tok.decode(tok.encode(ann["caption"], add_special_tokens=False)) == ann["caption"]
    print(f"tokenizer: {len(tok)} tokens, special ids {ids}")

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(
        model_dir, local_files_only=True, torch_dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.eval()

    captions = {}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        captions.setdefault(ann["image_id"], ann["caption"])
    results = []
    for entry in coco["images"]:
        caption = captions[entry["id"]]
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": caption},
        ]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        expected = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + PROMPT
                    + "<|im_end|>\n<|im_start|>assistant\n" + caption + "<|im_end|>\n")
        assert text == expected, (text, expected)
        image = Image.open(args.demo_dir / "images" / entry["file_name"])
        assert image.size == (entry["width"], entry["height"])
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        labels = torch.full_like(inputs["input_ids"], -100)
        im_start = (inputs["input_ids"][0] == ids["<|im_start|>"]).nonzero()[-1].item()
        labels[0, im_start + 3:] = inputs["input_ids"][0, im_start + 3:]  # caption + <|im_end|> + "\n"
        labels[0, -1] = -100
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        loss = out.loss.item()
        assert math.isfinite(loss)
        grid = inputs["image_grid_thw"].tolist()
        print(f"{entry['file_name']}: {image.mode} {image.size} grid {grid} L {inputs['input_ids'].shape[1]} loss {loss:.4f}")
        results.append({"file_name": entry["file_name"], "rendered_text": text,
                        "input_ids": inputs["input_ids"][0].tolist(), "image_grid_thw": grid, "loss": loss})
    if args.json:
        args.json.write_text(json.dumps({"samples": results}, indent=1) + "\n")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
