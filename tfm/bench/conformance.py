"""Every backend method against the float64 reference, at ragged sizes: one row per launch.

``check_backend(backend, size="ragged")`` calls each method of the backend interface
(:mod:`tfm.backends.base`) once on random inputs and compares the result with the float64
NumPy backend on the same inputs, by relative error ||out - ref|| / ||ref|| (exact equality
for integer outputs and pure data movement). It is the GPU run's first section (``make
gpu-check``): on a card, with checked launches (``TFM_CUDA_CHECK=1``) and the default tile
sizes, every kernel is launched once at sizes that are not multiples of any tile before
anything is timed, so a kernel that fails on the card fails here, named, in seconds.

The training ops (each ``*_train`` forward with its backward, cross-entropy, dropout, Adam)
are cases too; a backend without one records it as ``unavailable`` with the reason.

Sizes: ``"ragged"`` crosses several of the CUDA backend's default (H100/H200) tiles with a
ragged edge (GEMM rows 591 over 128-row tiles, attention 197 queries over 64, 131 keys over
32, d_k != d_v); ``"tiny"`` does the same for the simulator's toy tiles (Numba's simulator
runs each thread as a Python thread).

``attention_rows_reference`` is the float64 oracle for attention at sizes whose (Nq, Nk)
score matrix would not fit on the host: it computes only the given query rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

SIZES = {
    "tiny": dict(b=2, n=7, nk=5, d=12, h=3, dk=4, dv=6, d_ff=10, hidden=6, vocab=11, window=3),
    "ragged": dict(b=3, n=197, nk=131, d=96, h=3, dk=32, dv=40, d_ff=200, hidden=72, vocab=1001, window=16),
}
# float32 against float64 at these sizes lands near 1e-6; 1e-4 leaves room for long sums
# without letting a wrong index (errors of order 1) through.
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


@dataclass(frozen=True)
class Case:
    """One call: ``method(*args, **kwargs)`` with args built by ``build(rng, size)``.

    Float ndarrays in args are cast to the tested dtype and uploaded; bool ndarrays are
    uploaded as masks; integer ndarrays (token ids) and :class:`Host` values stay on the
    host, as the interface says. ``inplace``: the method writes into its first argument,
    which is the result. ``call(backend, *args, **kwargs) -> outputs`` replaces the plain
    method call where a check needs several (a ``*_train`` forward, then its backward);
    ``method`` still names the op the case covers.
    """

    name: str
    method: str
    build: Callable[[np.random.Generator, dict], tuple[tuple, dict]]
    exact: bool = False
    inplace: bool = False
    call: Callable | None = None
    also: tuple[str, ...] = ()  # further backend methods the call exercises (e.g. the *_train forward)


@dataclass(frozen=True)
class Host:
    """An argument that stays a host array (e.g. cross-entropy's per-target weights)."""

    value: np.ndarray


def _r(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def _recurrent(gates):
    def build(rng, s):
        b, n, d, hd = s["b"], s["n"], s["d"], s["hidden"]
        w = 1.0 / math.sqrt(hd)
        return (_r(rng, b, n, d), _r(rng, b, hd, scale=0.5), _r(rng, gates * hd, d, scale=w),
                _r(rng, gates * hd, hd, scale=w), _r(rng, gates * hd, scale=0.1), _r(rng, gates * hd, scale=0.1)), {}
    return build


def _attention(causal, masked, impl):
    def build(rng, s):
        b, h, n, nk, dk, dv = s["b"], s["h"], s["n"], s["nk"], s["dk"], s["dv"]
        mask = None
        if masked:
            mask = rng.random((b, 1, 1, nk)) > 0.3  # key padding
            mask[-1, ..., :] = False  # a sequence with every key padded: rows of zeros
        return (_r(rng, b, h, n, dk), _r(rng, b, h, nk, dk), _r(rng, b, h, nk, dv), mask, causal, impl), {}
    return build


def _lstm(rng, s):
    x, h0, w_ih, w_hh, b_ih, b_hh = _recurrent(4)(rng, s)[0]
    return (x, h0, _r(rng, *h0.shape, scale=0.5), w_ih, w_hh, b_ih, b_hh), {}


# ------------------------------------------------------------------ training ops
def _no_neg_inf(a):
    """lse is -inf for rows that see no key: compare those positions as a large finite value."""
    a = np.asarray(a, np.float64)
    return np.where(np.isneginf(a), -1e30, a)


def _train_then_backward(train: str, backward: str, n_cot: int):
    """Run ``train`` (its outputs but the last are compared), then ``backward`` with the
    cotangents given as the case's last ``n_cot`` arguments."""
    def call(bk, *args):
        inputs, cots = args[:len(args) - n_cot], args[len(args) - n_cot:]
        res = getattr(bk, train)(*inputs)
        saved = res[-1]
        return tuple(getattr(bk, backward)(saved, *cots))
    return call


def _attention_backward(bk, q, k, v, mask, causal, impl, dout):
    out, lse = bk.attention_train(q, k, v, mask, causal, impl)
    dq, dk, dv = bk.attention_backward(q, k, v, out, lse, dout, mask, causal, impl)
    return out, _no_neg_inf(bk.to_numpy(lse)), dq, dk, dv


def _restricted_backward(bk, q, k, v, window, causal, dout):
    out, lse = bk.restricted_attention_train(q, k, v, window, causal)
    dq, dk, dv = bk.restricted_attention_backward(q, k, v, out, lse, dout, window, causal)
    return out, _no_neg_inf(bk.to_numpy(lse)), dq, dk, dv


def _layer_norm_backward(bk, x, gamma, beta, eps, residual, dy):
    y, mean, rstd = bk.layer_norm_train(x, gamma, beta, eps, residual)
    return (y, mean, rstd) + tuple(bk.layer_norm_backward(dy, x, gamma, mean, rstd, residual))


def _cross_entropy(bk, logits, targets, weights, smoothing):
    return tuple(bk.cross_entropy(logits, targets, weights, smoothing))


def _merge_into(bk, x, out, start):
    bk.merge_heads_into(x, out, start)
    return out


def _adam(bk, param, grad, m, v):
    bk.adam_step(param, grad, m, v, 3, 1e-2, 0.9, 0.98, 1e-9, 0.01)
    return param, m, v


def _recurrent_train_cases(kind, gates, n_state):
    """``<kind>_layer_train`` (outputs and final states) and its backpropagation through time."""
    def build(rng, s):
        args, _ = (_lstm if kind == "lstm" else _recurrent(gates))(rng, s)
        b, n, hd = s["b"], s["n"], s["hidden"]
        cots = (_r(rng, b, n, hd),) + tuple(_r(rng, b, hd) for _ in range(n_state))
        return args + cots, {}

    def forward(bk, *args):
        return getattr(bk, f"{kind}_layer_train")(*args[:-(1 + n_state)])[:-1]

    return (Case(f"{kind}_train", f"{kind}_layer_train", build, call=forward),
            Case(f"{kind}_backward", f"{kind}_layer_backward", build,
                 call=_train_then_backward(f"{kind}_layer_train", f"{kind}_layer_backward", 1 + n_state)))


def _attention_train_case(causal, masked, impl):
    def build(rng, s):
        args, _ = _attention(causal, masked, impl)(rng, s)
        return args + (_r(rng, s["b"], s["h"], s["n"], s["dv"]),), {}
    tag = f"{impl}{'_causal' if causal else ''}{'_masked' if masked else ''}"
    return Case(f"attention_backward_{tag}", "attention_backward", build, call=_attention_backward,
                also=("attention_train",))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))  # (..., V)
    return e / e.sum(-1, keepdims=True)


