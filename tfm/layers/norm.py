"""Layer normalisation and the residual connection around each sublayer (section 3.1).

``LayerNorm`` is Ba et al.'s, with sqrt(var + eps) as PyTorch's. ``ResidualNorm`` is the
unit that wraps every sublayer of the Transformer: the paper's post-norm
``LayerNorm(x + Sublayer(x))`` (also ``torch.nn.Transformer``'s default) or the pre-norm
``x + Sublayer(LayerNorm(x))`` (``norm_first=True``; the Annotated Transformer's).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_dropout, check_features, check_int
from ..config import NORM_POSITIONS
from .module import Module, ones, zeros

__all__ = ["LayerNorm", "ResidualNorm"]


class LayerNorm(Module):
    """gamma * (x - mean) / sqrt(var + eps) + beta over the last axis; parameters ``weight``
    (gamma, ones) and ``bias`` (beta, zeros), as ``torch.nn.LayerNorm``."""

    def __init__(self, d_model: int, eps: float = 1e-5, *, seed: int = 0, backend="cpu",
                 dtype="float32"):
        super().__init__(dtype)
        self.d_model = check_int("d_model", d_model)
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.eps = float(eps)
        self.param("weight", (self.d_model,), ones)
        self.param("bias", (self.d_model,), zeros)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"d_model": self.d_model, "eps": self.eps, "dtype": self.dtype.name}

    def forward(self, x, residual=None):
        """LayerNorm(x + residual) on backend arrays (B, N, d_model); residual optional."""
        w = self.weights
        return self.backend.layer_norm(x, w["weight"], w["bias"], self.eps, residual=residual)

    def forward_train(self, x, residual=None):
        """``forward`` and what its backward needs: the inputs and each row's mean and 1/std."""
        w = self.weights
        y, mean, rstd = self.backend.layer_norm_train(x, w["weight"], w["bias"], self.eps, residual=residual)
        return y, (x, residual, mean, rstd)

    def backward(self, saved, dy):
        """-> ((d(x + residual),), {"weight": dgamma, "bias": dbeta}); the one input gradient
        is that of x and of residual alike."""
        x, residual, mean, rstd = saved
        dx, dgamma, dbeta = self.backend.layer_norm_backward(dy, x, self.weights["weight"], mean, rstd,
                                                             residual=residual)
        return (dx,), {"weight": dgamma, "bias": dbeta}

    def _input(self, x):
        return self.backend.asarray(check_features("x", x, 3, self.d_model, "d_model"), self.dtype)

    def __call__(self, x):
        """x (B, N, d_model) -> (B, N, d_model), a host array."""
        return self._host(self.forward(self._input(x)))

    def _vjp(self, x):
        return self._pullback(*self.forward_train(self._input(x)), ("x",))


class ResidualNorm(Module):
    """A residual connection around a sublayer, with its LayerNorm.

    ``norm="post"``: LayerNorm(x + Sublayer(x)), the paper's and nn.Transformer's default,
    one fused ``layer_norm(..., residual=x)`` call. ``norm="pre"``: x + Sublayer(LayerNorm(x)).
    The parameters are the LayerNorm's (``weight``, ``bias``), so in a layer this unit
    carries the LayerNorm's PyTorch name (``norm1``).
    """

    def __init__(self, d_model: int, norm: str = "post", eps: float = 1e-5, *, dropout: float = 0.0,
                 seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(dtype)
        if norm not in NORM_POSITIONS:
            raise ValueError(f"norm must be one of {NORM_POSITIONS}, got {norm!r}")
        self.norm_first = norm == "pre"
        self.dropout = check_dropout(dropout)
        self.norm = self.add(None, LayerNorm(d_model, eps, backend=None, dtype=dtype))
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"d_model": self.norm.d_model, "norm": "pre" if self.norm_first else "post",
                "eps": self.norm.eps, "dropout": self.dropout, "dtype": self.dtype.name}

    def forward(self, x, sublayer: Module, *args, **kwargs):
        """Backend arrays: ``sublayer.forward(h, *args, **kwargs)`` inside the connection."""
        if self.norm_first:
            return self.backend.add(x, sublayer.forward(self.norm.forward(x), *args, **kwargs))
        return self.norm.forward(sublayer.forward(x, *args, **kwargs), residual=x)

    def forward_train(self, x, sublayer: Module, *args, **kwargs):
        """``forward`` with dropout on the sublayer's output (section 5.4: "before it is added
        to the sub-layer input and normalized"), keeping what both backwards need."""
        if self.norm_first:
            h, norm_saved = self.norm.forward_train(x)
            s, sub_saved = sublayer.forward_train(h, *args, **kwargs)
            s, key = self._dropout(s, self.dropout)
            return self.backend.add(x, s), (norm_saved, sublayer, sub_saved, key)
        s, sub_saved = sublayer.forward_train(x, *args, **kwargs)
        s, key = self._dropout(s, self.dropout)
        y, norm_saved = self.norm.forward_train(s, residual=x)
        return y, (norm_saved, sublayer, sub_saved, key)

    def backward(self, saved, dy):
        """-> (dinputs, grads, sublayer grads): dinputs is dx followed by the gradients of the
        sublayer's other inputs (a cross-attention's memory); grads are the norm's."""
        norm_saved, sublayer, sub_saved, key = saved
        if self.norm_first:  # y = x + drop(sub(LN(x)))
            dsub, sub_grads = sublayer.backward(sub_saved, self._dropout_with(dy, self.dropout, key))
            (dx,), grads = self.norm.backward(norm_saved, dsub[0])
            self.backend.axpy(dx, dy)  # the residual path
            return (dx, *dsub[1:]), grads, sub_grads
        # y = LN(x + drop(sub(x))): dz, the gradient of the sum, reaches x directly and through sub
        (dz,), grads = self.norm.backward(norm_saved, dy)
        dsub, sub_grads = sublayer.backward(sub_saved, self._dropout_with(dz, self.dropout, key))
        self.backend.axpy(dz, dsub[0])
        return (dz, *dsub[1:]), grads, sub_grads

    def _inputs(self, x, sublayer):
        if not isinstance(sublayer, Module):
            raise TypeError(f"sublayer must be a tfm module (e.g. FeedForward), got {type(sublayer).__name__}")
        if sublayer.backend is not self.backend:
            raise ValueError(f"sublayer runs on backend {sublayer.backend.name!r}, this unit on "
                             f"{self.backend.name!r}; move one with .to()")
        x = check_features("x", x, 3, self.norm.d_model, "d_model")
        return self.backend.asarray(x, self.dtype), sublayer

    def __call__(self, x, sublayer: Module):
        """x (B, N, d_model) host array around ``sublayer`` (a tfm module on the same backend,
        mapping d_model features to d_model features) -> (B, N, d_model), a host array."""
        return self._host(self.forward(*self._inputs(x, sublayer)))

    def _vjp(self, x, sublayer: Module):
        """Parameter gradients: the norm's (``weight``, ``bias``) and the sublayer's, under
        ``sublayer.`` and its own names."""
        x, sublayer = self._inputs(x, sublayer)
        y, saved = self.forward_train(x, sublayer)

        def pullback(cotangent):
            (dx,), grads, sub_grads = self.backward(saved, self.backend.asarray(cotangent, self.dtype))
            return {"x": dx}, {**self.param_grads(grads),
                               **{f"sublayer.{k}": g for k, g in sublayer.param_grads(sub_grads).items()}}

        return self._host(y), pullback
