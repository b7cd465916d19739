"""One thread pool for the CPU backend: the partitioned GEMM paths of linear/FFN (row blocks,
column blocks, the single-thread path), the single-thread paths of the row kernels, and the
single-threaded BLAS context. Every output buffer is NaN-poisoned first."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, randn, rel_err, requires_torch
from threadpoolctl import threadpool_info

from tfm import reference as ref
from tfm.backends.cpu import _threads
from tfm.backends.cpu import embedding as emb
from tfm.backends.cpu import linear as lin
from tfm.backends.cpu import norm

DTYPES = [np.float32, np.float64]
ACTS = {"identity": lin._IDENTITY, "relu": lin._RELU, "gelu": lin._GELU}


def _expected(x, w, b, act):
    y = ref.linear(x, w, b)
    return y if act == "identity" else ref.transformer.ACTIVATIONS[act](y)


# ---------------------------------------------------------------------------- partitioned GEMM
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n",
                         [(1, 5, 29), (3, 64, 17), (37, 1, 100), (97, 24, 33), (2, 7, 1)])
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
@pytest.mark.parametrize("by_rows", [True, False])
def test_parallel_blocks_write_every_element(rng, dtype, m, k, n, parts, by_rows):
    """M = 1, odd M, M < parts, N not divisible by parts (or by the 16-column alignment)."""
    x, w = randn(rng, m, k, dtype=dtype), randn(rng, n, k, dtype=dtype)
    for bias in (randn(rng, n, dtype=dtype), None):
        for act, code in ACTS.items():
            out = np.full((m, n), np.nan, dtype)
            b = np.empty(0, dtype) if bias is None else bias
            lin._linear_parallel(x, w, b, bias is not None, code, out, parts, by_rows)
            assert rel_err(out, _expected(x, w, bias, act)) < TOL[dtype], (act, bias is None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_writes_only_its_block(rng, dtype):
    """A block's gemm uses the full row stride of out: its neighbours stay untouched (NaN)."""
    x, w = randn(rng, 9, 6, dtype=dtype), randn(rng, 11, 6, dtype=dtype)
    b = randn(rng, 11, dtype=dtype)
    out = np.full((9, 11), np.nan, dtype)
    lin._block(x, w, b, True, lin._RELU, out, 2, 7, 3, 10)
    assert rel_err(out[2:7, 3:10], _expected(x, w, b, "relu")[2:7, 3:10]) < TOL[dtype]
    inside = np.zeros(out.shape, bool)
    inside[2:7, 3:10] = True
    assert np.isnan(out[~inside]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small_flops", [0, 10**12], ids=["parallel", "one-thread"])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 3, 24), (2, 37, 24), (3, 97, 65)])
def test_linear_and_ffn_on_both_paths(rng, monkeypatch, dtype, small_flops, shape):
    """Through the public functions: rows (M >= 64 per thread), columns (M small) or one thread."""
    monkeypatch.setattr(lin, "SMALL_FLOPS", small_flops)
    x = randn(rng, *shape, dtype=dtype)
    w1, b1 = randn(rng, 37, shape[-1], dtype=dtype), randn(rng, 37, dtype=dtype)
    w2, b2 = randn(rng, shape[-1], 37, dtype=dtype), randn(rng, shape[-1], dtype=dtype)
    for bias in (b1, None):
        out = lin.linear(x, w1, bias)
        assert out.dtype == dtype and out.shape == shape[:-1] + (37,)
        assert rel_err(out, ref.linear(x, w1, bias)) < TOL[dtype]
    for kind in ("relu", "gelu"):
        out = lin.feed_forward(x, w1, b1, w2, None, kind)
        assert out.dtype == dtype and out.shape == shape
        expected = ref.position_wise_ffn(x, w1, b1, w2, np.zeros(shape[-1]), kind)
        assert rel_err(out, expected) < TOL[dtype]
        out = lin.feed_forward(x, w1, None, w2, b2, kind)
        assert rel_err(out, ref.position_wise_ffn(x, w1, np.zeros(37), w2, b2, kind)) < TOL[dtype]


@requires_torch
@pytest.mark.parametrize("small_flops", [0, 10**12], ids=["parallel", "one-thread"])
def test_ffn_matches_torch_on_both_paths(rng, monkeypatch, small_flops):
    import torch

    monkeypatch.setattr(lin, "SMALL_FLOPS", small_flops)
    torch.manual_seed(int(rng.integers(1 << 30)))
    l1, l2 = torch.nn.Linear(24, 97), torch.nn.Linear(97, 24)
    x = randn(rng, 5, 41, 24)
    with torch.no_grad():
        expect = l2(torch.nn.functional.gelu(l1(torch.from_numpy(x)))).numpy()
    out = lin.feed_forward(x, l1.weight.detach().numpy(), l1.bias.detach().numpy(),
                           l2.weight.detach().numpy(), l2.bias.detach().numpy(), "gelu")
    assert rel_err(out, expect) < TOL[np.float32]


def test_linear_edge_cases_and_bad_input(rng):
    x, w, b = randn(rng, 4, 0), randn(rng, 3, 0), randn(rng, 3)
    assert np.array_equal(lin.linear(x, w, b), np.broadcast_to(b, (4, 3)))  # empty sum: bias only
    assert lin.linear(randn(rng, 0, 5), randn(rng, 3, 5)).shape == (0, 3)
    x64 = randn(rng, 2, 5, dtype=np.float64)
    assert lin.linear(x64, randn(rng, 3, 5)).dtype == np.float64  # weight cast to x's dtype
    with pytest.raises(TypeError, match="float32 or float64"):
        lin.linear(np.ones((2, 5), np.int64), randn(rng, 3, 5))
    with pytest.raises(ValueError, match="weight"):
        lin.linear(randn(rng, 2, 5), randn(rng, 3, 4))
    with pytest.raises(ValueError, match="bias"):
        lin.linear(randn(rng, 2, 5), randn(rng, 3, 5), randn(rng, 4))


# ---------------------------------------------------------------------------- row kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small", [0, 10**9], ids=["parallel", "one-thread"])
def test_row_kernels_on_both_paths(rng, monkeypatch, dtype, small):
    monkeypatch.setattr(norm, "SMALL_ELEMENTS", small)
    monkeypatch.setattr(emb, "SMALL_ELEMENTS", small)
    monkeypatch.setattr(lin, "SMALL_ELEMENTS", small)
    x, r = randn(rng, 3, 37, 65, dtype=dtype), randn(rng, 3, 37, 65, dtype=dtype)
    g, b = randn(rng, 65, dtype=dtype), randn(rng, 65, dtype=dtype)
    expected = ref.layer_norm(x, g, b, 1e-5, r)
    assert rel_err(norm.layer_norm(x, g, b, 1e-5, r), expected) < TOL[dtype]
    assert rel_err(norm.softmax(x), ref.softmax(x)) < TOL[dtype]
    assert rel_err(norm.log_softmax(x), ref.log_softmax(x)) < TOL[dtype]
    assert rel_err(lin.activation(x, "gelu"), ref.transformer.ACTIVATIONS["gelu"](x)) < TOL[dtype]
    table, ids = randn(rng, 11, 65, dtype=dtype), rng.integers(0, 11, size=(3, 37))
    assert rel_err(emb.embedding(ids, table, 2.0), ref.embed(ids, table, 2.0)) < TOL[dtype]


def test_one_thread_row_kernels_write_every_element(rng):
    x, r = randn(rng, 37, 65), randn(rng, 37, 65)
    g, b = randn(rng, 65), randn(rng, 65)
    out = np.full_like(x, np.nan)
    norm._layer_norm_rows(x, r, True, g, b, 1e-5, out, 0, 37)
    assert rel_err(out, ref.layer_norm(x, g, b, 1e-5, r)) < TOL[np.float32]
    for log in (False, True):
        out = np.full_like(x, np.nan)
        norm._softmax_rows(x, out, log, 0, 37)
        assert rel_err(out, ref.log_softmax(x) if log else ref.softmax(x)) < TOL[np.float32]
    table, ids = randn(rng, 11, 65), rng.integers(0, 11, size=(3, 37))
    out = np.full((3, 37, 65), np.nan, np.float32)
    emb._gather_rows(ids, table, 2.0, out, 0, ids.size)
    assert rel_err(out, ref.embed(ids, table, 2.0)) < TOL[np.float32]


# ---------------------------------------------------------------------------- BLAS threads
def test_single_threaded_blas_limits_and_restores():
    def counts():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = counts()
    assert before, "no BLAS library found"
    with _threads.single_threaded_blas():
        assert counts() == [1] * len(before)
        with _threads.single_threaded_blas():  # nesting keeps the limit
            assert counts() == [1] * len(before)
        assert counts() == [1] * len(before)
    assert counts() == before
