"""One thread pool for the CPU backend: Numba's. Every BLAS call tfm makes is single-threaded.

The dense kernels (``linear``/``feed_forward`` in ``linear.py``, attention) call SciPy's
OpenBLAS ``?gemm`` from @njit code (``_blas.gemm``), one single-threaded call per work block
of a ``prange`` loop, inside ``single_threaded_blas()``. Parallelism comes only from Numba.

Why (measured on this shared 2-core VM, side by side in one process):
- BLAS threads inside prange oversubscribe: fused attention, n=2048, B=1, H=8, d=64:
  2 Numba x 1 BLAS thread 280 ms; 1 Numba x 2 BLAS threads 2.4 s (every small gemm hands off
  between threads); 2 x 2 4.7-7.9 s.
- Two pools take turns badly: after a multi-threaded NumPy sgemm, OpenBLAS's worker keeps
  spinning, and the next parallel Numba kernel waits for a time slice: a (2, 1, 32) layer
  norm right after a GEMM took 10-16 ms instead of 0.02 ms. The GEMMs now run on Numba's
  pool, which removes that cause (numbers in ``linear.py``); what remains on a loaded
  machine, the wake-up of a busy core, is handled by the next rule.
- Small inputs run on the calling thread only: waking the second thread of a loaded machine
  costs a time slice (a parallel layer norm: median 6-8 ms at every size up to 1024 x 512,
  where one thread takes 0.02-0.5 ms). The rule: a kernel goes parallel only when one core
  would need about 1 ms or more (``SMALL_ELEMENTS`` here for row kernels, ``SMALL_FLOPS`` in
  ``linear.py`` and ``attention.py``). The base preset's layer norms (1024 x 512) therefore
  run on one thread: base encoder-decoder forward, interleaved, parallel from 128 K elements
  1458 / 630 ms (median / min) vs from 1 M elements 1239 / 485 ms under load; on a quiet
  machine the other way round, by less: 429 / 424 vs 441 / 430 ms (torch 402 / 391 ms).

The limit is process-wide while it is held (OpenBLAS has no per-thread setting), so a
NumPy product running concurrently in another Python thread also runs single-threaded.
"""

from __future__ import annotations

from functools import lru_cache

from threadpoolctl import ThreadpoolController

# Row-wise and elementwise kernels (layer norm, softmax, embedding, activation) on fewer
# elements than this run on the calling thread (~1 ms of one core; see the header).
SMALL_ELEMENTS = 1 << 20


@lru_cache(maxsize=1)
def _blas_libraries() -> tuple:
    # Scanning the loaded libraries costs ~1 ms; do it once (after numpy/scipy are loaded).
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba calls must be loaded)

    controller = ThreadpoolController()
    return tuple(lib for lib in controller.lib_controllers if lib.user_api == "blas")


class single_threaded_blas:  # noqa: N801  (used like a function: ``with single_threaded_blas():``)
    """Context manager: every BLAS library in the process runs one thread while it is held.

    Calls the libraries' own get/set functions directly: ~4 us per use, where a
    ``threadpoolctl`` limiter (which re-reads every library's info) costs ~17 us, a
    noticeable share of a decoding step's small GEMMs. Nesting is fine.
    """

    __slots__ = ("_saved",)

    def __enter__(self):
        libs = _blas_libraries()
        self._saved = [lib.get_num_threads() for lib in libs]
        for lib, n in zip(libs, self._saved):
            if n != 1:
                lib.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        for lib, n in zip(_blas_libraries(), self._saved):
            if n != 1:
                lib.set_num_threads(n)
        return False
