"""Benchmark `megatron export` on SmolLM2-135M: wall time and peak RSS of each direction, and the floor.

The floor, measured in the same run, is a process that only reads the same safetensors bytes and
writes them back with safetensors (torch + safetensors imports included). Goals on a 2-core CPU
machine: each direction <= 15 s end to end and <= 1.0 GB peak RSS.

    python bench/export_bench.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLOOR = """
import sys, glob, os
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in sorted(glob.glob(os.path.join(src, '*.safetensors'))):
    save_file(load_file(f), os.path.join(dst, os.path.basename(f)))
"""

MEASURE = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(cmd: list[str]) -> dict:
    """Wall time and peak RSS of `cmd`, measured by a fresh parent so RSS is the command's own."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {res['rc']}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per case; the best is reported")
    args = ap.parse_args()
    from megaswift.assets import fetch_smollm2

    hf = fetch_smollm2()
    megatron = [sys.executable, "-m", "megaswift.cli", "export"]
    work = Path(tempfile.mkdtemp(prefix="megaswift-bench-"))
    cases = {
        "floor (safetensors read+write)": lambda i: [sys.executable, "-c", FLOOR, str(hf), str(work / f"floor{i}")],
        "megatron export --to_mcore": lambda i: megatron + ["--model", str(hf), "--to_mcore", "true",
                                                             "--save", str(work / f"mc{i}")],
        "megatron export --to_hf": lambda i: megatron + ["--load", str(work / f"mc{i}"), "--to_hf", "true",
                                                          "--save", str(work / f"hf{i}")],
    }
    best: dict[str, dict] = {}
    try:
        for i in range(args.repeats):
            for name, cmd in cases.items():
                r = measure(cmd(i))
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 1e6
    print(f"SmolLM2-135M-Instruct, {size:.0f} MB of bf16 safetensors, {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'case':34s} {'seconds':>8s} {'peak RSS MB':>12s}")
    for name, r in best.items():
        print(f"{name:34s} {r['seconds']:8.2f} {r['peak_rss_mb']:12.0f}")
    floor = best["floor (safetensors read+write)"]["seconds"]
    for name in list(cases)[1:]:
        r = best[name]
        goal = r["seconds"] <= 15 and r["peak_rss_mb"] <= 1000
        print(f"{name}: {r['seconds'] / floor:.1f}x the floor's time; goal (<=15 s, <=1000 MB) "
              f"{'met' if goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
