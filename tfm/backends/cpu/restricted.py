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

Backward (``restricted_attention_backward``; ``restricted_attention_train`` also writes each
query's log-sum-exp): the same banded blocks, each through the five gemms of attention's
backward block step (``_band_backward_block``; P recomputed from lse, zero outside each
query's window; ``attention._ds_rows`` for dS = P (dP - D)). Neighbouring query
blocks share keys, so one work item owns a head's dK and dV (or, when heads are fewer than
threads, a range of its query blocks with its own partial). Time / autograd through SDPA
with the band as a dense mask, B=2, H=8, n=1024, window 64 (``python -m
dev.cpu.training_ops``, dev/cpu/results/training_ops.csv, load ~7): 0.11 (0.09-0.11).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ._blas import N as _N
from ._blas import T as _T
from ._blas import gemm as _gemm
from ._threads import single_threaded_blas
from .attention import _ds_rows, _head_rows, _softmax_lse
from .norm import exp2_shift


def query_block(window: int) -> int:
    """Queries per task: the window rounded up to 16, clipped to [16, 64] (measured, header)."""
    return min(64, max(16, -(-window // 16) * 16))


def window_bounds(window: int, causal: bool) -> tuple[int, int]:
    """(left, right): query i sees keys i - left ... i + right."""
    if causal:
        return window - 1, 0
    return (window - 1) // 2, window // 2


@njit(cache=True)
def _banded(q, k, v, left, right, block, out):
    """``_banded_lse`` without the log-sum-exp."""
    _banded_lse(q, k, v, left, right, block, out, np.empty((1, 1, 1), q.dtype), False)


@njit(cache=True, parallel=True)
def _banded_lse(q, k, v, left, right, block, out, lse, save_lse):
    """The banded kernel (module header); with ``save_lse`` each query's log-sum-exp over its
    window goes to lse[b, h, i] (-inf for a query with no key in range)."""
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
            if save_lse:
                lse[b, h, i0:i1] = -np.inf
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
            row_lse = _softmax_lse(row[a:z], z - a)
            if save_lse:
                lse[b, h, i0 + r] = row_lse
        _gemm(_N, _N, d_v, i1 - i0, width, one, v[b, h, lo:hi], d_v, s, width, zero, o, d_v)


def restricted_attention(q, k, v, window: int, causal: bool = False):
    """softmax(q k^T / sqrt(d_k)) v over each query's window; (B, H, Nq, Dk/Dv) -> (B, H, Nq, Dv)."""
    return _restricted(q, k, v, window, causal, False)[0]


def restricted_attention_train(q, k, v, window: int, causal: bool = False):
    """(restricted_attention(...), lse (B, H, Nq)): each query's log-sum-exp over its window."""
    return _restricted(q, k, v, window, causal, True)


def _restricted(q, k, v, window, causal, save_lse):
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    left, right = window_bounds(int(window), bool(causal))
    out = np.empty(q.shape[:3] + (v.shape[3],), q.dtype)
    lse = np.empty(q.shape[:3] if save_lse else (1, 1, 1), q.dtype)
    if out.size:
        with single_threaded_blas():  # the backend's one pool is Numba's (_threads)
            _banded_lse(q, k, v, left, right, query_block(int(window)), out, lse, save_lse)
    elif save_lse:
        lse[:] = -np.inf
    return out, (lse if save_lse else None)


# ---------------------------------------------------------------------------- backward
# The forward's banded blocks again, each with attention's block step (``attention.py``): P
# recomputed from lse over the block's key range (zero outside each query's window),
# dV += P^T dO, dP = dO V^T, dS = P (dP - D), dQ = dS K / sqrt(d_k), dK += dS^T Q / sqrt(d_k).
# Neighbouring query blocks share keys, so dK and dV of one head are accumulated by one work
# item: the prange runs over (b, h) (and over ``groups`` ranges of query blocks per head, each
# with its own dK, dV partial, when the heads alone would leave threads idle).


@njit(cache=True)
def _band_backward_block(q, k, v, do, left, right, dq, gk, gv, consts, s, dp, lse2, drow, b, h,
                         i0, i1):
    """Query rows [i0, i1) of head (b, h) against their key range [lo, hi); gk, gv: the
    (Nk, D) accumulators of dK and dV."""
    n_k, d_k = k.shape[2], k.shape[3]
    d_v = v.shape[3]
    lo = max(0, i0 - left)
    hi = min(n_k, i1 + right)
    width = hi - lo
    rows = i1 - i0
    ld = s.shape[1]  # the score tiles' row stride (sized for the widest block)
    if width <= 0:  # no key in range: the rows passed nothing forward, get nothing back
        dq[b, h, i0:i1] = 0
        return
    # scores in log2 units (consts[0] = log2(e) / sqrt(d_k)), so P = 2**(s - lse log2(e))
    _gemm(_T, _N, width, rows, d_k, consts[0:], k[b, h, lo:hi], d_k, q[b, h, i0:i1], d_k,
          consts[2:], s, ld)
    for r in range(rows):
        row = s[r]
        a = max(lo, i0 + r - left) - lo
        z = max(a, min(hi, i0 + r + right + 1) - lo)
        row[:a] = 0
        row[z:width] = 0
        if lse2[i0 + r] == -np.inf:
            row[a:z] = 0
        else:
            exp2_shift(row[a:z], z - a, lse2[i0 + r])
    _gemm(_N, _T, d_v, width, rows, consts[1:], do[b, h, i0:i1], d_v, s, ld, consts[1:],
          gv[lo:hi], d_v)
    _gemm(_T, _N, width, rows, d_v, consts[1:], v[b, h, lo:hi], d_v, do[b, h, i0:i1], d_v,
          consts[2:], dp, ld)
    _ds_rows(s, dp, drow, i0, rows, width)
    _gemm(_N, _N, d_k, rows, width, consts[3:], k[b, h, lo:hi], d_k, dp, ld, consts[2:],
          dq[b, h, i0:i1], d_k)
    _gemm(_N, _T, d_k, width, rows, consts[3:], q[b, h, i0:i1], d_k, dp, ld, consts[1:],
          gk[lo:hi], d_k)


@njit(cache=True, parallel=True)
def _band_backward(q, k, v, o, do, lse, left, right, block, dq, dk, dv, dk_part, dv_part, groups):
    batch, heads, n_q, d_k = q.shape
    n_blocks = (n_q + block - 1) // block
    max_width = min(k.shape[2], block + left + right)
    consts = np.array([1.4426950408889634 / math.sqrt(d_k), 1.0, 0.0, 1.0 / math.sqrt(d_k)],
                      q.dtype)
    for item in prange(batch * heads * groups):
        bh, g = item // groups, item % groups
        b, h = bh // heads, bh % heads
        gk = dk[b, h] if groups == 1 else dk_part[g, b, h]
        gv = dv[b, h] if groups == 1 else dv_part[g, b, h]
        gk[:] = 0
        gv[:] = 0
        s = np.empty((block, max(max_width, 1)), q.dtype)
        dp = np.empty((block, max(max_width, 1)), q.dtype)
        lse2 = np.empty(n_q, q.dtype)
        drow = np.empty(n_q, q.dtype)
        _head_rows(o, do, lse, b, h, lse2, drow)
        for qb in range(g * n_blocks // groups, (g + 1) * n_blocks // groups):
            i0 = qb * block
            _band_backward_block(q, k, v, do, left, right, dq, gk, gv, consts, s, dp, lse2, drow,
                                 b, h, i0, min(n_q, i0 + block))


def _key_groups(heads, threads, blocks):
    """Work items per head: 1 when the heads spread evenly over the threads (or are many), else
    enough ranges of query blocks that the item count is a multiple of the thread count."""
    if threads <= 1 or heads % threads == 0 or heads >= 4 * threads:
        return 1
    return max(1, min(blocks, threads // math.gcd(heads, threads)))


def restricted_attention_backward(q, k, v, out, lse, dout, window: int, causal: bool = False):
    """(dq, dk, dv) of ``restricted_attention`` at O(window * N * D) cost (lse from
    ``restricted_attention_train``)."""
    q, k, v, out, dout = (np.ascontiguousarray(a) for a in (q, k, v, out, dout))
    dt = q.dtype
    lse = np.ascontiguousarray(lse, dt)
    left, right = window_bounds(int(window), bool(causal))
    block = query_block(int(window))
    dq, dk, dv = np.empty_like(q), np.empty(k.shape, dt), np.empty(v.shape, dt)
    b, h, n_q = q.shape[:3]
    if min(q.size, k.size, v.size) == 0:
        for g in (dq, dk, dv):
            g[:] = 0
        return dq, dk, dv
    groups = _key_groups(b * h, numba.get_num_threads(), -(-n_q // block))
    shape = (groups,) if groups > 1 else (1,)
    dk_part = np.empty(shape + (k.shape if groups > 1 else (1, 1, 1, 1)), dt)
    dv_part = np.empty(shape + (v.shape if groups > 1 else (1, 1, 1, 1)), dt)
    with single_threaded_blas():
        _band_backward(q, k, v, out, dout, lse, left, right, block, dq, dk, dv, dk_part, dv_part,
                       groups)
    if groups > 1:
        np.sum(dk_part, axis=0, out=dk)
        np.sum(dv_part, axis=0, out=dv)
    return dq, dk, dv
