"""Scaled dot-product attention on the CPU (paper eq. 1), head split/merge.

softmax(Q K^T / sqrt(d_k)) V on (B, H, N, D) operands, float32 and float64, with an optional
boolean mask (True = may attend, broadcast with zero strides, never materialised) and
top-left-aligned causal masking. Query rows with no visible key return zeros.

Variants (``VARIANTS``), on this project's machine (2-core AMD EPYC VM, Zen 3, AVX2; one
OpenBLAS thread peaks at 86-90 GFLOP/s on large sgemm, two at ~165), float32, B=1, H=8, d=64,
2 Numba threads + 1 BLAS thread vs torch.set_num_threads(2), side by side in one process
against ``torch.nn.functional.scaled_dot_product_attention``, as tfm time / SDPA time:

    naive  full (Nq, Nk) scores per (b, h), two BLAS gemms: the reference point; at n=4096 the
           64 MiB score matrix per head leaves the caches, and causal computes, then masks.
    fused  512-query x 1024-key tiles, online softmax in log2 units; n=32768 runs in O(n d)
           memory. Paired tfm/SDPA time per round, median (bootstrap 95% CI), order
           alternating: n=1024 full 1.008 (0.986-1.031), causal 0.844 (0.815-0.873), 61
           rounds each; n=4096 full 0.993 (0.973-1.059), 15 rounds, causal 0.979
           (0.959-1.007), 21 rounds. Level with SDPA without a mask, ahead with one.

Where the time goes (n=4096, full, 2 threads): the same loop with only its two gemms runs at
160 GFLOP/s (~0.92 of the 2-thread sgemm peak); the softmax (row max, exp2, float64 sum)
adds ~15%. SDPA is built the same way (blocked gemm + vectorised exp; 110-135 GFLOP/s
here), so the two meet at the gemm ceiling: beating it by more than the softmax share would
take a faster gemm than OpenBLAS's on K=64 tiles.

How fused got there. On an earlier 2-core AVX-512 VM (n=4096, full): 128x256 tiles with a
scalar row max, 0.45x SDPA's speed; max vectorised (llvm.maxnum) 0.53x; 256x1024 tiles
(fewer, larger gemm calls) 0.85x. A transposed score tile (S^T, column-wise softmax) gave
no end-to-end gain. On this machine:
- the exp of the score rows ran scalar (LLVM did not vectorise a loop that also summed in
  float64); split into an exp loop and a sum loop (``norm.py``), the softmax at n=4096 fell
  from ~62 to ~42-52 ms of ~300, tfm/SDPA from 1.13-1.25 to 0.94-1.13 (noisy);
- 2**x instead of exp(x), with log2(e) folded into the Q K^T gemm's alpha (``norm.
  exp2_shift_sum``): no Cody-Waite reduction, a degree-5 polynomial, 18 vector operations
  per 8 elements where exp took 23; 0.31 vs 0.45 ns/element alone (predicted ~4% of the
  kernel: the exp was ~14% of a 1.02 ms 256x1024 tile step);
- 512-row query tiles (K tile packing amortised over more rows; tile sweep at n=4096:
  512x1024 0.95 of 256x1024's time, 1024x1024 0.95, 512x512 1.07, 256x256 1.02);
- causal: the diagonal block in 128-row chunks, each against keys up to its own last row.
  A whole tile_q x tile_q diagonal block wastes tile_q^2 / 2 masked scores per query tile,
  25% extra work at n=1024 with 256-row tiles; chunks waste 128^2 / 2 per chunk instead.
Together, paired against the previous kernel (256x1024 tiles, exp): 0.94 of its time at
n=1024 full, 0.93 causal; 0.92 at n=4096 full, 0.95 causal.

Heads in place: ``split_heads`` returns strided views of the fused projection (rows d_model
or 3 * d_model apart) and the kernels hand gemm those row strides as leading dimensions
(gemm packs its operands anyway), dropping three split copies per attention block: 0.41 of
the 0.55 ms of head copies per block at the base model's (8, 128, 512), ~1% of a ~750 ms
base forward pass (18 blocks); end to end that is below this VM's noise. Writing the output
head-interleaved as well (so that merge_heads is free) made the fused kernel 2-7% slower
(PV gemm into rows H * Dv apart; interleaved A/B, n = 1024 and 4096): the output stays
contiguous and merge_heads copies.

Threading: ``prange`` over (batch, head, query-tile) work items, each calling a
single-threaded BLAS ``?gemm`` (``_threads.single_threaded_blas``): 2 Numba threads x 1 BLAS
thread. Serial items with 2-thread BLAS and 2 x 2 (oversubscribed) were both many times
slower (``_threads``). The exp2 of the score tile is a vectorised polynomial
(``norm.exp2_shift_sum``; float32), not libm.
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
from .fastmath import maxnum
from .norm import exp2_shift_sum, row_max, softmax_in_place

VARIANTS = {
    "naive": "per (b, h): the full (Nq, Nk) score matrix, then softmax, then P @ V",
    "fused": "FlashAttention on the CPU: query tiles x key tiles, online softmax, O((Nq+Nk)*D)",
}

# Tile sizes of the fused kernel (rows of Q, rows of K/V per step); chosen by measurement.
TILE_Q = 512
TILE_K = 1024
# Causal: rows per chunk of the diagonal block (each chunk computes a DIAG_ROWS-wide
# triangle of masked scores; the whole tile_q x tile_q block would waste tile_q^2 / 2).
DIAG_ROWS = 128
# Below this many FLOPs a call runs on one Numba thread (every decoding step; the small
# preset's B=4, H=4, n=64, d=32 self-attention, 8.4 MFLOP): waking the pool costs more than
# the work (Nk=100 on the busy shared machine: 0.12 ms on one thread, 2.5 ms on two).
SMALL_FLOPS = 32_000_000
_LOG2E = 1.4426950408889634


@njit(cache=True)
def _mask_row(row, n, keep_mask, has_mask, j0, causal_limit):
    """Set row[j] = -inf where key j0 + j is hidden: by ``keep_mask`` (a (Nk,) view) or j > limit."""
    neg = row.dtype.type(-np.inf)
    if has_mask:
        for j in range(n):
            if not keep_mask[j0 + j]:
                row[j] = neg
    for j in range(max(causal_limit - j0 + 1, 0), n):
        row[j] = neg


# ---------------------------------------------------------------------------- kernels
@njit(cache=True, parallel=True)
def _naive_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo):
    """prange over (b, h): S = Q K^T / sqrt(d) (Nq, Nk) in full, masked, softmax, S @ V.

    ``ld*``: row strides (elements) of each (b, h) matrix, which may be strided views.
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    DV = v.shape[3]
    dt = q.dtype.type
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        alpha = np.full(1, dt(1.0 / math.sqrt(D)), q.dtype)
        one = np.ones(1, q.dtype)
        zero = np.zeros(1, q.dtype)
        s = np.empty((NQ, NK), q.dtype)
        # row-major S = Q K^T is column-major S^T = K Q^T
        _gemm(_T, _N, NK, NQ, D, alpha, k[b, h], ldk, q[b, h], ldq, zero, s, NK)
        for i in range(NQ):
            row = s[i]
            _mask_row(row, NK, mask[b, h, i], has_mask, 0, i if causal else NK)
            softmax_in_place(row, NK)  # no visible key: zero weights
        _gemm(_N, _N, DV, NQ, NK, one, v[b, h], ldv, s, NK, zero, out[b, h], ldo)


