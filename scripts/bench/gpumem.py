#!/usr/bin/env python3
"""Runs a command and reports its wall time and the GPU's peak memory use above the idle level
(NVML, polled every 10 ms), the same way for every tool compared. Usage:
    gpumem.py OUT.json -- command args...
"""
import json, subprocess, sys, threading, time

import pynvml


def main():
    out, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    idle = pynvml.nvmlDeviceGetMemoryInfo(h).used
    peak = [idle]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], pynvml.nvmlDeviceGetMemoryInfo(h).used)
            time.sleep(0.01)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - t0
    done.set()
    t.join()
    json.dump({"cmd": cmd, "rc": rc, "wall_s": wall, "peak_bytes": peak[0] - idle,
               "idle_bytes": idle}, open(out, "w"), indent=1)
    print(f"[gpumem] rc={rc} wall {wall:.2f} s, peak GPU memory {(peak[0] - idle) / 2**30:.2f} GiB above idle", flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
