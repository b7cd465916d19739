"""The backend interface: the only way models touch arrays.

Layers and models (``tfm.layers``, ``tfm.models``) never import Numba or NumPy kernels
directly; they call these methods on a backend object, so one layer definition runs on
the float64 NumPy reference, the Numba CPU kernels and the Numba CUDA kernels alike.

Conventions shared by every backend
-----------------------------------
* "Backend arrays" are whatever the backend computes on: ``np.ndarray`` for ``numpy``
  and ``cpu``, numba-cuda device arrays for ``cuda``. ``asarray`` brings host data in,
  ``to_numpy`` takes results out; nothing else crosses the host/device boundary.
* Sequences are batch-first: activations are ``(B, N, D)``; attention operands are
  ``(B, H, N, D)``.
* Linear weights use PyTorch's layout ``(out_features, in_features)`` so that
  ``tfm.from_torch`` copies weights without transposing; ``linear(x, W, b) = x @ W.T + b``.
* Recurrent weights use PyTorch's gate layout (LSTM: i, f, g, o; GRU: r, z, n).
* Conv1d weights use PyTorch's ``(C_out, C_in, k)`` layout; activations stay
  ``(B, N, C)`` (sequence-major, like every other op here).
* Boolean masks use True = "may attend" (PyTorch SDPA's convention) and are
  broadcastable to ``(B, H, Nq, Nk)``.
* Inputs reaching a backend method are already validated by the public API
  (``tfm.attention``, the layer and model classes); backends may assume correct shapes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np


class Backend(ABC):
    """Abstract backend. Subclasses: NumpyBackend, CpuBackend, CudaBackend."""

    name: str = "abstract"

    # ------------------------------------------------------------------ data movement
    @abstractmethod
    def asarray(self, x, dtype=None):
        """Host (or already-backend) array -> backend array of ``dtype`` (default: x's)."""

    @abstractmethod
    def to_numpy(self, x) -> np.ndarray:
        """Backend array -> host ``np.ndarray`` (a copy for device backends)."""

    @abstractmethod
    def empty(self, shape, dtype):
        """Uninitialised backend array (used for key/value caches)."""

    def synchronize(self) -> None:
        """Wait for queued work (a no-op on the host backends)."""

    # ------------------------------------------------------------------ dense layers
    @abstractmethod
    def linear(self, x, weight, bias=None):
        """``x @ weight.T + bias``; x (..., in), weight (out, in), bias (out,) -> (..., out)."""

    @abstractmethod
    def add(self, a, b):
        """Elementwise ``a + b`` (same shapes)."""

    @abstractmethod
    def activation(self, x, kind: str):
        """``relu`` or ``gelu`` (exact, erf-based, as PyTorch's default)."""

    @abstractmethod
    def feed_forward(self, x, w1, b1, w2, b2, activation: str):
        """Position-wise FFN: ``linear(act(linear(x, w1, b1)), w2, b2)`` (paper eq. 2)."""

    @abstractmethod
    def layer_norm(self, x, gamma, beta, eps: float, residual=None):
        """``LayerNorm(x + residual)`` over the last axis (residual optional), with sqrt(var + eps)."""

    @abstractmethod
    def softmax(self, x):
        """Softmax over the last axis."""

    @abstractmethod
    def log_softmax(self, x):
        """Log-softmax over the last axis."""

    @abstractmethod
    def argmax(self, x) -> np.ndarray:
        """Argmax over the last axis, returned as a host int64 array (for greedy decoding)."""

    # ------------------------------------------------------------------ embeddings
    @abstractmethod
    def embedding(self, ids: np.ndarray, table, scale: float = 1.0):
        """``table[ids] * scale``; ids is a host int array (B, N) already range-checked."""

    @abstractmethod
    def add_positional_encoding(self, x, offset: int = 0):
        """``x + PE[offset : offset + N]`` for x (B, N, D), sinusoidal PE of section 3.5."""

    # ------------------------------------------------------------------ attention
    @abstractmethod
    def split_heads(self, x, n_heads: int, start: int = 0, width: int | None = None):
        """Columns ``[start, start + width)`` of x (B, N, C) as heads (B, H, N, width / H).

        ``width`` defaults to ``C - start``; a fused projection's Q, K and V are split
        without slicing it first. May be a view of x (read it, do not write into it).
        """

    @abstractmethod
    def merge_heads(self, x):
        """(B, H, N, Dh) -> (B, N, H*Dh)."""

    @abstractmethod
    def attention(self, q, k, v, mask=None, causal: bool = False, impl: str = "fused"):
        """Scaled dot-product attention (paper eq. 1) on (B, H, N, D) operands.

        ``mask``: bool, broadcastable to (B, H, Nq, Nk), True = may attend.
        ``causal``: key j is visible to query i only if j <= i (top-left aligned).
        Rows with no visible key return zeros.
        """

    @abstractmethod
    def write_rows(self, dst, src, start: int) -> None:
        """In place: ``dst[:, :, start:start+n] = src`` for (B, H, n, D) blocks (KV cache)."""

    def leading_rows(self, x, n: int):
        """``x[:, :, :n]`` of a (B, H, N, D) array as a view (the filled part of a KV cache)."""
        return x[:, :, :n]

    # ------------------------------------------------------------------ baselines (issue 3)
    def restricted_attention(self, q, k, v, window: int, causal: bool = False):
        """Each query attends to at most ``window`` neighbouring keys, at O(window*N*D) cost.

        Centred: keys j with i - (window-1)//2 <= j <= i + window//2.
        Causal:  keys j with i - window + 1 <= j <= i.
        """
        raise NotImplementedError(f"{self.name}: restricted_attention is not implemented")

    def rnn_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity: str = "tanh"):
        """Elman RNN over x (B, N, I) -> (out (B, N, H), h_n (B, H))."""
        raise NotImplementedError(f"{self.name}: rnn_layer is not implemented")

    def lstm_layer(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        """LSTM over x (B, N, I) -> (out (B, N, H), h_n (B, H), c_n (B, H)); gates i, f, g, o."""
        raise NotImplementedError(f"{self.name}: lstm_layer is not implemented")

    def gru_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        """GRU over x (B, N, I) -> (out (B, N, H), h_n (B, H)); gates r, z, n."""
        raise NotImplementedError(f"{self.name}: gru_layer is not implemented")

    def conv1d(self, x, weight, bias, dilation: int = 1, pad_left: int = 0, pad_right: int = 0):
        """1-D convolution, stride 1: x (B, N, C_in), weight (C_out, C_in, k) -> (B, N_out, C_out).

        Zero padding of ``pad_left``/``pad_right`` positions; N_out = N + pad_left + pad_right
        - dilation*(k-1). Cross-correlation, as PyTorch's Conv1d.
        """
        raise NotImplementedError(f"{self.name}: conv1d is not implemented")

    def glu(self, x):
        """Gated linear unit over the last axis: a * sigmoid(b) for x = [a, b]."""
        raise NotImplementedError(f"{self.name}: glu is not implemented")

    # ------------------------------------------------------------------ training
    # The backward of each op sits beside its forward in every backend module. Forwards that
    # must keep something for their backward have a ``*_train`` twin returning it. Gradients
    # are backend arrays in the dtype of the forward's inputs; a backend without an op
    # raises NotImplementedError naming it (the studies record such cases as unavailable).

    def _missing(self, op: str):
        raise NotImplementedError(f"{self.name}: {op} is not implemented")

    def zeros(self, shape, dtype):
        """A backend array of zeros (optimizer state, zero cotangents), in ``dtype`` where the
        backend computes in it (the float64 reference always computes in float64)."""
        return self.asarray(np.zeros(tuple(shape), dtype=np.dtype(dtype)))

    def axpy(self, dst, src, alpha: float = 1.0) -> None:
        """In place ``dst += alpha * src`` (same shapes): accumulates gradients."""
        self._missing("axpy")

    def linear_backward(self, x, weight, dy, bias: bool = True):
        """Gradients of ``y = x @ weight.T + b``: x (..., in), weight (out, in), dy (..., out)
        -> (dx (..., in), dweight (out, in), dbias (out,) or None when ``bias`` is False)."""
        self._missing("linear_backward")

    def activation_backward(self, x, dy, kind: str):
        """dx of ``activation(x, kind)`` given dy; x is the activation's input."""
        self._missing("activation_backward")

    def layer_norm_train(self, x, gamma, beta, eps: float, residual=None):
        """``layer_norm`` that also returns its statistics: (y, mean, rstd), mean and rstd of
        shape x.shape[:-1] (rstd = 1 / sqrt(var + eps)), of ``x + residual``."""
        self._missing("layer_norm_train")

    def layer_norm_backward(self, dy, x, gamma, mean, rstd, residual=None):
        """-> (dx, dgamma, dbeta); dx is the gradient of ``x + residual`` (so also of residual)."""
        self._missing("layer_norm_backward")

    def softmax_backward(self, y, dy):
        """dx of ``y = softmax(x)``: y * (dy - sum(dy * y)) over the last axis."""
        self._missing("softmax_backward")

    def log_softmax_backward(self, y, dy):
        """dx of ``y = log_softmax(x)``: dy - exp(y) * sum(dy) over the last axis."""
        self._missing("log_softmax_backward")

    def cross_entropy(self, logits, targets: np.ndarray, weights: np.ndarray, label_smoothing: float = 0.0):
        """Token cross-entropy with PyTorch's label smoothing, and its gradient, in one pass.

        logits (T, V) backend array; targets (T,) host int64 in [0, V); weights (T,) host
        float64 (0 drops a target, e.g. padding). Per target t, with lse = logsumexp(z_t):
        ``loss_t = (1 - eps) * (lse - z_t[y_t]) + eps * (lse - mean_v z_t[v])``.
        Returns (losses (T,) host float64, unweighted; dlogits (T, V) backend array, the
        gradient of ``sum_t weights[t] * loss_t``).
        """
        self._missing("cross_entropy")

    def embedding_backward(self, ids: np.ndarray, dy, vocab_size: int, scale: float = 1.0):
        """dtable (vocab_size, D) of ``embedding(ids, table, scale)``: a scatter-add of scale * dy."""
        self._missing("embedding_backward")

    def merge_heads_into(self, x, out, start: int) -> None:
        """In place: columns ``[start, start + H*Dh)`` of out (B, N, C) = ``merge_heads(x)``
        (the backward of ``split_heads(out_fwd, H, start, H*Dh)``, one slice of a fused dQKV)."""
        self._missing("merge_heads_into")

    def attention_train(self, q, k, v, mask=None, causal: bool = False, impl: str = "fused"):
        """``attention`` that also returns lse (B, H, Nq), in q's dtype: the log-sum-exp of each
        query's scaled scores over its visible keys (-inf where it sees none), all its backward
        needs besides q, k, v and the output (the fused backward recomputes the scores from it)."""
        self._missing("attention_train")

    def attention_backward(self, q, k, v, out, lse, dout, mask=None, causal: bool = False,
                           impl: str = "fused"):
        """-> (dq, dk, dv) of ``attention``; "fused" never materialises (Nq, Nk) (FlashAttention-2,
        Dao 2023, Algorithm 2), "naive" does."""
        self._missing("attention_backward")

    def restricted_attention_train(self, q, k, v, window: int, causal: bool = False):
        """``restricted_attention`` that also returns lse (B, H, N), as ``attention_train``."""
        self._missing("restricted_attention_train")

    def restricted_attention_backward(self, q, k, v, out, lse, dout, window: int, causal: bool = False):
        """-> (dq, dk, dv) of ``restricted_attention``, at O(window * N * D) cost."""
        self._missing("restricted_attention_backward")

    def rnn_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity: str = "tanh"):
        """``rnn_layer`` that also returns ``saved`` (opaque: what backpropagation through time
        needs) -> (out, h_n, saved)."""
        self._missing("rnn_layer_train")

    def rnn_layer_backward(self, saved, dout, dh_n):
        """Backpropagation through time: dout (B, N, H), dh_n (B, H) (either may be None =
        zero) -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh); weight gradients as one product over
        all steps."""
        self._missing("rnn_layer_backward")

    def lstm_layer_train(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        """-> (out, h_n, c_n, saved), as ``rnn_layer_train``."""
        self._missing("lstm_layer_train")

    def lstm_layer_backward(self, saved, dout, dh_n, dc_n):
        """-> (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh); None cotangents are zeros."""
        self._missing("lstm_layer_backward")

    def gru_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        """-> (out, h_n, saved), as ``rnn_layer_train``."""
        self._missing("gru_layer_train")

    def gru_layer_backward(self, saved, dout, dh_n):
        """-> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh); None cotangents are zeros."""
        self._missing("gru_layer_backward")

    def conv1d_backward(self, x, weight, dy, dilation: int = 1, pad_left: int = 0, pad_right: int = 0,
                        bias: bool = True):
        """-> (dx (B, N, C_in), dweight (C_out, C_in, k), dbias (C_out,) or None) of ``conv1d``."""
        self._missing("conv1d_backward")

    def glu_backward(self, x, dy):
        """dx of ``glu(x)`` given dy."""
        self._missing("glu_backward")

    def dropout(self, x, p: float, seed: int, offset: int = 0):
        """Inverted dropout: ``x * keep / (1 - p)`` (p = 1: zeros); element i (flat, C order)
        is kept when ``tfm.reference.dropout_uniform(seed, offset + i) >= p``, a counter-based
        stream (SplitMix64, seed in [0, 2^64)) that every backend computes identically, so the
        same seed drops the same elements anywhere. Compare the stream's top 24 bits with the
        integer ``tfm.reference.dropout_threshold(p)``, not a float32 uniform with float32(p)
        (which rounds). Its backward is ``dropout(dy, p, seed, offset)``: the same mask."""
        self._missing("dropout")

    def adam_step(self, param, grad, m, v, step: int, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float = 0.0) -> None:
        """One ``torch.optim.Adam`` update, in place on param, m and v (step counts from 1):
        g = grad + weight_decay * param; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
        param -= (lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)."""
        self._missing("adam_step")

    def __repr__(self) -> str:
        return f"<tfm backend {self.name!r}>"


def adam_scalars(step, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple:
    """The scalars of one ``adam_step`` update, validated, in the order the kernels take them:
    (1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^step), eps, -lr / (1 - beta1^step), weight_decay)."""
    if not (lr >= 0 and weight_decay >= 0):
        raise ValueError(f"adam_step: lr must be >= 0 and weight_decay >= 0 (got {lr}, {weight_decay})")
    step = int(step)
    if step < 1:
        raise ValueError(f"adam_step: step must be >= 1, got {step}")
    return (1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2 ** step), eps, -lr / (1.0 - beta1 ** step),
            weight_decay)
