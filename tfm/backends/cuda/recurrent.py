"""Elman RNN, LSTM and GRU layers on the GPU (PyTorch gate layouts; batch-first).

Variant (``VARIANTS``): ``gemm_then_steps`` — the input projections of all time steps are
one tiled GEMM (``x @ W_ih^T + b_ih``, the parallel part); the recurrence then runs one
small kernel launch per time step, one thread per (batch, hidden unit), each computing its
gates' dot products with h_{t-1} and the cell update. W_hh is transposed once per call to
(H, G*H) so that the threads of a warp read consecutive weights (coalesced) while
h_{t-1}[b, :] is a broadcast read. h and c are double-buffered on the device; nothing
returns to the host between steps. The n dependent launches are the sequential
bottleneck Table 1 is about (O(n) sequential operations). Verdict: correct under the
simulator and on the H200 (LSTM and GRU at B=4, n=1000, d=512; ``python3 -m studies.gpu``,
results/gpu/correctness.csv). The peers study (results/gpu/studies.csv, study=peers; time
ratio = tfm time / peer time, bootstrap 95% interval) at B=64, n=256, d=512: 3.65 [3.62,
3.71] against nn.LSTM, 4.73 [4.67, 4.84] against nn.GRU. The sequential study (same file,
study=sequential; LSTM, d=64): 0.94 ms at n=16 to 210.7 ms at n=8192 at batch 1, 201.3 ms
at n=8192 at batch 64: the time grows with n whatever the batch.

Training (``*_layer_train`` / ``*_layer_backward``, backpropagation through time): the train
forward is the same launches with each step also writing what the reverse sweep needs (LSTM:
the activated gates i, f, g, o and the cell state; GRU: r, z, n and W_hn h + b_hn; RNN: the
outputs suffice). The reverse sweep is one launch per step, t = n-1 .. 0, one thread per
(batch, hidden unit): dh_t = dout_t + (the next step's gate-input gradients) W_hh (a dot
product over the G*H gates, W_hh read along its rows by consecutive threads: coalesced) (+
dh_{t+1} z_{t+1} for the GRU), then the gate-input gradients of step t from the saved gates,
and the cell carry dc (LSTM) kept per thread in a (B, H) buffer. Nothing returns to the host
between steps. Then dx = dA W_ih and the weight gradients dW_ih = dA^T x, dW_hh = dA^T h_prev
are one product each over all B*N steps (the backend's GEMM), the biases' column sums of dA.
Verdict: correct under the simulator and on the H200 (LSTM BPTT at B=4, n=1000, d=512 in
results/gpu/correctness.csv; RNN and LSTM backward in smoke.csv; the GRU's through the peers
study's check against torch.autograd, rel. err 8.9e-07). Forward + backward time ratio
(peers, as above, B=64, n=256, d=512): 4.26 [4.11, 4.30] against nn.LSTM, 4.05 [3.97, 4.18]
against nn.GRU.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from numba import cuda

from ._launch import grid_1d, launch, numba_dtype
from ._views import c_view
from .linear import contiguous, linear

VARIANTS = {"gemm_then_steps": "one GEMM for all input projections, one launch per step",
            "bptt_steps_then_gemm": "backward: one launch per step in reverse, then one GEMM per weight gradient"}

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
def _step_kernel(dtype, kind: int, save: bool = False):
    """One time step; ``save``: also write what backpropagation through time needs into
    ``gates`` (B, N, G*H) (activated gates) and ``aux`` (B, N, H) (LSTM: c_t; GRU: W_hn h + b_hn)."""
    dt = numba_dtype(dtype)
    one, zero = dt(1.0), dt(0.0)

    @cuda.jit(device=True)
    def sigmoid(z):
        return one / (one + math.exp(-z))

    @cuda.jit(cache=True)
    def step(gx, t, h_prev, c_prev, w_t, b_hh, out, h_next, c_next, gates, aux):
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
            if save:
                gates[b, t, j] = ig
                gates[b, t, hid + j] = fg
                gates[b, t, 2 * hid + j] = gg
                gates[b, t, 3 * hid + j] = og
                aux[b, t, j] = cn
        else:  # GRU: r, z, n; the hidden bias of n sits inside r * (.)
            r = sigmoid(gx[b, t, j] + s0)
            z = sigmoid(gx[b, t, hid + j] + s1)
            nn = math.tanh(gx[b, t, 2 * hid + j] + r * s2)
            hn = (one - z) * nn + z * h_prev[b, j]
            if save:
                gates[b, t, j] = r
                gates[b, t, hid + j] = z
                gates[b, t, 2 * hid + j] = nn
                aux[b, t, j] = s2
        h_next[b, j] = hn
        out[b, t, j] = hn

    return step


_GATES = {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}


@lru_cache(maxsize=None)
def _placeholder3(dtype):
    return cuda.to_device(np.zeros((1, 1, 1), dtype=dtype))


def _run(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl, save: bool = False):
    """The layer's forward; with ``save`` -> (out, h_n, c_n, gates, aux) (see :func:`_step_kernel`)."""
    bsz, n, _ = x.shape
    hid = h0.shape[1]
    dtype = np.dtype(x.dtype)
    if n == 0:
        raise ValueError(f"{kind} layer: the sequence is empty (N = 0)")
    gx = linear(x, w_ih, b_ih, tuning, gemm_impl)  # (B, N, G*H): all steps at once
    w_t = cuda.device_array((w_hh.shape[1], w_hh.shape[0]), dtype=dtype)
    launch("transpose", _transpose_kernel(), grid_1d(w_hh.size, tuning.elem_threads),
           tuning.elem_threads, w_hh, w_t)
    out = cuda.device_array((bsz, n, hid), dtype=dtype)
    h_bufs = (h0, cuda.device_array((bsz, hid), dtype=dtype), cuda.device_array((bsz, hid), dtype=dtype))
    c_bufs = (c0, cuda.device_array((bsz, hid), dtype=dtype), cuda.device_array((bsz, hid), dtype=dtype))
    save = bool(save) and kind in ("lstm", "gru")  # the RNN's backward needs only its outputs
    gates = cuda.device_array((bsz, n, _GATES[kind] * hid), dtype=dtype) if save else _placeholder3(dtype)
    aux = cuda.device_array((bsz, n, hid), dtype=dtype) if save else _placeholder3(dtype)
    kern = _step_kernel(dtype, _KIND[kind], save)
    grid = grid_1d(bsz * hid, tuning.step_threads)
    for t in range(n):  # buffer 0 is the initial state; then 1, 2, 1, 2, ...
        src = 0 if t == 0 else 1 + (t - 1) % 2
        dst = 1 + t % 2
        launch(f"{kind}_step", kern, grid, tuning.step_threads, gx, t, h_bufs[src], c_bufs[src],
               w_t, b_hh, out, h_bufs[dst], c_bufs[dst], gates, aux)
    last = 1 + (n - 1) % 2
    return out, h_bufs[last], c_bufs[last], gates, aux


def rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, tuning, gemm_impl="numba"):
    out, h = _run(nonlinearity, x, h0, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)[:2]
    return out, h


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl="numba"):
    return _run("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)[:3]


def gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl="numba"):
    out, h = _run("gru", x, h0, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)[:2]
    return out, h


# ---------------------------------------------------------------------- training
class Saved(NamedTuple):
    """What backpropagation through time needs (device arrays), opaque to the caller."""

    kind: str  # "tanh", "relu", "lstm" or "gru"
    x: object  # (B, N, I)
    h0: object  # (B, H)
    c0: object  # (B, H) (LSTM; h0 otherwise)
    w_ih: object  # (G*H, I)
    w_hh: object  # (G*H, H)
    gates: object  # (B, N, G*H) activated gates (LSTM, GRU; a placeholder for the RNN)
    aux: object  # (B, N, H): LSTM c_t, GRU W_hn h_{t-1} + b_hn (a placeholder for the RNN)
    out: object  # (B, N, H): h_1 .. h_n


def _train(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl):
    x = contiguous(x, tuning)
    out, h, c, gates, aux = _run(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl, save=True)
    return out, h, c, Saved(kind, x, h0, c0, w_ih, w_hh, gates, aux, out)


def rnn_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, tuning, gemm_impl="numba"):
    out, h, _, saved = _train(nonlinearity, x, h0, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)
    return out, h, saved


def lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl="numba"):
    return _train("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)


def gru_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl="numba"):
    out, h, _, saved = _train("gru", x, h0, h0, w_ih, w_hh, b_ih, b_hh, tuning, gemm_impl)
    return out, h, saved


@lru_cache(maxsize=None)
def _bptt_step_kernel(dtype, kind: int):
    """Reverse step t for thread (b, j): dh_t from the step after (dA_{t+1} W_hh, + dh_{t+1}
    z_{t+1} for the GRU) or dh_n at the last step, plus dout_t; then the gate-input gradients of
    step t into dgi/dgh (the same array but for the GRU) and the carries (LSTM dc, GRU dh)."""
    dt = numba_dtype(dtype)
    one, zero = dt(1.0), dt(0.0)

    @cuda.jit(cache=True)
    def bptt_step(t, dout, dh_n, dc_n, w_hh, gates, aux, out, h0, c0, carry, dgi, dgh):
        i = cuda.grid(1)
        bsz, hid = h0.shape
        if i >= bsz * hid:
            return
        b = i // hid
        j = i % hid
        n = out.shape[1]
        g_all = w_hh.shape[0]
        if t == n - 1:
            dh = dh_n[b, j]
        else:
            dh = zero
            for g in range(g_all):
                dh += dgh[b, t + 1, g] * w_hh[g, j]
            if kind == 3:
                dh += carry[b, j] * gates[b, t + 1, hid + j]
        dh += dout[b, t, j]
        if kind == 0:  # tanh: 1 - h^2
            hv = out[b, t, j]
            dgi[b, t, j] = dh * (one - hv * hv)
        elif kind == 1:  # relu
            dgi[b, t, j] = dh if out[b, t, j] > zero else zero
        elif kind == 2:  # LSTM
            ig = gates[b, t, j]
            fg = gates[b, t, hid + j]
            gg = gates[b, t, 2 * hid + j]
            og = gates[b, t, 3 * hid + j]
            c_prev = c0[b, j] if t == 0 else aux[b, t - 1, j]
            tanh_c = math.tanh(aux[b, t, j])
            dc = dc_n[b, j] if t == n - 1 else carry[b, j]
            dc += dh * og * (one - tanh_c * tanh_c)
            dgi[b, t, j] = dc * gg * ig * (one - ig)
            dgi[b, t, hid + j] = dc * c_prev * fg * (one - fg)
            dgi[b, t, 2 * hid + j] = dc * ig * (one - gg * gg)
            dgi[b, t, 3 * hid + j] = dh * tanh_c * og * (one - og)
            carry[b, j] = dc * fg
        else:  # GRU
            r = gates[b, t, j]
            z = gates[b, t, hid + j]
            nn = gates[b, t, 2 * hid + j]
            h_prev = h0[b, j] if t == 0 else out[b, t - 1, j]
            da_n = dh * (one - z) * (one - nn * nn)
            da_r = da_n * aux[b, t, j] * r * (one - r)
            da_z = dh * (h_prev - nn) * z * (one - z)
            dgi[b, t, j] = da_r
            dgi[b, t, hid + j] = da_z
            dgi[b, t, 2 * hid + j] = da_n
            dgh[b, t, j] = da_r
            dgh[b, t, hid + j] = da_z
            dgh[b, t, 2 * hid + j] = da_n * r
            carry[b, j] = dh

    return bptt_step


@lru_cache(maxsize=None)
def _bptt_dh0_kernel(dtype, kind: int):
    """dh0 = dA_0 W_hh (+ dh_0 z_0 for the GRU), after the last reverse step."""
    dt = numba_dtype(dtype)

    @cuda.jit(cache=True)
    def dh0_(w_hh, gates, carry, dgh, dh0):
        i = cuda.grid(1)
        bsz, hid = dh0.shape
        if i < bsz * hid:
            b = i // hid
            j = i % hid
            acc = dt(0.0)
            for g in range(w_hh.shape[0]):
                acc += dgh[b, 0, g] * w_hh[g, j]
            if kind == 3:
                acc += carry[b, j] * gates[b, 0, hid + j]
            dh0[b, j] = acc

    return dh0_


