"""Table 1's other layers in float64 NumPy: recurrent, convolutional, restricted attention.

Equations and gate layouts follow PyTorch's documentation (nn.RNN, nn.LSTM, nn.GRU,
nn.Conv1d) so that weights carry over; sequences are batch-first (B, N, features).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .transformer import (
    _check_shape,
    _f64,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_train,
)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# Backpropagation through time: every ``*_layer_train`` runs the forward recurrence and keeps,
# per step, what the reverse sweep needs (the ``*Saved`` tuples below). The reverse sweep is
# sequential only in dh (and dc): each step's gate-input gradients are stored, and the weight
# gradients and dx are then one product each over all B*N steps (``_batched_grads``).


def _previous_states(h0, out):
    """h_{t-1} for t = 1..n: (B, N, H) = [h0, h_1, ..., h_{n-1}]."""
    return np.concatenate([h0[:, None], out[:, :-1]], axis=1)  # (B, N, H)


def _cotangents(out, h_n_shape, dout, dh_n):
    """dout (B, N, H) and dh_n (B, H) as float64 arrays, None meaning zeros; shapes checked."""
    dout = np.zeros_like(out) if dout is None else _f64(dout)  # (B, N, H)
    dh_n = np.zeros(h_n_shape) if dh_n is None else _f64(dh_n)  # (B, H)
    _check_shape("dout", dout, out.shape)
    _check_shape("dh_n", dh_n, h_n_shape)
    return dout, dh_n


def _batched_grads(x, h_prev, w_ih, dgi, dgh):
    """dx, dW_ih, dW_hh, db_ih, db_hh from the per-step gradients of the gate inputs
    gi = x_t W_ih^T + b_ih and gh = h_{t-1} W_hh^T + b_hh, each one product over all steps."""
    g = dgi.shape[-1]
    dgi_rows, dgh_rows = dgi.reshape(-1, g), dgh.reshape(-1, g)  # (B*N, G)
    dx = dgi @ w_ih  # (B, N, I)
    dw_ih = dgi_rows.T @ x.reshape(-1, x.shape[-1])  # (G, I)
    dw_hh = dgh_rows.T @ h_prev.reshape(-1, h_prev.shape[-1])  # (G, H)
    return dx, dw_ih, dw_hh, dgi_rows.sum(axis=0), dgh_rows.sum(axis=0)


def rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity: str = "tanh"):
    """h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh); returns (out (B, N, H), h_n)."""
    act = np.tanh if nonlinearity == "tanh" else (lambda z: np.maximum(z, 0.0))
    x, h = _f64(x), _f64(h0)  # (B, N, I), (B, H)
    w_ih, w_hh, b_ih, b_hh = _f64(w_ih), _f64(w_hh), _f64(b_ih), _f64(b_hh)
    out = np.empty((x.shape[0], x.shape[1], h.shape[1]))  # (B, N, H)
    for t in range(x.shape[1]):  # n sequential steps: the recurrence cannot be parallelised
        h = act(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)  # (B, H)
        out[:, t] = h
    return out, h


class RNNSaved(NamedTuple):
    """What ``rnn_layer_backward`` needs: the inputs and every hidden state."""

    x: np.ndarray  # (B, N, I)
    h0: np.ndarray  # (B, H)
    w_ih: np.ndarray  # (H, I)
    w_hh: np.ndarray  # (H, H)
    out: np.ndarray  # (B, N, H): h_1 .. h_n
    nonlinearity: str  # "tanh" or "relu"


def rnn_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity: str = "tanh"):
    """``rnn_layer`` that also returns what its backward needs -> (out, h_n, RNNSaved)."""
    out, h_n = rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)  # (B, N, H), (B, H)
    return out, h_n, RNNSaved(_f64(x), _f64(h0), _f64(w_ih), _f64(w_hh), out, nonlinearity)


def rnn_layer_backward(saved: RNNSaved, dout, dh_n):
    """Backpropagation through time for h_t = act(a_t), a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh:

    for t = n .. 1:  dh_t += dout_t;  da_t = dh_t * act'(a_t);  dh_{t-1} = da_t W_hh
    (tanh' = 1 - h_t^2, relu' = [h_t > 0]); then dx = da W_ih and the weight gradients over all
    steps at once. dout (B, N, H), dh_n (B, H), None = zeros
    -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh).
    """
    x, h0, w_ih, w_hh, out, nonlinearity = saved
    dout, dh = _cotangents(out, h0.shape, dout, dh_n)  # (B, N, H), (B, H)
    da = np.empty_like(out)  # (B, N, H)
    for t in reversed(range(out.shape[1])):  # n sequential steps, in reverse
        dh = dh + dout[:, t]  # (B, H)
        h_t = out[:, t]  # (B, H)
        da[:, t] = dh * (1.0 - h_t * h_t) if nonlinearity == "tanh" else np.where(h_t > 0.0, dh, 0.0)
        dh = da[:, t] @ w_hh  # (B, H): dh_{t-1}
    dx, dw_ih, dw_hh, db_ih, db_hh = _batched_grads(x, _previous_states(h0, out), w_ih, da, da)
    return dx, dh, dw_ih, dw_hh, db_ih, db_hh


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """LSTM with PyTorch's gate order (i, f, g, o); returns (out, h_n, c_n)."""
    x, h, c = _f64(x), _f64(h0), _f64(c0)  # (B, N, I), (B, H), (B, H)
    w_ih, w_hh, b_ih, b_hh = _f64(w_ih), _f64(w_hh), _f64(b_ih), _f64(b_hh)
    hid = h.shape[1]
    out = np.empty((x.shape[0], x.shape[1], hid))  # (B, N, H)
    for t in range(x.shape[1]):
        gates = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H)
        i = _sigmoid(gates[:, 0 * hid:1 * hid])
        f = _sigmoid(gates[:, 1 * hid:2 * hid])
        g = np.tanh(gates[:, 2 * hid:3 * hid])
        o = _sigmoid(gates[:, 3 * hid:4 * hid])
        c = f * c + i * g  # (B, H)
        h = o * np.tanh(c)  # (B, H)
        out[:, t] = h
    return out, h, c


