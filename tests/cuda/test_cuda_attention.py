"""CUDA attention (naive and fused), restricted attention and the public API, under the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SIMULATOR, TOL, randn, rel_err, requires_torch, run

import tfm
from tfm import reference as ref
from tfm.reference import baselines as ref_base

IMPLS = ["naive", "fused"]


def _mask(rng, shape, dead_row=None):
    m = rng.random(shape) > 0.3
    if dead_row is not None:
        m[dead_row] = False  # a query row with no visible key
    return m


# (B, H, Nq, Nk, Dk, Dv) and a mask shape: awkward lengths, Nq != Nk, Dv != Dk, odd heads.
CASES = [
    ((1, 1, 1, 1, 4, 4), None),
    ((2, 3, 9, 7, 5, 6), (2, 1, 1, 7)),  # key padding, broadcast over heads and queries
    ((1, 3, 7, 11, 8, 3), (7, 11)),  # 2-D mask, broadcast over batch and heads
    ((2, 1, 6, 6, 4, 4), (2, 1, 6, 6)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,mask_shape", CASES)
def test_attention_matches_reference(bk, rng, impl, dtype, causal, shape, mask_shape):
    b, h, nq, nk, dk, dv = shape
    q, k, v = randn(rng, b, h, nq, dk, dtype=dtype), randn(rng, b, h, nk, dk, dtype=dtype), \
        randn(rng, b, h, nk, dv, dtype=dtype)
    mask = None
    if mask_shape is not None:
        dead = (Ellipsis, min(2, mask_shape[-2] - 1), slice(None)) if len(mask_shape) >= 2 and mask_shape[-2] > 1 else None
        mask = _mask(rng, mask_shape, dead)
    out = run(bk, lambda *a: bk.attention(*a, causal=causal, impl=impl), q, k, v, mask)
    expect = ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
    assert out.shape == (b, h, nq, dv) and out.dtype == dtype
    assert rel_err(out, expect) < TOL[dtype]
    if mask is not None and mask_shape[-2] > 1:
        rows = out[..., min(2, mask_shape[-2] - 1), :]
        assert np.all(rows == 0)  # fully-masked query rows are zeros, never NaN


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_everything_is_zero(bk, rng, impl):
    q, k, v = randn(rng, 1, 2, 5, 4), randn(rng, 1, 2, 6, 4), randn(rng, 1, 2, 6, 4)
    out = run(bk, lambda *a: bk.attention(*a, impl=impl), q, k, v, np.zeros((1, 1, 1, 6), bool))
    np.testing.assert_array_equal(out, 0)


def test_fused_over_many_tiles_and_a_strided_kv_prefix(bk, rng):
    """n spans several query and key tiles with ragged ends; K/V are views of a longer cache."""
    q = randn(rng, 1, 2, 23, 6)
    cache_k, cache_v = randn(rng, 1, 2, 30, 6), randn(rng, 1, 2, 30, 6)
    dk_, dv_ = bk.asarray(cache_k), bk.asarray(cache_v)
    out = bk.to_numpy(bk.attention(bk.asarray(q), dk_[:, :, :19], dv_[:, :, :19], causal=True))
    expect = ref.scaled_dot_product_attention(q, cache_k[:, :, :19], cache_v[:, :, :19], causal=True)
    assert rel_err(out, expect) < TOL[np.float32]


def test_naive_equals_fused(bk, rng):
    q, k, v = randn(rng, 2, 3, 10, 4), randn(rng, 2, 3, 13, 4), randn(rng, 2, 3, 13, 4)
    mask = _mask(rng, (2, 3, 10, 13))
    outs = [run(bk, lambda *a: bk.attention(*a, causal=True, impl=i), q, k, v, mask) for i in IMPLS]
    assert rel_err(outs[0], outs[1]) < TOL[np.float32]


def test_fused_tiles_shrink_to_fit_shared_memory():
    from tfm.backends.cuda._launch import SHARED_BYTES_LIMIT, Tuning
    from tfm.backends.cuda.attention import fused_plan, fused_shared_bytes

    t = Tuning()
    assert fused_plan(t, 64, 64, 4) == (2, t.attn)  # the default fits for d = 64, float32
    assert fused_plan(t.replace(attn_version=1), 64, 64, 4) == (1, t.attn)
    for d, itemsize in [(128, 4), (64, 8), (96, 8), (200, 4), (32, 8)]:
        version, (bq, bkt, ty, tx) = fused_plan(t, d, d, itemsize)
        assert fused_shared_bytes(d, d, bq, bkt, tx, itemsize, version) <= SHARED_BYTES_LIMIT
        unit = 4 if version == 2 else 1
        assert bq % (unit * ty) == 0 and bkt % (unit * tx) == 0
    assert fused_plan(t, 128, 128, 4)[0] == 1  # v2's blocks do not fit: v1 with smaller tiles
    with pytest.raises(ValueError, match="too large for the fused CUDA kernel"):
        fused_plan(t, 4096, 4096, 8)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_restricted_attention(bk, rng, causal, window, dtype):
    q, k, v = (randn(rng, 2, 3, 13, 5, dtype=dtype) for _ in range(3))
    out = run(bk, lambda *a: bk.restricted_attention(*a, window, causal=causal), q, k, v)
    assert rel_err(out, ref_base.restricted_attention(q, k, v, window, causal)) < TOL[dtype]


@pytest.mark.parametrize("causal", [False, True])
def test_restricted_attention_nq_differs_from_nk(bk, rng, causal):
    q, k, v = randn(rng, 1, 2, 7, 4), randn(rng, 1, 2, 12, 4), randn(rng, 1, 2, 12, 6)
    out = run(bk, lambda *a: bk.restricted_attention(*a, 3, causal=causal), q, k, v)
    assert rel_err(out, ref_base.restricted_attention(q, k, v, 3, causal)) < TOL[np.float32]


def test_public_api_host_in_host_out_and_device_in_device_out(bk, rng):
    q, k, v = randn(rng, 1, 3, 7, 4), randn(rng, 1, 3, 9, 4), randn(rng, 1, 3, 9, 4)
    mask = _mask(rng, (1, 1, 1, 9))
    expect = ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=True)
    for impl in IMPLS:
        out = tfm.attention(q, k, v, mask=mask, causal=True, impl=impl, backend="cuda")
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        assert rel_err(out, expect) < TOL[np.float32]
    dq, dk_, dv_, dm = bk.asarray(q), bk.asarray(k), bk.asarray(v), bk.asarray(mask)
    out = tfm.attention(dq, dk_, dv_, mask=dm, causal=True, backend="cuda")
    assert not isinstance(out, np.ndarray)  # stays on the device
    assert rel_err(bk.to_numpy(out), expect) < TOL[np.float32]


def test_public_api_naive_memory_guard_uses_device_memory(bk, monkeypatch):
    monkeypatch.setattr(type(bk), "free_memory_bytes", lambda self: 1000)
    x = np.broadcast_to(np.float32(1), (4, 8, 64, 16))  # 3 * 4*8*64*64 * 4 bytes > 1000
    with pytest.raises(tfm.InsufficientMemoryError, match="impl='fused'"):
        tfm.attention(x, x, x, impl="naive", backend="cuda")


def test_naive_guard_counts_the_one_score_matrix_the_kernel_allocates(bk, rng, monkeypatch):
    """The cuda naive kernel holds one (B*H, Nq, Nk) score array, normalised in place: with
    free memory for exactly that it runs (so n = 16384, B = 4, H = 16, 69 GB, is allowed on a
    141 GB GPU), with one byte less it is refused."""
    b, h, nq, nk = 2, 3, 5, 7
    q, k, v = randn(rng, b, h, nq, 4), randn(rng, b, h, nk, 4), randn(rng, b, h, nk, 4)
    scores = b * h * nq * nk * 4
    monkeypatch.setattr(type(bk), "free_memory_bytes", lambda self: scores)
    out = tfm.attention(q, k, v, impl="naive", backend="cuda")
    assert rel_err(out, ref.scaled_dot_product_attention(q, k, v)) < TOL[np.float32]
    monkeypatch.setattr(type(bk), "free_memory_bytes", lambda self: scores - 1)
    with pytest.raises(tfm.InsufficientMemoryError):
        tfm.attention(q, k, v, impl="naive", backend="cuda")


@requires_torch
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_sdpa(bk, rng, causal):
    import torch
    import torch.nn.functional as F

    q, k, v = randn(rng, 2, 3, 9, 8), randn(rng, 2, 3, 9, 8), randn(rng, 2, 3, 9, 5)
    mask = _mask(rng, (2, 1, 9, 9))
    mask[..., 0] = True  # SDPA gives NaN for fully-masked rows; keep every row alive
    t = [torch.from_numpy(a) for a in (q, k, v)]
    if causal:
        expect = F.scaled_dot_product_attention(*t, attn_mask=torch.from_numpy(mask)
                                                & torch.ones(9, 9, dtype=torch.bool).tril())
    else:
        expect = F.scaled_dot_product_attention(*t, attn_mask=torch.from_numpy(mask))
    out = run(bk, lambda *a: bk.attention(*a, causal=causal), q, k, v, mask)
    assert rel_err(out, expect.numpy()) < TOL[np.float32]


@pytest.mark.skipif(SIMULATOR, reason="the simulator has no __cuda_array_interface__ support")
@requires_torch
def test_torch_cuda_tensors_are_used_without_copy(bk, rng):  # pragma: no cover - GPU only
    import torch

    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    q = torch.randn(1, 2, 7, 8, device="cuda")
    view = bk.asarray(q)
    assert view.device_ctypes_pointer.value == q.data_ptr()
    out = tfm.attention(q, q, q, backend="cuda")
    expect = torch.nn.functional.scaled_dot_product_attention(q.double(), q.double(), q.double())
    assert rel_err(bk.to_numpy(out), expect.cpu().numpy()) < TOL[np.float32]
