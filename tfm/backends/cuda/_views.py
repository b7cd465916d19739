"""Views of device arrays built directly from shape, strides and an element offset.

numba's ``DeviceNDArray.__getitem__`` walks the contiguous extents of the result in Python
(about 2.5 ms for a column slice of an (8, 128, 1536) projection on the first GPU run,
dev/cuda/profile_forward.txt), and ``reshape`` re-derives the layout through its dummy array.
The kernels here already know the layout they want, so they build the view in one step: a
``DeviceNDArray`` over the same memory (an offset ``MemoryPointer.view``), or, under the
simulator, ``as_strided`` over the simulated array's host memory.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ._launch import simulator_enabled


@lru_cache(maxsize=4096)
def c_strides(shape, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= max(int(s), 1)
    return tuple(reversed(strides))


_FAST = []  # [True] once a direct construction matched numba's constructor, [False] if not
_NUMBA = {}  # numba's device-array modules, imported on first use (not under the simulator)


def _numba():
    if not _NUMBA:
        from numba.cuda.cudadrv import devicearray, driver, dummyarray

        _NUMBA.update(DeviceNDArray=devicearray.DeviceNDArray, driver=driver, dummyarray=dummyarray,
                      MemoryPointer=driver.MemoryPointer, CUdeviceptr=driver.binding.CUdeviceptr)
    return _NUMBA


def _device_array(shape, strides, dtype, gpu_data):
    """``DeviceNDArray(shape, strides, dtype, gpu_data=gpu_data)`` without its argument checks
    (20 us of Python per array; a forward pass builds ~560 views): the attributes its
    ``__init__`` sets, from the same cached dummy array. The first call compares the result
    with numba's own constructor and keeps using that one if they ever differ."""
    nb = _numba()
    DeviceNDArray = nb["DeviceNDArray"]
    itemsize = dtype.itemsize
    dummy = nb["dummyarray"].Array.from_desc(0, shape, strides, itemsize)
    if _FAST == [False] or not dummy.size:
        return DeviceNDArray(shape, strides, dtype, gpu_data=gpu_data)
    arr = object.__new__(DeviceNDArray)
    arr.__dict__.update(ndim=len(shape), _dummy=dummy, shape=dummy.shape, strides=dummy.strides,
                        dtype=dtype, size=dummy.size,
                        alloc_size=nb["driver"].memory_size_from_info(shape, strides, itemsize),
                        gpu_data=gpu_data, stream=0)
    if not _FAST:
        ref = DeviceNDArray(shape, strides, dtype, gpu_data=gpu_data)
        _FAST.append(vars(ref) == vars(arr))
        if not _FAST[0]:
            return ref
    return arr


def strided_view(base, shape, strides, offset: int = 0):
    """Elements of device array ``base`` at ``offset + sum(i * strides)`` from its first element
    (offset in elements, strides in bytes), as a device array of ``shape``. The caller keeps
    the view inside ``base``'s memory; a non-zero offset needs a contiguous ``base``."""
    if offset and not base.is_c_contiguous():
        raise ValueError(f"an offset view needs a contiguous base array, got strides {tuple(base.strides)}")
    shape = tuple(map(int, shape))
    strides = tuple(map(int, strides))
    if simulator_enabled():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = base._ary.reshape(-1)[offset:] if offset else base._ary
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(host, shape, strides))
    data = base.gpu_data
    if offset:
        # a pointer into base's block that holds base's pointer object (so the block outlives
        # the view); numba's MemoryPointer.view does the same through a weakref finalizer,
        # ~0.1 ms each
        nb = _numba()
        nbytes = offset * base.dtype.itemsize
        data = nb["MemoryPointer"](data.context, nb["CUdeviceptr"](data.device_ctypes_pointer.value + nbytes),
                                   data.size - nbytes, owner=data)
    return _device_array(shape, strides, base.dtype, data)


def c_view(base, shape):
    """A contiguous ``base`` seen with another C-order shape of the same size (numba's reshape,
    without re-deriving the layout)."""
    if not base.is_c_contiguous():
        raise ValueError(f"cannot view a non-contiguous device array (strides {tuple(base.strides)}) "
                         f"as shape {tuple(shape)} without a copy")
    shape = tuple(shape)
    return strided_view(base, shape, c_strides(shape, base.dtype.itemsize))
