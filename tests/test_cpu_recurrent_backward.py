"""The CPU backend's recurrent training kernels: ``{rnn,lstm,gru}_layer_train`` and their
backpropagation through time, against the float64 reference (``tfm.reference.baselines``,
explicit BPTT formulas) in float32 and float64, on both schedules, and against PyTorch
autograd (nn.RNN tanh/relu, nn.LSTM, nn.GRU, one and two layers).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, rel_err, requires_torch

from tfm.backends import get_backend
from tfm.backends.cpu import recurrent as rec
from tfm.reference import baselines as rb

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

cpu = get_backend("cpu")
DTYPES = [np.float32, np.float64]
KINDS = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}  # kind: gates


def _inputs(rng, kind, b, n, d_in, hidden):
    """float64 (x, h0[, c0], w_ih, w_hh, b_ih, b_hh), PyTorch's init scale for the weights."""
    g = KINDS[kind] * hidden
    bound = hidden ** -0.5
    x = rng.standard_normal((b, n, d_in))
    states = tuple(0.5 * rng.standard_normal((b, hidden)) for _ in range(2 if kind == "lstm" else 1))
    w = tuple(rng.uniform(-bound, bound, s) for s in ((g, d_in), (g, hidden), (g,), (g,)))
    return (x,) + states + w


def _ops(kind, module):
    """(train, backward) of ``kind`` in ``module`` (the reference or the cpu backend)."""
    if kind.startswith("rnn"):
        act = kind[4:]
        return (lambda *a: module.rnn_layer_train(*a, nonlinearity=act), module.rnn_layer_backward)
    return getattr(module, f"{kind}_layer_train"), getattr(module, f"{kind}_layer_backward")


def _cotangents(rng, args, kind):
    """float64 cotangents of (out, h_n[, c_n]) for the forward of ``kind`` on ``args``."""
    b, n, _ = args[0].shape
    hidden = args[1].shape[1]
    shapes = [(b, n, hidden)] + [(b, hidden)] * (2 if kind == "lstm" else 1)
    return tuple(rng.standard_normal(s) for s in shapes)


def _check(kind, args, cotangents, dtype, tol=None):
    """The cpu kernels in ``dtype`` against the float64 reference: outputs, final states and
    every gradient (one per float input, in the forward's order)."""
    ref_outs, ref_grads = _run(kind, rb, args, cotangents)
    outs, grads = _run(kind, rec, [a.astype(dtype) for a in args], [c.astype(dtype) for c in cotangents])
    assert len(outs) == len(ref_outs) and len(grads) == len(args)
    for got, want in zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < (tol or TOL[dtype])
    return grads


def _run(kind, module, args, cotangents):
    train, backward = _ops(kind, module)
    *outs, saved = train(*args)
    return outs, backward(saved, *cotangents)


def _nan_alloc(shape, dtype):
    return np.full(shape, np.nan, dtype)


@pytest.fixture(params=["rows", "units"])
def schedule(request, monkeypatch):
    """Force one schedule (both directions): by units wherever there are blocks to share."""
    monkeypatch.setattr(rec, "MIN_SPLIT_STEP_FLOPS", 0 if request.param == "units" else 10 ** 18)
    # every array the kernels must fill starts as NaN: an unwritten element cannot pass
    monkeypatch.setattr(rec, "_alloc", _nan_alloc)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("b, n, d_in, hidden", [(1, 1, 5, 7), (3, 37, 13, 150), (1, 97, 9, 33),
                                                (3, 97, 160, 150)])
