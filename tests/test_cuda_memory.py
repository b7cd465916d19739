"""Device-memory policy of the CUDA backend, tested without a GPU: batched frees and the
caching allocator (on unless ``TFM_CUDA_POOL=0``), against stand-ins for the driver calls."""

from __future__ import annotations

import pytest

from tfm.backends.cuda._launch import simulator_enabled

pytestmark = pytest.mark.skipif(simulator_enabled(), reason="needs numba's real CUDA driver module")


def test_device_frees_are_batched_unless_the_user_chose(monkeypatch):
    from numba.cuda.core import config

    from tfm.backends.cuda import PENDING_FREES, batch_device_frees

    monkeypatch.setattr(config, "CUDA_DEALLOCS_COUNT", 10)
    monkeypatch.setenv("NUMBA_CUDA_MAX_PENDING_DEALLOCS_COUNT", "10")
    batch_device_frees()
    assert config.CUDA_DEALLOCS_COUNT == 10
    monkeypatch.delenv("NUMBA_CUDA_MAX_PENDING_DEALLOCS_COUNT")
    batch_device_frees()
    assert config.CUDA_DEALLOCS_COUNT == PENDING_FREES


def test_pool_allocator_reuses_freed_blocks_and_releases_them_on_oom(monkeypatch):
    import gc

    from numba.cuda.cudadrv.driver import CudaAPIError, NumbaCUDAMemoryManager, binding

    from tfm.backends.cuda._memory import GRANULE, PoolMemoryManager

    class Block:
        def __init__(self, size):
            self.device_pointer, self.size = len(made) + 1, size

    made, fail_next = [], []

    def parent_memalloc(self, size):
        if fail_next:
            fail_next.pop()
            raise CudaAPIError(binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY, "out of memory")
        made.append(Block(size))
        return made[-1]

    monkeypatch.setattr(NumbaCUDAMemoryManager, "memalloc", parent_memalloc)
    mm = PoolMemoryManager(context=None)
    a = mm.memalloc(1000)
    assert a.size == 2 * GRANULE and len(made) == 1
    first = a.device_pointer
    del a
    gc.collect()
    assert mm.cached_bytes() == 2 * GRANULE
    b = mm.memalloc(2 * GRANULE - 3)  # same rounded size: the cached block, no new allocation
    assert b.device_pointer == first and len(made) == 1 and mm.cached_bytes() == 0
    c = mm.memalloc(1)
    assert c.device_pointer != first and c.size == GRANULE and len(made) == 2
    del c
    gc.collect()
    fail_next.append(True)  # the device is full: cached blocks go, the retry succeeds
    d = mm.memalloc(4 * GRANULE)
    assert mm.cached_bytes() == 0 and d.device_pointer == 3

    def broken(self, size):
        raise CudaAPIError(binding.CUresult.CUDA_ERROR_INVALID_VALUE, "invalid value")

    monkeypatch.setattr(NumbaCUDAMemoryManager, "memalloc", broken)
    with pytest.raises(CudaAPIError, match="invalid value"):  # other errors are not swallowed
        mm.memalloc(8 * GRANULE)


def test_pool_module_is_imported_only_when_requested():
    """``_memory`` needs numba-cuda's ``binding`` module (absent in older releases): importing
    the backend, or asking whether the pool is on with TFM_CUDA_POOL=0, must not import it."""
    import os
    import subprocess
    import sys

    code = ("import sys, tfm.backends.cuda as c; c.pool_requested(); "
            "print('tfm.backends.cuda._memory' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TFM_CUDA_POOL": "0"})
    assert out.stdout.strip() == "False"


def test_pool_requested_follows_the_environment(monkeypatch):
    from tfm.backends.cuda import pool_requested

    monkeypatch.delenv("TFM_CUDA_POOL", raising=False)
    assert pool_requested()  # on by default: 2.2x on the H200's base forward
    monkeypatch.setenv("TFM_CUDA_POOL", "1")
    assert pool_requested()
    monkeypatch.setenv("TFM_CUDA_POOL", "0")
    assert not pool_requested()


def test_pool_with_caching_off_allocates_like_numba(monkeypatch):
    from numba.cuda.cudadrv.driver import NumbaCUDAMemoryManager

    from tfm.backends.cuda._memory import PoolMemoryManager

    made = []
    monkeypatch.setattr(NumbaCUDAMemoryManager, "memalloc", lambda self, size: made.append(size) or size)
    mm = PoolMemoryManager(context=None)
    mm.caching = False
    assert mm.memalloc(1000) == 1000 and made == [1000]  # no rounding, no free list
    assert mm.cached_bytes() == 0