def _ce_build(rng, s):
    t, vocab = s["b"] * s["n"], s["vocab"]
    weights = np.full(t, 1.0 / max(1, t - 3))
    weights[:3] = 0.0  # padding targets
    return (_r(rng, t, vocab, scale=3.0), rng.integers(0, vocab, t), Host(weights), 0.1), {}


TRAINING_CASES: tuple[Case, ...] = (
    Case("axpy", "axpy", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["b"], s["n"], s["d"]), 0.5), {}),
         inplace=True),
    Case("linear_backward", "linear_backward",
         lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["d_ff"], s["d"]), _r(rng, s["b"], s["n"], s["d_ff"])),
                         {})),
    Case("linear_backward_no_bias", "linear_backward",
         lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["d_ff"], s["d"]), _r(rng, s["b"], s["n"], s["d_ff"]),
                          False), {})),
    *(Case(f"{kind}_backward", "activation_backward",
           (lambda kd: lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["b"], s["n"], s["d"]), kd), {}))(kind))
      for kind in ("relu", "gelu")),
    *(Case(f"layer_norm{'_residual' if res else ''}_backward", "layer_norm_backward",
           (lambda r: lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"], scale=2.0) + 0.5, _r(rng, s["d"]), _r(rng, s["d"]),
                                       1e-5, _r(rng, s["b"], s["n"], s["d"]) if r else None,
                                       _r(rng, s["b"], s["n"], s["d"])), {}))(res), call=_layer_norm_backward,
           also=("layer_norm_train",))
      for res in (False, True)),
    Case("softmax_backward", "softmax_backward",
         lambda rng, s: ((_softmax(_r(rng, s["b"], s["n"], s["vocab"], scale=3.0)),
                          _r(rng, s["b"], s["n"], s["vocab"])), {})),
    Case("log_softmax_backward", "log_softmax_backward",
         lambda rng, s: ((np.log(_softmax(_r(rng, s["b"], s["n"], s["vocab"], scale=3.0))),
                          _r(rng, s["b"], s["n"], s["vocab"])), {})),
    Case("cross_entropy", "cross_entropy", _ce_build, call=_cross_entropy),
    Case("embedding_backward", "embedding_backward",
         lambda rng, s: ((rng.integers(0, s["vocab"], (s["b"], s["n"])), _r(rng, s["b"], s["n"], s["d"]), s["vocab"],
                          math.sqrt(s["d"])), {})),
    Case("merge_heads_into", "merge_heads_into",
         lambda rng, s: ((_r(rng, s["b"], s["h"], s["n"], s["dk"]), _r(rng, s["b"], s["n"], 3 * s["h"] * s["dk"]),
                          s["h"] * s["dk"]), {}), exact=True, call=_merge_into),
    *(_attention_train_case(causal, masked, impl)
      for impl in ("fused", "naive") for causal in (False, True) for masked in (False, True)),
    *(Case(f"restricted_attention_backward{'_causal' if causal else ''}", "restricted_attention_backward",
           (lambda c: lambda rng, s: ((_r(rng, s["b"], s["h"], s["n"], s["dk"]), _r(rng, s["b"], s["h"], s["n"], s["dk"]),
                                       _r(rng, s["b"], s["h"], s["n"], s["dk"]), s["window"], c,
                                       _r(rng, s["b"], s["h"], s["n"], s["dk"])), {}))(causal),
           call=_restricted_backward, also=("restricted_attention_train",))
      for causal in (False, True)),
    *_recurrent_train_cases("rnn", 1, 1),
    *_recurrent_train_cases("lstm", 4, 2),
    *_recurrent_train_cases("gru", 3, 1),
    Case("conv1d_backward", "conv1d_backward",
         lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["hidden"], s["d"], 3, scale=0.2),
                          _r(rng, s["b"], s["n"], s["hidden"]), 4, 8, 0), {})),
    Case("glu_backward", "glu_backward",
         lambda rng, s: ((_r(rng, s["b"], s["n"], 2 * s["d"]), _r(rng, s["b"], s["n"], s["d"])), {})),
    Case("dropout", "dropout", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), 0.1, 12345, 7), {})),
    Case("adam_step", "adam_step",
         lambda rng, s: ((_r(rng, s["d_ff"], s["d"]), _r(rng, s["d_ff"], s["d"]), _r(rng, s["d_ff"], s["d"], scale=0.1),
                          np.abs(_r(rng, s["d_ff"], s["d"], scale=0.1))), {}), call=_adam),
)


