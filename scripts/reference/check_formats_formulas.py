#!/usr/bin/env python3
"""Re-derives every stored ModelOpt fake-quant output of modelopt_formats.py from x with plain numpy
(float32 arithmetic, no torch, no ModelOpt) following the formulas written in
tests/data/modelopt_formats/README.md, and prints how many values differ bitwise. This is the spec the
Rust implementation follows; a non-zero count names a numerics detail the formula does not capture.

  python3 scripts/reference/check_formats_formulas.py DIR     (DIR: the folder with fake_quant.json)
"""
import json
import lzma
import os
import sys

import numpy as np

F32 = np.float32


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """round-to-nearest-even f32 -> bf16 (as uint16); finite inputs."""
    b = x.astype(F32).view(np.uint32)
    r = ((b >> 16) & 1) + 0x7FFF
    return ((b + r) >> 16).astype(np.uint16)


DT = {"F32": np.float32, "BF16": np.uint16, "I64": np.int64, "I32": np.int32, "F64": np.float64}


def load_st(buf):
    """Minimal safetensors reader (BF16 comes back as uint16 bit patterns)."""
    n = int.from_bytes(buf[:8], "little")
    hdr = json.loads(buf[8:8 + n])
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(buf[8 + n + a:8 + n + b], dtype=DT[v["dtype"]]).reshape(v["shape"])
    return out


def load_xz(path):
    with open(path, "rb") as f:
        return load_st(lzma.decompress(f.read()))


def as_f32(t):
    return bf16_to_f32(t) if t.dtype == np.uint16 else t.astype(F32)


def e4m3_rne(v):
    """RNE to E4M3 (fn) of |v| <= 448 (f32 array); keeps the sign (also of zero)."""
    a = np.abs(v).astype(np.float64)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(e, -6.0)
    quantum = 2.0 ** (e - 3)
    q = np.rint(a / quantum) * quantum
    return (np.copysign(q, v)).astype(F32)


def fp8_eager(x, amax, ieee_scale=False):
    """ModelOpt tensor_quant._fp8_eager (CPU path, and the 2D-block path on CUDA), all f32.

    Python's `448.0 / amax` is Tensor.__rtruediv__ = reciprocal(amax) * 448: two roundings, not one
    IEEE division. The CUDA extension (tensor_quant_gpu_fp8.cu) computes `448.f / safe_amax` in ATen C++,
    which is fill + div_: one IEEE division (ieee_scale=True); its E4M3 cast saturates like the clamp."""
    amax = amax.astype(F32)
    safe = np.where(amax <= F32(1.0 / (1 << 24)), F32(1.0), amax)
    if ieee_scale:
        s = (F32(448.0) / safe).astype(F32)
    else:
        s = ((F32(1.0) / safe).astype(F32) * F32(448.0)).astype(F32)
    sinv = (F32(1.0) / s).astype(F32)
    v = np.clip((x * s).astype(F32), F32(-448.0), F32(448.0))
    return (e4m3_rne(v) * sinv).astype(F32)


def fp8_cuda(x, amax):
    """tensor_quant_gpu_fp8.cu fake_e4m3fy / fake_e4m3fy_with_axis (per tensor, per channel, per token)."""
    return fp8_eager(x, amax, ieee_scale=True)


def int_legacy(x, amax, bits, narrow=False, cuda=False):
    """tensor_quant._tensor_quant (CPU) / tensor_quant_gpu.cu fake_tensor_quant_device (CUDA)."""
    amax = amax.astype(F32)
    maxb = F32(2.0 ** (bits - 1) - 1.0)
    minb = -maxb if narrow else -maxb - F32(1.0)
    eps = F32(1.0 / (1 << 24))
    scale = (maxb / np.where(amax > 0, amax, F32(1.0))).astype(F32)
    if cuda:
        zero = amax < eps
        out = np.clip(np.rint((x * scale).astype(F32)), minb, maxb)
        y = (out / scale).astype(F32)
        return np.where(zero, F32(0.0), y)
    zero = amax <= eps
    scale = np.where(zero, F32(0.0), scale).astype(F32)
    out = np.clip(np.rint((x * scale).astype(F32)), minb, maxb).astype(F32)
    return (out / np.where(zero, F32(1.0), scale)).astype(F32)


E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=F32)
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=F32)


def e2m1_round(a):
    """fp4_round_magnitude (Triton) == round_to_even over the E2M1 table (CUDA): ties to even code."""
    q = np.full(a.shape, F32(6.0))
    for i in range(6, -1, -1):
        b = E2M1_BOUNDS[i]
        lo, hi = E2M1_VALUES[i], E2M1_VALUES[i + 1]
        tie_to = lo if i % 2 == 0 else hi
        q = np.where(a < b, lo, np.where(a == b, tie_to, q))
    return q.astype(F32)


def nvfp4_triton(x, global_amax, block=16):
    """fp4_kernel_hopper.fp4_fake_quant_kernel with IEEE division (Triton's may differ)."""
    gs = (F32(global_amax) / F32(6.0 * 448.0)).astype(F32)
    gs = gs if gs > 0 else F32(1e-12)
    xb = x.reshape(-1, block)
    bmax = np.abs(xb).max(axis=1, keepdims=True).astype(F32)
    sc = (bmax / (F32(6.0) * gs).astype(F32)).astype(F32)
    sc = np.minimum(sc, F32(448.0))
    bq = (e4m3_rne(sc) * gs).astype(F32)
    bq = np.where(bq >= F32(1e-5), bq, F32(1.0)).astype(F32)
    q = e2m1_round((np.abs(xb) / bq).astype(F32))
    y = (q * bq).astype(F32)
    y = np.where(xb >= 0, y, -y)
    return y.reshape(x.shape)


