"""The CUDA backend's backward kernels against the float64 reference, under the simulator.

Awkward sizes throughout (lengths that cross the simulator's toy tiles with ragged edges,
Nq != Nk, d_v != d_k, odd head counts, masked rows), both dtypes, and the real default
(H100/H200) tilings at small ragged sizes. Device allocations are NaN-poisoned
(conftest.py): an output element a kernel forgets to write fails ``rel_err``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TOL, randn, rel_err

from tfm import reference as ref
from tfm.backends.cuda import CudaBackend
from tfm.backends.cuda._launch import Tuning
from tfm.reference import baselines as ref_base

DTYPES = [np.float32, np.float64]


def close(got, want, tol) -> bool:
    """rel_err below tol; a gradient that is zero in exact arithmetic (a query that sees one
    key: dq = 0, which the float64 reference computes as 1e-16 noise) must be (near) zero.
    NaN never passes."""
    got = np.asarray(got, np.float64)
    if not np.all(np.isfinite(got)):
        return False
    if np.linalg.norm(want) < 1e-9:
        return float(np.abs(got).max(initial=0.0)) < 1e-6
    return rel_err(got, want) < tol


def run(bk, fn, *args):
    """Upload host arrays (None passes through), call ``fn`` on the backend, download (None
    outputs, e.g. an absent bias gradient, stay None)."""
    out = fn(*(None if a is None else bk.asarray(a) for a in args))
    if isinstance(out, tuple):
        return tuple(None if o is None else bk.to_numpy(o) for o in out)
    return bk.to_numpy(out)


# ---------------------------------------------------------------------- dense layers
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d_in,d_out,bias", [((3,), 5, 7, True), ((2, 9), 13, 6, False), ((1, 1), 1, 3, True)])
def test_linear_backward(bk, rng, dtype, lead, d_in, d_out, bias):
    x, w, dy = randn(rng, *lead, d_in, dtype=dtype), randn(rng, d_out, d_in, dtype=dtype), \
        randn(rng, *lead, d_out, dtype=dtype)
    got = run(bk, lambda *a: bk.linear_backward(*a, bias=bias), x, w, dy)
    want = ref.linear_backward(x, w, dy, bias=bias)
    assert got[2] is None if not bias else got[2].shape == (d_out,)
    for g, e in zip(got, want):
        if e is not None:
            assert g.dtype == dtype and rel_err(g, e) < TOL[dtype]


def test_weight_gradient_split_over_rows(rng):
    """The Numba GEMM's dW = dy^T x split into batches of rows when its output has too few
    tiles (here 192 rows into 3 batches of 64, summed in order): same result."""
    from tfm.backends.cuda.linear import _row_splits

    bk = CudaBackend(tuning=Tuning(gemm_large=(8, 8, 4, 4, 4), gemm_small=(8, 8, 4, 4, 4), min_blocks=3,
                                   row_threads=4, elem_threads=32, step_threads=8), gemm="numba")
    assert _row_splits(192, 1, bk.tuning) == 3 and _row_splits(191, 1, bk.tuning) == 1
    x, w, dy = randn(rng, 192, 6), randn(rng, 5, 6), randn(rng, 192, 5)
    got = run(bk, bk.linear_backward, x, w, dy)
    for g, e in zip(got, ref.linear_backward(x, w, dy)):
        assert rel_err(g, e) < TOL[np.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_activation_backward(bk, rng, dtype, kind):
    x, dy = randn(rng, 3, 37, dtype=dtype), randn(rng, 3, 37, dtype=dtype)
    x[0, :3] = 0.0  # relu's derivative at 0 is 0, as PyTorch
    got = run(bk, lambda *a: bk.activation_backward(*a, kind), x, dy)
    want = (ref.relu_backward if kind == "relu" else ref.gelu_backward)(x, dy)
    assert got.dtype == dtype and rel_err(got, want) < TOL[dtype]


def test_backward_inputs_are_checked(bk, rng):
    x, w = bk.asarray(randn(rng, 2, 3, 5)), bk.asarray(randn(rng, 4, 5))
    with pytest.raises(ValueError, match="dy must have shape"):
        bk.linear_backward(x, w, bk.asarray(randn(rng, 2, 3, 5)))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        bk.activation_backward(x, x, "tanh")
    with pytest.raises(ValueError, match="merge_heads_into"):
        bk.merge_heads_into(bk.asarray(randn(rng, 2, 2, 3, 4)), bk.asarray(randn(rng, 2, 3, 10)), 4)
    with pytest.raises(ValueError, match="axpy"):
        bk.axpy(x, w)


# ---------------------------------------------------------------------- row kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,residual", [(7, False), (33, True), (1, True)])
def test_layer_norm_train_and_backward(bk, rng, dtype, d, residual):
    x = (2 * randn(rng, 2, 5, d, dtype=dtype) + 0.5).astype(dtype)
    res = randn(rng, 2, 5, d, dtype=dtype) if residual else None
    gamma, beta, dy = randn(rng, d, dtype=dtype), randn(rng, d, dtype=dtype), randn(rng, 2, 5, d, dtype=dtype)
    y, mean, rstd = run(bk, lambda *a: bk.layer_norm_train(*a[:3], 1e-5, a[3]), x, gamma, beta, res)
    want = ref.layer_norm_train(x, gamma, beta, 1e-5, res)
    assert mean.shape == rstd.shape == (2, 5)
    for g, e in zip((y, mean, rstd), want):
        assert g.dtype == dtype and rel_err(g, e) < TOL[dtype]
    got = run(bk, lambda *a: bk.layer_norm_backward(*a[:5], residual=a[5]), dy, x, gamma, mean, rstd, res)
    for g, e in zip(got, ref.layer_norm_backward(dy, x, gamma, want[1], want[2], res)):
        assert rel_err(g, e) < TOL[dtype] * (10 if d == 1 else 1)  # d = 1: dx is rounding noise


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_log_softmax_backward(bk, rng, dtype):
    z = 3 * randn(rng, 4, 3, 23, dtype=dtype)
    y, logy, dy = ref.softmax(z).astype(dtype), ref.log_softmax(z).astype(dtype), randn(rng, 4, 3, 23, dtype=dtype)
    assert rel_err(run(bk, bk.softmax_backward, y, dy), ref.softmax_backward(y, dy)) < TOL[dtype]
    assert rel_err(run(bk, bk.log_softmax_backward, logy, dy), ref.log_softmax_backward(logy, dy)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(bk, rng, dtype, smoothing):
    t, v = 11, 29
    z = (3 * randn(rng, t, v)).astype(dtype)
    targets = rng.integers(0, v, t)
    weights = np.full(t, 1.0 / (t - 2))
    weights[[0, 5]] = 0.0  # padding
    losses, dz = bk.cross_entropy(bk.asarray(z), targets, weights, smoothing)
    assert isinstance(losses, np.ndarray) and losses.dtype == np.float64 and losses.shape == (t,)
    assert rel_err(losses, ref.cross_entropy(z, targets, smoothing)) < TOL[dtype]
    dz = bk.to_numpy(dz)
    assert dz.dtype == dtype and np.all(dz[[0, 5]] == 0)
    assert rel_err(dz, ref.cross_entropy_backward(z, targets, weights, smoothing)) < TOL[dtype]
    with pytest.raises(ValueError, match="targets must lie in"):
        bk.cross_entropy(bk.asarray(z), np.full(t, v), weights, smoothing)


# ---------------------------------------------------------------------- embeddings, heads
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_backward_is_a_deterministic_scatter_add(bk, rng, dtype):
    ids = rng.integers(0, 9, (3, 7))  # repeated ids, and vocabulary rows no id reaches (11 > 9)
    dy = randn(rng, 3, 7, 5, dtype=dtype)
    d_dy = bk.asarray(dy)
    first = bk.to_numpy(bk.embedding_backward(ids, d_dy, 11, 2.5))
    again = bk.to_numpy(bk.embedding_backward(ids, d_dy, 11, 2.5))
    assert rel_err(first, ref.embed_backward(ids, dy, 11, 2.5)) < TOL[dtype]
    assert np.all(first[9:] == 0) and np.array_equal(first, again)  # bit for bit, run to run
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 11\)"):
        bk.embedding_backward(np.full((1, 2), 11), bk.asarray(randn(rng, 1, 2, 5)), 11)


def test_merge_heads_into_fills_a_column_slice(bk, rng):
    x = randn(rng, 2, 3, 5, 4)
    out = bk.asarray(np.full((2, 5, 3 * 12), 7.0, np.float32))
    bk.merge_heads_into(bk.asarray(x), out, 12)
    got = bk.to_numpy(out)
    np.testing.assert_array_equal(got[:, :, 12:24], ref.merge_heads(x).astype(np.float32))
    assert np.all(got[:, :, :12] == 7.0) and np.all(got[:, :, 24:] == 7.0)


# ---------------------------------------------------------------------- attention
def _attention_case(rng, b, h, nq, nk, dk, dv, mask_shape, dtype):
    q, k, v = randn(rng, b, h, nq, dk, dtype=dtype), randn(rng, b, h, nk, dk, dtype=dtype), \
        randn(rng, b, h, nk, dv, dtype=dtype)
    mask = None
    if mask_shape is not None:
        mask = rng.random(mask_shape) > 0.3
        mask[..., 0] = True
        mask[..., 1] = True  # two keys per row: one visible key makes dq exactly 0 (rounding noise)
        if mask_shape[-2] > 2:
            mask[..., 2, :] = False  # a query row that sees no key: lse -inf, zero output and dq
    return q, k, v, mask, randn(rng, b, h, nq, dv, dtype=dtype)


CASES = [
    ((1, 1, 1, 1, 4, 4), None),
    ((2, 3, 9, 7, 5, 6), (2, 1, 1, 7)),  # key padding, broadcast over heads and queries
    ((1, 3, 17, 11, 8, 3), (17, 11)),  # 2-D mask
    ((2, 1, 6, 6, 4, 4), (2, 1, 6, 6)),
]


def _check_attention_backward(bk, q, k, v, mask, dout, causal, impl, dtype, tol_scale=1.0):
    dq_, dk_, dv_ = (bk.asarray(a) for a in (q, k, v))
    dmask = None if mask is None else bk.asarray(mask)
    out, lse = bk.attention_train(dq_, dk_, dv_, dmask, causal, impl)
    want_out, want_lse = ref.scaled_dot_product_attention_train(q, k, v, mask=mask, causal=causal)
    got_lse = bk.to_numpy(lse)
    assert got_lse.shape == want_lse.shape and np.array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    assert rel_err(bk.to_numpy(out), want_out) < TOL[dtype]
    assert rel_err(got_lse[fin], want_lse[fin]) < TOL[dtype]
    grads = bk.attention_backward(dq_, dk_, dv_, out, lse, bk.asarray(dout), dmask, causal, impl)
    want = ref.scaled_dot_product_attention_backward(q, k, v, want_out, want_lse, dout, mask=mask, causal=causal)
    for name, g, e in zip("qkv", grads, want):
        g = bk.to_numpy(g)
        assert g.dtype == dtype and close(g, e, TOL[dtype] * tol_scale), name


@pytest.mark.parametrize("impl", ["fused", "fused_pass", "naive"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,mask_shape", CASES)
def test_attention_train_and_backward(bk, rng, impl, dtype, causal, shape, mask_shape):
    if impl == "fused_pass":  # the dQ pass instead of atomics
        bk, impl = CudaBackend(tuning=bk.tuning.replace(attn_bwd_dq="pass"), gemm="numba"), "fused"
    q, k, v, mask, dout = _attention_case(rng, *shape, mask_shape, dtype)
    _check_attention_backward(bk, q, k, v, mask, dout, causal, impl, dtype)


def test_attention_backward_reads_split_head_views(bk, rng):
    """The model's operands: q, k, v and dout strided views of fused projections (split_heads),
    the output head-merged; the gradients come back head-merged, ready for merge_heads_into."""
    b, n, h, d = 2, 9, 3, 4
    qkv, dmerged = randn(rng, b, n, 3 * h * d), randn(rng, b, n, h * d)
    dqkv_dev = bk.asarray(qkv)
    q, k, v = (bk.split_heads(dqkv_dev, h, s, h * d) for s in (0, h * d, 2 * h * d))
    dout = bk.split_heads(bk.asarray(dmerged), h)
    out, lse = bk.attention_train(q, k, v, causal=True)
    grads = bk.attention_backward(q, k, v, out, lse, dout, causal=True)
    host = [ref.split_heads(qkv[..., s:s + h * d], h) for s in (0, h * d, 2 * h * d)]
    want_out, want_lse = ref.scaled_dot_product_attention_train(*host, causal=True)
    want = ref.scaled_dot_product_attention_backward(*host, want_out, want_lse, ref.split_heads(dmerged, h),
                                                     causal=True)
    dqkv = bk.empty((b, n, 3 * h * d), np.float32)
    for g, start in zip(grads, (0, h * d, 2 * h * d)):
        bk.merge_heads_into(g, dqkv, start)
    expect = np.concatenate([ref.merge_heads(w) for w in want], axis=-1)
    assert rel_err(bk.to_numpy(dqkv), expect) < TOL[np.float32]


@pytest.mark.parametrize("dq_mode,causal", [("atomic", True), ("pass", False)])
def test_attention_backward_at_the_gpu_default_tilings(rng, dq_mode, causal):
    """Tuning()'s H100/H200 backward tiles (128-thread blocks, 32 x 32 tiles), not the toy ones,
    at small ragged sizes: two key and query tiles each, ragged edges, a mask, d_k != d_v."""
    bk = CudaBackend(tuning=Tuning(attn_bwd_dq=dq_mode), gemm="numba")
    q, k, v, mask, dout = _attention_case(rng, 1, 1, 37, 35, 8, 4, (1, 1, 37, 35), np.float32)
    _check_attention_backward(bk, q, k, v, mask, dout, causal, "fused", np.float32)


@pytest.mark.parametrize("tiling", [(32, 32, 8, 8), (16, 64, 16, 8)])
def test_attention_backward_other_lab_tilings(rng, tiling):
    from tfm.backends.cuda.attention import BWD_TILINGS

    assert tiling in BWD_TILINGS
    bk = CudaBackend(tuning=Tuning(attn_bwd=tiling), gemm="numba")
    q, k, v, mask, dout = _attention_case(rng, 1, 1, 35, 70, 8, 8, None, np.float32)
    _check_attention_backward(bk, q, k, v, mask, dout, True, "fused", np.float32)


def test_attention_backward_tiles_fit_shared_memory_or_refuse():
    from tfm.backends.cuda._launch import SHARED_BYTES_LIMIT
    from tfm.backends.cuda.attention import fused_bwd_plan, fused_bwd_shared_bytes

    t = Tuning()
    assert fused_bwd_plan(t, 64, 64, 4) == (t.attn_bwd, False)  # the default fits at d = 64, float32
    for d, itemsize in [(128, 4), (64, 8), (96, 8), (200, 4), (5, 8)]:
        (bq, bkv, ty, tx), single = fused_bwd_plan(t, d, d, itemsize)
        assert fused_bwd_shared_bytes(d, d, bq, bkv, tx, itemsize, single) <= SHARED_BYTES_LIMIT
        assert bkv % (4 * ty) == 0 and bq % tx == 0 and bq % ty == 0 and bkv % tx == 0
    with pytest.raises(ValueError, match="impl='naive'"):
        fused_bwd_plan(t, 4096, 4096, 8)
    with pytest.raises(ValueError, match="attn_bwd"):
        Tuning(attn_bwd=(32, 32, 16, 8))  # BKV % (4*TY) != 0
    with pytest.raises(ValueError, match="attn_bwd_dq"):
        Tuning(attn_bwd_dq="shuffle")


def test_attention_backward_single_shared_tile(rng):
    """Where P and dS do not fit in two shared tiles they share one (float64 at d = 64 with the
    default tiling falls back further; here a tuning that needs the single tile)."""
    from tfm.backends.cuda.attention import fused_bwd_plan

    t = Tuning(attn_bwd=(16, 64, 16, 8))
    assert fused_bwd_plan(t, 64, 64, 4)[1] is True
    bk = CudaBackend(tuning=t, gemm="numba")
    q, k, v, mask, dout = _attention_case(rng, 1, 1, 19, 67, 64, 64, (1, 1, 1, 67), np.float32)
    _check_attention_backward(bk, q, k, v, mask, dout, False, "fused", np.float32)


def test_naive_backward_memory_guard(bk, rng, monkeypatch):
    import tfm

    q, k, v, _, dout = _attention_case(rng, 1, 2, 5, 7, 4, 4, None, np.float32)
    dq_, dk_, dv_ = (bk.asarray(a) for a in (q, k, v))
    out, lse = bk.attention_train(dq_, dk_, dv_, impl="naive")
    monkeypatch.setattr(type(bk), "free_memory_bytes", lambda self: 2 * 2 * 5 * 7 * 4 - 1)
    with pytest.raises(tfm.InsufficientMemoryError, match="impl='fused'"):
        bk.attention_backward(dq_, dk_, dv_, out, lse, bk.asarray(dout), impl="naive")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 5])
def test_restricted_attention_train_and_backward(bk, rng, dtype, causal, window):
    q, k, v, dout = (randn(rng, 2, 3, 13, 5, dtype=dtype) for _ in range(4))
    dq_, dk_, dv_ = (bk.asarray(a) for a in (q, k, v))
    out, lse = bk.restricted_attention_train(dq_, dk_, dv_, window, causal)
    want_out, want_lse = ref_base.restricted_attention_train(q, k, v, window, causal)
    assert rel_err(bk.to_numpy(out), want_out) < TOL[dtype]
    assert rel_err(bk.to_numpy(lse), want_lse) < TOL[dtype]
    grads = bk.restricted_attention_backward(dq_, dk_, dv_, out, lse, bk.asarray(dout), window, causal)
    want = ref_base.restricted_attention_backward(q, k, v, want_out, want_lse, dout, window, causal)
    for g, e in zip(grads, want):  # window 1: each query sees itself only, dq = 0
        assert close(bk.to_numpy(g), e, TOL[dtype])


# ---------------------------------------------------------------------- recurrent, conv
def _recurrent_args(rng, kind, b, n, i, hid, dtype):
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    s = 1 / math.sqrt(hid)
    x, h0 = randn(rng, b, n, i, dtype=dtype), (0.5 * randn(rng, b, hid)).astype(dtype)
    w = [(s * randn(rng, gates * hid, dim)).astype(dtype) for dim in (i, hid)]
    bias = [(s * randn(rng, gates * hid)).astype(dtype) for _ in range(2)]
    states = (h0, (0.5 * randn(rng, b, hid)).astype(dtype)) if kind == "lstm" else (h0,)
    return (x, *states, *w, *bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,extra", [("rnn", ("tanh",)), ("rnn", ("relu",)), ("lstm", ()), ("gru", ())])
@pytest.mark.parametrize("cotangents", ["all", "out_only"])
def test_recurrent_backpropagation_through_time(bk, rng, dtype, kind, extra, cotangents):
    b, n, i, hid = 2, 5, 3, 7
    args = _recurrent_args(rng, kind, b, n, i, hid, dtype)
    n_state = 2 if kind == "lstm" else 1
    dout = randn(rng, b, n, hid, dtype=dtype)
    dstates = tuple(randn(rng, b, hid, dtype=dtype) for _ in range(n_state)) if cotangents == "all" \
        else (None,) * n_state
    res = getattr(bk, f"{kind}_layer_train")(*(bk.asarray(a) for a in args), *extra)
    want = getattr(ref_base, f"{kind}_layer_train")(*args, *extra)
    for g, e in zip(res[:-1], want[:-1]):
        assert rel_err(bk.to_numpy(g), e) < TOL[dtype]
    grads = getattr(bk, f"{kind}_layer_backward")(res[-1], bk.asarray(dout),
                                                  *(None if s is None else bk.asarray(s) for s in dstates))
    want_grads = getattr(ref_base, f"{kind}_layer_backward")(want[-1], dout, *dstates)
    assert len(grads) == len(want_grads)
    for g, e in zip(grads, want_grads):
        g = bk.to_numpy(g)
        assert g.dtype == dtype and rel_err(g, e) < TOL[dtype] * 5  # n dependent steps of rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,dilation,pad_left,pad_right,bias", [(3, 1, 1, 1, True), (3, 4, 8, 0, False),
                                                                  (2, 3, 0, 2, True), (1, 1, 0, 0, True)])
def test_conv1d_backward(bk, rng, dtype, k, dilation, pad_left, pad_right, bias):
    b, n, c_in, c_out = 2, 9, 3, 5
    n_out = n + pad_left + pad_right - dilation * (k - 1)
    x, w, dy = randn(rng, b, n, c_in, dtype=dtype), randn(rng, c_out, c_in, k, dtype=dtype), \
        randn(rng, b, n_out, c_out, dtype=dtype)
    got = run(bk, lambda *a: bk.conv1d_backward(*a, dilation, pad_left, pad_right, bias=bias), x, w, dy)
    want = ref_base.conv1d_backward(x, w, dy, dilation, pad_left, pad_right, bias=bias)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if e is not None:
            assert rel_err(g, e) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_backward(bk, rng, dtype):
    x, dy = randn(rng, 3, 4, 10, dtype=dtype), randn(rng, 3, 4, 5, dtype=dtype)
    assert rel_err(run(bk, bk.glu_backward, x, dy), ref_base.glu_backward(x, dy)) < TOL[dtype]