def test_against_reference(rng, schedule, kind, dtype, b, n, d_in, hidden):
    """H = 150: a 128-unit block and a 22-unit one; input size != hidden size throughout."""
    args = _inputs(rng, kind, b, n, d_in, hidden)
    _check(kind, args, _cotangents(rng, args, kind), dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("units", [16, 512])
@pytest.mark.parametrize("split", [0, 10 ** 18])
def test_block_sizes(rng, monkeypatch, kind, units, split):
    """The sweep's unit blocks with remainders: BPTT_UNITS by rows (16: 4 blocks and 6
    units), by units H = 70 as 48 + 22 on 2 threads; the weight gradients split over the
    threads (the size threshold lifted)."""
    monkeypatch.setattr(rec, "BPTT_UNITS", units)
    monkeypatch.setattr(rec, "SMALL_FLOPS", 0)
    monkeypatch.setattr(rec, "MIN_SPLIT_STEP_FLOPS", split)
    monkeypatch.setattr(rec, "_alloc", _nan_alloc)
    args = _inputs(rng, kind, 3, 11, 6, 70)
    _check(kind, args, _cotangents(rng, args, kind), np.float32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_none_cotangents(rng, kind):
    """None is a zero cotangent: each cotangent alone, then none at all."""
    args = _inputs(rng, kind, 2, 9, 4, 6)
    full = _cotangents(rng, args, kind)
    for keep in range(len(full)):
        only = tuple(c if j == keep else None for j, c in enumerate(full))
        ref_grads = _run(kind, rb, args, only)[1]
        grads = _run(kind, rec, args, only)[1]
        for got, want in zip(grads, ref_grads):
            assert rel_err(got, want) < TOL[np.float64]
    for got in _run(kind, rec, args, (None,) * len(full))[1]:
        assert np.all(got == 0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_backward_twice_and_saved_untouched(rng, kind):
    """The backward reads ``saved`` and writes nothing into it: a second call is identical."""
    args = [a.astype(np.float32) for a in _inputs(rng, kind, 3, 8, 5, 9)]
    train, backward = _ops(kind, rec)
    *outs, saved = train(*args)
    before = [np.array(s, copy=True) for s in saved if isinstance(s, np.ndarray)]
    cots = [c.astype(np.float32) for c in _cotangents(rng, args, kind)]
    first = backward(saved, *cots)
    second = backward(saved, *cots)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
    for a, b in zip(before, [s for s in saved if isinstance(s, np.ndarray)]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", list(KINDS))
def test_backend_methods(rng, kind):
    """CpuBackend's methods reach these kernels (and take None biases, as the forwards do)."""
    args = _inputs(rng, kind, 2, 5, 3, 4)
    n_state = 2 if kind == "lstm" else 1
    name = kind[:3] if kind.startswith("rnn") else kind
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    *outs, saved = getattr(cpu, f"{name}_layer_train")(*args, **extra)
    *ref_outs, ref_saved = getattr(rb, f"{name}_layer_train")(*args, **extra)
    cots = _cotangents(rng, args, kind)
    grads = getattr(cpu, f"{name}_layer_backward")(saved, *cots)
    ref_grads = getattr(rb, f"{name}_layer_backward")(ref_saved, *cots)
    for got, want in zip(outs + list(grads), ref_outs + list(ref_grads)):
        assert rel_err(got, want) < TOL[np.float64]
    no_bias = args[:-2] + (None, None)
    zero_bias = args[:-2] + (np.zeros_like(args[-2]), np.zeros_like(args[-1]))
    got = getattr(cpu, f"{name}_layer_train")(*no_bias, **extra)
    want = getattr(rb, f"{name}_layer_train")(*zero_bias, **extra)
    for g, w in zip(got[:1 + n_state], want[:1 + n_state]):
        assert rel_err(g, w) < TOL[np.float64]


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_cotangents(rng, kind):
    args = _inputs(rng, kind, 2, 5, 3, 4)
    train, backward = _ops(kind, rec)
    *outs, saved = train(*args)
    rest = (None,) * (len(outs) - 1)
    with pytest.raises(ValueError, match="dout must have shape"):
        backward(saved, outs[0][:, 1:], *rest)
    with pytest.raises(ValueError, match="dh_n must have shape"):
        backward(saved, None, outs[1][:1], *rest[1:])
    if kind == "lstm":
        with pytest.raises(ValueError, match="dc_n must have shape"):
            backward(saved, None, None, outs[2][:, :2])


# ---------------------------------------------------------------------------- PyTorch autograd
def _torch_net(kind, d_in, hidden, layers, dtype):
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(kind, torch.nn.RNN)
    kw = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    torch.manual_seed(0)
    net = cls(d_in, hidden, num_layers=layers, batch_first=True, **kw)
    return net.to(torch.float64 if dtype == np.float64 else torch.float32)


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layers", [1, 2])
def test_torch_autograd(rng, kind, layers, dtype):
    """A stack of layers run layer by layer (dx of one is dout of the one below) against
    PyTorch's multi-layer module: input, state and parameter gradients."""
    b, n, d_in, hidden = 3, 37, 6, 11
    net = _torch_net(kind, d_in, hidden, layers, dtype)
    cell = kind == "lstm"
    tdt = next(net.parameters()).dtype
    x = torch.tensor(rng.standard_normal((b, n, d_in)), dtype=tdt, requires_grad=True)
    h0 = torch.tensor(0.5 * rng.standard_normal((layers, b, hidden)), dtype=tdt, requires_grad=True)
    c0 = torch.tensor(0.5 * rng.standard_normal((layers, b, hidden)), dtype=tdt, requires_grad=True)
    tout, tstate = net(x, (h0, c0) if cell else h0)
    tstates = tstate if cell else (tstate,)
    cots = [rng.standard_normal(tuple(t.shape)).astype(dtype) for t in (tout,) + tuple(tstates)]
    params = [p for p in net.parameters()]  # per layer: w_ih, w_hh, b_ih, b_hh
    inputs = [x, h0] + ([c0] if cell else []) + params
    want = torch.autograd.grad((tout,) + tuple(tstates), inputs, [torch.from_numpy(c) for c in cots])
    want = [w.numpy() for w in want]

    train, backward = _ops(kind, cpu)
    y = x.detach().numpy()
    saved = []
    for layer in range(layers):
        w = [p.detach().numpy() for p in params[4 * layer:4 * layer + 4]]
        states = [h0.detach().numpy()[layer]] + ([c0.detach().numpy()[layer]] if cell else [])
        *outs, s = train(y, *states, *w)
        saved.append(s)
        y = outs[0]
    assert rel_err(y, tout.detach().numpy()) < TOL[dtype] * 10
    dy = cots[0]
    d_states = [[] for _ in cots[1:]]
    d_params = [None] * layers
    for layer in reversed(range(layers)):
        g = backward(saved[layer], dy, *[c[layer] for c in cots[1:]])
        dy = g[0]
        for j in range(len(cots) - 1):
            d_states[j].insert(0, g[1 + j])
        d_params[layer] = g[len(cots):]
    got = [dy] + [np.stack(s) for s in d_states] + [p for ps in d_params for p in ps]
    tol = 1e-10 if dtype == np.float64 else 1e-4  # PyTorch float32 has its own rounding
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < tol


def test_lab_variants_match_reference():
    """dev/cpu/recurrent_backward.py: every sweep schedule, block width and weight-gradient
    variant it times (whose verdicts the kernel header quotes) meets its float64 check."""
    import importlib

    lab = importlib.import_module("dev.cpu.recurrent_backward")
    checks = lab.run_checks(np.random.default_rng(0))
    assert checks and all(c["ok"] for c in checks)
