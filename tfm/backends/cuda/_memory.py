"""The caching device allocator of the CUDA backend (on by default; ``TFM_CUDA_POOL=0`` turns it off).

Numba allocates every device array with ``cuMemAlloc`` and frees it with ``cuMemFree``,
which synchronizes the device. A forward pass creates hundreds of short-lived
activations of a few recurring sizes, so :class:`PoolMemoryManager` (a Numba EMM plugin
built on Numba's own manager) keeps freed blocks in per-size free lists and hands them
out again, as PyTorch's caching allocator does. Reuse is stream-ordered: every tfm kernel
and every cuBLAS call runs on the legacy default stream, so a block handed out again is
written only after the kernels that read it. When an allocation fails for lack of memory,
the cached blocks are released and the allocation is retried once; the backend's
``free_memory_bytes`` counts cached blocks as free.

It must be installed before the process creates its CUDA context; ``CudaBackend`` does so
and warns if a context already existed. Verdict, from
``python3 -m dev.cuda.lab --out DIR --family forward`` (caching on and off interleaved in one
process; NVIDIA H200, dev/cuda/gpu/forward.csv): the base-config forward pass (B=8, n=128,
116 allocations per call) took 16.1 ms with the pool against 34.9 ms without, 2.2x. Its
bookkeeping is unit-tested (tests/test_cuda_memory.py).
"""

from __future__ import annotations

import functools
import warnings
import weakref

from numba.cuda.cudadrv.driver import CudaAPIError, MemoryPointer, NumbaCUDAMemoryManager, binding

GRANULE = 512  # bytes; allocations are rounded up to a multiple


def _is_out_of_memory(exc: CudaAPIError) -> bool:
    return exc.code == binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY


class PoolMemoryManager(NumbaCUDAMemoryManager):
    """Numba's memory manager plus per-size free lists of device blocks. With ``caching``
    False it allocates as Numba's own manager does (the lab switches it between rounds to time
    pool on and off in one process, since the manager is fixed when the context is made)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._free: dict[int, list] = {}
        self.caching = True

    def memalloc(self, size):
        if not self.caching:
            return super().memalloc(size)
        size = max(GRANULE, -(-int(size) // GRANULE) * GRANULE)
        bucket = self._free.setdefault(size, [])
        block = bucket.pop() if bucket else self._allocate(size)
        ctx = self.context if self.context is None else weakref.proxy(self.context)
        # When the array's pointer dies, its block returns to the free list (no cuMemFree).
        return MemoryPointer(ctx, block.device_pointer, size, finalizer=functools.partial(bucket.append, block))

    def _allocate(self, size):
        try:
            return super().memalloc(size)
        except CudaAPIError as exc:
            if not _is_out_of_memory(exc):
                raise
            self.release_cached()
            return super().memalloc(size)

    def cached_bytes(self) -> int:
        return sum(size * len(blocks) for size, blocks in self._free.items())

    def release_cached(self) -> None:
        """Drop the free lists: Numba's own finalizers then free the blocks."""
        self._free.clear()
        self.deallocations.clear()

    def reset(self):
        self.release_cached()
        super().reset()


def install_pool() -> None:
    """Make new CUDA contexts use :class:`PoolMemoryManager`; warn if one already exists."""
    from numba import cuda

    from numba.cuda.cudadrv.error import CudaSupportError

    cuda.set_memory_manager(PoolMemoryManager)
    try:
        ctx = cuda.current_context()
    except CudaSupportError:  # no driver (host-only tests with a stubbed launch): nothing to install into
        return
    if not isinstance(ctx.memory_manager, PoolMemoryManager):
        warnings.warn("tfm's caching allocator is not installed: this process created its CUDA "
                      "context before the cuda backend; create the backend first (or set TFM_CUDA_POOL=0)",
                      RuntimeWarning, stacklevel=3)
