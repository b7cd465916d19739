"""The CPU backend's training kernels (backward passes, cross-entropy, Adam, axpy, dropout)
against the float64 reference (``tfm.reference``, explicit backward formulas) and PyTorch
autograd, at awkward sizes, in float32 and float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TOL, randn, rel_err, requires_torch

from tfm import reference as ref
from tfm.backends import get_backend
from tfm.backends.cpu import embedding as emb
from tfm.backends.cpu import linear as lin
from tfm.backends.cpu import training

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1, 1), (2, 37, 24), (3, 97, 65), (1, 1025, 8)]  # (B, N, D)
cpu = get_backend("cpu")


def _t(a, grad=False):
    """float64 torch tensor of ``a``."""
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def _ref_activation_backward(x, dy, kind):
    return ref.relu_backward(x, dy) if kind == "relu" else ref.gelu_backward(x, dy)


# ---------------------------------------------------------------------------- linear, activation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward(rng, dtype, shape, bias):
    x = randn(rng, *shape, dtype=dtype)
    w = randn(rng, 29, shape[-1], dtype=dtype)
    dy = randn(rng, *shape[:-1], 29, dtype=dtype)
    dx, dw, db = cpu.linear_backward(x, w, dy, bias)
    want = ref.linear_backward(x, w, dy)
    assert dx.dtype == dw.dtype == dtype and dx.shape == x.shape and dw.shape == w.shape
    assert rel_err(dx, want[0]) < TOL[dtype] and rel_err(dw, want[1]) < TOL[dtype]
    if bias:
        assert db.dtype == dtype and rel_err(db, want[2]) < TOL[dtype]
    else:
        assert db is None


@pytest.mark.parametrize("m", [3, 300])  # few rows: dx in column blocks; many: row blocks
def test_linear_backward_parallel_blocks(rng, m, monkeypatch):
    """Both parallel splits (forced below the size threshold)."""
    monkeypatch.setattr(lin, "SMALL_FLOPS", 0)
    x, w, dy = randn(rng, m, 131), randn(rng, 67, 131), randn(rng, m, 67)
    dx, dw, db = lin.linear_backward(x, w, dy, True)
    want = ref.linear_backward(x, w, dy)
    for got, expected in zip((dx, dw, db), want):
        assert rel_err(got, expected) < TOL[np.float32]


def test_linear_backward_empty(rng):
    x, w, dy = np.zeros((0, 5), np.float32), randn(rng, 3, 5), np.zeros((0, 3), np.float32)
    dx, dw, db = lin.linear_backward(x, w, dy, True)
    assert dx.shape == (0, 5) and not dw.any() and not db.any()


@requires_torch
def test_linear_backward_against_autograd(rng):
    x, w, b, dy = (randn(rng, *s, dtype=np.float64) for s in ((2, 5, 7), (3, 7), (3,), (2, 5, 3)))
    tx, tw, tb = _t(x, True), _t(w, True), _t(b, True)
    torch.nn.functional.linear(tx, tw, tb).backward(_t(dy))
    for got, t in zip(cpu.linear_backward(x, w, dy, True), (tx, tw, tb)):
        assert rel_err(got, t.grad.numpy()) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["relu", "gelu"])
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 97, 65), (1100, 1000)])
def test_activation_backward(rng, dtype, kind, shape):
    x = randn(rng, *shape, dtype=dtype) * 3
    dy = randn(rng, *shape, dtype=dtype)
    dx = cpu.activation_backward(x, dy, kind)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert rel_err(dx, _ref_activation_backward(x, dy, kind)) < TOL[dtype]


@requires_torch
@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_activation_backward_against_autograd(rng, kind):
    x, dy = randn(rng, 97, dtype=np.float64) * 3, randn(rng, 97, dtype=np.float64)
    x[0] = 0.0  # relu'(0) = 0, as PyTorch
    tx = _t(x, True)
    getattr(torch.nn.functional, kind)(tx).backward(_t(dy))
    assert rel_err(cpu.activation_backward(x, dy, kind), tx.grad.numpy()) < 1e-12


# ---------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 300, 1000)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_train_and_backward(rng, dtype, shape, residual):
    x = randn(rng, *shape, dtype=dtype)
    r = randn(rng, *shape, dtype=dtype) if residual else None
    gamma, beta = randn(rng, shape[-1], dtype=dtype), randn(rng, shape[-1], dtype=dtype)
    dy = randn(rng, *shape, dtype=dtype)
    y, mean, rstd = cpu.layer_norm_train(x, gamma, beta, 1e-5, r)
    assert mean.shape == rstd.shape == shape[:-1]
    np.testing.assert_array_equal(y, cpu.layer_norm(x, gamma, beta, 1e-5, r))  # same forward
    _, want_mean, want_rstd = ref.layer_norm_train(x, gamma, beta, 1e-5, r)
    assert rel_err(mean, want_mean) < TOL[dtype] and rel_err(rstd, want_rstd) < TOL[dtype]
    dx, dgamma, dbeta = cpu.layer_norm_backward(dy, x, gamma, mean, rstd, r)
    want = ref.layer_norm_backward(dy, x, gamma, want_mean, want_rstd, r)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == dtype
    # dx subtracts two row means from dy * gamma: float32 keeps fewer of its bits
    tol = 1e-4 if dtype == np.float32 else TOL[dtype]
    for got, want_ in zip((dx, dgamma, dbeta), want):
        assert rel_err(got, want_) < tol


@requires_torch
def test_layer_norm_backward_against_autograd(rng):
    x, r, dy = (randn(rng, 3, 5, 7, dtype=np.float64) for _ in range(3))
    g, b = randn(rng, 7, dtype=np.float64), randn(rng, 7, dtype=np.float64)
    tx, tr, tg, tb = _t(x, True), _t(r, True), _t(g, True), _t(b, True)
    torch.nn.functional.layer_norm(tx + tr, (7,), tg, tb, 1e-5).backward(_t(dy))
    _, mean, rstd = cpu.layer_norm_train(x, g, b, 1e-5, r)
    dz, dg, db = cpu.layer_norm_backward(dy, x, g, mean, rstd, r)
    assert rel_err(dz, tx.grad.numpy()) < 1e-12 and rel_err(dz, tr.grad.numpy()) < 1e-12
    assert rel_err(dg, tg.grad.numpy()) < 1e-12 and rel_err(db, tb.grad.numpy()) < 1e-12


# ---------------------------------------------------------------------------- softmax, log-softmax
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 97, 65), (1100, 1000)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_backward(rng, dtype, shape, log):
    x = randn(rng, *shape, dtype=dtype) * 2
    dy = randn(rng, *shape, dtype=dtype)
    y = cpu.log_softmax(x) if log else cpu.softmax(x)
    dx = (cpu.log_softmax_backward if log else cpu.softmax_backward)(y, dy)
    want = (ref.log_softmax_backward if log else ref.softmax_backward)(y, dy)
    assert dx.dtype == dtype and rel_err(dx, want) < TOL[dtype]


@requires_torch
@pytest.mark.parametrize("log", [False, True])
def test_softmax_backward_against_autograd(rng, log):
    x, dy = randn(rng, 5, 37, dtype=np.float64), randn(rng, 5, 37, dtype=np.float64)
    tx = _t(x, True)
    (torch.log_softmax if log else torch.softmax)(tx, -1).backward(_t(dy))
    y = cpu.log_softmax(x) if log else cpu.softmax(x)
    dx = (cpu.log_softmax_backward if log else cpu.softmax_backward)(y, dy)
    assert rel_err(dx, tx.grad.numpy()) < 1e-12


# ---------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tv", [(1, 1), (37, 5), (97, 1025), (300, 4000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(rng, dtype, tv, smoothing):
    t, v = tv
    z = randn(rng, t, v, dtype=dtype) * 3
    targets = rng.integers(0, v, t)
    weights = rng.random(t)
    weights[::3] = 0  # dropped targets (padding): loss still reported, no gradient
    losses, dz = cpu.cross_entropy(z, targets, weights, smoothing)
    want_l = ref.cross_entropy(z, targets, smoothing)
    want_g = ref.cross_entropy_backward(z, targets, weights, smoothing)
    assert losses.dtype == np.float64 and losses.shape == (t,)
    assert dz.dtype == dtype and dz.shape == z.shape
    assert rel_err(losses, want_l) < TOL[dtype] and rel_err(dz, want_g) < TOL[dtype]
    assert not dz[::3].any()


@requires_torch
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_against_autograd(rng, smoothing):
    z = randn(rng, 37, 11, dtype=np.float64) * 3
    targets = rng.integers(0, 11, 37)
    weights = rng.random(37)
    tz = _t(z, True)
    per = torch.nn.functional.cross_entropy(tz, torch.from_numpy(targets), reduction="none",
                                            label_smoothing=smoothing)
    (per * _t(weights)).sum().backward()
    losses, dz = cpu.cross_entropy(z, targets, weights, smoothing)
    assert rel_err(losses, per.detach().numpy()) < 1e-12
    assert rel_err(dz, tz.grad.numpy()) < 1e-12


def test_cross_entropy_bad_targets(rng):
    z = randn(rng, 4, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        cpu.cross_entropy(z, np.array([0, 1, 5, 2]), np.ones(4))
    with pytest.raises(ValueError, match="must be"):
        cpu.cross_entropy(z, np.array([0, 1]), np.ones(4))


# ---------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bnv", [(1, 1, 1), (2, 37, 5), (3, 97, 1000), (8, 300, 3000)])
def test_embedding_backward(rng, dtype, bnv):
    b, n, v = bnv
    d = 24
    ids = rng.integers(0, v, (b, n))
    ids[0, :] = ids[0, 0]  # a repeated token: its row sums all of them
    dy = randn(rng, b, n, d, dtype=dtype)
    got = cpu.embedding_backward(ids, dy, v, scale=math.sqrt(d))
    want = ref.embed_backward(ids, dy, v, math.sqrt(d))
    assert got.dtype == dtype and got.shape == (v, d)
    assert rel_err(got, want) < TOL[dtype]


def test_embedding_backward_threads_agree(rng):
    """The vocabulary split gives the same bits as one thread (each row sums in token order)."""
    ids = rng.integers(0, 50, (4, 300))
    dy = randn(rng, 4, 300, 16)
    one = np.empty((50, 16), np.float32)
    emb._scatter_rows(ids.reshape(-1), dy.reshape(-1, 16), 2.0, one, 0, 50)
    many = np.full((50, 16), np.nan, np.float32)
    emb._scatter_parallel(ids.reshape(-1), dy.reshape(-1, 16), 2.0, many, 2)
    np.testing.assert_array_equal(one, many)


# ---------------------------------------------------------------------------- heads
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_heads_into(rng, dtype):
    out = np.full((2, 37, 3 * 15), np.nan, dtype)
    for i in range(3):
        x = randn(rng, 2, 5, 37, 3, dtype=dtype)
        cpu.merge_heads_into(x, out, 15 * i)
        np.testing.assert_array_equal(out[:, :, 15 * i:15 * (i + 1)], cpu.merge_heads(x))
    assert not np.isnan(out).any()


# ---------------------------------------------------------------------------- axpy, Adam
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 37, 1025, (1 << 20) + 3])
def test_axpy(rng, dtype, size):
    dst, src = randn(rng, size, dtype=dtype), randn(rng, size, dtype=dtype)
    want = dst.astype(np.float64) - 0.5 * src
    cpu.axpy(dst, src, -0.5)
    assert rel_err(dst, want) < TOL[dtype]


def test_axpy_refuses_a_copy():
    dst = np.zeros((4, 4), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        training.axpy(dst, np.ones((4, 2), np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 37, (1 << 20) + 3])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_step(rng, dtype, size, wd):
    p, g = randn(rng, size, dtype=dtype), randn(rng, size, dtype=dtype)
    m, v = randn(rng, size, dtype=dtype) * 0.1, np.abs(randn(rng, size, dtype=dtype)) * 0.01
    want = ref.adam_step(p, g, m, v, 3, 1e-3, 0.9, 0.98, 1e-9, wd)
    cpu.adam_step(p, g, m, v, 3, 1e-3, 0.9, 0.98, 1e-9, wd)
    for got, expected in zip((p, m, v), want):
        assert rel_err(got, expected) < TOL[dtype]


@requires_torch
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_matches_torch(rng, wd):
    """Ten float32 steps beside torch.optim.Adam on the same gradients."""
    p0 = randn(rng, 1000)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.Adam([tp], lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=wd)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step in range(1, 11):
        g = randn(rng, 1000)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        cpu.adam_step(p, g, m, v, step, 1e-2, 0.9, 0.98, 1e-9, wd)
    assert rel_err(p, tp.detach().numpy()) < 1e-6


def test_adam_bad_input(rng):
    p = randn(rng, 4)
    with pytest.raises(ValueError, match="lr"):
        cpu.adam_step(p, p, np.zeros(4, np.float32), np.zeros(4, np.float32), 1, -1e-3, 0.9, 0.98, 1e-9)
    with pytest.raises(ValueError, match="same shape"):
        cpu.adam_step(p, p, np.zeros(3, np.float32), np.zeros(4, np.float32), 1, 1e-3, 0.9, 0.98, 1e-9)


# ---------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 97, 65), (1100, 1000)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_dropout_equals_the_reference(rng, dtype, shape, p):
    """The same elements dropped as the reference's counter-based stream, bit for bit; the kept
    ones are x / (1 - p) rounded once."""
    x = randn(rng, *shape, dtype=dtype)
    seed, offset = int(rng.integers(0, 2**63)) * 2 + 1, int(rng.integers(0, 10**6))
    got = cpu.dropout(x, p, seed, offset)
    want = ref.dropout(x, p, seed, offset)
    assert got.dtype == dtype and got.shape == x.shape
    keep = ref.dropout_keep(x.shape, p, seed, offset)
    np.testing.assert_array_equal(got != 0, keep & (x != 0))
    np.testing.assert_array_equal(got, want.astype(dtype))


def test_dropout_threshold_edge():
    """u = r / 2^24 against a p just above it whose float32 rounds down onto u: a float32
    comparison u >= p would keep the element, the integer threshold (the reference) drops it."""
    for counter in range(8):
        r = int(ref.dropout_uniform(7, np.array([counter]))[0] * 2**24)  # (an array: wraps quietly)
        if r == 0:
            continue
        p = (r + 1e-3) / 2**24
        assert np.float32(p) == np.float32(r / 2**24)  # the trap is set
        got = cpu.dropout(np.ones(counter + 1, np.float32), p, 7)
        assert got[counter] == 0 and not ref.dropout_keep((counter + 1,), p, 7)[counter]


def test_dropout_stream_is_positional(rng):
    """Element i uses counter offset + i: a slice of a call equals a call with the shifted offset."""
    x = randn(rng, 4, 1000)
    whole = cpu.dropout(x, 0.3, 11)
    np.testing.assert_array_equal(whole[2:], cpu.dropout(x[2:], 0.3, 11, offset=2000))


def test_dropout_bad_p():
    with pytest.raises(ValueError, match="probability"):
        cpu.dropout(np.ones(3, np.float32), 1.5, 0)


# ---------------------------------------------------------------------------- attention
# (B, H, Nq, Nk, d_k, d_v): awkward lengths (1, 37, 97, 1025), Nq != Nk both ways, d_v != d_k,
# odd head counts.
ATTN_SHAPES = [(1, 1, 1, 1, 8, 8), (2, 3, 37, 97, 16, 8), (2, 3, 97, 37, 16, 24),
               (1, 3, 1025, 1025, 64, 64), (1, 1, 1025, 600, 64, 32), (1, 2, 600, 1025, 32, 64)]
IMPLS = ["naive", "fused"]


def _attn_inputs(rng, shape, dtype, mask_kind):
    b, h, nq, nk, dk, dv = shape
    q, k = randn(rng, b, h, nq, dk, dtype=dtype), randn(rng, b, h, nk, dk, dtype=dtype)
    v, do = randn(rng, b, h, nk, dv, dtype=dtype), randn(rng, b, h, nq, dv, dtype=dtype)
    mask = None
    if mask_kind == "padding":  # (B, 1, 1, Nk): each batch row hides its last keys
        mask = np.ones((b, 1, 1, nk), bool)
        mask[-1, ..., max(1, nk - nk // 3):] = False
    elif mask_kind == "full":  # (B, H, Nq, Nk), with fully masked query rows
        mask = rng.random((b, h, nq, nk)) > 0.4
        mask[0, 0, : max(1, nq // 5)] = False
    return q, k, v, do, mask


def _assert_grads(got, want, dtype):
    for g, w, name in zip(got, want, ("dq", "dk", "dv")):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert np.all(np.isfinite(g)), name
        if np.linalg.norm(w) < 1e-12:  # e.g. one key: dS = 0 exactly, any rounding is relative noise
            assert np.max(np.abs(g)) < 1e-5, name
        else:
            assert rel_err(g, w) < TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("mask_kind,causal", [(None, False), (None, True), ("padding", False),
                                              ("full", True)])
def test_attention_train_and_backward(rng, dtype, impl, shape, mask_kind, causal):
    q, k, v, do, mask = _attn_inputs(rng, shape, dtype, mask_kind)
    out, lse = cpu.attention_train(q, k, v, mask, causal, impl)
    np.testing.assert_array_equal(out, cpu.attention(q, k, v, mask, causal, impl))  # the same forward
    want_out, want_lse = ref.scaled_dot_product_attention_train(q, k, v, mask=mask, causal=causal)
    assert lse.dtype == dtype and lse.shape == q.shape[:3]
    seen = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), seen)  # -inf exactly where no key is visible
    assert not np.isnan(lse).any() and np.all(lse[~seen] == -np.inf)
    assert rel_err(lse[seen], want_lse[seen]) < TOL[dtype]
    got = cpu.attention_backward(q, k, v, out, lse, do, mask, causal, impl)
    want = ref.scaled_dot_product_attention_backward(q, k, v, want_out, want_lse, do, mask=mask,
                                                     causal=causal)
    _assert_grads(got, want, dtype)
    if mask_kind == "full":  # rows that see nothing pass nothing back
        assert not got[0][0, 0, : max(1, q.shape[2] // 5)].any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_small_tiles(rng, impl, causal, monkeypatch):
    """Many key blocks and query steps, ragged last ones, diagonal chunks (tiles far below n)."""
    from tfm.backends.cpu import attention as att

    monkeypatch.setattr(att, "BWD_TILE_Q", 16)
    monkeypatch.setattr(att, "BWD_TILE_K", 24)
    q, k, v, do, mask = _attn_inputs(rng, (2, 3, 97, 131, 16, 8), np.float32, "padding")
    out, lse = ref.scaled_dot_product_attention_train(q, k, v, mask=mask, causal=causal)
    got = att.attention_backward(q, k, v, out, lse, do, mask, causal, impl)
    want = ref.scaled_dot_product_attention_backward(q, k, v, out, lse, do, mask=mask, causal=causal)
    _assert_grads(got, want, np.float32)


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_backward_key_groups(rng, groups, causal):
    """Several work items per head (each summing its own dQ) give the same gradients; every
    output element is written (NaN-poisoned)."""
    from tfm.backends.cpu import attention as att

    q, k, v, do, _ = _attn_inputs(rng, (1, 3, 300, 1100, 32, 16), np.float32, None)
    out, lse = att.attention_train(q, k, v, None, causal)
    dq, dk, dv = (np.full(x.shape, np.nan, np.float32) for x in (q, k, v))
    part = np.full((groups,) + q.shape if groups > 1 else (1, 1, 1, 1, 1), np.nan, np.float32)
    keep = np.broadcast_to(att._NO_MASK, q.shape[:3] + (k.shape[2],))
    att._fused_backward_kernel(q, k, v, out, do, lse, keep, False, causal, dq, dk, dv, part,
                               (32, 32, 16, 16, 32), 128, 256, 64, groups)
    if groups > 1:
        dq = part.sum(axis=0)
    want = ref.scaled_dot_product_attention_backward(q, k, v, out, lse, do, causal=causal)
    _assert_grads((dq, dk, dv), want, np.float32)


def test_key_groups_rule():
    from tfm.backends.cpu.attention import _key_groups

    assert _key_groups(8, 2, 8) == 1 and _key_groups(1, 1, 8) == 1  # heads spread evenly
    assert _key_groups(1, 2, 8) == 2 and _key_groups(3, 2, 8) == 2 and _key_groups(3, 4, 8) == 4
    assert _key_groups(1, 2, 1) == 1  # one key block cannot be split


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_strided_heads(rng, impl, causal):
    """q, k, v as split_heads views of one fused projection and dout as a split_heads view
    (the backward of merge_heads): the same gradients as from contiguous copies."""
    b, n, h, dh = 2, 97, 3, 16
    qkv = randn(rng, b, n, 3 * h * dh)
    q, k, v = (cpu.split_heads(qkv, h, i * h * dh, h * dh) for i in range(3))
    assert not q.flags.c_contiguous
    dy = randn(rng, b, n, h * dh)
    do = cpu.split_heads(dy, h)
    out, lse = cpu.attention_train(q, k, v, None, causal, impl)
    got = cpu.attention_backward(q, k, v, out, lse, do, None, causal, impl)
    copies = [np.ascontiguousarray(x) for x in (q, k, v, do)]
    again = cpu.attention_backward(*copies[:3], out, lse, copies[3], None, causal, impl)
    for g, a in zip(got, again):
        np.testing.assert_array_equal(g, a)
    # and the fused dQKV through merge_heads_into
    dqkv = np.full(qkv.shape, np.nan, np.float32)
    for i, g in enumerate(got):
        cpu.merge_heads_into(g, dqkv, i * h * dh)
    want = ref.scaled_dot_product_attention_backward(q, k, v, out, lse, do, causal=causal)
    assert rel_err(dqkv, np.concatenate([ref.merge_heads(w) for w in want], axis=-1)) < TOL[np.float32]


def test_attention_backward_empty(rng):
    q = randn(rng, 1, 2, 0, 8)
    k, v = randn(rng, 1, 2, 5, 8), randn(rng, 1, 2, 5, 4)
    dq, dk, dv = cpu.attention_backward(q, k, v, np.zeros((1, 2, 0, 4), np.float32),
                                        np.zeros((1, 2, 0), np.float32), np.zeros((1, 2, 0, 4), np.float32))
    assert dq.shape == q.shape and not dk.any() and not dv.any()


@requires_torch
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind,causal", [(None, False), (None, True), ("padding", False),
                                              ("padding", True)])
def test_attention_backward_against_autograd(rng, impl, mask_kind, causal):
    """float64 against autograd through PyTorch's SDPA (boolean mask: True = attend, as tfm)."""
    q, k, v, do, mask = _attn_inputs(rng, (2, 3, 97, 97, 16, 24), np.float64, mask_kind)
    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    tmask = None if mask is None else torch.from_numpy(mask)
    if causal and mask is not None:  # SDPA takes one or the other: fold the triangle into the mask
        tmask = tmask & torch.ones(97, 97, dtype=torch.bool).tril()
    tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask,
                                                            is_causal=causal and mask is None)
    tout.backward(_t(do))
    out, lse = cpu.attention_train(q, k, v, mask, causal, impl)
    assert rel_err(out, tout.detach().numpy()) < 1e-12
    got = cpu.attention_backward(q, k, v, out, lse, do, mask, causal, impl)
    for g, t in zip(got, (tq, tk, tv)):
        assert rel_err(g, t.grad.numpy()) < 1e-12