class LSTMSaved(NamedTuple):
    """What ``lstm_layer_backward`` needs: the inputs, every gate and every state."""

    x: np.ndarray  # (B, N, I)
    h0: np.ndarray  # (B, H)
    c0: np.ndarray  # (B, H)
    w_ih: np.ndarray  # (4H, I)
    w_hh: np.ndarray  # (4H, H)
    gates: np.ndarray  # (B, N, 4H): i, f, g, o after their sigmoid / tanh
    c: np.ndarray  # (B, N, H): c_1 .. c_n
    out: np.ndarray  # (B, N, H): h_1 .. h_n


def lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """``lstm_layer`` that also keeps its gates and cell states -> (out, h_n, c_n, LSTMSaved)."""
    x, h, c = _f64(x), _f64(h0), _f64(c0)  # (B, N, I), (B, H), (B, H)
    w_ih, w_hh, b_ih, b_hh = _f64(w_ih), _f64(w_hh), _f64(b_ih), _f64(b_hh)
    b, n, hid = x.shape[0], x.shape[1], h.shape[1]
    gates = np.empty((b, n, 4 * hid))  # (B, N, 4H)
    cells = np.empty((b, n, hid))  # (B, N, H)
    out = np.empty((b, n, hid))  # (B, N, H)
    for t in range(n):
        a = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H)
        i, f, o = _sigmoid(a[:, :hid]), _sigmoid(a[:, hid:2 * hid]), _sigmoid(a[:, 3 * hid:])  # (B, H)
        g = np.tanh(a[:, 2 * hid:3 * hid])  # (B, H)
        c = f * c + i * g  # (B, H)
        h = o * np.tanh(c)  # (B, H)
        gates[:, t] = np.concatenate([i, f, g, o], axis=1)
        cells[:, t], out[:, t] = c, h
    return out, h, c, LSTMSaved(x, _f64(h0), _f64(c0), w_ih, w_hh, gates, cells, out)


