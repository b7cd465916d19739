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

    def __call__(self, x):
        """x (B, N, in_features) -> (B, N, out_features), a host array."""
        x = check_features("x", x, 3, self.in_features, "in_features")
        return self._host(self.forward(self.backend.asarray(x, self.dtype)))


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

    def __call__(self, x):
        """x (B, N, d_model) -> (B, N, d_model), a host array."""
        x = check_features("x", x, 3, self.d_model, "d_model")
        return self._host(self.forward(self.backend.asarray(x, self.dtype)))
