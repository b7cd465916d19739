"""Scaled dot-product attention on the CPU (paper eq. 1), head split/merge.

softmax(Q K^T / sqrt(d_k)) V on (B, H, N, D) operands, float32 and float64, with an optional
boolean mask (True = may attend, broadcast with zero strides, never materialised) and
top-left-aligned causal masking. Query rows with no visible key return zeros.

Variants (``VARIANTS``), float32, B=1, H=8, d=64, time / the fused kernel's time unless
named otherwise:

    naive  the full (Nq, Nk) score matrix per (b, h), two BLAS gemms around a row softmax;
           causal computes every score, then masks. n=4096: 1.91 (1.87-1.96), causal 3.82
           (3.76-3.94).
    fused  FlashAttention's online softmax: 512-query x 1024-key tiles, scores in log2 units
           (2**x), the causal diagonal in 128-row chunks; O((Nq + Nk) d) memory (n=32768 in
           tests/test_attention.py). tfm.attention / torch SDPA: n=1024 1.10 (0.83-1.31),
           causal 0.87 (0.72-1.00); n=4096 1.10 (0.89-1.40), causal 0.95 (0.90-0.96): level
           with SDPA without a mask, at or ahead of it with the causal one, within this
           run's noise.

Every figure in this header comes from ``python -m dev.cpu.run_all`` (dev/cpu/attention.py;
the run: dev/cpu/results/attention.csv and machine.json): a 2-core AMD EPYC VM (family 25,
model 17, AVX-512; LLVM compiles for znver4), shared with other jobs (1-minute load 5-9
during the run), 2 Numba threads each calling 1-thread OpenBLAS against
torch.set_num_threads(2). Each is a paired ratio: the variant's time over the baseline's in
the same interleaved round, median over rounds (7-20 here) with a bootstrap 95% interval.
Absolute times on this VM move with its load; only such ratios are quoted.

How fused got here. The lab keeps the versions in one parametrised kernel with this loop
structure; v6 has this kernel's settings (1.02 (0.97-1.02) of its time at n=4096: the frame
costs nothing measurable). Time / this kernel's at n=4096, full and causal:
    v1  128 x 256 tiles, scalar row max, exp and its float64 sum in one loop
                                                          1.30 (1.28-1.34), 1.22 (1.18-1.27)
    v2  v1 with the row max as llvm.maxnum (vectorised)   1.16 (1.14-1.19), 1.13 (1.09-1.42)
    v3  256 x 1024 tiles (fewer, larger gemms)            1.09 (1.08-1.10), 1.16 (1.09-1.49)
    v4  the exp loop apart from the sum loop              1.06 (1.05-1.08), 1.08 (1.06-1.28)
    v5  scores in log2 units (log2(e) folded into the Q K^T gemm's alpha), 2**x
                                                          1.06 (1.05-1.07), 1.15 (1.07-1.22)
    v6  512-row query tiles, the causal diagonal in 128-row chunks (a 128-wide masked
        triangle per chunk; a whole tile_q block computes tile_q^2 / 2 masked scores)
                                                          1.02 (0.97-1.02), 0.97 (0.86-1.01)
Tile sizes (this kernel, n=4096, full; time / 512 x 1024's): 256 x 256 1.05 (1.05-1.13),
256 x 1024 1.06 (1.05-1.18), 512 x 512 0.96 (0.85-0.98), 1024 x 1024 0.99 (0.97-1.02):
512 x 512 is worth a look when the tiles are next tuned.

Where the time goes (n=4096, full): this kernel takes 1.14 (1.11-1.21) of the time of the
same loop with only its two gemms (the lab's v6 with the softmax switched off): the softmax
adds ~14% to OpenBLAS's gemms. SDPA is built the same way (blocked gemm + vectorised exp),
so the two meet near the gemm ceiling.

Heads in place: ``split_heads`` returns strided views of the fused projection (rows d_model
or 3 * d_model apart) and the kernels hand gemm those row strides as leading dimensions (gemm
packs its operands anyway), so splitting heads copies nothing. The output stays contiguous
and merge_heads copies: a head-interleaved output (merge_heads free) was tried and kept out
in 4583482 (the lab does not repeat that measurement).

Threading: ``prange`` over (batch, head, query-tile) work items, each calling a
single-threaded BLAS ``?gemm`` (``_threads.single_threaded_blas``): 2 Numba threads x 1 BLAS
thread. At n=1024 one Numba thread calling 2-thread BLAS took 8.4 (7.8-8.8) times as long,
2 x 2 (oversubscribed) 11.2 (10.5-12.2). The exp2 of the score tile is a vectorised
polynomial (``fastmath.exp2_le0`` through ``norm.exp2_shift_sum``), not libm.

Backward (``attention_backward``). ``attention_train`` is the forward that also writes each
query's log-sum-exp (the fused kernel from its running max and sum, the naive one from its
row softmax); time / ``attention``'s: n=1024 1.02 (0.93-1.05), causal 0.98 (0.97-1.01);
n=4096 1.00 (0.99-1.04), causal 1.01 (0.96-1.03). Both backward variants run one block
step (``_backward_block``): S recomputed by a gemm in log2 units, P = 2**(S - lse log2 e)
(0 where masked and in rows that see no key), then dV += P^T dO, dP = dO V^T, dS = P (dP - D)
in place (D = rowsum(dO * O), once per head), dQ += dS K / sqrt(d_k), dK += dS^T Q / sqrt(d_k):
five gemms against the forward's two (2.5x its FLOPs). Time / the fused backward's:

    naive  one block per (b, h): S and dP as two full (Nq, Nk) matrices per thread; causal
           computes every score, then masks. n=1024 2.18 (1.08-2.75), causal 2.41
           (1.42-3.22); n=2048 1.62 (1.55-1.69), causal 3.19 (2.62-3.83). Memory growth of
           one call at n = 512, 1024, 2048, 4096: 5.0, 15.7, 77, 280 MiB (O(n^2)).
    fused  FlashAttention-2's backward (Dao 2023, Algorithm 2): per (b, h), key blocks of
           ``BWD_TILE_K`` = 512 (dK, dV accumulate in place over the block's query steps of
           ``BWD_TILE_Q`` = 256 rows; dQ over the key blocks), causal blocks above the
           diagonal skipped and the diagonal in ``BWD_DIAG_ROWS`` = 64-row chunks. Memory
           growth 5.4, 7.9, 13.9, 25.5 MiB, of which 3, 6, 12, 24 MiB are the gradients:
           two (256, 512) tiles and two Nq-vectors per thread beyond them (O(n)).
           tfm / autograd through torch SDPA (PyTorch's CPU flash-attention backward):
           n=1024 0.92 (0.89-1.04), causal 0.68 (0.66-0.69); n=4096 0.85 (0.81-0.92),
           causal 0.84 (0.75-0.95).

Work items are (b, h): with B*H = 8 on 2 threads each thread takes 4 heads. When the heads
would leave threads idle (B*H not a multiple of the threads and under 4x their number), each
head's key blocks are split into groups with their own dQ partial (``_key_groups``).
Where the backward's time goes (the lab's copy of its loop with one half of each block step
switched off, timed in the same rounds as 512^3 sgemms of the same FLOPs on the same
threading, each Numba thread calling 1-thread OpenBLAS): the five gemms alone run at 0.85-0.91
of the square sgemms' speed (n=1024 full, n=4096 full and causal); the elementwise work
(2**x of the scores, dS) alone takes 3.5-4.2% of the gemms' time; the kernel 1.00-1.06 of the
gemms-only loop's (n=4096: 1.00 (0.90-1.03)): 0.80-0.91 of the square sgemm's GFLOP/s. At the
block shape on one thread, each product's time per FLOP / a 512^3 sgemm's: S 0.92, dV 1.03,
dP 0.87, dQ 0.94, dK 1.32 (0.95-1.81), every interval spanning 1: no one product stands out
in this run. Tiles (time / 256 x 512's): 128 x 512, 256 x 256, 256 x 1024, 512 x 512 within
0.91-1.07 with intervals spanning 1; 512 x 1024 1.15 (1.13-1.20) at n=4096 (1.09 causal).
Diagonal chunks at n=4096 causal: 128 rows 0.985 (0.954-1.019), 32 rows 0.955 (0.939-1.005).
Figures from ``python -m dev.cpu.attention_backward`` (dev/cpu/results/attention_backward.csv,
attention_backward_memory.csv): same machine, 1-minute load 6-17 during the run, so absolute
GFLOP/s (and the NumPy sgemm ceiling measured once at the start) mean little; ratios only.
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
from .fastmath import REDUCE as _REDUCE
from .fastmath import maxnum
from .norm import exp2_shift, exp2_shift_sum, exp_shift_sum, row_max

VARIANTS = {
    "naive": "per (b, h): the full (Nq, Nk) score matrix, then softmax, then P @ V; its "
             "backward materialises S and dP as (Nq, Nk) matrices too",
    "fused": "FlashAttention on the CPU: query tiles x key tiles, online softmax, O((Nq+Nk)*D); "
             "its backward is FlashAttention-2's (key blocks x query steps, P from lse)",
}

# Tile sizes of the fused kernel (rows of Q, rows of K/V per step); the lab's tile sweep
# (header) finds its neighbours no faster.
TILE_Q = 512
TILE_K = 1024
# Causal: rows per chunk of the diagonal block (each chunk computes a DIAG_ROWS-wide
# triangle of masked scores; the whole tile_q x tile_q block would waste tile_q^2 / 2).
DIAG_ROWS = 128
# Below this many FLOPs a call runs on one Numba thread (every decoding step; the small
# preset's B=4, H=4, n=64, d=32 self-attention, 8.4 MFLOP): waking the pool costs more than
# the work (one query x 100 keys: 1.47 (1.47-1.47) times as long on two threads as on one;
# dev/cpu/attention.py, threads).
SMALL_FLOPS = 32_000_000
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


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
@njit(cache=True)
def _softmax_lse(row, n):
    """row[:n] = softmax(row[:n]) in place (``softmax_in_place``'s arithmetic); returns the
    row's log-sum-exp, -inf (and zeros) for a row with nothing visible."""
    m = row_max(row, n)
    if m == -np.inf:
        row[:n] = 0
        return -np.inf
    total = exp_shift_sum(row, n, m)
    inv = row.dtype.type(1.0 / total)
    for j in range(n):
        row[j] *= inv
    return m + math.log(total)


@njit(cache=True)
def _naive_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo):
    """``_naive_lse_kernel`` without the log-sum-exp."""
    _naive_lse_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo,
                      np.empty((1, 1, 1), q.dtype), False)