def lstm_layer_backward(saved: LSTMSaved, dout, dh_n, dc_n):
    """Backpropagation through time for c_t = f c_{t-1} + i g, h_t = o tanh(c_t):

    for t = n .. 1:  dh_t += dout_t;  dc_t += dh_t o (1 - tanh^2 c_t);
        di = dc_t g,  df = dc_t c_{t-1},  dg = dc_t i,  do = dh_t tanh c_t   (then through
        sigmoid' = s(1 - s) and tanh' = 1 - g^2 to the gate inputs da_t);
        dc_{t-1} = dc_t f,  dh_{t-1} = da_t W_hh.
    -> (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh); None cotangents are zeros.
    """
    x, h0, c0, w_ih, w_hh, gates, cells, out = saved
    dout, dh = _cotangents(out, h0.shape, dout, dh_n)  # (B, N, H), (B, H)
    dc = np.zeros(c0.shape) if dc_n is None else _f64(dc_n)  # (B, H)
    _check_shape("dc_n", dc, c0.shape)
    hid = h0.shape[1]
    da = np.empty_like(gates)  # (B, N, 4H)
    for t in reversed(range(out.shape[1])):
        i, f, g, o = (gates[:, t, j * hid:(j + 1) * hid] for j in range(4))  # (B, H) each
        c_prev = c0 if t == 0 else cells[:, t - 1]  # (B, H)
        tanh_c = np.tanh(cells[:, t])  # (B, H)
        dh = dh + dout[:, t]  # (B, H)
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)  # (B, H)
        da[:, t] = np.concatenate([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                                   dc * i * (1.0 - g * g), dh * tanh_c * o * (1.0 - o)], axis=1)
        dc = dc * f  # (B, H): dc_{t-1}
        dh = da[:, t] @ w_hh  # (B, H): dh_{t-1}
    dx, dw_ih, dw_hh, db_ih, db_hh = _batched_grads(x, _previous_states(h0, out), w_ih, da, da)
    return dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh


def gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh):
    """GRU with PyTorch's gate order (r, z, n); returns (out, h_n).

    r = s(W_ir x + b_ir + W_hr h + b_hr); z likewise; n = tanh(W_in x + b_in + r*(W_hn h + b_hn));
    h' = (1 - z) * n + z * h.
    """
    x, h = _f64(x), _f64(h0)
    w_ih, w_hh, b_ih, b_hh = _f64(w_ih), _f64(w_hh), _f64(b_ih), _f64(b_hh)
    hid = h.shape[1]
    out = np.empty((x.shape[0], x.shape[1], hid))
    for t in range(x.shape[1]):
        gi = x[:, t] @ w_ih.T + b_ih  # (B, 3H)
        gh = h @ w_hh.T + b_hh  # (B, 3H)
        r = _sigmoid(gi[:, :hid] + gh[:, :hid])
        z = _sigmoid(gi[:, hid:2 * hid] + gh[:, hid:2 * hid])
        n = np.tanh(gi[:, 2 * hid:] + r * gh[:, 2 * hid:])
        h = (1.0 - z) * n + z * h
        out[:, t] = h
    return out, h


class GRUSaved(NamedTuple):
    """What ``gru_layer_backward`` needs: the inputs, every gate and every state."""

    x: np.ndarray  # (B, N, I)
    h0: np.ndarray  # (B, H)
    w_ih: np.ndarray  # (3H, I)
    w_hh: np.ndarray  # (3H, H)
    gates: np.ndarray  # (B, N, 3H): r, z, n after their sigmoid / tanh
    hn: np.ndarray  # (B, N, H): W_hn h_{t-1} + b_hn, the part r gates
    out: np.ndarray  # (B, N, H): h_1 .. h_n


