"""What every lab module shares: the error measure, interleaved timing, paired ratios with
bootstrap intervals, CSV output and the machine's description.

Timing: all variants of a comparison run once per round, the order rotated every round
(A B C, B C A, C A B, ...), so that a slow minute of this shared machine falls on all of
them alike. A variant's ratio to the baseline is taken per round (its time over the
baseline's time in the same round); the quoted figure is the median of those ratios with a
95% percentile-bootstrap interval for that median.
"""

from __future__ import annotations

import contextlib
import csv
import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

BOOTSTRAP = 2000  # resamples per interval


@contextlib.contextmanager
def torch_threads(n: int):
    """PyTorch on ``n`` threads inside the block (the previous count restored after), or None
    where it is not installed (the reason printed): the peer rows are then left out."""
    try:
        import torch
    except ImportError as exc:
        print(f"  (no PyTorch: {exc})")
        yield None
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch
    finally:
        torch.set_num_threads(previous)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a NaN or inf (never passes)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape or not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), np.finfo(np.float64).tiny))


def aligned(shape, dtype=np.float32, offset: int = 0) -> np.ndarray:
    """An uninitialised array whose data start ``offset`` bytes past a 64-byte boundary (a
    cache line, one AVX-512 vector). NumPy's own alignment varies from run to run (16 bytes
    is all it promises), and a vectorised loop over rows that straddle cache lines runs
    measurably slower, so the lab pins it: every variant of a comparison gets the same."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    buf = np.empty(count * dtype.itemsize + 64 + offset, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    return buf[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def check(label: str, err: float, tol: float, rows: list) -> None:
    """Record one correctness result; fail loudly (after recording) when it misses ``tol``."""
    rows.append({"check": label, "rel_err": err, "tol": tol, "ok": err < tol})
    print(f"  check {label:<58} {err:9.2e}  (tol {tol:.1e})")
    if not err < tol:
        raise AssertionError(f"{label}: relative error {err:.3e} is not below {tol:.1e}")


def interleave(fns: dict[str, Callable[[], object]], *, budget_s: float, min_rounds: int = 5,
               max_rounds: int = 200) -> dict[str, np.ndarray]:
    """Seconds per call of each function, one call of each per round, order rotated per
    round, until ``budget_s`` and ``min_rounds`` are both reached (or ``max_rounds``). Each
    function runs once first, untimed (compilation, first-touch of its buffers)."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(max_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if r + 1 >= min_rounds and time.perf_counter() - start >= budget_s:
            break
    return {name: np.asarray(t) for name, t in times.items()}


def ratio_ci(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Median of the per-round ratios a/b and its 95% bootstrap interval."""
    r = np.asarray(a) / np.asarray(b)
    rng = np.random.default_rng(seed)
    medians = np.median(r[rng.integers(0, r.size, size=(BOOTSTRAP, r.size))], axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return float(np.median(r)), float(lo), float(hi)


def compare(family: str, case: str, times: dict[str, np.ndarray], baseline: str,
            extra: dict[str, dict] | None = None) -> list[dict]:
    """One CSV row per variant: its median and minimum time and its paired ratio to
    ``baseline`` (median with the bootstrap interval); ``extra`` adds columns per variant."""
    rows = []
    for name, t in times.items():
        med, lo, hi = ratio_ci(t, times[baseline])
        rows.append({"family": family, "case": case, "variant": name, "baseline": baseline,
                     "rounds": t.size, "median_ms": 1e3 * float(np.median(t)),
                     "min_ms": 1e3 * float(t.min()), "ratio": med, "ratio_lo": lo, "ratio_hi": hi,
                     **(extra or {}).get(name, {})})
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        flops = f"  {r['gflops']:6.1f} GFLOP/s" if "gflops" in r else ""
        print(f"  {r['case']:<44} {r['variant']:<28} {r['median_ms']:9.3f} ms  "
              f"{r['ratio']:.3f} ({r['ratio_lo']:.3f}-{r['ratio_hi']:.3f}) x {r['baseline']}"
              f"  [{r['rounds']} rounds]{flops}")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"  wrote {path}")


def _cpuinfo() -> dict:
    """CPU family/model and the vector extensions the kernels can use (from /proc/cpuinfo),
    and the CPU LLVM compiles Numba's kernels for."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    import llvmlite.binding as llvm

    return {"cpu_family": fields.get("cpu family", ""), "cpu_model_number": fields.get("model", ""),
            "isa": " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags),
            "llvm_cpu": llvm.get_host_cpu_name(), "machine": platform.machine()}


def machine() -> dict:
    """tfm's machine fingerprint, the CPU's vector extensions, and the float32 GEMM ceilings
    with one BLAS thread and with all, measured now."""
    from threadpoolctl import threadpool_limits

    from tfm.bench.machine import fingerprint, measure_sgemm_gflops

    info = {**fingerprint(), **_cpuinfo()}
    with threadpool_limits(1, user_api="blas"):
        info["sgemm_gflops_1_thread"] = round(measure_sgemm_gflops(), 1)
    info["sgemm_gflops_all_threads"] = round(measure_sgemm_gflops(), 1)
    return info


def write_machine(out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps(info, indent=1, default=str) + "\n")


def parse_out(argv, doc: str):
    """The options every lab module takes: --out DIR, --quick."""
    import argparse

    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the CSV files (default dev/cpu/results)")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds and sizes: checks that everything runs, ratios are rough")
    args = p.parse_args(argv)
    return Path(args.out), args.quick


def main(family: str, parts, run_checks, doc: str, argv=None) -> int:
    """``python -m dev.cpu.<family>``: that module's checks and timings alone."""
    run_family(family, parts, run_checks, *parse_out(argv, doc))
    return 0


def run_family(family: str, parts, run_checks, out: Path, quick: bool) -> None:
    """A lab module's run: its checks (``run_checks(rng)``), then each timing part
    (``part(rng, quick, checks)``, which checks its timed outputs too); writes
    out/<family>.csv and out/<family>_check.csv."""
    rng = np.random.default_rng(0)
    print(f"{family}: checks against float64")
    checks = run_checks(rng)
    rows: list[dict] = []
    for part in parts:
        print(f"{family}: {part.__name__}")
        rows += part(rng, quick, checks)
    write_csv(out / f"{family}_check.csv", checks)
    write_csv(out / f"{family}.csv", rows)