@njit(cache=True, parallel=True)
def _naive_lse_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo, lse, save_lse):
    """prange over (b, h): S = Q K^T / sqrt(d) (Nq, Nk) in full, masked, softmax, S @ V; with
    ``save_lse`` each row's log-sum-exp goes to lse[b, h, i] (for the backward).

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
            row_lse = _softmax_lse(row, NK)  # no visible key: zero weights
            if save_lse:
                lse[b, h, i] = row_lse
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


@njit(cache=True)
def _fused_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo, tile_q, tile_k):
    """``_fused_lse_kernel`` without the log-sum-exp."""
    _fused_lse_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo, tile_q, tile_k,
                      np.empty((1, 1, 1), q.dtype), False)


@njit(cache=True, parallel=True)
def _fused_lse_kernel(q, k, v, mask, has_mask, causal, out, ldq, ldk, ldv, ldo, tile_q, tile_k,
                      lse, save_lse):
    """FlashAttention: per work item, query tiles against key tiles with an online softmax.

    Work item = (b, h, pair of query tiles). Under ``causal`` a pair is tiles t and T-1-t, so
    every item has the same work and Numba's static split of the prange is balanced. Causal
    query tile [i0, i1): keys below i0 are visible to all its rows (key tiles, no mask); the
    diagonal block [i0, i1) goes in chunks of ``DIAG_ROWS`` rows, each against keys up to its
    last row, so that only a DIAG_ROWS-wide triangle per chunk is computed and then masked.
    O accumulates in ``out``; extra memory per item is one (tile_q, tile_k) score tile. With
    ``save_lse`` each row's log-sum-exp, (m + log2 l) ln 2 from the running max and sum in
    log2 units, goes to lse[b, h, i] (-inf for a row with no visible key).
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
                if save_lse:
                    lse[b, h, i0 + r] = ((m_run[r] + math.log2(l_run[r])) * _LN2
                                         if l_run[r] > 0 else -np.inf)


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
    return _attention(q, k, v, mask, causal, impl, False)[0]


