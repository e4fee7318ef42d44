#!/usr/bin/env python3
"""Runs a command and writes its wall time and peak resident memory (the kernel's ru_maxrss of the
child) as JSON:  peak_rss.py OUT.json -- CMD ARGS...
"""
import json, resource, subprocess, sys, time

out, sep, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
assert sep == "--" and cmd, __doc__
t0 = time.time()
rc = subprocess.call(cmd)
wall = time.time() - t0
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
json.dump({"cmd": cmd, "rc": rc, "wall_s": wall, "peak_rss_bytes": peak_kib * 1024}, open(out, "w"), indent=1)
print(f"{cmd[0]}: exit {rc}, {wall:.2f} s, peak RSS {peak_kib / 2**20:.2f} GiB", flush=True)
sys.exit(rc)
