#!/usr/bin/env python3
"""The measurement `evaluate` makes, done with HF transformers + ModelOpt fake quantization, for the
GPU benchmark (scripts/bench_evaluate_gpu.sh). Reads qsens' `qsens.evaluation` JSON for the recipes
(each one's FP8 layers, by module name) and measures every recipe on the same held-out inputs:
per-sample mean NLL over the label tokens, KL(unquantized || recipe) over the label positions and
top-1 agreement. One `mtq.quantize` (FP8 per-tensor weights and inputs, max calibration on the
calibration inputs, quantization off while calibrating, as ModelOpt does) covers the union of the
recipes' layers; each recipe then enables exactly its layers' quantizers. Writes a JSON with
timings, peak memory and the per-sample numbers.
"""
import argparse, json, sys, time

import torch

from modelopt_autoquant import batches

FP8 = {"num_bits": (4, 3), "axis": None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="qsens.model-inputs used for calibration")
    ap.add_argument("--inputs", required=True, help="held-out qsens.model-inputs")
    ap.add_argument("--evaluation", required=True, help="qsens' evaluation JSON (recipes and their layers)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8
    from transformers import Qwen3VLForConditionalGeneration
    get_cuda_ext_fp8()  # one-time build/load outside the clock, as in modelopt_autoquant.py

    evaluation = json.load(open(args.evaluation))["payload"]
    recipes = [(r["name"], [q["name"] for q in r["quantized_layers"]]) for r in evaluation["recipes"]]
    union = sorted({name for _, layers in recipes for name in layers})

    t0 = time.time()
    model = Qwen3VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    load_s = time.time() - t0
    calib = batches(args.calib, "cuda")
    held_out = batches(args.inputs, "cuda")

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t_start = time.time()
    cfg = {"quant_cfg": {"*": {"enable": False}}, "algorithm": "max"}
    for name in union:
        cfg["quant_cfg"][f"{name}.weight_quantizer"] = dict(FP8)
        cfg["quant_cfg"][f"{name}.input_quantizer"] = dict(FP8)

    def forward_loop(m):
        with torch.no_grad():
            for b in calib:
                m(**b)

    model = mtq.quantize(model, cfg, forward_loop)
    torch.cuda.synchronize()
    quantize_s = time.time() - t_start

    quantizers = {}
    for module_name, module in model.named_modules():
        if module_name in union:
            quantizers[module_name] = (module.weight_quantizer, module.input_quantizer)
    missing = [n for n in union if n not in quantizers]
    if missing:
        sys.exit(f"modelopt_evaluate: {len(missing)} recipe layers are not quantized modules of the HF model, "
                 f"e.g. {missing[:3]}")

    def select(layers):
        chosen = set(layers)
        for name, pair in quantizers.items():
            for q in pair:
                q.enable() if name in chosen else q.disable()

    def measure():
        out = []
        with torch.no_grad():
            for b in held_out:
                logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits[0].float()
                labels = b["labels"][0]
                # position t predicts token t+1 (HF's shift), over the label tokens only
                pos = (labels[1:] != -100).nonzero().flatten()
                lp = torch.log_softmax(logits[pos], dim=-1)
                target = labels[1:][pos]
                nll = -lp.gather(1, target[:, None]).sum().item()
                out.append({"lp": lp, "nll_sum": nll, "label_tokens": int(pos.numel())})
        return out

    results = []
    reference = None
    t_measure = time.time()
    for name, layers in recipes:
        t = time.time()
        select(layers)
        per_sample = measure()
        if reference is None:
            if layers:
                sys.exit("modelopt_evaluate: the first recipe must be the unquantized one")
            reference = [s["lp"] for s in per_sample]
        rows = []
        for s, ref in zip(per_sample, reference):
            kl = (ref.exp() * (ref - s["lp"])).sum().item()
            agree = (ref.argmax(-1) == s["lp"].argmax(-1)).sum().item()
            rows.append({"nll_sum": s["nll_sum"], "label_tokens": s["label_tokens"], "kl_sum_label": kl,
                         "top1_agree": agree})
        torch.cuda.synchronize()
        results.append({"name": name, "layers": len(layers), "seconds": time.time() - t, "per_sample": rows})
    torch.cuda.synchronize()
    measure_s = time.time() - t_measure
    peak = torch.cuda.max_memory_allocated()
    json.dump({
        "num_calibration": len(calib), "num_held_out": len(held_out), "load_s": load_s,
        "quantize_calibrate_s": quantize_s, "measure_s": measure_s, "peak_allocated_bytes": peak,
        "recipes": results,
    }, open(args.out, "w"), indent=1)
    print(f"modelopt: {len(recipes)} recipes x {len(held_out)} samples: mtq.quantize + calibration {quantize_s:.1f} s, "
          f"measurement {measure_s:.1f} s, peak {peak / 2**30:.2f} GiB (load {load_s:.1f} s, not counted)")


if __name__ == "__main__":
    sys.exit(main())
