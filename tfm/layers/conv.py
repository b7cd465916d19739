"""Convolutional layers of Table 1, over (B, N, C) sequences (stride 1, zero padding):

    Conv1d          PyTorch's (C_out, C_in, k) weights; padding "causal" | "same" | "valid" |
                    int | (left, right)
    ConvStack       n residual layers x + relu(conv(x)); dilations 1, 1, ... or, with
                    ``dilated=True``, k^0, k^1, k^2, ... (ByteNet/WaveNet)
    ConvS2SBlock    sqrt(1/2) * (x + GLU(conv(x))), conv: C -> 2C channels (Gehring et al., 2017)

Weights and biases are drawn from U(-1/sqrt(C_in k), 1/sqrt(C_in k)), PyTorch's default.
"""

from __future__ import annotations

import math

from .._checks import check_bool, check_features, check_int
from .module import Module, scaled, uniform, upload

__all__ = ["Conv1d", "ConvS2SBlock", "ConvStack", "conv_padding"]

PADDINGS = ("causal", "same", "valid")
S = math.sqrt(0.5)  # ConvS2S's residual scale


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
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        return check_int("padding[0]", padding[0], 0), check_int("padding[1]", padding[1], 0)
    p = check_int("padding", padding, 0)
    return p, p


def _conv_params(module: Module, c_in: int, c_out: int, k: int, bias: bool) -> None:
    """Declare ``weight`` (c_out, c_in, k) and, with ``bias``, ``bias`` (c_out,)."""
    init = uniform(1.0 / math.sqrt(c_in * k))  # PyTorch's default
    module.param("weight", (c_out, c_in, k), init)
    if bias:
        module.param("bias", (c_out,), init)


