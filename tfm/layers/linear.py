"""Dense sublayers: ``Linear`` (x W^T + b) and the position-wise ``FeedForward`` (eq. 2).

Weights use PyTorch's (out, in) layout and names, initialised Xavier-uniform with zero
biases (as ``torch.nn.Transformer`` resets its matrices; tfm uses it for every dense layer).
"""

from __future__ import annotations

from .._checks import check_bool, check_features, check_int
from ..config import ACTIVATIONS
from .module import Module, xavier_uniform, zeros

__all__ = ["FeedForward", "Linear"]


class Linear(Module):
    """y = x W^T + b over the last axis; parameters ``weight`` (out, in) and ``bias`` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, seed: int = 0,
                 backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.bias = check_bool("bias", bias)
        self.param("weight", (self.out_features, self.in_features), xavier_uniform)
        if self.bias:
            self.param("bias", (self.out_features,), zeros)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "dtype": self.dtype.name}

    def forward(self, x):
        """x (..., in_features) backend array -> (..., out_features)."""
        w = self.weights
        return self.backend.linear(x, w["weight"], w.get("bias"))

    def forward_train(self, x):
        """``forward`` and what its backward needs (the input)."""
        return self.forward(x), x

    def backward(self, x, dy):
        """dy (..., out_features) -> ((dx,), {"weight": dW, "bias": db}): dx = dy W, dW = dy^T x."""
        dx, dw, db = self.backend.linear_backward(x, self.weights["weight"], dy, bias=self.bias)
        return (dx,), ({"weight": dw, "bias": db} if self.bias else {"weight": dw})

    def _input(self, x):
        return self.backend.asarray(check_features("x", x, 3, self.in_features, "in_features"), self.dtype)

    def __call__(self, x):
        """x (B, N, in_features) -> (B, N, out_features), a host array."""
        return self._host(self.forward(self._input(x)))

    def _vjp(self, x):
        return self._pullback(*self.forward_train(self._input(x)), ("x",))


class FeedForward(Module):
    """FFN(x) = act(x W_1^T + b_1) W_2^T + b_2 (eq. 2; act: ReLU as the paper, or exact GELU).

    Parameters ``linear1.weight`` (d_ff, d_model), ``linear1.bias``, ``linear2.weight``
    (d_model, d_ff), ``linear2.bias``: the names in ``torch.nn.TransformerEncoderLayer``.
    One backend call (``feed_forward``) computes both products.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", *, seed: int = 0,
                 backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.d_model = check_int("d_model", d_model)
        self.d_ff = check_int("d_ff", d_ff)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.param("linear1.weight", (self.d_ff, self.d_model), xavier_uniform)
        self.param("linear1.bias", (self.d_ff,), zeros)
        self.param("linear2.weight", (self.d_model, self.d_ff), xavier_uniform)
        self.param("linear2.bias", (self.d_model,), zeros)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"d_model": self.d_model, "d_ff": self.d_ff, "activation": self.activation,
                "dtype": self.dtype.name}

    def forward(self, x):
        """x (B, N, d_model) backend array -> (B, N, d_model)."""
        w = self.weights
        return self.backend.feed_forward(x, w["linear1.weight"], w["linear1.bias"], w["linear2.weight"],
                                         w["linear2.bias"], self.activation)

    def forward_train(self, x):
        """``forward`` in three calls, keeping the hidden layer before and after the activation."""
        bk, w = self.backend, self.weights
        pre = bk.linear(x, w["linear1.weight"], w["linear1.bias"])  # (B, N, d_ff)
        hidden = bk.activation(pre, self.activation)  # (B, N, d_ff)
        return bk.linear(hidden, w["linear2.weight"], w["linear2.bias"]), (x, pre, hidden)

    def backward(self, saved, dy):
        """dy (B, N, d_model) -> ((dx,), gradients of the four parameters)."""
        bk, w = self.backend, self.weights
        x, pre, hidden = saved
        dhidden, dw2, db2 = bk.linear_backward(hidden, w["linear2.weight"], dy)  # (B, N, d_ff)
        dpre = bk.activation_backward(pre, dhidden, self.activation)  # (B, N, d_ff)
        dx, dw1, db1 = bk.linear_backward(x, w["linear1.weight"], dpre)  # (B, N, d_model)
        return (dx,), {"linear1.weight": dw1, "linear1.bias": db1, "linear2.weight": dw2, "linear2.bias": db2}

    def _input(self, x):
        return self.backend.asarray(check_features("x", x, 3, self.d_model, "d_model"), self.dtype)

    def __call__(self, x):
        """x (B, N, d_model) -> (B, N, d_model), a host array."""
        return self._host(self.forward(self._input(x)))

    def _vjp(self, x):
        return self._pullback(*self.forward_train(self._input(x)), ("x",))
