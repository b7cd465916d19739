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

Variants: one each. Verdict: correct under the simulator and on the H200 (``python3 -m
studies.gpu``, results/gpu/smoke.csv); not timed on their own: they run inside the lab's base
forward pass (``python3 -m dev.cuda.lab --family forward``, dev/cuda/gpu/forward.csv: 16.1 ms
at B=8, n=128 with the caching pool, eager PyTorch 9.8 ms).

Training, the same one-block-per-row shape: ``layer_norm_train`` (the forward writing each
row's mean and rstd), ``layer_norm_backward`` (dx per row with two reductions, then dgamma and
dbeta as column sums over the rows, deterministic), softmax and log-softmax backward (one
reduction per row) and ``cross_entropy`` (label smoothing, one kernel: max; sum of exp and of
the logits; the gradient written once; the (T,) losses are the only download). Verdict:
correct under the simulator and on the H200 (layer norm backward with residual at B=4,
n=1000, d=512, cross-entropy at T=1024, V=32000: results/gpu/correctness.csv; softmax and
log-softmax backward: smoke.csv); not timed on their own (they run inside the lab's
``backward`` family's training step, dev/cuda/gpu/backward.csv).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from ._launch import cdiv, launch, numba_dtype
from ._views import c_view
from .linear import contiguous, placeholder

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
def _layer_norm_kernel(dtype, nt: int, has_res: bool, stats: bool = False):
    """One block per row; ``stats``: also write the row's mean and rstd = 1/sqrt(var + eps)
    (``layer_norm_train``; ``mean``/``rstd`` are placeholders otherwise)."""
    dt = numba_dtype(dtype)
    block_sum = _make_reducers(nt)[0]

    @cuda.jit(cache=True)
    def layer_norm(x, res, gamma, beta, eps, out, mean_out, rstd_out):
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
        if stats and t == 0:
            mean_out[row] = mean
            rstd_out[row] = inv
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


def layer_norm(x, gamma, beta, eps, residual, tuning, stats: bool = False):
    """LayerNorm(x + residual); with ``stats`` -> (out, mean, rstd), each row's statistics."""
    d = tuple(x.shape)[-1]
    rows = x.size // d
    dtype = np.dtype(x.dtype)
    out = cuda.device_array(tuple(x.shape), dtype=dtype)
    nt = _threads(tuning, d)
    x2 = c_view(x, (rows, d))
    if stats:
        mean, rstd = cuda.device_array(rows, dtype=dtype), cuda.device_array(rows, dtype=dtype)
    else:
        mean = rstd = placeholder(dtype)
    kern = _layer_norm_kernel(dtype, nt, residual is not None, bool(stats))
    if rows:
        launch("layer_norm", kern, rows, nt, x2, x2 if residual is None else c_view(residual, (rows, d)),
               gamma, beta, dtype.type(eps), c_view(out, (rows, d)), mean, rstd)
    if not stats:
        return out
    lead = tuple(x.shape)[:-1]
    return out, c_view(mean, lead), c_view(rstd, lead)


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
def softmax_kernel(dtype, nt: int, log: bool, masked: bool, causal: bool, save_lse: bool = False):
    """Row softmax of x (R, L) into out (may alias x).

    For attention scores, row r is (b*H + h)*Nq + i; ``mask`` is 4-D with per-axis index
    factors (1 = indexed, 0 = broadcast); ``causal`` hides columns j > i. ``save_lse``: also
    write each row's log-sum-exp over its visible entries into ``lse`` (R,), -inf for a row
    with none (the naive attention's ``attention_train``).
    """
    dt = numba_dtype(dtype)
    block_sum, block_max, _ = _make_reducers(nt)
    visible = visibility(masked, causal)
    wl = UNBOUNDED

    @cuda.jit(cache=True)
    def softmax(x, out, mask, fb, fh, fi, fj, n_heads, nq, lse_out):
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
        if save_lse and t == 0:
            lse_out[row] = lse if s > dt(0.0) else ninf
        for c in range(t, ncol, nt):
            ok = visible(mask, b, h, i, c, fb, fh, fi, fj, wl, 0)
            if log:
                out[row, c] = x[row, c] - lse if ok else ninf
            else:
                out[row, c] = math.exp(x[row, c] - mx) * inv if ok else dt(0.0)

    return softmax


def run_softmax(x2, out2, tuning, *, log=False, mask4=None, factors=(0, 0, 0, 0),
                n_heads=1, nq=1, causal=False, lse=None):
    """Launch :func:`softmax_kernel` over the rows of the 2-D ``x2`` into ``out2`` (and each
    row's log-sum-exp into the 1-D ``lse`` if given)."""
    nt = _threads(tuning, x2.shape[1])
    dtype = np.dtype(x2.dtype)
    kern = softmax_kernel(dtype, nt, bool(log), mask4 is not None, bool(causal), lse is not None)
    mask_arg = mask4 if mask4 is not None else no_mask()
    if x2.shape[0]:
        launch("log_softmax" if log else "softmax", kern, x2.shape[0], nt, x2, out2, mask_arg,
               *factors, n_heads, nq, placeholder(dtype) if lse is None else lse)


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


# ---------------------------------------------------------------------- backward
# Row kernels again (one block per row, shared-memory reductions), plus LayerNorm's parameter
# gradients as column sums over the rows (32 columns per block, row lanes combined in a fixed
# order: deterministic, no atomics).


@lru_cache(maxsize=None)
def _layer_norm_backward_kernel(dtype, nt: int, has_res: bool):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma, xhat = (x + res - mean) rstd."""
    dt = numba_dtype(dtype)
    block_sum = _make_reducers(nt)[0]

    @cuda.jit(cache=True)
    def layer_norm_backward(dy, x, res, gamma, mean, rstd, dx):
        sm = cuda.shared.array(nt, dt)
        row = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = x.shape[1]
        mu = mean[row]
        rs = rstd[row]
        g_sum = dt(0.0)
        gx_sum = dt(0.0)
        for c in range(t, d, nt):
            v = x[row, c]
            if has_res:
                v += res[row, c]
            g = dy[row, c] * gamma[c]
            g_sum += g
            gx_sum += g * ((v - mu) * rs)
        sm[t] = g_sum
        a = block_sum(sm, t) / dt(d)
        sm[t] = gx_sum
        b = block_sum(sm, t) / dt(d)
        for c in range(t, d, nt):
            v = x[row, c]
            if has_res:
                v += res[row, c]
            dx[row, c] = rs * (dy[row, c] * gamma[c] - a - ((v - mu) * rs) * b)

    return layer_norm_backward


@lru_cache(maxsize=None)
def _layer_norm_param_grads_kernel(dtype, nt: int, has_res: bool):
    """dgamma[c] = sum over rows of dy * xhat, dbeta[c] = sum over rows of dy: 32 columns per
    block, nt/32 row lanes (a warp reads 32 consecutive columns of a row: coalesced)."""
    dt = numba_dtype(dtype)
    lanes = max(1, nt // 32)
    width = nt // lanes

    @cuda.jit(cache=True)
    def param_grads(dy, x, res, mean, rstd, dgamma, dbeta):
        pg = cuda.shared.array(nt, dt)
        pb = cuda.shared.array(nt, dt)
        t = cuda.threadIdx.x
        lane = t // width
        col = cuda.blockIdx.x * width + t - lane * width
        d = x.shape[1]
        sg = dt(0.0)
        sb = dt(0.0)
        if col < d:
            for r in range(lane, x.shape[0], lanes):
                v = x[r, col]
                if has_res:
                    v += res[r, col]
                g = dy[r, col]
                sg += g * ((v - mean[r]) * rstd[r])
                sb += g
        pg[t] = sg
        pb[t] = sb
        cuda.syncthreads()
        if lane == 0 and col < d:
            for other in range(1, lanes):
                sg += pg[other * width + t]
                sb += pb[other * width + t]
            dgamma[col] = sg
            dbeta[col] = sb

    return param_grads


def layer_norm_backward(dy, x, gamma, mean, rstd, residual, tuning):
    """(dx, dgamma, dbeta) of LayerNorm(x + residual); dx is also the residual's gradient."""
    d = tuple(x.shape)[-1]
    rows = x.size // d
    dtype = np.dtype(x.dtype)
    for name, a, shape in (("dy", dy, tuple(x.shape)), ("mean", mean, tuple(x.shape)[:-1]),
                           ("rstd", rstd, tuple(x.shape)[:-1])):
        if tuple(a.shape) != shape:
            raise ValueError(f"layer_norm_backward: {name} must have shape {shape}, got {tuple(a.shape)}")
    x2 = c_view(contiguous(x, tuning), (rows, d))
    dy2 = c_view(contiguous(dy, tuning), (rows, d))
    r2 = x2 if residual is None else c_view(contiguous(residual, tuning), (rows, d))
    mean1, rstd1 = c_view(contiguous(mean, tuning), (rows,)), c_view(contiguous(rstd, tuning), (rows,))
    dx = cuda.device_array((rows, d), dtype=dtype)
    dgamma = cuda.device_array(d, dtype=dtype)
    dbeta = cuda.device_array(d, dtype=dtype)
    has_res = residual is not None
    if rows:
        nt = _threads(tuning, d)
        launch("layer_norm_backward", _layer_norm_backward_kernel(dtype, nt, has_res), rows, nt,
               dy2, x2, r2, gamma, mean1, rstd1, dx)
    if d:
        nt = tuning.elem_threads
        width = nt // max(1, nt // 32)
        launch("layer_norm_param_grads", _layer_norm_param_grads_kernel(dtype, nt, has_res), (cdiv(d, width),),
               nt, dy2, x2, r2, mean1, rstd1, dgamma, dbeta)
    return c_view(dx, tuple(x.shape)), dgamma, dbeta


@lru_cache(maxsize=None)
def _softmax_backward_kernel(dtype, nt: int, log: bool):
    """softmax: dx = y (dy - sum(dy y)); log-softmax: dx = dy - exp(y) sum(dy)."""
    dt = numba_dtype(dtype)
    block_sum = _make_reducers(nt)[0]

    @cuda.jit(cache=True)
    def softmax_backward(y, dy, dx):
        sm = cuda.shared.array(nt, dt)
        row = cuda.blockIdx.x
        t = cuda.threadIdx.x
        n = y.shape[1]
        s = dt(0.0)
        for c in range(t, n, nt):
            s += dy[row, c] if log else dy[row, c] * y[row, c]
        sm[t] = s
        s = block_sum(sm, t)
        for c in range(t, n, nt):
            if log:
                dx[row, c] = dy[row, c] - math.exp(y[row, c]) * s
            else:
                dx[row, c] = y[row, c] * (dy[row, c] - s)

    return softmax_backward


def _softmax_backward(y, dy, log, tuning):
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"softmax backward: dy {tuple(dy.shape)} does not match y {tuple(y.shape)}")
    d = tuple(y.shape)[-1]
    rows = y.size // d
    y2 = c_view(contiguous(y, tuning), (rows, d))
    dy2 = c_view(contiguous(dy, tuning), (rows, d))
    dx = cuda.device_array((rows, d), dtype=y.dtype)
    if rows:
        nt = _threads(tuning, d)
        launch("log_softmax_backward" if log else "softmax_backward",
               _softmax_backward_kernel(np.dtype(y.dtype), nt, log), rows, nt, y2, dy2, dx)
    return c_view(dx, tuple(y.shape))


