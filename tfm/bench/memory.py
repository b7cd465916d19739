"""Peak host memory of one call, measured two ways (both recorded by the studies).

* ``traced_bytes``: the peak of ``tracemalloc`` during the call, above its level before.
  NumPy reports its array allocations to tracemalloc, so this sees every NumPy temporary
  (e.g. the reference's (Nq, Nk) score matrix) but *not* memory Numba's runtime allocates
  inside ``@njit`` code or BLAS work buffers.
* ``rss_bytes``: the process's resident-set high-water mark during the call, above the
  resident set before it (Linux: ``/proc/self/clear_refs`` resets ``VmHWM``). It sees
  every page touched, whoever allocated it. Free heap memory is handed back to the OS
  (``malloc_trim``) before the call, so re-used pages are counted too; the residual error
  is a few pages. ``None`` where the platform does not support it.

The studies plot ``rss_bytes`` (the general one) and keep ``traced_bytes`` beside it.

On a CUDA device host memory says nothing about a kernel's footprint;
``device_memory(fn, sync)`` measures device memory instead, with frees deferred during the
call (``numba.cuda.defer_cleanup``), so every temporary stays counted:

* ``device_bytes``: the drop in free device memory over the call (what the driver saw;
  rounded up to its allocation granularity; NaN under the simulator, which has no device);
* ``device_alloc_bytes``: the bytes of the numba device arrays the call created (exact;
  memory that CuPy or cuBLAS allocate for themselves is not in it).

Both count the call's output too. ``host_note`` says why the host columns are empty.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class MemoryPeak:
    traced_bytes: int | None
    rss_bytes: int | None
    device_bytes: float = math.nan
    device_alloc_bytes: float = math.nan
    host_note: str = ""

    def as_row(self) -> dict:
        return {"rss_bytes": self.rss_bytes, "traced_bytes": self.traced_bytes, "device_bytes": self.device_bytes,
                "device_alloc_bytes": self.device_alloc_bytes, "memory_note": self.host_note}


def _status_kb(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not found in {_STATUS}")


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def rss_supported() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


_RSS_OK = rss_supported()


def peak_memory(fn: Callable[[], object]) -> MemoryPeak:
    """Run ``fn()`` once and return its peak extra memory (see the module docstring)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    if _RSS_OK:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # VmHWM := VmRSS
        rss0 = _status_kb("VmRSS")
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    rss = max(0, _status_kb("VmHWM") - rss0) * 1024 if _RSS_OK else None
    return MemoryPeak(traced_bytes=max(0, peak - base), rss_bytes=rss)


@contextmanager
def _count_device_arrays():
    """Record the bytes of every ``numba.cuda.device_array`` made inside the block."""
    from numba import cuda

    original, sizes = cuda.device_array, []

    def counted(shape, dtype=float, *args, **kwargs):
        arr = original(shape, dtype, *args, **kwargs)
        sizes.append(int(arr.nbytes))
        return arr

    cuda.device_array = counted
    try:
        yield sizes
    finally:
        cuda.device_array = original


def device_memory(fn: Callable[[], object], sync: Callable[[], None]) -> MemoryPeak:
    """Run ``fn()`` once on the CUDA device; device memory it allocates (module docstring)."""
    from numba import cuda

    sync()
    ctx = cuda.current_context()
    with cuda.defer_cleanup(), _count_device_arrays() as sizes:
        free0 = ctx.get_memory_info()[0]
        out = fn()
        sync()
        free1 = ctx.get_memory_info()[0]
        del out
    drop = float(free0 - free1) if math.isfinite(free0) and math.isfinite(free1) else math.nan
    return MemoryPeak(traced_bytes=None, rss_bytes=None, device_bytes=drop, device_alloc_bytes=float(sum(sizes)),
                      host_note="cuda: device memory (device_bytes, device_alloc_bytes); host memory not measured")
