"""Section 3 of "Attention Is All You Need", in float64 NumPy, one function per equation.

Every function upcasts to float64 and returns float64: this module is the oracle, so it
trades speed for clarity. Shapes are written beside each tensor line.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def linear(x, weight, bias=None) -> np.ndarray:
    """xW^T + b with PyTorch's (out, in) weight layout."""
    y = _f64(x) @ _f64(weight).T  # (..., out)
    if bias is not None:
        y = y + _f64(bias)
    return y


def relu(x) -> np.ndarray:
    return np.maximum(_f64(x), 0.0)


def gelu(x) -> np.ndarray:
    """Exact GELU, x * Phi(x), as torch.nn.functional.gelu(approximate='none')."""
    x = _f64(x)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


ACTIVATIONS = {"relu": relu, "gelu": gelu}


def softmax(x, axis: int = -1) -> np.ndarray:
    x = _f64(x)
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis: int = -1) -> np.ndarray:
    x = _f64(x)
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def layer_norm(x, gamma, beta, eps: float = 1e-5, residual=None) -> np.ndarray:
    """LayerNorm(x + residual) = gamma * (y - mean) / sqrt(var + eps) + beta (Ba et al.)."""
    y = _f64(x) if residual is None else _f64(x) + _f64(residual)  # (..., d)
    mean = y.mean(axis=-1, keepdims=True)  # (..., 1)
    var = y.var(axis=-1, keepdims=True)  # (..., 1), biased, as PyTorch
    return _f64(gamma) * (y - mean) / np.sqrt(var + eps) + _f64(beta)


def scaled_dot_product_attention(q, k, v, mask=None, causal: bool = False) -> np.ndarray:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V   (eq. 1).

    q (..., Nq, d_k), k (..., Nk, d_k), v (..., Nk, d_v); mask broadcastable to
    (..., Nq, Nk) with True = may attend. A query with no visible key returns zeros.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    d_k = q.shape[-1]
    n_q, n_k = q.shape[-2], k.shape[-2]
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(d_k)  # (..., Nq, Nk)
    allowed = np.ones((n_q, n_k), dtype=bool)  # (Nq, Nk)
    if causal:
        allowed = np.tril(allowed)  # key j visible to query i iff j <= i
    if mask is not None:
        allowed = allowed & np.asarray(mask, dtype=bool)  # (..., Nq, Nk)
    allowed = np.broadcast_to(allowed, scores.shape)
    scores = np.where(allowed, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)  # (..., Nq, 1)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # fully-masked rows
    weights = np.where(allowed, np.exp(scores - row_max), 0.0)  # (..., Nq, Nk)
    denom = weights.sum(axis=-1, keepdims=True)
    weights = np.divide(weights, denom, out=np.zeros_like(weights), where=denom > 0)
    return weights @ v  # (..., Nq, d_v)


def split_heads(x, n_heads: int) -> np.ndarray:
    """(B, N, h*d_k) -> (B, h, N, d_k)."""
    x = _f64(x)
    b, n, d = x.shape
    return x.reshape(b, n, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x) -> np.ndarray:
    """(B, h, N, d_k) -> (B, N, h*d_k): Concat(head_1, ..., head_h)."""
    x = _f64(x)
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def multi_head_attention(x_q, x_kv, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, n_heads: int,
                         mask=None, causal: bool = False) -> np.ndarray:
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    x_q (B, Nq, d_model), x_kv (B, Nk, d_model); weights in (out, in) layout.
    """
    q = split_heads(linear(x_q, w_q, b_q), n_heads)  # (B, h, Nq, d_k)
    k = split_heads(linear(x_kv, w_k, b_k), n_heads)  # (B, h, Nk, d_k)
    v = split_heads(linear(x_kv, w_v, b_v), n_heads)  # (B, h, Nk, d_v)
    heads = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)  # (B, h, Nq, d_v)
    return linear(merge_heads(heads), w_o, b_o)  # (B, Nq, d_model)


def position_wise_ffn(x, w1, b1, w2, b2, activation: str = "relu") -> np.ndarray:
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2   (eq. 2); GELU optional."""
    hidden = ACTIVATIONS[activation](linear(x, w1, b1))  # (B, N, d_ff)
    return linear(hidden, w2, b2)  # (B, N, d_model)


def positional_encoding(n: int, d_model: int, offset: int = 0) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...)   (section 3.5)."""
    pos = np.arange(offset, offset + n, dtype=np.float64)[:, None]  # (n, 1)
    two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]  # (1, ceil(d/2))
    angle = pos / np.power(10000.0, two_i / d_model)  # (n, ceil(d/2))
    pe = np.zeros((n, d_model), dtype=np.float64)  # (n, d_model)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return pe


def embed(ids, table, scale: float = 1.0) -> np.ndarray:
    """Embedding lookup, multiplied by sqrt(d_model) in the model (section 3.4)."""
    return _f64(table)[np.asarray(ids)] * scale  # (B, N, d_model)
