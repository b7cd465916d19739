"""Where a base-config forward pass spends its time on the CUDA backend (host side).

    python3 dev/cuda/profile_forward.py [--out DIR]

cProfile of tfm.from_torch(nn.Transformer base).forward on backend "cuda" (Numba GEMM and,
if CuPy imports, cuBLAS through CuPy), B=8, n=128, after warm-up; the top functions by own
time and the launch/allocation/synchronisation counts go to stdout and DIR/profile_forward.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--n", type=int, default=128)
    args = p.parse_args(argv)

    import torch

    import tfm
    from numba import cuda
    from tfm.backends.cuda import CudaBackend

    torch.manual_seed(0)
    module = torch.nn.Transformer(512, 8, 6, 6, 2048, dropout=0.0, batch_first=True).eval()
    rng = np.random.default_rng(0)
    src = rng.standard_normal((args.b, args.n, 512)).astype(np.float32)
    tgt = rng.standard_normal((args.b, args.n, 512)).astype(np.float32)
    report = io.StringIO()
    for gemm in ("numba", "cupy"):
        try:
            bk = CudaBackend(gemm=gemm)
        except ValueError as exc:
            print(f"{gemm}: {exc}", file=report)
            continue
        model = tfm.from_torch(module, backend=bk)
        ds, dt = bk.asarray(src), bk.asarray(tgt)
        for _ in range(3):
            model(ds, dt, tgt_is_causal=True)
        bk.synchronize()
        counts = {"device_array": 0, "synchronize": 0}
        orig_da, orig_sync = cuda.device_array, cuda.synchronize

        def da(*a, **k):
            counts["device_array"] += 1
            return orig_da(*a, **k)

        def sync(*a, **k):
            counts["synchronize"] += 1
            return orig_sync(*a, **k)

        cuda.device_array, cuda.synchronize = da, sync
        try:
            t0 = time.perf_counter()
            model(ds, dt, tgt_is_causal=True)
            t_host = time.perf_counter() - t0
            orig_sync()
            t_total = time.perf_counter() - t0
        finally:
            cuda.device_array, cuda.synchronize = orig_da, orig_sync
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(ds, dt, tgt_is_causal=True)
            bk.synchronize()
            times.append(time.perf_counter() - t0)
        prof = cProfile.Profile()
        prof.enable()
        model(ds, dt, tgt_is_causal=True)
        bk.synchronize()
        prof.disable()
        print(f"== gemm={gemm}: forward {np.median(times) * 1e3:.2f} ms (median of 5); one call: "
              f"host returns after {t_host * 1e3:.2f} ms, device done at {t_total * 1e3:.2f} ms; "
              f"{counts}", file=report)
        s = pstats.Stats(prof, stream=report)
        s.sort_stats("tottime").print_stats(25)
        s.sort_stats("cumulative").print_stats(30)
    text = report.getvalue()
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_forward.txt"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
