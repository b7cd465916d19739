"""cuBLAS SGEMM/DGEMM through CuPy's low-level bindings, on numba device pointers.

The linear layers call ``cupy_backends.cuda.libs.cublas.sgemm`` (``dgemm`` for float64)
with the raw device pointers of numba arrays: no CuPy array is made, nothing passes through
``__cuda_array_interface__`` (whose import in numba synchronises on the exporter's stream
every call; CuPy exports the legacy default stream), and no CuPy allocation happens. CuPy's
bindings set the handle's stream to CuPy's current stream, the legacy default stream unless
a program chooses another, which is the stream every numba launch here uses: cuBLAS and the
numba kernels are ordered without any synchronisation. Host pointer mode (alpha, beta in
host memory) and cuBLAS's default math mode (FP32 on CUDA cores; TF32 only if
``NVIDIA_TF32_OVERRIDE=1``) are set explicitly on every call, since CuPy's own routines may
leave the shared handle otherwise.

Row-major ``Y (M, N) = X (M, K) @ W (N, K)^T`` is the column-major ``Y^T = W X^T``:
``gemm(T, N, m=N, n=M, k=K, W, ldW, X, ldX, Y, ldY)``. In general (``gemm_into``, the
backward's products) row-major ``C = op(A) op(B)`` is the column-major ``C^T = op(B)^T
op(A)^T``, and a row-major matrix read as column-major is its transpose, so cuBLAS gets B
first with op T exactly where B is used transposed, then A likewise.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ._launch import COUNTS

_OP_N, _OP_T = 0, 1  # cublasOperation_t
_POINTER_MODE_HOST = 0  # cublasPointerMode_t
_DEFAULT_MATH = 0  # cublasMath_t

_SCALARS = {np.dtype(np.float32): (np.ones(1, np.float32), np.zeros(1, np.float32)),
            np.dtype(np.float64): (np.ones(1, np.float64), np.zeros(1, np.float64))}


@lru_cache(maxsize=1)
def _bindings():
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas

    return cublas, device


def pointer(a) -> int:
    return a.device_ctypes_pointer.value or 0


def row_stride(a) -> int:
    """Leading dimension (in elements) of a 2-D device array whose rows are contiguous."""
    itemsize = a.dtype.itemsize
    if a.strides[1] != itemsize or a.strides[0] % itemsize:
        raise ValueError(f"cuBLAS needs unit-stride rows; got strides {a.strides}")
    return max(a.strides[0] // itemsize, a.shape[1], 1)


def linear_into(x2, weight, out2) -> None:
    """``out2 (M, N) = x2 (M, K) @ weight (N, K)^T`` on the default stream (no bias)."""
    cublas, device = _bindings()
    COUNTS["cublas"] += 1
    m, k = x2.shape
    n = weight.shape[0]
    dtype = np.dtype(out2.dtype)
    gemm = cublas.sgemm if dtype == np.float32 else cublas.dgemm
    one, zero = _SCALARS[dtype]
    handle = device.get_cublas_handle()
    cublas.setPointerMode(handle, _POINTER_MODE_HOST)
    cublas.setMathMode(handle, _DEFAULT_MATH)
    gemm(handle, _OP_T, _OP_N, n, m, k, one.ctypes.data, pointer(weight), row_stride(weight),
         pointer(x2), row_stride(x2), zero.ctypes.data, pointer(out2), row_stride(out2))


_checked: list = []


def cublas_unavailable_reason() -> str | None:
    """None if cuBLAS through CuPy works here (checked once per process on a 3x5 @ 5x4
    product against NumPy), else a one-line reason."""
    if _checked:
        return _checked[0]
    from ._launch import simulator_enabled

    if simulator_enabled():
        reason = "Numba's CUDA simulator has no cuBLAS"
    else:
        reason = _self_check()
    _checked.append(reason)
    return reason


def _self_check() -> str | None:
    try:
        _bindings()
    except ImportError as exc:
        return f"CuPy is not installed ({exc}; pip install cupy-cuda13x)"
    except Exception as exc:  # a CuPy build that does not match the driver
        return f"CuPy failed to import ({type(exc).__name__}: {exc})"
    try:
        from numba import cuda

        rng = np.random.default_rng(0)
        x = rng.standard_normal((3, 5)).astype(np.float32)
        w = rng.standard_normal((4, 5)).astype(np.float32)
        out = cuda.device_array((3, 4), np.float32)
        linear_into(cuda.to_device(x), cuda.to_device(w), out)
        got = out.copy_to_host()
    except Exception as exc:
        return f"cuBLAS through CuPy failed ({type(exc).__name__}: {exc})"
    expect = x.astype(np.float64) @ w.T.astype(np.float64)
    err = float(np.linalg.norm(got - expect) / np.linalg.norm(expect))
    if not err < 1e-5:
        return f"cuBLAS through CuPy gave a wrong 3x5 @ 5x4 product (relative error {err:.2e})"
    return None


def gemm_into(a, b, c, *, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0) -> None:
    """Row-major ``c (M, N) = alpha * op(a) @ op(b)`` on the default stream, 2-D operands with
    unit-stride rows: op(a) is a (M, K), or a.T for a (K, M) with ``trans_a``; op(b) is b
    (K, N), or b.T for b (N, K) with ``trans_b``."""
    cublas, device = _bindings()
    COUNTS["cublas"] += 1
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    dtype = np.dtype(c.dtype)
    gemm = cublas.sgemm if dtype == np.float32 else cublas.dgemm
    zero = _SCALARS[dtype][1]
    scale = np.full(1, alpha, dtype=dtype)
    handle = device.get_cublas_handle()
    cublas.setPointerMode(handle, _POINTER_MODE_HOST)
    cublas.setMathMode(handle, _DEFAULT_MATH)
    gemm(handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k, scale.ctypes.data,
         pointer(b), row_stride(b), pointer(a), row_stride(a), zero.ctypes.data, pointer(c), row_stride(c))
