"""Table 1's other layers as public, backend-agnostic classes: recurrent, convolutional and
restricted self-attention.

Every class holds host parameters (PyTorch's names and layouts, so ``tfm.from_torch``
copies weights as they are), uploads them once to its backend, validates its inputs, calls
only :class:`tfm.backends.Backend` methods and returns host NumPy arrays. Sequences are
batch-first (B, N, features), as everywhere in tfm.

    RNN, LSTM, GRU      multi-layer, unidirectional; ``layer(x, h0=None[, c0=None])`` ->
                        ``(out, h_n[, c_n])`` with states shaped (num_layers, B, H)
    Conv1d              stride 1, zero padding "causal" | "same" | "valid" | int | (left, right)
    ConvStack           n residual conv layers x + relu(conv(x)); dilations 1, 1, ... or,
                        with ``dilated=True``, k^0, k^1, k^2, ... (ByteNet/WaveNet)
    ConvS2SBlock        sqrt(1/2) * (x + GLU(conv(x))) (Gehring et al., 2017)
    restricted_attention(q, k, v, window, causal=False, backend="cpu")
                        attention to the r = ``window`` nearest keys at O(r*N*D) cost
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import FLOAT_DTYPES, check_attention_inputs, check_float, is_device_array
from .backends import get_backend

__all__ = ["RNN", "LSTM", "GRU", "Conv1d", "ConvStack", "ConvS2SBlock", "restricted_attention",
           "conv_padding"]

PADDINGS = ("causal", "same", "valid")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _host_input(name: str, x, ndim: int, features: int, features_name: str, dtype):
    """A float (B, N, features) host array, cast to the layer's dtype."""
    if is_device_array(x):
        raise TypeError(f"{name} must be a host array (np.ndarray); layers return host arrays too")
    x = check_float(name, x, ndim)
    if x.shape[-1] != features:
        raise ValueError(f"{name} has {x.shape[-1]} features in its last dimension, but the "
                         f"layer's {features_name} is {features}")
    return np.ascontiguousarray(x, dtype=dtype)


class _Layer:
    """Parameters (host, in ``dtype``) + a backend holding uploaded copies."""

    def __init__(self, params: dict, backend, dtype):
        self.dtype = dtype
        self.params = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in params.items()}
        self.backend = backend

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        bk = get_backend(backend)
        self.weights = {k: bk.asarray(v, self.dtype) for k, v in self.params.items()}
        self._backend = bk

    def load_state_dict(self, state: dict) -> None:
        """Replace the parameters (same names and shapes) and re-upload them."""
        missing, extra = sorted(set(self.params) - set(state)), sorted(set(state) - set(self.params))
        if missing or extra:
            raise ValueError(f"state does not match {type(self).__name__}: missing {missing}, "
                             f"unexpected {extra}")
        new = {}
        for k, v in state.items():
            v = np.asarray(v)
            if v.shape != self.params[k].shape:
                raise ValueError(f"parameter {k!r} has shape {v.shape}, expected {self.params[k].shape}")
            new[k] = np.ascontiguousarray(v, dtype=self.dtype)
        self.params = new
        self.backend = self._backend


# ------------------------------------------------------------------------------ recurrent
class _Recurrent(_Layer):
    n_gates = 1
    has_cell = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 seed: int = 0, backend="cpu", dtype="float32"):
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.bias = bool(bias)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        rng = np.random.default_rng(int(seed))
        bound = 1.0 / math.sqrt(self.hidden_size)  # PyTorch's U(-1/sqrt(H), 1/sqrt(H))
        g, h = self.n_gates * self.hidden_size, self.hidden_size
        params = {}
        for layer in range(self.num_layers):
            d_in = self.input_size if layer == 0 else h
            params[f"weight_ih_l{layer}"] = rng.uniform(-bound, bound, (g, d_in))
            params[f"weight_hh_l{layer}"] = rng.uniform(-bound, bound, (g, h))
            if self.bias:
                params[f"bias_ih_l{layer}"] = rng.uniform(-bound, bound, g)
                params[f"bias_hh_l{layer}"] = rng.uniform(-bound, bound, g)
        super().__init__(params, backend, _dtype(dtype))

    def _layer_weights(self, layer: int):
        w = self.weights
        if self.bias:
            return (w[f"weight_ih_l{layer}"], w[f"weight_hh_l{layer}"],
                    w[f"bias_ih_l{layer}"], w[f"bias_hh_l{layer}"])
        zero = self.backend.asarray(np.zeros(self.n_gates * self.hidden_size, self.dtype))
        return w[f"weight_ih_l{layer}"], w[f"weight_hh_l{layer}"], zero, zero

    def _state(self, name, s, batch):
        shape = (self.num_layers, batch, self.hidden_size)
        if s is None:
            return np.zeros(shape, self.dtype)
        s = check_float(name, s, 3)
        if tuple(s.shape) != shape:
            raise ValueError(f"{name} must have shape (num_layers, B, hidden_size) = {shape}, "
                             f"got {tuple(s.shape)}")
        return np.ascontiguousarray(s, dtype=self.dtype)

    def _run(self, x, h0, c0=None):
        x = _host_input("x", x, 3, self.input_size, "input_size", self.dtype)
        batch = x.shape[0]
        h0 = self._state("h0", h0, batch)
        if self.has_cell:
            c0 = self._state("c0", c0, batch)
        bk = self.backend
        y, h_n, c_n = bk.asarray(x, self.dtype), [], []
        for layer in range(self.num_layers):
            res = self._step_layer(bk, y, bk.asarray(h0[layer], self.dtype),
                                   None if c0 is None else bk.asarray(c0[layer], self.dtype),
                                   self._layer_weights(layer))
            y = res[0]
            h_n.append(bk.to_numpy(res[1]))
            if self.has_cell:
                c_n.append(bk.to_numpy(res[2]))
        out = np.asarray(bk.to_numpy(y), dtype=self.dtype)
        h_n = np.stack(h_n).astype(self.dtype, copy=False)
        if self.has_cell:
            return out, h_n, np.stack(c_n).astype(self.dtype, copy=False)
        return out, h_n

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}, bias={self.bias}, dtype={self.dtype.name}, "
                f"backend={self.backend.name!r})")


