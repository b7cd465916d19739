"""Analytic cost models: floating-point operations and the fewest bytes each op must move.

Every timing in the benchmarks and studies is turned into GFLOP/s (and GB/s) with these
counts, and so into a fraction of the machine's measured ceilings (llm.c, nanoGPT's
``estimate_mfu`` and flash-attention's benchmarks count the same way).

Conventions
-----------
* A multiply-add counts as 2 FLOPs; matrix products dominate, so elementwise work
  (bias, activation, softmax, gates) is counted with small per-element constants, stated
  beside each formula.
* Attention counts the two matrix products only: ``4 * B * H * Nq * Nk * d`` for d_k = d_v = d
  (flash-attention's convention). Causal attention counts only the visible (query, key) pairs,
  which is (n + 1) / (2n) of the full matrix for Nq = Nk = n: "halved for causal".
* ``bytes_moved`` is the compulsory traffic: every input read once and every output written
  once (``itemsize`` bytes per element); naive attention also writes and reads its
  (Nq, Nk) score matrix. Real kernels move at least this much.

Usage::

    flops("attention", b=1, h=8, nq=4096, nk=4096, dk=64, causal=True)
    flops("transformer_forward", config=TransformerConfig.base(), b=8, n_src=128, n_tgt=128)
    bytes_moved("ffn", tokens=1024, d_model=512, d_ff=2048)
"""

from __future__ import annotations

from typing import Callable

# Per-element constants for the non-matmul work (documented, deliberately simple).
SOFTMAX_FLOPS_PER_ELEMENT = 5  # max, subtract, exp, sum, divide
LAYER_NORM_FLOPS_PER_ELEMENT = 8  # residual add, mean, centre, square, sum, scale, gamma, beta
ACTIVATION_FLOPS_PER_ELEMENT = 1  # relu: max (GELU costs more, but is a small term)
LSTM_GATE_FLOPS_PER_UNIT = 12  # bias adds, 3 sigmoids, 2 tanh, c = f*c + i*g, h = o*tanh(c)
GRU_GATE_FLOPS_PER_UNIT = 12  # bias adds, 2 sigmoids, tanh, r*hn, h = (1-z)*n + z*h
RNN_FLOPS_PER_UNIT = 3  # 2 bias adds, tanh


def causal_pairs(nq: int, nk: int) -> int:
    """Number of visible (query, key) pairs under a top-left-aligned causal mask."""
    m = min(nq, nk)
    return m * (m + 1) // 2 + max(nq - nk, 0) * nk