CASES: tuple[Case, ...] = (
    Case("linear", "linear", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["d_ff"], s["d"]),
                                              _r(rng, s["d_ff"])), {})),
    Case("linear_no_bias", "linear", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["d"] + 5, s["d"])), {})),
    Case("add", "add", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["b"], s["n"], s["d"])), {})),
    Case("relu", "activation", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), "relu"), {})),
    Case("gelu", "activation", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), "gelu"), {})),
    Case("feed_forward", "feed_forward",
         lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["d_ff"], s["d"], scale=s["d"] ** -0.5),
                          _r(rng, s["d_ff"], scale=0.1), _r(rng, s["d"], s["d_ff"], scale=s["d_ff"] ** -0.5),
                          _r(rng, s["d"], scale=0.1), "relu"), {})),
    Case("layer_norm", "layer_norm", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"], scale=3.0) + 1.0,
                                                      _r(rng, s["d"]), _r(rng, s["d"]), 1e-5), {})),
    Case("layer_norm_residual", "layer_norm",
         lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["d"]), _r(rng, s["d"]), 1e-5),
                         {"residual": _r(rng, s["b"], s["n"], s["d"])})),
    Case("softmax", "softmax", lambda rng, s: ((_r(rng, s["b"], s["n"], s["vocab"], scale=4.0),), {})),
    Case("log_softmax", "log_softmax", lambda rng, s: ((_r(rng, s["b"], s["n"], s["vocab"], scale=4.0),), {})),
    Case("argmax", "argmax", lambda rng, s: ((_r(rng, s["b"], s["vocab"]),), {}), exact=True),
    Case("embedding", "embedding", lambda rng, s: ((rng.integers(0, s["vocab"], (s["b"], s["n"])),
                                                    _r(rng, s["vocab"], s["d"]), math.sqrt(s["d"])), {})),
    Case("positional_encoding", "add_positional_encoding",
         lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), 3), {})),
    Case("split_heads", "split_heads", lambda rng, s: ((_r(rng, s["b"], s["n"], 3 * s["d"]), s["h"], s["d"], s["d"]), {}),
         exact=True),
    Case("merge_heads", "merge_heads", lambda rng, s: ((_r(rng, s["b"], s["h"], s["n"], s["dv"]),), {}), exact=True),
    Case("leading_rows", "leading_rows", lambda rng, s: ((_r(rng, s["b"], s["h"], s["n"] + 5, s["dk"]), s["n"]), {}),
         exact=True),
    Case("write_rows", "write_rows", lambda rng, s: ((_r(rng, s["b"], s["h"], s["n"] + 9, s["dk"]),
                                                      _r(rng, s["b"], s["h"], s["n"], s["dk"]), 4), {}),
         exact=True, inplace=True),
    *(Case(f"attention_{impl}{'_causal' if causal else ''}{'_masked' if masked else ''}", "attention",
           _attention(causal, masked, impl))
      for impl in ("fused", "naive") for causal in (False, True) for masked in (False, True)),
    *(Case(f"restricted_attention{'_causal' if causal else ''}", "restricted_attention",
           (lambda c: lambda rng, s: ((_r(rng, s["b"], s["h"], s["n"], s["dk"]), _r(rng, s["b"], s["h"], s["n"], s["dk"]),
                                       _r(rng, s["b"], s["h"], s["n"], s["dk"]), s["window"], c), {}))(causal))
      for causal in (False, True)),
    Case("rnn_tanh", "rnn_layer", _recurrent(1)),
    Case("rnn_relu", "rnn_layer", lambda rng, s: (_recurrent(1)(rng, s)[0], {"nonlinearity": "relu"})),
    Case("lstm", "lstm_layer", _lstm),
    Case("gru", "gru_layer", _recurrent(3)),
    Case("conv1d_same", "conv1d", lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["hidden"], s["d"], 3, scale=0.2),
                                                   _r(rng, s["hidden"]), 1, 1, 1), {})),
    Case("conv1d_dilated_causal", "conv1d",
         lambda rng, s: ((_r(rng, s["b"], s["n"], s["d"]), _r(rng, s["hidden"], s["d"], 3, scale=0.2),
                          _r(rng, s["hidden"]), 4, 8, 0), {})),
    Case("glu", "glu", lambda rng, s: ((_r(rng, s["b"], s["n"], 2 * s["d"]),), {})),
) + TRAINING_CASES


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or inf (NaN never passes)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return math.inf
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def _to_backend(bk, value, dtype):
    if isinstance(value, Host):
        return value.value
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            return bk.asarray(value.astype(dtype), dtype)
        if value.dtype == np.bool_:
            return bk.asarray(value)
    return value