def attention_train(q, k, v, mask=None, causal=False, impl="fused"):
    """(attention(...), lse (B, H, Nq)): each query's log-sum-exp of its scaled scores over its
    visible keys (-inf where it sees none), in q's dtype; the same kernels, writing lse too."""
    return _attention(q, k, v, mask, causal, impl, True)


def _check_impl(impl):
    if impl not in VARIANTS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(VARIANTS)}")


def _attention(q, k, v, mask, causal, impl, save_lse):
    _check_impl(impl)
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
    lse = np.empty((b, h, nq) if save_lse else (1, 1, 1), dtype=q.dtype)
    args = (q, k, v, keep, mask is not None, bool(causal), out, ldq, ldk, ldv, max(dv, 1))
    with single_threaded_blas():  # the backend's one pool is Numba's (_threads)
        with _threads_for(2 * b * h * nq * nk * (q.shape[3] + v.shape[3])):
            if impl == "naive":
                _naive_lse_kernel(*args, lse, save_lse)
            else:
                _fused_lse_kernel(*args, TILE_Q, TILE_K, lse, save_lse)
    return out, (lse if save_lse else None)


class _threads_for:  # noqa: N801  (used like a function)
    """Context manager: one Numba thread for work under ``SMALL_FLOPS`` (decoding- or
    small-model-sized: waking the Numba workers costs more than the work), else all."""

    __slots__ = ("_flops", "_previous")

    def __init__(self, flops):
        self._flops = flops
        self._previous = None

    def __enter__(self):
        if self._flops < SMALL_FLOPS:
            self._previous = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            numba.set_num_threads(self._previous)
        return False


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


