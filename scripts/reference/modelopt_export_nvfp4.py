#!/usr/bin/env python3
"""ModelOpt 0.47's own deployable export of a fixed mixed NVFP4 / W4A16_NVFP4 / FP8 recipe of the
qwen3-vl-tiny fixture (issue 12, acceptance 4): what `quantize --layout modelopt` must write.

As the fixtures' `modelopt/export_fp8_{text,all}` were made, with NVFP4 added: every quantizer
disabled, then each recipe module's weight (and, but for W4A16_NVFP4, input) quantizer enabled
with the config entry of ModelOpt's own `<FORMAT>_CFG`; `algorithm: "max"`, calibrated by one
forward of each of the 4 reference samples (batch size 1, in order); then
`modelopt.torch.export.export_hf_checkpoint`. NVFP4 fake quantization runs only on CUDA in
ModelOpt 0.47, and the exporter runs a forward (to find the layers that share an input), so this
runs on the GPU, float32 weights, TF32 off.

Written into --out (nothing here is edited by hand):
  hf_quant_config.json, config.json   as exported
  quantized_tensors.safetensors       every exported *.weight_scale, *.weight_scale_2, *.input_scale and
                                      the .weight of every quantized module (uint8 packed E2M1 / float8_e4m3fn)
  export_listing.json                 name -> {dtype, shape} of every tensor of the full export
  recipe.json                         modules and formats, the quant_cfg, every quantizer's amax after
                                      calibration and at export (ModelOpt unifies fused layers' amax),
                                      the fake-quant loss per sample, versions

  python3 scripts/reference/modelopt_export_nvfp4.py --fixtures DIR --out DIR [--device cuda]
"""
import argparse
import copy
import json
import os
import platform
import tempfile

import torch

T = "model.language_model.layers"
V = "model.visual"
# module -> ModelOpt config. Chosen to cover: a fused q/k/v and a fused gate/up in NVFP4 (ModelOpt
# gives the shards one weight and one input amax), a fused q/k/v in W4A16_NVFP4 (weight amax only),
# single NVFP4 / W4A16 / FP8 layers next to each other, and vision layers in all three formats.
RECIPE = {
    f"{T}.0.self_attn.q_proj": "NVFP4_DEFAULT_CFG",
    f"{T}.0.self_attn.k_proj": "NVFP4_DEFAULT_CFG",
    f"{T}.0.self_attn.v_proj": "NVFP4_DEFAULT_CFG",
    f"{T}.0.self_attn.o_proj": "W4A16_NVFP4_CFG",
    f"{T}.0.mlp.gate_proj": "FP8_DEFAULT_CFG",
    f"{T}.0.mlp.up_proj": "FP8_DEFAULT_CFG",
    f"{T}.0.mlp.down_proj": "NVFP4_DEFAULT_CFG",
    f"{T}.1.self_attn.q_proj": "W4A16_NVFP4_CFG",
    f"{T}.1.self_attn.k_proj": "W4A16_NVFP4_CFG",
    f"{T}.1.self_attn.v_proj": "W4A16_NVFP4_CFG",
    f"{T}.1.mlp.gate_proj": "NVFP4_DEFAULT_CFG",
    f"{T}.1.mlp.up_proj": "NVFP4_DEFAULT_CFG",
    f"{T}.1.mlp.down_proj": "FP8_DEFAULT_CFG",
    f"{T}.2.self_attn.o_proj": "FP8_DEFAULT_CFG",
    f"{T}.2.mlp.down_proj": "NVFP4_DEFAULT_CFG",
    f"{V}.blocks.0.attn.qkv": "NVFP4_DEFAULT_CFG",
    f"{V}.blocks.1.mlp.linear_fc1": "FP8_DEFAULT_CFG",
    f"{V}.merger.linear_fc2": "W4A16_NVFP4_CFG",
}


def entry(cfg, suffix):
    """The cfg of ModelOpt's own `*<suffix>` entry of a config, or None when it has none."""
    for e in cfg["quant_cfg"]:
        if e.get("quantizer_name") == f"*{suffix}" and "cfg" in e:
            return copy.deepcopy(e["cfg"])
    return None