def _outputs(bk, result) -> list[np.ndarray | None]:
    items = result if isinstance(result, tuple) else (result,)
    return [None if r is None else np.asarray(bk.to_numpy(r)) for r in items]


def run_case(case: Case, bk, ref_bk, rng, size: dict, dtype) -> dict:
    """One case on ``bk`` and on the reference; a row (raises nothing but KeyboardInterrupt)."""
    dtype = np.dtype(dtype)
    row = {"op": case.name, "method": case.method, "backend": bk.name, "dtype": dtype.name,
           "rel_err": math.nan, "tol": 0.0 if case.exact else TOL[dtype], "passed": False,
           "seconds": math.nan, "status": "ok", "reason": ""}
    try:
        args, kwargs = case.build(rng, size)
        row["shape"] = " ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, np.ndarray))
        ref_args = [_to_backend(ref_bk, a, np.float64) for a in args]
        ref_kwargs = {k: _to_backend(ref_bk, v, np.float64) for k, v in kwargs.items()}
        ref = _call(case, ref_bk, ref_args, ref_kwargs)
        ref_out = _outputs(ref_bk, ref_args[0] if case.inplace else ref)
        dev_args = [_to_backend(bk, a, dtype) for a in args]
        dev_kwargs = {k: _to_backend(bk, v, dtype) for k, v in kwargs.items()}
        t0 = time.perf_counter()
        res = _call(case, bk, dev_args, dev_kwargs)
        bk.synchronize()
        row["seconds"] = time.perf_counter() - t0  # the first call: compilation included
        out = _outputs(bk, dev_args[0] if case.inplace else res)
        if len(out) != len(ref_out) or any((o is None) != (r is None) for o, r in zip(out, ref_out)):
            raise ValueError(f"outputs {[None if o is None else o.shape for o in out]} do not match the "
                             f"reference's {[None if r is None else r.shape for r in ref_out]}")
        out, ref_out = [o for o in out if o is not None], [r for r in ref_out if r is not None]
        if case.exact:
            same = all(o.shape == r.shape and np.array_equal(o.astype(np.float64), r.astype(dtype).astype(np.float64))
                       for o, r in zip(out, ref_out))
            row["rel_err"], row["passed"] = (0.0 if same else math.inf), same
        else:
            row["rel_err"] = max(rel_err(o, r) for o, r in zip(out, ref_out))
            row["passed"] = row["rel_err"] <= row["tol"]
    except KeyboardInterrupt:
        raise
    except NotImplementedError as exc:  # the backend lacks the op: said, not counted as wrong
        row["status"], row["reason"] = "unavailable", f"NotImplementedError: {exc}"[:400]
    except Exception as exc:  # noqa: BLE001 - a failing kernel is a row with its reason
        row["status"], row["reason"] = "error", f"{type(exc).__name__}: {exc}"[:400]
    return row


