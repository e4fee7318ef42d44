#!/usr/bin/env python3
"""Reference data made by NVIDIA ModelOpt 0.47 itself, for qsens' other quantization formats (issue 12).

Part A (fake quant): for each format, ModelOpt's own config dict (mtq.<CFG>) is applied by
`mtq.quantize` to a one-Linear model whose weight is the test matrix; the input quantizer is
calibrated by one forward of a calibration batch whose max is pinned (see CALIB_AMAX); then
ModelOpt's own `weight_quantizer(W)` and `input_quantizer(X)` are called on the test matrix and
their outputs are saved. That is exactly ModelOpt's pipeline (max_calibrate, the promotion of
static-block weight quantizers to StaticBlockScaleQuantizer, the CUDA / Triton kernels), with the
AWQ configs' algorithm replaced by plain "max" (no AWQ search in part A).

Part B (auto_quantize): `mtq.auto_quantize` on the qwen3-vl-tiny fixture with several
quantization_formats lists, gradient method, in the schema of
fixtures/modelopt/autoquant_gradient.json, plus the calibration state of every candidate.

Every output is written by this script; nothing is edited by hand. See
tests/data/modelopt_formats/README.md for the layout.

  python3 scripts/reference/modelopt_formats.py --out DIR [--device cuda|cpu] [--cpu-too]
         [--part A|B|AB] [--fixtures ../shared/fixtures] [--threads N] [--jobs N]
"""
import argparse
import contextlib
import copy
import hashlib
import io
import json
import lzma
import os
import platform
import sys
import time
import traceback
import warnings

import numpy as np
import torch

SEED = 20261202
ROWS, COLS = 1024, 1024          # the main test matrix x: 1,048,576 values
EXT_ROWS = 128                   # the extreme-values matrix xe: 131,072 values
XMAX = 2688.0                    # max|x| = 6 * 448: NVFP4 weight global scale = 1 exactly

# Part A formats: (config name, quantizers to test). The weight and input quantizers are taken
# from the config's own quant_cfg entries; "input" is left out where the config disables it.
FORMATS = [
    "NVFP4_DEFAULT_CFG",
    "W4A16_NVFP4_CFG",
    "MXFP8_DEFAULT_CFG",
    "MXFP4_DEFAULT_CFG",
    "FP8_DEFAULT_CFG",
    "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "INT8_DEFAULT_CFG",
    "INT4_AWQ_CFG",
    "W4A8_AWQ_BETA_CFG",
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
]
# Calibrated (static, per-tensor) input amax per format, chosen so that the scale is a power of
# two (ties in x stay ties after scaling) and so that the larger values of x saturate.
#   FP8 E4M3: scale = 448/amax = 1;  INT8: scale = 127/amax = 1;  NVFP4: global scale =
#   amax/(6*448) = 0.5.  Dynamic / MX input quantizers take no calibrated amax.
CALIB_AMAX = {
    "NVFP4_DEFAULT_CFG": 1344.0,
    "FP8_DEFAULT_CFG": 448.0,
    "INT8_DEFAULT_CFG": 127.0,
    "W4A8_AWQ_BETA_CFG": 448.0,
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}

# Part B: (tag, quantization_formats)
AUTOQUANT_RUNS = [
    ("nvfp4_fp8", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]),
    ("nvfp4awqlite_fp8", ["NVFP4_AWQ_LITE_CFG", "FP8_DEFAULT_CFG"]),
    ("int4awq_int8_fp8", ["INT4_AWQ_CFG", "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"]),
    ("int8sq_fp8", ["INT8_SMOOTHQUANT_CFG", "FP8_DEFAULT_CFG"]),
]
CPU_CAPABLE_RUNS = {"int4awq_int8_fp8", "int8sq_fp8"}
TARGET_BITS = [4.8, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0]
AQ_CONSTRAINT_BITS = 4.8
# Runs whose fewest-bits format has more bits (auto_quantize refuses a lower constraint); their
# targets start there too.
AQ_CONSTRAINT_BITS_OF = {"int8sq_fp8": 8.0}


