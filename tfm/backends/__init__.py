"""Backend registry: ``get_backend("numpy" | "cpu" | "cuda")``.

Backends are created lazily and cached, so importing tfm never compiles a kernel or
touches a GPU. ``cuda`` raises :class:`BackendUnavailable` with the reason when neither a
GPU nor Numba's CUDA simulator is present.
"""

from __future__ import annotations

from .base import Backend

BACKENDS = ("numpy", "cpu", "cuda")

_cache: dict[str, Backend] = {}


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run on this machine (e.g. CUDA without a GPU)."""


def get_backend(backend) -> Backend:
    """Resolve a backend name (or pass a Backend instance through)."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend not in _cache:
        if backend == "numpy":
            from .numpy_backend import NumpyBackend

            _cache[backend] = NumpyBackend()
        elif backend == "cpu":
            from .cpu import CpuBackend

            _cache[backend] = CpuBackend()
        else:
            from .cuda import CudaBackend, cuda_unavailable_reason

            reason = cuda_unavailable_reason()
            if reason is not None:
                raise BackendUnavailable(f"backend 'cuda' is unavailable: {reason}")
            _cache[backend] = CudaBackend()
    return _cache[backend]


__all__ = ["Backend", "BACKENDS", "BackendUnavailable", "get_backend"]
