"""The ``cuda`` backend: numba-cuda kernels (``@cuda.jit``), tested under Numba's simulator.

Kernel modules (the same names as the CPU backend) are imported on first use:

    linear.py      tiled GEMM (linear, FFN, batched products), add, ReLU/GELU, casts
    norm.py        layer norm (+ residual), masked softmax, log-softmax, argmax
    embedding.py   embedding gather, cached positional-encoding table
    attention.py   naive and fused (FlashAttention-2 style) attention, head split/merge, KV writes
    restricted.py  restricted (windowed) self-attention through the banded fused kernel
    recurrent.py   Elman RNN, LSTM, GRU (one GEMM for the inputs, one launch per step)
    conv.py        1-D convolution (im2col + GEMM), GLU
    training.py    zeros, gradient accumulation (axpy), the Adam step, dropout (counter-based)
    _launch.py     tile/block sizes (``Tuning``), resource checks, the launch paths
    _memory.py     caching device allocator (on unless ``TFM_CUDA_POOL=0``; imported only when on)
    _cublas.py     cuBLAS SGEMM/DGEMM through CuPy's bindings on numba device pointers
    _views.py      strided views (split heads, head-merged outputs) without numba's slicing
    _offline.py    compiling kernels for sm_90 without a GPU (PTX test, the lab's ptx family)

Each backward kernel sits in its forward's module, after it (training: the ``*_train``
forwards, ``*_backward``, cross-entropy, dropout, Adam; ``tfm.backends.base``'s contract).

The kernel variants kept for comparison are timed by the lab, ``python3 -m dev.cuda.lab``.

Data stays on the device: every method takes and returns numba-cuda device arrays;
``asarray`` uploads host arrays and wraps ``__cuda_array_interface__`` objects (CuPy,
PyTorch CUDA tensors) without copying; ``to_numpy`` is the only download (and ``argmax``,
which the interface defines as returning host int64 ids for greedy decoding).

This module never touches a GPU at import: :func:`cuda_unavailable_reason` says whether
a GPU or the simulator can be used, and ``tfm.get_backend("cuda")`` turns a reason into
``BackendUnavailable``.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import numpy as np

from ..base import Backend
from ._compat import install as _install_numpy_shims

_install_numpy_shims()  # before numba-cuda loads its CUDA target (see _compat)

GEMM_IMPLS = ("auto", "numba", "cupy")


def pool_requested() -> bool:
    """The caching allocator (``_memory``) is on unless ``TFM_CUDA_POOL=0``: on the H200 it
    made the base forward 2.2x faster (dev/cuda/gpu/forward.csv). ``_memory`` is imported
    only when it is installed: it needs numba-cuda's ``binding`` module, which older releases lack."""
    return os.environ.get("TFM_CUDA_POOL", "1").strip() not in ("", "0")


def _simulator_requested() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA GPU or Numba's CUDA simulator is usable, else a one-line reason."""
    try:
        from numba import config, cuda
    except Exception as exc:  # pragma: no cover - numba-cuda is a hard dependency
        return f"numba.cuda cannot be imported ({type(exc).__name__}: {exc})"
    if config.ENABLE_CUDASIM:
        return None
    try:
        if cuda.is_available():
            return None
    except Exception as exc:  # a broken driver install
        return f"the CUDA driver failed to initialise ({type(exc).__name__}: {exc})"
    if _simulator_requested():
        return ("NUMBA_ENABLE_CUDASIM is set but numba was imported before it was set; "
                "set it before the process starts")
    return ("no CUDA GPU detected (numba.cuda.is_available() is False) and "
            "NUMBA_ENABLE_CUDASIM is not set")


def device_view(x):
    """A numba device array for ``x`` if it lives on the device (zero copy), else None."""
    if getattr(x, "__cuda_ndarray__", False):  # numba's (and the simulator's) device arrays
        return x
    if hasattr(x, "__cuda_array_interface__"):  # CuPy, PyTorch CUDA tensors, ...
        from numba import cuda

        return cuda.as_cuda_array(x)
    return None


