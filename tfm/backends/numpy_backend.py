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

    # training: each backward beside its forward in tfm/reference (transformer.py, training.py)
    def zeros(self, shape, dtype):
        return np.zeros(tuple(shape), dtype=np.float64)

    def axpy(self, dst, src, alpha=1.0):
        dst += alpha * np.asarray(src, dtype=np.float64)

    def linear_backward(self, x, weight, dy, bias=True):
        return ref.linear_backward(x, weight, dy, bias)

    def activation_backward(self, x, dy, kind):
        return ref.transformer.ACTIVATION_BACKWARDS[kind](x, dy)

    def layer_norm_train(self, x, gamma, beta, eps, residual=None):
        return ref.layer_norm_train(x, gamma, beta, eps, residual)

    def layer_norm_backward(self, dy, x, gamma, mean, rstd, residual=None):
        return ref.layer_norm_backward(dy, x, gamma, mean, rstd, residual)

    def softmax_backward(self, y, dy):
        return ref.softmax_backward(y, dy)

    def log_softmax_backward(self, y, dy):
        return ref.log_softmax_backward(y, dy)

    def cross_entropy(self, logits, targets, weights, label_smoothing=0.0):
        losses = ref.cross_entropy(logits, targets, label_smoothing)
        return losses, ref.cross_entropy_backward(logits, targets, weights, label_smoothing)

    def embedding_backward(self, ids, dy, vocab_size, scale=1.0):
        return ref.embed_backward(ids, dy, vocab_size, scale)

    def merge_heads_into(self, x, out, start):
        ref.merge_heads_into(x, out, start)

    def attention_train(self, q, k, v, mask=None, causal=False, impl="fused"):
        return ref.scaled_dot_product_attention_train(q, k, v, mask=mask, causal=causal)

    def attention_backward(self, q, k, v, out, lse, dout, mask=None, causal=False, impl="fused"):
        return ref.scaled_dot_product_attention_backward(q, k, v, out, lse, dout, mask=mask, causal=causal)

    def dropout(self, x, p, seed, offset=0):
        return ref.dropout(x, p, seed, offset)

    def adam_step(self, param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay=0.0):
        param[...], m[...], v[...] = ref.adam_step(param, grad, m, v, step, lr, beta1, beta2, eps,
                                                   weight_decay)

    def restricted_attention_train(self, q, k, v, window, causal=False):
        return ref_base.restricted_attention_train(q, k, v, window, causal)

    def restricted_attention_backward(self, q, k, v, out, lse, dout, window, causal=False):
        return ref_base.restricted_attention_backward(q, k, v, out, lse, dout, window, causal)

    def conv1d_backward(self, x, weight, dy, dilation=1, pad_left=0, pad_right=0, bias=True):
        return ref_base.conv1d_backward(x, weight, dy, dilation, pad_left, pad_right, bias)

    def glu_backward(self, x, dy):
        return ref_base.glu_backward(x, dy)

    def rnn_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
        return ref_base.rnn_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)

    def rnn_layer_backward(self, saved, dout, dh_n):
        return ref_base.rnn_layer_backward(saved, dout, dh_n)

    def lstm_layer_train(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return ref_base.lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh)

    def lstm_layer_backward(self, saved, dout, dh_n, dc_n):
        return ref_base.lstm_layer_backward(saved, dout, dh_n, dc_n)

    def gru_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        return ref_base.gru_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh)

    def gru_layer_backward(self, saved, dout, dh_n):
        return ref_base.gru_layer_backward(saved, dout, dh_n)
