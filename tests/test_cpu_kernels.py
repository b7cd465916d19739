"""CPU dense, norm and embedding kernels against the float64 reference (and PyTorch)."""

from __future__ import annotations

import importlib

import numba
import numpy as np
import pytest
from conftest import TOL, randn, rel_err, requires_torch

from tfm import reference as ref
from tfm.backends import get_backend
from tfm.backends.cpu import embedding as emb
from tfm.backends.cpu import fastmath
from tfm.backends.cpu import linear as lin
from tfm.backends.cpu import norm

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1, 1), (2, 37, 24), (3, 97, 65)]  # (B, N, D): awkward, not multiples of 8


# ---------------------------------------------------------------------------- linear / FFN
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(rng, dtype, shape, bias):
    x = randn(rng, *shape, dtype=dtype)
    w = randn(rng, 29, shape[-1], dtype=dtype)
    b = randn(rng, 29, dtype=dtype) if bias else None
    out = lin.linear(x, w, b)
    assert out.dtype == dtype and out.shape == shape[:-1] + (29,)
    assert rel_err(out, ref.linear(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_2d_and_4d_inputs(rng, dtype):
    w = randn(rng, 7, 5, dtype=dtype)
    b = randn(rng, 7, dtype=dtype)
    for shape in [(11, 5), (2, 3, 4, 5)]:
        x = randn(rng, *shape, dtype=dtype)
        assert rel_err(lin.linear(x, w, b), ref.linear(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_add(rng, dtype):
    a, b = randn(rng, 3, 37, 5, dtype=dtype), randn(rng, 3, 37, 5, dtype=dtype)
    out = lin.add(a, b)
    assert out.dtype == dtype
    assert rel_err(out, a.astype(np.float64) + b) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["relu", "gelu"])
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 97, 65)])
def test_activation(rng, dtype, kind, shape):
    x = randn(rng, *shape, dtype=dtype) * 3
    before = x.copy()
    out = lin.activation(x, kind)
    assert out.dtype == dtype and out.shape == x.shape
    assert np.array_equal(x, before), "activation must not modify its input"
    assert rel_err(out, ref.transformer.ACTIVATIONS[kind](x)) < TOL[dtype]


