"""Elementwise training kernels on the CPU: gradient accumulation (axpy), the Adam step, dropout.

Each is one pass over flat arrays, in place, ``prange`` over chunks of ``CHUNK`` elements
once the array reaches ``_threads.SMALL_ELEMENTS`` (below that the calling thread does it:
waking the second thread of a busy machine costs more than the work, see ``_threads``).
They are memory-bound: axpy reads two arrays and writes one, Adam reads four and writes three.

Dropout draws its mask from the counter-based stream of ``tfm.reference.dropout_uniform``
(SplitMix64's finaliser of key + (counter + 1) * G on uint64, top 24 bits), computed per
element inside the kernel: no mask array is stored, the backward recomputes it from (seed,
offset), and every element's keep bit equals the reference's (the comparison is on the
integer r >= ceil(p 2^24), ``reference.dropout_threshold``). Kept elements are x / (1 - p)
formed in float64 and rounded once: the reference's value, rounded to the array's dtype.

Adam follows ``torch.optim.Adam``'s single-tensor path (the CPU default) operation by
operation, in the parameter's dtype: m = lerp(m, g, 1 - beta1) (m + w (g - m) for w < 0.5,
as PyTorch's lerp), v = v * beta2 + (1 - beta2) g g, param += -step_size * m / (sqrt(v) /
sqrt(1 - beta2^t) + eps) with step_size = lr / (1 - beta1^t), so that a float32 training run
follows PyTorch's step for step (the scalars are formed in float64, as Python does there).

Time / PyTorch's, 1 M parameters (2048 x 512) and 2 M activations (``python -m
dev.cpu.training_ops``, dev/cpu/results/training_ops.csv, interleaved, same 2 threads, load
~7): Adam step 0.23 (0.14-0.24) of ``torch.optim.Adam.step``'s (single-tensor path, one
PyTorch kernel per operation); dropout 0.075 (0.04-0.09) of ``F.dropout``'s (its own random
stream: the same work, not the same mask).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..base import adam_scalars
from ._threads import SMALL_ELEMENTS

CHUNK = 1 << 14  # elements per parallel work item (64 KiB of float32)


def _flat(a, name):
    """The C-contiguous array itself, flattened as a view (in-place kernels must write into it)."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous NumPy array (updated in place)")
    return a.reshape(-1)


@njit(cache=True)
def _axpy_range(dst, src, alpha, i0, i1):
    # Loops over slices, indexed from 0: from a runtime start (range(i0, i1)) Numba's loops
    # here ran ~35x slower (see linear._activation_backward_range).
    a = dst.dtype.type(alpha)
    d, s = dst[i0:i1], src[i0:i1]
    for i in range(d.shape[0]):
        d[i] += a * s[i]


@njit(cache=True, parallel=True)
def _axpy_parallel(dst, src, alpha):
    size = dst.shape[0]
    for c in prange((size + CHUNK - 1) // CHUNK):
        _axpy_range(dst, src, alpha, c * CHUNK, min(size, (c + 1) * CHUNK))


def axpy(dst, src, alpha=1.0):
    """In place dst += alpha * src (same shapes)."""
    d = _flat(dst, "dst")
    s = np.ascontiguousarray(src, dtype=d.dtype).reshape(-1)
    if s.shape != d.shape:
        raise ValueError(f"axpy: src {np.shape(src)} does not match dst {dst.shape}")
    if d.size < SMALL_ELEMENTS:
        _axpy_range(d, s, float(alpha), 0, d.size)
    else:
        _axpy_parallel(d, s, float(alpha))


@njit(cache=True, error_model="numpy")  # no zero-divisor check: it kept the loop scalar
def _adam_range(p, g, m, v, scalars, weight_decay, i0, i1):
    """Elements i0:i1 of one Adam update; ``scalars`` = (1 - beta1, beta2, 1 - beta2,
    sqrt(1 - beta2^t), eps, -lr / (1 - beta1^t), weight_decay) in the parameter's dtype."""
    w1, b2, w2, bc2, eps, neg_step, wd = scalars
    p, g, m, v = p[i0:i1], g[i0:i1], m[i0:i1], v[i0:i1]
    for i in range(p.shape[0]):
        gi = g[i]
        if weight_decay:
            gi = gi + wd * p[i]
        mi = m[i] + w1 * (gi - m[i])  # PyTorch's lerp for weights < 0.5
        vi = v[i] * b2
        vi = vi + w2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] + neg_step * (mi / (math.sqrt(vi) / bc2 + eps))


