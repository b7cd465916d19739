"""1-D convolution over sequences and the gated linear unit on the CPU.

conv1d: stride 1, zero padding, any dilation, PyTorch's cross-correlation with weights
(C_out, C_in, k) and sequence-major activations (B, N, C). Output row t reads input row
t + j*dilation - pad_left through tap j, so the layer is one big GEMM and a shifted sum:
Y = X (B*N, C_in) @ [W_0 | W_1 | ... ] (C_in, k*C_out) through ``linear`` (one thread pool,
Numba's: per-thread single-threaded gemm blocks, see linear.py), then
out[b, t] = bias + sum_j Y[b, t + shift_j, tap j] over the rows that exist (a parallel
Numba pass). Padding is never materialised and taps that only ever read padding are
dropped before the GEMM (dilations larger than N cost nothing extra).

    one-gemm (kept)    time / nn.Conv1d (oneDNN) time at B=8, C=512, k=3, "same", float32,
                       2 threads, side by side, quiet machine (min of 15): 1.05 at N=128,
                       1.03 at N=1024. The gemm goes through ``linear`` (one pool). NumPy's
                       threaded ``@`` instead is 1.2-1.6x faster alone at these sizes, but its
                       spinning OpenBLAS workers slow the next parallel Numba kernel (see
                       linear.py: attention 50 -> 95 ms in a base forward pass), so the
                       backend keeps one pool everywhere.
    taps     (dropped) one (B, L, C_in) x (C_in, C_out) product per tap, accumulated in
                       place: 1.2-14x slower than one-gemm (batched small GEMMs + k passes).

glu: a * sigmoid(b) over the last axis split in halves, one parallel Numba pass (float32
sigmoid through the vectorised rational tanh of fastmath.py).

Backward: the transposed shifted sum (dy gathered per tap: dY[b, s, a] = dy[b, s - shift_a])
and ``linear_backward`` over the same one-gemm layout, so dX = dY W_cat and dW_cat = dY^T X
are each one product over all rows; GLU's backward is one parallel pass. Time / PyTorch
autograd's (``python -m dev.cpu.training_ops``, dev/cpu/results/training_ops.csv, load ~7):
conv1d backward (dx, dW, db) at B=8, N=128, C=512, k=3 "same" 0.82 (0.77-0.84); GLU backward
(8, 128, 1024) 0.58 (0.55-0.65).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .linear import linear, linear_backward
from .fastmath import sigmoid


@njit(cache=True, fastmath=False, parallel=True)
def _shifted_sum(y, shifts, bias, out):
    """out[b, t] = bias + sum_a y[b, t + shifts[a], a] over the taps whose input row exists."""
    batch, n, n_taps, c_out = y.shape
    n_out = out.shape[1]
    for row in prange(batch * n_out):
        b, t = row // n_out, row % n_out
        o = out[b, t]
        for c in range(c_out):
            o[c] = bias[c]
        for a in range(n_taps):
            s = t + shifts[a]
            if 0 <= s < n:
                ya = y[b, s, a]
                for c in range(c_out):
                    o[c] += ya[c]


def conv1d(x, weight, bias=None, dilation: int = 1, pad_left: int = 0, pad_right: int = 0):
    """x (B, N, C_in), weight (C_out, C_in, k) -> (B, N + pad_left + pad_right - dilation*(k-1), C_out)."""
    x = np.ascontiguousarray(x)
    dtype = x.dtype
    batch, n, c_in = x.shape
    c_out, _, k = weight.shape
    n_out = n + pad_left + pad_right - dilation * (k - 1)
    # output row t reads input row t + shift_j; taps that only ever read padding are dropped
    shifts = np.array([j * dilation - pad_left for j in range(k)], dtype=np.int64)
    active = [j for j in range(k) if max(0, -shifts[j]) < min(n_out, n - shifts[j])]
    bias = np.zeros(c_out, dtype) if bias is None else np.ascontiguousarray(bias, dtype)
    out = np.empty((batch, n_out, c_out), dtype)
    w = np.asarray(weight, dtype)[:, :, active]  # (C_out, C_in, A)
    w_cat = np.ascontiguousarray(w.transpose(2, 0, 1)).reshape(len(active) * c_out, c_in)  # (A*C_out, C_in)
    y = linear(x.reshape(batch * n, c_in), w_cat, None).reshape(batch, n, len(active), c_out)  # one gemm
    _shifted_sum(y, shifts[active], bias, out)
    return out


@njit(cache=True, fastmath=False, parallel=True)
def _glu(x2, out):
    rows, half = out.shape
    for r in prange(rows):
        a, g, o = x2[r, :half], x2[r, half:], out[r]
        for j in range(half):
            o[j] = a[j] * sigmoid(g[j])


def glu(x):
    """GLU(a, b) = a * sigmoid(b) for x = [a, b] on the last axis (Dauphin et al., 2017)."""
    x = np.ascontiguousarray(x)
    half = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], half), x.dtype)
    _glu(x2, out)
    return out.reshape(x.shape[:-1] + (half,))


# ---------------------------------------------------------------------------- backward
# The forward is Y = X W_cat^T (one gemm) and a shifted sum out[b, t] = bias + sum_a
# Y[b, t + shift_a, a]. Its backward is the transposed shifted sum, a gather of dy into
# dY[b, s, a] = dy[b, s - shift_a] (zero where that output row does not exist), then the
# linear layer's backward through the same one-pool gemm blocks (``linear.linear_backward``):
# dX = dY W_cat, dW_cat = dY^T X (both one product over all B*N rows).


@njit(cache=True, fastmath=False, parallel=True)
def _shifted_gather(dy, shifts, dy_taps):
    """dy_taps[b, s, a] = dy[b, s - shifts[a]] where that output row exists, else 0."""
    batch, n, n_taps, c_out = dy_taps.shape
    n_out = dy.shape[1]
    for row in prange(batch * n):
        b, s = row // n, row % n
        for a in range(n_taps):
            t = s - shifts[a]
            dst = dy_taps[b, s, a]
            if 0 <= t < n_out:
                src = dy[b, t]
                for c in range(c_out):
                    dst[c] = src[c]
            else:
                for c in range(c_out):
                    dst[c] = 0


def conv1d_backward(x, weight, dy, dilation: int = 1, pad_left: int = 0, pad_right: int = 0,
                    bias: bool = True):
    """(dx (B, N, C_in), dweight (C_out, C_in, k), dbias (C_out,) or None) of ``conv1d``."""
    x = np.ascontiguousarray(x)
    dtype = x.dtype
    batch, n, c_in = x.shape
    c_out, _, k = weight.shape
    n_out = n + pad_left + pad_right - dilation * (k - 1)
    dy = np.ascontiguousarray(dy, dtype).reshape(batch, n_out, c_out)
    shifts = np.array([j * dilation - pad_left for j in range(k)], dtype=np.int64)
    active = [j for j in range(k) if max(0, -shifts[j]) < min(n_out, n - shifts[j])]
    dweight = np.zeros((c_out, c_in, k), dtype)  # taps that only read padding get zeros
    dbias = dy.sum(axis=(0, 1), dtype=np.float64).astype(dtype) if bias else None
    if not active or batch * n == 0:
        return np.zeros_like(x), dweight, dbias
    w = np.asarray(weight, dtype)[:, :, active]  # (C_out, C_in, A)
    w_cat = np.ascontiguousarray(w.transpose(2, 0, 1)).reshape(len(active) * c_out, c_in)  # (A*C_out, C_in)
    dy_taps = np.empty((batch, n, len(active), c_out), dtype)
    _shifted_gather(dy, shifts[active], dy_taps)
    dx, dw_cat, _ = linear_backward(x.reshape(batch * n, c_in), w_cat,
                                    dy_taps.reshape(batch * n, len(active) * c_out), bias=False)
    dweight[:, :, active] = dw_cat.reshape(len(active), c_out, c_in).transpose(1, 2, 0)
    return dx.reshape(batch, n, c_in), dweight, dbias


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _glu_backward(x2, dy2, dx2):
    """da = dy * sigmoid(b), db = dy * a * sigmoid(b) * (1 - sigmoid(b)) for x = [a, b]."""
    rows, half = dy2.shape
    one = x2.dtype.type(1.0)
    for r in prange(rows):
        a, g, d = x2[r, :half], x2[r, half:], dy2[r]
        da, db = dx2[r, :half], dx2[r, half:]
        for j in range(half):
            sg = sigmoid(g[j])
            da[j] = d[j] * sg
            db[j] = d[j] * a[j] * sg * (one - sg)


def glu_backward(x, dy):
    """dx of GLU(x) = a * sigmoid(b), x = [a, b] on the last axis."""
    x = np.ascontiguousarray(x)
    half = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = np.ascontiguousarray(dy, x.dtype).reshape(-1, half)
    dx = np.empty_like(x2)
    _glu_backward(x2, dy2, dx)
    return dx.reshape(x.shape)
