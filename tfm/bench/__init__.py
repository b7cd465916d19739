"""Measurement harness: timing, memory, machine fingerprint and ceilings, fits, study runner.

    timing   time_call (compile time apart, repeats to a budget, median + spread), time_pair (A B A B)
             and paired_ratio (median per-round ratio, bootstrap 95% interval), time_once
    memory   peak_memory: tracemalloc peak and RSS high-water of one call; device_memory on a GPU
    machine  fingerprint(), measure_ceilings(): sgemm GFLOP/s and copy bandwidth (host, device)
    fit      loglog_slope: power-law exponent over the asymptotic range with a 95% interval
    layers   make_layer: one timed layer of each kind in the Table 1 registry (tfm.table1), with its cost
    study    Study, run_study: grid -> tidy table, resumable, NaN rows with reasons
    deps     one-hop dependency structure by perturbing real kernels; path lengths by BFS

The studies in ``studies/`` are thin scripts over this package.
"""

from .fit import Fit, loglog_slope
from .machine import fingerprint, measure_ceilings
from .memory import MemoryPeak, peak_memory
from .study import Context, Skip, Study, load_table, run_study, write_atomic
from .timing import Timing, time_call, time_pair

__all__ = [
    "Context",
    "Fit",
    "MemoryPeak",
    "Skip",
    "Study",
    "Timing",
    "fingerprint",
    "load_table",
    "loglog_slope",
    "measure_ceilings",
    "peak_memory",
    "run_study",
    "time_call",
    "time_pair",
    "write_atomic",
]
