"""BLAS ``?gemm`` callable from @njit code, with leading dimensions (shared by the dense kernels).

Numba's ``np.dot`` copies non-contiguous operands and cannot accumulate into a view; the
kernels here call SciPy's OpenBLAS (the BLAS Numba links) directly instead. Hold
``_threads.single_threaded_blas()`` around any call that runs inside a ``prange`` loop.
"""

from __future__ import annotations

from numba.extending import overload
from numba.np.linalg import _BLAS, ensure_blas, get_blas_kind

ensure_blas()  # Numba's BLAS is SciPy's; fail at import, not inside a prange loop.

N = ord("N")  # operand as stored (column-major view)
T = ord("T")  # operand transposed


def gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Column-major ``c = alpha * op(a) @ op(b) + beta * c`` (BLAS ?gemm); @njit code only.

    ``a``, ``b``, ``c`` are arrays whose first element starts the operand (views are fine),
    ``alpha``/``beta`` one-element arrays. Lets the kernels pass leading dimensions and
    accumulate (beta=1) without the copies ``np.dot`` would make. A row-major (r, c) array is
    the column-major (c, r) matrix with leading dimension c.
    """
    raise NotImplementedError("gemm is only callable from @njit code")


@overload(gemm)
def _gemm_impl(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    xxgemm = _BLAS().numba_xxgemm(a.dtype)
    kind = ord(get_blas_kind(a.dtype, "gemm"))

    def impl(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        xxgemm(kind, transa, transb, m, n, k, alpha.ctypes, a.ctypes, lda, b.ctypes, ldb,
               beta.ctypes, c.ctypes, ldc)

    return impl