# numba releases device memory with cuMemFree, which synchronizes the device, in batches of
# NUMBA_CUDA_MAX_PENDING_DEALLOCS_COUNT pending frees (default 10). A forward pass makes
# hundreds of temporaries, so the default would stall the launch pipeline every ~10 ops.
# Batch this many instead, unless the user chose a value; numba still flushes when pending
# frees exceed 20% of device memory and before retrying an allocation that ran out of memory.
PENDING_FREES = 1024


def batch_device_frees() -> None:
    if os.environ.get("NUMBA_CUDA_MAX_PENDING_DEALLOCS_COUNT"):
        return
    try:
        from numba.cuda.core import config
    except ImportError:  # the simulator frees nothing on a device
        return
    config.CUDA_DEALLOCS_COUNT = max(config.CUDA_DEALLOCS_COUNT, PENDING_FREES)


def _resolve_gemm(gemm: str) -> str:
    """"auto" -> "cupy" where cuBLAS works here, else "numba"; "cupy" must work or raise."""
    if gemm == "numba":
        return gemm
    from ._cublas import cublas_unavailable_reason

    reason = cublas_unavailable_reason()
    if reason is None:
        return "cupy"
    if gemm == "cupy":
        raise ValueError(f"gemm='cupy' is unavailable: {reason}")
    from ._launch import simulator_enabled

    if not simulator_enabled():  # under the simulator the Numba GEMM is the only choice
        import warnings

        warnings.warn(f"cuda backend: using the Numba GEMM because cuBLAS through CuPy is "
                      f"unavailable: {reason}", RuntimeWarning, stacklevel=3)
    return "numba"


@lru_cache(maxsize=None)
def _k(module: str):
    """A kernel module, imported on first use (importlib per call cost ~7% of a forward pass's
    host time)."""
    return importlib.import_module(f"{__name__}.{module}")


