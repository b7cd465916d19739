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

Second, the simulator's block runner waits for a barrier by polling: its main thread loops
over the block's threads (``is_alive`` and a flag each) until all are blocked in
``syncthreads``, holding the GIL the simulated threads need to get there. A tiny
Transformer's training step (268 launches, 69 of them tiled GEMMs) spent 61 of its 112 s in
that loop. ``event_driven_barriers`` makes the runner sleep on a condition that each thread
notifies when it blocks or finishes; barrier semantics are unchanged (release when every live
thread of the block waits; an exception aborts the block and is raised).
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
    event_driven_barriers()
    _installed = True


def event_driven_barriers() -> None:
    """Replace the simulator's polling ``BlockManager.run`` by one that waits on a condition."""
    from numba.cuda.simulator import kernel as simkernel

    if getattr(simkernel.BlockManager, "_tfm_event_driven", False):
        return
    thread_run = simkernel.BlockThread.run

    def syncthreads(self):
        if self.abort:
            raise RuntimeError("abort flag set on syncthreads call")
        cond = self._manager._tfm_cond
        with cond:
            self.syncthreads_blocked = True
            cond.notify_all()
        self.syncthreads_event.wait()
        self.syncthreads_event.clear()
        if self.abort:
            raise RuntimeError("abort flag set on syncthreads clear")

    def run_thread(self):
        try:
            thread_run(self)
        finally:
            cond = self._manager._tfm_cond
            with cond:
                self._tfm_finished = True
                cond.notify_all()

    def run_block(self, grid_point, *args):
        self._tfm_cond = cond = threading.Condition()
        threads = []
        for block_point in np.ndindex(*self._block_dim):
            t = simkernel.BlockThread(lambda: self._f(*args), self, grid_point, block_point, self._debug)
            t._tfm_finished = False
            threads.append(t)
        for t in threads:
            t.start()
        with cond:
            while True:
                failed = next((t for t in threads if t.exception), None)
                if failed is not None:  # abort the block, as the simulator does, and raise
                    for t in threads:
                        t.abort = True
                        t.syncthreads_blocked = False
                        t.syncthreads_event.set()
                    raise failed.exception[0].with_traceback(failed.exception[1])
                live = [t for t in threads if not t._tfm_finished]
                if not live:
                    break
                if all(t.syncthreads_blocked for t in live):  # every live thread at the barrier
                    for t in live:
                        t.syncthreads_blocked = False
                        t.syncthreads_event.set()
                    continue
                cond.wait(timeout=1.0)  # a notify wakes it; the timeout only guards a missed one
        for t in threads:
            t.join()

    simkernel.BlockThread.syncthreads = syncthreads
    simkernel.BlockThread.run = run_thread
    simkernel.BlockManager.run = run_block
    simkernel.BlockManager._tfm_event_driven = True