def restricted_pairs(n: int, window: int, causal: bool = False) -> int:
    """Number of (query, key) pairs inside the restricted-attention windows (exact, with borders)."""
    total = 0
    lo_off, hi_off = (window - 1, 0) if causal else ((window - 1) // 2, window // 2)
    for i in range(n):
        lo, hi = max(0, i - lo_off), min(n - 1, i + hi_off)
        total += hi - lo + 1
    return total


# ---------------------------------------------------------------------------- FLOPs
def _linear(tokens, d_in, d_out, bias=True):
    return 2 * tokens * d_in * d_out + (tokens * d_out if bias else 0)


def _ffn(tokens, d_model, d_ff):
    return (_linear(tokens, d_model, d_ff) + ACTIVATION_FLOPS_PER_ELEMENT * tokens * d_ff
            + _linear(tokens, d_ff, d_model))


def _layer_norm(tokens, d):
    return LAYER_NORM_FLOPS_PER_ELEMENT * tokens * d


def _softmax(rows, cols):
    return SOFTMAX_FLOPS_PER_ELEMENT * rows * cols


def _attention(b, h, nq, nk, dk, dv=None, causal=False):
    dv = dk if dv is None else dv
    pairs = causal_pairs(nq, nk) if causal else nq * nk
    return 2 * b * h * pairs * (dk + dv)


def _restricted_attention(b, h, n, d, window, causal=False):
    return 4 * b * h * restricted_pairs(n, window, causal) * d


def _mha(b, nq, nk, d_model, h, causal=False):
    """Projections (Q from nq tokens; K, V from nk tokens; output) plus attention."""
    d_head = d_model // h
    proj = (_linear(b * nq, d_model, d_model) + 2 * _linear(b * nk, d_model, d_model)
            + _linear(b * nq, d_model, d_model))
    return proj + _attention(b, h, nq, nk, d_head, causal=causal)


def _rnn(b, n, d_in, d_hidden):
    return 2 * b * n * (d_in + d_hidden) * d_hidden + RNN_FLOPS_PER_UNIT * b * n * d_hidden


def _lstm(b, n, d_in, d_hidden):
    return 2 * b * n * (d_in + d_hidden) * 4 * d_hidden + LSTM_GATE_FLOPS_PER_UNIT * b * n * d_hidden


def _gru(b, n, d_in, d_hidden):
    return 2 * b * n * (d_in + d_hidden) * 3 * d_hidden + GRU_GATE_FLOPS_PER_UNIT * b * n * d_hidden


def _conv1d(b, n_out, c_in, c_out, k):
    return 2 * b * n_out * c_in * c_out * k + b * n_out * c_out


def _encoder_layer(b, n, d_model, h, d_ff):
    return _mha(b, n, n, d_model, h) + _ffn(b * n, d_model, d_ff) + 2 * _layer_norm(b * n, d_model)


def _decoder_layer(b, n_tgt, n_src, d_model, h, d_ff):
    return (_mha(b, n_tgt, n_tgt, d_model, h, causal=True) + _mha(b, n_tgt, n_src, d_model, h)
            + _ffn(b * n_tgt, d_model, d_ff) + 3 * _layer_norm(b * n_tgt, d_model))


def _transformer_forward(config, b, n_src, n_tgt, output_projection=True):
    """Encoder over n_src tokens, decoder over n_tgt tokens, output projection (+ log-softmax)."""
    c = config
    total = c.n_encoder_layers * _encoder_layer(b, n_src, c.d_model, c.n_heads, c.d_ff)
    total += c.n_decoder_layers * _decoder_layer(b, n_tgt, n_src, c.d_model, c.n_heads, c.d_ff)
    if output_projection:
        total += _linear(b * n_tgt, c.d_model, c.tgt_vocab, bias=False)
    return total


def _transformer_generate(config, b, n_src, n_new):
    """Greedy decoding with a KV cache: the encoder once, then one token per step.

    Step t (1-based) projects one query, attends over t cached keys (self) and n_src keys
    (cross; their K/V are projected once), and projects to the vocabulary.
    """
    c = config
    d, h = c.d_model, c.n_heads
    total = c.n_encoder_layers * _encoder_layer(b, n_src, d, h, c.d_ff)
    total += c.n_decoder_layers * 2 * _linear(b * n_src, d, d)  # cross-attention K, V once
    for t in range(1, n_new + 1):
        per_layer = (4 * _linear(b, d, d) + _attention(b, h, 1, t, d // h)  # self: q,k,v,o
                     + 2 * _linear(b, d, d) + _attention(b, h, 1, n_src, d // h)  # cross: q,o
                     + _ffn(b, d, c.d_ff) + 3 * _layer_norm(b, d))
        total += c.n_decoder_layers * per_layer + _linear(b, d, c.tgt_vocab, bias=False)
    return total


_FLOPS: dict[str, Callable[..., float]] = {
    "linear": _linear,
    "ffn": _ffn,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "attention": _attention,
    "restricted_attention": _restricted_attention,
    "mha": _mha,
    "rnn": _rnn,
    "lstm": _lstm,
    "gru": _gru,
    "conv1d": _conv1d,
    "encoder_layer": _encoder_layer,
    "decoder_layer": _decoder_layer,
    "transformer_forward": _transformer_forward,
    "transformer_generate": _transformer_generate,
}

OPS = tuple(_FLOPS)


def flops(op: str, **dims) -> float:
    """Floating-point operations of ``op`` at the given sizes (see the module docstring)."""
    if op not in _FLOPS:
        raise ValueError(f"unknown op {op!r} for flops(); known: {', '.join(OPS)}")
    return float(_FLOPS[op](**dims))


# ---------------------------------------------------------------------------- bytes
def _bytes_linear(tokens, d_in, d_out, bias=True):
    return tokens * d_in + d_in * d_out + (d_out if bias else 0) + tokens * d_out


def _bytes_ffn(tokens, d_model, d_ff):
    # x in, W1, b1, hidden out (written once, read once), W2, b2, y out
    return tokens * d_model + 2 * d_model * d_ff + d_ff + d_model + 2 * tokens * d_ff + tokens * d_model


def _bytes_attention(b, h, nq, nk, dk, dv=None, causal=False, impl="fused"):
    dv = dk if dv is None else dv
    io = b * h * (nq * dk + nk * dk + nk * dv + nq * dv)
    if impl == "naive":  # scores written, read, probabilities written, read
        pairs = causal_pairs(nq, nk) if causal else nq * nk
        io += 4 * b * h * pairs
    return io


def _bytes_restricted_attention(b, h, n, d, window, causal=False):
    return b * h * 4 * n * d


def _bytes_recurrent(gates):
    def f(b, n, d_in, d_hidden):
        weights = gates * d_hidden * (d_in + d_hidden + 2)
        return b * n * d_in + weights + b * n * d_hidden + 2 * b * d_hidden
    return f


def _bytes_conv1d(b, n_out, c_in, c_out, k):
    return b * n_out * c_in + c_out * c_in * k + c_out + b * n_out * c_out


_BYTES: dict[str, Callable[..., float]] = {
    "linear": _bytes_linear,
    "ffn": _bytes_ffn,
    "layer_norm": lambda tokens, d: 3 * tokens * d + 2 * d,  # x, residual in; y out
    "softmax": lambda rows, cols: 2 * rows * cols,
    "attention": _bytes_attention,
    "restricted_attention": _bytes_restricted_attention,
    "rnn": _bytes_recurrent(1),
    "lstm": _bytes_recurrent(4),
    "gru": _bytes_recurrent(3),
    "conv1d": _bytes_conv1d,
}


def bytes_moved(op: str, itemsize: int = 4, **dims) -> float:
    """Compulsory bytes of ``op``: inputs read once, outputs written once (``itemsize`` each)."""
    if op not in _BYTES:
        raise ValueError(f"unknown op {op!r} for bytes_moved(); known: {', '.join(_BYTES)}")
    return float(_BYTES[op](**dims) * itemsize)


def arithmetic_intensity(op: str, itemsize: int = 4, **dims) -> float:
    """FLOPs per compulsory byte: the x coordinate of a roofline plot."""
    return flops(op, **{k: v for k, v in dims.items() if k != "impl"}) / bytes_moved(op, itemsize, **dims)
