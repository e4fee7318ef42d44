#!/usr/bin/env python3
"""Compares two qsens scores artifacts group by group (e.g. CUDA vs CPU): Spearman and relative
differences of the first format's group scores. Exits 1 when Spearman < --min-spearman."""
import argparse, sys

import msgpack

from compare import spearman


def load(p):
    return {g["name"]: g["scores"][0] for g in msgpack.unpackb(open(p, "rb").read(), raw=False)["payload"]["groups"]}


ap = argparse.ArgumentParser()
ap.add_argument("a")
ap.add_argument("b")
ap.add_argument("--label", default="")
ap.add_argument("--min-spearman", type=float, default=0.99)
args = ap.parse_args()
a, b = load(args.a), load(args.b)
names = sorted(a)
x, y = [a[n] for n in names], [b[n] for n in names]
rel = sorted(abs(p - q) / abs(q) for p, q in zip(x, y) if q)
rho = spearman(x, y)
print(f"{args.label}: {len(names)} groups, Spearman {rho:.5f}, median rel diff {rel[len(rel)//2]:.2e}, max {rel[-1]:.2e}")
sys.exit(0 if rho >= args.min_spearman else 1)
