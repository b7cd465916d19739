"""One layer of each kind of the paper's Table 1, ready to time: random weights, one callable.

``make_layer(kind, n=..., d=..., ...)`` returns a :class:`LayerCase` whose ``run()``
applies the layer once through a backend (``tfm.get_backend``), with its analytic FLOPs
and compulsory bytes from :mod:`tfm.cost`. Kinds (activations (B, n, d), ``d`` the model
width; attention uses ``heads = max(1, d // 64)`` heads of width d / heads, as the paper's
d_k = 64):

    attention_naive / attention_fused   the attention core, softmax(QK^T/sqrt(d_k))V
    attention_layer                     Q, K, V projections + fused core + output projection
    rnn / lstm / gru                    one recurrent layer, d inputs -> d hidden units
    conv                                Conv1d, kernel k, d -> d channels, 'same' padding
                                        (centred; left-only when causal)
    restricted                          restricted self-attention, window r (core only)
    ffn                                 the position-wise FFN, d -> 4d -> d, ReLU
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import cost
from ..backends import get_backend

KINDS = ("attention_naive", "attention_fused", "attention_layer", "rnn", "lstm", "gru", "conv",
         "restricted", "ffn")
HEAD_DIM = 64


@dataclass
class LayerCase:
    kind: str
    run: Callable[[], object]
    flops: float
    bytes: float
    sync: Callable[[], None]


def heads_for(d: int) -> int:
    return max(1, d // HEAD_DIM)


def conv_padding(k: int, dilation: int, causal: bool) -> tuple[int, int]:
    """(pad_left, pad_right) keeping n outputs: all on the left when causal, else centred."""
    total = dilation * (k - 1)
    left = total if causal else total // 2
    return left, total - left


def make_layer(kind: str, *, n: int, d: int, b: int = 1, backend="cpu", dtype="float32", k: int = 3,
               dilation: int = 1, window: int = 16, causal: bool = False, seed: int = 0) -> LayerCase:
    """Build one layer of ``kind`` on ``backend`` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; choose one of {', '.join(KINDS)}")
    for name, v in (("n", n), ("d", d), ("b", b), ("k", k), ("dilation", dilation), ("window", window)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    bk = get_backend(backend)
    dt = np.dtype(dtype)
    item = dt.itemsize
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return bk.asarray((rng.standard_normal(shape) * scale).astype(dt), dt)

    tokens = b * n
    if kind in ("attention_naive", "attention_fused", "restricted"):
        h = heads_for(d)
        dh = d // h
        q, kk, v = arr(b, h, n, dh), arr(b, h, n, dh), arr(b, h, n, dh)
        if kind == "restricted":
            run = lambda: bk.restricted_attention(q, kk, v, window, causal)  # noqa: E731
            fl = cost.flops("restricted_attention", b=b, h=h, n=n, d=dh, window=window, causal=causal)
            by = cost.bytes_moved("restricted_attention", item, b=b, h=h, n=n, d=dh, window=window, causal=causal)
        else:
            impl = kind.split("_")[1]
            if impl == "naive":  # the backend method has no guard of its own: check as tfm.attention does
                from ..errors import InsufficientMemoryError
                from ..functional import available_memory_bytes, naive_attention_bytes

                need, free = naive_attention_bytes(b, h, n, n, item), available_memory_bytes()
                if need > free:
                    raise InsufficientMemoryError(f"naive attention needs {need / 2 ** 30:.1f} GiB for its score "
                                                  f"matrices; {free / 2 ** 30:.1f} GiB available")
            run = lambda: bk.attention(q, kk, v, None, causal, impl)  # noqa: E731
            fl = cost.flops("attention", b=b, h=h, nq=n, nk=n, dk=dh, causal=causal)
            by = cost.bytes_moved("attention", item, b=b, h=h, nq=n, nk=n, dk=dh, causal=causal, impl=impl)
    elif kind == "attention_layer":
        h = heads_for(d)
        x = arr(b, n, d)
        s = 1.0 / np.sqrt(d)
        wq, wk, wv, wo = (arr(d, d, scale=s) for _ in range(4))
        bq, bkb, bv, bo = (arr(d, scale=0.1) for _ in range(4))

        def run():
            q = bk.split_heads(bk.linear(x, wq, bq), h)
            kx = bk.split_heads(bk.linear(x, wk, bkb), h)
            vx = bk.split_heads(bk.linear(x, wv, bv), h)
            o = bk.attention(q, kx, vx, None, causal, "fused")
            return bk.linear(bk.merge_heads(o), wo, bo)

        fl = cost.flops("mha", b=b, nq=n, nk=n, d_model=d, h=h, causal=causal)
        by = (4 * cost.bytes_moved("linear", item, tokens=tokens, d_in=d, d_out=d)
              + cost.bytes_moved("attention", item, b=b, h=h, nq=n, nk=n, dk=d // h, causal=causal))
    elif kind in ("rnn", "lstm", "gru"):
        gates = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
        s = 1.0 / np.sqrt(d)
        x, h0 = arr(b, n, d), arr(b, d, scale=0.1)
        w_ih, w_hh = arr(gates * d, d, scale=s), arr(gates * d, d, scale=s)
        b_ih, b_hh = arr(gates * d, scale=0.1), arr(gates * d, scale=0.1)
        if kind == "lstm":
            c0 = arr(b, d, scale=0.1)
            run = lambda: bk.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh)  # noqa: E731
        elif kind == "gru":
            run = lambda: bk.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh)  # noqa: E731
        else:
            run = lambda: bk.rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, "tanh")  # noqa: E731
        fl = cost.flops(kind, b=b, n=n, d_in=d, d_hidden=d)
        by = cost.bytes_moved(kind, item, b=b, n=n, d_in=d, d_hidden=d)
    elif kind == "conv":
        x = arr(b, n, d)
        w, bias = arr(d, d, k, scale=1.0 / np.sqrt(d * k)), arr(d, scale=0.1)
        left, right = conv_padding(k, dilation, causal)
        run = lambda: bk.conv1d(x, w, bias, dilation, left, right)  # noqa: E731
        fl = cost.flops("conv1d", b=b, n_out=n, c_in=d, c_out=d, k=k)
        by = cost.bytes_moved("conv1d", item, b=b, n_out=n, c_in=d, c_out=d, k=k)
    else:  # ffn
        x = arr(b, n, d)
        w1, b1 = arr(4 * d, d, scale=1.0 / np.sqrt(d)), arr(4 * d, scale=0.1)
        w2, b2 = arr(d, 4 * d, scale=0.5 / np.sqrt(d)), arr(d, scale=0.1)
        run = lambda: bk.feed_forward(x, w1, b1, w2, b2, "relu")  # noqa: E731
        fl = cost.flops("ffn", tokens=tokens, d_model=d, d_ff=4 * d)
        by = cost.bytes_moved("ffn", item, tokens=tokens, d_model=d, d_ff=4 * d)
    return LayerCase(kind, run, float(fl), float(by), bk.synchronize)
