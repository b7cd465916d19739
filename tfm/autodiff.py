"""``tfm.vjp``: the vector-Jacobian product of a tfm function, layer or model.

    out, pullback = tfm.vjp(f, *args, **kwargs)
    input_grads, param_grads = pullback(cotangent)

``f`` is ``tfm.attention``, ``tfm.restricted_attention`` or a tfm module (a layer such as
``tfm.MultiHeadAttention`` or ``tfm.LSTM``, or a model: ``tfm.Transformer``,
``tfm.LSTMSeq2Seq``, ``tfm.ConvS2S``, the ``EncoderDecoder`` of ``tfm.from_torch``), called
with the arguments its own call takes; ``out`` is what that call returns. The float arrays
among the positional arguments are the differentiable inputs; token ids, boolean masks and
everything passed by keyword are not.

``pullback(cotangent)``: ``cotangent`` is shaped like ``out`` with its dtype (a tuple for a
tuple output, where None stands for zeros). It returns ``input_grads``, one array per float
positional argument, and ``param_grads``, the gradient of <cotangent, out> with respect to
every parameter of the module, keyed by its parameter names (PyTorch's state-dict names for
converted modules; an empty dict for functions). It can be called any number of times.

Modules compute as their call does, on their backend and in their precision, and run their
``forward_train``/``backward`` pair (``tfm.layers.module``); in training mode (the default)
their dropout acts. Gradients are host arrays, as the calls' outputs; for the functions,
device-array inputs give device-array outputs and input gradients.
"""

from __future__ import annotations

import inspect

import numpy as np

from ._checks import as_array, check_attention_inputs, check_bool, check_impl, is_device_array
from .backends import get_backend
from .functional import attention, check_naive_attention_memory
from .layers.module import Module
from .layers.restricted import check_restricted_inputs, restricted_attention

__all__ = ["vjp"]


def vjp(f, *args, **kwargs):
    """``(out, pullback)`` for ``f(*args, **kwargs)``; see the module docstring."""
    rule, signature = _rule(f)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"tfm.vjp: {_name(f)} cannot be called with these arguments: {exc}") from None
    positional = list(bound.signature.parameters)[:len(args)]
    differentiable = [name for name, a in zip(positional, args) if _is_float_array(a)]
    out, inner = rule(*args, **kwargs)

    def pullback(cotangent):
        input_grads, param_grads = inner(_check_cotangent(cotangent, out))
        return tuple(input_grads[name] for name in differentiable), param_grads

    return out, pullback


# ---------------------------------------------------------------------- dispatch
def _rule(f):
    """The rule for f and the signature its arguments bind to."""
    if f in _FUNCTION_RULES:
        return _FUNCTION_RULES[f], inspect.signature(f)
    if isinstance(f, Module):
        if not hasattr(f, "_vjp"):
            raise TypeError(f"tfm.vjp: a {type(f).__name__} has no public call to differentiate; "
                            f"differentiate the model or layer that contains it")
        return f._vjp, inspect.signature(f._vjp)  # each module's _vjp takes its call's arguments
    layer = getattr(f, "layer", None)
    if isinstance(layer, Module):  # tfm.from_torch's wrappers of recurrent and conv layers
        raise TypeError(f"tfm.vjp: differentiate the tfm layer inside the {type(f).__name__}, "
                        f"its .layer (batch-first (B, N, features) arrays, PyTorch's parameter names)")
    raise TypeError(f"tfm.vjp differentiates tfm.attention, tfm.restricted_attention and tfm layers and "
                    f"models (tfm.Module instances); got {_name(f)}")


def _name(f) -> str:
    return getattr(f, "__qualname__", None) or type(f).__name__


def _is_float_array(a) -> bool:
    """A float array of at least one dimension (scalars are options, not inputs)."""
    if a is None or isinstance(a, (Module, str, bool, int, float)):
        return False
    if is_device_array(a):
        return np.dtype(a.dtype).kind == "f" and len(a.shape) > 0
    try:
        a = np.asarray(a)
    except Exception:  # not array-like: the call's own checks say what is wrong
        return False
    return a.dtype.kind == "f" and a.ndim > 0


