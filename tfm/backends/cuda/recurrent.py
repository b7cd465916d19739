"""Elman RNN, LSTM and GRU layers on the GPU (PyTorch gate layouts; batch-first).

Variant (``VARIANTS``): ``gemm_then_steps`` — the input projections of all time steps are
one tiled GEMM (``x @ W_ih^T + b_ih``, the parallel part); the recurrence then runs one
small kernel launch per time step, one thread per (batch, hidden unit), each computing its
gates' dot products with h_{t-1} and the cell update. W_hh is transposed once per call to
(H, G*H) so that the threads of a warp read consecutive weights (coalesced) while
h_{t-1}[b, :] is a broadcast read. h and c are double-buffered on the device; nothing
returns to the host between steps. The n dependent launches are the sequential
bottleneck Table 1 is about (O(n) sequential operations). Verdict: correct under the
simulator and on the first GPU run; not yet timed on a GPU.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from ._launch import grid_1d, launch, numba_dtype
from .linear import linear

VARIANTS = {"gemm_then_steps": "one GEMM for all input projections, one launch per step"}

_KIND = {"tanh": 0, "relu": 1, "lstm": 2, "gru": 3}


@lru_cache(maxsize=None)
def _transpose_kernel():
    @cuda.jit(cache=True)
    def transpose(a, out):  # a (R, C) -> out (C, R)
        i = cuda.grid(1)
        r, c = a.shape
        if i < r * c:
            out[i % c, i // c] = a[i // c, i % c]

    return transpose


@lru_cache(maxsize=None)
def _step_kernel(dtype, kind: int):
    dt = numba_dtype(dtype)
    one, zero = dt(1.0), dt(0.0)

    @cuda.jit(device=True)
    def sigmoid(z):
        return one / (one + math.exp(-z))

    @cuda.jit(cache=True)
    def step(gx, t, h_prev, c_prev, w_t, b_hh, out, h_next, c_next):
        # gx (B, N, G*H) holds x_t W_ih^T + b_ih; w_t (H, G*H) = W_hh^T
        i = cuda.grid(1)
        bsz, hid = h_prev.shape
        if i >= bsz * hid:
            return
        b = i // hid
        j = i % hid
        s0 = b_hh[j]
        s1 = zero
        s2 = zero
        s3 = zero
        if kind >= 2:
            s1 = b_hh[hid + j]
            s2 = b_hh[2 * hid + j]
        if kind == 2:
            s3 = b_hh[3 * hid + j]
        for kk in range(hid):
            hv = h_prev[b, kk]
            s0 += hv * w_t[kk, j]
            if kind >= 2:
                s1 += hv * w_t[kk, hid + j]
                s2 += hv * w_t[kk, 2 * hid + j]
            if kind == 2:
                s3 += hv * w_t[kk, 3 * hid + j]
        if kind == 0:
            hn = math.tanh(gx[b, t, j] + s0)
        elif kind == 1:
            hn = max(gx[b, t, j] + s0, zero)
        elif kind == 2:  # LSTM: i, f, g, o
            ig = sigmoid(gx[b, t, j] + s0)
            fg = sigmoid(gx[b, t, hid + j] + s1)
            gg = math.tanh(gx[b, t, 2 * hid + j] + s2)
            og = sigmoid(gx[b, t, 3 * hid + j] + s3)
            cn = fg * c_prev[b, j] + ig * gg
            c_next[b, j] = cn
            hn = og * math.tanh(cn)
        else:  # GRU: r, z, n; the hidden bias of n sits inside r * (.)
            r = sigmoid(gx[b, t, j] + s0)
            z = sigmoid(gx[b, t, hid + j] + s1)
            nn = math.tanh(gx[b, t, 2 * hid + j] + r * s2)
            hn = (one - z) * nn + z * h_prev[b, j]
        h_next[b, j] = hn
        out[b, t, j] = hn

    return step


def _run(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl):
    bsz, n, _ = x.shape
    hid = h0.shape[1]
    dtype = np.dtype(x.dtype)
    gx = linear(x, w_ih, b_ih, tuning, gemm_impl)  # (B, N, G*H): all steps at once
    w_t = cuda.device_array((w_hh.shape[1], w_hh.shape[0]), dtype=dtype)
    launch("transpose", _transpose_kernel(), grid_1d(w_hh.size, tuning.elem_threads),
           tuning.elem_threads, w_hh, w_t)
    out = cuda.device_array((bsz, n, hid), dtype=dtype)
    h_bufs = (h0, cuda.device_array((bsz, hid), dtype=dtype), cuda.device_array((bsz, hid), dtype=dtype))
    c_bufs = (c0, cuda.device_array((bsz, hid), dtype=dtype), cuda.device_array((bsz, hid), dtype=dtype))
    kern = _step_kernel(dtype, _KIND[kind])
    grid = grid_1d(bsz * hid, tuning.step_threads)
    for t in range(n):  # buffer 0 is the initial state; then 1, 2, 1, 2, ...
        src = 0 if t == 0 else 1 + (t - 1) % 2
        dst = 1 + t % 2
        launch(f"{kind}_step", kern, grid, tuning.step_threads, gx, t, h_bufs[src], c_bufs[src],
               w_t, b_hh, out, h_bufs[dst], c_bufs[dst])
    last = 1 + (n - 1) % 2
    return out, h_bufs[last], c_bufs[last]


def rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, tuning, gemm_impl="numba"):
    out, h, _ = _run(nonlinearity, x, h0, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)
    return out, h


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl="numba"):
    return _run("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)


def gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl="numba"):
    out, h, _ = _run("gru", x, h0, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)
    return out, h