def softmax_backward(y, dy, tuning):
    return _softmax_backward(y, dy, False, tuning)


def log_softmax_backward(y, dy, tuning):
    return _softmax_backward(y, dy, True, tuning)


@lru_cache(maxsize=None)
def _cross_entropy_kernel(dtype, nt: int):
    """One block per target row t of logits z (T, V), one pass over the row for each of: the
    max; sum exp(z - max) and sum z; the gradient, written once. loss_t = (1 - eps)(lse -
    z[y]) + eps (lse - mean z); dz = w_t (softmax(z) - (1 - eps) onehot(y) - eps / V)."""
    dt = numba_dtype(dtype)
    block_sum, block_max, _ = _make_reducers(nt)

    @cuda.jit(cache=True)
    def cross_entropy(z, targets, weights, eps, losses, dz):
        sm = cuda.shared.array(nt, dt)
        row = cuda.blockIdx.x
        t = cuda.threadIdx.x
        v = z.shape[1]
        mx = dt(-math.inf)
        for c in range(t, v, nt):
            mx = max(mx, z[row, c])
        sm[t] = mx
        mx = block_max(sm, t)
        se = dt(0.0)
        sz = dt(0.0)
        for c in range(t, v, nt):
            se += math.exp(z[row, c] - mx)
            sz += z[row, c]
        sm[t] = se
        se = block_sum(sm, t)
        sm[t] = sz
        sz = block_sum(sm, t)
        lse = mx + math.log(se)
        y = targets[row]
        one = dt(1.0)
        if t == 0:
            losses[row] = (one - eps) * (lse - z[row, y]) + eps * (lse - sz / dt(v))
        w = weights[row]
        smooth = eps / dt(v)
        for c in range(t, v, nt):
            g = math.exp(z[row, c] - lse) - smooth
            if c == y:
                g -= one - eps
            dz[row, c] = w * g

    return cross_entropy


