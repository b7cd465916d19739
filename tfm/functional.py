"""``tfm.attention``: scaled dot-product attention on any backend, with validated inputs."""

from __future__ import annotations

import numpy as np

from ._checks import check_attention_inputs, check_impl, format_bytes, is_device_array
from .backends import get_backend
from .errors import InsufficientMemoryError


def naive_score_matrices(backend_name: str, b: int, h: int) -> int:
    """How many (Nq, Nk) score matrices the naive kernel of a backend holds at once.

    numpy (the float64 reference): scores, their exponentials and the weights, for every
    (b, h): 3 * B * H. cpu: one per worker thread (each (b, h) of the parallel loop
    allocates its own and frees it): min(B * H, threads). cuda: one (B*H, Nq, Nk) array,
    normalised in place: B * H.
    """
    if backend_name == "cpu":
        import numba

        return min(b * h, numba.get_num_threads())
    if backend_name == "cuda":
        return b * h
    return 3 * b * h


def naive_attention_bytes(b: int, h: int, nq: int, nk: int, itemsize: int, backend_name: str = "numpy") -> int:
    """Extra bytes the naive kernel of ``backend_name`` allocates for its score matrices."""
    return naive_score_matrices(backend_name, b, h) * nq * nk * itemsize


def available_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_naive_attention_memory(bk, b: int, h: int, nq: int, nk: int, itemsize: int) -> None:
    """Raise :class:`InsufficientMemoryError` before a naive attention whose score matrices
    would not fit in the backend's free memory (device memory on cuda, RAM otherwise)."""
    if bk.name == "numpy":
        itemsize = 8  # the reference computes in float64
    need = naive_attention_bytes(b, h, nq, nk, itemsize, bk.name)
    free = bk.free_memory_bytes() if hasattr(bk, "free_memory_bytes") else available_memory_bytes()
    if need > free:
        raise InsufficientMemoryError(
            f"naive attention needs {format_bytes(need)} for its (B={b}, H={h}, Nq={nq}, "
            f"Nk={nk}) score matrices but only {format_bytes(free)} is available; "
            f"use impl='fused', whose extra memory grows as O((Nq + Nk) * D)"
        )


def attention(q, k, v, *, mask=None, causal: bool = False, impl: str = "fused",
              backend: str = "cpu"):
    """Scaled dot-product attention, softmax(Q K^T / sqrt(d_k)) V (paper eq. 1).

    Parameters
    ----------
    q, k, v : (B, H, Nq, Dk), (B, H, Nk, Dk), (B, H, Nk, Dv), float32 or float64 (one dtype).
    mask : optional bool array broadcastable to (B, H, Nq, Nk); True = may attend.
    causal : mask keys after the query position (top-left aligned, like SDPA's is_causal).
    impl : "fused" (tiled, online softmax, O((Nq + Nk) * D) extra memory per head) or
        "naive" (materialises the (Nq, Nk) score matrix).
    backend : "numpy" (float64 reference), "cpu" (Numba) or "cuda" (numba-cuda).

    Returns (B, H, Nq, Dv) in the input dtype. Query rows with no visible key are zeros.
    On ``cuda``, device-array inputs give a device-array result; host inputs give host output.
    """
    impl = check_impl(impl)
    bk = get_backend(backend)
    q, k, v, mask = check_attention_inputs(q, k, v, mask)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    dtype = np.dtype(q.dtype)
    if impl == "naive" or bk.name == "numpy":  # the reference always materialises the scores
        b, h, nq, _ = q.shape
        check_naive_attention_memory(bk, b, h, nq, k.shape[2], dtype.itemsize)
    device_in = is_device_array(q)
    out = bk.attention(bk.asarray(q, dtype), bk.asarray(k, dtype), bk.asarray(v, dtype),
                       mask=None if mask is None else bk.asarray(mask), causal=bool(causal), impl=impl)
    if device_in:
        return out
    out = bk.to_numpy(out)
    return out.astype(dtype, copy=False)
