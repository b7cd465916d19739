"""pytest-benchmark helpers shared by every benchmark file.

* ``measure(benchmark, fn, *args, flops=..., nbytes=...)`` runs the benchmark and records
  FLOPs, bytes, GFLOP/s and GB/s (from the median) in ``extra_info``, so saved runs and
  ``make bench-compare`` show throughput beside the times.
* ``large(benchmark)`` skips a size when benchmarking is disabled (CI runs every benchmark
  body once with ``--benchmark-disable``; the large sizes are for timing runs only).
* PyTorch peers run with the same number of threads as Numba (side-by-side fairness).
"""

from __future__ import annotations

import numba
import pytest

try:
    import torch

    torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)
except ImportError:  # pragma: no cover
    torch = None


def measure(benchmark, fn, *args, flops: float | None = None, nbytes: float | None = None, **kwargs):
    """Benchmark ``fn(*args, **kwargs)``; attach cost-model numbers; return fn's result."""
    if flops is not None:
        benchmark.extra_info["flops"] = float(flops)
    if nbytes is not None:
        benchmark.extra_info["bytes"] = float(nbytes)
    benchmark.extra_info["threads"] = numba.config.NUMBA_NUM_THREADS
    result = benchmark(fn, *args, **kwargs)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not benchmark.disabled:
        median = stats.stats.median
        if flops is not None:
            benchmark.extra_info["gflops"] = flops / median / 1e9
        if nbytes is not None:
            benchmark.extra_info["gbytes_per_s"] = nbytes / median / 1e9
    return result


def large(benchmark, reason: str = "large size: runs only when timing (make bench)"):
    """Skip this case unless benchmarks are actually being timed."""
    if benchmark.disabled:
        pytest.skip(reason)


requires_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install 'tfm[torch]')")


# tests/ is not a package, so ``from conftest import ...`` names whichever conftest pytest
# imported last: this one once tests/benchmarks is collected, also for tests/test_*.py.
# Re-export tests/conftest.py's helpers so that import works from every test module.
def _shared_helpers():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_tfm_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _shared_helpers()
HAVE_TORCH, TOL, randn, rel_err = _shared.HAVE_TORCH, _shared.TOL, _shared.randn, _shared.rel_err