def cross_entropy(logits, targets, weights, label_smoothing, tuning):
    """(losses (T,) host float64, unweighted; dlogits (T, V) on the device, the gradient of
    sum_t weights[t] * loss_t) with PyTorch's label smoothing, one kernel over the rows.
    targets, weights: host arrays (uploaded once per call: T int64 and T floats)."""
    t_rows, v = logits.shape
    dtype = np.dtype(logits.dtype)
    targets = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)
    weights = np.ascontiguousarray(weights, dtype=np.float64).reshape(-1)
    if targets.shape != (t_rows,) or weights.shape != (t_rows,):
        raise ValueError(f"cross_entropy: targets and weights must have shape ({t_rows},), got "
                         f"{targets.shape} and {weights.shape}")
    if t_rows and (targets.min() < 0 or targets.max() >= v):
        raise ValueError(f"cross_entropy: targets must lie in [0, {v}), got [{targets.min()}, {targets.max()}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    z = contiguous(logits, tuning)
    losses = cuda.device_array(t_rows, dtype=dtype)
    dz = cuda.device_array((t_rows, v), dtype=dtype)
    if t_rows:
        nt = _threads(tuning, v)
        launch("cross_entropy", _cross_entropy_kernel(dtype, nt), t_rows, nt, z, cuda.to_device(targets),
               cuda.to_device(weights.astype(dtype)), dtype.type(label_smoothing), losses, dz)
    return losses.copy_to_host().astype(np.float64), dz