class RNN(_Recurrent):
    """Elman RNN, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, seed: int = 0, backend="cpu",
                 dtype="float32"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, seed, backend, dtype)

    def _step_layer(self, bk, x, h0, c0, w):
        return bk.rnn_layer(x, h0, *w, self.nonlinearity)

    def __call__(self, x, h0=None):
        """x (B, N, input_size) -> (out (B, N, H), h_n (num_layers, B, H))."""
        return self._run(x, h0)


class LSTM(_Recurrent):
    """LSTM with PyTorch's gates (i, f, g, o): c' = f*c + i*g, h' = o*tanh(c')."""

    n_gates = 4
    has_cell = True

    def _step_layer(self, bk, x, h0, c0, w):
        return bk.lstm_layer(x, h0, c0, *w)

    def __call__(self, x, h0=None, c0=None):
        """x (B, N, input_size) -> (out (B, N, H), h_n, c_n (num_layers, B, H))."""
        return self._run(x, h0, c0)


class GRU(_Recurrent):
    """GRU with PyTorch's gates (r, z, n): h' = (1 - z)*n + z*h."""

    n_gates = 3

    def _step_layer(self, bk, x, h0, c0, w):
        return bk.gru_layer(x, h0, *w)

    def __call__(self, x, h0=None):
        """x (B, N, input_size) -> (out (B, N, H), h_n (num_layers, B, H))."""
        return self._run(x, h0)


# ------------------------------------------------------------------------------ convolution
def conv_padding(padding, kernel_size: int, dilation: int) -> tuple[int, int]:
    """(pad_left, pad_right) for "causal" | "same" | "valid" | int | (left, right).

    "same" pads dilation*(k-1) in all, the odd one on the right (as PyTorch's Conv1d);
    "causal" pads it all on the left, so output t sees inputs <= t only.
    """
    total = dilation * (kernel_size - 1)
    if isinstance(padding, str):
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, an int or (left, right); got {padding!r}")
        return {"causal": (total, 0), "same": (total // 2, total - total // 2), "valid": (0, 0)}[padding]
    if isinstance(padding, tuple) and len(padding) == 2:
        return (_positive_int("padding[0]", padding[0], 0), _positive_int("padding[1]", padding[1], 0))
    p = _positive_int("padding", padding, 0)
    return p, p


class Conv1d(_Layer):
    """1-D convolution over (B, N, C_in) sequences, stride 1, PyTorch's (C_out, C_in, k) weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 padding="same", bias: bool = True, seed: int = 0, backend="cpu", dtype="float32"):
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.dilation = _positive_int("dilation", dilation)
        self.padding = conv_padding(padding, self.kernel_size, self.dilation)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        rng = np.random.default_rng(int(seed))
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size)  # PyTorch's default
        params = {"weight": rng.uniform(-bound, bound, (self.out_channels, self.in_channels,
                                                        self.kernel_size))}
        if bias:
            params["bias"] = rng.uniform(-bound, bound, self.out_channels)
        super().__init__(params, backend, _dtype(dtype))

    def output_length(self, n: int) -> int:
        return n + sum(self.padding) - self.dilation * (self.kernel_size - 1)

    def _check_length(self, n: int) -> None:
        if self.output_length(n) < 1:
            span = self.dilation * (self.kernel_size - 1) + 1
            raise ValueError(
                f"kernel (size {self.kernel_size}, dilation {self.dilation}, span {span}) is "
                f"larger than the padded input (length {n} + padding {self.padding} = "
                f"{n + sum(self.padding)})")

    def forward_backend(self, x):
        """The convolution on a backend array x (B, N, C_in) -> backend array (no checks)."""
        return self.backend.conv1d(x, self.weights["weight"], self.weights.get("bias"),
                                   self.dilation, *self.padding)

    def __call__(self, x):
        """x (B, N, in_channels) -> (B, N_out, out_channels), N_out = N + pads - dilation*(k-1)."""
        x = _host_input("x", x, 3, self.in_channels, "in_channels", self.dtype)
        self._check_length(x.shape[1])
        bk = self.backend
        return np.asarray(bk.to_numpy(self.forward_backend(bk.asarray(x, self.dtype))), self.dtype)

    def __repr__(self) -> str:
        return (f"Conv1d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, padding={self.padding}, dtype={self.dtype.name}, "
                f"backend={self.backend.name!r})")


