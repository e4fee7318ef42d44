#!/usr/bin/env python3
"""A multi-format qsens score-layers run beside ModelOpt auto_quantize with the same formats, on the
same checkpoint and inputs: wall times, peak GPU memory, and per format the Spearman correlation and
median relative difference of the per-group scores (groups matched by their members, formats by
ModelOpt config name).
Usage: compare_formats.py --scores S.msgpack --timings T.json --mem M.json --modelopt MO.json
                          --modelopt-mem MOM.json [--json OUT]
"""
import argparse, json

import msgpack

from compare import spearman

# qsens format name -> ModelOpt config name (src/quant/format.rs)
MODELOPT = {"FP8": "FP8_DEFAULT_CFG", "NVFP4": "NVFP4_DEFAULT_CFG", "NVFP4_AWQ_LITE": "NVFP4_AWQ_LITE_CFG",
            "W4A16_NVFP4": "W4A16_NVFP4_CFG", "INT4_AWQ": "INT4_AWQ_CFG", "INT8": "INT8_DEFAULT_CFG"}


def main():
    ap = argparse.ArgumentParser()
    for a in ("--scores", "--timings", "--mem", "--modelopt", "--modelopt-mem"):
        ap.add_argument(a, required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ours = msgpack.unpackb(open(args.scores, "rb").read(), raw=False)["payload"]
    tim, mem = json.load(open(args.timings)), json.load(open(args.mem))
    mo, mo_mem = json.load(open(args.modelopt)), json.load(open(args.modelopt_mem))
    mo_by_members = {tuple(g["modules"]): g for g in mo["groups"]}

    per_format = {}
    for fi, f in enumerate(ours["formats"]):
        if f["name"] == "NONE":
            continue
        cfg = MODELOPT[f["name"]]
        a, b = [], []
        for g in ours["groups"]:
            if g.get("disabled"):
                continue
            m = mo_by_members.get(tuple(g["members"]))
            if m is None:
                raise SystemExit(f"group {g['name']} not in ModelOpt's groups")
            j = next((k for k, name in enumerate(m["formats"]) if cfg in name), None)
            if j is None:
                raise SystemExit(f"ModelOpt's group {g['name']} has no {cfg}: {m['formats']}")
            a.append(g["scores"][fi])
            b.append(m["scores"][j])
        rel = sorted(abs(x - y) / abs(y) for x, y in zip(a, b) if y != 0)
        per_format[f["name"]] = {"groups": len(a), "spearman": spearman(a, b), "median_rel": rel[len(rel) // 2]}

    core = tim["calibration"] + tim["scoring"]
    rows = [
        ("samples", f"{tim['samples_scored']}", f"{mo['num_samples']}"),
        ("formats", ", ".join(f["name"] for f in ours["formats"]), ", ".join(mo.get("formats", []))),
        ("load model (s)", f"{tim['load_model']:.2f}", f"{mo['load_s']:.2f}"),
        ("calibration (s)", f"{tim['calibration']:.2f}", "—"),
        ("scoring (s)", f"{tim['scoring']:.2f}", "—"),
        ("calibration + scoring (s) vs auto_quantize", f"{core:.2f}", f"{mo['auto_quantize_s']:.2f}"),
        ("whole process wall (s)", f"{mem['wall_s']:.2f}", f"{mo_mem['wall_s']:.2f}"),
        ("peak GPU memory, NVML (GiB)", f"{mem['peak_bytes'] / 2**30:.2f}", f"{mo_mem['peak_bytes'] / 2**30:.2f}"),
    ]
    print("\n| figure | qsens | ModelOpt |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"| speed-up, calibration + scoring vs auto_quantize | {mo['auto_quantize_s'] / core:.1f}× | |")
    print(f"| speed-up, our whole process vs auto_quantize | {mo['auto_quantize_s'] / mem['wall_s']:.1f}× | |")
    for name, p in per_format.items():
        print(f"| {name}: Spearman of {p['groups']} group scores | {p['spearman']:.4f} | median rel. diff {p['median_rel']:.3%} |")
    if args.json:
        json.dump({"rows": rows, "per_format": per_format, "speedup_core": mo["auto_quantize_s"] / core,
                   "speedup_process": mo["auto_quantize_s"] / mem["wall_s"]}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
