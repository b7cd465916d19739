"""BLAS threading for kernels that call BLAS from inside a Numba ``prange`` loop.

Numba's ``np.dot`` (and the raw ``?gemm`` the attention kernels call) goes to SciPy's
OpenBLAS, which by default runs its own thread pool. Called from every Numba worker at once,
that oversubscribes the cores. Such kernels run inside ``single_threaded_blas()``: each Numba
thread then calls a single-threaded BLAS. Fused attention, n=2048, B=1, H=8, d=64 (shared
machine, side by side): 2 Numba x 1 BLAS thread 280 ms; 1 Numba x 2 BLAS threads 2.4 s
(every small gemm hands off between threads); 2 x 2 (oversubscribed) 4.7-7.9 s.

The limit is process-wide while it is held (OpenBLAS has no per-thread setting), so a
NumPy product running concurrently in another Python thread also runs single-threaded.
"""

from __future__ import annotations

from functools import lru_cache

from threadpoolctl import ThreadpoolController


@lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    # Scanning the loaded libraries costs ~1 ms; do it once (after numpy/scipy are loaded).
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba calls must be loaded)

    return ThreadpoolController()


def single_threaded_blas():
    """Context manager: every BLAS library in the process runs one thread while it is held."""
    return _controller().limit(limits=1, user_api="blas")
