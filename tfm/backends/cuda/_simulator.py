"""A fix for Numba's CUDA simulator, applied when the ``cuda`` backend runs under it.

numba-cuda's simulator (0.30.4 and before) runs each CUDA thread as a Python thread and
hands a block's threads the same ``cuda.shared.array`` by looking up the calling line in a
dict, creating the array on a miss, with no lock. A thread switch between the lookup and
the insert gives two threads private "shared" arrays: barrier-correct kernels then read
values the other threads never wrote (a CI run failed this way: 0.16 relative error in
restricted attention, not reproducible on demand). ``thread_safe_shared_arrays`` makes the
get-or-create atomic; it finds the caller from the frame directly, where the simulator
called ``traceback.extract_stack`` on every allocation (the simulator tests ran 140 s ->
120 s). It also accepts the ``alignment`` the GPU kernels give their shared arrays (for
16-byte vector loads), which the simulator refuses. Real GPUs are unaffected: this is only
ever installed with the simulator on.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

_installed = False


def thread_safe_shared_arrays() -> None:
    """Replace the simulator's ``FakeCUDAShared.array`` by a locked get-or-create (idempotent)."""
    global _installed
    if _installed:
        return
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock = threading.Lock()
    original = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        # alignment only lets a GPU vectorise shared loads; the simulator refuses it, and its
        # numpy arrays are 16-byte aligned anyway, so it is accepted and dropped here
        if shape == 0:  # dynamic shared memory
            return original(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array
    _installed = True
