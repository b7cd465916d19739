"""Recurrent layers of Table 1: multi-layer, unidirectional RNN (tanh or relu), LSTM and GRU.

Parameters carry PyTorch's names and gate layouts (``weight_ih_l0``, ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0`` per layer; LSTM gates i, f, g, o; GRU gates r, z, n), drawn
from U(-1/sqrt(H), 1/sqrt(H)) as PyTorch's defaults, so ``tfm.from_torch`` copies them as
they are. Sequences are batch-first (B, N, features).

The public call takes and returns states shaped (num_layers, B, H), as PyTorch's;
``forward`` (backend arrays) takes and returns one state per layer: h (B, H) for RNN and
GRU, (h, c) for LSTM, so that a model can carry them from one decoding step to the next.
"""

from __future__ import annotations

import math

import numpy as np

from .._checks import check_bool, check_features, check_float, check_int
from .module import Module, uniform

__all__ = ["GRU", "LSTM", "RNN"]

NONLINEARITIES = ("tanh", "relu")


class _Recurrent(Module):
    n_gates = 1
    has_cell = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.input_size = check_int("input_size", input_size)
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.num_layers = check_int("num_layers", num_layers)
        self.bias = check_bool("bias", bias)
        init = uniform(1.0 / math.sqrt(self.hidden_size))  # PyTorch's U(-1/sqrt(H), 1/sqrt(H))
        g, h = self.n_gates * self.hidden_size, self.hidden_size
        for layer in range(self.num_layers):
            self.param(f"weight_ih_l{layer}", (g, self.input_size if layer == 0 else h), init)
            self.param(f"weight_hh_l{layer}", (g, h), init)
            if self.bias:
                self.param(f"bias_ih_l{layer}", (g,), init)
                self.param(f"bias_hh_l{layer}", (g,), init)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.bias, "dtype": self.dtype.name}

    def _device_params(self, bk):
        w = super()._device_params(bk)
        if not self.bias:  # the kernels always add biases: give them zeros, uploaded once
            w["zero_bias"] = bk.asarray(np.zeros(self.n_gates * self.hidden_size, self.dtype))
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        zero = () if self.bias else (w["zero_bias"], w["zero_bias"])
        # Each layer's kernel arguments, looked up once per upload instead of once per call
        # (greedy decoding runs the stack once per token).
        self._layer_weights = [tuple(w[f"{n}_l{i}"] for n in names) + zero for i in range(self.num_layers)]
        return w

    # --------------------------------------------------------------- backend arrays
    def forward(self, x, states=None):
        """x (B, N, input_size) backend array; ``states``: one initial state per layer (see
        the module docstring) or None for zeros. Returns (out (B, N, H), final states)."""
        if states is None:
            zero = self.backend.asarray(np.zeros((x.shape[0], self.hidden_size), self.dtype))
            states = [(zero, zero) if self.has_cell else zero] * self.num_layers
        final = []
        for layer, state in enumerate(states):
            x, state = self._layer(x, state, self._layer_weights[layer])  # (B, N, H)
            final.append(state)
        return x, final

    def forward_train(self, x, states=None):
        """``forward`` keeping each layer's saved state for backpropagation through time
        -> ((out, final states), saved)."""
        if states is None:
            zero = self.backend.zeros((x.shape[0], self.hidden_size), self.dtype)
            states = [(zero, zero) if self.has_cell else zero] * self.num_layers
        final, saved = [], []
        for layer, state in enumerate(states):
            x, state, s = self._layer_train(x, state, self._layer_weights[layer])  # (B, N, H)
            final.append(state)
            saved.append(s)
        return (x, final), saved

    def backward(self, saved, dout, dstates=None):
        """dout (B, N, H) of the top layer's output and ``dstates``, one cotangent of each
        layer's final state (as ``forward`` returns them; None = zeros) -> ((dx, dstates0),
        gradients): the layers in reverse, each one backpropagating through time."""
        grads = {}
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        dstates0 = [None] * self.num_layers
        for layer in reversed(range(self.num_layers)):
            dstate = None if dstates is None else dstates[layer]
            dout, dstates0[layer], *dw = self._layer_backward(saved[layer], dout, dstate)
            for name, g in zip(names, dw):
                grads[f"{name}_l{layer}"] = g
        return (dout, dstates0), grads

    # --------------------------------------------------------------- host arrays
    def _state(self, name, s, batch):
        shape = (self.num_layers, batch, self.hidden_size)
        if s is None:
            return np.zeros(shape, self.dtype)
        s = check_float(name, s, 3)
        if tuple(s.shape) != shape:
            raise ValueError(f"{name} must have shape (num_layers, B, hidden_size) = {shape}, "
                             f"got {tuple(s.shape)}")
        return s

    def _inputs(self, x, h0, c0=None):
        """Checked backend arguments of ``forward``: x and one state per layer (None: zeros)."""
        x = check_features("x", x, 3, self.input_size, "input_size")
        bk, batch = self.backend, x.shape[0]
        states = None
        if h0 is not None or c0 is not None:
            h0 = self._state("h0", h0, batch)
            if self.has_cell:
                c0 = self._state("c0", c0, batch)
            states = self._split_states(h0, c0)
        return bk.asarray(x, self.dtype), states

    def _split_states(self, h, c=None):
        """(num_layers, B, H) host arrays -> one backend state per layer."""
        bk = self.backend
        return [(bk.asarray(h[i], self.dtype), bk.asarray(c[i], self.dtype)) if self.has_cell
                else bk.asarray(h[i], self.dtype) for i in range(self.num_layers)]

    def _stack_states(self, states) -> tuple:
        """One state per layer -> (h (num_layers, B, H),) or (h, c), host arrays."""
        if self.has_cell:
            return (np.stack([self._host(h) for h, _ in states]), np.stack([self._host(c) for _, c in states]))
        return (np.stack([self._host(h) for h in states]),)

    def _run(self, x, h0, c0=None):
        out, final = self.forward(*self._inputs(x, h0, c0))
        return (self._host(out), *self._stack_states(final))

    def _run_vjp(self, x, h0, c0=None):
        (out, final), saved = self.forward_train(*self._inputs(x, h0, c0))

        def pullback(cotangent):
            dout, *dfinal = cotangent
            (dx, dstates0), grads = self.backward(saved, self.backend.asarray(dout, self.dtype),
                                                  self._split_states(*dfinal))
            names = ("h0", "c0") if self.has_cell else ("h0",)
            return {"x": self._host(dx), **dict(zip(names, self._stack_states(dstates0)))}, self.param_grads(grads)

        return (self._host(out), *self._stack_states(final)), pullback