class CudaBackend(Backend):
    """numba-cuda kernels. ``tuning``: a :class:`~._launch.Tuning` (tile/block sizes);
    ``gemm``: "cupy" (cuBLAS through CuPy), "numba" (this package's tiled GEMM) or "auto"
    (the default: cuBLAS when CuPy imports and passes a small self-check on this device,
    else the Numba GEMM, with a warning that says why). ``self.gemm`` names the one in use."""

    name = "cuda"

    def __init__(self, tuning=None, gemm: str = "auto"):
        reason = cuda_unavailable_reason()
        if reason is not None:
            from .. import BackendUnavailable

            raise BackendUnavailable(f"backend 'cuda' is unavailable: {reason}")
        from ._launch import Tuning, default_tuning, simulator_enabled

        if simulator_enabled():
            from ._simulator import thread_safe_shared_arrays

            thread_safe_shared_arrays()  # works around a race in the simulator (see there)
        elif pool_requested():  # before default_tuning() creates the CUDA context
            from ._memory import install_pool

            install_pool()

        if gemm not in GEMM_IMPLS:
            raise ValueError(f"unknown gemm {gemm!r}; choose one of {', '.join(GEMM_IMPLS)}")
        if tuning is not None and not isinstance(tuning, Tuning):
            raise TypeError(f"tuning must be a tfm.backends.cuda._launch.Tuning, got {type(tuning).__name__}")
        self.tuning = tuning if tuning is not None else default_tuning()
        self.gemm = _resolve_gemm(gemm)
        batch_device_frees()

    def __repr__(self) -> str:
        return f"<tfm backend 'cuda' gemm={self.gemm!r}>"

    # ------------------------------------------------------------------ data movement
    def asarray(self, x, dtype=None):
        """Host arrays are uploaded; device arrays pass through without a copy (cast or made
        contiguous on the device only when they must be)."""
        from numba import cuda

        arr = device_view(x)
        if arr is None:
            host = np.asarray(x)
            if dtype is not None and host.dtype != np.dtype(dtype):
                host = host.astype(dtype)
            return cuda.to_device(np.ascontiguousarray(host))
        if np.dtype(arr.dtype) == np.bool_:  # masks: kernels index them through their strides
            return arr
        arr = _k("linear").contiguous(arr, self.tuning)  # strided views: one device copy
        if dtype is not None and np.dtype(arr.dtype) != np.dtype(dtype):
            arr = _k("linear").cast(arr, np.dtype(dtype), self.tuning)
        return arr

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        return np.ascontiguousarray(x.copy_to_host())  # head views come back strided

    def empty(self, shape, dtype):
        from numba import cuda

        return cuda.device_array(tuple(shape), dtype=np.dtype(dtype))

    def synchronize(self) -> None:
        from numba import cuda

        cuda.synchronize()

    def free_memory_bytes(self) -> int:
        """Free device memory (under the simulator, which reports infinity: free host RAM)."""
        from numba import cuda

        ctx = cuda.current_context()
        free = ctx.get_memory_info()[0]
        if free == float("inf"):
            import psutil

            return int(psutil.virtual_memory().available)
        cached = getattr(ctx.memory_manager, "cached_bytes", None)  # the pool's free lists are free too
        return int(free) + (cached() if cached is not None else 0)

    # ------------------------------------------------------------------ dense layers
    def linear(self, x, weight, bias=None):
        return _k("linear").linear(x, weight, bias, self.tuning, self.gemm)

    def add(self, a, b):
        return _k("linear").add(a, b, self.tuning)

    def activation(self, x, kind):
        return _k("linear").activation(x, kind, self.tuning)

    def feed_forward(self, x, w1, b1, w2, b2, activation):
        return _k("linear").feed_forward(x, w1, b1, w2, b2, activation, self.tuning, self.gemm)

    def layer_norm(self, x, gamma, beta, eps, residual=None):
        return _k("norm").layer_norm(x, gamma, beta, eps, residual, self.tuning)

    def softmax(self, x):
        return _k("norm").softmax(x, self.tuning)

    def log_softmax(self, x):
        return _k("norm").log_softmax(x, self.tuning)

    def argmax(self, x):
        return _k("norm").argmax(x, self.tuning)

    # ------------------------------------------------------------------ embeddings
    def embedding(self, ids, table, scale=1.0):
        return _k("embedding").embedding(ids, table, scale, self.tuning)

    def add_positional_encoding(self, x, offset=0):
        return _k("embedding").add_positional_encoding(x, offset, self.tuning)

    # ------------------------------------------------------------------ attention
    def split_heads(self, x, n_heads, start=0, width=None):
        return _k("attention").split_heads(x, n_heads, self.tuning, start, width)

    def merge_heads(self, x):
        return _k("attention").merge_heads(x, self.tuning)

    def attention(self, q, k, v, mask=None, causal=False, impl="fused"):
        return _k("attention").attention(q, k, v, mask, causal, impl, self.tuning)

    def write_rows(self, dst, src, start):
        _k("attention").write_rows(dst, src, start, self.tuning)

    def leading_rows(self, x, n):
        # numba's x[:, :, :n] walks the view's contiguous extents in Python (one per (b, h)
        # row block) at every decoding step; the view's strides are x's own.
        from ._views import strided_view

        return strided_view(x, (*x.shape[:2], int(n), x.shape[3]), x.strides)

    # ------------------------------------------------------------------ baselines
    def restricted_attention(self, q, k, v, window, causal=False):
        return _k("restricted").restricted_attention(q, k, v, window, causal, self.tuning)

    def rnn_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
        return _k("recurrent").rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity,
                                         self.tuning, self.gemm)

    def lstm_layer(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, self.tuning, self.gemm)

    def gru_layer(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, self.tuning, self.gemm)

    def conv1d(self, x, weight, bias, dilation=1, pad_left=0, pad_right=0):
        return _k("conv").conv1d(x, weight, bias, dilation, pad_left, pad_right, self.tuning)

    def glu(self, x):
        return _k("conv").glu(x, self.tuning)

    # ------------------------------------------------------------------ training
    def zeros(self, shape, dtype):
        return _k("training").zeros(shape, dtype, self.tuning)

    def axpy(self, dst, src, alpha=1.0):
        _k("training").axpy(dst, src, alpha, self.tuning)

    def adam_step(self, param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay=0.0):
        _k("training").adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, self.tuning)

    def dropout(self, x, p, seed, offset=0):
        return _k("training").dropout(x, p, seed, offset, self.tuning)

    def linear_backward(self, x, weight, dy, bias=True):
        return _k("linear").linear_backward(x, weight, dy, bias, self.tuning, self.gemm)

    def activation_backward(self, x, dy, kind):
        return _k("linear").activation_backward(x, dy, kind, self.tuning)

    def layer_norm_train(self, x, gamma, beta, eps, residual=None):
        return _k("norm").layer_norm(x, gamma, beta, eps, residual, self.tuning, stats=True)

    def layer_norm_backward(self, dy, x, gamma, mean, rstd, residual=None):
        return _k("norm").layer_norm_backward(dy, x, gamma, mean, rstd, residual, self.tuning)

    def softmax_backward(self, y, dy):
        return _k("norm").softmax_backward(y, dy, self.tuning)

    def log_softmax_backward(self, y, dy):
        return _k("norm").log_softmax_backward(y, dy, self.tuning)

    def cross_entropy(self, logits, targets, weights, label_smoothing=0.0):
        return _k("norm").cross_entropy(logits, targets, weights, label_smoothing, self.tuning)

    def embedding_backward(self, ids, dy, vocab_size, scale=1.0):
        return _k("embedding").embedding_backward(ids, dy, vocab_size, scale, self.tuning)

    def merge_heads_into(self, x, out, start):
        _k("attention").merge_heads_into(x, out, start, self.tuning)

    def attention_train(self, q, k, v, mask=None, causal=False, impl="fused"):
        return _k("attention").attention(q, k, v, mask, causal, impl, self.tuning, save_lse=True)

    def attention_backward(self, q, k, v, out, lse, dout, mask=None, causal=False, impl="fused"):
        free = self.free_memory_bytes() if impl == "naive" else None
        return _k("attention").attention_backward(q, k, v, out, lse, dout, mask, causal, impl, self.tuning, free)

    def restricted_attention_train(self, q, k, v, window, causal=False):
        return _k("restricted").restricted_attention(q, k, v, window, causal, self.tuning, save_lse=True)

    def restricted_attention_backward(self, q, k, v, out, lse, dout, window, causal=False):
        return _k("restricted").restricted_attention_backward(q, k, v, out, lse, dout, window, causal, self.tuning)

    def rnn_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
        return _k("recurrent").rnn_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, self.tuning, self.gemm)

    def rnn_layer_backward(self, saved, dout, dh_n):
        return _k("recurrent").rnn_layer_backward(saved, dout, dh_n, self.tuning, self.gemm)

    def lstm_layer_train(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh, self.tuning, self.gemm)

    def lstm_layer_backward(self, saved, dout, dh_n, dc_n):
        return _k("recurrent").lstm_layer_backward(saved, dout, dh_n, dc_n, self.tuning, self.gemm)

    def gru_layer_train(self, x, h0, w_ih, w_hh, b_ih, b_hh):
        return _k("recurrent").gru_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, self.tuning, self.gemm)

    def gru_layer_backward(self, saved, dout, dh_n):
        return _k("recurrent").gru_layer_backward(saved, dout, dh_n, self.tuning, self.gemm)

    def conv1d_backward(self, x, weight, dy, dilation=1, pad_left=0, pad_right=0, bias=True):
        return _k("conv").conv1d_backward(x, weight, dy, dilation, pad_left, pad_right, bias, self.tuning,
                                          self.gemm)

    def glu_backward(self, x, dy):
        return _k("conv").glu_backward(x, dy, self.tuning)


__all__ = ["CudaBackend", "GEMM_IMPLS", "cuda_unavailable_reason", "device_view", "pool_requested"]
