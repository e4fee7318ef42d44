#!/usr/bin/env python3
"""Random-weight checkpoint with the exact architecture of a released Qwen3-VL config.json (as
../shared/bench/README.md prescribes): Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg)),
torch.manual_seed(0), bf16, save_pretrained. Run on the GPU machine (transformers is there). Skips
work if OUT already holds it.

The MoE architecture (`model_type` qwen3_vl_moe, 30B-A3B) is built the same way through
Qwen3VLMoeConfig / Qwen3VLMoeForConditionalGeneration, directly in bf16 (fp32 first would not fit
the card), but written by hand in the *released* layout: transformers 5.x holds the fused experts
as nn.Linear-oriented [E, 2I, H] / [E, H, I] and its save_pretrained writes that, while the released
checkpoint (and qsens) has `mlp.experts.gate_up_proj` [E, H, 2I] and `mlp.experts.down_proj`
[E, I, H] (../shared/fixtures/README.md, qwen3-vl-moe-tiny). config.json is the released one, copied.
"""
import argparse, json, os, shutil, sys, time

import torch


def save_released_moe(model, config_path, out, max_shard=5 * 10**9):
    """Shards of at most `max_shard` bytes + model.safetensors.index.json, experts transposed to
    the released layout; every tensor checked against the expected shape."""
    from safetensors.torch import save_file

    cfg = json.load(open(config_path))["text_config"]
    e, h, i = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert h not in (i, 2 * i), "square expert matrices: the layout could not be told apart"
    os.makedirs(out, exist_ok=True)
    state = model.state_dict()
    need = sum(t.numel() * t.element_size() for t in state.values())
    free = shutil.disk_usage(out).free
    if free < need * 1.01:
        raise SystemExit(f"{out}: {free / 2**30:.1f} GiB free, the checkpoint needs {need / 2**30:.1f} GiB")
    shards, current, size = [], {}, 0
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            if tuple(t.shape) == (e, 2 * i, h):
                t = t.transpose(1, 2)
            assert tuple(t.shape) == (e, h, 2 * i), (name, t.shape)
        elif name.endswith("mlp.experts.down_proj"):
            if tuple(t.shape) == (e, h, i):
                t = t.transpose(1, 2)
            assert tuple(t.shape) == (e, i, h), (name, t.shape)
        t = t.contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        shard.clear()
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    shutil.copy(config_path, os.path.join(out, "config.json"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="released-style config.json of the architecture")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    done = os.path.join(args.out, ".complete")
    if os.path.exists(done):
        print(f"checkpoint already at {args.out}")
        return
    t0 = time.time()
    cfg = json.load(open(args.config))
    torch.manual_seed(0)
    if cfg.get("model_type") == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**cfg))
        torch.set_default_dtype(torch.float32)
        n = sum(p.numel() for p in model.parameters())
        save_released_moe(model, args.config, args.out)
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        with torch.device("cuda"):
            model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg)).to(torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(args.out, safe_serialization=True, max_shard_size="5GB")
    open(done, "w").write(f"{n}\n")
    print(f"checkpoint: {n:,} parameters, written to {args.out} in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
