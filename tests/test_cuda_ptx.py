"""Every CUDA kernel compiles for a real GPU (sm_90 PTX through NVVM), without a GPU.

The simulator runs kernels as Python, so it cannot catch what only the CUDA compiler sees:
typing errors, non-constant shared/local array shapes, float64 promotion. Here each kernel
factory is compiled with ``numba.cuda.compile_ptx`` for compute capability 9.0 (H100), and
``ptxas`` (when present) must allocate the hot kernels without register spills. Needs a
CUDA toolkit's libNVVM and libdevice (``CUDA_HOME`` or /usr/local/cuda*); skipped otherwise.
Runs in the normal (non-simulator) test process.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import numpy as np
import pytest

from tfm.backends.cuda._launch import simulator_enabled


def _toolkit():
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + sorted(glob.glob("/usr/local/cuda*"))
    for root in filter(None, roots):
        libdevice = os.path.join(root, "nvvm", "libdevice", "libdevice.10.bc")
        nvvm = glob.glob(os.path.join(root, "lib*", "libnvvm.so*")) + glob.glob(
            os.path.join(root, "nvvm", "lib64", "libnvvm.so*"))
        if os.path.exists(libdevice) and nvvm:
            return root, libdevice
    return None, None


ROOT, LIBDEVICE = _toolkit()
pytestmark = [
    pytest.mark.skipif(simulator_enabled(), reason="numba runs in simulator mode in this process"),
    pytest.mark.skipif(ROOT is None, reason="no CUDA toolkit with libNVVM and libdevice found "
                                            "(set CUDA_HOME)"),
]
CC = (9, 0)


@pytest.fixture(scope="module")
def compile_ptx():
    """``compile_ptx(kernel, signature) -> (ptx, ptxas report)`` for sm_90 without a GPU."""
    mp = pytest.MonkeyPatch()
    if not os.environ.get("CUDA_HOME"):
        mp.setenv("CUDA_HOME", ROOT)  # where numba looks for libNVVM
    try:
        import numba.cuda.codegen as codegen
        import numba.cuda.cudadrv.nvvm as nvvm
        import numba.cuda.dispatcher as dispatcher
        from numba import cuda

        class _Device:  # device functions ask the current device for its compute capability
            compute_capability = CC

        mp.setattr(dispatcher, "get_current_device", lambda: _Device())
        mp.setattr(codegen.nvrtc, "get_arch_option", lambda major, minor: f"compute_{major}{minor}")
        mp.setattr(nvvm, "get_libdevice", lambda: LIBDEVICE)
        mp.setattr(nvvm, "open_libdevice", lambda: open(LIBDEVICE, "rb").read())
    except (ImportError, AttributeError) as exc:
        mp.undo()
        pytest.skip(f"this numba-cuda's internals differ from the ones patched here: {exc}")
    ptxas = shutil.which("ptxas") or shutil.which(os.path.join(ROOT, "bin", "ptxas"))

    def run(kernel, sig, tmp):
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC)
        if not ptxas:
            return ptx, None
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch=sm_{CC[0]}{CC[1]}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
        return ptx, res.stderr

    yield run
    mp.undo()


def _kernels():
    from numba import types as T

    from tfm.backends.cuda import attention as A
    from tfm.backends.cuda import conv as C
    from tfm.backends.cuda import embedding as E
    from tfm.backends.cuda import linear as L
    from tfm.backends.cuda import norm as N
    from tfm.backends.cuda import recurrent as R
    from tfm.backends.cuda._launch import Tuning

    t, i64, f32, f64 = Tuning(), T.int64, T.float32, T.float64

    def a(dt, nd, layout="C"):
        return T.Array(dt, nd, layout)

    f1, f2, f3, f4 = (a(f32, n) for n in (1, 2, 3, 4))
    mask = a(T.boolean, 4, "A")
    fused_args = (f4, f4, f4, f4, mask, i64, i64, i64, i64, f32, i64, i64)
    s32, s64 = np.dtype(np.float32), np.dtype(np.float64)
    # (name, kernel, signature, must not spill)
    yield "gemm_large_gelu", L.gemm_kernel(s32, *t.gemm_large, True, 2, True), (f3, f3, f1, f3, i64, i64, i64, f32), True
    yield "gemm_small_nt", L.gemm_kernel(s32, *t.gemm_small, False, 0, False), (f3, f3, f1, f3, i64, i64, i64, f32), True
    yield "gemm_f64", L.gemm_kernel(s64, *t.gemm_small, True, 1, True), (a(f64, 3), a(f64, 3), a(f64, 1), a(f64, 3), i64, i64, i64, f64), True
    for masked, band in ((False, False), (True, True)):
        yield f"fused_m{masked:d}_b{band:d}", A.fused_kernel(s32, 64, 64, *A.fused_tiles(t, 64, 64, 4), masked, band), fused_args, True
    yield "fused_strided_kv", A.fused_kernel(s32, 64, 64, *A.fused_tiles(t, 64, 64, 4), False, True), \
        (f4, a(f32, 4, "A"), a(f32, 4, "A"), f4) + fused_args[4:], True
    yield "fused_f64_d128", A.fused_kernel(s64, 128, 128, *A.fused_tiles(t, 128, 128, 8), True, False), \
        (a(f64, 4),) * 4 + (mask, i64, i64, i64, i64, f64, i64, i64), False
    yield "softmax_masked_causal", N.softmax_kernel(s32, t.row_threads, False, True, True), (f2, f2, mask) + (i64,) * 6, False
    yield "log_softmax", N.softmax_kernel(s32, t.row_threads, True, False, False), (f2, f2, mask) + (i64,) * 6, False
    yield "layer_norm_residual", N._layer_norm_kernel(s32, t.row_threads, True), (f2, f2, f1, f1, f32, f2), False
    yield "argmax", N._argmax_kernel(s32, t.row_threads), (f2, a(i64, 1)), False
    yield "add", L._add_kernel(), (f1, f1, f1), False
    yield "gelu", L._unary_kernel(s32, 2), (f1, f1), False
    yield "cast", L._cast_kernel(), (a(f64, 1), f1), False
    yield "copy4", L._copy_kernel(4), (a(f32, 4, "A"), f4), False
    yield "embedding", E._embedding_kernel(), (a(i64, 1), f2, f32, f2), False
    yield "add_pe", E._add_pe_kernel(), (f3, f2, i64, f3), False
    yield "split_heads_view", A._split_kernel(), (a(f32, 3, "A"), i64, f4), False
    yield "merge_heads", A._merge_kernel(), (f4, f3), False
    yield "write_rows", A._write_rows_kernel(), (f4, f4, i64), False
    for kind in range(4):
        yield f"recurrent_step_{kind}", R._step_kernel(s32, kind), (f3, i64, f2, f2, f2, f1, f3, f2, f2), False
    yield "im2col", C._im2col_kernel(s32), (f3, f2, i64, i64, i64, i64), False
    yield "glu", C._glu_kernel(s32), (f2, f2), False


def test_every_kernel_compiles_for_sm90(compile_ptx, tmp_path):
    failures = []
    for name, kernel, sig, no_spill in _kernels():
        try:
            ptx, report = compile_ptx(kernel, sig, str(tmp_path))
        except Exception as exc:  # collect them all, then fail once with every message
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        assert ".entry" in ptx
        if no_spill and report is not None and "0 bytes spill stores" not in report:
            failures.append(f"{name} spills registers:\n{report}")
        # float32 kernels must not silently compute in float64 (a Python float literal would)
        if "f64" not in name and "cast" not in name:
            assert ".f64" not in ptx.split(".entry")[1], f"{name} computes in float64"
    assert not failures, "\n".join(failures)
