"""Section 5 of "Attention Is All You Need" in float64 NumPy: the loss, regularisation, optimiser.

* ``cross_entropy`` with label smoothing (section 5.4) and its gradient, as PyTorch's
  ``F.cross_entropy(label_smoothing=eps)``;
* ``dropout`` (section 5.4) from a counter-based random stream, ``dropout_uniform``, that
  every backend computes bit for bit, so a seed drops the same elements on any backend;
* ``adam_step`` (section 5.3), the update of ``torch.optim.Adam``.
"""

from __future__ import annotations

import math

import numpy as np

from .transformer import _check_shape, _f64, log_softmax, softmax

# ---------------------------------------------------------------------------- cross-entropy


def _check_targets(logits: np.ndarray, targets) -> np.ndarray:
    targets = np.asarray(targets)
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
    _check_shape("targets", targets, logits.shape[:-1])
    vocab = logits.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}), got [{targets.min()}, {targets.max()}]")
    return targets


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


def smoothed_targets(targets, vocab: int, label_smoothing: float = 0.0) -> np.ndarray:
    """q = (1 - eps) onehot(y) + eps / V: the target distribution label smoothing trains on."""
    targets = np.asarray(targets)
    q = np.full(targets.shape + (vocab,), label_smoothing / vocab)  # (T, V)
    np.put_along_axis(q, targets[..., None], 1.0 - label_smoothing + label_smoothing / vocab, axis=-1)
    return q


def cross_entropy(logits, targets, label_smoothing: float = 0.0) -> np.ndarray:
    """Per-target loss with PyTorch's label smoothing, lse = logsumexp(z_t):

    loss_t = (1 - eps) * (lse - z_t[y_t]) + eps * (lse - mean_v z_t[v]) = -sum_v q_v log_softmax(z_t)_v

    with q the smoothed targets. logits (T, V), targets (T,) ints in [0, V) -> (T,).
    """
    logits = _f64(logits)  # (T, V)
    targets = _check_targets(logits, targets)  # (T,)
    _check_smoothing(label_smoothing)
    log_p = log_softmax(logits)  # (T, V)
    q = smoothed_targets(targets, logits.shape[-1], label_smoothing)  # (T, V)
    return -np.sum(q * log_p, axis=-1)  # (T,)


def cross_entropy_backward(logits, targets, weights, label_smoothing: float = 0.0) -> np.ndarray:
    """Gradient of sum_t weights[t] * loss_t: dz_t = weights[t] * (softmax(z_t) - q_t).

    ``weights`` (T,): 0 drops a target (padding); 1 / (number of kept targets) on the kept ones
    gives PyTorch's ``reduction='mean'`` with ``ignore_index``. -> dlogits (T, V).
    """
    logits = _f64(logits)  # (T, V)
    targets = _check_targets(logits, targets)  # (T,)
    _check_smoothing(label_smoothing)
    weights = _f64(weights)
    _check_shape("weights", weights, logits.shape[:-1])
    q = smoothed_targets(targets, logits.shape[-1], label_smoothing)  # (T, V)
    return weights[..., None] * (softmax(logits) - q)  # (T, V)


# ---------------------------------------------------------------------------- dropout

_MASK64 = (1 << 64) - 1
SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, SplitMix64's increment
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
UNIFORM_BITS = 24  # float32's mantissa: every uniform is exact in float32


