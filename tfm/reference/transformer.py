"""Section 3 of "Attention Is All You Need", in float64 NumPy, one function per equation.

Every function upcasts to float64 and returns float64: this module is the oracle, so it
trades speed for clarity. Shapes are written beside each tensor line.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _check_shape(name: str, x: np.ndarray, shape) -> None:
    """A backward's cotangent (or saved statistic) must have the shape its forward produced."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _sum_to(grad: np.ndarray, shape) -> np.ndarray:
    """Sum a gradient over the axes along which its input was broadcast, back to ``shape``."""
    lead = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(lead))) if lead > 0 else grad
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def linear(x, weight, bias=None) -> np.ndarray:
    """xW^T + b with PyTorch's (out, in) weight layout."""
    y = _f64(x) @ _f64(weight).T  # (..., out)
    if bias is not None:
        y = y + _f64(bias)
    return y


def linear_backward(x, weight, dy, bias: bool = True):
    """Gradients of y = x W^T + b, every row of x being one sample:

    dx = dy W,   dW = dy^T x (one product over all rows),   db = sum over rows of dy.
    x (..., in), weight (out, in), dy (..., out) -> (dx, dW, db), db None when ``bias`` is False.
    """
    x, weight, dy = _f64(x), _f64(weight), _f64(dy)
    _check_shape("dy", dy, x.shape[:-1] + weight.shape[:1])
    dy_rows = dy.reshape(-1, weight.shape[0])  # (rows, out)
    x_rows = x.reshape(-1, weight.shape[1])  # (rows, in)
    dx = dy @ weight  # (..., in)
    dweight = dy_rows.T @ x_rows  # (out, in)
    dbias = dy_rows.sum(axis=0) if bias else None  # (out,)
    return dx, dweight, dbias


def relu(x) -> np.ndarray:
    return np.maximum(_f64(x), 0.0)


def relu_backward(x, dy) -> np.ndarray:
    """d max(0, x) = dy where x > 0, else 0 (0 at x = 0, as PyTorch)."""
    x, dy = _f64(x), _f64(dy)
    _check_shape("dy", dy, x.shape)
    return np.where(x > 0.0, dy, 0.0)  # (..., d)


