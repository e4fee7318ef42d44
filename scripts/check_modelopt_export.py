#!/usr/bin/env python3
"""Check that a qsens ModelOpt export is accepted by ModelOpt's `mtq.quantize` (0.47).

Usage:
    check_modelopt_export.py EXPORT MODEL_DIR [--device cuda|cpu] [--dtype float32|bfloat16]

EXPORT is the `modelopt_quant_cfg.json` written by `search --export-dir`, or a manifest JSON
(its `payload.exports.modelopt` is used). MODEL_DIR is a Qwen3-VL Hugging Face checkpoint, e.g.
`shared/fixtures/qwen3-vl-tiny` (the config names FP8 quantizers by HF module name, so use the
checkpoint the scores were made from).

What it does, self-contained (no data set, no network):
  1. loads the model and its processor from MODEL_DIR;
  2. builds two calibration batches: a synthetic 256×256 gradient image with a short chat, and a
     text-only chat (so both towers see data);
  3. runs `mtq.quantize(model, config, forward_loop)` with the exported config as is;
  4. checks that every quantizer the config enables exists, is enabled, is FP8 E4M3
     (`num_bits == (4, 3)`) and was calibrated (has an amax), that every other quantizer of the
     model is disabled, and that a forward pass of the quantized model gives a finite loss.

Exit status 0 when every check passes, 1 otherwise (each failure is printed), 2 on usage errors.
Needs torch, transformers (≥ 4.57, with Qwen3-VL), Pillow and nvidia-modelopt 0.47.
"""

import argparse
import fnmatch
import json
import sys


def usage_error(msg):
    print(f"check_modelopt_export.py: {msg}", file=sys.stderr)
    sys.exit(2)


def load_config(path):
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "payload" in data:
        if data.get("kind") != "qsens.manifest":
            usage_error(f"{path}: not a qsens manifest (kind {data.get('kind')!r})")
        data = data["payload"]["exports"]["modelopt"]
        if data is None:
            usage_error(f"{path}: the manifest has no ModelOpt export (see exports.notes)")
    if not isinstance(data, dict) or "quant_cfg" not in data:
        usage_error(f"{path}: not a ModelOpt config (no 'quant_cfg')")
    return data


def expected_quantizers(cfg):
    """Exact quantizer names the config enables, and whether each must end enabled."""
    final = {}
    patterns = []
    for entry in cfg["quant_cfg"]:
        name = entry["quantizer_name"]
        enable = entry.get("enable", True)
        if any(ch in name for ch in "*?["):
            patterns.append((name, enable))
        else:
            final[name] = enable
    return final, patterns


def load_model(model_dir, device, dtype):
    import torch
    import transformers

    try:
        from transformers import Qwen3VLForConditionalGeneration as cls
    except ImportError:
        from transformers import AutoModelForImageTextToText as cls
    torch_dtype = getattr(torch, dtype)
    try:
        model = cls.from_pretrained(model_dir, dtype=torch_dtype)
    except TypeError:
        model = cls.from_pretrained(model_dir, torch_dtype=torch_dtype)
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    return model.to(device).eval(), processor


def make_batches(processor, device):
    import numpy as np
    import torch
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256]
    rgb = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    chats = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A smooth colour gradient."}]},
        ],
        [
            {"role": "user", "content": [{"type": "text", "text": "Name three primary colours."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red, green and blue."}]},
        ],
    ]
    batches = []
    for chat, images in zip(chats, [[image], None]):
        text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        kwargs = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        inputs = processor(**kwargs)
        inputs["labels"] = inputs["input_ids"].clone()
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    return batches


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", help="modelopt_quant_cfg.json or a qsens manifest JSON")
    ap.add_argument("model_dir", help="Qwen3-VL HF checkpoint directory")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    args = ap.parse_args()

    cfg = load_config(args.export)

    import torch
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    print(f"modelopt {modelopt.__version__}, torch {torch.__version__}, device {device}, dtype {dtype}")
    if not str(modelopt.__version__).startswith("0.47"):
        print(f"warning: the export targets ModelOpt 0.47, this is {modelopt.__version__}")

    model, processor = load_model(args.model_dir, device, dtype)
    batches = make_batches(processor, device)

    def forward_loop(m):
        with torch.no_grad():
            for b in batches:
                m(**b)

    model = mtq.quantize(model, cfg, forward_loop)

    failures = []
    exact, patterns = expected_quantizers(cfg)
    if patterns != [("*", False)]:
        print(f"note: wildcard entries besides the leading deny-all: {patterns}")
    quantizers = {
        name: mod for name, mod in model.named_modules() if isinstance(mod, (TensorQuantizer, SequentialQuantizer))
    }
    for name, enable in sorted(exact.items()):
        q = quantizers.get(name)
        if q is None:
            failures.append(f"{name}: named in the config, not in the model")
            continue
        if bool(q.is_enabled) != enable:
            failures.append(f"{name}: enabled={q.is_enabled}, the config says {enable}")
        if enable:
            nb = q.num_bits
            if (tuple(nb) if isinstance(nb, (list, tuple)) else nb) != (4, 3):
                failures.append(f"{name}: num_bits {q.num_bits}, expected (4, 3) (FP8 E4M3)")
            if getattr(q, "amax", None) is None:
                failures.append(f"{name}: enabled but not calibrated (no amax)")
    enabled_by_config = {n for n, e in exact.items() if e}
    for name, q in sorted(quantizers.items()):
        if name in exact:
            continue
        # Anything not named exactly falls under the leading deny-all (or a wildcard entry).
        want = False
        for pat, enable in patterns:
            if fnmatch.fnmatch(name, pat):
                want = enable
        if bool(q.is_enabled) != want:
            failures.append(f"{name}: enabled={q.is_enabled}, expected {want}")
    modules = sorted({n.rsplit(".", 1)[0] for n in enabled_by_config})
    print(f"{len(quantizers)} quantizers in the model, {len(enabled_by_config)} enabled by the config "
          f"({len(modules)} modules)")

    with torch.no_grad():
        out = model(**batches[0])
    loss = float(out.loss)
    print(f"quantized model loss on the image batch: {loss:.6f}")
    if loss != loss or loss in (float("inf"), float("-inf")):
        failures.append(f"loss is {loss}")

    for f in failures:
        print("FAIL:", f)
    print("OK: the export is accepted by mtq.quantize" if not failures else f"{len(failures)} checks failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
