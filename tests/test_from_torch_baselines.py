"""tfm.from_torch for nn.RNN / nn.LSTM / nn.GRU / nn.Conv1d: PyTorch's outputs on tfm's kernels
(relative error < 1e-4 in float32), layouts (batch_first, unbatched), states, unsupported options."""

from __future__ import annotations

import numpy as np
import pytest

import tfm

from conftest import rel_err, requires_torch

pytestmark = requires_torch
torch = pytest.importorskip("torch")


def _flat(result):
    out, state = result
    return [out, *state] if isinstance(state, tuple) else [out, state]


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("kind,extra", [("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}),
                                        ("LSTM", {}), ("GRU", {})])
@pytest.mark.parametrize("num_layers,batch_first,bias", [(1, False, True), (3, True, True), (2, False, False)])
def test_recurrent_matches_pytorch(rng, kind, extra, num_layers, batch_first, bias):
    torch.manual_seed(int(rng.integers(1 << 30)))
    m = getattr(torch.nn, kind)(7, 13, num_layers=num_layers, batch_first=batch_first, bias=bias, **extra)
    conv = tfm.from_torch(m)
    x = rng.standard_normal((4, 37, 7) if batch_first else (37, 4, 7)).astype(np.float32)
    with torch.no_grad():
        want = _flat(m(_t(x)))
    got = _flat(conv(x))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == tuple(b.shape)
        assert rel_err(a, b.numpy()) < 1e-4


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_recurrent_initial_states_and_unbatched_input(rng, kind):
    torch.manual_seed(0)
    m = getattr(torch.nn, kind)(5, 6, num_layers=2)
    conv = tfm.from_torch(m)
    x = rng.standard_normal((9, 3, 5)).astype(np.float32)
    h0 = rng.standard_normal((2, 3, 6)).astype(np.float32)
    c0 = rng.standard_normal((2, 3, 6)).astype(np.float32)
    hx = (h0, c0) if kind == "LSTM" else h0
    thx = (_t(h0), _t(c0)) if kind == "LSTM" else _t(h0)
    with torch.no_grad():
        want = _flat(m(_t(x), thx))
        want_u = _flat(m(_t(x[:, 0]), tuple(s[:, 0] for s in thx) if kind == "LSTM" else thx[:, 0]))
    for a, b in zip(_flat(conv(x, hx)), want):
        assert rel_err(a, b.numpy()) < 1e-4
    hx_u = (h0[:, 0], c0[:, 0]) if kind == "LSTM" else h0[:, 0]
    for a, b in zip(_flat(conv(x[:, 0], hx_u)), want_u):
        assert a.shape == tuple(b.shape)
        assert rel_err(a, b.numpy()) < 1e-4


def test_long_sequence_lstm(rng):
    torch.manual_seed(1)
    m = torch.nn.LSTM(16, 32, batch_first=True)
    x = rng.standard_normal((2, 1500, 16)).astype(np.float32)
    with torch.no_grad():
        want = _flat(m(_t(x)))
    for a, b in zip(_flat(tfm.from_torch(m)(x)), want):
        assert rel_err(a, b.numpy()) < 1e-4


def test_float64_module(rng):
    m = torch.nn.GRU(4, 5, num_layers=2).double()
    x = rng.standard_normal((11, 2, 4))
    with torch.no_grad():
        want = _flat(m(_t(x)))
    got = _flat(tfm.from_torch(m)(x))
    assert got[0].dtype == np.float64
    for a, b in zip(got, want):
        assert rel_err(a, b.numpy()) < 1e-12


@pytest.mark.parametrize("padding,dilation,k,n", [("same", 1, 3, 37), ("same", 3, 4, 37), ("valid", 1, 5, 37),
                                                  (2, 2, 3, 10), (0, 1, 1, 1), ("same", 40, 3, 9), (7, 1, 2, 3)])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_conv1d_matches_pytorch(rng, padding, dilation, k, n):
    torch.manual_seed(int(rng.integers(1 << 30)))
    m = torch.nn.Conv1d(5, 9, k, padding=padding, dilation=dilation)
    conv = tfm.from_torch(m)
    x = rng.standard_normal((3, 5, n)).astype(np.float32)
    with torch.no_grad():
        want = m(_t(x)).numpy()
        want_u = m(_t(x[0])).numpy()
    assert rel_err(conv(x), want) < 1e-4
    assert rel_err(conv(x[0]), want_u) < 1e-4


def test_conv1d_without_bias(rng):
    m = torch.nn.Conv1d(3, 4, 3, bias=False, padding=1)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    with torch.no_grad():
        assert rel_err(tfm.from_torch(m)(x), m(_t(x)).numpy()) < 1e-4


@pytest.mark.parametrize("module,match", [
    (lambda: torch.nn.LSTM(3, 4, bidirectional=True), "bidirectional"),
    (lambda: torch.nn.LSTM(3, 4, proj_size=2), "proj_size=2"),
    (lambda: torch.nn.Conv1d(3, 4, 3, stride=2), "stride 1"),
    (lambda: torch.nn.Conv1d(4, 4, 3, groups=2), "groups=1"),
    (lambda: torch.nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
])
def test_unsupported_options_are_clear_errors(module, match):
    with pytest.raises(ValueError, match=match):
        tfm.from_torch(module())


def test_bad_input_shapes(rng):
    conv = tfm.from_torch(torch.nn.Conv1d(3, 4, 5, dilation=2))
    with pytest.raises(ValueError, match=r"\(C_in, N\) or \(B, C_in, N\)"):
        conv(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"in_channels=3 channels in dimension 1, got shape \(2, 4, 20\)"):
        conv(np.zeros((2, 4, 20), np.float32))
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv(np.zeros((2, 3, 8), np.float32))
    rec = tfm.from_torch(torch.nn.GRU(3, 4))
    with pytest.raises(ValueError, match="input_size=3 features"):
        rec(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(ValueError, match="h0 must have shape"):
        rec(np.zeros((5, 2, 3), np.float32), np.zeros((2, 2, 4), np.float32))
