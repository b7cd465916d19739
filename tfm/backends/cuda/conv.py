"""1-D convolution (dilated, zero-padded, stride 1) and the gated linear unit on the GPU.

Variants (``VARIANTS``):

* ``im2col_gemm`` — an im2col kernel gathers, for every output position, the k dilated
  input rows (zeros in the padding) into a (B*N_out, C_in*k) matrix, laid out to match
  PyTorch's (C_out, C_in, k) weight viewed as (C_out, C_in*k); the tiled GEMM of
  ``linear.py`` then does all the arithmetic with the bias fused. Costs k times the input
  in temporary memory, buys the GEMM's register blocking. Verdict: correct under the
  simulator and on the H200 (``python3 -m studies.gpu``: results/gpu/smoke.csv, and
  correctness.csv at B=4, n=1000, d=512, k=3, dilation 4); time ratio (tfm time /
  nn.Conv1d's) 2.15 [2.14, 2.20] at B=8, n=2048, d=512, k=3 (results/gpu/studies.csv,
  study=peers, bootstrap 95% interval).
* ``glu`` — one thread per output element: a * sigmoid(b) for x = [a, b].

Backward (same variants): the im2col form makes each gradient one product. With dY
(B*N_out, C_out) and W viewed as (C_out, C_in*k): dcols = dY W (one GEMM), then a col2im
gather, one thread per element of dx, sums the k taps that read it (no atomics:
deterministic); dW = dY^T cols (cols recomputed by the forward's im2col; one GEMM with A
transposed), db = column sums of dY. The GEMMs go through the backend's GEMM (cuBLAS when
it is the default). ``glu_backward``: one thread per output pair, da = dy s(b), db = dy a
s(b)(1 - s(b)). Verdict: correct under the simulator; not yet run on a GPU (the H200
run's smoke and correctness checks have no conv1d or GLU backward).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from ._launch import grid_1d, launch, numba_dtype
from ._views import c_view
from .linear import gemm

VARIANTS = {"im2col_gemm": "im2col gather + tiled GEMM with fused bias", "glu": "elementwise"}


@lru_cache(maxsize=None)
def _im2col_kernel(dtype):
    dt = numba_dtype(dtype)

    @cuda.jit(cache=True)
    def im2col(x, cols, n_out, k, dilation, pad_left):
        # cols[b*n_out + t, c*k + j] = x[b, t + j*dilation - pad_left, c] (0 outside x)
        i = cuda.grid(1)
        ncol = cols.shape[1]
        if i < cols.shape[0] * ncol:
            row = i // ncol
            col = i % ncol
            b = row // n_out
            t = row % n_out
            c = col // k
            p = t + (col % k) * dilation - pad_left
            val = dt(0.0)
            if 0 <= p < x.shape[1]:
                val = x[b, p, c]
            cols[row, col] = val

    return im2col


@lru_cache(maxsize=None)
def _glu_kernel(dtype):
    one = numba_dtype(dtype)(1.0)

    @cuda.jit(cache=True)
    def glu_(x, out):  # x (R, 2C) -> out (R, C)
        i = cuda.grid(1)
        half = out.shape[1]
        if i < out.shape[0] * half:
            r = i // half
            c = i % half
            out[r, c] = x[r, c] * (one / (one + math.exp(-x[r, c + half])))

    return glu_


def conv1d(x, weight, bias, dilation, pad_left, pad_right, tuning):
    b, n, c_in = x.shape
    c_out, _, k = weight.shape
    n_out = n + pad_left + pad_right - dilation * (k - 1)
    dtype = np.dtype(x.dtype)
    cols = cuda.device_array((b * n_out, c_in * k), dtype=dtype)
    launch("im2col", _im2col_kernel(dtype), grid_1d(cols.size, tuning.elem_threads),
           tuning.elem_threads, x, cols, n_out, k, dilation, pad_left)
    out = cuda.device_array((1, b * n_out, c_out), dtype=dtype)
    gemm(cols.reshape(1, b * n_out, c_in * k), weight.reshape(1, c_out, c_in * k), out, tuning,
         trans_b=True, bias=bias)
    return out.reshape(b, n_out, c_out)


def glu(x, tuning):
    d = tuple(x.shape)[-1]
    rows = x.size // d
    lead = tuple(x.shape)[:-1]
    out = cuda.device_array((rows, d // 2), dtype=x.dtype)
    launch("glu", _glu_kernel(np.dtype(x.dtype)), grid_1d(out.size, tuning.elem_threads),
           tuning.elem_threads, x.reshape(rows, d), out)
    return out.reshape(lead + (d // 2,))


# ---------------------------------------------------------------------- backward
@lru_cache(maxsize=None)
def _col2im_kernel(dtype):
    dt = numba_dtype(dtype)

    @cuda.jit(cache=True)
    def col2im(dcols, dx, n_out, k, dilation, pad_left):
        # dx[b, p, c] = sum over taps j with t = p + pad_left - j*dilation in [0, n_out) of
        # dcols[b*n_out + t, c*k + j]: the transpose of im2col, gathered (no atomics)
        i = cuda.grid(1)
        n, c_in = dx.shape[1], dx.shape[2]
        if i < dx.shape[0] * n * c_in:
            c = i % c_in
            p = (i // c_in) % n
            b = i // (c_in * n)
            acc = dt(0.0)
            for j in range(k):
                t = p + pad_left - j * dilation
                if 0 <= t < n_out:
                    acc += dcols[b * n_out + t, c * k + j]
            dx[b, p, c] = acc

    return col2im


def conv1d_backward(x, weight, dy, dilation, pad_left, pad_right, bias, tuning, gemm_impl="numba"):
    """(dx (B, N, C_in), dweight (C_out, C_in, k), dbias (C_out,) or None) of :func:`conv1d`."""
    from .linear import column_sums, contiguous, matmul_into

    b, n, c_in = x.shape
    c_out, _, k = weight.shape
    n_out = n + pad_left + pad_right - dilation * (k - 1)
    if tuple(dy.shape) != (b, n_out, c_out):
        raise ValueError(f"conv1d_backward: dy must have shape {(b, n_out, c_out)}, got {tuple(dy.shape)}")
    dtype = np.dtype(x.dtype)
    x = contiguous(x, tuning)
    dy2 = c_view(contiguous(dy, tuning), (b * n_out, c_out))
    w2 = c_view(weight, (c_out, c_in * k))
    dcols = cuda.device_array((b * n_out, c_in * k), dtype=dtype)
    matmul_into(dy2, w2, dcols, tuning, gemm_impl)  # dcols = dY W
    dx = cuda.device_array((b, n, c_in), dtype=dtype)
    if dx.size:
        launch("col2im", _col2im_kernel(dtype), grid_1d(dx.size, tuning.elem_threads), tuning.elem_threads,
               dcols, dx, n_out, k, dilation, pad_left)
    cols = cuda.device_array((b * n_out, c_in * k), dtype=dtype)
    if cols.size:
        launch("im2col", _im2col_kernel(dtype), grid_1d(cols.size, tuning.elem_threads), tuning.elem_threads,
               x, cols, n_out, k, dilation, pad_left)
    dw = cuda.device_array((c_out, c_in * k), dtype=dtype)
    matmul_into(dy2, cols, dw, tuning, gemm_impl, trans_a=True)  # dW = dY^T cols
    db = column_sums(dy2, tuning) if bias else None
    return dx, c_view(dw, (c_out, c_in, k)), db


@lru_cache(maxsize=None)
def _glu_backward_kernel(dtype):
    one = numba_dtype(dtype)(1.0)

    @cuda.jit(cache=True)
    def glu_backward_(x, dy, dx):  # x (R, 2C), dy (R, C) -> dx (R, 2C)
        i = cuda.grid(1)
        half = dy.shape[1]
        if i < dy.shape[0] * half:
            r = i // half
            c = i % half
            s = one / (one + math.exp(-x[r, c + half]))
            g = dy[r, c]
            dx[r, c] = g * s
            dx[r, c + half] = g * x[r, c] * s * (one - s)

    return glu_backward_


def glu_backward(x, dy, tuning):
    """dx of :func:`glu` given dy."""
    from .linear import contiguous

    d = tuple(x.shape)[-1]
    lead = tuple(x.shape)[:-1]
    if d % 2 or tuple(dy.shape) != lead + (d // 2,):
        raise ValueError(f"glu_backward: dy must have shape {lead + (d // 2,)}, got {tuple(dy.shape)}")
    rows = x.size // d if d else 0
    x2 = c_view(contiguous(x, tuning), (rows, d))
    dy2 = c_view(contiguous(dy, tuning), (rows, d // 2))
    dx = cuda.device_array((rows, d), dtype=x.dtype)
    if dy2.size:
        launch("glu_backward", _glu_backward_kernel(np.dtype(x.dtype)), grid_1d(dy2.size, tuning.elem_threads),
               tuning.elem_threads, x2, dy2, dx)
    return c_view(dx, tuple(x.shape))
