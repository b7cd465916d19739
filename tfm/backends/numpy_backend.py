"""The ``numpy`` backend: the float64 reference (``tfm.reference``) behind the backend interface.

Every array it holds is float64, whatever came in: running a model on this backend *is*
running the reference model, which the tests use as the oracle for ``cpu`` and ``cuda``.
"""

from __future__ import annotations

import numpy as np

from .. import reference as ref
from ..reference import baselines as ref_base
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"

    def asarray(self, x, dtype=None):
        return np.array(x, dtype=np.float64) if np.asarray(x).dtype != np.bool_ else np.asarray(x)

    def to_numpy(self, x):
        return np.asarray(x)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=np.float64)

    def linear(self, x, weight, bias=None):
        return ref.linear(x, weight, bias)

    def add(self, a, b):
        return np.add(a, b, dtype=np.float64)

    def activation(self, x, kind):
        return ref.transformer.ACTIVATIONS[kind](x)

    def feed_forward(self, x, w1, b1, w2, b2, activation):
        return ref.position_wise_ffn(x, w1, b1, w2, b2, activation)

    def layer_norm(self, x, gamma, beta, eps, residual=None):
        return ref.layer_norm(x, gamma, beta, eps, residual)

    def softmax(self, x):
        return ref.softmax(x)

    def log_softmax(self, x):
        return ref.log_softmax(x)

    def argmax(self, x):
        return np.argmax(np.asarray(x), axis=-1).astype(np.int64)

    def embedding(self, ids, table, scale=1.0):
        return ref.embed(ids, table, scale)

    def add_positional_encoding(self, x, offset=0):
        x = np.asarray(x, dtype=np.float64)
        return x + ref.positional_encoding(x.shape[1], x.shape[2], offset)[None]

    def split_heads(self, x, n_heads, start=0, width=None):
        x = np.asarray(x)
        stop = x.shape[-1] if width is None else start + width
        return np.ascontiguousarray(ref.split_heads(x[:, :, start:stop], n_heads))

    def merge_heads(self, x):
        return ref.merge_heads(x)

    def attention(self, q, k, v, mask=None, causal=False, impl="fused"):
        # The reference has one implementation; ``impl`` only matters for fast backends.
        return ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)

    def write_rows(self, dst, src, start):
        dst[:, :, start:start + src.shape[2]] = src

    # baselines: tfm/reference/baselines.py
    def restricted_attention(self, q, k, v, window, causal=False):
        return ref_base.restricted_attention(q, k, v, window, causal)

    def rnn_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
        return ref_base.rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)

    def lstm_layer(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return ref_base.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh)

    def gru_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        return ref_base.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh)

    def conv1d(self, x, weight, bias, dilation=1, pad_left=0, pad_right=0):
        return ref_base.conv1d(x, weight, bias, dilation, pad_left, pad_right)

    def glu(self, x):
        return ref_base.glu(x)
