"""Backend registry: ``get_backend("numpy" | "cpu" | "cuda")``.

Backends are created lazily and cached, so importing tfm never compiles a kernel or
touches a GPU. ``cuda`` raises :class:`~tfm.errors.BackendUnavailable` with the reason
when neither a GPU nor Numba's CUDA simulator is present (``CudaBackend()`` checks).

Adding a backend is one line in ``_REGISTRY`` (its module and class) plus the class itself.
"""

from __future__ import annotations

import importlib

from ..errors import BackendUnavailable
from .base import Backend

# name -> (module under tfm.backends, class): imported on first use.
_REGISTRY = {
    "numpy": ("numpy_backend", "NumpyBackend"),
    "cpu": ("cpu", "CpuBackend"),
    "cuda": ("cuda", "CudaBackend"),
}
BACKENDS = tuple(_REGISTRY)

_cache: dict[str, Backend] = {}


def get_backend(backend) -> Backend:
    """Resolve a backend name (or pass a Backend instance through)."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str) or backend not in _REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend not in _cache:
        module, cls = _REGISTRY[backend]
        _cache[backend] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    return _cache[backend]


__all__ = ["Backend", "BACKENDS", "BackendUnavailable", "get_backend"]