class Conv1d(Module):
    """1-D convolution over (B, N, C_in) sequences, stride 1, PyTorch's (C_out, C_in, k) weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 padding="same", bias: bool = True, seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.dilation = check_int("dilation", dilation)
        self.padding = conv_padding(padding, self.kernel_size, self.dilation)
        self.bias = check_bool("bias", bias)
        _conv_params(self, self.in_channels, self.out_channels, self.kernel_size, self.bias)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "dilation": self.dilation,
                "padding": list(self.padding), "bias": self.bias, "dtype": self.dtype.name}

    def output_length(self, n: int) -> int:
        return n + sum(self.padding) - self.dilation * (self.kernel_size - 1)

    def _check_length(self, n: int) -> None:
        if self.output_length(n) < 1:
            span = self.dilation * (self.kernel_size - 1) + 1
            raise ValueError(
                f"kernel (size {self.kernel_size}, dilation {self.dilation}, span {span}) is "
                f"larger than the padded input (length {n} + padding {self.padding} = "
                f"{n + sum(self.padding)})")

    def forward(self, x):
        """x (B, N, C_in) backend array -> (B, N_out, C_out) backend array (no checks)."""
        w = self.weights
        return self.backend.conv1d(x, w["weight"], w.get("bias"), self.dilation, *self.padding)

    def forward_train(self, x):
        return self.forward(x), x

    def backward(self, x, dy):
        """dy (B, N_out, C_out) -> ((dx,), {"weight": dW, "bias": db})."""
        dx, dw, db = self.backend.conv1d_backward(x, self.weights["weight"], dy, self.dilation, *self.padding,
                                                  bias=self.bias)
        return (dx,), ({"weight": dw, "bias": db} if self.bias else {"weight": dw})

    def _input(self, x):
        x = check_features("x", x, 3, self.in_channels, "in_channels")
        self._check_length(x.shape[1])
        return self.backend.asarray(x, self.dtype)

    def __call__(self, x):
        """x (B, N, in_channels) -> (B, N_out, out_channels), N_out = N + pads - dilation*(k-1)."""
        return self._host(self.forward(self._input(x)))

    def _vjp(self, x):
        return self._pullback(*self.forward_train(self._input(x)), ("x",))


class ConvStack(Module):
    """``n_layers`` residual convolutions x <- x + relu(conv_l(x)) at constant width.

    Dilations are all 1 (a contiguous stack: receptive field n_layers*(k-1) + 1) or, with
    ``dilated=True``, k^0, k^1, k^2, ... (ByteNet/WaveNet: receptive field k^n_layers).
    ``causal=True`` pads on the left only, so no output reads a later input. Parameters:
    ``layers.{l}.weight``, ``layers.{l}.bias``.
    """

    def __init__(self, channels: int, kernel_size: int, n_layers: int, dilated: bool = False,
                 causal: bool = False, seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.channels = check_int("channels", channels)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.n_layers = check_int("n_layers", n_layers)
        self.dilated, self.causal = check_bool("dilated", dilated), check_bool("causal", causal)
        if self.dilated and self.kernel_size < 2:
            raise ValueError("a dilated stack needs kernel_size >= 2 (dilations are powers of k)")
        self.dilations = [self.kernel_size ** i if self.dilated else 1 for i in range(self.n_layers)]
        self.layers = [self.add(f"layers.{i}", Conv1d(self.channels, self.channels, self.kernel_size,
                                                      dilation=d, padding="causal" if causal else "same",
                                                      backend=None, dtype=dtype))
                       for i, d in enumerate(self.dilations)]
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"channels": self.channels, "kernel_size": self.kernel_size, "n_layers": self.n_layers,
                "dilated": self.dilated, "causal": self.causal, "dtype": self.dtype.name}

    @property
    def receptive_field(self) -> int:
        return 1 + sum(d * (self.kernel_size - 1) for d in self.dilations)

    def forward(self, x):
        """x (B, N, channels) backend array -> (B, N, channels)."""
        bk = self.backend
        for layer in self.layers:
            x = bk.add(x, bk.activation(layer.forward(x), "relu"))
        return x

    def forward_train(self, x):
        bk, saved = self.backend, []
        for layer in self.layers:
            c, conv_saved = layer.forward_train(x)  # (B, N, channels), before the relu
            x = bk.add(x, bk.activation(c, "relu"))
            saved.append((conv_saved, c))
        return x, saved

    def backward(self, saved, dy):
        """-> ((dx,), gradients): each layer's residual adds dy to what comes through its conv."""
        bk, grads = self.backend, {}
        for i in reversed(range(self.n_layers)):
            conv_saved, c = saved[i]
            (dx,), g = self.layers[i].backward(conv_saved, bk.activation_backward(c, dy, "relu"))
            bk.axpy(dx, dy)  # dx is the conv's fresh gradient
            self._merge(grads, f"layers.{i}", g)
            dy = dx
        return (dy,), grads

    def _input(self, x):
        return self.backend.asarray(check_features("x", x, 3, self.channels, "channels"), self.dtype)

    def __call__(self, x):
        """x (B, N, channels) -> (B, N, channels), a host array."""
        return self._host(self.forward(self._input(x)))

    def _vjp(self, x):
        return self._pullback(*self.forward_train(self._input(x)), ("x",))


