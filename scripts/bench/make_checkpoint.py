#!/usr/bin/env python3
"""Random-weight checkpoint with the exact Qwen3-VL-4B architecture (as ../shared/bench/README.md
prescribes): Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg)), torch.manual_seed(0), bf16,
save_pretrained. Run on the GPU machine (transformers is there). Skips work if OUT already holds it.
"""
import argparse, json, os, sys, time

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration


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
    config = Qwen3VLConfig(**cfg)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="5GB")
    open(done, "w").write(f"{n}\n")
    print(f"checkpoint: {n:,} parameters, written to {args.out} in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