def gru_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh):
    """``gru_layer`` that also keeps its gates -> (out, h_n, GRUSaved)."""
    x, h = _f64(x), _f64(h0)  # (B, N, I), (B, H)
    w_ih, w_hh, b_ih, b_hh = _f64(w_ih), _f64(w_hh), _f64(b_ih), _f64(b_hh)
    b, n, hid = x.shape[0], x.shape[1], h.shape[1]
    gates = np.empty((b, n, 3 * hid))  # (B, N, 3H)
    hn = np.empty((b, n, hid))  # (B, N, H)
    out = np.empty((b, n, hid))  # (B, N, H)
    for t in range(n):
        gi = x[:, t] @ w_ih.T + b_ih  # (B, 3H)
        gh = h @ w_hh.T + b_hh  # (B, 3H)
        r = _sigmoid(gi[:, :hid] + gh[:, :hid])  # (B, H)
        z = _sigmoid(gi[:, hid:2 * hid] + gh[:, hid:2 * hid])  # (B, H)
        n_t = np.tanh(gi[:, 2 * hid:] + r * gh[:, 2 * hid:])  # (B, H)
        h = (1.0 - z) * n_t + z * h  # (B, H)
        gates[:, t] = np.concatenate([r, z, n_t], axis=1)
        hn[:, t], out[:, t] = gh[:, 2 * hid:], h
    return out, h, GRUSaved(x, _f64(h0), w_ih, w_hh, gates, hn, out)


def gru_layer_backward(saved: GRUSaved, dout, dh_n):
    """Backpropagation through time for h_t = (1 - z) n + z h_{t-1}, n = tanh(gi_n + r hn):

    for t = n .. 1:  dh_t += dout_t;  dn = dh_t (1 - z);  dz = dh_t (h_{t-1} - n);
        da_n = dn (1 - n^2);  dr = da_n hn;  da_r = dr r (1 - r);  da_z = dz z (1 - z);
        d(gi) = [da_r, da_z, da_n],  d(gh) = [da_r, da_z, da_n r];
        dh_{t-1} = dh_t z + d(gh) W_hh.
    -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh); None cotangents are zeros.
    """
    x, h0, w_ih, w_hh, gates, hn, out = saved
    dout, dh = _cotangents(out, h0.shape, dout, dh_n)  # (B, N, H), (B, H)
    hid = h0.shape[1]
    h_prev = _previous_states(h0, out)  # (B, N, H)
    dgi = np.empty_like(gates)  # (B, N, 3H)
    dgh = np.empty_like(gates)  # (B, N, 3H)
    for t in reversed(range(out.shape[1])):
        r, z, n_t = (gates[:, t, j * hid:(j + 1) * hid] for j in range(3))  # (B, H) each
        dh = dh + dout[:, t]  # (B, H)
        da_n = dh * (1.0 - z) * (1.0 - n_t * n_t)  # (B, H)
        da_r = da_n * hn[:, t] * r * (1.0 - r)  # (B, H)
        da_z = dh * (h_prev[:, t] - n_t) * z * (1.0 - z)  # (B, H)
        dgi[:, t] = np.concatenate([da_r, da_z, da_n], axis=1)
        dgh[:, t] = np.concatenate([da_r, da_z, da_n * r], axis=1)
        dh = dh * z + dgh[:, t] @ w_hh  # (B, H): dh_{t-1}
    dx, dw_ih, dw_hh, db_ih, db_hh = _batched_grads(x, h_prev, w_ih, dgi, dgh)
    return dx, dh, dw_ih, dw_hh, db_ih, db_hh


def conv1d(x, weight, bias=None, dilation: int = 1, pad_left: int = 0, pad_right: int = 0):
    """y[t, o] = b[o] + sum_{c, j} w[o, c, j] * x_pad[t + j*dilation, c]  (cross-correlation).

    x (B, N, C_in), weight (C_out, C_in, k) -> (B, N + pad_left + pad_right - dilation*(k-1), C_out).
    """
    x, w = _f64(x), _f64(weight)
    b, n, _ = x.shape
    c_out, _, k = w.shape
    xp = np.pad(x, ((0, 0), (pad_left, pad_right), (0, 0)))  # (B, N_pad, C_in)
    n_out = xp.shape[1] - dilation * (k - 1)
    y = np.zeros((b, n_out, c_out))  # (B, N_out, C_out)
    for j in range(k):
        y += xp[:, j * dilation: j * dilation + n_out] @ w[:, :, j].T
    if bias is not None:
        y += _f64(bias)
    return y


