"""CUDA dense, norm, embedding and layout kernels against the float64 reference (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, randn, rel_err, run

from tfm import reference as ref

DTYPES = [np.float32, np.float64]


@pytest.fixture(params=["numba", "cupy"])
def gemm_bk(request):
    """The backend with each GEMM: the Numba kernels and cuBLAS (skipped where unavailable)."""
    from tfm.backends.cuda import CudaBackend

    try:
        return CudaBackend(gemm=request.param)
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d_in,d_out,bias", [((1,), 1, 1, True), ((2, 7), 13, 11, True),
                                                   ((19,), 9, 17, False), ((3, 1), 5, 3, True)])
def test_linear(gemm_bk, rng, dtype, lead, d_in, d_out, bias):
    bk = gemm_bk
    x, w = randn(rng, *lead, d_in, dtype=dtype), randn(rng, d_out, d_in, dtype=dtype)
    b = randn(rng, d_out, dtype=dtype) if bias else None
    out = run(bk, bk.linear, x, w, b)
    assert out.dtype == dtype and out.shape == lead + (d_out,)
    assert rel_err(out, ref.linear(x, w, b)) < TOL[dtype]


def test_gemm_picks_the_small_tile_for_small_products(bk):
    from tfm.backends.cuda.linear import pick_gemm_tiles

    t = bk.tuning
    assert pick_gemm_tiles(t, 1, 2, 3) == t.gemm_small
    bm, bn = t.gemm_large[:2]
    assert pick_gemm_tiles(t, t.min_blocks, bm, bn) == t.gemm_large


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_feed_forward_and_activation(gemm_bk, rng, dtype, act):
    bk = gemm_bk
    x = randn(rng, 2, 5, 6, dtype=dtype)
    w1, b1 = randn(rng, 10, 6, dtype=dtype), randn(rng, 10, dtype=dtype)
    w2, b2 = randn(rng, 6, 10, dtype=dtype), randn(rng, 6, dtype=dtype)
    out = run(bk, lambda *a: bk.feed_forward(*a, act), x, w1, b1, w2, b2)
    assert rel_err(out, ref.position_wise_ffn(x, w1, b1, w2, b2, act)) < TOL[dtype]
    assert rel_err(run(bk, lambda a: bk.activation(a, act), x), ref.transformer.ACTIVATIONS[act](x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_add(bk, rng, dtype):
    a, b = randn(rng, 3, 7, 5, dtype=dtype), randn(rng, 3, 7, 5, dtype=dtype)
    assert rel_err(run(bk, bk.add, a, b), a.astype(np.float64) + b) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 33])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm(bk, rng, dtype, d, residual):
    x = randn(rng, 2, 3, d, dtype=dtype) * 3 + 1
    r = randn(rng, 2, 3, d, dtype=dtype) if residual else None
    g, b = randn(rng, d, dtype=dtype), randn(rng, d, dtype=dtype)
    out = run(bk, lambda x_, g_, b_, r_: bk.layer_norm(x_, g_, b_, 1e-5, residual=r_), x, g, b, r)
    assert rel_err(out, ref.layer_norm(x, g, b, 1e-5, r)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 6, 37])
def test_softmax_log_softmax(bk, rng, dtype, d):
    x = randn(rng, 3, 2, d, dtype=dtype) * 4
    assert rel_err(run(bk, bk.softmax, x), ref.softmax(x)) < TOL[dtype]
    assert rel_err(run(bk, bk.log_softmax, x), ref.log_softmax(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_first_occurrence(bk, rng, dtype):
    x = randn(rng, 2, 3, 11, dtype=dtype)
    x[0, 1, :] = 0.5  # all tied: index 0
    x[1, 2, 4] = x[1, 2, 9] = 100.0  # tie between 4 and 9: 4
    out = bk.argmax(bk.asarray(x))
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    np.testing.assert_array_equal(out, np.argmax(x, axis=-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_and_positional_encoding(bk, rng, dtype):
    table = randn(rng, 13, 6, dtype=dtype)
    ids = rng.integers(0, 13, size=(2, 5)).astype(np.int64)
    emb = bk.embedding(ids, bk.asarray(table), 2.5)
    assert rel_err(bk.to_numpy(emb), ref.embed(ids, table, 2.5)) < TOL[dtype]
    for offset in (0, 3, 300):  # 300 grows the cached table
        out = bk.to_numpy(bk.add_positional_encoding(emb, offset))
        expect = ref.embed(ids, table, 2.5) + ref.positional_encoding(5, 6, offset)[None]
        assert rel_err(out, expect) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_merge_heads_and_strided_views(bk, rng, dtype):
    x = randn(rng, 2, 5, 3 * 6, dtype=dtype)
    dx = bk.asarray(x)
    heads = bk.split_heads(dx, 3)
    np.testing.assert_array_equal(bk.to_numpy(heads), ref.split_heads(x, 3))
    np.testing.assert_array_equal(bk.to_numpy(bk.merge_heads(heads)), x)  # a strided view: copied
    # a column slice of a fused projection (a strided view)
    part = bk.split_heads(dx[:, :, 6:12], 2)
    np.testing.assert_array_equal(bk.to_numpy(part), ref.split_heads(x[:, :, 6:12], 2))
    # the same columns selected by the view, as the model asks for them
    cols = bk.split_heads(dx, 2, start=6, width=6)
    np.testing.assert_array_equal(bk.to_numpy(cols), ref.split_heads(x[:, :, 6:12], 2))


def test_attention_output_is_merged_without_a_copy(bk, rng, monkeypatch):
    """Split heads are views of the projection; the attention output is written head-merged,
    so merge_heads launches nothing (and the result is still right)."""
    from tfm.backends.cuda import _launch

    qkv = randn(rng, 2, 7, 3 * 6)
    d = bk.asarray(qkv)
    q, k, v = (bk.split_heads(d, 2, start=6 * i, width=6) for i in range(3))
    launched = []
    real = _launch.launch
    monkeypatch.setattr(_launch, "launch", lambda name, *a: (launched.append(name), real(name, *a)))
    import tfm.backends.cuda.attention as attention_module

    monkeypatch.setattr(attention_module, "launch", _launch.launch)
    merged = bk.merge_heads(bk.attention(q, k, v, causal=True))
    assert launched == ["attention_fused"]
    heads = [ref.split_heads(qkv[:, :, 6 * i:6 * i + 6], 2) for i in range(3)]
    expect = ref.merge_heads(ref.scaled_dot_product_attention(*heads, causal=True))
    assert rel_err(bk.to_numpy(merged), expect) < TOL[np.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_rows_in_place(bk, rng, dtype):
    cache = bk.empty((2, 3, 9, 4), dtype)
    host = np.full((2, 3, 9, 4), np.nan, dtype=dtype)
    cache.copy_to_device(host)
    src = randn(rng, 2, 3, 4, 4, dtype=dtype)
    bk.write_rows(cache, bk.asarray(src), 2)
    host[:, :, 2:6] = src
    np.testing.assert_array_equal(bk.to_numpy(cache), host)
    # the filled part as a view (what the KV cache hands to attention), not a copy
    filled = bk.leading_rows(cache, 6)
    assert filled.shape == (2, 3, 6, 4) and tuple(filled.strides) == tuple(cache.strides)
    np.testing.assert_array_equal(bk.to_numpy(filled), host[:, :, :6])
    bk.write_rows(cache, bk.asarray(src[:, :, :1]), 5)
    assert bk.to_numpy(filled)[0, 0, 5, 0] == src[0, 0, 0, 0]  # shares the cache's memory


def test_asarray_passes_device_arrays_through_and_casts_on_device(bk, rng):
    x = randn(rng, 3, 4, dtype=np.float64)
    dx = bk.asarray(x)
    assert bk.asarray(dx) is dx  # no copy
    d32 = bk.asarray(dx, np.float32)
    assert d32.dtype == np.float32
    np.testing.assert_array_equal(bk.to_numpy(d32), x.astype(np.float32))
    view = bk.asarray(randn(rng, 2, 3, 5))[:, :, 1:4]  # strided: made contiguous on the device
    assert bk.asarray(view).is_c_contiguous()


def test_free_memory_is_positive(bk):
    assert bk.free_memory_bytes() > 0
