#!/usr/bin/env python3
"""The fixture's fake-quantized losses, recomputed in HF transformers two ways: plain forward hooks
that fake-quantize each recipe module's input and weight with ModelOpt's own arithmetic
(`_fp8_eager`: clamp(x·448/amax) → e4m3 → ·(amax/448)), amax taken from ModelOpt's export, and
ModelOpt's `mtq.quantize` of the recipe's quant_cfg (when ModelOpt is importable). Prints the
losses of each reference sample beside `recipe.json`'s `fake_quant_loss_per_sample`, so that a
disagreement can be placed: in the arithmetic, in the recipe, or in ModelOpt's quantized model.

    python3 scripts/check_fake_quant_hf.py --model DIR --export DIR --sample s00.safetensors ... [--json OUT]
"""
import argparse, json, sys

import torch
from safetensors.torch import load_file


def fp8_eager(x, amax):
    scale = 448.0 / amax.to(torch.float32)
    y = (x.to(torch.float32) * scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (y.to(torch.float32) * (1 / scale)).to(x.dtype)


def batch(path):
    r = load_file(path)
    return dict(
        input_ids=r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"],
        pixel_values=(r["pixel_values_u8"].float() - 127.5) / 127.5, image_grid_thw=r["image_grid_thw"],
        mm_token_type_ids=r["mm_token_type_ids"],
    )


def losses(model, batches):
    with torch.no_grad():
        return [float(model(**b).loss) for b in batches]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--export", required=True, help="fixtures/modelopt/export_fp8_<recipe>")
    ap.add_argument("--sample", action="append", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    from transformers import Qwen3VLForConditionalGeneration
    torch.set_num_threads(4)
    recipe = json.load(open(f"{a.export}/recipe.json"))
    scales = load_file(f"{a.export}/quantized_tensors.safetensors")
    batches = [batch(p) for p in a.sample]
    # reference/sample_KK.safetensors is sample KK of recipe.json's losses
    index = [int(p.rsplit("_", 1)[-1].split(".")[0]) for p in a.sample]
    out = {"samples": index, "expected": [recipe["fake_quant_loss_per_sample"][k] for k in index]}

    model = Qwen3VLForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    out["unquantized"] = losses(model, batches)
    modules = dict(model.named_modules())
    originals = {}
    for name in recipe["enabled_modules"]:
        m = modules[name]
        in_amax = scales[f"{name}.input_scale"].float() * 448.0 if f"{name}.input_scale" in scales else None
        if in_amax is None:  # the Conv3d patch embedding: not exported, skip
            continue
        w_amax = m.weight.detach().abs().max().float()
        originals[name] = m.forward

        def fwd(x, m=m, in_amax=in_amax, w_amax=w_amax):
            return torch.nn.functional.linear(fp8_eager(x, in_amax), fp8_eager(m.weight, w_amax), m.bias)
        m.forward = fwd
    out["hooks"] = losses(model, batches)
    out["hooked_modules"] = len(originals)
    for name, f in originals.items():
        modules[name].forward = f

    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        print(f"ModelOpt not importable ({e}); hooks only", flush=True)
    else:
        model = Qwen3VLForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
        # (calibrated on the given samples: equal to the fixture's only when all 4 are given)
        mtq.quantize(model, recipe["quant_cfg"], forward_loop=lambda m: [m(**b) for b in batches])
        out["modelopt"] = losses(model, batches)
        amax = {}
        for name, m in model.named_modules():
            for q in ("input_quantizer", "weight_quantizer"):
                tq = getattr(m, q, None)
                if tq is not None and tq.is_enabled and tq.amax is not None:
                    amax[f"{name}.{q}"] = float(tq.amax)
        out["modelopt_amax"] = amax
    for k in ("expected", "unquantized", "hooks", "modelopt"):
        if k in out:
            print(f"{k:>12}: " + " ".join(f"{v:.7f}" for v in out[k]), flush=True)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
