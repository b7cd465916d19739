"""Compile numba-cuda kernels for a chosen GPU without one: PTX, ptxas reports, launch checks.

Used by ``tests/test_cuda_ptx.py`` (every kernel compiles for sm_90; ptxas registers, spills
and shared memory) and by ``dev/cuda/lab.py`` (host cost of the launch paths with the
driver calls stubbed). :func:`offline` patches the few numba-cuda 0.30 internals that ask a
device for its compute capability, or load a module into a context, for as long as the
``with`` block runs; it needs a CUDA toolkit's libNVVM and libdevice (``CUDA_HOME`` or
/usr/local/cuda*). Nothing here runs on a GPU or is used by the backend itself.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import tempfile

CC = (9, 0)  # H100/H200


def toolkit():
    """(root, libdevice path) of a CUDA toolkit with libNVVM, or (None, None)."""
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + sorted(glob.glob("/usr/local/cuda*"))
    for root in filter(None, roots):
        libdevice = os.path.join(root, "nvvm", "libdevice", "libdevice.10.bc")
        nvvm = glob.glob(os.path.join(root, "lib*", "libnvvm.so*")) + glob.glob(
            os.path.join(root, "nvvm", "lib64", "libnvvm.so*"))
        if os.path.exists(libdevice) and nvvm:
            return root, libdevice
    return None, None


class _FakeCufunc:
    """Stands in for a loaded CUfunction: launches go nowhere, attributes are ptxas's."""

    class attrs:
        regs = 0
        maxthreads = 1024

    kernel = None


@contextlib.contextmanager
def offline(cc=CC, stub_launch: bool = False, fake_memory: bool = False):
    """Within the block, kernels compile for ``cc`` with no device present. With
    ``stub_launch``, compiled kernels also "launch": everything numba and tfm do on the host
    runs, the final driver call is a no-op (host-side timing of the launch paths). With
    ``fake_memory`` too, device allocations and uploads return made-up device arrays,
    downloads return zeros and ``CudaBackend`` starts: a whole model's forward pass then runs
    its host side only (nothing is computed)."""
    root, libdevice = toolkit()
    if root is None:
        raise RuntimeError("no CUDA toolkit with libNVVM and libdevice found (set CUDA_HOME)")
    import numba.cuda.codegen as codegen
    import numba.cuda.cudadrv.nvvm as nvvm
    import numba.cuda.dispatcher as dispatcher

    class _Device:  # device functions ask the current device for its compute capability
        compute_capability = cc

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    old_home = os.environ.get("CUDA_HOME")
    os.environ["CUDA_HOME"] = old_home or root  # where numba looks for libNVVM
    try:
        patch(dispatcher, "get_current_device", lambda: _Device())
        patch(codegen.nvrtc, "get_arch_option", lambda major, minor: f"compute_{major}{minor}")
        patch(nvvm, "get_libdevice", lambda: libdevice)
        patch(nvvm, "open_libdevice", lambda: open(libdevice, "rb").read())
        # the on-disk kernel cache asks the driver for its version: compile afresh instead
        patch(dispatcher.CUDACache, "load_overload", lambda self, sig, ctx: None)
        patch(dispatcher.CUDACache, "save_overload", lambda self, sig, data: None)
        if stub_launch:
            patch(codegen.CUDACodeLibrary, "_ensure_cc", lambda self, c: c or cc)
            patch(codegen.CUDACodeLibrary, "get_cufunc", lambda self: _FakeCufunc())
            patch(dispatcher._Kernel, "bind", lambda self: None)
            patch(dispatcher, "launch", lambda *args: None)
        if stub_launch and fake_memory:
            _fake_memory(patch)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        if old_home is None:
            os.environ.pop("CUDA_HOME", None)


def _fake_memory(patch) -> None:
    import itertools

    import numpy as np
    from numba import cuda
    from numba.cuda.cudadrv import devicearray

    import tfm.backends.cuda as backend

    addresses = itertools.count(1 << 32, 1 << 28)  # disjoint made-up blocks

    def device_array(shape, dtype=np.float64, *args, **kwargs):
        return fake_device_array((shape,) if isinstance(shape, int) else tuple(shape), dtype, ptr=next(addresses))

    def to_device(ary, *args, **kwargs):
        ary = np.asarray(ary)
        return fake_device_array(ary.shape, ary.dtype, ptr=next(addresses))

    patch(cuda, "device_array", device_array)
    patch(cuda, "to_device", to_device)
    patch(cuda, "synchronize", lambda: None)
    patch(devicearray.DeviceNDArray, "copy_to_host", lambda self, *a, **k: np.zeros(self.shape, self.dtype))
    patch(devicearray.DeviceNDArray, "__getitem__", lambda self, item: self._do_getitem(item))  # no context
    patch(backend, "cuda_unavailable_reason", lambda: None)


def ptxas_path():
    root, _ = toolkit()
    return shutil.which("ptxas") or (root and shutil.which(os.path.join(root, "bin", "ptxas")))


def compile_ptx(kernel, sig, cc=CC):
    """PTX of a ``@cuda.jit`` kernel for ``sig`` (call inside :func:`offline`)."""
    from numba import cuda

    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
    return ptx


def ptxas_report(ptx: str, cc=CC) -> dict | None:
    """ptxas -v on the PTX: registers, spill stores/loads (bytes), static shared memory
    (bytes) and the raw report; None without ptxas."""
    exe = ptxas_path()
    if not exe:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([exe, "-v", f"-arch=sm_{cc[0]}{cc[1]}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = res.stderr

    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "smem": num(r"(\d+) bytes smem"),
            "report": text}


def fake_device_array(shape, dtype, strides=None, ptr: int = 1 << 20):
    """A numba ``DeviceNDArray`` over a made-up device address (no allocation, no context):
    enough for typing, marshalling and stubbed launches, never for a real launch."""
    import numpy as np
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.cudadrv.driver import MemoryPointer, binding

    from ._views import c_strides

    dtype = np.dtype(dtype)
    strides = c_strides(shape, dtype.itemsize) if strides is None else tuple(strides)
    extent = sum((s - 1) * st for s, st in zip(shape, strides)) + dtype.itemsize
    data = MemoryPointer(context=None, pointer=binding.CUdeviceptr(ptr), size=extent)
    return DeviceNDArray(tuple(shape), strides, dtype, gpu_data=data)
