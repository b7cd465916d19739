"""Recurrent layers (RNN tanh/relu, LSTM, GRU): cpu kernels and tfm.layers against the float64
reference and PyTorch, awkward sizes, long sequences, causality, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfm import layers
from tfm.backends import get_backend
from tfm.backends.cpu import recurrent as cpu_rec
from tfm.reference import baselines as ref

from conftest import TOL, randn, rel_err, requires_torch

DTYPES = [np.float32, np.float64]
KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
N_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def _weights(rng, kind, d_in, hidden, dtype):
    g, bound = N_GATES[kind] * hidden, 1.0 / math.sqrt(hidden)  # PyTorch's init range
    return [rng.uniform(-bound, bound, shape).astype(dtype)
            for shape in ((g, d_in), (g, hidden), (g,), (g,))]


def _run(mod, kind, x, h0, c0, w):
    if kind == "lstm":
        return mod.lstm_layer(x, h0, c0, *w)
    if kind == "gru":
        return mod.gru_layer(x, h0, *w)
    return mod.rnn_layer(x, h0, *w, kind[4:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,n,d_in,hidden", [(1, 1, 1, 1), (3, 37, 5, 37), (2, 97, 13, 70),
                                                 (5, 7, 64, 33)])
def test_cpu_kernel_matches_reference(rng, dtype, kind, batch, n, d_in, hidden):
    x = randn(rng, batch, n, d_in, dtype=dtype)
    h0, c0 = randn(rng, batch, hidden, dtype=dtype), randn(rng, batch, hidden, dtype=dtype)
    w = _weights(rng, kind, d_in, hidden, dtype)
    got, want = _run(cpu_rec, kind, x, h0, c0, w), _run(ref, kind, x, h0, c0, w)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
def test_long_sequence_float32(rng, kind):
    """1200 steps: the float32 error stays at rounding level (no drift) with PyTorch's init."""
    x = randn(rng, 2, 1200, 8)
    h0, c0 = randn(rng, 2, 24), randn(rng, 2, 24)
    w = _weights(rng, kind, 8, 24, np.float32)
    for a, b in zip(_run(cpu_rec, kind, x, h0, c0, w), _run(ref, kind, x, h0, c0, w)):
        assert rel_err(a, b) < TOL[np.float32]


def test_row_groups_cover_the_batch():
    for batch in (1, 7, 8, 16, 33, 100):
        starts = cpu_rec._row_starts(batch)
        assert starts[0] == 0 and starts[-1] == batch and np.all(np.diff(starts) >= 1)
        assert len(starts) == 2 or np.all(np.diff(starts) >= cpu_rec.MIN_GROUP_ROWS)


def test_no_bias_is_zero_bias(rng):
    x, h0, c0 = randn(rng, 2, 9, 4), randn(rng, 2, 6), randn(rng, 2, 6)
    w_ih, w_hh, _, _ = _weights(rng, "lstm", 4, 6, np.float32)
    zero = np.zeros(24, np.float32)
    for a, b in zip(cpu_rec.lstm_layer(x, h0, c0, w_ih, w_hh, None, None),
                    ref.lstm_layer(x, h0, c0, w_ih, w_hh, zero, zero)):
        assert rel_err(a, b) < TOL[np.float32]


