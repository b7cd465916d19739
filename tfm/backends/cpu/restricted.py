"""Restricted (windowed) self-attention on the CPU, at O(r * N * D) cost (paper, section 4).

Query i sees only the keys j of its neighbourhood of r = ``window`` positions:
centred ``i - (r-1)//2 <= j <= i + r//2``, causal ``i - r + 1 <= j <= i`` (the definition
of ``tfm.reference.baselines.restricted_window``), clipped to the sequence. No (N, N)
score matrix exists anywhere: work and memory grow linearly in N for a fixed window.

Kernel (banded gemm): one parallel task per (batch, head, block of ``query_block(r)``
queries). The block's queries see, between them, a key range of at most block + r - 1
keys; the task multiplies the Q block by that K range (one single-threaded BLAS gemm), runs
each row's softmax over its own window only (the vectorised exp of ``norm``; everything
outside the window is zeroed), and multiplies by the V range (a second gemm). The gemms do
(block + r - 1) / r times the useful work; at the gemm's speed that is the better trade.

Measured side by side (quiet 2-core AMD EPYC VM, float32, B=2, 8 heads of 64, 2 threads,
median ms; SDPA = PyTorch with the band as a dense mask, O(N^2)):

                          N=128   N=1024   N=4096
    window 64, banded      0.95     9.4     29.6   (query blocks of 64)
    window 64, per-query   3.17    26.9    102.7   (previous kernel: one query at a time,
                                                    window-long vector loops, ~4 GFLOP/s)
    SDPA with band mask    1.47    64.9    734
    N=1024, window 8: banded 4.9-5.1 (blocks 16-64) vs 5.3 per-query, window 256: 16.5
    (blocks of 64) vs 88.7; blocks of 128 or 256 lose (more wasted work), hence
    ``query_block``: the window rounded up to 16, between 16 and 64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._blas import N as _N
from ._blas import T as _T
from ._blas import gemm as _gemm
from ._threads import single_threaded_blas
from .norm import softmax_in_place


def query_block(window: int) -> int:
    """Queries per task: the window rounded up to 16, clipped to [16, 64] (measured, header)."""
    return min(64, max(16, -(-window // 16) * 16))


def window_bounds(window: int, causal: bool) -> tuple[int, int]:
    """(left, right): query i sees keys i - left ... i + right."""
    if causal:
        return window - 1, 0
    return (window - 1) // 2, window // 2


@njit(cache=True, parallel=True)
def _banded(q, k, v, left, right, block, out):
    batch, heads, n_q, d_k = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    dt = q.dtype.type
    n_blocks = (n_q + block - 1) // block
    for task in prange(batch * heads * n_blocks):
        bh, qb = task // n_blocks, task % n_blocks
        b, h = bh // heads, bh % heads
        i0 = qb * block
        i1 = min(n_q, i0 + block)
        lo = max(0, i0 - left)  # the block's key range [lo, hi)
        hi = min(n_k, i1 + right)
        o = out[b, h, i0:i1]
        width = hi - lo
        if width <= 0:  # no key in range (only when Nq > Nk): zeros, as the reference
            o[:] = 0
            continue
        alpha = np.full(1, dt(1.0 / math.sqrt(d_k)), q.dtype)
        one = np.ones(1, q.dtype)
        zero = np.zeros(1, q.dtype)
        s = np.empty((i1 - i0, width), q.dtype)
        # row-major S = Q K^T is column-major S^T = K Q^T (as attention.py)
        _gemm(_T, _N, width, i1 - i0, d_k, alpha, k[b, h, lo:hi], d_k, q[b, h, i0:i1], d_k,
              zero, s, width)
        for r in range(i1 - i0):
            row = s[r]
            a = max(lo, i0 + r - left) - lo  # this query's window inside the range
            z = max(a, min(hi, i0 + r + right + 1) - lo)
            row[:a] = 0
            row[z:] = 0
            softmax_in_place(row[a:z], z - a)
        _gemm(_N, _N, d_v, i1 - i0, width, one, v[b, h, lo:hi], d_v, s, width, zero, o, d_v)


def restricted_attention(q, k, v, window: int, causal: bool = False):
    """softmax(q k^T / sqrt(d_k)) v over each query's window; (B, H, Nq, Dk/Dv) -> (B, H, Nq, Dv)."""
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    left, right = window_bounds(int(window), bool(causal))
    out = np.empty(q.shape[:3] + (v.shape[3],), q.dtype)
    if out.size:
        with single_threaded_blas():  # the backend's one pool is Numba's (_threads)
            _banded(q, k, v, left, right, query_block(int(window)), out)
    return out
