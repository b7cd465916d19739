"""Exceptions tfm raises besides the built-in ValueError/TypeError."""


class InsufficientMemoryError(ValueError, MemoryError):
    """A request would exhaust memory; raised before any allocation, with the bytes it needs.

    Subclasses ValueError (it is bad input for this machine) and MemoryError (so callers
    and the studies can treat it as an expected out-of-memory case).
    """


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run on this machine (e.g. CUDA without a GPU)."""