@pytest.mark.parametrize("family", ["attention_backward", "training_ops"])
def test_lab_variants_match_reference(family):
    """dev/cpu/attention_backward.py and training_ops.py: every variant they time meets its
    float64 check (``run_checks`` raises on the first miss)."""
    import importlib

    lab = importlib.import_module(f"dev.cpu.{family}")
    checks = lab.run_checks(np.random.default_rng(0))
    assert checks and all(c["ok"] for c in checks)


# ---------------------------------------------------------------------------- restricted attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, 3, 97, 16, 8), (1, 3, 1025, 64, 32)])
@pytest.mark.parametrize("window", [1, 5, 64, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_restricted_attention_train_and_backward(rng, dtype, shape, window, causal):
    from tfm.reference import baselines as rb

    b, h, n, dk, dv = shape
    q, k = randn(rng, b, h, n, dk, dtype=dtype), randn(rng, b, h, n, dk, dtype=dtype)
    v, do = randn(rng, b, h, n, dv, dtype=dtype), randn(rng, b, h, n, dv, dtype=dtype)
    out, lse = cpu.restricted_attention_train(q, k, v, window, causal)
    np.testing.assert_array_equal(out, cpu.restricted_attention(q, k, v, window, causal))
    want_out, want_lse = rb.restricted_attention_train(q, k, v, window, causal)
    assert lse.dtype == dtype and rel_err(lse, want_lse) < TOL[dtype]
    got = cpu.restricted_attention_backward(q, k, v, out, lse, do, window, causal)
    want = rb.restricted_attention_backward(q, k, v, want_out, want_lse, do, window, causal)
    _assert_grads(got, want, dtype)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_restricted_backward_groups(rng, groups):
    """Several work items per head (own dK, dV partials) give the same gradients."""
    from tfm.backends.cpu import restricted as rs
    from tfm.reference import baselines as rb

    q, k, v, do = (randn(rng, 1, 3, 300, 16) for _ in range(4))
    out, lse = rs.restricted_attention_train(q, k, v, 20)
    left, right = rs.window_bounds(20, False)
    dq, dk, dv = (np.full(x.shape, np.nan, np.float32) for x in (q, k, v))
    parts = [np.full((groups,) + x.shape if groups > 1 else (1, 1, 1, 1, 1), np.nan, np.float32)
             for x in (k, v)]
    rs._band_backward(q, k, v, out, do, lse, left, right, rs.query_block(20), dq, dk, dv, *parts,
                      groups)
    if groups > 1:
        dk, dv = parts[0].sum(axis=0), parts[1].sum(axis=0)
    want = rb.restricted_attention_backward(q, k, v, out, lse, do, 20)
    _assert_grads((dq, dk, dv), want, np.float32)


@requires_torch
def test_restricted_backward_against_autograd(rng):
    """float64 against autograd through SDPA with the band as a dense mask."""
    from tfm.reference.baselines import restricted_window

    q, k, v, do = (randn(rng, 2, 3, 97, 16, dtype=np.float64) for _ in range(4))
    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    band = torch.from_numpy(restricted_window(97, 97, 7, False))
    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=band).backward(_t(do))
    out, lse = cpu.restricted_attention_train(q, k, v, 7)
    for g, t in zip(cpu.restricted_attention_backward(q, k, v, out, lse, do, 7), (tq, tk, tv)):
        assert rel_err(g, t.grad.numpy()) < 1e-12


# ---------------------------------------------------------------------------- conv1d, GLU
CONV_CASES = [  # (B, N, C_in, C_out, k, dilation, pad_left, pad_right)
    (1, 1, 1, 1, 1, 1, 0, 0), (2, 37, 5, 7, 3, 1, 1, 1), (3, 97, 16, 9, 3, 4, 8, 0),
    (2, 37, 6, 4, 5, 2, 0, 8), (1, 20, 3, 5, 3, 30, 30, 30), (2, 1025, 8, 8, 2, 1, 1, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_backward(rng, dtype, case, bias):
    from tfm.reference import baselines as rb

    b, n, c_in, c_out, k, dil, pl, pr = case
    x, w = randn(rng, b, n, c_in, dtype=dtype), randn(rng, c_out, c_in, k, dtype=dtype)
    n_out = n + pl + pr - dil * (k - 1)
    dy = randn(rng, b, n_out, c_out, dtype=dtype)
    got = cpu.conv1d_backward(x, w, dy, dil, pl, pr, bias)
    want = rb.conv1d_backward(x, w, dy, dil, pl, pr, bias)
    assert got[0].shape == x.shape and got[1].shape == w.shape
    for g, w_ in zip(got[:2], want[:2]):
        assert g.dtype == dtype and rel_err(g, w_) < TOL[dtype]
    if bias:
        assert rel_err(got[2], want[2]) < TOL[dtype]
    else:
        assert got[2] is None


@requires_torch
def test_conv1d_backward_against_autograd(rng):
    x, w, bias = randn(rng, 2, 37, 5, dtype=np.float64), randn(rng, 7, 5, 3, dtype=np.float64), randn(rng, 7, dtype=np.float64)
    dy = randn(rng, 2, 37 + 4 - 2 * 2, 7, dtype=np.float64)
    tx, tw, tb = _t(x, True), _t(w, True), _t(bias, True)
    xp = torch.nn.functional.pad(tx.transpose(1, 2), (3, 1))
    torch.nn.functional.conv1d(xp, tw, tb, dilation=2).transpose(1, 2).backward(_t(dy))
    for g, t in zip(cpu.conv1d_backward(x, w, dy, 2, 3, 1, True), (tx, tw, tb)):
        assert rel_err(g, t.grad.numpy()) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (37, 10), (3, 97, 130)])
def test_glu_backward(rng, dtype, shape):
    from tfm.reference import baselines as rb

    x = randn(rng, *shape, dtype=dtype) * 3
    dy = randn(rng, *shape[:-1], shape[-1] // 2, dtype=dtype)
    got = cpu.glu_backward(x, dy)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, rb.glu_backward(x, dy)) < TOL[dtype]


@requires_torch
def test_glu_backward_against_autograd(rng):
    x, dy = randn(rng, 3, 37, 10, dtype=np.float64), randn(rng, 3, 37, 5, dtype=np.float64)
    tx = _t(x, True)
    torch.nn.functional.glu(tx, dim=-1).backward(_t(dy))
    assert rel_err(cpu.glu_backward(x, dy), tx.grad.numpy()) < 1e-12
