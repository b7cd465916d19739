"""Row-wise kernels on the GPU: layer norm (+ residual), (masked) softmax, log-softmax, argmax.

One block per row, ``Tuning.row_threads`` threads striding over the row (coalesced), and a
shared-memory tree reduction for each statistic. The reductions deliberately use shared
memory rather than warp shuffles: the same code runs under the simulator (which has no
warp-level operations), and these kernels are bandwidth-bound (a row of d_model = 512
floats is read twice from L1/L2 and written once), so the shuffle's saving would not show.
Layer norm is two-pass (mean, then centred variance) for accuracy, as the reference.
The softmax kernel also serves the naive attention, with rows that have no visible entry
written as zeros; which keys are visible is decided by ``visibility``, the one device
function the fused attention uses too (broadcast boolean mask through per-axis 0/1 index
factors, never materialised; a key band, causal being the band [-inf, i]).

Variants: one each. Verdict: correct under the simulator and on the first GPU run; not timed
on their own (they run inside ``python3 -m dev.cuda.lab --family forward``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from ._launch import launch, numba_dtype
from ._views import c_view

VARIANTS = {"rowblock": "one block per row, shared-memory tree reductions"}


def _make_reducers(nt: int):
    """Block-wide sum/max/argmax over a shared array of ``nt`` (a power of two) entries."""

    @cuda.jit(device=True)
    def block_sum(sm, t):
        cuda.syncthreads()
        step = nt // 2
        while step > 0:
            if t < step:
                sm[t] += sm[t + step]
            cuda.syncthreads()
            step //= 2
        total = sm[0]
        cuda.syncthreads()  # sm may be reused right after
        return total

    @cuda.jit(device=True)
    def block_max(sm, t):
        cuda.syncthreads()
        step = nt // 2
        while step > 0:
            if t < step and sm[t + step] > sm[t]:
                sm[t] = sm[t + step]
            cuda.syncthreads()
            step //= 2
        best = sm[0]
        cuda.syncthreads()
        return best

    @cuda.jit(device=True)
    def block_argmax(vals, idxs, t):
        """(value, index) pairs; the smallest index wins ties (NumPy's first occurrence)."""
        cuda.syncthreads()
        step = nt // 2
        while step > 0:
            if t < step:
                v, w = vals[t + step], idxs[t + step]
                if w >= 0 and (idxs[t] < 0 or v > vals[t] or (v == vals[t] and w < idxs[t])):
                    vals[t] = v
                    idxs[t] = w
            cuda.syncthreads()
            step //= 2
        best = idxs[0]
        cuda.syncthreads()
        return best

    return block_sum, block_max, block_argmax


@lru_cache(maxsize=None)
def _layer_norm_kernel(dtype, nt: int, has_res: bool):
    dt = numba_dtype(dtype)
    block_sum = _make_reducers(nt)[0]

    @cuda.jit(cache=True)
    def layer_norm(x, res, gamma, beta, eps, out):
        sm = cuda.shared.array(nt, dt)
        row = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = x.shape[1]
        s = dt(0.0)
        for c in range(t, d, nt):
            v = x[row, c]
            if has_res:
                v += res[row, c]
            s += v
        sm[t] = s
        mean = block_sum(sm, t) / dt(d)
        s = dt(0.0)
        for c in range(t, d, nt):
            v = x[row, c]
            if has_res:
                v += res[row, c]
            s += (v - mean) * (v - mean)
        sm[t] = s
        inv = dt(1.0) / math.sqrt(block_sum(sm, t) / dt(d) + eps)
        for c in range(t, d, nt):
            v = x[row, c]
            if has_res:
                v += res[row, c]
            out[row, c] = gamma[c] * ((v - mean) * inv) + beta[c]

    return layer_norm


def _threads(tuning, d: int) -> int:
    """Power of two <= tuning.row_threads, not much larger than the row."""
    nt = 1
    while nt < d and nt < tuning.row_threads:
        nt *= 2
    return nt


def layer_norm(x, gamma, beta, eps, residual, tuning):
    d = tuple(x.shape)[-1]
    rows = x.size // d
    out = cuda.device_array(tuple(x.shape), dtype=x.dtype)
    nt = _threads(tuning, d)
    x2 = c_view(x, (rows, d))
    kern = _layer_norm_kernel(np.dtype(x.dtype), nt, residual is not None)
    launch("layer_norm", kern, rows, nt, x2, x2 if residual is None else c_view(residual, (rows, d)),
           gamma, beta, np.dtype(x.dtype).type(eps), c_view(out, (rows, d)))
    return out


@lru_cache(maxsize=None)
def visibility(masked: bool, band: bool):
    """Device function ``visible(mask, b, h, i, j, fb, fh, fi, fj, wl, wr)``: may query i of
    head (b, h) attend to key j? The one definition of the mask test for the naive softmax and
    the fused attention: an optional broadcast boolean mask, read through per-axis 0/1 index
    factors (never materialised to (B, H, Nq, Nk)), and an optional key band [i - wl, i + wr]
    (causal: wl unbounded, wr = 0). Compiled out entirely when neither is on."""

    @cuda.jit(device=True, inline=True)
    def visible(mask, b, h, i, j, fb, fh, fi, fj, wl, wr):
        ok = True
        if band:
            ok = j >= i - wl and j <= i + wr
        if masked:
            ok = ok and mask[b * fb, h * fh, i * fi, j * fj]
        return ok

    return visible


# Causal attention as a band: a left window wider than any sequence, no right window.
UNBOUNDED = 2**62


@lru_cache(maxsize=None)
def softmax_kernel(dtype, nt: int, log: bool, masked: bool, causal: bool):
    """Row softmax of x (R, L) into out (may alias x).

    For attention scores, row r is (b*H + h)*Nq + i; ``mask`` is 4-D with per-axis index
    factors (1 = indexed, 0 = broadcast); ``causal`` hides columns j > i.
    """
    dt = numba_dtype(dtype)
    block_sum, block_max, _ = _make_reducers(nt)
    visible = visibility(masked, causal)
    wl = UNBOUNDED

    @cuda.jit(cache=True)
    def softmax(x, out, mask, fb, fh, fi, fj, n_heads, nq):
        sm = cuda.shared.array(nt, dt)
        row = cuda.blockIdx.x
        t = cuda.threadIdx.x
        ncol = x.shape[1]
        i = row % nq
        bh = row // nq
        b = bh // n_heads
        h = bh % n_heads
        ninf = dt(-math.inf)
        mx = ninf
        for c in range(t, ncol, nt):
            if visible(mask, b, h, i, c, fb, fh, fi, fj, wl, 0) and x[row, c] > mx:
                mx = x[row, c]
        sm[t] = mx
        mx = block_max(sm, t)
        s = dt(0.0)
        if mx > ninf:
            for c in range(t, ncol, nt):
                if visible(mask, b, h, i, c, fb, fh, fi, fj, wl, 0):
                    s += math.exp(x[row, c] - mx)
        sm[t] = s
        s = block_sum(sm, t)
        inv = dt(1.0) / s if s > dt(0.0) else dt(0.0)
        lse = mx + math.log(s) if s > dt(0.0) else dt(0.0)
        for c in range(t, ncol, nt):
            ok = visible(mask, b, h, i, c, fb, fh, fi, fj, wl, 0)
            if log:
                out[row, c] = x[row, c] - lse if ok else ninf
            else:
                out[row, c] = math.exp(x[row, c] - mx) * inv if ok else dt(0.0)

    return softmax


def run_softmax(x2, out2, tuning, *, log=False, mask4=None, factors=(0, 0, 0, 0),
                n_heads=1, nq=1, causal=False):
    """Launch :func:`softmax_kernel` over the rows of the 2-D ``x2`` into ``out2``."""
    nt = _threads(tuning, x2.shape[1])
    kern = softmax_kernel(np.dtype(x2.dtype), nt, bool(log), mask4 is not None, bool(causal))
    mask_arg = mask4 if mask4 is not None else no_mask()
    launch("log_softmax" if log else "softmax", kern, x2.shape[0], nt, x2, out2, mask_arg,
           *factors, n_heads, nq)


@lru_cache(maxsize=None)
def no_mask():
    return cuda.to_device(np.ones((1, 1, 1, 1), dtype=np.bool_))


def _rowwise(x, tuning, log):
    d = tuple(x.shape)[-1]
    rows = x.size // d
    out = cuda.device_array(tuple(x.shape), dtype=x.dtype)
    run_softmax(c_view(x, (rows, d)), c_view(out, (rows, d)), tuning, log=log)
    return out


def softmax(x, tuning):
    return _rowwise(x, tuning, False)


def log_softmax(x, tuning):
    return _rowwise(x, tuning, True)


@lru_cache(maxsize=None)
def _argmax_kernel(dtype, nt: int):
    dt = numba_dtype(dtype)
    block_argmax = _make_reducers(nt)[2]

    @cuda.jit(cache=True)
    def argmax(x, out):
        vals = cuda.shared.array(nt, dt)
        idxs = cuda.shared.array(nt, np.int64)
        row = cuda.blockIdx.x
        t = cuda.threadIdx.x
        best = dt(0.0)
        where = -1
        for c in range(t, x.shape[1], nt):
            if where < 0 or x[row, c] > best:
                best = x[row, c]
                where = c
        vals[t] = best
        idxs[t] = where
        where = block_argmax(vals, idxs, t)
        if t == 0:
            out[row] = where

    return argmax


def argmax(x, tuning) -> np.ndarray:
    d = tuple(x.shape)[-1]
    rows = x.size // d
    out = cuda.device_array(rows, dtype=np.int64)
    nt = _threads(tuning, d)
    launch("argmax", _argmax_kernel(np.dtype(x.dtype), nt), rows, nt, x.reshape(rows, d), out)
    return out.copy_to_host().reshape(tuple(x.shape)[:-1])
