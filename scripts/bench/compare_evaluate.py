#!/usr/bin/env python3
"""Side-by-side table of qsens `evaluate` and HF + ModelOpt fake quant (modelopt_evaluate.py) on the
same recipes and held-out samples: per recipe, mean NLL and KL from each tool and the largest
per-sample relative difference of the loss; then the wall times. Exits 1 when a loss differs by
more than --tolerance relative (bf16: 2^-7 by default)."""
import argparse, json, sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qsens", required=True, help="qsens evaluation JSON")
    ap.add_argument("--qsens-timings", required=True)
    ap.add_argument("--modelopt", required=True)
    ap.add_argument("--tolerance", type=float, default=2.0 ** -7)
    ap.add_argument("--json")
    args = ap.parse_args()
    ours = json.load(open(args.qsens))["payload"]
    timings = json.load(open(args.qsens_timings))
    theirs = json.load(open(args.modelopt))
    by_name = {r["name"]: r for r in theirs["recipes"]}
    print("| recipe | FP8 layers | mean NLL qsens | mean NLL ModelOpt | max rel. diff per sample | KL qsens | KL ModelOpt |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    rows = []
    for r in ours["recipes"]:
        m = by_name[r["name"]]
        q = r["per_sample"]
        o = m["per_sample"]
        assert len(q) == len(o), r["name"]
        rel = max(abs(a["nll_sum"] / a["label_tokens"] - b["nll_sum"] / b["label_tokens"])
                  / abs(b["nll_sum"] / b["label_tokens"]) for a, b in zip(q, o))
        worst = max(worst, rel)
        tokens = sum(a["label_tokens"] for a in q)
        nll_q = sum(a["nll_sum"] for a in q) / tokens
        nll_o = sum(b["nll_sum"] for b in o) / tokens
        kl_q = sum(a["kl_sum_label"] for a in q) / tokens
        kl_o = sum(b["kl_sum_label"] for b in o) / tokens
        rows.append({"recipe": r["name"], "layers": r["layers_quantized"], "nll_qsens": nll_q, "nll_modelopt": nll_o,
                     "max_rel_diff": rel, "kl_qsens": kl_q, "kl_modelopt": kl_o})
        print(f"| {r['name']} | {r['layers_quantized']} | {nll_q:.5f} | {nll_o:.5f} | {rel:.2e} | {kl_q:.3e} | {kl_o:.3e} |")
    n_rec, n_s = len(ours["recipes"]), len(ours["samples"])
    print()
    print(f"{n_rec} recipes x {n_s} held-out samples")
    print(f"- qsens evaluate: measurement {timings['evaluate_s']:.2f} s after load (load {timings['load_s']:.2f} s)")
    print(f"- HF + ModelOpt: mtq.quantize + calibration {theirs['quantize_calibrate_s']:.2f} s, measurement "
          f"{theirs['measure_s']:.2f} s, peak {theirs['peak_allocated_bytes'] / 2**30:.2f} GiB")
    print(f"- largest per-sample loss difference: {worst:.2e} relative (tolerance {args.tolerance:.2e})")
    if args.json:
        json.dump({"rows": rows, "qsens_timings": timings, "modelopt": {k: v for k, v in theirs.items() if k != "recipes"},
                   "worst_rel_diff": worst}, open(args.json, "w"), indent=1)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
