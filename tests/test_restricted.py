"""Restricted (windowed) self-attention: the cpu kernel and tfm.restricted_attention against the
float64 reference, full attention at large windows, causality, O(r) work, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from tfm import layers
from tfm.backends.cpu import restricted as cpu_restricted
from tfm.backends.cpu._threads import single_threaded_blas
from tfm.reference import baselines as ref
from tfm.reference import transformer as ref_t

from conftest import TOL, randn, rel_err, requires_torch

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,h,nq,nk,dk,dv,window", [
    (1, 1, 1, 1, 1, 1, 1),        # one query, one key
    (2, 3, 37, 37, 5, 7, 5),      # odd heads, Dv != Dk
    (1, 5, 97, 97, 64, 32, 16),   # several query blocks, even window
    (2, 1, 97, 97, 8, 8, 1),      # window 1: each query sees only itself (centred) / itself (causal)
    (1, 2, 40, 23, 6, 5, 4),      # Nq > Nk: trailing queries see no key -> zeros
    (1, 2, 23, 40, 6, 5, 9),      # Nq < Nk
])
def test_kernel_matches_reference(rng, dtype, causal, b, h, nq, nk, dk, dv, window):
    q, k, v = (randn(rng, b, h, nq, dk, dtype=dtype), randn(rng, b, h, nk, dk, dtype=dtype),
               randn(rng, b, h, nk, dv, dtype=dtype))
    got = cpu_restricted.restricted_attention(q, k, v, window, causal)
    assert got.dtype == dtype and got.shape == (b, h, nq, dv)
    assert rel_err(got, ref.restricted_attention(q, k, v, window, causal)) < TOL[dtype]


def test_query_without_keys_gets_zeros(rng):
    q, k, v = randn(rng, 1, 1, 30, 4), randn(rng, 1, 1, 10, 4), randn(rng, 1, 1, 10, 4)
    out = cpu_restricted.restricted_attention(q, k, v, 3, True)
    np.testing.assert_array_equal(out[0, 0, 12:], 0.0)  # query i >= 12 has keys i-2..i, all >= 10
    assert np.all(np.abs(out[0, 0, :10]).sum(axis=-1) > 0)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_window_equals_full_attention(rng, backend, dtype):
    """Causal with r >= N is causal attention; centred with r >= 2N - 1 is full attention."""
    n = 37
    q, k, v = (randn(rng, 2, 3, n, 8, dtype=dtype) for _ in range(3))
    full = ref_t.scaled_dot_product_attention(q, k, v)
    causal = ref_t.scaled_dot_product_attention(q, k, v, causal=True)
    for r in (n, n + 5):
        got = layers.restricted_attention(q, k, v, r, causal=True, backend=backend)
        assert rel_err(got, causal) < TOL[dtype]
    for r in (2 * n - 1, 4 * n):
        got = layers.restricted_attention(q, k, v, r, backend=backend)
        assert rel_err(got, full) < TOL[dtype]
    # a centred window of N keys is not full attention for the edge queries
    assert rel_err(layers.restricted_attention(q, k, v, n, backend=backend), full) > 1e-3


@pytest.mark.parametrize("window", [1, 4, 9])
def test_causal_never_reads_the_future(rng, window):
    q, k, v = (randn(rng, 1, 2, 50, 8) for _ in range(3))
    base = layers.restricted_attention(q, k, v, window, causal=True)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 31] += 1.0
    v2[:, :, 31] += 1.0
    moved = layers.restricted_attention(q, k2, v2, window, causal=True)
    np.testing.assert_array_equal(moved[:, :, :31], base[:, :, :31])
    assert np.abs(moved[:, :, 31:31 + window] - base[:, :, 31:31 + window]).max() > 1e-4
    np.testing.assert_array_equal(moved[:, :, 31 + window:], base[:, :, 31 + window:])


def test_centred_window_bounds(rng):
    """Key j moves exactly the queries i with i - (r-1)//2 <= j <= i + r//2."""
    r, j = 6, 20
    q, k, v = (randn(rng, 1, 1, 40, 4) for _ in range(3))
    base = layers.restricted_attention(q, k, v, r)
    v2 = v.copy()
    v2[0, 0, j] += 1.0
    changed = np.abs(layers.restricted_attention(q, k, v2, r) - base).max(axis=-1)[0, 0] > 0
    expected = np.zeros(40, bool)
    expected[j - r // 2: j + (r - 1) // 2 + 1] = True
    np.testing.assert_array_equal(changed, expected)


@requires_torch
def test_matches_pytorch_sdpa_with_band_mask(rng):
    import torch

    q, k, v = randn(rng, 2, 3, 61, 16), randn(rng, 2, 3, 61, 16), randn(rng, 2, 3, 61, 12)
    for causal in (False, True):
        mask = torch.from_numpy(ref.restricted_window(61, 61, 7, causal))
        want = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=mask).numpy()
        assert rel_err(layers.restricted_attention(q, k, v, 7, causal=causal), want) < 1e-5


def test_bad_inputs(rng):
    q = randn(rng, 1, 2, 5, 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        layers.restricted_attention(q, q, q, 0)
    with pytest.raises(TypeError, match="window must be an integer"):
        layers.restricted_attention(q, q, q, 2.5)
    with pytest.raises(TypeError, match="causal must be a bool"):
        layers.restricted_attention(q, q, q, 2, causal="yes")
    with pytest.raises(ValueError, match="head dims differ"):
        layers.restricted_attention(q, randn(rng, 1, 2, 5, 3), q, 2)
    with pytest.raises(TypeError, match="share one dtype"):
        layers.restricted_attention(q, q.astype(np.float64), q, 2)
    with pytest.raises(ValueError, match="4 dimensions"):
        layers.restricted_attention(q[0], q[0], q[0], 2)
    with pytest.raises(ValueError, match="unknown backend"):
        layers.restricted_attention(q, q, q, 2, backend="tpu")


@pytest.mark.parametrize("block", [1, 16, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_writes_every_output(rng, causal, block):
    """The njit kernel fills a NaN-poisoned buffer, zero rows (Nq > Nk) and query blocks
    that do not divide Nq included."""
    q, k, v = randn(rng, 2, 3, 70, 5), randn(rng, 2, 3, 41, 5), randn(rng, 2, 3, 41, 6)
    left, right = cpu_restricted.window_bounds(7, causal)
    out = np.full((2, 3, 70, 6), np.nan, np.float32)
    with single_threaded_blas():
        cpu_restricted._banded(q, k, v, left, right, block, out)
    assert rel_err(out, ref.restricted_attention(q, k, v, 7, causal)) < TOL[np.float32]


def test_query_block():
    assert [cpu_restricted.query_block(r) for r in (1, 16, 17, 64, 65, 4096)] == [16, 16, 32, 64,
                                                                                    64, 64]
