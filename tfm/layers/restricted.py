"""Restricted self-attention (section 4, Table 1's last row) as a function on any backend."""

from __future__ import annotations

import numpy as np

from .._checks import check_attention_inputs, check_bool, check_int, is_device_array
from ..backends import get_backend

__all__ = ["restricted_attention"]


def restricted_attention(q, k, v, window: int, *, causal: bool = False, backend="cpu"):
    """Self-attention restricted to a neighbourhood of r = ``window`` keys (paper, section 4).

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv), one float dtype. Centred: query i
    sees keys i - (r-1)//2 ... i + r//2; ``causal``: keys i - r + 1 ... i (clipped to the
    sequence). Costs O(r * N * D), not the O(N^2 * D) of masked full attention; with
    r >= 2N - 1 (centred) or r >= N (causal) it equals full (or causal) attention.
    Returns (B, H, Nq, Dv) in the input dtype; a query with no key in range gets zeros.
    """
    bk = get_backend(backend)
    q, k, v, window, causal = check_restricted_inputs(q, k, v, window, causal)
    dtype = np.dtype(q.dtype)
    device_in = is_device_array(q)
    out = bk.restricted_attention(bk.asarray(q, dtype), bk.asarray(k, dtype), bk.asarray(v, dtype),
                                  window, causal)
    if device_in:
        return out
    return np.asarray(bk.to_numpy(out)).astype(dtype, copy=False)


def check_restricted_inputs(q, k, v, window, causal):
    """Validated (q, k, v, window, causal) of :func:`restricted_attention` (and of its vjp)."""
    q, k, v, _ = check_attention_inputs(q, k, v)
    return q, k, v, check_int("window", window), check_bool("causal", causal)