def conv1d_backward(x, weight, dy, dilation: int = 1, pad_left: int = 0, pad_right: int = 0,
                    bias: bool = True):
    """Gradients of ``conv1d``: each tap j is a linear layer applied to a shifted window of x_pad,

    dx_pad[t + j*dilation] += dy[t] w[:, :, j],   dw[:, :, j] = sum over (b, t) of dy[t]^T x_pad[t + j*dilation],
    db = sum over (b, t) of dy;  dx is dx_pad without its padding.
    x (B, N, C_in), weight (C_out, C_in, k), dy (B, N_out, C_out) -> (dx, dw, db or None).
    """
    x, w, dy = _f64(x), _f64(weight), _f64(dy)
    b, n, c_in = x.shape
    c_out, _, k = w.shape
    n_out = n + pad_left + pad_right - dilation * (k - 1)
    _check_shape("dy", dy, (b, n_out, c_out))
    xp = np.pad(x, ((0, 0), (pad_left, pad_right), (0, 0)))  # (B, N_pad, C_in)
    dxp = np.zeros_like(xp)  # (B, N_pad, C_in)
    dw = np.empty_like(w)  # (C_out, C_in, k)
    dy_rows = dy.reshape(-1, c_out)  # (B*N_out, C_out)
    for j in range(k):
        window = slice(j * dilation, j * dilation + n_out)
        dxp[:, window] += dy @ w[:, :, j]  # (B, N_out, C_in)
        dw[:, :, j] = dy_rows.T @ xp[:, window].reshape(-1, c_in)  # (C_out, C_in)
    db = dy_rows.sum(axis=0) if bias else None  # (C_out,)
    return dxp[:, pad_left:pad_left + n], dw, db


def glu(x):
    """GLU(a, b) = a * sigmoid(b) over the last axis split in halves (Dauphin et al.)."""
    x = _f64(x)
    half = x.shape[-1] // 2
    return x[..., :half] * _sigmoid(x[..., half:])


def glu_backward(x, dy):
    """d[a * s(b)]: da = dy * s(b), db = dy * a * s(b) * (1 - s(b)); -> dx = [da, db]."""
    x, dy = _f64(x), _f64(dy)
    half = x.shape[-1] // 2
    _check_shape("dy", dy, x.shape[:-1] + (half,))
    a, gate = x[..., :half], _sigmoid(x[..., half:])  # (..., C), (..., C)
    return np.concatenate([dy * gate, dy * a * gate * (1.0 - gate)], axis=-1)  # (..., 2C)


def restricted_window(n_q: int, n_k: int, window: int, causal: bool) -> np.ndarray:
    """(Nq, Nk) bool: key j is in query i's neighbourhood of ``window`` keys (section 4)."""
    i = np.arange(n_q)[:, None]
    j = np.arange(n_k)[None, :]
    if causal:
        return (j <= i) & (j >= i - window + 1)
    return (j >= i - (window - 1) // 2) & (j <= i + window // 2)


def restricted_attention(q, k, v, window: int, causal: bool = False):
    """Self-attention restricted to a neighbourhood of size r = ``window`` around each query.

    Defined here as full attention with a band mask (the clearest statement, O(n^2) work);
    the fast kernels compute the same values in O(r * n * d).
    """
    mask = restricted_window(q.shape[-2], k.shape[-2], window, causal)
    return scaled_dot_product_attention(q, k, v, mask=mask)


def restricted_attention_train(q, k, v, window: int, causal: bool = False):
    """``restricted_attention`` that also returns lse (..., N), as scaled_dot_product_attention_train."""
    mask = restricted_window(q.shape[-2], k.shape[-2], window, causal)  # (Nq, Nk)
    return scaled_dot_product_attention_train(q, k, v, mask=mask)


def restricted_attention_backward(q, k, v, out, lse, dout, window: int, causal: bool = False):
    """(dq, dk, dv) of ``restricted_attention``: attention's backward under the band mask (the
    keys outside a query's neighbourhood have P = 0 and get nothing from it)."""
    mask = restricted_window(q.shape[-2], k.shape[-2], window, causal)  # (Nq, Nk)
    return scaled_dot_product_attention_backward(q, k, v, out, lse, dout, mask=mask)
