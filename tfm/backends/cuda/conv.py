"""1-D convolution (dilated, zero-padded, stride 1) and the gated linear unit on the GPU.

Variants (``VARIANTS``):

* ``im2col_gemm`` — an im2col kernel gathers, for every output position, the k dilated
  input rows (zeros in the padding) into a (B*N_out, C_in*k) matrix, laid out to match
  PyTorch's (C_out, C_in, k) weight viewed as (C_out, C_in*k); the tiled GEMM of
  ``linear.py`` then does all the arithmetic with the bias fused. Costs k times the input
  in temporary memory, buys the GEMM's register blocking. Verdict: correct under the
  simulator and on the first GPU run; not yet timed on a GPU.
* ``glu`` — one thread per output element: a * sigmoid(b) for x = [a, b].
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from ._launch import grid_1d, launch, numba_dtype
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
