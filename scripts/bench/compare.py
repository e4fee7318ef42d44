#!/usr/bin/env python3
"""Side-by-side table of a qsens run and a ModelOpt auto_quantize run on the same checkpoint and
inputs: wall time per phase, peak GPU memory, Spearman of per-group FP8 scores, recipe agreement,
and each recipe's objective (summed group scores of the chosen formats) on both tools' scores.
Usage: compare.py --scores S.msgpack --timings T.json --mem M.json --manifests 10=A.json 12=B.json
                  --modelopt MO.json --modelopt-mem MOM.json [--search-s X] [--json OUT]
"""
import argparse, json

import msgpack


def ranks(v):
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):  # average ranks for ties
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scores", required=True)
    ap.add_argument("--timings", required=True)
    ap.add_argument("--mem", required=True)
    ap.add_argument("--manifests", nargs="+", required=True, help="BITS=manifest.json")
    ap.add_argument("--search-s", type=float, default=None)
    ap.add_argument("--modelopt", required=True)
    ap.add_argument("--modelopt-mem", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    ours = msgpack.unpackb(open(args.scores, "rb").read(), raw=False)["payload"]
    tim = json.load(open(args.timings))
    mem = json.load(open(args.mem))
    mo = json.load(open(args.modelopt))
    mo_mem = json.load(open(args.modelopt_mem))

    mo_by_members = {tuple(g["modules"]): g for g in mo["groups"]}
    a, b = [], []
    for g in ours["groups"]:
        m = mo_by_members.get(tuple(g["members"]))
        if m is None:
            raise SystemExit(f"group {g['name']} not in ModelOpt's groups")
        a.append(g["scores"][0])
        b.append(m["scores"][0])
    rho = spearman(a, b)
    rel = sorted(abs(x - y) / abs(y) for x, y in zip(a, b) if y != 0)
    med = rel[len(rel) // 2]

    agreement = {}
    for spec in args.manifests:
        bits, path = spec.split("=", 1)
        man = json.load(open(path))["payload"]
        ours_q = {g["name"]: g["chosen"] != "NONE" for g in man["groups"]}
        mo_recipe = mo["targets"][str(float(bits))]
        mo_q = {k: not v.startswith("NONE") for k, v in mo_recipe.items()}
        same = sum(1 for k in ours_q if mo_q.get(k) == ours_q[k])
        # Objective of both recipes on both score sets (FP8 = format 0, NONE = format 1), and the
        # bits ModelOpt's recipe spends, from the same costs.
        objective = {"ours_on_ours": 0.0, "modelopt_on_ours": 0.0, "ours_on_modelopt": 0.0,
                     "modelopt_on_modelopt": 0.0}
        mo_cost = params = 0.0
        for g in man["groups"]:
            mine, theirs = (0 if ours_q[g["name"]] else 1), (0 if mo_q[g["name"]] else 1)
            m = mo_by_members[tuple(g["members"])]
            objective["ours_on_ours"] += g["scores"][mine]
            objective["modelopt_on_ours"] += g["scores"][theirs]
            objective["ours_on_modelopt"] += m["scores"][mine]
            objective["modelopt_on_modelopt"] += m["scores"][theirs]
            mo_cost += g["costs"][theirs] * g["cost_weight"]
            params += g["params"] * g["cost_weight"]
        agreement[bits] = {
            "same": same, "groups": len(ours_q),
            "ours_quantized": sum(ours_q.values()), "modelopt_quantized": sum(mo_q.values()),
            "ours_bits": man["summary"]["achieved_effective_bits"],
            "modelopt_bits": 16 * mo_cost / params,
            "objective": objective,
        }

    ours_total = tim["total"] + (args.search_s or 0.0)
    ours_core = tim["calibration"] + tim["scoring"] + (args.search_s or 0.0)
    rows = [
        ("samples", f"{tim['samples_scored']}", f"{mo['num_samples']}"),
        ("load model (s)", f"{tim['load_model']:.2f} (+ hash {tim['hash_model']:.2f})", f"{mo['load_s']:.2f}"),
        ("calibration (s)", f"{tim['calibration']:.2f}", "—"),
        ("scoring (s)", f"{tim['scoring']:.2f}", "—"),
        ("search (s)", f"{args.search_s:.2f}" if args.search_s is not None else "—", "—"),
        ("calib + score + search (s)", f"{ours_core:.2f}", f"{mo['auto_quantize_s']:.2f}"),
        ("whole process wall (s)", f"{mem['wall_s']:.2f}", f"{mo_mem['wall_s']:.2f}"),
        ("peak GPU memory, NVML (GiB)", f"{mem['peak_bytes'] / 2**30:.2f}", f"{mo_mem['peak_bytes'] / 2**30:.2f}"),
        ("peak torch allocated (GiB)", "—", f"{mo['peak_allocated_bytes'] / 2**30:.2f}"),
    ]
    print()
    print(f"| figure | qsens | ModelOpt |")
    print(f"|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"| speed-up, calib+score+search vs auto_quantize | {mo['auto_quantize_s'] / ours_core:.1f}× | |")
    print(f"| speed-up, our whole process vs auto_quantize | {mo['auto_quantize_s'] / mem['wall_s']:.1f}× | |")
    print(f"| Spearman of {len(a)} group scores | {rho:.4f} | median rel. diff {med:.3%} |")
    for bits, ag in agreement.items():
        print(f"| recipe agreement at {bits} bits | {ag['same']}/{ag['groups']} groups "
              f"(ours {ag['ours_quantized']} quantized, {ag['ours_bits']:.3f} bits) | {ag['modelopt_quantized']} quantized, "
              f"{ag['modelopt_bits']:.3f} bits |")
        o = ag["objective"]
        print(f"| objective at {bits} bits on our scores | {o['ours_on_ours']:.6g} | {o['modelopt_on_ours']:.6g} |")
        print(f"| objective at {bits} bits on ModelOpt's scores | {o['ours_on_modelopt']:.6g} | "
              f"{o['modelopt_on_modelopt']:.6g} |")
    if args.json:
        json.dump({"rows": rows, "spearman": rho, "median_rel": med, "agreement": agreement,
                   "speedup_core": mo["auto_quantize_s"] / ours_core,
                   "speedup_process": mo["auto_quantize_s"] / mem["wall_s"]}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
