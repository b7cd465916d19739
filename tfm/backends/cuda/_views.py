"""Views of device arrays built directly from shape, strides and an element offset.

numba's ``DeviceNDArray.__getitem__`` walks the contiguous extents of the result in Python
(about 2.5 ms for a column slice of an (8, 128, 1536) projection on the first GPU run,
dev/cuda/profile_forward.txt), and ``reshape`` re-derives the layout through its dummy array.
The kernels here already know the layout they want, so they build the view in one step: a
``DeviceNDArray`` over the same memory (an offset ``MemoryPointer.view``), or, under the
simulator, ``as_strided`` over the simulated array's host memory.
"""

from __future__ import annotations

import numpy as np

from ._launch import simulator_enabled


def c_strides(shape, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= max(int(s), 1)
    return tuple(reversed(strides))


def strided_view(base, shape, strides, offset: int = 0):
    """Elements of device array ``base`` at ``offset + sum(i * strides)`` from its first element
    (offset in elements, strides in bytes), as a device array of ``shape``. The caller keeps
    the view inside ``base``'s memory; a non-zero offset needs a contiguous ``base``."""
    if offset and not base.is_c_contiguous():
        raise ValueError(f"an offset view needs a contiguous base array, got strides {tuple(base.strides)}")
    shape = tuple(int(s) for s in shape)
    strides = tuple(int(s) for s in strides)
    if simulator_enabled():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = base._ary.reshape(-1)[offset:] if offset else base._ary
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(host, shape, strides))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    data = base.gpu_data.view(offset * base.dtype.itemsize) if offset else base.gpu_data
    return DeviceNDArray(shape, strides, base.dtype, gpu_data=data)


def c_view(base, shape):
    """A contiguous ``base`` seen with another C-order shape of the same size."""
    return strided_view(base, shape, c_strides(shape, base.dtype.itemsize))