def log(msg):
    print(f"[modelopt_formats {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# test inputs
# ----------------------------------------------------------------------------------------------
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_TIES = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def e4m3_values():
    """All finite non-negative E4M3 (fn) values."""
    v = [m * 2.0**-9 for m in range(8)]                      # subnormals (0 included)
    for e in range(-6, 9):
        for m in range(8):
            v.append((8 + m) * 2.0 ** (e - 3))
    return np.array(sorted(set(x for x in v if x <= 448.0)))


def e4m3_ties():
    v = e4m3_values()
    return (v[:-1] + v[1:]) / 2.0                             # every midpoint, exact in f32/bf16


def make_inputs(seed=SEED):
    """The main matrix x [1024, 1024] f32, in row bands (documented in the README):

    rows    0-383  normal values: N(0,1) * 2^k (k = row % 40 - 28, i.e. 2^-28..2^11) * u, u ~ U(0.5, 2)
                   per 16-block; clipped to +-0.99*XMAX
    rows  384-447  zeros: rows 384-391 all +0, 392-399 all -0; rows 400-447 normal values with
                   16-, 32-, 128-blocks and half rows of +0/-0, and scattered +-0
    rows  448-511  FP4 (E2M1) ties: every 16-block holds +-6*2^k and the others are E2M1 values
                   and E2M1 midpoints times 2^k (k = -8..8 per 32-block); for NVFP4 and MXFP4 the
                   block scale is exactly 2^k, so x/scale are exact ties
    rows  512-639  E4M3 ties, scale 1: every 32-block holds +-448, the others are E4M3 values and
                   midpoints (per-channel, per-token, the 128x128 tiles of rows 512-639 and MXFP8 all
                   get scale 1)
    rows  640-671  E4M3 ties times 2^k per 32-block (MXFP8 scale 2^k), k = -20..2
    rows  672-687  INT8 ties: every row holds +-127 and the others are k + 0.5 and integers
                   (per-row INT8 weight scale = 127/127 = 1; INT8 input calibrated amax 127)
    rows  688-703  INT4 ties: every 128-block holds +-7, the others are k + 0.5 and integers
    rows  704-831  tiny values: f32 subnormals, tiny normals (2^-126..2^-100), values that become
                   subnormal (or 0) in E4M3 / E2M1 / bf16 after scaling, blocks that are all tiny,
                   blocks with one moderate value and tiny others
    rows  832-1023 large values and values that saturate the calibrated input quantizers:
                   N(0,1) * 2^k (k = 5..11) clipped to XMAX, exact +-XMAX, +-448*m, +-127*m,
                   values just above/below 448, 127, 1344, 2688
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((ROWS, COLS), dtype=np.float64)
    sign = lambda shape: np.where(rng.random(shape) < 0.5, -1.0, 1.0)

    # rows 0-383: normal values at many scales
    for r in range(0, 384):
        k = r % 40 - 28
        u = np.repeat(rng.uniform(0.5, 2.0, COLS // 16), 16)
        x[r] = rng.standard_normal(COLS) * 2.0**k * u
    np.clip(x[:384], -0.99 * XMAX, 0.99 * XMAX, out=x[:384])

    # rows 384-447: zeros
    x[384:392] = 0.0
    x[392:400] = -0.0
    for r in range(400, 448):
        x[r] = rng.standard_normal(COLS) * 2.0 ** (r % 8 - 4)
        if r % 4 == 0:
            x[r, ::32][:] = 0.0
            for b in range(0, COLS, 32):        # every other 16-block zero
                x[r, b:b + 16] = 0.0
        elif r % 4 == 1:
            for b in range(0, COLS, 64):        # every other 32-block -0
                x[r, b:b + 32] = -0.0
        elif r % 4 == 2:
            for b in range(0, COLS, 256):       # every other 128-block zero
                x[r, b:b + 128] = 0.0
            x[r, COLS // 2:] = -0.0             # a half row of -0
        else:
            m = rng.random(COLS) < 0.3
            x[r, m] = np.where(rng.random(m.sum()) < 0.5, 0.0, -0.0)

    # rows 448-511: E2M1 ties (FP4: NVFP4 block 16, MXFP4 block 32)
    pool = np.concatenate([E2M1_TIES, E2M1_TIES, E2M1[1:]])
    for r in range(448, 512):
        for b in range(0, COLS, 32):
            k = int(rng.integers(-8, 9))
            blk = rng.choice(pool, 32) * sign(32)
            blk[0] = 6.0 * (1 if rng.random() < 0.5 else -1)
            blk[16] = 6.0 * (1 if rng.random() < 0.5 else -1)
            x[r, b:b + 32] = blk * 2.0**k

    # rows 512-671: E4M3 ties
    t8 = np.concatenate([e4m3_ties(), e4m3_values()[1:]])
    for r in range(512, 672):
        for b in range(0, COLS, 32):
            blk = rng.choice(t8, 32) * sign(32)
            blk[0] = 448.0 * (1 if rng.random() < 0.5 else -1)
            if r >= 640:
                blk = blk * 2.0 ** int(rng.integers(-20, 3))   # 448 * 2^2 < XMAX
            x[r, b:b + 32] = blk

    # rows 672-687: INT8 ties (row max 127); rows 688-703: INT4 ties (128-block max 7)
    i8 = np.concatenate([np.arange(-126, 127) + 0.5, np.arange(-127, 128)])
    for r in range(672, 688):
        x[r] = rng.choice(i8, COLS)
        x[r, rng.integers(0, COLS)] = 127.0 * (1 if r % 2 else -1)
    i4 = np.concatenate([np.arange(-7, 7) + 0.5, np.arange(-7, 8)])
    for r in range(688, 704):
        x[r] = rng.choice(i4, COLS)
        for b in range(0, COLS, 128):
            x[r, b + int(rng.integers(0, 128))] = 7.0 * (1 if rng.random() < 0.5 else -1)

    # rows 704-831: tiny values
    for r in range(704, 832):
        kind = r % 8
        if kind == 0:    # f32 subnormals (random mantissas)
            x[r] = rng.integers(1, 2**23, COLS) * 2.0**-149 * sign(COLS)
        elif kind == 1:  # smallest normals .. 2^-100
            x[r] = rng.uniform(1, 2, COLS) * 2.0 ** rng.integers(-126, -99, COLS) * sign(COLS)
        elif kind == 2:  # one moderate value per 16-block, tiny others (flush to 0 / subnormal)
            x[r] = rng.standard_normal(COLS) * 2.0 ** rng.integers(-30, -5, COLS)
            x[r, ::16] = rng.uniform(1, 6, COLS // 16) * sign(COLS // 16)
        elif kind == 3:  # E4M3 subnormal range after scale 1 (rows share 448 per 32-block)
            x[r] = rng.integers(0, 64, COLS) * 2.0**-12 * sign(COLS)
            x[r, ::32] = 448.0
        elif kind == 4:  # whole blocks around the NVFP4 1e-5 scale threshold and E4M3 min
            x[r] = rng.uniform(0.5, 1.0, COLS) * 2.0 ** np.repeat(rng.integers(-24, -8, COLS // 16), 16) * sign(COLS)
        elif kind == 5:  # bf16 subnormals (exact in bf16)
            x[r] = rng.integers(1, 128, COLS) * 2.0**-133 * sign(COLS)
        elif kind == 6:  # single tiny value in otherwise zero blocks
            x[r] = 0.0
            x[r, ::16] = rng.uniform(1, 2, COLS // 16) * 2.0 ** rng.integers(-149, -60, COLS // 16)
        else:            # E2M1 subnormal (0.5) and flush region relative to a 6*2^k block max
            k = rng.integers(-6, 6, COLS // 16)
            x[r] = rng.choice([0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75], COLS) * np.repeat(2.0**k, 16) * sign(COLS)
            x[r, ::16] = 6.0 * 2.0**k
    # rows 832-1023: large values, saturation
    for r in range(832, 1024):
        kind = r % 4
        if kind == 0:
            x[r] = rng.standard_normal(COLS) * 2.0 ** (5 + r % 7)
        elif kind == 1:
            x[r] = rng.choice([448.0, 449.0, 464.0, 480.0, 127.0, 127.5, 128.0, 1344.0, 1345.0, 2688.0,
                               2687.0, 447.0, 126.5, 1343.0, 896.0, 254.0], COLS) * sign(COLS)
        elif kind == 2:
            x[r] = rng.uniform(-XMAX, XMAX, COLS)
        else:
            x[r] = rng.standard_normal(COLS) * 100.0
    np.clip(x[832:], -XMAX, XMAX, out=x[832:])
    x[1023, 0] = XMAX
    x[1022, 1] = -XMAX
    xf = torch.from_numpy(x.astype(np.float32))
    assert float(xf.abs().max()) == XMAX

    # the extreme matrix xe [128, 1024]: near f32 max, huge, mixed with subnormals and zeros
    e = np.zeros((EXT_ROWS, COLS), dtype=np.float64)
    fmax = float(np.finfo(np.float32).max)
    for r in range(EXT_ROWS):
        kind = r % 4
        if kind == 0:
            e[r] = rng.uniform(0.5, 1.0, COLS) * 2.0 ** rng.integers(100, 128, COLS) * sign(COLS)
        elif kind == 1:
            e[r] = rng.standard_normal(COLS) * 2.0 ** rng.integers(-149, 128, COLS)
        elif kind == 2:
            e[r] = rng.choice([fmax, -fmax, 1e38, 3e38, 2.0**127, 1.0, 0.0, -0.0, 2.0**-149, 448.0], COLS)
        else:
            e[r] = rng.standard_normal(COLS) * 1e30
            e[r, ::16] = 0.0
    e = np.clip(e, -fmax, fmax)
    e[0, 0] = fmax
    ef = torch.from_numpy(e.astype(np.float32))
    assert torch.isfinite(ef).all()
    return {"x": xf, "xe": ef}


BF16_MAX = 3.3895313892515355e38


def as_dtype(x, dt):
    """The test matrix in dtype dt: f32 as is; bf16 = clamp to +-bf16 max (only xe has larger values),
    then round-to-nearest-even cast (torch's .to(torch.bfloat16))."""
    if dt == torch.bfloat16:
        x = x.clamp(-BF16_MAX, BF16_MAX)
    y = x.to(dt).contiguous()
    assert torch.isfinite(y).all()
    return y


def calib_batch(x, amax):
    """One calibration row: x[0] clipped to +-amax, with x[0,0] = amax, so max|batch| = amax exactly."""
    c = x[:1].clone().float().clamp(-amax, amax)
    c[0, 0] = amax
    return c


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def versions(device):
    import modelopt
    import transformers
    v = {
        "modelopt": modelopt.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        v["triton"] = f"not importable: {e}"
    if device == "cuda":
        v["device_name"] = torch.cuda.get_device_name(0)
        v["device_capability"] = list(torch.cuda.get_device_capability(0))
        v["cuda_driver"] = getattr(torch.cuda, "driver_version", lambda: None)() if hasattr(torch.cuda, "driver_version") else None
    else:
        v["device_name"] = "cpu"
    return v


def backend_status(device):
    """Which of ModelOpt's kernels are available: this decides the code path of each format."""
    st = {}
    if device != "cuda":
        return {"note": "CPU: no CUDA extension, no Triton kernels (ModelOpt's CPU fallbacks)"}
    from modelopt.torch.quantization import extensions as ext
    import modelopt.torch.kernels.quantization.gemm as tk
    for name in ("get_cuda_ext", "get_cuda_ext_fp8", "get_cuda_ext_mx"):
        t0 = time.time()
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                m = getattr(ext, name)()
            st[name] = {"loaded": m is not None, "s": round(time.time() - t0, 1),
                        "warnings": [str(x.message)[-2000:] for x in w], "stdout": buf.getvalue()[-2000:]}
        except Exception as e:  # noqa: BLE001
            st[name] = {"loaded": False, "error": repr(e)[-2000:], "s": round(time.time() - t0, 1)}
    st["triton_IS_AVAILABLE"] = bool(tk.IS_AVAILABLE)
    st["triton_fp4_fake_quant_block"] = hasattr(tk, "fp4_fake_quant_block")
    st["triton_static_blockwise_fp4_fake_quant"] = hasattr(tk, "static_blockwise_fp4_fake_quant")
    from modelopt.torch.quantization import tensor_quant
    st["DISABLE_TRITON_KERNEL"] = tensor_quant.DISABLE_TRITON_KERNEL
    return st


def jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu()
        return v.item() if v.numel() == 1 else {"shape": list(v.shape), "stored_in_safetensors": True}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


def quantizer_info(q):
    """The attributes ModelOpt holds for a quantizer (a TensorQuantizer or a SequentialQuantizer)."""
    from modelopt.torch.quantization.nn import SequentialQuantizer
    if isinstance(q, SequentialQuantizer):
        return {"class": type(q).__name__, "repr": repr(q), "stages": [quantizer_info(s) for s in q]}
    info = {"class": type(q).__name__, "repr": repr(q)}
    for a in ("num_bits", "axis", "block_sizes", "unsigned", "narrow_range", "fake_quant", "is_enabled",
              "is_mx_format", "is_static_block_quant", "maxbound"):
        try:
            info[a] = jsonable(getattr(q, a))
        except Exception as e:  # noqa: BLE001
            info[a] = f"error: {e!r}"
    for a in ("_dynamic", "_if_quant", "_if_calib", "_disabled", "_pass_through_bwd", "_trt_high_precision_dtype",
              "_quant_max_bound", "_is_static_block_scale_quantizer", "_is_nvfp4_static_quantizer",
              "_block_reshape_size", "_original_shape", "_amax_shape_for_export"):
        if hasattr(q, a):
            info[a] = jsonable(getattr(q, a))
    for a in ("_amax", "_global_amax", "_pre_quant_scale"):
        t = getattr(q, a, None)
        if isinstance(t, torch.Tensor):
            info[a] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                       "value": t.float().item() if t.numel() == 1 else "in safetensors",
                       "max": float(t.float().max()), "min": float(t.float().min())}
    return info


def quantizer_tensors(q, prefix):
    from modelopt.torch.quantization.nn import SequentialQuantizer
    out = {}
    if isinstance(q, SequentialQuantizer):
        for i, s in enumerate(q):
            out.update(quantizer_tensors(s, f"{prefix}/stage{i}"))
        return out
    for a in ("_amax", "_global_amax", "_pre_quant_scale"):
        t = getattr(q, a, None)
        if isinstance(t, torch.Tensor):
            out[f"{prefix}/{a.lstrip('_')}"] = t.detach().cpu().contiguous()
    return out


def format_cfg(name, mtq):
    cfg = copy.deepcopy(getattr(mtq, name))
    alg = cfg.get("algorithm")
    method = alg.get("method") if isinstance(alg, dict) else alg
    if method is not None and method != "max":
        cfg["algorithm"] = "max"       # part A: plain quantizers, no AWQ search
    return cfg, alg


def quant_entries(cfg):
    ent = {}
    for e in cfg["quant_cfg"]:
        if e.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer"):
            ent[e["quantizer_name"].lstrip("*")] = e
    return ent


def run_format(name, inputs, device, dtype):
    """Quantize `inputs` with the weight and input quantizers of config `name`. Returns
    ({"weight": {tensor_name: y}, "input": {...}}, info, tensors)."""
    import modelopt.torch.quantization as mtq
    cfg, orig_alg = format_cfg(name, mtq)
    ent = quant_entries(cfg)
    results, info, tens = {}, {"algorithm_in_config": jsonable(orig_alg), "algorithm_used": cfg.get("algorithm"),
                               "quant_cfg_entries": jsonable(ent)}, {}
    amax_in = CALIB_AMAX.get(name)
    for tname, x in inputs.items():
        w = x.to(device=device, dtype=dtype)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        model = torch.nn.Sequential()
        model.add_module("lin", lin)
        calib = (calib_batch(x, amax_in) if amax_in is not None else x[:1].float()).to(device=device, dtype=dtype)
        out_buf = io.StringIO()
        with warnings.catch_warnings(record=True) as wl, contextlib.redirect_stdout(out_buf):
            warnings.simplefilter("always")
            model = mtq.quantize(model, cfg, forward_loop=lambda m: m(calib))
            lq = model.lin
            qs = {"weight": lq.weight_quantizer, "input": lq.input_quantizer}
            res = {}
            with torch.no_grad():
                for qn, q in qs.items():
                    if not q.is_enabled:
                        continue
                    y = q(w)
                    res[qn] = y.detach().to("cpu").contiguous()
        key = f"{tname}"
        for qn, q in qs.items():
            if not q.is_enabled:
                continue
            results.setdefault(qn, {})[key] = res[qn]
            info.setdefault(qn, {})[key] = quantizer_info(q)
            tens.update(quantizer_tensors(q, f"{qn}/{key}"))
        info.setdefault("warnings", {})[key] = sorted({str(m.message)[:1000] for m in wl})
        info.setdefault("stdout", {})[key] = out_buf.getvalue()[-3000:]
        info.setdefault("calibration", {})[key] = (
            {"input_calib_amax": amax_in, "calib_batch": "x[0:1] clipped to +-amax, [0,0] = amax"}
            if amax_in is not None else {"calib_batch": "x[0:1] (input quantizer dynamic or disabled)"})
        del model, lin
    return results, info, tens


def bits_of(t):
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t.view(torch.int16)


def compare(a, b):
    """a, b same dtype tensors: counts of differing values (bitwise) and of numerically differing ones."""
    ba, bb = bits_of(a), bits_of(b)
    diff_bits = int((ba != bb).sum())
    af, bf = a.float(), b.float()
    both_nan = torch.isnan(af) & torch.isnan(bf)
    num = (af != bf) & ~both_nan
    d = {"bitwise_differing": diff_bits, "numerically_differing": int(num.sum()),
         "signed_zero_only": int(((ba != bb) & (af == bf)).sum()), "numel": a.numel()}
    if int(num.sum()):
        fin = num & torch.isfinite(af) & torch.isfinite(bf)
        d["max_abs_diff"] = float((af - bf)[fin].abs().max()) if int(fin.sum()) else None
        idx = torch.nonzero(num.view(-1))[:8].view(-1)
        d["first_differences"] = [{"flat_index": int(i), "gpu": float(af.view(-1)[i]), "cpu": float(bf.view(-1)[i])} for i in idx]
    return d


def _compress_one(args):
    path, raw = args
    data = lzma.compress(raw, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    with open(path, "wb") as f:
        f.write(data)
    return path, len(raw), len(data)


def write_xz_safetensors(jobs, nproc):
    """jobs: list of (path, {name: tensor}, metadata). Serialises with safetensors and compresses
    with lzma (preset 9 | PRESET_EXTREME), in parallel processes."""
    from safetensors.torch import save
    work = [(p, save({k: v.contiguous() for k, v in sorted(t.items())}, metadata=md)) for p, t, md in jobs]
    if nproc > 1 and len(work) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(min(nproc, len(work))) as pool:
            return pool.map(_compress_one, work)
    return [_compress_one(w) for w in work]


# ----------------------------------------------------------------------------------------------
# part A
# ----------------------------------------------------------------------------------------------
def part_a(args, out):
    import modelopt.torch.quantization as mtq  # noqa: F401
    dev = args.device
    devices = [dev] + (["cpu"] if dev == "cuda" and args.cpu_too else [])
    inputs = make_inputs()
    doc = {"versions": versions(dev), "seed": SEED, "command": " ".join(sys.argv),
           "shapes": {k: list(v.shape) for k, v in inputs.items()}, "xmax": XMAX, "calib_amax": CALIB_AMAX,
           "backends": backend_status(dev), "formats": {}, "skipped": {}}
    tin = {}
    for tn, x in inputs.items():
        for dn, dt in DTYPES.items():
            tin[f"{tn}/{dn}"] = as_dtype(x, dt)
    jobs = [(os.path.join(out, "inputs.safetensors.xz"), tin,
             {"note": "x = main matrix, xe = extreme matrix; bf16 = the f32 matrix clamped to +-bf16 max and cast with round-to-nearest-even"})]
    seen_outputs = {}
    only = args.formats.split(",") if args.formats else FORMATS
    if args.no_inputs:  # a later process of the same run: the inputs are already written
        jobs = []
    for name in [f for f in FORMATS if f in only]:
        t0 = time.time()
        fdoc = {"per_device": {}}
        tens = {}
        ys = {}
        for d in devices:
            for dn, dt in DTYPES.items():
                tag = f"{d}/{dn}"
                try:
                    src = {tn: as_dtype(inputs[tn], dt) for tn in inputs}
                    res, info, qt = run_format(name, src, d, dt)
                    fdoc["per_device"][tag] = {"ok": True, **info}
                    for qn, r in res.items():
                        for tn, y in r.items():
                            ys[(d, qn, dn, tn)] = y
                    for k, v in qt.items():
                        tens[f"{name}/{k.split('/')[0]}/{dn}/{k.split('/', 1)[1].replace('/', '_')}" + ("" if d == dev else "_cpu")] = v
                except Exception as e:  # noqa: BLE001
                    fdoc["per_device"][tag] = {"ok": False, "error": repr(e)[-3000:],
                                               "traceback": traceback.format_exc()[-4000:]}
                    log(f"{name} on {tag}: not run: {e!r}"[:300])
        # outputs of the main device, then the CPU ones (stored only where they differ)
        cmp = {}
        stored = {}
        for (d, qn, dn, tn), y in sorted(ys.items()):
            if d != dev:
                continue
            key = f"{name}/{qn}/{dn}/{'y' if tn == 'x' else 'ye'}"
            h = hashlib.sha256(y.view(torch.uint8).numpy().tobytes() if y.dtype != torch.bfloat16
                               else y.view(torch.int16).numpy().tobytes()).hexdigest()
            if h in seen_outputs:     # bit-identical to an output already stored (e.g. W4A16 = NVFP4 weight)
                stored[key] = {"same_as": seen_outputs[h]}
            else:
                seen_outputs[h] = key
                tens[key] = y
                stored[key] = list(y.shape)
            yc = ys.get(("cpu", qn, dn, tn)) if dev != "cpu" else None
            if yc is not None:
                c = compare(y, yc)
                cmp[key] = c
                nd = c["bitwise_differing"]
                if nd and nd <= y.numel() // 20:   # few differences: store them sparsely
                    idx = torch.nonzero(bits_of(y).reshape(-1) != bits_of(yc).reshape(-1)).reshape(-1)
                    tens[key + "_cpu_diff_index"] = idx.to(torch.int64)
                    tens[key + "_cpu_diff_value"] = yc.reshape(-1)[idx].contiguous()
                    stored[key + "_cpu"] = {"sparse": [key + "_cpu_diff_index", key + "_cpu_diff_value"], "count": nd}
                elif nd:
                    tens[key + "_cpu"] = yc
                    stored[key + "_cpu"] = list(yc.shape)
        # same output for two quantizers of one dtype (e.g. NVFP4 weight == input)? note it
        fdoc["cpu_vs_main_device"] = cmp if dev != "cpu" else "main device is the CPU"
        fdoc["stored"] = stored
        fdoc["seconds"] = round(time.time() - t0, 2)
        doc["formats"][name] = fdoc
        if tens:
            jobs.append((os.path.join(out, f"{name}.safetensors.xz"), tens, {"format": name}))
        ok = [t for t, v in fdoc["per_device"].items() if v["ok"]]
        bad = [t for t, v in fdoc["per_device"].items() if not v["ok"]]
        log(f"{name}: ran on {ok}{', NOT on ' + str(bad) if bad else ''}; "
            + "; ".join(f"{k.split('/', 1)[1]} cpu-diff {v['bitwise_differing']}" for k, v in cmp.items()))
    # CPU-vs-GPU summary
    doc["cpu_gpu_difference_summary"] = {
        k: {kk: vv["bitwise_differing"] for kk, vv in v["cpu_vs_main_device"].items()}
        for k, v in doc["formats"].items() if isinstance(v["cpu_vs_main_device"], dict)}
    t0 = time.time()
    sizes = write_xz_safetensors(jobs, args.jobs)
    doc["files"] = {os.path.basename(p): {"raw_bytes": r, "xz_bytes": c} for p, r, c in sizes}
    doc["compress_s"] = round(time.time() - t0, 1)
    with open(os.path.join(out, args.json), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
    log(f"part A written ({sum(c for _, _, c in sizes) / 1e6:.1f} MB xz, compress {doc['compress_s']} s)")


# ----------------------------------------------------------------------------------------------
# part B
# ----------------------------------------------------------------------------------------------
def load_samples(fixtures, device):
    from safetensors.torch import load_file
    out, names = [], []
    for k in range(4):
        fn = f"sample_{k:02d}.safetensors"
        s = load_file(os.path.join(fixtures, "reference", fn))
        pv = (s["pixel_values_u8"].to(torch.float32) - 127.5) / 127.5
        out.append({
            "input_ids": s["input_ids"].to(device),
            "attention_mask": s["attention_mask"].to(device),
            "labels": s["labels"].to(device),
            "mm_token_type_ids": s["mm_token_type_ids"].to(device),
            "pixel_values": pv.to(device),
            "image_grid_thw": s["image_grid_thw"].to(device),
        })
        names.append(fn)
    return out, names


def _fmt(recipe):
    return str(recipe)


def part_b(args, out, device, tag, formats):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import model_calib
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe
    from modelopt.torch.quantization.nn import TensorQuantizer
    from transformers import Qwen3VLForConditionalGeneration

    t0 = time.time()
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        os.path.join(args.fixtures, "qwen3-vl-tiny"), dtype=torch.float32).to(device)
    model.eval()
    data, names = load_samples(args.fixtures, device)
    with torch.no_grad():
        unq = [float(model(**b).loss) for b in data]

    # spy on awq_lite: record best_alpha / losses / scales of every module before ModelOpt drops them
    awq_log = []
    orig_apply = model_calib.apply_pre_quant_scale_and_smooth

    def spy(linear, pre_quant_scale=None):
        h = getattr(linear, "awq_lite", None)
        if h is not None:
            awq_log.append({
                "module": h.name, "best_alpha": h.best_alpha,
                "loss_per_alpha": {f"{k:.1f}": float(v) for k, v in h.loss.items()},
                "num_cache_steps": h.num_cache_steps, "num_search_steps": h.num_search_steps,
                "block_size": h.block_size,
                "_t": {"best_scale": h.best_scale.detach().float().cpu().clone(),
                       "act_scale": torch.as_tensor(h.act_scale).detach().float().cpu().clone(),
                       "weight_scale": h.weight_scale.detach().float().cpu().clone()},
            })
        return orig_apply(linear, pre_quant_scale)

    model_calib.apply_pre_quant_scale_and_smooth = spy
    constraint = AQ_CONSTRAINT_BITS_OF.get(tag, AQ_CONSTRAINT_BITS)
    buf = io.StringIO()
    ts = time.time()
    try:
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            tee = _Tee(sys.stdout, buf)
            with contextlib.redirect_stdout(tee):
                model, state = mtq.auto_quantize(
                    model,
                    constraints={"effective_bits": constraint},
                    quantization_formats=list(formats),
                    data_loader=data,
                    forward_step=lambda m, b: m(**b),
                    loss_func=lambda o, b: o.loss,
                    num_calib_steps=4,
                    num_score_steps=4,
                    verbose=True,
                    method="gradient",
                )
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        model_calib.apply_pre_quant_scale_and_smooth = orig_apply
    wall = time.time() - ts

    tensors = {}
    groups = []
    for hname, st in state["candidate_stats"].items():
        groups.append({
            "group": hname.removesuffix(".quant_recipe"), "hparam": hname,
            "modules": list(st["module_names"]), "formats": [_fmt(f) for f in st["formats"]],
            "scores": [float(x) for x in st["scores"]], "costs": [float(x) for x in st["costs"]],
            "uncompressed_cost": float(st.get("uncompressed_cost", max(st["costs"]))),
            "cost_weight": float(st.get("cost_weight", 1.0)),
        })
    best = state["best"]
    targets = []
    for b in [b for b in TARGET_BITS if b >= constraint]:
        lb = io.StringIO()
        with contextlib.redirect_stdout(lb):
            rec = _resolve_best_recipe(state, {"effective_bits": b}, verbose=True)
        recipe = {k.removesuffix(".quant_recipe"): _fmt(v) for k, v in rec.items()}
        ach, score = _achieved(groups, recipe, state)
        targets.append({"effective_bits_target": b, "effective_bits_achieved": ach, "total_score": score,
                        "quantized_groups": [k for k, v in recipe.items() if not v.startswith("NONE")],
                        "recipe": recipe, "solver_log": [l for l in lb.getvalue().splitlines() if l.strip()]})

    # the quantizers of the returned model
    after = {}
    for n, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            a = getattr(m, "_amax", None)
            e = {"class": type(m).__name__, "enabled": m.is_enabled, "num_bits": jsonable(m.num_bits),
                 "axis": jsonable(m.axis), "block_sizes": jsonable(m.block_sizes)}
            if isinstance(a, torch.Tensor):
                e["amax"] = a.float().item() if a.numel() == 1 else {"shape": list(a.shape), "tensor": f"after/{n}/amax"}
                if a.numel() > 1:
                    tensors[f"after/{n}/amax"] = a.detach().float().cpu().contiguous()
            else:
                e["amax"] = None
            for extra in ("_global_amax", "_pre_quant_scale"):
                t = getattr(m, extra, None)
                if isinstance(t, torch.Tensor):
                    tensors[f"after/{n}/{extra.lstrip('_')}"] = t.detach().float().cpu().contiguous()
                    e[extra.lstrip("_")] = f"after/{n}/{extra.lstrip('_')}"
            after[n] = e

    # every candidate's calibration (quantizer_states of the search state)
    per_recipe = {}
    for recipe, saved in state.get("quantizer_states", {}).items():
        rn = _fmt(recipe)
        d = {}
        for qn, sd in saved["state_dict"].items():
            meta = saved["metadata"].get(qn, {}) if isinstance(saved.get("metadata"), dict) else {}
            if isinstance(meta, dict) and meta.get("_disabled", False):
                continue
            ent = {}
            for bk, bv in sd.items():
                if not isinstance(bv, torch.Tensor):
                    continue
                if bv.numel() == 1:
                    ent[bk.lstrip("_")] = float(bv.float())
                else:
                    tk = f"recipe/{rn}/{qn}/{bk.lstrip('_')}"
                    tensors[tk] = bv.detach().float().cpu().contiguous()
                    ent[bk.lstrip("_")] = {"shape": list(bv.shape), "tensor": tk,
                                           "max": float(bv.float().max()), "min": float(bv.float().min())}
            if ent:
                d[qn] = ent
        per_recipe[rn] = d

    awq = []
    for i, e in enumerate(awq_log):
        t = e.pop("_t")
        for k, v in t.items():
            tensors[f"awq_lite/{i:03d}/{k}"] = v.contiguous()
        e["tensors"] = {k: f"awq_lite/{i:03d}/{k}" for k in t}
        awq.append(e)

    with torch.no_grad():
        qloss = [float(model(**b).loss) for b in data]

    doc = {
        "variant": "tiny", "method": "gradient", "tag": tag,
        "versions": versions(device), "device": device, "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "auto_quantize_kwargs": {
            "constraints": {"effective_bits": constraint}, "quantization_formats": list(formats),
            "data_loader": "list of 4 batches (reference samples, batch size 1)", "forward_step": "model(**batch)",
            "num_calib_steps": 4, "num_score_steps": 4, "verbose": True, "method": "gradient",
            "loss_func": "output.loss"},
        "disabled_layers": None, "samples": names, "unquantized_loss_per_sample": unq,
        "wall_time_s": wall, "load_s": ts - t0, "effective_bits_constraint": constraint,
        "groups": groups,
        "best": {"recipe": {k.removesuffix(".quant_recipe"): _fmt(v) for k, v in best["recipe"].items()},
                 "effective_bits": _achieved(groups, {k.removesuffix(".quant_recipe"): _fmt(v)
                                                      for k, v in best["recipe"].items()}, state)[0],
                 "total_score": jsonable(best.get("score")), "is_satisfied": jsonable(best.get("is_satisfied")),
                 "constraints": jsonable(best.get("constraints"))},
        "cost_denominator": jsonable(state.get("cost_denominator")),
        "quantizer_amax_after_auto_quantize": after,
        "calibrated_amax_per_recipe": per_recipe,
        "awq_lite": awq,
        "quantized_loss_per_sample": qloss,
        "targets": targets,
        "warnings": sorted({str(w.message)[:1000] for w in wl}),
        "log_tail": buf.getvalue()[-20000:],
        "notes": ("Same calls as fixtures/modelopt/autoquant_gradient.json (gradient, loss output.loss, 4 calib + "
                  "4 score steps, the 4 reference samples in order, batch 1), with several quantization formats. "
                  "AWQ recipes calibrate on max(1, num_calib_steps // 4) = 1 step (ModelOpt's rule, "
                  "algorithms.py). targets are re-solved with _resolve_best_recipe (what "
                  "get_auto_quantize_config(search_state, constraints) uses); effective_bits_achieved = "
                  "16 * sum(selected costs * cost_weight) / cost_denominator computed here from candidate_stats. "
                  "awq_lite lists, per AWQ-calibrated module and in call order, best_alpha and the loss per alpha "
                  "recorded by wrapping model_calib.apply_pre_quant_scale_and_smooth (which awq_lite calls with "
                  "1/best_scale just before it deletes its helper). Per-block / per-channel arrays are in the "
                  ".safetensors beside this file."),
    }
    base = os.path.join(out, f"autoquant_{tag}" + ("" if device == args.device else f"_{device}"))
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    if tensors:
        from safetensors.torch import save_file
        # clone: a tensor recorded twice (the same amax after the search and in its recipe) must not share memory
        save_file({k: v.clone() for k, v in sorted(tensors.items())}, base + ".safetensors", metadata={"tag": tag})
    log(f"auto_quantize {tag} on {device}: {wall:.1f} s, best bits {doc['best']['effective_bits']:.4f}, "
        f"{len(groups)} groups, {len(awq)} awq_lite modules")
    return doc


def _achieved(groups, recipe, state):
    den = state.get("cost_denominator") or sum(g["uncompressed_cost"] for g in groups)
    cost = score = 0.0
    for g in groups:
        r = recipe.get(g["group"])
        if r is None or r not in g["formats"]:
            continue
        i = g["formats"].index(r)
        cost += g["costs"][i] * g["cost_weight"]
        score += g["scores"][i]
    return 16.0 * cost / den, score


class _Tee(io.TextIOBase):
    def __init__(self, *s):
        self.s = s

    def write(self, t):
        for s in self.s:
            s.write(t)
        return len(t)

    def flush(self):
        for s in self.s:
            s.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--cpu-too", action="store_true", help="also run the CPU-capable parts on the CPU")
    ap.add_argument("--part", default="AB", choices=["A", "B", "AB"])
    ap.add_argument("--fixtures", default=os.environ.get("FIXTURES", "../shared/fixtures"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel lzma processes")
    ap.add_argument("--runs", default=",".join(t for t, _ in AUTOQUANT_RUNS), help="part B run tags")
    ap.add_argument("--formats", default="", help="part A: only these configs (comma list)")
    ap.add_argument("--no-inputs", action="store_true", help="part A: do not write inputs.safetensors.xz")
    ap.add_argument("--json", default="fake_quant.json", help="part A: name of the summary JSON")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    # float32 means float32: cuDNN convolutions (the vision patch embedding) default to TF32 on
    # the GPU, which moves every vision activation by ~1e-3 and makes the runs incomparable with
    # an f32 computation.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    import modelopt.torch.quantization  # noqa: F401
    log(f"modelopt imported in {time.time() - t0:.1f} s; device {args.device}")
    summary = {"command": " ".join(sys.argv), "device": args.device, "errors": {}}
    if "A" in args.part:
        try:
            part_a(args, args.out)
        except Exception as e:  # noqa: BLE001  (part B still runs)
            traceback.print_exc()
            summary["errors"]["part_a"] = repr(e)[-3000:]
    if "B" in args.part:
        for tag, formats in AUTOQUANT_RUNS:
            if tag not in args.runs.split(","):
                continue
            devs = [args.device]
            if args.device == "cuda" and args.cpu_too and tag in CPU_CAPABLE_RUNS:
                devs.append("cpu")
            for d in devs:
                if d == "cpu" and tag not in CPU_CAPABLE_RUNS:
                    log(f"auto_quantize {tag}: skipped on CPU (NVFP4 fake quant is CUDA-only in ModelOpt 0.47)")
                    summary["errors"][f"{tag}/{d}"] = "skipped: CUDA-only format"
                    continue
                try:
                    part_b(args, args.out, d, tag, formats)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    summary["errors"][f"{tag}/{d}"] = repr(e)[-3000:]
    summary["total_s"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"done in {summary['total_s']} s; errors: {summary['errors'] or 'none'}")


if __name__ == "__main__":
    main()