# ---------------------------------------------------------------------------- backward
# O = P V, P = softmax(S), S = Q K^T / sqrt(d_k). Given dO and the forward's lse (FlashAttention-2,
# Dao 2023, Algorithm 2):
#   P = exp(S - lse), dV = P^T dO, dP = dO V^T, D = rowsum(dO * O), dS = P * (dP - D),
#   dQ = dS K / sqrt(d_k), dK = dS^T Q / sqrt(d_k)
# Five gemms against the forward's two (2.5x its FLOPs). Both variants run the same block step
# (``_backward_block``); "naive" makes one block of each (b, h), (Nq, Nk) scores and dP in
# full; "fused" walks key blocks (dK, dV accumulate over every query step of the block) and
# query steps (dQ accumulates over the key blocks), with two (tile_q, tile_k) tiles per thread.

# Keys per block and query rows per step of the fused backward (dev/cpu/attention_backward.py).
BWD_TILE_Q = 256
BWD_TILE_K = 512
BWD_DIAG_ROWS = 64  # causal: query rows per chunk of a key block's diagonal


@njit(cache=True, fastmath=_REDUCE)
def _ds_rows(s, dp, drow, i0, rows, tk):
    """dp[r, :tk] = s[r, :tk] * (dp[r, :tk] - drow[i0 + r]): dS = P (dP - D), in place in dp."""
    for r in range(rows):
        p_row = s[r]
        g_row = dp[r]
        d = drow[i0 + r]
        for j in range(tk):
            g_row[j] = p_row[j] * (g_row[j] - d)