@njit(cache=True)
def _fused_block(q, k, v, mask, has_mask, causal, o, ldq, ldk, ldv, ldo, scale, s, ld_s,
                 m_run, l_run, b, h, i0, r0, r1, j0, j1):
    """One online-softmax step: query rows i0 + [r0, r1) against keys [j0, j1).

    S = scale * Q K^T into the score tile ``s`` (row stride ``ld_s``), masked; per row the
    running max ``m_run`` and sum ``l_run`` absorb the tile and the row's output ``o`` (the
    query tile's rows, accumulated unnormalised) is rescaled; then o += P V via gemm's beta=1.
    Scores are in log2 units (``scale`` includes log2(e)): 2**x is cheaper than exp(x).
    """
    D = q.shape[3]
    DV = v.shape[3]
    dt = q.dtype.type
    rows = r1 - r0
    tk = j1 - j0
    alpha = np.full(1, scale, q.dtype)
    one = np.ones(1, q.dtype)
    zero = np.zeros(1, q.dtype)
    _gemm(_T, _N, tk, rows, D, alpha, k[b, h, j0:j1], ldk, q[b, h, i0 + r0:i0 + r1], ldq, zero,
          s, ld_s)
    for rr in range(rows):
        row = s[rr]
        r = r0 + rr
        i = i0 + r
        _mask_row(row, tk, mask[b, h, i], has_mask, j0, i if causal else j1)
        m_new = maxnum(row_max(row, tk), m_run[r])
        if m_new == -np.inf:  # nothing visible yet: this tile adds nothing
            row[:tk] = 0
            continue
        l_tile = exp2_shift_sum(row, tk, m_new)
        c = 2.0 ** (m_run[r] - m_new)  # rescale of what came before
        l_run[r] = l_run[r] * c + l_tile
        m_run[r] = m_new
        if c != 1:
            cd = dt(c)
            for d in range(DV):
                o[r, d] *= cd
    _gemm(_N, _N, DV, rows, tk, one, v[b, h, j0:j1], ldv, s, ld_s, one, o[r0:r1], ldo)


