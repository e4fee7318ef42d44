#!/usr/bin/env python3
"""ModelOpt auto_quantize (gradient or kl_div by --method; FP8, or the formats given by --formats) on the same checkpoint and the same input tensors as
qsens (read from qsens' `qsens.model-inputs` artifact). Writes a JSON with timings, peak memory,
per-group scores and costs, and the recipes re-solved at several budgets. Run on the GPU machine
with nvidia-modelopt 0.47 importable.
"""
import argparse, json, sys, time

import msgpack
import numpy as np
import torch


def pixel_values(image, proc):
    """HF Qwen2-VL image processor's rescale+normalize and patch flattening, from the stored RGB."""
    h, w = image["height"], image["width"]
    p, t, m = proc["patch_size"], proc["temporal_patch_size"], proc["merge_size"]
    rgb = np.frombuffer(image["rgb"], dtype=np.uint8).reshape(h, w, 3)
    mean = np.array([np.float32(mu / proc["rescale_factor"]) for mu in proc["image_mean"]], dtype=np.float32)
    std = np.array([np.float32(s / proc["rescale_factor"]) for s in proc["image_std"]], dtype=np.float32)
    x = (rgb.astype(np.float32) - mean) / std                 # (H, W, C)
    x = np.transpose(x, (2, 0, 1))[None]                      # (1, C, H, W)
    x = np.repeat(x[:, None], t, axis=1)                      # (1, T, C, H, W)
    gh, gw = h // p, w // p
    x = x.reshape(1, 1, t, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gh * gw, 3 * t * p * p)


def batches(path, device):
    art = msgpack.unpackb(open(path, "rb").read(), raw=False)
    assert art["kind"] == "qsens.model-inputs", art["kind"]
    proc = art["payload"]["processor"]
    out = []
    for s in art["payload"]["samples"]:
        pv = np.concatenate([pixel_values(im, proc) for im in s["images"]])
        out.append({
            "input_ids": torch.tensor([s["input_ids"]], device=device),
            "attention_mask": torch.tensor([s["attention_mask"]], device=device),
            "labels": torch.tensor([s["labels"]], device=device),
            "mm_token_type_ids": torch.tensor([s["mm_token_type_ids"]], device=device),
            "pixel_values": torch.from_numpy(pv).to(device=device, dtype=torch.bfloat16),
            "image_grid_thw": torch.tensor([im["grid_thw"] for im in s["images"]], device=device),
        })
    return out


def check_released_experts(model, path):
    """For a MoE checkpoint: the loaded layer-0 experts equal the file's released-layout tensors
    (transformers 5.x transposes [E, H, 2I] → [E, 2I, H] on load; a silent mismatch would make the
    two tools score different models). Returns what was checked, or None for a dense model."""
    from safetensors import safe_open
    index = json.load(open(f"{path}/model.safetensors.index.json"))["weight_map"]
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    if name not in index:
        return None
    with safe_open(f"{path}/{index[name]}", framework="pt", device="cuda") as f:
        stored = f.get_tensor(name)
    loaded = dict(model.named_parameters())[name].detach()
    if loaded.shape != stored.shape:
        loaded = loaded.transpose(1, 2)
    if not torch.equal(loaded, stored):
        raise SystemExit(f"{path}: loaded {name} differs from the file's released-layout tensor")
    cfg = model.config.get_text_config()
    return {"checked": name, "in_memory_shape": list(dict(model.named_parameters())[name].shape),
            "file_shape": list(stored.shape),
            "experts_implementation_before": getattr(cfg, "_experts_implementation", None)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=float, nargs="+", default=[10.0, 12.0])
    ap.add_argument("--formats", nargs="+", default=["FP8_DEFAULT_CFG"], help="ModelOpt config names")
    ap.add_argument("--effective-bits", type=float, default=11.0, help="the constraint of the run")
    ap.add_argument("--method", choices=["gradient", "kl_div"], default="gradient")
    args = ap.parse_args()

    t0 = time.time()
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe
    import_s = time.time() - t0
    # Build (first run on a machine, ~45 s) or load ModelOpt's FP8 CUDA extension before the clock
    # starts: the bar in ../shared/bench/README.md excludes this one-time compile.
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8
    t0 = time.time()
    get_cuda_ext_fp8()
    # NVFP4 formats quantize the vision patch embedding (a Conv3d) through a second extension that
    # ModelOpt compiles at its first use (~60 s, inside auto_quantize's first AWQ-lite step unless
    # built here): one-time work too, so built before the clock.
    if any("FP4" in f for f in args.formats):
        from modelopt.torch.kernels.quantization.conv.implicit_gemm_cuda import _get_cuda_module
        _get_cuda_module()
    ext_s = time.time() - t0

    # Qwen3VLForConditionalGeneration, or Qwen3VLMoeForConditionalGeneration for qwen3_vl_moe.
    from transformers import AutoModelForImageTextToText
    t0 = time.time()
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    load_s = time.time() - t0
    moe = check_released_experts(model, args.model)
    data = batches(args.inputs, "cuda")
    n = len(data)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, state = mtq.auto_quantize(
        model,
        constraints={"effective_bits": args.effective_bits},
        quantization_formats=args.formats,
        data_loader=data,
        # As the fixtures' ModelOpt runs call it (../shared/fixtures/README.md, modelopt/): kl_div
        # compares logits and takes no loss function.
        forward_step=(lambda m, b: m(**b)) if args.method == "gradient" else (lambda m, b: m(**b).logits),
        **({"loss_func": lambda out, b: out.loss} if args.method == "gradient" else {}),
        num_calib_steps=n,
        num_score_steps=n,
        verbose=False,
        method=args.method,
    )
    torch.cuda.synchronize()
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated()

    groups = []
    for name, st in state["candidate_stats"].items():
        groups.append({
            "hparam": name,
            "modules": list(st["module_names"]),
            "formats": [str(f) for f in st["formats"]],
            "scores": [float(x) for x in st["scores"]],
            "costs": [float(x) for x in st["costs"]],
        })
    targets = {}
    for b in args.bits:
        recipe = _resolve_best_recipe(state, {"effective_bits": b})
        targets[str(b)] = {k.removesuffix(".quant_recipe"): str(v) for k, v in recipe.items()}
    json.dump({
        "num_samples": n,
        "method": args.method,
        "formats": args.formats,
        "modelopt_import_s": import_s,
        "load_s": load_s,
        "cuda_ext_s": ext_s,
        "auto_quantize_s": wall,
        "peak_allocated_bytes": peak,
        "groups": groups,
        "targets": targets,
        "cost_denominator": state.get("cost_denominator"),
        **({"moe": moe, "experts_classes": sorted({type(m).__name__ for n, m in model.named_modules()
                                                   if n.endswith("mlp.experts")}),
            "experts_implementation_after": getattr(model.config.get_text_config(), "_experts_implementation", None)}
           if moe else {}),
    }, open(args.out, "w"), indent=1)
    print(f"modelopt: {args.method}, {n} samples, auto_quantize {wall:.1f} s, peak {peak / 2**30:.2f} GiB, load {load_s:.1f} s, "
          f"CUDA extensions {ext_s:.1f} s (not timed)")


if __name__ == "__main__":
    sys.exit(main())
