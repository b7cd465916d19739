"""One layer of each kind the studies measure, ready to time: random weights, one callable.

``make_layer(name, n=..., d=..., ...)`` returns a :class:`LayerCase` whose ``run()``
applies the layer once through a backend (``tfm.get_backend``), with its analytic FLOPs
and compulsory bytes from :mod:`tfm.cost`. ``name`` is a layer of the Table 1 registry
(:data:`tfm.table1.LAYERS`), which also holds its kernel and parameters (k, dilation,
window r); keyword arguments override those. Activations are (B, n, d), ``d`` the model
width; attention uses ``heads = max(1, d // 64)`` heads of width d / heads, as the
paper's d_k = 64. Convolutions keep n outputs: centred padding, left-only when causal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import cost
from ..backends import get_backend
from ..layers import conv_padding
from ..table1 import LAYERS, layer as _registry_layer

KINDS = tuple(LAYERS)
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


def make_layer(name: str, *, n: int, d: int, b: int = 1, backend="cpu", dtype="float32", causal: bool = False,
               seed: int = 0, **params) -> LayerCase:
    """Build the registry layer ``name`` on ``backend``; ``params`` (k, dilation, window)
    override its registry parameters (see the module docstring)."""
    entry = _registry_layer(name)
    unknown = set(params) - {"k", "dilation", "window"}
    if unknown:
        raise ValueError(f"unknown layer parameters {sorted(unknown)}; make_layer takes k, dilation and window")
    p = {**entry.params, **params}
    k, dilation, window = p.get("k", 1), p.get("dilation", 1), p.get("window", 1)
    for what, v in (("n", n), ("d", d), ("b", b), ("k", k), ("dilation", dilation), ("window", window)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    kind = entry.kernel
    bk = get_backend(backend)
    dt = np.dtype(dtype)
    item = dt.itemsize
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return bk.asarray((rng.standard_normal(shape) * scale).astype(dt), dt)

    tokens = b * n
    if kind in ("attention", "restricted"):
        h = heads_for(d)
        dh = d // h
        q, kk, v = arr(b, h, n, dh), arr(b, h, n, dh), arr(b, h, n, dh)
        if kind == "restricted":
            run = lambda: bk.restricted_attention(q, kk, v, window, causal)  # noqa: E731
            fl = cost.flops("restricted_attention", b=b, h=h, n=n, d=dh, window=window, causal=causal)
            by = cost.bytes_moved("restricted_attention", item, b=b, h=h, n=n, d=dh, window=window, causal=causal)
        else:
            impl = p["impl"]
            if impl == "naive":  # the backend method has no guard of its own: check as tfm.attention does
                from ..functional import check_naive_attention_memory

                check_naive_attention_memory(bk, b, h, n, n, item)
            run = lambda: bk.attention(q, kk, v, None, causal, impl)  # noqa: E731
            fl = cost.flops("attention", b=b, h=h, nq=n, nk=n, dk=dh, causal=causal)
            by = cost.bytes_moved("attention", item, b=b, h=h, nq=n, nk=n, dk=dh, causal=causal, impl=impl)
    elif kind == "mha":
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
        left, right = conv_padding("causal" if causal else "same", k, dilation)
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
    return LayerCase(name, run, float(fl), float(by), bk.synchronize)
