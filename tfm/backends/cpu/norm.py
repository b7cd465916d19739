"""Row-wise kernels on the CPU: LayerNorm (+ residual), softmax, log-softmax, argmax.

Each is one Numba ``prange`` over rows of a 2-D view of the last axis. LayerNorm(x + residual)
is fused: the residual sum is formed once in the output row, then mean and variance (two
passes over a row that sits in L1: the numerically safe form, accumulated in float64) and
the affine map. Softmax subtracts the row max first, so exp never overflows.

The row primitives here (``row_max``, ``exp_shift_sum``, ``exp2_shift_sum``,
``softmax_in_place``) are shared with the attention kernels. Reductions are compiled with
``fastmath={"reassoc", "nsz"}`` only (NaN and inf keep their IEEE meaning) so that LLVM
vectorises them; float32 exp is ``fastmath.exp_le0``, a polynomial that vectorises, where
libm's expf runs one element at a time (4.37x its time: ``fastmath``'s header). Softmax reads
x twice (max, then exp into out) and the row in L1 twice more (sum, scale). tfm against
PyTorch for LayerNorm(x + r) and softmax at model sizes: ``make bench``
(tests/benchmarks/test_bench_kernels.py).
Inputs under ``_threads.SMALL_ELEMENTS`` run on the calling thread (``*_rows``; the rule is
``_threads``'s).

Backward: ``layer_norm_train`` is the forward keeping each row's mean and rstd; its backward
is two passes over each row (the sums of g = dy gamma and g xhat in float64, then dx =
rstd (g - mean(g) - xhat mean(g xhat))), dgamma and dbeta summed per thread block in
float64. ``cross_entropy`` is log-softmax, label smoothing and the gradient in one pass per
row: max, exp into the gradient row, sums, then the gradient rescaled in place. From
``python -m dev.cpu.training_ops`` (dev/cpu/results/training_ops.csv: time / PyTorch autograd's, interleaved, same 2 threads, median of per-round ratios with its bootstrap 95% interval; 2-core AMD EPYC, load ~7):
    LayerNorm(x + r) backward, 1024 x 512      0.995 (0.93-1.06)
    cross-entropy + gradient, 1024 x 8000       0.17 (0.13-0.21) (PyTorch: forward + backward)
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._threads import SMALL_ELEMENTS
from .fastmath import REDUCE as _REDUCE
from .fastmath import exp2_le0, exp_le0, maxnum


# ---------------------------------------------------------------------------- row primitives
@njit(cache=True, fastmath=_REDUCE)
def row_max(row, n):
    """max(row[:n]), -inf for n == 0."""
    m = row.dtype.type(-np.inf)
    for j in range(n):
        m = maxnum(m, row[j])
    return m


@njit(cache=True, fastmath=_REDUCE)
def _exp_shift_f32(row, n, m):
    """row[:n] = exp(row[:n] - m) in place. No reduction in this loop: with one, LLVM kept it
    scalar."""
    for j in range(n):
        row[j] = exp_le0(row[j] - m)


@njit(cache=True, fastmath=_REDUCE)
def _exp_shift_to_f32(src, dst, n, m):
    """dst[:n] = exp(src[:n] - m); src and dst must not overlap (a separate loop from the
    in-place one, so neither carries LLVM's runtime overlap check)."""
    for j in range(n):
        dst[j] = exp_le0(src[j] - m)


@njit(cache=True, fastmath=_REDUCE)
def _exp2_shift_f32(row, n, m):
    """row[:n] = 2**(row[:n] - m) in place."""
    for j in range(n):
        row[j] = exp2_le0(row[j] - m)


@njit(cache=True, fastmath=_REDUCE)
def _exp2_shift_f64(row, n, m):
    for j in range(n):
        row[j] = np.exp2(row[j] - m)


@njit(cache=True, fastmath=_REDUCE)
def _sum_f64(row, n):
    """sum(row[:n]) accumulated in float64 (a float32 sum of ~1000 terms: ~4e-7 more error)."""
    s = 0.0
    for j in range(n):
        s += row[j]
    return s


@njit(cache=True, fastmath=_REDUCE)
def _exp_shift_to_f64(src, dst, n, m):
    for j in range(n):
        dst[j] = math.exp(src[j] - m)


@njit(cache=True, fastmath=_REDUCE)
def _exp_shift_f64(row, n, m):
    _exp_shift_to_f64(row, row, n, m)


def exp_shift_sum(row, n, m):
    """row[:n] = exp(row[:n] - m) in place, returns the sum (float64); needs row <= m.

    In @njit code: the exp loop for row's dtype (float32: ``fastmath.exp_le0``), then
    ``_sum_f64`` in a loop of its own. The two in one loop ran 1.05 (1.05-1.05) times as long
    (dev/cpu/fastmath.py, "exp one loop").
    """
    row[:n] = np.exp(row[:n] - m)
    return float(row[:n].sum())


def exp_shift_to_sum(src, dst, n, m):
    """dst[:n] = exp(src[:n] - m), returns the sum (float64); src and dst must not overlap."""
    dst[:n] = np.exp(src[:n] - m)
    return float(dst[:n].sum())


def exp2_shift_sum(row, n, m):
    """row[:n] = 2**(row[:n] - m) in place, returns the sum (float64); needs row <= m.

    For scores already in log2 units (the fused attention kernel folds log2(e) into the
    Q K^T gemm's alpha): exp(x) = 2**(x log2 e). Float32 (``fastmath.exp2_le0``): 0.89
    (0.89-0.89) of ``exp_shift_sum``'s time (dev/cpu/fastmath.py).
    """
    row[:n] = np.exp2(row[:n] - m)
    return float(row[:n].sum())


def _shift_then_sum(kernel_f32, kernel_f64):
    """The @overload body of ``exp_shift_sum`` / ``exp2_shift_sum``: the row dtype's in-place
    kernel (float32: the polynomial), then the float64 sum in its own loop."""

    def typer(row, n, m):
        in_place = kernel_f32 if row.dtype == types.float32 else kernel_f64
        dt = row.dtype

        def impl(row, n, m):
            in_place(row, n, dt(m))
            return _sum_f64(row, n)

        return impl

    return typer


overload(exp_shift_sum)(_shift_then_sum(_exp_shift_f32, _exp_shift_f64))
overload(exp2_shift_sum)(_shift_then_sum(_exp2_shift_f32, _exp2_shift_f64))


@overload(exp_shift_to_sum)
def _exp_shift_to_sum_impl(src, dst, n, m):
    exp_to = _exp_shift_to_f32 if dst.dtype == types.float32 else _exp_shift_to_f64
    dt = dst.dtype

    def impl(src, dst, n, m):
        exp_to(src, dst, n, dt(m))
        return _sum_f64(dst, n)

    return impl


@njit(cache=True)
def softmax_in_place(row, n):
    """row[:n] = softmax(row[:n]) in place; a row with no visible score (all -inf) becomes zeros.

    The masked score rows of naive attention and the windows of restricted attention.
    """
    m = row_max(row, n)
    if m == -np.inf:
        row[:n] = 0
        return
    inv = row.dtype.type(1.0 / exp_shift_sum(row, n, m))
    for j in range(n):
        row[j] *= inv


@njit(cache=True, fastmath=_REDUCE)
def _mean_var(y):
    """Mean and biased variance of a row, two passes, float64 accumulators."""
    n = y.shape[0]
    total = 0.0
    for j in range(n):
        total += y[j]
    mean = total / n
    sq = 0.0
    for j in range(n):
        d = y[j] - mean
        sq += d * d
    return mean, sq / n


# ---------------------------------------------------------------------------- kernels
@njit(cache=True)
def _layer_norm_stats_rows(x, residual, has_residual, gamma, beta, eps, out, r0, r1, mean_out,
                           rstd_out, save):
    """Rows r0:r1 of out = LayerNorm(x + residual), on the calling thread; with ``save``, each
    row's mean and 1 / sqrt(var + eps) also go to mean_out, rstd_out (for the backward)."""
    d = x.shape[1]
    for i in range(r0, r1):
        y = out[i]
        if has_residual:
            for j in range(d):
                y[j] = x[i, j] + residual[i, j]
        else:
            y[:] = x[i]
        mean, var = _mean_var(y)
        inv = 1.0 / math.sqrt(var + eps)
        if save:
            mean_out[i] = mean
            rstd_out[i] = inv
        for j in range(d):
            y[j] = (y[j] - mean) * inv * gamma[j] + beta[j]


@njit(cache=True)
def _layer_norm_rows(x, residual, has_residual, gamma, beta, eps, out, r0, r1):
    """Rows r0:r1 of out = LayerNorm(x + residual), on the calling thread."""
    none = np.empty(0, out.dtype)
    _layer_norm_stats_rows(x, residual, has_residual, gamma, beta, eps, out, r0, r1, none, none,
                           False)


@njit(cache=True, parallel=True)
def _layer_norm_kernel(x, residual, has_residual, gamma, beta, eps, out):
    none = np.empty(0, out.dtype)
    for i in prange(x.shape[0]):
        _layer_norm_stats_rows(x, residual, has_residual, gamma, beta, eps, out, i, i + 1, none,
                               none, False)


@njit(cache=True, parallel=True)
def _layer_norm_stats_kernel(x, residual, has_residual, gamma, beta, eps, out, mean_out, rstd_out):
    for i in prange(x.shape[0]):
        _layer_norm_stats_rows(x, residual, has_residual, gamma, beta, eps, out, i, i + 1,
                               mean_out, rstd_out, True)


@njit(cache=True)
def _softmax_rows(x, out, log, r0, r1):
    """Rows r0:r1 of out = (log-)softmax(x), on the calling thread."""
    n = x.shape[1]
    for i in range(r0, r1):
        o = out[i]
        m = row_max(x[i], n)
        total = exp_shift_to_sum(x[i], o, n, m)
        if log:
            shift = m + math.log(total)
            for j in range(n):
                o[j] = x[i, j] - shift
        else:
            inv = 1.0 / total
            for j in range(n):
                o[j] *= inv


@njit(cache=True, parallel=True)
def _softmax_kernel(x, out, log):
    for i in prange(x.shape[0]):
        _softmax_rows(x, out, log, i, i + 1)


def _rows(x):
    x = np.ascontiguousarray(x)
    return x, x.reshape(-1, x.shape[-1])


def _softmax(x2, out2, log):
    if x2.size < SMALL_ELEMENTS:
        _softmax_rows(x2, out2, log, 0, x2.shape[0])
    else:
        _softmax_kernel(x2, out2, log)


def layer_norm(x, gamma, beta, eps, residual=None):
    """LayerNorm(x + residual) over the last axis with sqrt(var + eps); residual optional."""
    x, x2 = _rows(x)
    out = np.empty_like(x)
    r2 = x2 if residual is None else _rows(residual)[1]
    args = (x2, r2, residual is not None, gamma, beta, float(eps), out.reshape(x2.shape))
    if x.size < SMALL_ELEMENTS:
        _layer_norm_rows(*args, 0, x2.shape[0])
    else:
        _layer_norm_kernel(*args)
    return out


def softmax(x):
    """Numerically stable softmax over the last axis."""
    x, x2 = _rows(x)
    out = np.empty_like(x)
    _softmax(x2, out.reshape(x2.shape), False)
    return out


def log_softmax(x):
    """Numerically stable log-softmax over the last axis: x - max - log(sum(exp(x - max)))."""
    x, x2 = _rows(x)
    out = np.empty_like(x)
    _softmax(x2, out.reshape(x2.shape), True)
    return out


def argmax(x):
    """Index of the largest element over the last axis, as a host int64 array."""
    return np.argmax(np.asarray(x), axis=-1).astype(np.int64)


# ---------------------------------------------------------------------------- backward
# Row kernels again: each row's reductions in float64, vectorised (``_REDUCE``); parameter
# gradients (LayerNorm's dgamma, dbeta) summed over rows in one float64 partial per thread
# block, added up at the end, so the result does not depend on the thread count's timing.


def layer_norm_train(x, gamma, beta, eps, residual=None):
    """(LayerNorm(x + residual), mean, rstd): mean and 1 / sqrt(var + eps) of each row of
    x + residual, shape x.shape[:-1], x's dtype."""
    x, x2 = _rows(x)
    out = np.empty_like(x)
    mean = np.empty(x2.shape[0], x.dtype)
    rstd = np.empty(x2.shape[0], x.dtype)
    r2 = x2 if residual is None else _rows(residual)[1]
    args = (x2, r2, residual is not None, gamma, beta, float(eps), out.reshape(x2.shape))
    if x.size < SMALL_ELEMENTS:
        _layer_norm_stats_rows(*args, 0, x2.shape[0], mean, rstd, True)
    else:
        _layer_norm_stats_kernel(*args, mean, rstd)
    return out, mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


@njit(cache=True, fastmath=_REDUCE)
def _layer_norm_backward_rows(dy, x, residual, has_residual, gamma, mean, rstd, dx, dgamma, dbeta,
                              r0, r1):
    """Rows r0:r1: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gamma and
    xhat = (x + residual - mean) * rstd; dgamma += dy * xhat, dbeta += dy (float64 rows)."""
    d = x.shape[1]
    for i in range(r0, r1):
        mu = mean[i]
        rs = rstd[i]
        xr, gr, out = x[i], dy[i], dx[i]  # row views: inner loops indexed from 0
        rr = residual[i] if has_residual else x[i]
        g_sum = 0.0
        gx_sum = 0.0
        for j in range(d):
            z = xr[j] + rr[j] if has_residual else xr[j]
            xhat = (z - mu) * rs
            g = gr[j] * gamma[j]
            g_sum += g
            gx_sum += g * xhat
        a = g_sum / d
        b = gx_sum / d
        for j in range(d):
            z = xr[j] + rr[j] if has_residual else xr[j]
            xhat = (z - mu) * rs
            g = gr[j] * gamma[j]
            out[j] = rs * (g - a - xhat * b)
            dgamma[j] += gr[j] * xhat
            dbeta[j] += gr[j]


@njit(cache=True, parallel=True)
def _layer_norm_backward_kernel(dy, x, residual, has_residual, gamma, mean, rstd, dx, dgamma,
                                dbeta, parts):
    rows = x.shape[0]
    for p in prange(parts):
        _layer_norm_backward_rows(dy, x, residual, has_residual, gamma, mean, rstd, dx, dgamma[p],
                                  dbeta[p], p * rows // parts, (p + 1) * rows // parts)


def layer_norm_backward(dy, x, gamma, mean, rstd, residual=None):
    """(dx, dgamma, dbeta) of LayerNorm(x + residual); dx is also the residual's gradient."""
    x, x2 = _rows(x)
    d = x2.shape[1]
    dy2 = _rows(np.asarray(dy, x.dtype))[1]
    r2 = x2 if residual is None else _rows(np.asarray(residual, x.dtype))[1]
    mean = np.ascontiguousarray(mean, x.dtype).reshape(-1)
    rstd = np.ascontiguousarray(rstd, x.dtype).reshape(-1)
    gamma = np.ascontiguousarray(gamma, x.dtype)
    dx = np.empty_like(x2)
    parts = 1 if x.size < SMALL_ELEMENTS else numba.get_num_threads()
    dgamma = np.zeros((parts, d))
    dbeta = np.zeros((parts, d))
    args = (dy2, x2, r2, residual is not None, gamma, mean, rstd, dx)
    if parts == 1:
        _layer_norm_backward_rows(*args, dgamma[0], dbeta[0], 0, x2.shape[0])
    else:
        _layer_norm_backward_kernel(*args, dgamma, dbeta, parts)
    return (dx.reshape(x.shape), dgamma.sum(axis=0).astype(x.dtype),
            dbeta.sum(axis=0).astype(x.dtype))


@njit(cache=True, fastmath=_REDUCE)
def _softmax_backward_rows(y, dy, dx, log, r0, r1):
    """softmax: dx = y * (dy - sum(dy * y)); log-softmax: dx = dy - exp(y) * sum(dy)."""
    n = y.shape[1]
    zero = y.dtype.type(0.0)
    for i in range(r0, r1):
        yr, gr, out = y[i], dy[i], dx[i]  # row views: inner loops indexed from 0
        s = 0.0
        if log:
            for j in range(n):
                s += gr[j]
            sd = y.dtype.type(s)
            for j in range(n):
                out[j] = gr[j] - _exp(min(yr[j], zero)) * sd  # y <= 0: a log-probability
        else:
            for j in range(n):
                s += gr[j] * yr[j]
            sd = y.dtype.type(s)
            for j in range(n):
                out[j] = yr[j] * (gr[j] - sd)


def _exp(x):
    """exp(x) for x <= 0 inside kernels: the vectorised polynomial for float32, libm for float64."""
    return np.exp(x)


@overload(_exp)
def _exp_impl(x):
    if x == types.float32:
        return lambda x: exp_le0(x)
    return lambda x: math.exp(x)


@njit(cache=True, parallel=True)
def _softmax_backward_kernel(y, dy, dx, log):
    for i in prange(y.shape[0]):
        _softmax_backward_rows(y, dy, dx, log, i, i + 1)


def _softmax_backward(y, dy, log):
    y, y2 = _rows(y)
    dy2 = _rows(np.asarray(dy, y.dtype))[1]
    dx = np.empty_like(y2)
    if y.size < SMALL_ELEMENTS:
        _softmax_backward_rows(y2, dy2, dx, log, 0, y2.shape[0])
    else:
        _softmax_backward_kernel(y2, dy2, dx, log)
    return dx.reshape(y.shape)


def softmax_backward(y, dy):
    """dx of y = softmax(x): y * (dy - sum(dy * y)) over the last axis."""
    return _softmax_backward(y, dy, False)


def log_softmax_backward(y, dy):
    """dx of y = log_softmax(x): dy - exp(y) * sum(dy) over the last axis."""
    return _softmax_backward(y, dy, True)


@njit(cache=True)
def _cross_entropy_rows(z, targets, weights, eps, losses, dz, r0, r1):
    """Rows r0:r1: loss_t = (1 - eps)(lse - z[y]) + eps (lse - mean(z)) and its gradient times
    weights[t]: w (softmax(z) - (1 - eps) onehot(y) - eps / V). The exp of the row goes
    straight into dz, which is then scaled in place: the logits are read three times (max,
    exp, sum) while the row sits in cache, and dz is written once and rescaled there."""
    v = z.shape[1]
    for t in range(r0, r1):
        row = z[t]
        out = dz[t]
        m = row_max(row, v)
        total = exp_shift_to_sum(row, out, v, m)
        lse = m + math.log(total)
        y = targets[t]
        losses[t] = (1.0 - eps) * (lse - row[y]) + eps * (lse - _sum_f64(row, v) / v)
        w = weights[t]
        _scale_shift(out, v, w / total, -w * eps / v)
        out[y] -= out.dtype.type(w * (1.0 - eps))


@njit(cache=True, fastmath=_REDUCE)
def _scale_shift(row, n, a, b):
    """row[:n] = row[:n] * a + b (a vectorised loop of its own)."""
    ad = row.dtype.type(a)
    bd = row.dtype.type(b)
    for j in range(n):
        row[j] = row[j] * ad + bd


@njit(cache=True, parallel=True)
def _cross_entropy_kernel(z, targets, weights, eps, losses, dz):
    for t in prange(z.shape[0]):
        _cross_entropy_rows(z, targets, weights, eps, losses, dz, t, t + 1)


def cross_entropy(logits, targets, weights, label_smoothing=0.0):
    """(losses (T,) float64, unweighted; dlogits (T, V), the gradient of sum_t weights[t] * loss_t)
    with PyTorch's label smoothing; one fused pass per row of the logits."""
    z = np.ascontiguousarray(logits)
    targets = np.ascontiguousarray(targets, np.int64).reshape(-1)
    weights = np.ascontiguousarray(weights, np.float64).reshape(-1)
    if targets.shape != (z.shape[0],) or weights.shape != (z.shape[0],):
        raise ValueError(f"cross_entropy: targets {targets.shape} and weights {weights.shape} "
                         f"must be ({z.shape[0]},) for logits {z.shape}")
    if targets.size and not (0 <= targets.min() and targets.max() < z.shape[1]):
        # the kernel indexes the logits row by the target: never read or write outside it
        raise ValueError(f"cross_entropy: targets must lie in [0, {z.shape[1]}), got "
                         f"[{targets.min()}, {targets.max()}]")
    losses = np.empty(z.shape[0], np.float64)
    dz = np.empty_like(z)
    args = (z, targets, weights, float(label_smoothing), losses, dz)
    if z.size < SMALL_ELEMENTS:
        _cross_entropy_rows(*args, 0, z.shape[0])
    else:
        _cross_entropy_kernel(*args)
    return losses, dz


def exp2_shift(row, n, m):
    """row[:n] = 2**(row[:n] - m) in place, no sum: the backward of fused attention recomputes
    its weights from the forward's log-sum-exp (``exp2_shift_sum`` without the sum loop)."""
    row[:n] = np.exp2(row[:n] - m)


@overload(exp2_shift)
def _exp2_shift_impl(row, n, m):
    in_place = _exp2_shift_f32 if row.dtype == types.float32 else _exp2_shift_f64
    dt = row.dtype

    def impl(row, n, m):
        in_place(row, n, dt(m))

    return impl
