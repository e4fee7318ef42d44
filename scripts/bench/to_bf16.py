#!/usr/bin/env python3
"""Copy of a single-file safetensors checkpoint with every F32 tensor rounded to BF16 (nearest
even), in plain Python (no numpy or torch here): halves the MoE fixture so that it fits the device
call's carry limit beside the binaries. Used by scripts/bench/pack.sh for the CUDA-vs-CPU check.
   to_bf16.py IN.safetensors OUT.safetensors
"""
import json, struct, sys
from array import array


def f32_to_bf16(raw: bytes) -> bytes:
    words = array("I", raw)
    if sys.byteorder != "little":
        words.byteswap()
    out = array("H", ((w + 0x7FFF + ((w >> 16) & 1)) >> 16 if (w & 0x7F800000) != 0x7F800000 else w >> 16
                      for w in words))
    return out.tobytes()


def main():
    src, dst = sys.argv[1], sys.argv[2]
    data = open(src, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    new_header, chunks, offset = {}, [], 0
    for name, info in header.items():
        if name == "__metadata__":
            new_header[name] = info
            continue
        begin, end = info["data_offsets"]
        raw = bytes(body[begin:end])
        dtype = info["dtype"]
        if dtype == "F32":
            raw, dtype = f32_to_bf16(raw), "BF16"
        new_header[name] = {"dtype": dtype, "shape": info["shape"], "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(new_header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)


if __name__ == "__main__":
    main()