def gelu(x) -> np.ndarray:
    """Exact GELU, x * Phi(x), as torch.nn.functional.gelu(approximate='none')."""
    x = _f64(x)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_backward(x, dy) -> np.ndarray:
    """d/dx [x Phi(x)] = Phi(x) + x phi(x), with phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    x, dy = _f64(x), _f64(dy)
    _check_shape("dy", dy, x.shape)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))  # (..., d) Phi(x)
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # (..., d) phi(x)
    return dy * (cdf + x * pdf)  # (..., d)


ACTIVATIONS = {"relu": relu, "gelu": gelu}
ACTIVATION_BACKWARDS = {"relu": relu_backward, "gelu": gelu_backward}


def softmax(x, axis: int = -1) -> np.ndarray:
    x = _f64(x)
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def softmax_backward(y, dy, axis: int = -1) -> np.ndarray:
    """dx of y = softmax(x), from y: dx = y * (dy - sum(dy * y)) along ``axis``."""
    y, dy = _f64(y), _f64(dy)
    _check_shape("dy", dy, y.shape)
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))  # (..., d)


def log_softmax(x, axis: int = -1) -> np.ndarray:
    x = _f64(x)
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def log_softmax_backward(y, dy, axis: int = -1) -> np.ndarray:
    """dx of y = log_softmax(x), from y: dx = dy - exp(y) * sum(dy) along ``axis``."""
    y, dy = _f64(y), _f64(dy)
    _check_shape("dy", dy, y.shape)
    return dy - np.exp(y) * np.sum(dy, axis=axis, keepdims=True)  # (..., d)


def layer_norm(x, gamma, beta, eps: float = 1e-5, residual=None) -> np.ndarray:
    """LayerNorm(x + residual) = gamma * (y - mean) / sqrt(var + eps) + beta (Ba et al.)."""
    y = _f64(x) if residual is None else _f64(x) + _f64(residual)  # (..., d)
    mean = y.mean(axis=-1, keepdims=True)  # (..., 1)
    var = y.var(axis=-1, keepdims=True)  # (..., 1), biased, as PyTorch
    return _f64(gamma) * (y - mean) / np.sqrt(var + eps) + _f64(beta)


def layer_norm_train(x, gamma, beta, eps: float = 1e-5, residual=None):
    """``layer_norm`` that also returns what its backward needs: (out, mean, rstd), where mean and
    rstd = 1 / sqrt(var + eps) are those of y = x + residual, of shape x.shape[:-1]."""
    y = _f64(x) if residual is None else _f64(x) + _f64(residual)  # (..., d)
    mean = y.mean(axis=-1)  # (...)
    rstd = 1.0 / np.sqrt(y.var(axis=-1) + eps)  # (...)
    y_hat = (y - mean[..., None]) * rstd[..., None]  # (..., d)
    return _f64(gamma) * y_hat + _f64(beta), mean, rstd  # (..., d), (...), (...)


def layer_norm_backward(dy, x, gamma, mean, rstd, residual=None):
    """Gradients of out = gamma * y_hat + beta, y_hat = (y - mean) * rstd, y = x + residual:

    dbeta = sum over rows of dy,   dgamma = sum over rows of dy * y_hat,
    dy_hat = dy * gamma,
    d(x + residual) = rstd * (dy_hat - mean(dy_hat) - y_hat * mean(dy_hat * y_hat))
                      (means over the last axis).

    -> (dx, dgamma, dbeta); dx is the gradient of y, hence of x and of residual alike.
    """
    y = _f64(x) if residual is None else _f64(x) + _f64(residual)  # (..., d)
    dy, gamma, mean, rstd = _f64(dy), _f64(gamma), _f64(mean), _f64(rstd)
    _check_shape("dy", dy, y.shape)
    _check_shape("mean", mean, y.shape[:-1])
    _check_shape("rstd", rstd, y.shape[:-1])
    d = y.shape[-1]
    y_hat = (y - mean[..., None]) * rstd[..., None]  # (..., d)
    dbeta = dy.reshape(-1, d).sum(axis=0)  # (d,)
    dgamma = (dy * y_hat).reshape(-1, d).sum(axis=0)  # (d,)
    dy_hat = dy * gamma  # (..., d)
    dx = rstd[..., None] * (dy_hat - dy_hat.mean(axis=-1, keepdims=True)
                            - y_hat * (dy_hat * y_hat).mean(axis=-1, keepdims=True))  # (..., d)
    return dx, dgamma, dbeta


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


def attention_visibility(n_q: int, n_k: int, mask=None, causal: bool = False) -> np.ndarray:
    """Which keys each query sees: bool (..., Nq, Nk), True = may attend; ``mask`` broadcastable
    to (..., Nq, Nk), ``causal`` keeps key j for query i only if j <= i (top-left aligned)."""
    allowed = np.ones((n_q, n_k), dtype=bool)  # (Nq, Nk)
    if causal:
        allowed = np.tril(allowed)
    if mask is not None:
        allowed = allowed & np.asarray(mask, dtype=bool)  # (..., Nq, Nk)
    return allowed


def _masked_scores(q, k, mask, causal) -> np.ndarray:
    """S = Q K^T / sqrt(d_k), -inf where a key is not visible."""
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])  # (..., Nq, Nk)
    allowed = attention_visibility(q.shape[-2], k.shape[-2], mask, causal)  # (..., Nq, Nk)
    scores, allowed = np.broadcast_arrays(scores, allowed)
    return np.where(allowed, scores, -np.inf)  # (..., Nq, Nk)


def _weights_from_lse(scores, lse) -> np.ndarray:
    """P = exp(S - lse): the softmax weights; rows with lse = -inf (no visible key) are zeros."""
    shift = np.where(np.isfinite(lse), lse, 0.0)  # (..., Nq)
    return np.exp(scores - shift[..., None])  # (..., Nq, Nk); exp(-inf) = 0 where masked


def scaled_dot_product_attention_train(q, k, v, mask=None, causal: bool = False):
    """Eq. 1 that also returns lse (..., Nq) = log sum_j exp(s_ij) over the visible keys j
    (-inf for a query that sees none): with it, P = exp(S - lse) is recomputed exactly, so
    (q, k, v, out, lse) is all the backward needs. -> (out (..., Nq, d_v), lse)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    scores = _masked_scores(q, k, mask, causal)  # (..., Nq, Nk)
    row_max = np.max(scores, axis=-1)  # (..., Nq), -inf for fully-masked rows
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # (..., Nq)
    with np.errstate(divide="ignore"):  # log(0) = -inf for fully-masked rows
        lse = row_max + np.log(np.sum(np.exp(scores - row_max[..., None]), axis=-1))  # (..., Nq)
    weights = _weights_from_lse(scores, lse)  # (..., Nq, Nk)
    return weights @ v, lse  # (..., Nq, d_v), (..., Nq)


