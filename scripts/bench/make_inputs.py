#!/usr/bin/env python3
"""Synthetic benchmark inputs in qsens' own `qsens.model-inputs` artifact (msgpack), so that
qsens and ModelOpt are fed the very same tensors. Each sample is the layout of
../shared/bench/README.md: 12 random text tokens, <|vision_start|>, 196 <|image_pad|> (one
448×448 image, grid 1×28×28), <|vision_end|>, 64 random text tokens; labels on the last 64.
Images are seeded random RGB noise (stored as the resized RGB bytes, as preprocess stores them).
"""
import argparse, sys

import msgpack
import numpy as np

IMAGE_PAD, VISION_START, VISION_END, IM_START, IM_END = 151655, 151652, 151653, 151644, 151645


def rope_index(n_before, grid, n_after, merge=2):
    """get_rope_index for [text × n_before][image][text × n_after] (one image, t = 1)."""
    t, h, w = grid
    gh, gw = h // merge, w // merge
    pos = [[], [], []]
    for i in range(n_before):
        for d in range(3):
            pos[d].append(i)
    for y in range(gh):
        for x in range(gw):
            pos[0].append(n_before)
            pos[1].append(n_before + y)
            pos[2].append(n_before + x)
    start = max(max(p) for p in pos) + 1
    for i in range(n_after):
        for d in range(3):
            pos[d].append(start + i)
    return pos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--size", type=int, default=448, help="image side (multiple of 32)")
    ap.add_argument("--sizes", default=None, help="one image side per sample, comma-separated (replaces --num/--size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    sides = [int(x) for x in args.sizes.split(",")] if args.sizes else [args.size] * args.num
    samples = []
    for k, side in enumerate(sides):
        grid = [1, side // 16, side // 16]
        n_img = grid[1] * grid[2] // 4
        before = rng.integers(0, 151643, 12).tolist()
        after = rng.integers(0, 151643, 64).tolist()
        ids = before + [VISION_START] + [IMAGE_PAD] * n_img + [VISION_END] + after
        labels = [-100] * (len(ids) - 64) + after
        pos = rope_index(13, grid, 65)
        assert len(pos[0]) == len(ids)
        rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        samples.append({
            "id": f"synthetic-{k:04d}",
            "text": "",
            "input_ids": ids,
            "labels": labels,
            "attention_mask": [1] * len(ids),
            "mm_token_type_ids": [1 if t == IMAGE_PAD else 0 for t in ids],
            "position_ids": pos,
            "rope_delta": max(max(p) for p in pos) + 1 - len(ids),
            "images": [{"grid_thw": grid, "height": side, "width": side, "rgb": rgb.tobytes()}],
        })
    artifact = {
        "kind": "qsens.model-inputs",
        "schema_version": 1,
        "tool": "scripts/bench/make_inputs.py",
        "tool_version": "0",
        "provenance": {"sources": [], "parameters": {"num": str(len(sides)), "seed": str(args.seed),
                                                   "size": args.sizes or str(args.size)}},
        "payload": {
            "processor": {
                "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                "min_pixels": 65536, "max_pixels": 16777216, "rescale_factor": 1 / 255,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            },
            "special_tokens": {"image_pad": IMAGE_PAD, "vision_start": VISION_START, "vision_end": VISION_END,
                               "im_start": IM_START, "im_end": IM_END},
            "samples": samples,
        },
    }
    with open(args.out, "wb") as f:
        f.write(msgpack.packb(artifact, use_bin_type=True))
    lengths = sorted({len(s["input_ids"]) for s in samples})
    print(f"{len(samples)} samples of {'/'.join(map(str, lengths))} tokens → {args.out}")


if __name__ == "__main__":
    sys.exit(main())