def _check_cotangent(cotangent, out, where: str = "cotangent"):
    """A cotangent shaped like ``out`` with its dtype; None -> zeros (None stays None for a
    device output: its rule makes the zeros on the device)."""
    if isinstance(out, tuple):
        if cotangent is None:
            cotangent = (None,) * len(out)
        if not isinstance(cotangent, (tuple, list)) or len(cotangent) != len(out):
            raise ValueError(f"the output is a tuple of {len(out)} arrays, so the cotangent must be a "
                             f"tuple of {len(out)} (None for zeros), got {type(cotangent).__name__}"
                             + (f" of {len(cotangent)}" if isinstance(cotangent, (tuple, list)) else ""))
        return tuple(_check_cotangent(c, o, f"cotangent[{i}]") for i, (c, o) in enumerate(zip(cotangent, out)))
    if cotangent is None:
        return np.zeros(out.shape, out.dtype) if isinstance(out, np.ndarray) else None
    c = as_array(where, cotangent)
    if tuple(c.shape) != tuple(out.shape):
        raise ValueError(f"{where} has shape {tuple(c.shape)}, but the output has shape {tuple(out.shape)}")
    if np.dtype(c.dtype) != np.dtype(out.dtype):
        raise TypeError(f"{where} has dtype {np.dtype(c.dtype)}, but the output has dtype {np.dtype(out.dtype)}")
    return c


# ---------------------------------------------------------------------- functions
def _functional_output(bk, device_in: bool, dtype):
    """Results of a function as its forward returns them: device arrays for device inputs,
    else host arrays in the input dtype (the reference computes in float64)."""
    if device_in:
        return lambda y: y
    return lambda y: np.asarray(bk.to_numpy(y)).astype(dtype, copy=False)


def _attention_vjp(q, k, v, *, mask=None, causal: bool = False, impl: str = "fused", backend: str = "cpu"):
    """tfm.attention's rule: the forward keeps each row's log-sum-exp; the backward recomputes
    the scores from it (the fused backward never holds the (Nq, Nk) matrix)."""
    impl = check_impl(impl)
    bk = get_backend(backend)
    q, k, v, mask = check_attention_inputs(q, k, v, mask)
    causal = check_bool("causal", causal)
    dtype = np.dtype(q.dtype)
    if impl == "naive" or bk.name == "numpy":
        b, h, nq, _ = q.shape
        check_naive_attention_memory(bk, b, h, nq, k.shape[2], dtype.itemsize)
    host = _functional_output(bk, is_device_array(q), dtype)
    q, k, v = bk.asarray(q, dtype), bk.asarray(k, dtype), bk.asarray(v, dtype)
    mask = None if mask is None else bk.asarray(mask)
    out, lse = bk.attention_train(q, k, v, mask=mask, causal=causal, impl=impl)

    def pullback(dout):
        dout = bk.zeros(out.shape, dtype) if dout is None else bk.asarray(dout, dtype)
        dq, dk, dv = bk.attention_backward(q, k, v, out, lse, dout, mask=mask, causal=causal, impl=impl)
        return {"q": host(dq), "k": host(dk), "v": host(dv)}, {}

    return host(out), pullback


def _restricted_attention_vjp(q, k, v, window: int, *, causal: bool = False, backend="cpu"):
    """tfm.restricted_attention's rule, at O(window * N * D) cost both ways."""
    bk = get_backend(backend)
    q, k, v, window, causal = check_restricted_inputs(q, k, v, window, causal)
    dtype = np.dtype(q.dtype)
    host = _functional_output(bk, is_device_array(q), dtype)
    q, k, v = bk.asarray(q, dtype), bk.asarray(k, dtype), bk.asarray(v, dtype)
    out, lse = bk.restricted_attention_train(q, k, v, window, causal)

    def pullback(dout):
        dout = bk.zeros(out.shape, dtype) if dout is None else bk.asarray(dout, dtype)
        dq, dk, dv = bk.restricted_attention_backward(q, k, v, out, lse, dout, window, causal)
        return {"q": host(dq), "k": host(dk), "v": host(dv)}, {}

    return host(out), pullback


_FUNCTION_RULES = {attention: _attention_vjp, restricted_attention: _restricted_attention_vjp}