def _call(case: Case, bk, args, kwargs):
    if case.call is not None:
        return case.call(bk, *args, **kwargs)
    return getattr(bk, case.method)(*args, **kwargs)


def check_backend(bk, size: str = "ragged", dtypes=(np.float32,), seed: int = 0,
                  progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Every case of :data:`CASES` on ``bk`` against the float64 numpy backend: a list of rows."""
    from ..backends import get_backend

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    ref_bk = get_backend("numpy")
    rows = []
    for dtype in dtypes:
        for i, case in enumerate(CASES):
            rng = np.random.default_rng([seed, i])
            row = run_case(case, bk, ref_bk, rng, SIZES[size], dtype)
            row["size"] = size
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def attention_rows_reference(q, k, v, rows, keep=None, causal=False) -> np.ndarray:
    """Float64 attention outputs of query ``rows`` only; ``keep`` (B, Nk): True = may attend.

    For n where the full (B, H, n, n) float64 score matrix would not fit: memory O(len(rows) * Nk).
    Rows with no visible key are zeros, as in every tfm backend.
    """
    rows = np.asarray(rows)
    qs = np.asarray(q)[:, :, rows].astype(np.float64)  # (B, H, r, Dk)
    s = qs @ np.swapaxes(np.asarray(k, np.float64), -1, -2) / math.sqrt(qs.shape[-1])  # (B, H, r, Nk)
    allowed = np.ones(s.shape, bool)
    if causal:
        allowed &= np.arange(s.shape[-1])[None, None, None, :] <= rows[None, None, :, None]
    if keep is not None:
        allowed &= np.asarray(keep)[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(allowed, np.exp(s - m), 0.0)
    den = p.sum(-1, keepdims=True)
    p = np.divide(p, den, out=np.zeros_like(p), where=den > 0)
    return p @ np.asarray(v, np.float64)  # (B, H, r, Dv)