def _mix64(z):
    """SplitMix64's finaliser on uint64 (arithmetic wraps modulo 2^64); NumPy arrays or ints."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * _MIX_1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX_2) & _MASK64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX_1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX_2)
    return z ^ (z >> np.uint64(31))


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= _MASK64:
        raise ValueError(f"seed must lie in [0, 2^64), got {seed}")
    return int(seed)


def dropout_uniform(seed: int, counters) -> np.ndarray:
    """The dropout stream: one uniform in [0, 1) per counter, a pure function of (seed, counter).

    With SplitMix64's finaliser ``mix(z)``: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
    z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31 (uint64, wrapping), and
    G = 0x9E3779B97F4A7C15:

        key = mix(seed)
        r   = mix(key + (counter + 1) * G) >> 40          (the top 24 bits)
        u   = r / 2^24

    i.e. output number ``counter`` of a SplitMix64 generator started at state mix(seed),
    reached directly. u is exact in float32. seed in [0, 2^64); counters ints >= 0.
    -> float64 array shaped like counters.
    """
    key = _mix64(_check_seed(seed))
    counters = np.asarray(counters)
    if not np.issubdtype(counters.dtype, np.integer):
        raise TypeError(f"counters must be integers, got dtype {counters.dtype}")
    if counters.size and counters.min() < 0:
        raise ValueError(f"counters must be >= 0, got {counters.min()}")
    state = np.uint64(key) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(SPLITMIX64_GAMMA)
    r = _mix64(state) >> np.uint64(64 - UNIFORM_BITS)  # top 24 bits
    return r.astype(np.float64) * 2.0 ** -UNIFORM_BITS


def dropout_threshold(p: float) -> int:
    """The integer form of ``u >= p``: r >= ceil(p * 2^24) for r = u * 2^24 (exact in float64).

    A float32 kernel must compare this way (or in float64): ``u >= float32(p)`` differs when
    float32(p) rounds below p onto a multiple of 2^-24.
    """
    return math.ceil(p * 2.0 ** UNIFORM_BITS)


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must lie in [0, 1], got {p}")


def dropout_keep(shape, p: float, seed: int, offset: int = 0) -> np.ndarray:
    """The keep mask, bool ``shape``: element i (flat, C order) is kept iff
    dropout_uniform(seed, offset + i) >= p."""
    _check_p(p)
    size = math.prod(shape)
    return (dropout_uniform(seed, offset + np.arange(size, dtype=np.int64)) >= p).reshape(shape)


def dropout(x, p: float, seed: int, offset: int = 0) -> np.ndarray:
    """Inverted dropout (section 5.4): x * keep / (1 - p), with keep = dropout_keep(...);
    p = 1 drops everything (zeros), as PyTorch."""
    x = _f64(x)
    keep = dropout_keep(x.shape, p, seed, offset)  # (...)
    if p == 1.0:
        return np.zeros_like(x)
    return np.where(keep, x / (1.0 - p), 0.0)


def dropout_backward(dy, p: float, seed: int, offset: int = 0) -> np.ndarray:
    """Dropout is linear with a fixed mask, so its backward applies the same mask and scale."""
    return dropout(dy, p, seed, offset)


# ---------------------------------------------------------------------------- Adam


def adam_step(param, grad, m, v, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.98,
              eps: float = 1e-9, weight_decay: float = 0.0):
    """One update of ``torch.optim.Adam`` (Kingma & Ba; the paper's section 5.3 uses
    beta1 = 0.9, beta2 = 0.98, eps = 1e-9), step counting from 1:

    g = grad + weight_decay * param          (L2 penalty, as torch's ``weight_decay``)
    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    param = param - (lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

    -> new (param, m, v); the inputs are not modified.
    """
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got ({beta1}, {beta2})")
    if not eps >= 0.0 or not weight_decay >= 0.0:
        raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
    param, grad, m, v = _f64(param), _f64(grad), _f64(m), _f64(v)
    for name, arr in (("grad", grad), ("m", m), ("v", v)):
        _check_shape(name, arr, param.shape)
    g = grad + weight_decay * param if weight_decay else grad  # (...)
    m = beta1 * m + (1.0 - beta1) * g  # (...)
    v = beta2 * v + (1.0 - beta2) * g * g  # (...)
    step_size = lr / (1.0 - beta1 ** step)
    denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps  # (...)
    return param - step_size * m / denom, m, v