def quant_cfg(mtq):
    entries = [{"quantizer_name": "*", "enable": False}]
    for module, name in RECIPE.items():
        cfg = getattr(mtq, name)
        for q in ("weight_quantizer", "input_quantizer"):
            c = entry(cfg, q)
            if c is not None:
                entries.append({"quantizer_name": f"{module}.{q}", "enable": True, "cfg": c})
    return {"quant_cfg": entries, "algorithm": "max"}


def load_samples(fixtures, device):
    from safetensors.torch import load_file
    out = []
    for k in range(4):
        s = load_file(os.path.join(fixtures, "reference", f"sample_{k:02d}.safetensors"))
        pv = (s["pixel_values_u8"].to(torch.float32) - 127.5) / 127.5
        out.append({
            "input_ids": s["input_ids"].to(device),
            "attention_mask": s["attention_mask"].to(device),
            "labels": s["labels"].to(device),
            "mm_token_type_ids": s["mm_token_type_ids"].to(device),
            "pixel_values": pv.to(device),
            "image_grid_thw": s["image_grid_thw"].to(device),
        })
    return out


def amaxes(model):
    """Every enabled quantizer's amax (as a list), by module."""
    out = {}
    for module in RECIPE:
        m = model.get_submodule(module)
        d = {}
        for q in ("weight_quantizer", "input_quantizer"):
            tq = getattr(m, q)
            if tq.is_enabled and getattr(tq, "_amax", None) is not None:
                d[q] = tq._amax.detach().float().cpu().flatten().tolist()
        out[module] = d
    return out


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="../shared/fixtures")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)

    import modelopt
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Qwen3VLForConditionalGeneration

    os.makedirs(args.out, exist_ok=True)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        os.path.join(args.fixtures, "qwen3-vl-tiny"), dtype=torch.float32).to(args.device)
    model.eval()
    data = load_samples(args.fixtures, args.device)
    cfg = quant_cfg(mtq)

    def forward_loop(m):
        with torch.no_grad():
            for b in data:
                m(**b)

    mtq.quantize(model, cfg, forward_loop)
    calibrated = amaxes(model)
    with torch.no_grad():
        losses = [float(model(**b).loss) for b in data]
    mtq.print_quant_summary(model) if hasattr(mtq, "print_quant_summary") else None

    with tempfile.TemporaryDirectory() as export_dir:
        export_hf_checkpoint(model, export_dir=export_dir)
        exported = amaxes(model)
        listing, keep = {}, {}
        files = sorted(f for f in os.listdir(export_dir) if f.endswith(".safetensors"))
        for f in files:
            with safe_open(os.path.join(export_dir, f), "pt") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    listing[name] = {"file": f, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    module = name.rsplit(".", 1)[0]
                    if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")) or (
                            name.endswith(".weight") and module in RECIPE):
                        keep[name] = t.contiguous()
        save_file(keep, os.path.join(args.out, "quantized_tensors.safetensors"))
        json.dump(dict(sorted(listing.items())), open(os.path.join(args.out, "export_listing.json"), "w"), indent=1)
        for f in ("hf_quant_config.json", "config.json"):
            with open(os.path.join(export_dir, f)) as src, open(os.path.join(args.out, f), "w") as dst:
                dst.write(src.read())
        exported_files = sorted(os.listdir(export_dir))

    versions = {
        "modelopt": modelopt.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
    }
    recipe = {
        "variant": "tiny",
        "recipe": "nvfp4_mixed",
        "modules": RECIPE,
        "quant_cfg": jsonable(cfg),
        "calibration": "max over the 4 reference samples, batch size 1, float32, TF32 off, " + args.device,
        "amax_calibrated": calibrated,
        "amax_at_export": exported,
        "fake_quant_loss_per_sample": losses,
        "exported_files": exported_files,
        "kept_tensors": len(keep),
        "versions": versions,
        "command": "python3 scripts/reference/modelopt_export_nvfp4.py --out DIR --device " + args.device,
    }
    json.dump(recipe, open(os.path.join(args.out, "recipe.json"), "w"), indent=1)
    print(f"exported {len(listing)} tensors ({len(keep)} kept), losses {losses}")


if __name__ == "__main__":
    main()
