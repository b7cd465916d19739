"""Why tfm is imported before torch: PyTorch's SDPA timed in fresh processes that differ only
in the order of imports and the first parallel kernel.

    python -m dev.cpu.omp_order [--n 4096] [--rounds 5] [--out dev/cpu/results]

PyTorch's CPU wheel and Numba's "omp" threading layer load the same libgomp. The orders:

* ``tfm_then_torch``: ``import tfm`` (sets OMP_WAIT_POLICY=PASSIVE), ``import torch``, then a tfm
  parallel kernel, then SDPA: what the studies and tests do (studies/_common.py);
* ``kernel_then_torch``: ``import tfm``, a tfm parallel kernel, then ``import torch`` and SDPA;
* ``torch_only``: ``import torch`` and SDPA, no Numba in the process.

Each order runs in its own process (the libgomp state is per process), ``--rounds`` times,
the orders rotated each round; each process reports the median of 5 SDPA calls (B=1, H=8,
d=64, float32, 2 threads). Writes ``omp_order.csv``: per order the median over rounds and
its ratio to ``torch_only`` (per-round ratios, median). The README's Threading section
quotes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = r"""
import json, os, sys, time
order, n = sys.argv[1], int(sys.argv[2])

def sdpa_ms(torch):
    torch.set_num_threads(2)
    q = torch.randn(1, 8, n, 64)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[2]

def tfm_kernel(tfm):
    import numpy as np
    x = np.random.default_rng(0).standard_normal((1, 8, 512, 64), dtype=np.float32)
    tfm.attention(x, x, x)  # a Numba parallel kernel: starts libgomp's threads

if order == "tfm_then_torch":
    import tfm
    import torch
    tfm_kernel(tfm)
elif order == "kernel_then_torch":
    import tfm
    tfm_kernel(tfm)
    import torch
else:
    import torch
print(json.dumps({"order": order, "sdpa_ms": sdpa_ms(torch)}))
"""

ORDERS = ("torch_only", "tfm_then_torch", "kernel_then_torch")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # tfm's import decides it
    env["PYTHONPATH"] = str(root)
    times = {o: [] for o in ORDERS}
    for r in range(args.rounds):
        for o in ORDERS[r % 3:] + ORDERS[:r % 3]:
            res = subprocess.run([sys.executable, "-c", CHILD, o, str(args.n)], env=env, cwd=root,
                                 capture_output=True, text=True, check=True)
            ms = json.loads(res.stdout.strip().splitlines()[-1])["sdpa_ms"]
            times[o].append(ms)
            print(f"round {r + 1}/{args.rounds} {o:18s} SDPA {ms:8.1f} ms", flush=True)
    base = np.array(times["torch_only"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "omp_order.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["order", "n", "rounds", "median_ms", "min_ms", "ratio_to_torch_only", "load_avg_1min"])
        for o in ORDERS:
            t = np.array(times[o])
            w.writerow([o, args.n, args.rounds, f"{np.median(t):.2f}", f"{t.min():.2f}",
                        f"{np.median(t / base):.3f}", f"{os.getloadavg()[0]:.2f}"])
    print((out / "omp_order.csv").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