@njit(cache=True)
def _backward_block(q, k, v, do, mask, has_mask, causal, gq, gk, gv, lds, consts, s, dp, ld_s,
                    lse2, drow, b, h, i0, i1, j0, j1):
    """One step: query rows [i0, i1) against keys [j0, j1) of head (b, h).

    P is recomputed in the score tile ``s`` from the scores in log2 units (``consts[0]`` =
    log2(e) / sqrt(d_k) folded into the gemm, as the forward) and lse2 = lse log2(e); masked
    scores and rows with no visible key (lse = -inf) give P = 0. Then gv[j0:j1] += P^T dO_i,
    dP = dO_i V_j^T into ``dp``, dS = P (dP - D) in place, gq[i0:i1] += dS K_j / sqrt(d_k),
    gk[j0:j1] += dS^T Q_i / sqrt(d_k). gq, gk, gv: this head's (N, D) gradients (row strides
    ``lds[4]``, D, Dv). ``consts``: [log2(e) / sqrt(d_k), 1, 0, 1 / sqrt(d_k)] (gemm's scalars).
    """
    ldq, ldk, ldv, ldo, ldgq = lds
    D = q.shape[3]
    DV = v.shape[3]
    rows = i1 - i0
    tk = j1 - j0
    # row-major S (rows, tk) is column-major S^T = K_j Q_i^T (as the forward)
    _gemm(_T, _N, tk, rows, D, consts[0:], k[b, h, j0:], ldk, q[b, h, i0:], ldq, consts[2:], s,
          ld_s)
    for r in range(rows):
        row = s[r]
        i = i0 + r
        m = lse2[i]
        if m == -np.inf:  # no visible key anywhere: P = 0, so dS = 0 and nothing flows
            row[:tk] = 0
            continue
        _mask_row(row, tk, mask[b, h, i], has_mask, j0, i if causal else j1)
        exp2_shift(row, tk, m)  # masked: 2**-inf = 0
    # dV_j += P^T dO_i: column-major dV_j^T (Dv, tk) += dO_i^T (Dv, rows) @ P (rows, tk)
    _gemm(_N, _T, DV, tk, rows, consts[1:], do[b, h, i0:], ldo, s, ld_s, consts[1:], gv[j0:], DV)
    # dP = dO_i V_j^T: column-major dP^T (tk, rows) = V_j (tk, Dv) @ dO_i^T (Dv, rows)
    _gemm(_T, _N, tk, rows, DV, consts[1:], v[b, h, j0:], ldv, do[b, h, i0:], ldo, consts[2:], dp,
          ld_s)
    _ds_rows(s, dp, drow, i0, rows, tk)
    # dQ_i += dS K_j / sqrt(d): column-major dQ_i^T (D, rows) += K_j^T (D, tk) @ dS^T (tk, rows)
    _gemm(_N, _N, D, rows, tk, consts[3:], k[b, h, j0:], ldk, dp, ld_s, consts[1:], gq[i0:], ldgq)
    # dK_j += dS^T Q_i / sqrt(d): column-major dK_j^T (D, tk) += Q_i^T (D, rows) @ dS (rows, tk)
    _gemm(_N, _T, D, tk, rows, consts[3:], q[b, h, i0:], ldq, dp, ld_s, consts[1:], gk[j0:], D)


@njit(cache=True)
def _head_rows(o, do, lse, b, h, lse2, drow):
    """Per query row of head (b, h): lse2 = lse log2(e), drow = D = rowsum(dO * O) (float64 sum)."""
    for i in range(o.shape[2]):
        lse2[i] = lse[b, h, i] * _LOG2E
        acc = 0.0
        for d in range(o.shape[3]):
            acc += do[b, h, i, d] * o[b, h, i, d]
        drow[i] = acc


@njit(cache=True, parallel=True)
def _naive_backward_kernel(q, k, v, o, do, lse, mask, has_mask, causal, dq, dk, dv, lds):
    """prange over (b, h): one block of all Nq rows against all Nk keys, S and dP in full
    (two (Nq, Nk) matrices per thread); causal computes everything, then masks."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    consts = np.array([_LOG2E / math.sqrt(D), 1.0, 0.0, 1.0 / math.sqrt(D)], q.dtype)
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        s = np.empty((NQ, NK), q.dtype)
        dp = np.empty((NQ, NK), q.dtype)
        lse2 = np.empty(NQ, q.dtype)
        drow = np.empty(NQ, q.dtype)
        _head_rows(o, do, lse, b, h, lse2, drow)
        gq, gk, gv = dq[b, h], dk[b, h], dv[b, h]
        gq[:] = 0
        gk[:] = 0
        gv[:] = 0
        _backward_block(q, k, v, do, mask, has_mask, causal, gq, gk, gv, lds, consts, s, dp, NK,
                        lse2, drow, b, h, 0, NQ, 0, NK)


@njit(cache=True, parallel=True)
def _fused_backward_kernel(q, k, v, o, do, lse, mask, has_mask, causal, dq, dk, dv, dq_part, lds,
                           tile_q, tile_k, diag_rows, groups):
    """FlashAttention-2's backward: work item = (b, h, group g of key blocks g, g + groups, ...).

    Per key block [j0, j1): dK_j, dV_j start at zero in the outputs and accumulate over the
    query steps; each step adds its dQ rows to this item's dQ (the output itself when
    ``groups`` is 1, else the item's partial ``dq_part[g]``, summed afterwards). Causal: rows
    below j0 see none of the block's keys (skipped); its diagonal rows go in ``diag_rows``
    chunks against keys up to their own last row (as the forward); rows from j1 on see the
    whole block, unmasked. Extra memory per item: two (tile_q, tile_k) tiles and 2 Nq scalars.
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    n_kb = (NK + tile_k - 1) // tile_k
    ld_s = max(min(tile_k, NK), 1)
    rows_s = max(min(max(tile_q, diag_rows), NQ), 1)
    consts = np.array([_LOG2E / math.sqrt(D), 1.0, 0.0, 1.0 / math.sqrt(D)], q.dtype)
    for item in prange(B * H * groups):
        bh = item // groups
        g = item % groups
        b = bh // H
        h = bh % H
        s = np.empty((rows_s, ld_s), q.dtype)
        dp = np.empty((rows_s, ld_s), q.dtype)
        lse2 = np.empty(NQ, q.dtype)
        drow = np.empty(NQ, q.dtype)
        _head_rows(o, do, lse, b, h, lse2, drow)
        gq = dq[b, h] if groups == 1 else dq_part[g, b, h]
        gk, gv = dk[b, h], dv[b, h]
        gq[:] = 0
        for jb in range(g, n_kb, groups):
            j0 = jb * tile_k
            j1 = min(NK, j0 + tile_k)
            gk[j0:j1] = 0
            gv[j0:j1] = 0
            first_full = 0
            if causal:
                for a in range(j0, min(j1, NQ), diag_rows):
                    e = min(a + diag_rows, j1, NQ)  # rows [a, e) see keys up to e - 1 at most
                    _backward_block(q, k, v, do, mask, has_mask, True, gq, gk, gv, lds, consts, s,
                                    dp, ld_s, lse2, drow, b, h, a, e, j0, e)
                first_full = j1
            for i0 in range(first_full, NQ, tile_q):
                _backward_block(q, k, v, do, mask, has_mask, False, gq, gk, gv, lds, consts, s, dp,
                                ld_s, lse2, drow, b, h, i0, min(NQ, i0 + tile_q), j0, j1)