@njit(cache=True, parallel=True)
def _adam_parallel(p, g, m, v, scalars, weight_decay):
    size = p.shape[0]
    for c in prange((size + CHUNK - 1) // CHUNK):
        _adam_range(p, g, m, v, scalars, weight_decay, c * CHUNK, min(size, (c + 1) * CHUNK))


def adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay=0.0):
    """One torch.optim.Adam update (step counts from 1), in place on param, m and v."""
    p = _flat(param, "param")
    mf, vf = _flat(m, "m"), _flat(v, "v")
    g = np.ascontiguousarray(grad, dtype=p.dtype).reshape(-1)
    if not (g.shape == mf.shape == vf.shape == p.shape):
        raise ValueError("adam_step: param, grad, m and v must have the same shape")
    if not (mf.dtype == vf.dtype == p.dtype):
        raise TypeError("adam_step: m and v must have the parameter's dtype")
    scalars = np.array(adam_scalars(step, lr, beta1, beta2, eps, weight_decay), dtype=p.dtype)
    args = (p, g, mf, vf, scalars, bool(weight_decay))
    if p.size < SMALL_ELEMENTS:
        _adam_range(*args, 0, p.size)
    else:
        _adam_parallel(*args)


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_TOP = np.uint64(64 - 24)  # the top 24 bits: reference.UNIFORM_BITS
_ONE = np.uint64(1)


@njit(cache=True)
def _dropout_range(x, out, key, offset, threshold, keep_scale, i0, i1):
    """out[i] = x[i] / keep_scale if mix(key + (offset + i + 1) G) >> 40 >= threshold else 0.

    Every constant is uint64: a uint64 mixed with a signed integer would turn into float64.
    """
    zero = out.dtype.type(0.0)
    xs, os_ = x[i0:i1], out[i0:i1]
    first = offset + np.uint64(i0) + _ONE  # the counter of xs[0], plus SplitMix64's 1
    for i in range(xs.shape[0]):
        z = key + (first + np.uint64(i)) * _GAMMA
        z = (z ^ (z >> _S30)) * _MIX_1
        z = (z ^ (z >> _S27)) * _MIX_2
        z = z ^ (z >> _S31)
        if (z >> _TOP) >= threshold:
            os_[i] = np.float64(xs[i]) / keep_scale
        else:
            os_[i] = zero


@njit(cache=True, parallel=True)
def _dropout_parallel(x, out, key, offset, threshold, keep_scale):
    size = x.shape[0]
    for c in prange((size + CHUNK - 1) // CHUNK):
        _dropout_range(x, out, key, offset, threshold, keep_scale, c * CHUNK,
                       min(size, (c + 1) * CHUNK))


def dropout(x, p, seed, offset=0):
    """Inverted dropout x * keep / (1 - p) with the reference's counter-based mask: element i
    (flat, C order) kept iff ``reference.dropout_uniform(seed, offset + i) >= p``. Its backward
    is the same call on dy."""
    from ...reference import training as ref

    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must lie in [0, 1], got {p}")
    if int(offset) < 0:
        raise ValueError(f"dropout offset must be >= 0, got {offset}")
    x = np.asarray(x)
    if p == 1.0:  # everything dropped (PyTorch's convention), no division by zero
        return np.zeros_like(x)
    key = np.uint64(ref._mix64(ref._check_seed(seed)))
    xf = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(xf)
    args = (xf, out, key, np.uint64(offset), np.uint64(ref.dropout_threshold(p)), 1.0 - p)
    if xf.size < SMALL_ELEMENTS:
        _dropout_range(*args, 0, xf.size)
    else:
        _dropout_parallel(*args)
    return out.reshape(x.shape)
