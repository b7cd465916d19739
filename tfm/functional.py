"""``tfm.attention``: scaled dot-product attention on any backend, with validated inputs."""

from __future__ import annotations

import numpy as np

from ._checks import check_attention_inputs, check_impl, format_bytes, is_device_array
from .backends import get_backend
from .errors import InsufficientMemoryError

# The naive kernel holds the score matrix plus softmax temporaries: count three copies.
NAIVE_SCORE_COPIES = 3


def naive_attention_bytes(b: int, h: int, nq: int, nk: int, itemsize: int) -> int:
    """Extra bytes the naive kernel allocates for its (B, H, Nq, Nk) score matrices."""
    return NAIVE_SCORE_COPIES * b * h * nq * nk * itemsize


def available_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


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
        itemsize = 8 if bk.name == "numpy" else dtype.itemsize
        need = naive_attention_bytes(b, h, nq, k.shape[2], itemsize)
        free = bk.free_memory_bytes() if hasattr(bk, "free_memory_bytes") else available_memory_bytes()
        if need > free:
            raise InsufficientMemoryError(
                f"naive attention needs {format_bytes(need)} for its (B={b}, H={h}, Nq={nq}, "
                f"Nk={k.shape[2]}) score matrices but only {format_bytes(free)} is available; "
                f"use impl='fused', whose extra memory grows as O((Nq + Nk) * D)"
            )
    device_in = is_device_array(q)
    out = bk.attention(bk.asarray(q, dtype), bk.asarray(k, dtype), bk.asarray(v, dtype),
                       mask=None if mask is None else bk.asarray(mask), causal=bool(causal), impl=impl)
    if device_in:
        return out
    out = bk.to_numpy(out)
    return out.astype(dtype, copy=False)
