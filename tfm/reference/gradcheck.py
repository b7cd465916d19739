"""Central differences: the check that a backward formula is the gradient of its forward.

For a function ``f`` of float64 arrays and a cotangent ``c`` shaped like its output, the
gradient of the scalar L = <c, f(args)> with respect to an input entry x is

    dL/dx ~ <c, f(x + h) - f(x - h)> / (2 h),    error O(h^2) + O(eps_64 |f| / h).

At h = 1e-6 both terms sit near 1e-10 relative for the well-scaled inputs of the tests
(measured: 1e-9 at worst), so a backward whose relative error is below 1e-7 is the
gradient, and a wrong formula (errors of order 1) cannot pass. Used by the tests of the reference and of every layer and model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _snapshot(out):
    """A float64 copy of f's output (tuples too): an output may be a view of the perturbed input."""
    if isinstance(out, (tuple, list)):
        return tuple(_snapshot(o) for o in out)
    return None if out is None else np.array(out, dtype=np.float64)


def _inner_of_difference(cotangent, up, down) -> float:
    """<c, up - down>, with tuples of arrays (None = zero cotangent) summed term by term.

    Subtracting before the inner product keeps the outputs that a perturbation leaves alone
    exactly out of the sum, so only the entries that moved contribute rounding error.
    """
    if isinstance(up, (tuple, list)):
        return sum(_inner_of_difference(c, u, d) for c, u, d in zip(cotangent, up, down) if c is not None)
    return float(np.sum(np.asarray(cotangent, dtype=np.float64) * (up - down)))


def numerical_gradient(f: Callable, args: Sequence, cotangent, index: int, step: float = 1e-6,
                       entries: np.ndarray | None = None) -> np.ndarray:
    """Central-difference gradient of <cotangent, f(*args)> with respect to ``args[index]``.

    ``entries``: flat indices to differentiate (default all); the others are left NaN.
    ``args[index]`` is perturbed in a float64 copy; the caller's arrays are not modified.
    """
    args = list(args)
    x = np.array(args[index], dtype=np.float64)  # a private copy to perturb
    args[index] = x
    flat = x.reshape(-1)
    grad = np.full(x.size, np.nan)
    for i in range(x.size) if entries is None else entries:
        saved = flat[i]
        flat[i] = saved + step
        up = _snapshot(f(*args))
        flat[i] = saved - step
        down = _snapshot(f(*args))
        flat[i] = saved
        grad[i] = _inner_of_difference(cotangent, up, down) / (2.0 * step)
    return grad.reshape(x.shape)


def gradient_errors(f: Callable, args: Sequence, cotangent, grads: dict, step: float = 1e-6,
                    max_entries: int | None = None, seed: int = 0) -> dict:
    """Relative error ||analytic - numerical|| / ||numerical|| for each ``{index: analytic}``.

    ``max_entries``: check at most this many entries of each input, drawn at random with
    ``seed`` (large inputs); all of them by default. A gradient that should be zero (the
    numerical one is) is held to the absolute norm of the analytic one. NaN or inf -> inf.
    """
    rng = np.random.default_rng(seed)
    errors = {}
    for index, analytic in grads.items():
        analytic = np.asarray(analytic, dtype=np.float64)
        size = np.size(args[index])
        if analytic.shape != np.shape(args[index]):
            raise ValueError(f"gradient {index} has shape {analytic.shape}, input {np.shape(args[index])}")
        entries = None
        if max_entries is not None and size > max_entries:
            entries = np.sort(rng.choice(size, max_entries, replace=False))
        numeric = numerical_gradient(f, args, cotangent, index, step, entries).reshape(-1)
        picked = analytic.reshape(-1) if entries is None else analytic.reshape(-1)[entries]
        numeric = numeric if entries is None else numeric[entries]
        if not np.all(np.isfinite(picked)):
            errors[index] = float("inf")
            continue
        denom = np.linalg.norm(numeric)
        errors[index] = float(np.linalg.norm(picked - numeric) / (denom if denom > 0 else 1.0))
    return errors