class ConvS2SBlock(Module):
    """ConvS2S residual block: y = sqrt(1/2) * (x + GLU(conv(x))), conv: C -> 2C channels.

    Centred ("same") or ``causal`` padding keeps the length; GLU(a, b) = a * sigmoid(b).
    Parameters ``weight`` (2C, C, k) and ``bias`` (2C,).

    The backend has no scalar multiply, so on backend arrays the block works in a carried
    scale: with c = ``input_scale``, ``forward(v)`` takes v = x / c and returns
    v + GLU(conv(c v)) / c = y / (sqrt(1/2) c), the input of a next block whose
    ``input_scale`` is sqrt(1/2) c. The factor c is folded into the weights at upload
    (GLU(conv(c v)) / c has the value half's bias divided by c and the gate half's weight
    times c), so a stack of blocks (``tfm.ConvS2S``) costs no extra backend call per block.
    The public call takes and returns x and y themselves, whatever ``input_scale``.
    """

    def __init__(self, channels: int, kernel_size: int, causal: bool = False, dilation: int = 1,
                 seed: int = 0, backend="cpu", dtype="float32", *, input_scale: float = 1.0):
        super().__init__(dtype)
        self.channels = check_int("channels", channels)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.dilation = check_int("dilation", dilation)
        self.causal = check_bool("causal", causal)
        self.padding = conv_padding("causal" if self.causal else "same", self.kernel_size, self.dilation)
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or not input_scale > 0:
            raise ValueError(f"input_scale must be a number > 0, got {input_scale!r}")
        self.input_scale = float(input_scale)
        _conv_params(self, self.channels, 2 * self.channels, self.kernel_size, True)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"channels": self.channels, "kernel_size": self.kernel_size, "causal": self.causal,
                "dilation": self.dilation, "input_scale": self.input_scale, "dtype": self.dtype.name}

    def _device_params(self, bk):
        c, half = self.input_scale, self.channels
        if c == 1.0:
            return super()._device_params(bk)
        w, b = self._params["weight"].copy(), self._params["bias"].copy()
        w[half:] *= c  # gate half: sees c v
        b[:half] /= c  # value half: GLU(...) / c
        # The parameters themselves too: an optimizer updates them and refolds (_refresh).
        return {**upload(bk, {"weight": w, "bias": b}, self.dtype),
                **upload(bk, {"true.weight": self._params["weight"], "true.bias": self._params["bias"]},
                         self.dtype)}

    def _slots(self):
        if self.input_scale == 1.0:
            return super()._slots()
        return {"weight": self.weights["true.weight"], "bias": self.weights["true.bias"]}

    def _unfold(self, dw, db):
        """Gradients of the folded weight and bias -> those of the parameters (the fold is
        diagonal: the same factors again)."""
        c, bk = self.input_scale, self.backend
        if c == 1.0:
            return {"weight": dw, "bias": db}
        return {"weight": scaled(bk, dw, 1.0, c), "bias": scaled(bk, db, 1.0 / c, 1.0)}

    def _refresh(self):
        c, w, bk = self.input_scale, self.weights, self.backend
        if c != 1.0:
            w["weight"], w["bias"] = scaled(bk, w["true.weight"], 1.0, c), scaled(bk, w["true.bias"], 1.0 / c, 1.0)

    def glu_conv(self, v):
        """GLU(conv(c v)) / c for v (B, N, C) on backend arrays (c = input_scale)."""
        w, bk = self.weights, self.backend
        return bk.glu(bk.conv1d(v, w["weight"], w["bias"], self.dilation, *self.padding))

    def glu_conv_train(self, v):
        """``glu_conv`` and what its backward needs."""
        w, bk = self.weights, self.backend
        h = bk.conv1d(v, w["weight"], w["bias"], self.dilation, *self.padding)  # (B, N, 2C)
        return bk.glu(h), (v, h)

    def glu_conv_backward(self, saved, dg):
        """dg (B, N, C) of ``glu_conv`` -> (dv, gradients of the parameters)."""
        bk, w = self.backend, self.weights
        v, h = saved
        dv, dw, db = bk.conv1d_backward(v, w["weight"], bk.glu_backward(h, dg), self.dilation, *self.padding)
        return dv, self._unfold(dw, db)

    def forward(self, v):
        """v + GLU(conv(c v)) / c on backend arrays: y / (sqrt(1/2) c) for v = x / c."""
        return self.backend.add(v, self.glu_conv(v))

    def forward_train(self, v):
        g, saved = self.glu_conv_train(v)
        return self.backend.add(v, g), saved

    def backward(self, saved, dy):
        """dy of ``forward``'s output -> ((dv,), gradients of ``weight`` and ``bias``)."""
        dv, grads = self.glu_conv_backward(saved, dy)
        self.backend.axpy(dv, dy)  # the residual
        return (dv,), grads

    def _input(self, x):
        """The carried-scale input v = x / c of a host x, on the backend."""
        x = check_features("x", x, 3, self.channels, "channels")
        c = self.input_scale
        return self.backend.asarray(x if c == 1.0 else x / c, self.dtype)

    def __call__(self, x):
        """x (B, N, channels) -> y (B, N, channels), a host array."""
        return self._host(self.forward(self._input(x))) * (S * self.input_scale)

    def _vjp(self, x):
        # y = (S c) forward(x / c): the cotangent of forward's output is (S c) dy, and dx = dv / c.
        c = self.input_scale
        out, saved = self.forward_train(self._input(x))

        def pullback(dy):
            (dv,), grads = self.backward(saved, self.backend.asarray(dy * (S * c), self.dtype))
            return {"x": self._host(dv) / c}, self.param_grads(grads)

        return self._host(out) * (S * c), pullback