class ConvStack:
    """``n_layers`` residual convolutions x <- x + relu(conv_l(x)) at constant width.

    Dilations are all 1 (a contiguous stack: receptive field n_layers*(k-1) + 1) or, with
    ``dilated=True``, k^0, k^1, k^2, ... (ByteNet/WaveNet: receptive field k^n_layers).
    ``causal=True`` pads on the left only, so no output reads a later input.
    """

    def __init__(self, channels: int, kernel_size: int, n_layers: int, dilated: bool = False,
                 causal: bool = False, seed: int = 0, backend="cpu", dtype="float32"):
        self.channels = _positive_int("channels", channels)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.n_layers = _positive_int("n_layers", n_layers)
        if dilated and self.kernel_size < 2:
            raise ValueError("a dilated stack needs kernel_size >= 2 (dilations are powers of k)")
        self.dilated, self.causal = bool(dilated), bool(causal)
        self.dilations = [self.kernel_size ** i if dilated else 1 for i in range(self.n_layers)]
        self.layers = [Conv1d(channels, channels, kernel_size, dilation=d,
                              padding="causal" if causal else "same", seed=int(seed) + i,
                              backend=backend, dtype=dtype)
                       for i, d in enumerate(self.dilations)]
        self.dtype = self.layers[0].dtype

    @property
    def backend(self):
        return self.layers[0].backend

    @backend.setter
    def backend(self, backend) -> None:
        for layer in self.layers:
            layer.backend = backend

    @property
    def receptive_field(self) -> int:
        return 1 + sum(d * (self.kernel_size - 1) for d in self.dilations)

    def __call__(self, x):
        """x (B, N, channels) -> (B, N, channels)."""
        x = _host_input("x", x, 3, self.channels, "channels", self.dtype)
        bk = self.backend
        y = bk.asarray(x, self.dtype)
        for layer in self.layers:
            y = bk.add(y, bk.activation(layer.forward_backend(y), "relu"))
        return np.asarray(bk.to_numpy(y), self.dtype)


class ConvS2SBlock(Conv1d):
    """ConvS2S residual block: sqrt(1/2) * (x + GLU(conv(x))), conv: C -> 2C channels.

    Centred ("same") or ``causal`` padding keeps the length; GLU(a, b) = a * sigmoid(b).
    """

    def __init__(self, channels: int, kernel_size: int, causal: bool = False, dilation: int = 1,
                 seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(channels, 2 * channels, kernel_size, dilation=dilation,
                         padding="causal" if causal else "same", seed=seed, backend=backend,
                         dtype=dtype)
        self.channels = self.in_channels
        self.causal = bool(causal)

    def __call__(self, x):
        """x (B, N, channels) -> (B, N, channels)."""
        x = _host_input("x", x, 3, self.channels, "channels", self.dtype)
        bk = self.backend
        xb = bk.asarray(x, self.dtype)
        y = bk.add(xb, bk.glu(self.forward_backend(xb)))
        return np.asarray(bk.to_numpy(y), self.dtype) * self.dtype.type(math.sqrt(0.5))


# ------------------------------------------------------------------------------ restricted
def restricted_attention(q, k, v, window: int, *, causal: bool = False, backend="cpu"):
    """Self-attention restricted to a neighbourhood of r = ``window`` keys (paper, section 4).

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv), one float dtype. Centred: query i
    sees keys i - (r-1)//2 ... i + r//2; ``causal``: keys i - r + 1 ... i (clipped to the
    sequence). Costs O(r * N * D), not the O(N^2 * D) of masked full attention; with
    r >= 2N - 1 (centred) or r >= N (causal) it equals full (or causal) attention.
    Returns (B, H, Nq, Dv) in the input dtype; a query with no key in range gets zeros.
    """
    bk = get_backend(backend)
    q, k, v, _ = check_attention_inputs(q, k, v)
    window = _positive_int("window", window)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    dtype = np.dtype(q.dtype)
    device_in = is_device_array(q)
    out = bk.restricted_attention(bk.asarray(q, dtype), bk.asarray(k, dtype), bk.asarray(v, dtype),
                                  window, bool(causal))
    if device_in:
        return out
    return np.asarray(bk.to_numpy(out)).astype(dtype, copy=False)