class RNN(_Recurrent):
    """Elman RNN, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, seed: int = 0, backend="cpu",
                 dtype="float32"):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, seed, backend, dtype)

    def _config(self) -> dict:
        return {**super()._config(), "nonlinearity": self.nonlinearity}

    def _layer(self, x, h, w):
        return self.backend.rnn_layer(x, h, *w, self.nonlinearity)

    def _layer_train(self, x, h, w):
        return self.backend.rnn_layer_train(x, h, *w, self.nonlinearity)

    def _layer_backward(self, saved, dout, dh_n):
        return self.backend.rnn_layer_backward(saved, dout, dh_n)

    def __call__(self, x, h0=None):
        """x (B, N, input_size) -> (out (B, N, H), h_n (num_layers, B, H)), host arrays."""
        return self._run(x, h0)

    def _vjp(self, x, h0=None):
        return self._run_vjp(x, h0)


class LSTM(_Recurrent):
    """LSTM with PyTorch's gates (i, f, g, o): c' = f*c + i*g, h' = o*tanh(c')."""

    n_gates = 4
    has_cell = True

    def _layer(self, x, state, w):
        y, h, c = self.backend.lstm_layer(x, *state, *w)
        return y, (h, c)

    def _layer_train(self, x, state, w):
        y, h, c, saved = self.backend.lstm_layer_train(x, *state, *w)
        return y, (h, c), saved

    def _layer_backward(self, saved, dout, dstate):
        dh_n, dc_n = (None, None) if dstate is None else dstate
        dx, dh0, dc0, *dw = self.backend.lstm_layer_backward(saved, dout, dh_n, dc_n)
        return (dx, (dh0, dc0), *dw)

    def __call__(self, x, h0=None, c0=None):
        """x (B, N, input_size) -> (out (B, N, H), h_n, c_n (num_layers, B, H)), host arrays."""
        return self._run(x, h0, c0)

    def _vjp(self, x, h0=None, c0=None):
        return self._run_vjp(x, h0, c0)


class GRU(_Recurrent):
    """GRU with PyTorch's gates (r, z, n): h' = (1 - z)*n + z*h."""

    n_gates = 3

    def _layer(self, x, h, w):
        return self.backend.gru_layer(x, h, *w)

    def _layer_train(self, x, h, w):
        return self.backend.gru_layer_train(x, h, *w)

    def _layer_backward(self, saved, dout, dh_n):
        return self.backend.gru_layer_backward(saved, dout, dh_n)

    def __call__(self, x, h0=None):
        """x (B, N, input_size) -> (out (B, N, H), h_n (num_layers, B, H)), host arrays."""
        return self._run(x, h0)

    def _vjp(self, x, h0=None):
        return self._run_vjp(x, h0)
