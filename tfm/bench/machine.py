"""The machine a measurement ran on: a fingerprint and its measured ceilings.

``fingerprint()`` records what decides a timing: CPU model, cores, the threads Numba and
BLAS use, library versions, the git commit of this checkout and the date (UTC).
``measure_ceilings()`` measures, once per run, the two roofs every timing is compared
against: single-precision GEMM throughput (NumPy ``float32`` matmul through its BLAS,
multi-threaded, square size 2048; best of several) and main-memory bandwidth (a copy of an
array far larger than the last-level cache; read + write bytes counted). On a usable CUDA
device, the device is fingerprinted too (``device_info``: name, SMs, clocks, memory, driver,
CUDA runtime, FP32 CUDA-core peak) and the same two roofs are measured there (a device-to-
device copy; cuBLAS SGEMM through PyTorch or CuPy, TF32 off); otherwise the ``device_*``
entries are NaN with the reason in ``device_reason``.
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


# FP32 lanes (CUDA cores) per SM by compute capability (CUDA C++ Programming Guide, "Arithmetic
# Instructions": 32-bit floating-point add, multiply, multiply-add results per clock per SM).
FP32_LANES_PER_SM = {(6, 0): 64, (6, 1): 128, (6, 2): 128, (7, 0): 64, (7, 2): 64, (7, 5): 64,
                     (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128,
                     (10, 0): 128, (12, 0): 128}

_NO_DEVICE = {"device_name": "none", "device_cc": "", "device_sms": float("nan"),
              "device_clock_mhz": float("nan"), "device_memory_bytes": float("nan"),
              "device_driver": "", "device_cuda_runtime": "", "device_fp32_peak_gflops": float("nan"),
              "device_peak_derivation": "", "device_sgemm_gflops": float("nan"), "device_sgemm_by": "",
              "device_mem_bw_gbs": float("nan"), "v_cupy": "absent"}


def _nvidia_smi(query: str) -> str:
    """One ``nvidia-smi --query-gpu`` field of device 0 ('' where nvidia-smi is absent or fails)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def _cupy_version() -> str:
    try:
        import cupy

        return str(cupy.__version__)
    except Exception:  # ImportError, or a CuPy without a usable CUDA runtime
        return "absent"


def device_info() -> dict:
    """The CUDA device's fingerprint (name, SMs, clocks, memory, driver, runtime, FP32 peak),
    or ``device_name="none"`` with the reason in ``device_reason``. Never compiles a kernel."""
    from ..backends import BackendUnavailable, get_backend

    try:
        get_backend("cuda")
    except (BackendUnavailable, ImportError) as exc:  # ImportError: the cuda backend is absent
        return {**_NO_DEVICE, "device_reason": str(exc)}
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        return {**_NO_DEVICE, "device_name": "cuda simulator",
                "device_reason": "the CUDA simulator has no meaningful timing", "v_cupy": _cupy_version()}
    dev = cuda.get_current_device()
    cc = tuple(dev.compute_capability)
    sms = int(dev.MULTIPROCESSOR_COUNT)
    try:
        clock_mhz = int(dev.CLOCK_RATE) / 1e3  # the maximum (boost) SM clock, kHz
    except Exception:  # deprecated attribute in newer CUDA releases: ask nvidia-smi
        smi = _nvidia_smi("clocks.max.sm")
        clock_mhz = float(smi) if smi.replace(".", "", 1).isdigit() else float("nan")
    lanes = FP32_LANES_PER_SM.get(cc)
    peak = sms * lanes * 2 * clock_mhz / 1e3 if lanes and np.isfinite(clock_mhz) else float("nan")
    try:
        from numba.cuda.cudadrv.driver import driver

        cuda_driver = ".".join(map(str, driver.get_version()))
    except Exception:  # depends on the driver bindings
        cuda_driver = "unknown"
    try:
        runtime = ".".join(map(str, cuda.runtime.get_version()))
    except Exception:
        runtime = "unknown"
    smi_driver = _nvidia_smi("driver_version")
    return {
        "device_name": dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
        "device_cc": f"{cc[0]}.{cc[1]}",
        "device_sms": sms,
        "device_clock_mhz": clock_mhz,
        "device_memory_bytes": float(cuda.current_context().get_memory_info()[1]),
        "device_driver": f"{smi_driver} (CUDA {cuda_driver})" if smi_driver else f"CUDA {cuda_driver}",
        "device_cuda_runtime": runtime,
        "device_fp32_peak_gflops": peak,
        "device_peak_derivation": (f"{sms} SMs x {lanes} FP32 lanes/SM x 2 FLOP/FMA x {clock_mhz / 1e3:.3f} GHz "
                                   "(maximum boost clock)") if lanes else f"FP32 lanes per SM unknown for sm_{cc[0]}{cc[1]}",
        "device_reason": "",
        "v_cupy": _cupy_version(),
    }


def _device_sgemm(quick: bool) -> tuple[float, str]:
    """cuBLAS float32 GEMM (TF32 off) at 4096^3 (2048^3 quick): (GFLOP/s, through what)."""
    m = 2048 if quick else 4096
    try:
        import torch

        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            a, b = torch.randn(m, m, device="cuda"), torch.randn(m, m, device="cuda")

            def mm():
                a @ b
                torch.cuda.synchronize()

            return 2.0 * m ** 3 / _best(mm, 10) / 1e9, f"torch.matmul (cuBLAS, FP32, TF32 off), {m}^3"
    except ImportError:
        pass
    try:
        import cupy

        a = cupy.random.standard_normal((m, m), dtype=cupy.float32)
        b = cupy.random.standard_normal((m, m), dtype=cupy.float32)

        def mm_cp():
            a @ b
            cupy.cuda.runtime.deviceSynchronize()

        return 2.0 * m ** 3 / _best(mm_cp, 10) / 1e9, f"cupy.matmul (cuBLAS, FP32), {m}^3"
    except ImportError:
        return float("nan"), "neither PyTorch with CUDA nor CuPy is importable"


def _device_ceilings(quick: bool) -> dict:
    info = device_info()
    if info["device_reason"]:
        return info
    from numba import cuda

    n = (64 if quick else 256) * 2 ** 20 // 4
    src = cuda.to_device(np.ones(n, dtype=np.float32))
    dst = cuda.device_array_like(src)

    def copy():
        dst.copy_to_device(src)
        cuda.synchronize()

    info["device_mem_bw_gbs"] = 2.0 * src.nbytes / _best(copy, 5) / 1e9
    info["device_sgemm_gflops"], info["device_sgemm_by"] = _device_sgemm(quick)
    return info


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