@njit(cache=True, parallel=True)
def _fused_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo, tile_q, tile_k):
    """FlashAttention: per work item, query tiles against key tiles with an online softmax.

    Work item = (b, h, pair of query tiles). Under ``causal`` a pair is tiles t and T-1-t, so
    every item has the same work and Numba's static split of the prange is balanced. Causal
    query tile [i0, i1): keys below i0 are visible to all its rows (key tiles, no mask); the
    diagonal block [i0, i1) goes in chunks of ``DIAG_ROWS`` rows, each against keys up to its
    last row, so that only a DIAG_ROWS-wide triangle per chunk is computed and then masked.
    O accumulates in ``out``; extra memory per item is one (tile_q, tile_k) score tile.
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    DV = v.shape[3]
    dt = q.dtype.type
    scale = dt(_LOG2E / math.sqrt(D))
    n_tiles = (NQ + tile_q - 1) // tile_q
    per_head = (n_tiles + 1) // 2 if causal else n_tiles
    # Score tile: a diagonal chunk spans up to tile_q keys; sized to the inputs, so that short
    # sequences (the base model's n = 128) do not allocate and fault in a full tile per item.
    ld_s = max(min(tile_k, NK), min(tile_q, NK) if causal else 1, 1)
    rows_s = max(min(tile_q, NQ), 1)
    for item in prange(B * H * per_head):
        bh = item // per_head
        b = bh // H
        h = bh % H
        first = item % per_head
        s = np.empty((rows_s, ld_s), q.dtype)
        m_run = np.empty(tile_q, q.dtype)
        l_run = np.empty(tile_q, np.float64)
        n_mine = 2 if causal and n_tiles - 1 - first != first else 1
        for which in range(n_mine):
            t = first if which == 0 else n_tiles - 1 - first
            i0 = t * tile_q
            i1 = min(NQ, i0 + tile_q)
            tq = i1 - i0
            o = out[b, h, i0:i1]
            o[:] = 0
            m_run[:] = -np.inf
            l_run[:] = 0
            full_end = min(NK, i0) if causal else NK  # keys every row of the tile may see
            for j0 in range(0, full_end, tile_k):
                _fused_block(q, k, v, mask, has_mask, False, o, ldq, ldk, ldv, ldo, scale, s,
                             ld_s, m_run, l_run, b, h, i0, 0, tq, j0, min(full_end, j0 + tile_k))
            if causal:
                for r0 in range(0, tq, DIAG_ROWS):
                    r1 = min(tq, r0 + DIAG_ROWS)
                    j1 = min(NK, i0 + r1)  # row i0 + r1 - 1 sees keys up to itself
                    if j1 > i0:
                        _fused_block(q, k, v, mask, has_mask, True, o, ldq, ldk, ldv, ldo,
                                     scale, s, ld_s, m_run, l_run, b, h, i0, r0, r1, i0, j1)
            for r in range(tq):
                inv = dt(1.0 / l_run[r]) if l_run[r] > 0 else dt(0.0)
                for d in range(DV):
                    o[r, d] *= inv


# ---------------------------------------------------------------------------- public functions
_NO_MASK = np.ones((1, 1, 1, 1), dtype=np.bool_)


def _gemm_rows(x, dtype):
    """(x, ld): x itself if each (b, h) block is an (N, D) matrix gemm can read in place (unit
    column stride, rows ``ld`` >= D elements apart), else a contiguous copy.

    Keeps the heads of a fused projection (``split_heads`` views, rows d_model or 3 * d_model
    apart) and a KV cache's ``cache[:, :, :n]`` copy-free.
    """
    x = np.asarray(x)
    item = x.dtype.itemsize
    n, d = x.shape[-2], x.shape[-1]
    row = x.strides[-2]
    if x.dtype == dtype and (x.strides[-1] == item or d <= 1):
        if n <= 1:
            return x, max(d, 1)
        if row > 0 and row % item == 0 and row // item >= d:
            return x, row // item
    return np.ascontiguousarray(x, dtype=dtype), max(d, 1)


def attention(q, k, v, mask=None, causal=False, impl="fused"):
    """softmax(Q K^T / sqrt(d_k)) V -> (B, H, Nq, Dv) in q's dtype (see the backend docs)."""
    if impl not in VARIANTS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(VARIANTS)}")
    q, ldq = _gemm_rows(q, q.dtype)
    k, ldk = _gemm_rows(k, q.dtype)
    v, ldv = _gemm_rows(v, q.dtype)
    b, h, nq, _ = q.shape
    nk, dv = k.shape[2], v.shape[3]
    full = (b, h, nq, nk)
    # Zero-stride views: one compiled signature for every mask rank, nothing materialised.
    keep = np.broadcast_to(_NO_MASK if mask is None else np.asarray(mask, dtype=np.bool_), full)
    # Contiguous (B, H, Nq, Dv): written head-interleaved instead (rows H * Dv apart, so that
    # merge_heads is free) the fused kernel ran 2-7% slower; the merge copy costs less.
    out = np.empty((b, h, nq, dv), dtype=q.dtype)
    args = (q, k, v, keep, mask is not None, bool(causal), out, ldq, ldk, ldv, max(dv, 1))
    with single_threaded_blas():  # the backend's one pool is Numba's (_threads)
        if 2 * b * h * nq * nk * (q.shape[3] + v.shape[3]) < SMALL_FLOPS:
            # Decoding- or small-model-sized: waking the Numba workers costs more than the work.
            previous = numba.get_num_threads()
            numba.set_num_threads(1)
            try:
                _run(impl, args)
            finally:
                numba.set_num_threads(previous)
        else:
            _run(impl, args)
    return out


