"""The ``cpu`` backend: Numba ``@njit`` kernels (``parallel=True`` where it pays).

One module per kernel family; the CUDA backend uses the same module names:

    linear.py      linear layers, elementwise add, ReLU/GELU, the position-wise FFN
    norm.py        layer norm (+ residual), softmax, log-softmax, argmax
    embedding.py   embedding lookup (scaled), sinusoidal positional encoding
    attention.py   naive and fused (online-softmax) attention, head split/merge, KV-cache writes
    restricted.py  restricted (windowed) self-attention
    recurrent.py   Elman RNN, LSTM, GRU layers
    conv.py        1-D convolution (dilated, padded), GLU
    training.py    gradient accumulation (axpy), the Adam step, dropout

Each backward kernel sits in its forward's module, after it.

Kernel modules are imported on first use so that ``import tfm`` compiles nothing.
"""

from __future__ import annotations

import importlib

import numpy as np

from ..base import Backend


def _k(module: str):
    return importlib.import_module(f"{__name__}.{module}")


class CpuBackend(Backend):
    name = "cpu"

    def asarray(self, x, dtype=None):
        x = np.asarray(x)
        if dtype is not None and x.dtype != dtype:
            x = x.astype(dtype)
        return np.ascontiguousarray(x)

    def to_numpy(self, x):
        return np.asarray(x)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    # dense
    def linear(self, x, weight, bias=None):
        return _k("linear").linear(x, weight, bias)

    def add(self, a, b):
        return _k("linear").add(a, b)

    def activation(self, x, kind):
        return _k("linear").activation(x, kind)

    def feed_forward(self, x, w1, b1, w2, b2, activation):
        return _k("linear").feed_forward(x, w1, b1, w2, b2, activation)

    def layer_norm(self, x, gamma, beta, eps, residual=None):
        return _k("norm").layer_norm(x, gamma, beta, eps, residual)

    def softmax(self, x):
        return _k("norm").softmax(x)

    def log_softmax(self, x):
        return _k("norm").log_softmax(x)

    def argmax(self, x):
        return _k("norm").argmax(x)

    # embeddings
    def embedding(self, ids, table, scale=1.0):
        return _k("embedding").embedding(ids, table, scale)

    def add_positional_encoding(self, x, offset=0):
        return _k("embedding").add_positional_encoding(x, offset)

    # attention
    def split_heads(self, x, n_heads, start=0, width=None):
        return _k("attention").split_heads(x, n_heads, start, width)

    def merge_heads(self, x):
        return _k("attention").merge_heads(x)

    def attention(self, q, k, v, mask=None, causal=False, impl="fused"):
        return _k("attention").attention(q, k, v, mask=mask, causal=causal, impl=impl)

    def write_rows(self, dst, src, start):
        dst[:, :, start:start + src.shape[2]] = src

    # baselines
    def restricted_attention(self, q, k, v, window, causal=False):
        return _k("restricted").restricted_attention(q, k, v, window, causal)

    def rnn_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
        return _k("recurrent").rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)

    def lstm_layer(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh)

    def gru_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh)

    def conv1d(self, x, weight, bias, dilation=1, pad_left=0, pad_right=0):
        return _k("conv").conv1d(x, weight, bias, dilation, pad_left, pad_right)

    def glu(self, x):
        return _k("conv").glu(x)

    # training (backward kernels beside their forwards; training.py: axpy, Adam)
    def axpy(self, dst, src, alpha=1.0):
        _k("training").axpy(dst, src, alpha)

    def linear_backward(self, x, weight, dy, bias=True):
        return _k("linear").linear_backward(x, weight, dy, bias)

    def activation_backward(self, x, dy, kind):
        return _k("linear").activation_backward(x, dy, kind)

    def layer_norm_train(self, x, gamma, beta, eps, residual=None):
        return _k("norm").layer_norm_train(x, gamma, beta, eps, residual)

    def layer_norm_backward(self, dy, x, gamma, mean, rstd, residual=None):
        return _k("norm").layer_norm_backward(dy, x, gamma, mean, rstd, residual)

    def softmax_backward(self, y, dy):
        return _k("norm").softmax_backward(y, dy)

    def log_softmax_backward(self, y, dy):
        return _k("norm").log_softmax_backward(y, dy)

    def cross_entropy(self, logits, targets, weights, label_smoothing=0.0):
        return _k("norm").cross_entropy(logits, targets, weights, label_smoothing)

    def embedding_backward(self, ids, dy, vocab_size, scale=1.0):
        return _k("embedding").embedding_backward(ids, dy, vocab_size, scale)

    def merge_heads_into(self, x, out, start):
        _k("attention").merge_heads_into(x, out, start)

    def rnn_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
        return _k("recurrent").rnn_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)

    def rnn_layer_backward(self, saved, dout, dh_n):
        return _k("recurrent").rnn_layer_backward(saved, dout, dh_n)

    def lstm_layer_train(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh)

    def lstm_layer_backward(self, saved, dout, dh_n, dc_n):
        return _k("recurrent").lstm_layer_backward(saved, dout, dh_n, dc_n)

    def gru_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").gru_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh)

    def gru_layer_backward(self, saved, dout, dh_n):
        return _k("recurrent").gru_layer_backward(saved, dout, dh_n)

    def adam_step(self, param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay=0.0):
        _k("training").adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay)

    def dropout(self, x, p, seed, offset=0):
        return _k("training").dropout(x, p, seed, offset)

    def attention_train(self, q, k, v, mask=None, causal=False, impl="fused"):
        return _k("attention").attention_train(q, k, v, mask=mask, causal=causal, impl=impl)

    def attention_backward(self, q, k, v, out, lse, dout, mask=None, causal=False, impl="fused"):
        return _k("attention").attention_backward(q, k, v, out, lse, dout, mask=mask,
                                                  causal=causal, impl=impl)

    def restricted_attention_train(self, q, k, v, window, causal=False):
        return _k("restricted").restricted_attention_train(q, k, v, window, causal)

    def restricted_attention_backward(self, q, k, v, out, lse, dout, window, causal=False):
        return _k("restricted").restricted_attention_backward(q, k, v, out, lse, dout, window, causal)

    def conv1d_backward(self, x, weight, dy, dilation=1, pad_left=0, pad_right=0, bias=True):
        return _k("conv").conv1d_backward(x, weight, dy, dilation, pad_left, pad_right, bias)

    def glu_backward(self, x, dy):
        return _k("conv").glu_backward(x, dy)
