"""Gradient checks of tfm layers and models through ``tfm.vjp``, shared by the training tests.

* ``vjp_grads(f, args, kwargs, cotangent)``: input and parameter gradients from ``tfm.vjp``.
* ``central_difference_errors(module, args, kwargs)``: on a float64 module of the numpy
  backend, the relative error of every input and parameter gradient against central
  differences of the module's public call (its inference path, so the check also holds
  ``forward_train`` to ``forward``).
* ``backend_errors(make, args, kwargs)``: the same module on the cpu backend against the
  numpy reference, gradient by gradient.
"""

from __future__ import annotations

import numpy as np
import pytest

import tfm
from tfm.reference.gradcheck import numerical_gradient

from conftest import rel_err

# Each entry of a central difference costs two calls: check this many per array.
ENTRIES = 6
# h = 1e-5: the rounding term (eps |L| / h) ten times below h = 1e-6's, the truncation term
# (h^2) still near 1e-10 relative.
STEP = 1e-5


def sampled_error(f, args, index, cotangent, analytic, rng, entries=ENTRIES) -> float:
    """Relative error of ``analytic`` (the gradient of <cotangent, f(*args)> with respect to
    ``args[index]``) against central differences at ``entries`` random entries.

    The error is scaled by the largest of the sample's norm, the norm a sample of typical
    entries of ``analytic`` would have, and a floor 1e7 times the rounding of a central
    difference (eps * sum |cotangent * out| / h): a sample that happens to hold only near-zero
    entries (the keys' gradient of near-uniform attention, an exactly zero gradient) then
    does not turn rounding into a large relative error, while a wrong formula still errs by
    the size of the true gradient itself (unless that is below ~1e-9). NaN or inf gives inf.
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    assert analytic.shape == np.shape(args[index]), (analytic.shape, np.shape(args[index]))
    size = analytic.size
    picked = None if size <= entries else np.sort(rng.choice(size, entries, replace=False))
    numeric = numerical_gradient(f, args, cotangent, index, STEP, picked).reshape(-1)
    a = analytic.reshape(-1)
    if picked is not None:
        numeric, a = numeric[picked], a[picked]
    if not np.all(np.isfinite(a)):
        return float("inf")
    typical = np.linalg.norm(analytic) * np.sqrt(a.size / size)
    magnitude = sum(float(np.sum(np.abs(c * o))) for c, o in zip(_tuple(cotangent), _tuple(f(*args))))
    floor = 1e7 * np.finfo(np.float64).eps * (1.0 + magnitude) / STEP
    scale = max(np.linalg.norm(numeric), typical, floor)
    return float(np.linalg.norm(a - numeric) / (scale if scale > 0 else 1.0))


def random_like(rng, out):
    """A cotangent shaped like ``out`` (a tuple for tuple outputs), fresh normal values."""
    if isinstance(out, tuple):
        return tuple(random_like(rng, o) for o in out)
    return rng.standard_normal(np.shape(out)).astype(out.dtype)


def randomise(module, rng, scale=0.5):
    """Non-zero values everywhere (biases, norm gains) so that no mixed-up gradient hides."""
    module.load_state_dict({k: rng.uniform(-scale, scale, v.shape) for k, v in module.params.items()})
    return module


def is_float(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def vjp_grads(f, args, kwargs=None, cotangent=None, rng=None):
    """-> (out, cotangent, input grads, parameter grads) of ``f(*args, **kwargs)``."""
    out, pullback = tfm.vjp(f, *args, **(kwargs or {}))
    if cotangent is None:
        cotangent = random_like(rng, out)
    input_grads, param_grads = pullback(cotangent)
    return out, cotangent, input_grads, param_grads


def central_difference_errors(module, args, kwargs=None, rng=None, entries=ENTRIES) -> dict:
    """{"input i" or parameter name: relative error} for a float64 module on the numpy backend."""
    kwargs = kwargs or {}
    _, cot, input_grads, param_grads = vjp_grads(module, args, kwargs, rng=rng)
    floats = [i for i, a in enumerate(args) if is_float(a)]
    assert len(input_grads) == len(floats)
    own = {k for k in param_grads if not k.startswith("sublayer.")}  # ResidualNorm adds its sublayer's
    assert own == set(module.params), "one gradient for every parameter"
    errors = {}
    for i, grad in zip(floats, input_grads):
        def call(x, i=i):
            return module(*args[:i], x, *args[i + 1:], **kwargs)
        errors[f"input {i}"] = sampled_error(call, [args[i]], 0, cot, grad, rng, entries)
    params = {k: v.copy() for k, v in module.params.items()}
    for name, p in params.items():
        def call(value, name=name):
            module.load_state_dict({**params, name: value})
            return module(*args, **kwargs)
        errors[name] = sampled_error(call, [p], 0, cot, param_grads[name], rng, entries)
    module.load_state_dict(params)
    return errors


def backend_errors(make, args, kwargs=None, rng=None, dtype="float32") -> dict:
    """{"out", "input i", parameter name: rel. error} of ``make("cpu")`` against ``make("numpy")``
    (the same weights); skips, naming the op, while the cpu backend lacks one."""
    kwargs = kwargs or {}
    ref = make("numpy")
    out_ref, cot, in_ref, par_ref = vjp_grads(ref, args, kwargs, rng=rng)
    cot = tuple(c.astype(dtype) for c in cot) if isinstance(cot, tuple) else cot.astype(dtype)
    try:
        out, _, ins, pars = vjp_grads(make("cpu"), args, kwargs, cotangent=cot)
    except NotImplementedError as exc:
        pytest.skip(f"cpu backend: {exc}")
    errors = {"out": max(rel_err(o, r) for o, r in zip(_tuple(out), _tuple(out_ref)))}
    errors.update({f"input {i}": rel_err(g, r) for i, (g, r) in enumerate(zip(ins, in_ref))})
    errors.update({name: rel_err(pars[name], g) for name, g in par_ref.items()})
    return errors


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def worst(errors: dict) -> tuple:
    """(name, error) of the largest error, for assertion messages."""
    name = max(errors, key=errors.get)
    return name, errors[name]