def scaled_dot_product_attention_backward(q, k, v, out, lse, dout, mask=None, causal: bool = False):
    """Gradients of O = softmax(S) V, S = Q K^T / sqrt(d_k), written out (the (Nq, Nk) matrices
    are materialised here; FlashAttention-2 computes the same per tile):

    P  = exp(S - lse)                       the weights, recomputed from the forward's lse
    dV = P^T dO
    dP = dO V^T
    D  = rowsum(dO * O)                     (= rowsum(P * dP))
    dS = P * (dP - D)                       softmax's backward
    dQ = dS K / sqrt(d_k),   dK = dS^T Q / sqrt(d_k)

    A query with no visible key has P = 0, so it adds nothing and gets dq = 0.
    -> (dq, dk, dv), shaped like q, k, v (summed over broadcast leading axes).
    """
    q, k, v, out, lse, dout = _f64(q), _f64(k), _f64(v), _f64(out), _f64(lse), _f64(dout)
    _check_shape("dout", dout, out.shape)
    _check_shape("lse", lse, out.shape[:-1])
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = _masked_scores(q, k, mask, causal)  # (..., Nq, Nk)
    p = _weights_from_lse(scores, lse)  # (..., Nq, Nk)
    dv = np.swapaxes(p, -1, -2) @ dout  # (..., Nk, d_v)
    dp = dout @ np.swapaxes(v, -1, -2)  # (..., Nq, Nk)
    d_row = np.sum(dout * out, axis=-1, keepdims=True)  # (..., Nq, 1)
    ds = p * (dp - d_row)  # (..., Nq, Nk)
    dq = ds @ k * scale  # (..., Nq, d_k)
    dk = np.swapaxes(ds, -1, -2) @ q * scale  # (..., Nk, d_k)
    return _sum_to(dq, q.shape), _sum_to(dk, k.shape), _sum_to(dv, v.shape)


def split_heads(x, n_heads: int) -> np.ndarray:
    """(B, N, h*d_k) -> (B, h, N, d_k)."""
    x = _f64(x)
    b, n, d = x.shape
    return x.reshape(b, n, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def split_heads_backward(dy) -> np.ndarray:
    """Splitting only moves elements, so its backward moves them back: merge_heads(dy)."""
    return merge_heads(dy)  # (B, N, h*d_k)


def merge_heads(x) -> np.ndarray:
    """(B, h, N, d_k) -> (B, N, h*d_k): Concat(head_1, ..., head_h)."""
    x = _f64(x)
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def merge_heads_backward(dy, n_heads: int) -> np.ndarray:
    """The backward of merge_heads is split_heads: (B, N, h*d_k) -> (B, h, N, d_k)."""
    return split_heads(dy, n_heads)  # (B, h, N, d_k)


def merge_heads_into(x, out, start: int) -> None:
    """In place: columns [start, start + h*d_k) of out (B, N, C) = merge_heads(x), the gradient
    of one head-split slice (Q, K or V) of a fused projection."""
    b, h, n, d = np.shape(x)
    _check_shape("out[:, :, start:start + h*d_k]", out[:, :, start:start + h * d], (b, n, h * d))
    out[:, :, start:start + h * d] = merge_heads(x)  # (B, N, h*d_k)


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


def position_wise_ffn_backward(x, w1, b1, w2, b2, dy, activation: str = "relu"):
    """Gradients of eq. 2 through its two linears and the activation (recomputed from x):
    -> (dx, dw1, db1, dw2, db2); a bias given as None gets None."""
    pre = linear(x, w1, b1)  # (B, N, d_ff)
    hidden = ACTIVATIONS[activation](pre)  # (B, N, d_ff)
    dhidden, dw2, db2 = linear_backward(hidden, w2, dy, bias=b2 is not None)  # (B, N, d_ff)
    dpre = ACTIVATION_BACKWARDS[activation](pre, dhidden)  # (B, N, d_ff)
    dx, dw1, db1 = linear_backward(x, w1, dpre, bias=b1 is not None)  # (B, N, d_model)
    return dx, dw1, db1, dw2, db2


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


def embed_backward(ids, dy, vocab_size: int, scale: float = 1.0) -> np.ndarray:
    """dtable of ``embed``: row v gets scale * the sum of dy over every position whose id is v
    (a scatter-add: repeated ids accumulate). ids (B, N), dy (B, N, d_model) -> (vocab, d_model)."""
    ids, dy = np.asarray(ids), _f64(dy)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
    _check_shape("dy", dy, ids.shape + dy.shape[-1:])
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    dtable = np.zeros((vocab_size, dy.shape[-1]))  # (vocab, d_model)
    np.add.at(dtable, ids, scale * dy)
    return dtable
