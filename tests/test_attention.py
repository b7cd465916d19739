"""Attention: the cpu kernels (naive and fused) and the public ``tfm.attention`` API.

Oracles: the float64 reference (tfm.reference.scaled_dot_product_attention), PyTorch's
scaled_dot_product_attention and nn.MultiheadAttention.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from conftest import TOL, randn, rel_err, requires_torch

import tfm
from tfm import reference as ref
from tfm.backends import get_backend
from tfm.backends.cpu import attention as att

DTYPES = [np.float32, np.float64]
IMPLS = ["naive", "fused"]


def qkv(rng, b, h, nq, nk, dk, dv, dtype):
    return (randn(rng, b, h, nq, dk, dtype=dtype), randn(rng, b, h, nk, dk, dtype=dtype),
            randn(rng, b, h, nk, dv, dtype=dtype))


def plain_attention(q, k, v, mask=None, causal=False):
    """Same-precision NumPy attention: the error level a kernel is held to (at most ~2x)."""
    s = q @ np.swapaxes(k, -1, -2) / q.dtype.type(math.sqrt(q.shape[-1]))
    allowed = np.ones(s.shape[-2:], bool)
    if causal:
        allowed = np.tril(allowed)
    if mask is not None:
        allowed = allowed & mask
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    den = e.sum(-1, keepdims=True)
    return np.divide(e, den, out=np.zeros_like(e), where=den > 0) @ v


def check(out, q, k, v, mask=None, causal=False):
    expected = ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
    assert out.dtype == q.dtype and out.shape == expected.shape
    err = rel_err(out, expected)
    assert err < TOL[q.dtype.type], err
    if q.dtype == np.float32:
        # flash-attention's rule: within ~2x of a plain same-precision kernel. Below 8 float32
        # ulps (1e-6) the ratio is BLAS-path noise (e.g. sgemv vs sgemm for a single query).
        plain = rel_err(plain_attention(q, k, v, mask, causal), expected)
        assert err <= max(2 * plain, 1e-6), (err, plain)


# ---------------------------------------------------------------------------- kernels vs reference
SIZES = [  # (B, H, Nq, Nk, Dk, Dv)
    (1, 1, 1, 1, 8, 8),
    (2, 3, 37, 37, 16, 16),
    (1, 5, 37, 97, 24, 40),  # Nq != Nk, Dv != Dk, odd heads
    (2, 1, 97, 37, 64, 32),
    (1, 2, 1025, 1025, 64, 64),  # one past a query tile and a key tile
    (1, 1, 1, 1025, 32, 16),  # a single decoding query
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(rng, dtype, impl, size, causal):
    q, k, v = qkv(rng, *size, dtype)
    check(att.attention(q, k, v, None, causal, impl), q, k, v, causal=causal)


MASK_SHAPES = [  # every rank, broadcast along every axis; B=2, H=3, Nq=37, Nk=97
    (97,), (37, 97), (37, 1), (1, 97), (3, 37, 97), (3, 1, 97), (2, 1, 1, 97), (2, 3, 37, 97),
    (1, 3, 37, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_masks_of_every_rank(rng, dtype, impl, shape, causal):
    q, k, v = qkv(rng, 2, 3, 37, 97, 16, 24, dtype)
    mask = rng.random(shape) < 0.7
    out = att.attention(q, k, v, mask, causal, impl)
    check(out, q, k, v, mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_are_zero(rng, dtype, impl):
    q, k, v = qkv(rng, 2, 3, 37, 97, 16, 16, dtype)
    mask = rng.random((2, 3, 37, 97)) < 0.5
    mask[0, 1, 5] = False  # one query sees nothing
    mask[1, :, :, :] = False  # a whole batch entry sees nothing
    mask[0, 2, :, 90:] = True  # others still see something late in the key range
    out = att.attention(q, k, v, mask, False, impl)
    assert np.all(out[0, 1, 5] == 0) and np.all(out[1] == 0)
    check(out, q, k, v, mask=mask)


@pytest.mark.parametrize("impl", IMPLS)
def test_key_padding_mask_across_key_tiles(rng, impl):
    # visible keys only in the last key tile: earlier tiles are fully masked for every row
    n = att.TILE_K + 37
    q, k, v = qkv(rng, 1, 2, 97, n, 32, 32, np.float32)
    mask = np.zeros((1, 1, 1, n), bool)
    mask[..., -5:] = True
    check(att.attention(q, k, v, mask, False, impl), q, k, v, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nk", [(37, 97), (97, 37), (1025, 300), (300, 1025)])
def test_naive_and_fused_agree(rng, dtype, nq, nk):
    q, k, v = qkv(rng, 1, 3, nq, nk, 32, 16, dtype)
    for causal in (False, True):
        a = att.attention(q, k, v, None, causal, "naive")
        b = att.attention(q, k, v, None, causal, "fused")
        assert rel_err(a, b) < TOL[dtype]


def test_large_scores_do_not_overflow(rng):
    q, k, v = qkv(rng, 1, 2, 97, 300, 16, 16, np.float32)
    q *= 40  # scores of several hundred: exp must be taken after the max shift
    for impl in IMPLS:
        check(att.attention(q, k, v, None, True, impl), q, k, v, causal=True)


def test_unknown_impl_in_kernel_module(rng):
    q, k, v = qkv(rng, 1, 1, 4, 4, 4, 4, np.float32)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        att.attention(q, k, v, impl="flash")


def test_variants_named():
    assert set(att.VARIANTS) == {"naive", "fused"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_and_merge_heads(rng, dtype):
    x = randn(rng, 2, 37, 5 * 8, dtype=dtype)
    heads = att.split_heads(x, 5)
    assert heads.shape == (2, 5, 37, 8) and heads.dtype == dtype
    assert np.shares_memory(heads, x)  # a view: attention reads the strided heads in place
    assert np.array_equal(heads, ref.split_heads(x, 5))
    merged = att.merge_heads(heads)
    assert merged.shape == x.shape and merged.flags.c_contiguous
    assert np.array_equal(merged, x)
    cols = att.split_heads(x, 2, start=16, width=16)  # Q/K/V columns of a fused projection
    assert np.shares_memory(cols, x) and np.array_equal(cols, ref.split_heads(x[:, :, 16:32], 2))


def test_fused_at_32k_tokens(rng):
    """n = 32768 runs in O(n * d) extra memory; spot-check rows against the float64 formula."""
    n, d = 32768, 64
    q, k, v = qkv(rng, 1, 1, n, n, d, d, np.float32)
    out = att.attention(q, k, v, None, True, "fused")
    assert out.shape == (1, 1, n, d) and np.all(np.isfinite(out))
    rows = np.array([0, 1, 4095, 4096, 20000, n - 1])
    for i in rows:  # causal: query i sees keys 0..i
        s = k[0, 0, : i + 1].astype(np.float64) @ q[0, 0, i].astype(np.float64) / math.sqrt(d)
        p = np.exp(s - s.max())
        expected = p @ v[0, 0, : i + 1].astype(np.float64) / p.sum()
        assert rel_err(out[0, 0, i], expected) < TOL[np.float32]


# ---------------------------------------------------------------------------- public API
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_public_api(rng, backend, impl):
    q, k, v = qkv(rng, 2, 3, 37, 97, 16, 24, np.float32)
    mask = rng.random((2, 1, 1, 97)) < 0.8
    out = tfm.attention(q, k, v, mask=mask, causal=True, impl=impl, backend=backend)
    assert out.dtype == np.float32
    expected = ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=True)
    assert rel_err(out, expected) < TOL[np.float32]


def test_public_api_float64_on_cpu(rng):
    q, k, v = qkv(rng, 1, 3, 37, 37, 16, 16, np.float64)
    out = tfm.attention(q, k, v, backend="cpu")
    assert out.dtype == np.float64
    assert rel_err(out, ref.scaled_dot_product_attention(q, k, v)) < TOL[np.float64]


def test_public_api_accepts_lists_and_views(rng):
    q, k, v = qkv(rng, 1, 2, 9, 22, 4, 4, np.float64)
    k, v = k[:, :, ::2], np.asfortranarray(v[:, :, ::2])  # strided and Fortran-ordered views
    out = tfm.attention(q.tolist(), k, v, backend="cpu")  # a nested list becomes float64
    assert out.dtype == np.float64
    assert rel_err(out, ref.scaled_dot_product_attention(q, k, v)) < TOL[np.float64]


BAD_INPUTS = [  # (description, change to the good (q, k, v, mask, kwargs), error, message)
    ("q rank", lambda q, k, v, m: (q[0], k, v, m, {}), ValueError, "q must have 4 dimensions"),
    ("k rank", lambda q, k, v, m: (q, k[None], v, m, {}), ValueError, "k must have 4 dimensions"),
    ("head dims", lambda q, k, v, m: (q, k[..., :3], v, m, {}), ValueError, "q and k head dims differ"),
    ("batch", lambda q, k, v, m: (q, k[:1], v[:1], m, {}), ValueError, "share batch and head dims"),
    ("heads", lambda q, k, v, m: (q, k, v[:, :1], m, {}), ValueError, "share batch and head dims"),
    ("Nk", lambda q, k, v, m: (q, k, v[:, :, :5], m, {}), ValueError, "same length"),
    ("int dtype", lambda q, k, v, m: (q.astype(np.int32), k, v, m, {}), TypeError, "float32 or float64"),
    ("float16", lambda q, k, v, m: (q, k, v.astype(np.float16), m, {}), TypeError, "float32 or float64"),
    ("mixed", lambda q, k, v, m: (q, k.astype(np.float64), v, m, {}), TypeError, "share one dtype"),
    ("empty", lambda q, k, v, m: (q[:, :, :0], k, v, m, {}), ValueError, "must not be empty"),
    ("mask dtype", lambda q, k, v, m: (q, k, v, m.astype(np.float32), {}), TypeError, "mask must be boolean"),
    ("mask shape", lambda q, k, v, m: (q, k, v, m[..., :3], {}), ValueError, "not broadcastable"),
    ("mask rank", lambda q, k, v, m: (q, k, v, m[None], {}), ValueError, "at most 4 dimensions"),
    ("impl", lambda q, k, v, m: (q, k, v, m, {"impl": "flash"}), ValueError, "unknown attention impl"),
    ("backend", lambda q, k, v, m: (q, k, v, m, {"backend": "tpu"}), ValueError, "unknown backend"),
    ("causal", lambda q, k, v, m: (q, k, v, m, {"causal": "yes"}), TypeError, "causal must be a bool"),
    ("None", lambda q, k, v, m: (None, k, v, m, {}), TypeError, "q must be an array"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
def test_bad_inputs(rng, case):
    _, change, error, message = case
    q, k, v = qkv(rng, 2, 3, 7, 9, 8, 8, np.float32)
    mask = rng.random((2, 1, 7, 9)) < 0.5
    q, k, v, mask, kwargs = change(q, k, v, mask)
    with pytest.raises(error, match=message):
        tfm.attention(q, k, v, mask=mask, **kwargs)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_naive_memory_guard(backend):
    # zero-stride inputs: B*H*n^2 scores would need petabytes; the guard must refuse first
    b, h, n, d = 64, 16, 1 << 20, 64
    q = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (b, h, n, d))
    with pytest.raises(tfm.InsufficientMemoryError) as info:
        tfm.attention(q, q, q, impl="naive", backend=backend)
    message = str(info.value)
    assert "impl='fused'" in message and "TiB" in message
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------- PyTorch peers
@requires_torch
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nq, nk", [(37, 37), (37, 97), (97, 37)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 97), (37, 97)], ids=str)
def test_matches_torch_sdpa(rng, impl, nq, nk, causal, mask_shape):
    import torch
    import torch.nn.functional as F

    q, k, v = qkv(rng, 2, 3, nq, nk, 16, 16, np.float32)
    mask = None
    if mask_shape is not None:
        shape = tuple(nk if s == 97 else (nq if s == 37 else s) for s in mask_shape)
        mask = rng.random(shape) < 0.7
        mask[..., 0] = True  # SDPA returns NaN for rows with no visible key; we return zeros
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    tmask = None if mask is None else torch.from_numpy(mask)
    if causal and tmask is not None:  # SDPA forbids attn_mask with is_causal: fold it in
        tmask = tmask & torch.ones(nq, nk, dtype=torch.bool).tril()
        expected = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
    else:
        expected = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, is_causal=causal)
    out = att.attention(q, k, v, mask, causal, impl)
    assert rel_err(out, expected.numpy()) < 1e-5


@requires_torch
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_torch_multihead_attention(rng, impl):
    import torch

    b, nq, nk, d_model, h = 2, 37, 41, 40, 5
    mha = torch.nn.MultiheadAttention(d_model, h, batch_first=True)
    xq, xkv = randn(rng, b, nq, d_model), randn(rng, b, nk, d_model)
    key_padding = np.zeros((b, nk), bool)  # torch: True = ignore this key
    key_padding[1, 30:] = True
    attn_mask = rng.random((nq, nk)) < 0.2  # torch: True = not allowed
    attn_mask[:, 0] = False
    with torch.no_grad():
        expected, _ = mha(torch.from_numpy(xq), torch.from_numpy(xkv), torch.from_numpy(xkv),
                          key_padding_mask=torch.from_numpy(key_padding),
                          attn_mask=torch.from_numpy(attn_mask), need_weights=False)

    cpu = get_backend("cpu")
    w_q, w_k, w_v = np.split(mha.in_proj_weight.detach().numpy(), 3)
    b_q, b_k, b_v = np.split(mha.in_proj_bias.detach().numpy(), 3)
    q = cpu.split_heads(cpu.linear(xq, w_q, b_q), h)
    k = cpu.split_heads(cpu.linear(xkv, w_k, b_k), h)
    v = cpu.split_heads(cpu.linear(xkv, w_v, b_v), h)
    # ours: True = may attend, broadcast (B, 1, 1, Nk) & (Nq, Nk)
    mask = ~key_padding[:, None, None, :] & ~attn_mask
    heads = cpu.attention(q, k, v, mask=mask, impl=impl)
    out = cpu.linear(cpu.merge_heads(heads), mha.out_proj.weight.detach().numpy(),
                     mha.out_proj.bias.detach().numpy())
    assert rel_err(out, expected.numpy()) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_cache_views_are_used_in_place(rng, impl):
    # a KV cache slice: rows of each (b, h) block contiguous, the whole array not
    cache_k = randn(rng, 2, 3, 200, 16)
    cache_v = randn(rng, 2, 3, 200, 8)
    q = randn(rng, 2, 3, 1, 16)
    k, v = cache_k[:, :, :97], cache_v[:, :, :97]
    assert not k.flags.c_contiguous and att._gemm_rows(k, k.dtype) == (k, 16)
    check(att.attention(q, k, v, None, False, impl), q, k, v)
    kt = np.swapaxes(randn(rng, 2, 3, 16, 97), -1, -2)  # column-major blocks: must be copied
    assert att._gemm_rows(kt, kt.dtype)[0] is not kt
    check(att.attention(q, kt, v, None, True, impl), q, kt, v, causal=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", IMPLS)
def test_split_heads_views_of_a_fused_projection(rng, impl, dtype):
    """Heads split from a fused (B, N, 3 * d) projection are strided views (rows 3 * d
    apart), read in place; the output and its merged heads match the reference."""
    b, n, h, dh = 2, 37, 3, 8
    qkv_proj = randn(rng, b, n, 3 * h * dh, dtype=dtype)
    q, k, v = (att.split_heads(qkv_proj[:, :, i * h * dh:(i + 1) * h * dh], h) for i in range(3))
    assert np.shares_memory(q, qkv_proj) and att._gemm_rows(k, dtype) == (k, 3 * h * dh)
    mask = rng.random((b, 1, n, n)) < 0.7
    out = att.attention(q, k, v, mask, True, impl)
    check(out, q, k, v, mask=mask, causal=True)
    np.testing.assert_array_equal(att.merge_heads(out), ref.merge_heads(out))
    # a single row (decoding) and a single head column: any stride is fine there
    one = att.split_heads(qkv_proj[:, :1, :h * dh], h)
    assert att._gemm_rows(one, dtype)[1] == dh


@pytest.mark.parametrize("impl", IMPLS)
def test_small_and_large_paths_agree(rng, impl, monkeypatch):
    q, k, v = qkv(rng, 1, 3, 5, 97, 16, 16, np.float32)
    mask = rng.random((1, 1, 5, 97)) < 0.6
    small = att.attention(q, k, v, mask, True, impl)  # under SMALL_FLOPS: one Numba thread
    monkeypatch.setattr(att, "SMALL_FLOPS", 0)
    threads = numba.get_num_threads()
    large = att.attention(q, k, v, mask, True, impl)
    assert numba.get_num_threads() == threads  # the setting is restored
    check(small, q, k, v, mask=mask, causal=True)
    assert rel_err(small, large) < TOL[np.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_write_every_output_element(rng, impl, causal):
    """Call the kernels on a NaN-poisoned output: an element left unwritten stays NaN."""
    q, k, v = qkv(rng, 2, 3, 300, 1100, 16, 24, np.float32)  # > one tile each way
    mask = rng.random((2, 1, 1, 1100)) < 0.8
    mask[1] = False  # fully masked batch entry: must be written as zeros
    keep = np.broadcast_to(mask, (2, 3, 300, 1100))
    # a strided output (rows 3 * 24 apart): the kernels take any output row stride
    out = np.full((2, 300, 3, 24), np.nan, np.float32).transpose(0, 2, 1, 3)
    lds = (16, 16, 24, 3 * 24)
    with att.single_threaded_blas():
        if impl == "naive":
            att._naive_kernel(q, k, v, keep, True, causal, out, *lds)
        else:
            att._fused_kernel(q, k, v, keep, True, causal, out, *lds, 128, 256)
    assert np.all(out[1] == 0)
    check(out, q, k, v, mask=mask, causal=causal)
