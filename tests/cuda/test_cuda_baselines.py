"""CUDA recurrent layers, 1-D convolution and GLU against the float64 reference (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, randn, rel_err, run

from tfm.reference import baselines as ref_base

DTYPES = [np.float32, np.float64]


def _weights(rng, gates, d_in, hid, dtype):
    s = 1 / np.sqrt(hid)
    return (randn(rng, gates * hid, d_in, dtype=dtype) * s, randn(rng, gates * hid, hid, dtype=dtype) * s,
            randn(rng, gates * hid, dtype=dtype) * s, randn(rng, gates * hid, dtype=dtype) * s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_layer(bk, rng, dtype, nonlinearity):
    x, h0 = randn(rng, 2, 6, 5, dtype=dtype), randn(rng, 2, 7, dtype=dtype)
    w = _weights(rng, 1, 5, 7, dtype)
    out, h = run(bk, lambda *a: bk.rnn_layer(*a, nonlinearity=nonlinearity), x, h0, *w)
    ref_out, ref_h = ref_base.rnn_layer(x, h0, *w, nonlinearity)
    assert rel_err(out, ref_out) < TOL[dtype] and rel_err(h, ref_h) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5])
def test_lstm_layer(bk, rng, dtype, n):
    x = randn(rng, 3, n, 4, dtype=dtype)
    h0, c0 = randn(rng, 3, 6, dtype=dtype), randn(rng, 3, 6, dtype=dtype)
    w = _weights(rng, 4, 4, 6, dtype)
    got = run(bk, bk.lstm_layer, x, h0, c0, *w)
    for a, b in zip(got, ref_base.lstm_layer(x, h0, c0, *w)):
        assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_layer(bk, rng, dtype):
    x, h0 = randn(rng, 2, 5, 3, dtype=dtype), randn(rng, 2, 5, dtype=dtype)
    w = _weights(rng, 3, 3, 5, dtype)
    got = run(bk, bk.gru_layer, x, h0, *w)
    for a, b in zip(got, ref_base.gru_layer(x, h0, *w)):
        assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,dilation,pad_left,pad_right,bias", [
    (1, 1, 0, 0, True), (3, 1, 2, 0, True), (3, 2, 2, 2, False), (4, 3, 0, 5, True)])
def test_conv1d(bk, rng, dtype, k, dilation, pad_left, pad_right, bias):
    x = randn(rng, 2, 9, 5, dtype=dtype)
    w = randn(rng, 7, 5, k, dtype=dtype)
    b = randn(rng, 7, dtype=dtype) if bias else None
    out = run(bk, lambda *a: bk.conv1d(*a, dilation=dilation, pad_left=pad_left, pad_right=pad_right),
              x, w, b)
    assert rel_err(out, ref_base.conv1d(x, w, b, dilation, pad_left, pad_right)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_glu(bk, rng, dtype):
    x = randn(rng, 2, 3, 10, dtype=dtype)
    assert rel_err(run(bk, bk.glu, x), ref_base.glu(x)) < TOL[dtype]