def mx_cuda(x, fmt, block=32):
    """tensor_quant_mx.cu amax_and_convert_kernel with compute_scale_e8m0_NV, IEEE division, no FTZ."""
    emax = {"e4m3": 448.0, "e2m1": 6.0}[fmt]
    xb = x.reshape(-1, block)
    amax = np.abs(xb).max(axis=1, keepdims=True).astype(F32)
    ratio = (amax / F32(emax)).astype(F32)
    bits = ratio.view(np.uint32)
    ef = (bits >> 23) & 0xFF
    sf = bits & 0x7FFFFF
    up = (sf > 0) & (ef != 0xFE) & ~((ef == 0) & (sf <= 0x400000))
    e = np.where(up, ef.astype(np.int64) - 126, ef.astype(np.int64) - 127)
    e = np.where((amax == 0), 0, e)
    scale = np.ldexp(F32(1.0), -e).astype(F32)
    unscale = np.ldexp(F32(1.0), e).astype(F32)
    a = (np.abs(xb) * scale).astype(F32)
    if fmt == "e4m3":
        q = e4m3_rne(np.minimum(a, F32(448.0)))
    else:
        q = e2m1_round(a)
    y = (q * unscale).astype(F32)
    y = np.where(xb < 0, -y, y)
    return y.reshape(x.shape)


def compare(name, y_ref, y_formula, dtype):
    if dtype == "bf16":
        got = f32_to_bf16(y_formula)
        want = y_ref.view(np.uint16)
    else:
        got = y_formula.view(np.uint32)
        want = y_ref.view(np.uint32)
    d = int((got != want).sum())
    num = (as_f32(y_ref) != (bf16_to_f32(got) if dtype == "bf16" else got.view(F32)))
    print(f"  {name:60s} differ bitwise {d:8d} numerically {int(num.sum()):8d} of {want.size}")
    return d


def main():
    d = sys.argv[1]
    meta = json.load(open(os.path.join(d, "fake_quant.json")))
    inp = load_xz(os.path.join(d, "inputs.safetensors.xz"))
    calib = meta["calib_amax"]
    be = meta.get("backends", {})
    fp8_ext = bool(be.get("get_cuda_ext_fp8", {}).get("loaded"))     # else ModelOpt falls back to _fp8_eager
    int_ext = bool(be.get("get_cuda_ext", {}).get("loaded"))         # else the CPU formula (_tensor_quant)
    total = 0
    for name, fdoc in meta["formats"].items():
        p = os.path.join(d, f"{name}.safetensors.xz")
        if not os.path.exists(p):
            continue
        t = load_xz(p)
        print(name)
        for key in sorted(t):
            parts = key.split("/")
            if len(parts) != 4 or parts[3] not in ("y", "ye", "y_cpu", "ye_cpu"):
                continue
            _, q, dt, which = parts
            cpu = which.endswith("_cpu") or meta["versions"]["device_name"] == "cpu"
            x = as_f32(inp[f"{'x' if which.startswith('y') and not which.startswith('ye') else 'xe'}/{dt}"])
            y = t[key]
            r = None
            rows = x.shape[0]
            fp8 = fp8_eager if cpu or not fp8_ext else fp8_cuda
            if name in ("FP8_DEFAULT_CFG",) or (name == "W4A8_AWQ_BETA_CFG" and q == "input"):
                amax = np.abs(x).max() if q == "weight" else F32(calib[name])
                r = fp8(x, np.array(amax, dtype=F32))
            elif name == "FP8_PER_CHANNEL_PER_TOKEN_CFG":
                r = fp8(x, np.abs(x).max(axis=1, keepdims=True))
            elif name == "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG":
                xb = x.reshape(rows // 128, 128, -1, 128)
                amax = np.abs(xb).max(axis=(1, 3), keepdims=True)
                r = fp8_eager(xb, amax).reshape(x.shape)
            elif name == "INT8_DEFAULT_CFG":
                amax = np.abs(x).max(axis=1, keepdims=True) if q == "weight" else np.array(calib[name], dtype=F32)
                r = int_legacy(x, amax, 8, cuda=not cpu and int_ext)
            elif name in ("INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG") and q == "weight":
                xb = x.reshape(-1, 128)
                r = int_legacy(xb, np.abs(xb).max(axis=1, keepdims=True), 4, cuda=not cpu and int_ext).reshape(x.shape)
                if name == "W4A8_AWQ_BETA_CFG":   # stage 2: FP8 per-tensor, amax calibrated on the raw weight
                    if dt == "bf16":
                        r = bf16_to_f32(f32_to_bf16(r))
                    r = fp8(r, np.array(np.abs(x).max(), dtype=F32))
            elif name in ("NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG"):
                ga = np.abs(x).max() if q == "weight" else F32(calib["NVFP4_DEFAULT_CFG"])
                r = nvfp4_triton(x, ga)
            elif name == "MXFP8_DEFAULT_CFG":
                r = mx_cuda(x, "e4m3")
            elif name == "MXFP4_DEFAULT_CFG":
                r = mx_cuda(x, "e2m1")
            if r is None:
                continue
            total += compare(key, y, r.astype(F32), dt)
    print(f"total bitwise differences: {total}")


if __name__ == "__main__":
    main()
