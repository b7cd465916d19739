"""CUDA tests: run under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before Python
starts, as ``make test-cudasim`` does) or on a real GPU; otherwise every test here is skipped
with the reason. Numba is not imported before that check: importing it first would fix its
mode for the whole process.

Device allocations are poisoned (NaN-filled) during the tests, so an output element a
kernel forgets to write shows up as NaN and fails ``rel_err``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest

# Test modules here `from conftest import ...`, which resolves to this file: re-export the
# shared helpers of tests/conftest.py (loaded by path, since both files are "conftest").
_spec = importlib.util.spec_from_file_location(
    "_tfm_tests_conftest", os.path.join(os.path.dirname(os.path.dirname(__file__)), "conftest.py"))
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
TOL, rel_err, randn, requires_torch = _root.TOL, _root.rel_err, _root.randn, _root.requires_torch

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")


def _gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") or bool(shutil.which("nvidia-smi"))


SKIP_REASON = None if SIMULATOR or _gpu_present() else (
    "CUDA tests need a GPU or Numba's simulator: run `make test-cudasim` "
    "(or set NUMBA_ENABLE_CUDASIM=1 before starting Python)"
)


if SIMULATOR:
    # Every simulated thread is a Python thread; switching between them more often than
    # the default 5 ms makes barrier-heavy kernels several times faster.
    sys.setswitchinterval(5e-4)
    # The backend installs this itself; here it also covers kernels launched directly.
    from tfm.backends.cuda._simulator import thread_safe_shared_arrays

    thread_safe_shared_arrays()


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def bk():
    from tfm.backends.cuda import CudaBackend

    return CudaBackend()


@pytest.fixture(autouse=True)
def poison_device_allocations(monkeypatch):
    """Every float ``cuda.device_array`` starts as NaN, so unwritten outputs are caught."""
    if SKIP_REASON is not None:
        yield
        return
    from numba import cuda

    original = cuda.device_array

    def poisoned(shape, dtype=np.float64, *args, **kwargs):
        arr = original(shape, dtype, *args, **kwargs)
        if np.dtype(dtype).kind == "f":
            arr.copy_to_device(np.full(tuple(arr.shape), np.nan, dtype=dtype))
        return arr

    monkeypatch.setattr(cuda, "device_array", poisoned)
    yield


def run(bk, fn, *args):
    """Upload host arrays (None passes through), call ``fn`` on the backend, download."""
    dev = [None if a is None else bk.asarray(a) for a in args]
    out = fn(*dev)
    if isinstance(out, tuple):
        return tuple(bk.to_numpy(o) for o in out)
    return bk.to_numpy(out)