def _run(impl, args):
    if impl == "naive":
        _naive_kernel(*args)
    else:
        _fused_kernel(*args, TILE_Q, TILE_K)


def split_heads(x, n_heads, start=0, width=None):
    """Columns [start, start + width) of (B, N, C) -> (B, H, N, width / H) as a view where
    NumPy can (no copy; ``attention`` reads the strided heads in place). Do not write into it."""
    x = np.asarray(x)
    b, n, c = x.shape
    width = c - start if width is None else width
    cols = x[:, :, start:start + width]
    return cols.reshape(b, n, n_heads, width // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, N, Dh) -> contiguous (B, N, H*Dh)."""
    b, h, n, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b, n, h * d)


def merge_heads_into(x, out, start):
    """In place: out[:, :, start:start + H*Dh] = merge_heads(x) for x (B, H, N, Dh) (the backward
    of ``split_heads(out_fwd, H, start, H*Dh)``: one slice of a fused dQKV)."""
    b, h, n, d = x.shape
    # Splitting the sliced last axis into (H, Dh) is always a view; the check guards that.
    cols = out[:, :, start:start + h * d].reshape(b, n, h, d)
    if not np.may_share_memory(cols, out):
        raise ValueError("merge_heads_into: out's column slice is not a view")
    np.copyto(cols, np.asarray(x).transpose(0, 2, 1, 3))
