"""tfm: Numba kernels, benchmarks and complexity studies for the Transformer of
"Attention Is All You Need" (Vaswani et al., 2017).

Public API (stable):

    tfm.attention(q, k, v, *, mask=None, causal=False, impl="fused", backend="cpu")
    tfm.TransformerConfig(...)          presets: .base() .big() .small() .tiny()
    tfm.Transformer(config, seed=0, backend="cpu")
    tfm.from_torch(module, backend="cpu")   nn.Transformer -> tfm.EncoderDecoder
    tfm.get_backend(name)               "numpy" (float64 reference) | "cpu" | "cuda"
"""

from .backends import BACKENDS, BackendUnavailable, get_backend
from .config import TransformerConfig
from .errors import InsufficientMemoryError
from .functional import attention
from .interop import from_torch
from .models import EncoderDecoder, Transformer

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "EncoderDecoder",
    "InsufficientMemoryError",
    "Transformer",
    "TransformerConfig",
    "attention",
    "from_torch",
    "get_backend",
]