def attention_backward(q, k, v, out, lse, dout, mask=None, causal=False, impl="fused"):
    """(dq, dk, dv) of ``attention`` from its inputs, output, lse (``attention_train``) and dout.

    "fused" never materialises (Nq, Nk): O((Nq + Nk) D) extra memory; "naive" does. Inputs
    may be strided head views (``split_heads``), as the forward reads them.
    """
    _check_impl(impl)
    dtype = np.asarray(q).dtype
    q, ldq = _gemm_rows(q, dtype)
    k, ldk = _gemm_rows(k, dtype)
    v, ldv = _gemm_rows(v, dtype)
    dout, ldo = _gemm_rows(dout, dtype)
    out = np.asarray(out, dtype)
    lse = np.asarray(lse, dtype)
    b, h, nq, d = q.shape
    nk, dv_ = k.shape[2], v.shape[3]
    dq = np.empty((b, h, nq, d), dtype)
    dk = np.empty((b, h, nk, d), dtype)
    dv = np.empty((b, h, nk, dv_), dtype)
    if min(nq, nk, d, dv_) == 0 or b * h == 0:  # an empty sum: zero gradients, no BLAS call
        for g in (dq, dk, dv):
            g[:] = 0
        return dq, dk, dv
    keep = np.broadcast_to(_NO_MASK if mask is None else np.asarray(mask, dtype=np.bool_),
                           (b, h, nq, nk))
    flops = 5 * b * h * nq * nk * (d + dv_)  # 2.5x the forward's
    with single_threaded_blas(), _threads_for(flops):
        common = (q, k, v, out, dout, lse, keep, mask is not None, bool(causal), dq, dk, dv)
        lds = (ldq, ldk, ldv, ldo, d)
        if impl == "naive":
            _naive_backward_kernel(*common, lds)
        else:
            groups = _key_groups(b * h, numba.get_num_threads(), -(-nk // BWD_TILE_K))
            dq_part = np.empty((groups, b, h, nq, d) if groups > 1 else (1, 1, 1, 1, 1), dtype)
            _fused_backward_kernel(*common, dq_part, lds, BWD_TILE_Q, BWD_TILE_K, BWD_DIAG_ROWS,
                                   groups)
            if groups > 1:
                np.sum(dq_part, axis=0, out=dq)
    return dq, dk, dv


def _key_groups(heads, threads, key_blocks):
    """Work items per head of the fused backward: 1 when the heads alone spread evenly over the
    threads (or are many), else enough groups of key blocks per head that the item count is a
    multiple of the thread count (each group then sums its own dQ)."""
    if threads <= 1 or heads % threads == 0 or heads >= 4 * threads:
        return 1
    return max(1, min(key_blocks, threads // math.gcd(heads, threads)))
