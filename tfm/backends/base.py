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

    def __repr__(self) -> str:
        return f"<tfm backend {self.name!r}>"
