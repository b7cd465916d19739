"""Table 1's other layers in float64 NumPy: recurrent, convolutional, restricted attention.

Equations and gate layouts follow PyTorch's documentation (nn.RNN, nn.LSTM, nn.GRU,
nn.Conv1d) so that weights carry over; sequences are batch-first (B, N, features).
"""

from __future__ import annotations

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
