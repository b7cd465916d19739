"""Elementwise training kernels on the GPU: zeros, gradient accumulation (axpy), Adam, dropout.

One thread per element of flat (C-order) arrays, ``Tuning.elem_threads`` per block; all are
memory-bound (axpy reads two arrays and writes one, Adam reads four and writes three).

* ``fill``   — ``zeros`` without a host array: ``device_array`` then one write per element
  (the base class uploads ``np.zeros``, a host-to-device copy on every call).
* ``adam``   — ``torch.optim.Adam``'s update, in place on param, m and v, in the parameter's
  dtype with the scalars formed in float64 on the host, operation by operation as the CPU
  backend's ``training.adam_step`` (m = m + (1 - b1)(g - m), PyTorch's lerp; v = v b2 +
  (1 - b2) g g; param += -lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)). NVVM
  contracts a multiply and an add into one FMA where the CPU rounds twice, so a float32 run
  follows the CPU backend's to within an ulp per step, not bit for bit.
* ``dropout`` — the counter-based stream of ``tfm.reference.dropout_uniform``, computed per
  element in uint64: with key = SplitMix64's finaliser of the seed (on the host), element i
  (flat, C order) is kept iff ``mix(key + (offset + i + 1) * 0x9E3779B97F4A7C15) >> 40 >=
  ceil(p * 2^24)`` (``reference.dropout_threshold``: integers, no float rounding), which is
  output number offset + i of a SplitMix64 generator started at key. The mask is therefore
  bit-identical to the CPU and numpy backends' for the same (seed, offset), on every run
  and every launch configuration; no mask array is stored (the backward recomputes it).
  Kept elements are x / (1 - p) divided in float64 and rounded once to the array's dtype,
  the CPU backend's value bit for bit (this kernel is the one float32 kernel with float64
  arithmetic: one division per element, hidden behind its memory traffic).

Variants: one each. Verdict: correct under the simulator (tests/cuda/test_cuda_training.py);
on the H200 (``python3 -m studies.gpu``) axpy passed results/gpu/smoke.csv and dropout the
base training step's gradient check (correctness.csv, training_step_gradients, rel. err
7.18e-07); Adam has no GPU check of its own. Not timed on their own: they run inside the
lab's training step (``python3 -m dev.cuda.lab --out DIR --family backward``,
dev/cuda/gpu/backward.csv): 138.9 ms per base step (B=8, n=128; IQR 188.5 ms), 0.34x eager
PyTorch's speed (47.5 ms).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
from numba import cuda, uint64

from ..base import adam_scalars
from ._launch import grid_1d, launch, numba_dtype, simulator_enabled
from ._views import c_view

VARIANTS = {"fill": "one thread per element", "axpy": "one thread per element",
            "adam": "one thread per element, in place", "dropout": "SplitMix64 per element, no stored mask"}

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (reference.SPLITMIX64_GAMMA)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_TOP = np.uint64(64 - 24)  # the top 24 bits (reference.UNIFORM_BITS)
_ONE = np.uint64(1)


def flat(a):
    """A contiguous device array as its 1-D view (in-place kernels write through it)."""
    if not a.is_c_contiguous():
        raise ValueError(f"expected a C-contiguous device array, got strides {tuple(a.strides)}")
    return c_view(a, (a.size,))


@lru_cache(maxsize=None)
def _fill_kernel(dtype):
    dt = numba_dtype(dtype)

    @cuda.jit(cache=True)
    def fill(out, value):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = dt(value)

    return fill


def zeros(shape, dtype, tuning):
    out = cuda.device_array(tuple(int(s) for s in shape), dtype=np.dtype(dtype))
    fill_(out, 0.0, tuning)
    return out


def fill_(out, value: float, tuning) -> None:
    """In place: every element of the contiguous device array ``out`` = ``value``."""
    if out.size == 0:
        return
    launch("fill", _fill_kernel(np.dtype(out.dtype)), grid_1d(out.size, tuning.elem_threads),
           tuning.elem_threads, flat(out), np.dtype(out.dtype).type(value))


@lru_cache(maxsize=None)
def _axpy_kernel(dtype):
    @cuda.jit(cache=True)
    def axpy_(dst, src, alpha):
        i = cuda.grid(1)
        if i < dst.shape[0]:
            dst[i] += alpha * src[i]

    return axpy_


def axpy(dst, src, alpha, tuning) -> None:
    """In place ``dst += alpha * src`` (same number of elements; dst contiguous)."""
    from .linear import contiguous

    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"axpy: src {tuple(src.shape)} does not match dst {tuple(dst.shape)}")
    if np.dtype(src.dtype) != np.dtype(dst.dtype):
        raise TypeError(f"axpy: src dtype {np.dtype(src.dtype)} differs from dst dtype {np.dtype(dst.dtype)}")
    if dst.size == 0:
        return
    dtype = np.dtype(dst.dtype)
    src = contiguous(src, tuning) if len(src.shape) in (3, 4) else src
    launch("axpy", _axpy_kernel(dtype), grid_1d(dst.size, tuning.elem_threads), tuning.elem_threads,
           flat(dst), flat(src), dtype.type(alpha))


@lru_cache(maxsize=None)
def _adam_kernel(dtype, weight_decay: bool):
    @cuda.jit(cache=True)
    def adam(p, g, m, v, w1, b2, w2, bc2, eps, neg_step, wd):
        i = cuda.grid(1)
        if i < p.shape[0]:
            gi = g[i]
            if weight_decay:
                gi = gi + wd * p[i]
            mi = m[i] + w1 * (gi - m[i])  # PyTorch's lerp for weights < 0.5
            vi = v[i] * b2
            vi = vi + w2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = p[i] + neg_step * (mi / (math.sqrt(vi) / bc2 + eps))

    return adam


def adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, tuning) -> None:
    """One torch.optim.Adam update (step counts from 1), in place on param, m and v."""
    from .linear import contiguous

    if not (tuple(grad.shape) == tuple(m.shape) == tuple(v.shape) == tuple(param.shape)):
        raise ValueError("adam_step: param, grad, m and v must have the same shape, got "
                         f"{tuple(param.shape)}, {tuple(grad.shape)}, {tuple(m.shape)}, {tuple(v.shape)}")
    dtype = np.dtype(param.dtype)
    if not (np.dtype(m.dtype) == np.dtype(v.dtype) == np.dtype(grad.dtype) == dtype):
        raise TypeError("adam_step: grad, m and v must have the parameter's dtype")
    scalars = adam_scalars(step, lr, beta1, beta2, eps, weight_decay)
    if param.size == 0:
        return
    grad = contiguous(grad, tuning) if len(grad.shape) in (3, 4) else grad
    launch("adam", _adam_kernel(dtype, bool(weight_decay)), grid_1d(param.size, tuning.elem_threads),
           tuning.elem_threads, flat(param), flat(grad), flat(m), flat(v), *map(dtype.type, scalars))


@lru_cache(maxsize=None)
def _dropout_kernel(dtype):
    dt = numba_dtype(dtype)

    @cuda.jit(cache=True)
    def dropout_(x, out, key, offset, threshold, keep_scale):
        i = cuda.grid(1)
        if i < x.shape[0]:
            # every operand uint64: mixed with a signed integer, numba would compute in float64
            z = key + (offset + uint64(i) + _ONE) * _GAMMA
            z = (z ^ (z >> _S30)) * _MIX_1
            z = (z ^ (z >> _S27)) * _MIX_2
            z = z ^ (z >> _S31)
            if (z >> _TOP) >= threshold:
                out[i] = dt(np.float64(x[i]) / keep_scale)  # the CPU backend's rounding
            else:
                out[i] = dt(0.0)

    return dropout_


def dropout(x, p, seed, offset, tuning):
    """Inverted dropout with the reference's counter-based mask (see the module docstring)."""
    from ...reference import training as ref
    from .linear import contiguous

    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must lie in [0, 1], got {p}")
    if int(offset) < 0:
        raise ValueError(f"dropout offset must be >= 0, got {offset}")
    key = ref._mix64(ref._check_seed(seed))
    dtype = np.dtype(x.dtype)
    if p == 1.0:  # everything dropped (PyTorch's convention), no division by zero
        return zeros(x.shape, dtype, tuning)
    x = contiguous(x, tuning) if len(x.shape) in (3, 4) else x
    out = cuda.device_array(tuple(x.shape), dtype=dtype)
    if x.size == 0:
        return out
    args = (flat(x), flat(out), np.uint64(key), np.uint64(int(offset)), np.uint64(ref.dropout_threshold(p)),
            np.float64(1.0 - p))
    with warnings.catch_warnings():
        if simulator_enabled():  # NumPy's uint64 scalars warn where the GPU wraps, as SplitMix64 wants
            warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
        launch("dropout", _dropout_kernel(dtype), grid_1d(x.size, tuning.elem_threads), tuning.elem_threads,
               *args)
    return out