@lru_cache(maxsize=None)
def _previous_states_kernel():
    @cuda.jit(cache=True)
    def previous(h0, out, h_prev):  # h_prev[:, 0] = h0, h_prev[:, t] = out[:, t - 1]
        i = cuda.grid(1)
        bsz, n, hid = out.shape
        if i < bsz * n * hid:
            j = i % hid
            t = (i // hid) % n
            b = i // (hid * n)
            h_prev[b, t, j] = h0[b, j] if t == 0 else out[b, t - 1, j]

    return previous


def _backward(saved, dout, dh_n, dc_n, tuning, gemm_impl):
    from .linear import column_sums, matmul_into
    from .training import zeros

    kind, x, h0, c0, w_ih, w_hh, gates, aux, out = saved
    bsz, n, hid = out.shape
    g_all = w_hh.shape[0]
    dtype = np.dtype(out.dtype)
    for name, a, shape in (("dout", dout, (bsz, n, hid)), ("dh_n", dh_n, (bsz, hid)), ("dc_n", dc_n, (bsz, hid))):
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"{kind} backward: {name} must have shape {shape}, got {tuple(a.shape)}")
    dout = zeros((bsz, n, hid), dtype, tuning) if dout is None else contiguous(dout, tuning)
    dh_n = zeros((bsz, hid), dtype, tuning) if dh_n is None else dh_n
    dc_n = dh_n if kind != "lstm" else (zeros((bsz, hid), dtype, tuning) if dc_n is None else dc_n)
    dgi = cuda.device_array((bsz, n, g_all), dtype=dtype)
    dgh = cuda.device_array((bsz, n, g_all), dtype=dtype) if kind == "gru" else dgi
    carry = cuda.device_array((bsz, hid), dtype=dtype)
    kern = _bptt_step_kernel(dtype, _KIND[kind])
    grid = grid_1d(bsz * hid, tuning.step_threads)
    for t in reversed(range(n)):  # n dependent launches: the sequential part of the backward
        launch(f"{kind}_bptt_step", kern, grid, tuning.step_threads, t, dout, dh_n, dc_n, w_hh, gates, aux, out,
               h0, c0, carry, dgi, dgh)
    dh0 = cuda.device_array((bsz, hid), dtype=dtype)
    launch(f"{kind}_bptt_dh0", _bptt_dh0_kernel(dtype, _KIND[kind]), grid, tuning.step_threads, w_hh, gates,
           carry, dgh, dh0)
    h_prev = cuda.device_array((bsz, n, hid), dtype=dtype)
    launch("previous_states", _previous_states_kernel(), grid_1d(h_prev.size, tuning.elem_threads),
           tuning.elem_threads, h0, out, h_prev)
    rows, n_in = bsz * n, x.shape[2]
    dgi2, dgh2 = c_view(dgi, (rows, g_all)), c_view(dgh, (rows, g_all))
    dx = cuda.device_array((rows, n_in), dtype=dtype)
    dw_ih = cuda.device_array((g_all, n_in), dtype=dtype)
    dw_hh = cuda.device_array((g_all, hid), dtype=dtype)
    matmul_into(dgi2, w_ih, dx, tuning, gemm_impl)  # dx = dA W_ih
    matmul_into(dgi2, c_view(x, (rows, n_in)), dw_ih, tuning, gemm_impl, trans_a=True)  # dW_ih = dA^T x
    matmul_into(dgh2, c_view(h_prev, (rows, hid)), dw_hh, tuning, gemm_impl, trans_a=True)  # dW_hh
    db_ih = column_sums(dgi2, tuning)
    db_hh = column_sums(dgh2, tuning) if kind == "gru" else db_ih
    dx = c_view(dx, (bsz, n, n_in))
    if kind == "lstm":
        return dx, dh0, carry, dw_ih, dw_hh, db_ih, db_hh
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


def rnn_layer_backward(saved, dout, dh_n, tuning, gemm_impl="numba"):
    return _backward(saved, dout, dh_n, None, tuning, gemm_impl)


def lstm_layer_backward(saved, dout, dh_n, dc_n, tuning, gemm_impl="numba"):
    return _backward(saved, dout, dh_n, dc_n, tuning, gemm_impl)


def gru_layer_backward(saved, dout, dh_n, tuning, gemm_impl="numba"):
    return _backward(saved, dout, dh_n, None, tuning, gemm_impl)
