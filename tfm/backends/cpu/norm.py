"""Row-wise kernels on the CPU: LayerNorm (+ residual), softmax, log-softmax, argmax.

Each is one Numba ``prange`` over rows of a 2-D view of the last axis. LayerNorm(x + residual)
is fused: the residual sum is formed once in the output row, then mean and variance (two
passes over a row that sits in L1, the numerically safe form) and the affine map. Row sums
use eight independent partial accumulators (in float64), which keeps the FP adds pipelined
without fastmath; softmax subtracts the row max first, so exp never overflows.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_LANES = 8


@njit(cache=True)
def _row_sum(row, shift):
    """sum(row - shift) in float64 with 8 independent accumulators (pipelined, deterministic)."""
    n = row.shape[0]
    acc = np.zeros(_LANES, np.float64)
    main = n - n % _LANES
    for j in range(0, main, _LANES):
        for lane in range(_LANES):
            acc[lane] += row[j + lane] - shift
    total = 0.0
    for j in range(main, n):
        total += row[j] - shift
    for lane in range(_LANES):
        total += acc[lane]
    return total


@njit(cache=True)
def _row_sq_sum(row, shift):
    """sum((row - shift)**2) in float64, as _row_sum."""
    n = row.shape[0]
    acc = np.zeros(_LANES, np.float64)
    main = n - n % _LANES
    for j in range(0, main, _LANES):
        for lane in range(_LANES):
            d = row[j + lane] - shift
            acc[lane] += d * d
    total = 0.0
    for j in range(main, n):
        d = row[j] - shift
        total += d * d
    for lane in range(_LANES):
        total += acc[lane]
    return total


@njit(cache=True, parallel=True)
def _layer_norm_kernel(x, residual, has_residual, gamma, beta, eps, out):
    rows, d = x.shape
    for i in prange(rows):
        y = out[i]
        if has_residual:
            for j in range(d):
                y[j] = x[i, j] + residual[i, j]
        else:
            y[:] = x[i]
        mean = _row_sum(y, 0.0) / d
        var = _row_sq_sum(y, mean) / d  # biased, as PyTorch
        inv = 1.0 / math.sqrt(var + eps)
        for j in range(d):
            y[j] = (y[j] - mean) * inv * gamma[j] + beta[j]


@njit(cache=True, parallel=True)
def _softmax_kernel(x, out, log):
    rows, n = x.shape
    for i in prange(rows):
        row = x[i]
        m = row[0]
        for j in range(1, n):
            m = max(m, row[j])
        o = out[i]
        if log:
            lse = m + math.log(_exp_sum(row, m))
            for j in range(n):
                o[j] = row[j] - lse
        else:
            total = 0.0
            for j in range(n):
                e = math.exp(row[j] - m)
                o[j] = e
                total += e
            inv = 1.0 / total
            for j in range(n):
                o[j] *= inv


@njit(cache=True)
def _exp_sum(row, m):
    total = 0.0
    for j in range(row.shape[0]):
        total += math.exp(row[j] - m)
    return total


def _rows(x):
    x = np.ascontiguousarray(x)
    return x, x.reshape(-1, x.shape[-1])


def layer_norm(x, gamma, beta, eps, residual=None):
    """LayerNorm(x + residual) over the last axis with sqrt(var + eps); residual optional."""
    x, x2 = _rows(x)
    out = np.empty_like(x)
    r2 = x2 if residual is None else _rows(residual)[1]
    _layer_norm_kernel(x2, r2, residual is not None, gamma, beta, float(eps), out.reshape(x2.shape))
    return out


def softmax(x):
    """Numerically stable softmax over the last axis."""
    x, x2 = _rows(x)
    out = np.empty_like(x)
    _softmax_kernel(x2, out.reshape(x2.shape), False)
    return out


def log_softmax(x):
    """Numerically stable log-softmax over the last axis: x - max - log(sum(exp(x - max)))."""
    x, x2 = _rows(x)
    out = np.empty_like(x)
    _softmax_kernel(x2, out.reshape(x2.shape), True)
    return out


def argmax(x):
    """Index of the largest element over the last axis, as a host int64 array."""
    return np.argmax(np.asarray(x), axis=-1).astype(np.int64)
