"""Dense layers on the CPU: linear, elementwise add, ReLU / exact GELU, the position-wise FFN.

The matrix products are single multi-threaded BLAS sgemm/dgemm calls made by NumPy (outside
Numba: OpenBLAS threads them itself) on a 2-D view of the activations, with PyTorch's (out, in)
weight layout passed as a transposed view (no copy). Bias and activation are then applied in
place by one parallel Numba pass over the output, so the FFN's (tokens, d_ff) hidden
activations are written by sgemm and touched exactly once more.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

ACTIVATIONS = ("relu", "gelu")
_RELU, _GELU, _IDENTITY = 0, 1, 2


@njit(cache=True, parallel=True)
def _bias_act_inplace(y, bias, has_bias, act):
    """y[i, j] = act(y[i, j] + bias[j]) in place for a 2-D C-contiguous y; parallel over rows."""
    rows, cols = y.shape
    zero = y.dtype.type(0.0)
    half = y.dtype.type(0.5)
    inv_sqrt2 = y.dtype.type(1.0 / math.sqrt(2.0))
    for i in prange(rows):
        row = y[i]
        if has_bias:
            for j in range(cols):
                row[j] += bias[j]
        if act == _RELU:
            for j in range(cols):
                row[j] = max(row[j], zero)
        elif act == _GELU:
            for j in range(cols):
                x = row[j]
                row[j] = half * x * (1 + math.erf(x * inv_sqrt2))


def _act_code(kind) -> int:
    if kind == "relu":
        return _RELU
    if kind == "gelu":
        return _GELU
    raise ValueError(f"unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")


def _matmul_t(x, weight):
    """(..., in) @ (out, in).T -> 2-D (tokens, out): one BLAS call, no copy of x or weight."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 @ weight.T


def linear(x, weight, bias=None):
    """x @ weight.T + bias; x (..., in), weight (out, in), bias (out,) or None -> (..., out)."""
    y = _matmul_t(x, weight)
    if bias is not None:
        y += bias  # in place on the fresh output (NumPy broadcast add, one pass)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def add(a, b):
    """Elementwise a + b (same shapes)."""
    return np.add(a, b)


def activation(x, kind):
    """ReLU or exact (erf) GELU, as a new array of x's dtype."""
    act = _act_code(kind)
    y = np.array(x, order="C", copy=True)
    y2 = y.reshape(-1, y.shape[-1])
    _bias_act_inplace(y2, y2[0], False, act)  # y2[0]: an unused bias of the right type
    return y


def feed_forward(x, w1, b1, w2, b2, activation):
    """FFN(x) = act(x W1^T + b1) W2^T + b2 (paper eq. 2) with bias+activation fused in one pass."""
    act = _act_code(activation)
    hidden = _matmul_t(x, w1)  # (tokens, d_ff)
    _bias_act_inplace(hidden, hidden[0] if b1 is None else b1, b1 is not None, act)  # one pass
    return linear(hidden, w2, b2).reshape(*x.shape[:-1], w2.shape[0])