@pytest.mark.parametrize("cls,kind", [(layers.RNN, "rnn_tanh"), (layers.LSTM, "lstm"), (layers.GRU, "gru")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_stack_matches_numpy_backend(rng, cls, kind, dtype):
    """A 3-layer stack on cpu equals the same parameters on the float64 reference backend."""
    m = cls(6, 11, num_layers=3, seed=3, dtype=dtype, backend="cpu")
    x = randn(rng, 4, 23, 6, dtype=dtype)
    h0 = randn(rng, 3, 4, 11, dtype=dtype)
    args = (x, h0, randn(rng, 3, 4, 11, dtype=dtype)) if kind == "lstm" else (x, h0)
    got = m(*args)
    m.backend = "numpy"
    want = m(*args)
    for a, b in zip(got, want):
        assert a.dtype == np.dtype(dtype)
        assert rel_err(a, b) < TOL[dtype]
    assert got[1].shape == (3, 4, 11)


def test_layer_default_state_is_zero(rng):
    m = layers.LSTM(3, 5, num_layers=2, seed=1)
    x = randn(rng, 2, 8, 3)
    z = np.zeros((2, 2, 5), np.float32)
    for a, b in zip(m(x), m(x, z, z)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", [layers.RNN, layers.LSTM, layers.GRU])
def test_recurrence_is_causal(rng, cls):
    """Perturbing input t changes no output before t."""
    m = cls(4, 9, num_layers=2, seed=0)
    x = randn(rng, 2, 30, 4)
    base = m(x)[0]
    x2 = x.copy()
    x2[:, 17] += 1.0
    moved = m(x2)[0]
    np.testing.assert_array_equal(moved[:, :17], base[:, :17])
    assert np.abs(moved[:, 17] - base[:, 17]).max() > 1e-4


@requires_torch
@pytest.mark.parametrize("kind", ["RNN_tanh", "RNN_relu", "LSTM", "GRU"])
@pytest.mark.parametrize("n", [1, 37])
def test_cpu_layers_match_pytorch(rng, kind, n):
    import torch

    torch.manual_seed(int(rng.integers(1 << 30)))
    name = kind.split("_")[0]
    extra = {"nonlinearity": kind.split("_")[1]} if name == "RNN" else {}
    tm = getattr(torch.nn, name)(10, 19, num_layers=2, batch_first=True, **extra)
    m = getattr(layers, name)(10, 19, num_layers=2, **extra)
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    x = randn(rng, 3, n, 10)
    with torch.no_grad():
        want = tm(torch.from_numpy(x))
    got = m(x)
    want_flat = [want[0], *want[1]] if name == "LSTM" else [want[0], want[1]]
    for a, b in zip(got, want_flat):
        assert rel_err(a, b.numpy()) < 1e-5


@pytest.mark.parametrize("bad,err,match", [
    (lambda: layers.LSTM(0, 4), ValueError, "input_size"),
    (lambda: layers.GRU(3, 4, num_layers=0), ValueError, "num_layers"),
    (lambda: layers.RNN(3, 4, nonlinearity="sigmoid"), ValueError, "nonlinearity"),
    (lambda: layers.LSTM(3, 4, dtype="float16"), TypeError, "float32 or float64"),
    (lambda: layers.LSTM(3, 4.0), TypeError, "hidden_size"),
])
def test_bad_construction(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


def test_bad_inputs(rng):
    m = layers.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="input_size=3 features"):
        m(randn(rng, 2, 5, 4))
    with pytest.raises(ValueError, match="3 dimensions"):
        m(randn(rng, 5, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        m(np.ones((2, 5, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        m(np.ones((2, 0, 3), np.float32))
    with pytest.raises(ValueError, match=r"h0 must have shape \(num_layers, B, hidden_size\)"):
        m(randn(rng, 2, 5, 3), randn(rng, 1, 2, 4))
    with pytest.raises(ValueError, match="c0 must have shape"):
        m(randn(rng, 2, 5, 3), None, randn(rng, 2, 3, 4))


def test_numpy_backend_is_the_reference(rng):
    """The numpy backend's recurrent methods are the float64 reference itself."""
    bk = get_backend("numpy")
    x, h0 = randn(rng, 2, 5, 3), randn(rng, 2, 4)
    w = _weights(rng, "gru", 3, 4, np.float32)
    for a, b in zip(bk.gru_layer(x, h0, *w), ref.gru_layer(x, h0, *w)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("units", [cpu_rec.UNITS, 16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,groups", [(1, None), (5, None), (5, [0, 2, 5]), (3, [0, 1, 2, 3]),
                                          (1, "units"), (5, "units")])
def test_recurrence_kernel_writes_every_output(rng, kind, batch, groups, units):
    """Both schedules fill a NaN-poisoned output buffer completely and correctly: by rows with
    the default row groups and with several groups (one per thread), and by units (each
    step's blocks shared out over the threads), in one unit block and in several (16-unit
    blocks over 37 units: the last one partial)."""
    n, d_in, hidden = 13, 6, 37
    x = randn(rng, batch, n, d_in)
    h0, c0 = randn(rng, batch, hidden), randn(rng, batch, hidden)
    w_ih, w_hh, b_ih, b_hh = _weights(rng, kind, d_in, hidden, np.float32)
    out = np.full((batch, n, hidden), np.nan, np.float32)
    by_units = groups == "units"
    starts = (cpu_rec._row_starts(batch) if groups in (None, "units")
              else np.array(groups, dtype=np.int64))
    if kind == "lstm":
        xw, w_hhT = cpu_rec._prepare(x, h0, w_ih, w_hh, b_ih + b_hh, 4, units)
        c = c0.copy()  # the cell state, updated in place
        args = (xw, h0, w_hhT, c, out, units)
        h_n = cpu_rec._lstm_by_units(*args) if by_units else cpu_rec._lstm_by_rows(*args, starts)
        want = ref.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        got = (out, h_n, c)
    elif kind == "gru":
        bias = b_ih.copy()
        bias[:2 * hidden] += b_hh[:2 * hidden]
        xw, w_hhT = cpu_rec._prepare(x, h0, w_ih, w_hh, bias, 3, units)
        args = (xw, h0, w_hhT, b_hh[2 * hidden:].copy(), out, units)
        h_n = cpu_rec._gru_by_units(*args) if by_units else cpu_rec._gru_by_rows(*args, starts)
        want = ref.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh)
        got = (out, h_n)
    else:
        xw, w_hhT = cpu_rec._prepare(x, h0, w_ih, w_hh, b_ih + b_hh, 1)
        relu = kind == "rnn_relu"
        h_n = (cpu_rec._rnn_by_units(xw, h0, w_hhT, relu, out, units) if by_units
               else cpu_rec._rnn_by_rows(xw, h0, w_hhT, relu, out, units, starts))
        want = ref.rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, kind[4:])
        got = (out, h_n)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL[np.float32]  # inf (fails) if any NaN survived


@pytest.mark.parametrize("threads,batch,hidden,n_gates,split", [
    (1, 1, 512, 4, False),     # one thread: nothing to share
    (2, 8, 512, 4, True),      # LSTM B=8: one row group, four unit blocks, 16.8 MFLOP a step
    (2, 1, 1024, 4, True),     # LSTM B=1, H=1024: 8.4 MFLOP a step
    (2, 1, 256, 4, False),     # LSTM B=1, H=256: 0.5 MFLOP a step, below the barrier's cost
    (2, 8, 512, 1, False),     # RNN B=8, H=512: 4.2 MFLOP a step
    (2, 16, 512, 4, False),    # a row group of >= MIN_GROUP_ROWS rows per thread: no barriers
    (2, 64, cpu_rec.UNITS, 4, False),  # a single unit block
])
def test_schedule_choice(monkeypatch, threads, batch, hidden, n_gates, split):
    monkeypatch.setattr(cpu_rec, "get_num_threads", lambda: threads)
    assert (cpu_rec._row_schedule(batch, hidden, cpu_rec.UNITS, n_gates) is None) is split


@pytest.mark.parametrize("kind", KINDS)
def test_layers_on_the_units_schedule_match_reference(rng, monkeypatch, kind):
    """The public layer functions on the by-units schedule (B < 2 * MIN_GROUP_ROWS on two
    threads, several unit blocks, the last one partial), float32 and float64."""
    monkeypatch.setattr(cpu_rec, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_rec, "MIN_SPLIT_STEP_FLOPS", 0)  # a small size takes that path too
    batch, n, d_in, hidden = 3, 9, 7, 2 * cpu_rec.UNITS + 5
    assert cpu_rec._row_schedule(batch, hidden, cpu_rec.UNITS, 1) is None
    for dtype in DTYPES:
        x = randn(rng, batch, n, d_in, dtype=dtype)
        h0, c0 = randn(rng, batch, hidden, dtype=dtype), randn(rng, batch, hidden, dtype=dtype)
        w = _weights(rng, kind, d_in, hidden, dtype)
        for a, b in zip(_run(cpu_rec, kind, x, h0, c0, w), _run(ref, kind, x, h0, c0, w)):
            assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_gates,hidden,units", [(1, 1, 128), (3, 37, 128), (4, 70, 16), (4, 33, 8)])
def test_permuted_transpose(rng, dtype, n_gates, hidden, units):
    """The tiled permute-and-transpose of W_hh equals NumPy's, tiles not dividing the shape."""
    w = randn(rng, n_gates * hidden, hidden, dtype=dtype)
    perm = cpu_rec._block_permutation(n_gates, hidden, units)
    assert sorted(perm) == list(range(n_gates * hidden))
    got = cpu_rec._permuted_transpose(w, perm)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, w[perm].T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize("hidden", [1, 6, 37])
def test_step_product_block(rng, dtype, batch, hidden):
    """The register-blocked step product: every row remainder (B % 4) and k remainder
    (H % 4), a column block inside a wider W_hh^T, NaN-poisoned accumulator."""
    w_hhT = randn(rng, hidden, 3 * hidden + 5, dtype=dtype)
    h = randn(rng, batch, hidden, dtype=dtype)
    col0, width = 2, 3 * hidden
    acc = np.full((batch, width + 3), np.nan, dtype)
    cpu_rec._hidden_block(h, w_hhT, acc, col0, width)
    want = h.astype(np.float64) @ w_hhT[:, col0:col0 + width].astype(np.float64)
    assert rel_err(acc[:, :width], want) < TOL[dtype]
    assert np.all(np.isnan(acc[:, width:]))  # columns past the block untouched
