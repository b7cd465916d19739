"""The machine a measurement ran on: a fingerprint and its measured ceilings.

``fingerprint()`` records what decides a timing: CPU model, cores, the threads Numba and
BLAS use, library versions, the git commit of this checkout and the date (UTC).
``measure_ceilings()`` measures, once per run, the two roofs every timing is compared
against: single-precision GEMM throughput (NumPy ``float32`` matmul through its BLAS,
multi-threaded, square size 2048; best of several) and main-memory bandwidth (a copy of an
array far larger than the last-level cache; read + write bytes counted). On a usable CUDA
device the same two are measured there (a device-to-device copy; a GEMM where PyTorch with
CUDA is present), otherwise the ``device_*`` entries are NaN with the reason.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

from .._source import source_hash

_REPO = Path(__file__).resolve().parents[2]
_LIBRARIES = ("numpy", "numba", "numba-cuda", "scipy", "torch", "pandas")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _blas_threads() -> int | None:
    from threadpoolctl import threadpool_info

    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts) if counts else None


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return f"not yet chosen ({numba.config.THREADING_LAYER})"


@lru_cache(maxsize=1)
def fingerprint() -> dict:
    """What decides a timing, as flat scalar columns (stored with every table)."""
    import numba
    import psutil

    commit = _git("rev-parse", "--short=12", "HEAD")
    # "+dirty": tracked code differs from the commit; regenerated results/ do not count.
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"))
    fp = {
        "cpu_model": _cpu_model(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "numba_threads": numba.get_num_threads(),
        "blas_threads": _blas_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git_commit": (commit + ("+dirty" if dirty else "")) if commit else "unknown",
        # the code measured, committed or not: saved study rows are reused only under the same
        "tfm_source": source_hash(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # other processes competing for the cores when the run started (1-minute load average)
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "numba_threading_layer": _threading_layer(),
    }
    for lib in _LIBRARIES:
        fp[f"v_{lib.replace('-', '_')}"] = _version(lib)
    return fp


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 ``a @ b`` at (n, n) x (n, n) through NumPy's BLAS: 2 n^3 / best time."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    return 2.0 * n ** 3 / _best(lambda: np.matmul(a, b, out=c), repeats) / 1e9


def measure_bandwidth_gbs(nbytes: int = 256 * 2 ** 20, repeats: int = 5) -> float:
    """Copy of an ``nbytes`` float64 array (far above any LLC): 2 * nbytes / best time."""
    src = np.random.default_rng(1).standard_normal(nbytes // 8)
    dst = np.empty_like(src)
    return 2.0 * src.nbytes / _best(lambda: np.copyto(dst, src), repeats) / 1e9


def _device_ceilings(quick: bool) -> dict:
    from ..backends import BackendUnavailable, get_backend

    nan = float("nan")
    try:
        get_backend("cuda")
    except (BackendUnavailable, ImportError) as exc:  # ImportError: the cuda backend is absent
        return {"device_name": "none", "device_sgemm_gflops": nan, "device_mem_bw_gbs": nan,
                "device_reason": str(exc)}
    from numba import cuda

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return {"device_name": "cuda simulator", "device_sgemm_gflops": nan, "device_mem_bw_gbs": nan,
                "device_reason": "the CUDA simulator has no meaningful timing"}
    dev = cuda.get_current_device()
    n = (64 if quick else 256) * 2 ** 20 // 4
    src = cuda.to_device(np.ones(n, dtype=np.float32))
    dst = cuda.device_array_like(src)

    def copy():
        dst.copy_to_device(src)
        cuda.synchronize()

    out = {"device_name": dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
           "device_mem_bw_gbs": 2.0 * src.nbytes / _best(copy, 5) / 1e9,
           "device_sgemm_gflops": nan, "device_reason": "sgemm needs PyTorch with CUDA"}
    try:
        import torch

        if torch.cuda.is_available():
            m = 4096
            a = torch.randn(m, m, device="cuda")
            b = torch.randn(m, m, device="cuda")

            def mm():
                a @ b
                torch.cuda.synchronize()

            out["device_sgemm_gflops"] = 2.0 * m ** 3 / _best(mm, 10) / 1e9
            out["device_reason"] = ""
    except ImportError:
        pass
    return out


_CEILINGS: dict[bool, dict] = {}


def measure_ceilings(quick: bool = False) -> dict:
    """sgemm GFLOP/s and copy bandwidth (host, and device where usable); measured once per process."""
    if quick not in _CEILINGS:
        _CEILINGS[quick] = {
            "sgemm_gflops": measure_sgemm_gflops(1024 if quick else 2048, 3 if quick else 5),
            "mem_bw_gbs": measure_bandwidth_gbs((64 if quick else 256) * 2 ** 20, 3 if quick else 5),
            **_device_ceilings(quick),
        }
    return dict(_CEILINGS[quick])
