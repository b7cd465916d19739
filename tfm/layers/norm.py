"""Layer normalisation and the residual connection around each sublayer (section 3.1).

``LayerNorm`` is Ba et al.'s, with sqrt(var + eps) as PyTorch's. ``ResidualNorm`` is the
unit that wraps every sublayer of the Transformer: the paper's post-norm
``LayerNorm(x + Sublayer(x))`` (also ``torch.nn.Transformer``'s default) or the pre-norm
``x + Sublayer(LayerNorm(x))`` (``norm_first=True``; the Annotated Transformer's).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_features, check_int
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

    def __call__(self, x):
        """x (B, N, d_model) -> (B, N, d_model), a host array."""
        x = check_features("x", x, 3, self.d_model, "d_model")
        return self._host(self.forward(self.backend.asarray(x, self.dtype)))


class ResidualNorm(Module):
    """A residual connection around a sublayer, with its LayerNorm.

    ``norm="post"``: LayerNorm(x + Sublayer(x)), the paper's and nn.Transformer's default,
    one fused ``layer_norm(..., residual=x)`` call. ``norm="pre"``: x + Sublayer(LayerNorm(x)).
    The parameters are the LayerNorm's (``weight``, ``bias``), so in a layer this unit
    carries the LayerNorm's PyTorch name (``norm1``).
    """

    def __init__(self, d_model: int, norm: str = "post", eps: float = 1e-5, *, seed: int = 0,
                 backend="cpu", dtype="float32"):
        super().__init__(dtype)
        if norm not in NORM_POSITIONS:
            raise ValueError(f"norm must be one of {NORM_POSITIONS}, got {norm!r}")
        self.norm_first = norm == "pre"
        self.norm = self.add(None, LayerNorm(d_model, eps, backend=None, dtype=dtype))
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"d_model": self.norm.d_model, "norm": "pre" if self.norm_first else "post",
                "eps": self.norm.eps, "dtype": self.dtype.name}

    def forward(self, x, sublayer: Module, *args, **kwargs):
        """Backend arrays: ``sublayer.forward(h, *args, **kwargs)`` inside the connection."""
        if self.norm_first:
            return self.backend.add(x, sublayer.forward(self.norm.forward(x), *args, **kwargs))
        return self.norm.forward(sublayer.forward(x, *args, **kwargs), residual=x)

    def __call__(self, x, sublayer: Module):
        """x (B, N, d_model) host array around ``sublayer`` (a tfm module on the same backend,
        mapping d_model features to d_model features) -> (B, N, d_model), a host array."""
        if not isinstance(sublayer, Module):
            raise TypeError(f"sublayer must be a tfm module (e.g. FeedForward), got {type(sublayer).__name__}")
        if sublayer.backend is not self.backend:
            raise ValueError(f"sublayer runs on backend {sublayer.backend.name!r}, this unit on "
                             f"{self.backend.name!r}; move one with .to()")
        x = check_features("x", x, 3, self.norm.d_model, "d_model")
        return self._host(self.forward(self.backend.asarray(x, self.dtype), sublayer))