def test_activation_unknown_kind(rng):
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        lin.activation(randn(rng, 4, 4), "tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        lin.feed_forward(randn(rng, 2, 4), randn(rng, 8, 4), None, randn(rng, 4, 8), None, "swish")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["relu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_feed_forward(rng, dtype, kind, shape):
    d, d_ff = shape[-1], 3 * shape[-1] + 1
    x = randn(rng, *shape, dtype=dtype)
    w1, b1 = randn(rng, d_ff, d, dtype=dtype), randn(rng, d_ff, dtype=dtype)
    w2, b2 = randn(rng, d, d_ff, dtype=dtype), randn(rng, d, dtype=dtype)
    out = lin.feed_forward(x, w1, b1, w2, b2, kind)
    assert out.dtype == dtype and out.shape == shape
    assert rel_err(out, ref.position_wise_ffn(x, w1, b1, w2, b2, kind)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_feed_forward_without_biases(rng, dtype):
    x = randn(rng, 2, 13, 6, dtype=dtype)
    w1, w2 = randn(rng, 10, 6, dtype=dtype), randn(rng, 6, 10, dtype=dtype)
    out = lin.feed_forward(x, w1, None, w2, None, "relu")
    assert rel_err(out, ref.position_wise_ffn(x, w1, None, w2, None)) < TOL[dtype]


@requires_torch
@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_feed_forward_matches_torch(rng, kind):
    import torch

    d, d_ff = 24, 80
    x = randn(rng, 2, 37, d)
    l1, l2 = torch.nn.Linear(d, d_ff), torch.nn.Linear(d_ff, d)
    act = torch.nn.ReLU() if kind == "relu" else torch.nn.GELU()
    with torch.no_grad():
        expected = l2(act(l1(torch.from_numpy(x)))).numpy()
    out = lin.feed_forward(x, l1.weight.detach().numpy(), l1.bias.detach().numpy(),
                           l2.weight.detach().numpy(), l2.bias.detach().numpy(), kind)
    assert rel_err(out, expected) < 1e-5


# ---------------------------------------------------------------------------- norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2, 5, 512)])
@pytest.mark.parametrize("residual", [True, False])
def test_layer_norm(rng, dtype, shape, residual):
    # an offset mean: the two-pass variance must not lose digits to it
    x = randn(rng, *shape, dtype=dtype) * 2 + 3
    r = randn(rng, *shape, dtype=dtype) if residual else None
    gamma, beta = randn(rng, shape[-1], dtype=dtype), randn(rng, shape[-1], dtype=dtype)
    out = norm.layer_norm(x, gamma, beta, 1e-5, r)
    assert out.dtype == dtype and out.shape == shape
    if shape[-1] == 1:  # a one-feature row normalises to beta exactly
        assert np.allclose(out, np.broadcast_to(beta, shape))
    assert rel_err(out, ref.layer_norm(x, gamma, beta, 1e-5, r)) < TOL[dtype]


@requires_torch
def test_layer_norm_matches_torch(rng):
    import torch

    x, r = randn(rng, 3, 37, 64), randn(rng, 3, 37, 64)
    ln = torch.nn.LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(randn(rng, 64)))
        ln.bias.copy_(torch.from_numpy(randn(rng, 64)))
        expected = ln(torch.from_numpy(x + r)).numpy()
    out = norm.layer_norm(x, ln.weight.detach().numpy(), ln.bias.detach().numpy(), 1e-6, r)
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (97,), (2, 37, 1000)])
def test_softmax_and_log_softmax(rng, dtype, shape):
    x = randn(rng, *shape, dtype=dtype) * 10
    x.reshape(-1)[0] = 80  # exp(80) overflows float32: the max shift must handle it
    sm, lsm = norm.softmax(x), norm.log_softmax(x)
    assert sm.dtype == dtype and lsm.dtype == dtype
    assert rel_err(sm, ref.softmax(x)) < TOL[dtype]
    assert rel_err(lsm, ref.log_softmax(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax(rng, dtype):
    x = randn(rng, 3, 37, 101, dtype=dtype)
    out = norm.argmax(x)
    assert out.dtype == np.int64 and out.shape == (3, 37)
    assert np.array_equal(out, np.argmax(x, axis=-1))


# ---------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(rng, dtype):
    table = randn(rng, 50, 33, dtype=dtype)
    ids = rng.integers(0, 50, size=(3, 37))
    ids[0, 0], ids[-1, -1] = 0, 49
    out = emb.embedding(ids, table, 5.5)
    assert out.dtype == dtype and out.shape == (3, 37, 33)
    assert rel_err(out, ref.embed(ids, table, 5.5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_model", [1, 2, 33, 512])
@pytest.mark.parametrize("offset", [0, 1, 700])
def test_positional_encoding(rng, dtype, d_model, offset):
    x = randn(rng, 2, 37, d_model, dtype=dtype)
    out = emb.add_positional_encoding(x, offset)
    assert out.dtype == dtype and out.shape == x.shape
    expected = x.astype(np.float64) + ref.positional_encoding(37, d_model, offset)[None]
    assert rel_err(out, expected) < TOL[dtype]


def test_positional_table_is_cached_and_grows():
    small = emb.positional_table(10, 6, np.float32)
    again = emb.positional_table(10, 6, np.float32)
    assert np.shares_memory(small, again), "a second request must not recompute the table"
    long = emb.positional_table(5000, 6, np.float32)
    assert long.shape == (5000, 6) and not long.flags.writeable
    assert rel_err(long, ref.positional_encoding(5000, 6)) < TOL[np.float32]
    assert emb.positional_table(10, 6, np.float64).dtype == np.float64


# ---------------------------------------------------------------------------- through the backend
def test_cpu_backend_delegates_to_these_kernels(rng):
    cpu, npb = get_backend("cpu"), get_backend("numpy")
    x = randn(rng, 2, 9, 8)
    w, b = randn(rng, 4, 8), randn(rng, 4)
    g, be = randn(rng, 8), randn(rng, 8)
    assert rel_err(cpu.linear(x, w, b), npb.linear(x, w, b)) < TOL[np.float32]
    assert rel_err(cpu.layer_norm(x, g, be, 1e-5, x), npb.layer_norm(x, g, be, 1e-5, x)) < TOL[np.float32]
    assert rel_err(cpu.softmax(x), npb.softmax(x)) < TOL[np.float32]
    assert np.array_equal(cpu.argmax(x), npb.argmax(x))
    assert rel_err(cpu.add_positional_encoding(x, 3), npb.add_positional_encoding(x, 3)) < TOL[np.float32]


def test_row_kernels_write_every_output_element(rng):
    """NaN-poisoned outputs: every element must be written by the Numba kernels themselves."""
    x, r = randn(rng, 37, 65), randn(rng, 37, 65)
    g, b = randn(rng, 65), randn(rng, 65)
    out = np.full_like(x, np.nan)
    norm._layer_norm_kernel(x, r, True, g, b, 1e-5, out)
    assert rel_err(out, ref.layer_norm(x, g, b, 1e-5, r)) < TOL[np.float32]
    for log in (False, True):
        out = np.full_like(x, np.nan)
        norm._softmax_kernel(x, out, log)
        expected = ref.log_softmax(x) if log else ref.softmax(x)
        assert rel_err(out, expected) < TOL[np.float32]
    table, ids = randn(rng, 11, 65), rng.integers(0, 11, size=(3, 37))
    out = np.full((3, 37, 65), np.nan, np.float32)
    emb._gather_scale(ids, table, 2.0, out)
    assert rel_err(out, ref.embed(ids, table, 2.0)) < TOL[np.float32]


@numba.njit
def _exp_shift_sum_njit(row, n, m):
    return norm.exp_shift_sum(row, n, m)  # in @njit code: the float32 polynomial, then the float64 sum


def test_exp_shift_sum_polynomial(rng):
    """The float32 exp used by softmax and attention: ~1 ulp, exact zeros below -87 and at -inf."""
    x = np.concatenate([-rng.random(10_000, dtype=np.float32) * 80, [0.0, -87.5, -200.0, -np.inf]])
    row = x.astype(np.float32)
    total = _exp_shift_sum_njit(row, row.size, np.float32(0.0))
    expected = np.exp(x.astype(np.float64))
    expected[-3:] = 0.0
    assert np.all(row[-3:] == 0)
    assert np.max(np.abs(row - expected) / np.maximum(expected, 1e-30)) < 2.5e-7
    assert abs(total - expected.sum()) <= 1e-6 * expected.sum()


@numba.njit
def _exp2_shift_sum_njit(row, n, m):
    return norm.exp2_shift_sum(row, n, m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp2_shift_sum_polynomial(rng, dtype):
    """The 2**x of fused attention's log2-unit scores: float32 within 2.5e-7 relative (the fit's
    1.9e-7 plus rounding of x - m), exact zeros below -126 and at -inf, NaN kept, an odd length
    (the vector loop's scalar tail), and the float64 sum."""
    # multiples of 2**-10: x + m and its float32 difference with m are exact, so only the
    # polynomial's error is measured
    x = -np.round(rng.random(10_001) * 120 * 1024) / 1024
    x = np.concatenate([x, [0.0, -0.5, -1.5, -126.5, -300.0, -np.inf]])
    m = 3.25  # a shift, as the kernels use it: row <= m
    row = (x + m).astype(dtype)
    total = _exp2_shift_sum_njit(row, row.size, dtype(m))
    expected = np.exp2((x + m).astype(dtype).astype(np.float64) - m)
    tail = 3 if dtype == np.float32 else 0  # float32: below -126 is flushed to 0
    if tail:
        expected[-tail:] = 0.0
    assert np.all(row[-1:] == 0)
    tol = 2.5e-7 if dtype == np.float32 else 1e-15
    head = slice(0, row.size - max(tail, 1))
    assert np.max(np.abs(row[head] - expected[head]) / expected[head]) < tol
    assert abs(total - expected.sum()) <= 1e-6 * expected.sum()
    nan_row = np.array([np.nan, -1.0], dtype)
    _exp2_shift_sum_njit(nan_row, 2, dtype(0.0))
    assert np.isnan(nan_row[0]) and nan_row[1] == dtype(0.5)


def test_float32_gate_functions_against_float64():
    """The vectorised rational tanh/sigmoid used for float32 gates: |error| < 4e-7."""
    @numba.njit
    def both(x, t, s):
        for i in range(x.shape[0]):
            t[i] = fastmath.tanh(x[i])
            s[i] = fastmath.sigmoid(x[i])

    x = np.linspace(-30, 30, 200_001).astype(np.float32)
    t, s = np.empty_like(x), np.empty_like(x)
    both(x, t, s)
    x64 = x.astype(np.float64)
    assert np.max(np.abs(t - np.tanh(x64))) < 4e-7
    assert np.max(np.abs(s - 1.0 / (1.0 + np.exp(-x64)))) < 4e-7
    assert np.all(t[x64 > 0] >= 0) and np.all(np.abs(t) <= 1.0)


@pytest.mark.parametrize("family", ["fastmath", "recurrent", "attention"])
def test_lab_variants_match_reference(family):
    """dev/cpu: every variant the lab times (whose verdicts the kernel headers quote) meets
    its float64 check on awkward sizes; ``run_checks`` raises on the first miss."""
    lab = importlib.import_module(f"dev.cpu.{family}")
    checks = lab.run_checks(np.random.default_rng(0))
    assert checks and all(c["ok"] for c in checks)
