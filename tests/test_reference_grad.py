"""The float64 reference's backward functions (tfm/reference) and the numpy backend's training ops.

Oracles: float64 central differences (tfm.reference.gradcheck) for every backward, and PyTorch
autograd in float64 where PyTorch has the op. Tolerances:

* FD_TOL = 1e-7 against central differences at step 1e-6: the difference quotient's own error
  is O(h^2) + O(eps_64 * |L| / h), about 1e-10 relative here, so a correct formula lands near
  1e-10 and a wrong one (order 1) cannot pass;
* TORCH_TOL = 1e-12 against PyTorch's float64 autograd: both sides are exact formulas in float64
  and differ only by rounding (sums in another order), i.e. ~1e-15.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import rel_err, requires_torch

from tfm import reference as ref
from tfm.reference import baselines as rb
from tfm.backends import get_backend
from tfm.reference.gradcheck import gradient_errors

FD_TOL = 1e-7
TORCH_TOL = 1e-12


def r(rng, *shape):
    return rng.standard_normal(shape)


def assert_fd(f, args, cotangent, grads, **kwargs):
    """Every analytic gradient in ``grads`` ({arg index: gradient}) within FD_TOL of central differences."""
    errors = gradient_errors(f, args, cotangent, grads, **kwargs)
    assert max(errors.values()) < FD_TOL, errors


def test_gradcheck_catches_a_wrong_gradient(rng):
    x, c = r(rng, 4, 3), r(rng, 4, 3)
    right = {0: 3 * x ** 2 * c}
    assert max(gradient_errors(lambda x: x ** 3, (x,), c, right).values()) < FD_TOL
    assert gradient_errors(lambda x: x ** 3, (x,), c, {0: right[0] * (1 + 1e-5)})[0] > 1e-6
    assert gradient_errors(lambda x: x ** 3, (x,), c, {0: right[0] * np.nan})[0] == np.inf
    # an output that is a view of the perturbed input (split_heads is one) is still differenced
    assert gradient_errors(lambda x: x.T, (x,), c.T, {0: c})[0] < FD_TOL


# ---------------------------------------------------------------------------- dense layers
@pytest.mark.parametrize("lead", [(1,), (2, 37), (3, 1, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward(rng, lead, bias):
    x, w, b = r(rng, *lead, 6), r(rng, 5, 6), r(rng, 5)
    dy = r(rng, *lead, 5)
    dx, dw, db = ref.linear_backward(x, w, dy, bias=bias)
    assert (db is None) == (not bias)
    grads = {0: dx, 1: dw} | ({2: db} if bias else {})
    assert_fd(lambda *a: ref.linear(*a), (x, w, b if bias else None), dy, grads)


@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_activation_backward(rng, kind):
    x = r(rng, 2, 37, 5) * 2
    dy = r(rng, *x.shape)
    dx = ref.transformer.ACTIVATION_BACKWARDS[kind](x, dy)
    assert_fd(ref.transformer.ACTIVATIONS[kind], (x,), dy, {0: dx})


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("n", [1, 37])
def test_ffn_backward(rng, activation, n):
    d, d_ff = 6, 11
    args = (r(rng, 2, n, d), r(rng, d_ff, d), r(rng, d_ff), r(rng, d, d_ff), r(rng, d))
    dy = r(rng, 2, n, d)
    dx, dw1, db1, dw2, db2 = ref.position_wise_ffn_backward(*args, dy, activation)

    def f(*a):
        return ref.position_wise_ffn(*a, activation=activation)

    assert_fd(f, args, dy, {0: dx, 1: dw1, 2: db1, 3: dw2, 4: db2}, max_entries=80)


@pytest.mark.parametrize("n", [1, 37, 97])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_backward(rng, n, residual):
    d = 7
    x, res = r(rng, 2, n, d) * 3 + 1, r(rng, 2, n, d)
    gamma, beta = r(rng, d), r(rng, d)
    res = res if residual else None
    out, mean, rstd = ref.layer_norm_train(x, gamma, beta, 1e-5, res)
    assert rel_err(out, ref.layer_norm(x, gamma, beta, 1e-5, res)) < 1e-14
    assert mean.shape == rstd.shape == (2, n)
    dy = r(rng, *out.shape)
    dx, dgamma, dbeta = ref.layer_norm_backward(dy, x, gamma, mean, rstd, res)

    def f(x, gamma, beta, res):
        return ref.layer_norm(x, gamma, beta, 1e-5, res)

    grads = {0: dx, 1: dgamma, 2: dbeta} | ({3: dx} if residual else {})
    assert_fd(f, (x, gamma, beta, res), dy, grads, max_entries=150)


@pytest.mark.parametrize("n", [1, 37])
def test_softmax_and_log_softmax_backward(rng, n):
    x, dy = r(rng, 3, n, 9) * 3, r(rng, 3, n, 9)
    dx = ref.softmax_backward(ref.softmax(x), dy)
    assert_fd(ref.softmax, (x,), dy, {0: dx})
    dx = ref.log_softmax_backward(ref.log_softmax(x), dy)
    assert_fd(ref.log_softmax, (x,), dy, {0: dx})


# ---------------------------------------------------------------------------- loss
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy(rng, label_smoothing):
    t, v = 37, 11
    logits = r(rng, t, v) * 2
    targets = rng.integers(0, v, t)
    weights = rng.uniform(0.5, 2.0, t)
    weights[[0, 5, 36]] = 0.0  # dropped targets (padding)
    losses = ref.cross_entropy(logits, targets, label_smoothing)
    lse = np.log(np.exp(logits).sum(-1))
    expected = ((1 - label_smoothing) * (lse - logits[np.arange(t), targets])
                + label_smoothing * (lse - logits.mean(-1)))
    assert rel_err(losses, expected) < 1e-14
    dlogits = ref.cross_entropy_backward(logits, targets, weights, label_smoothing)
    assert np.all(dlogits[[0, 5, 36]] == 0.0)

    def losses(z):
        return ref.cross_entropy(z, targets, label_smoothing)

    assert_fd(losses, (logits,), weights, {0: dlogits})  # d/dz of sum_t weights[t] * loss_t


def test_cross_entropy_bad_input(rng):
    logits = r(rng, 4, 5)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        ref.cross_entropy(logits, np.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="targets must lie"):
        ref.cross_entropy_backward(logits, np.array([0, -1, 2, 2]), np.ones(4))
    with pytest.raises(TypeError, match="targets must be integers"):
        ref.cross_entropy(logits, np.zeros(4))
    with pytest.raises(ValueError, match="targets must have shape"):
        ref.cross_entropy(logits, np.zeros(3, int))
    with pytest.raises(ValueError, match="weights must have shape"):
        ref.cross_entropy_backward(logits, np.zeros(4, int), np.ones(5))
    with pytest.raises(ValueError, match="label_smoothing"):
        ref.cross_entropy(logits, np.zeros(4, int), label_smoothing=1.5)


# ---------------------------------------------------------------------------- embedding, heads
def test_embedding_backward(rng):
    vocab, d, scale = 13, 6, math.sqrt(6)
    ids = rng.integers(0, vocab, (2, 37))
    ids[0, :5] = 3  # repeated ids accumulate
    table, dy = r(rng, vocab, d), r(rng, 2, 37, d)
    dtable = ref.embed_backward(ids, dy, vocab, scale)
    assert_fd(lambda t: ref.embed(ids, t, scale), (table,), dy, {0: dtable})
    unused = np.setdiff1d(np.arange(vocab), ids)
    assert np.all(dtable[unused] == 0.0)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 13\)"):
        ref.embed_backward(ids + 1, dy, vocab)
    with pytest.raises(ValueError, match="dy must have shape"):
        ref.embed_backward(ids, dy[:, :3], vocab)


@pytest.mark.parametrize("n_heads", [1, 3])
def test_split_and_merge_heads_backward(rng, n_heads):
    x = r(rng, 2, 37, n_heads * 4)
    dheads = r(rng, 2, n_heads, 37, 4)
    assert_fd(lambda x: ref.split_heads(x, n_heads), (x,), dheads, {0: ref.split_heads_backward(dheads)})
    dy = r(rng, *x.shape)
    assert_fd(ref.merge_heads, (dheads,), dy, {0: ref.merge_heads_backward(dy, n_heads)})
    # merge_heads_into writes one slice of a fused (Q | K | V) gradient and nothing else
    fused = np.full((2, 37, 3 * n_heads * 4), np.nan)
    for i in range(3):
        ref.merge_heads_into(dheads * (i + 1), fused, i * n_heads * 4)
    for i in range(3):
        piece = fused[:, :, i * n_heads * 4:(i + 1) * n_heads * 4]
        assert np.array_equal(piece, ref.merge_heads(dheads) * (i + 1))


# ---------------------------------------------------------------------------- attention
ATTENTION_CASES = [  # (B, H, Nq, Nk, Dk, Dv, causal, masked)
    (1, 1, 1, 1, 4, 4, False, False),
    (2, 3, 37, 37, 4, 3, True, False),
    (1, 3, 37, 29, 3, 5, False, True),
    (2, 1, 29, 37, 5, 2, True, True),
    (1, 3, 97, 97, 3, 2, True, True),
    (1, 1, 97, 37, 2, 3, False, False),
]


def padding_mask(rng, b, nq, nk):
    """A (B, 1, Nq, Nk) mask with random holes, two queries that see no key, one key no query sees."""
    mask = rng.uniform(size=(b, 1, nq, nk)) > 0.3
    mask[..., min(1, nq - 1), :] = False
    mask[..., nq - 1, :] = False
    mask[..., :, nk // 2] = False
    return mask


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_backward(rng, case):
    b, h, nq, nk, dk, dv, causal, masked = case
    q, k, v = r(rng, b, h, nq, dk), r(rng, b, h, nk, dk), r(rng, b, h, nk, dv)
    mask = padding_mask(rng, b, nq, nk) if masked else None
    out, lse = ref.scaled_dot_product_attention_train(q, k, v, mask=mask, causal=causal)
    assert rel_err(out, ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)) < 1e-14
    dout = r(rng, *out.shape)
    dq, dk_, dv_ = ref.scaled_dot_product_attention_backward(q, k, v, out, lse, dout, mask=mask,
                                                             causal=causal)

    def f(q, k, v):
        return ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)

    assert_fd(f, (q, k, v), dout, {0: dq, 1: dk_, 2: dv_}, max_entries=200)
    if masked:  # rows that see no key: lse -inf, output and gradient exactly zero
        blind = ~ref.attention_visibility(nq, nk, mask, causal).any(-1)  # (B, 1, Nq)
        blind = np.broadcast_to(blind, lse.shape)
        assert blind.any() and np.all(lse[blind] == -np.inf) and np.all(np.isfinite(lse[~blind]))
        assert np.all(dq[blind] == 0.0) and np.all(out[blind] == 0.0)
        assert np.all(dk_[..., nk // 2, :] == 0.0) and np.all(dv_[..., nk // 2, :] == 0.0)


def test_attention_lse_is_the_log_sum_exp(rng):
    q, k, v = r(rng, 2, 3, 37, 4), r(rng, 2, 3, 29, 4), r(rng, 2, 3, 29, 5)
    _, lse = ref.scaled_dot_product_attention_train(q, k, v, causal=True)
    s = q @ np.swapaxes(k, -1, -2) / 2.0
    expected = np.array([[[np.log(np.exp(s[i, j, t, :t + 1]).sum()) for t in range(37)]
                          for j in range(3)] for i in range(2)])
    assert rel_err(lse, expected) < 1e-14


def test_attention_broadcast_operands(rng):
    """k and v shared by every head (B, 1, Nk, d): their gradients are summed over the heads."""
    q, k, v = r(rng, 2, 3, 7, 4), r(rng, 2, 1, 5, 4), r(rng, 2, 1, 5, 3)
    out, lse = ref.scaled_dot_product_attention_train(q, k, v)
    dout = r(rng, *out.shape)
    dq, dk, dv = ref.scaled_dot_product_attention_backward(q, k, v, out, lse, dout)
    assert dk.shape == k.shape and dv.shape == v.shape
    assert_fd(ref.scaled_dot_product_attention, (q, k, v), dout, {0: dq, 1: dk, 2: dv})


def test_attention_backward_bad_input(rng):
    q, k, v = r(rng, 1, 2, 5, 4), r(rng, 1, 2, 6, 4), r(rng, 1, 2, 6, 3)
    out, lse = ref.scaled_dot_product_attention_train(q, k, v)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 5, 3\)"):
        ref.scaled_dot_product_attention_backward(q, k, v, out, lse, out[..., :2])
    with pytest.raises(ValueError, match="lse must have shape"):
        ref.scaled_dot_product_attention_backward(q, k, v, out, lse[..., :4], out)


# ---------------------------------------------------------------------------- Table 1's other layers
CONV_CASES = [  # (N, k, dilation, pad_left, pad_right)
    (1, 1, 1, 0, 0),
    (1, 3, 2, 4, 0),  # causal: pad_left = dilation * (k - 1)
    (37, 3, 1, 1, 1),  # same
    (37, 2, 3, 2, 1),  # explicit, uneven
    (97, 3, 4, 0, 0),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_backward(rng, case, bias):
    n, k, dilation, pad_left, pad_right = case
    x, w, b = r(rng, 2, n, 3), r(rng, 5, 3, k), r(rng, 5)
    y = rb.conv1d(x, w, b, dilation, pad_left, pad_right)
    dy = r(rng, *y.shape)
    dx, dw, db = rb.conv1d_backward(x, w, dy, dilation, pad_left, pad_right, bias=bias)
    assert (db is None) == (not bias)

    def f(x, w, b):
        return rb.conv1d(x, w, b, dilation, pad_left, pad_right)

    grads = {0: dx, 1: dw} | ({2: db} if bias else {})
    assert_fd(f, (x, w, b), dy, grads, max_entries=150)
    with pytest.raises(ValueError, match="dy must have shape"):
        rb.conv1d_backward(x, w, dy[:, 1:], dilation, pad_left, pad_right)


@pytest.mark.parametrize("n", [1, 37])
def test_glu_backward(rng, n):
    x = r(rng, 2, n, 10) * 2
    dy = r(rng, 2, n, 5)
    assert_fd(rb.glu, (x,), dy, {0: rb.glu_backward(x, dy)})


@pytest.mark.parametrize("n, window, causal", [(1, 3, False), (37, 1, True), (37, 4, False),
                                               (97, 5, False), (97, 6, True)])
def test_restricted_attention_backward(rng, n, window, causal):
    q, k, v = r(rng, 1, 3, n, 3), r(rng, 1, 3, n, 3), r(rng, 1, 3, n, 2)
    out, lse = rb.restricted_attention_train(q, k, v, window, causal)
    assert rel_err(out, rb.restricted_attention(q, k, v, window, causal)) < 1e-14
    dout = r(rng, *out.shape)
    grads = rb.restricted_attention_backward(q, k, v, out, lse, dout, window, causal)

    def f(q, k, v):
        return rb.restricted_attention(q, k, v, window, causal)

    assert_fd(f, (q, k, v), dout, dict(enumerate(grads)), max_entries=150)


# ---------------------------------------------------------------------------- recurrent layers
RECURRENT = {  # kind: (gates, has a cell state)
    "rnn_tanh": (1, False), "rnn_relu": (1, False), "lstm": (4, True), "gru": (3, False),
}


def recurrent_inputs(rng, kind, b, n, i, hid):
    gates, cell = RECURRENT[kind]
    x, h0, c0 = r(rng, b, n, i), r(rng, b, hid) * 0.5, r(rng, b, hid) * 0.5
    weights = (r(rng, gates * hid, i) * 0.5, r(rng, gates * hid, hid) * 0.5,
               r(rng, gates * hid) * 0.3, r(rng, gates * hid) * 0.3)
    return (x, h0, c0) + weights if cell else (x, h0) + weights


def recurrent_forward(kind):
    """(forward over the float inputs, train twin, backward) of one kind, as the backend calls them."""
    if kind.startswith("rnn"):
        act = kind[4:]
        return (lambda *a: rb.rnn_layer(*a, nonlinearity=act),
                lambda *a: rb.rnn_layer_train(*a, nonlinearity=act), rb.rnn_layer_backward)
    return {"lstm": (rb.lstm_layer, rb.lstm_layer_train, rb.lstm_layer_backward),
            "gru": (rb.gru_layer, rb.gru_layer_train, rb.gru_layer_backward)}[kind]


@pytest.mark.parametrize("kind", list(RECURRENT))
@pytest.mark.parametrize("n", [1, 37, 97])
def test_recurrent_backward(rng, kind, n):
    forward, train, backward = recurrent_forward(kind)
    args = recurrent_inputs(rng, kind, 2, n, 4, 3)
    *outs, saved = train(*args)
    for got, want in zip(outs, forward(*args)):
        assert rel_err(got, want) < 1e-14
    cotangents = tuple(r(rng, *o.shape) for o in outs)  # dout, dh_n (, dc_n)
    grads = backward(saved, *cotangents)
    assert len(grads) == len(args)  # one gradient per float input, in the forward's order
    assert_fd(forward, args, cotangents, dict(enumerate(grads)), max_entries=40 if n == 97 else 120)


@pytest.mark.parametrize("kind", list(RECURRENT))
def test_recurrent_backward_none_cotangents(rng, kind):
    """None is a zero cotangent: only dout, or only the final state(s)."""
    forward, train, backward = recurrent_forward(kind)
    args = recurrent_inputs(rng, kind, 3, 5, 2, 4)
    *outs, saved = train(*args)
    for keep in range(len(outs)):
        cotangents = tuple(r(rng, *o.shape) if j == keep else None for j, o in enumerate(outs))
        grads = backward(saved, *cotangents)
        assert_fd(forward, args, cotangents, dict(enumerate(grads)), max_entries=30)
    with pytest.raises(ValueError, match="dout must have shape"):
        backward(saved, outs[0][:, 1:], *([None] * (len(outs) - 1)))
    with pytest.raises(ValueError, match="dh_n must have shape"):
        backward(saved, None, outs[1][:2], *([None] * (len(outs) - 2)))


# ---------------------------------------------------------------------------- dropout
def splitmix64_uniform(seed: int, counter: int) -> float:
    """The documented stream, with Python integers (an independent statement of it)."""
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)
    z = mix((mix(seed) + (counter + 1) * 0x9E3779B97F4A7C15) % 2**64)
    return (z >> 40) / 2**24


def test_dropout_uniform_is_the_documented_stream():
    # SplitMix64 from state 0 starts 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (its published outputs)
    assert ref.dropout_uniform(0, np.array([0, 1])).tolist() == [0xE220A8 / 2**24, 0x6E789E / 2**24]
    for seed in [0, 1, 12345, 2**64 - 1]:
        counters = np.array([0, 1, 2, 1000, 2**40 + 7, 2**63 - 1], dtype=np.int64)
        expected = [splitmix64_uniform(seed, int(c)) for c in counters]
        assert ref.dropout_uniform(seed, counters).tolist() == expected
    u = ref.dropout_uniform(7, np.arange(1000))
    assert np.array_equal(u.astype(np.float32).astype(np.float64), u)  # exact in float32
    assert np.all((u >= 0) & (u < 1))


@pytest.mark.parametrize("p", [0.1, 0.3, 1 / 3, 0.5, 0.9])
def test_dropout_mask_fraction_and_backward(rng, p):
    x = r(rng, 4, 97, 129)
    seed, offset = 2024, 1000
    y = ref.dropout(x, p, seed, offset)
    u = ref.dropout_uniform(seed, offset + np.arange(x.size)).reshape(x.shape)
    keep = u >= p
    assert np.array_equal(ref.dropout_keep(x.shape, p, seed, offset), keep)
    assert np.array_equal(y, np.where(keep, x / (1 - p), 0.0))
    sigma = math.sqrt(p * (1 - p) / x.size)
    assert abs(keep.mean() - (1 - p)) < 5 * sigma
    assert np.array_equal((u * 2**24).astype(np.int64) >= ref.dropout_threshold(p), keep)
    dy = r(rng, *x.shape)
    assert np.array_equal(ref.dropout_backward(dy, p, seed, offset), np.where(keep, dy / (1 - p), 0.0))
    # the counter is the flat index plus the offset: a slice of a longer stream
    whole = ref.dropout(np.ones(x.size + offset), p, seed, 0)
    assert np.array_equal(ref.dropout(np.ones(x.shape), p, seed, offset).reshape(-1), whole[offset:])
    assert not np.array_equal(ref.dropout_keep(x.shape, p, seed + 1, offset), keep)


def test_dropout_edges_and_bad_input(rng):
    x = r(rng, 3, 5)
    assert np.array_equal(ref.dropout(x, 0.0, 1), x)
    assert np.array_equal(ref.dropout(x, 1.0, 1), np.zeros_like(x))
    with pytest.raises(ValueError, match="p must lie in"):
        ref.dropout(x, 1.2, 0)
    with pytest.raises(ValueError, match="seed must lie"):
        ref.dropout(x, 0.1, -1)
    with pytest.raises(TypeError, match="seed must be an integer"):
        ref.dropout(x, 0.1, 1.5)
    with pytest.raises(ValueError, match="counters must be >= 0"):
        ref.dropout(x, 0.1, 0, offset=-3)


# ---------------------------------------------------------------------------- Adam
def test_adam_bad_input(rng):
    p = r(rng, 3)
    with pytest.raises(ValueError, match="step must be"):
        ref.adam_step(p, p, p, p, 0, 1e-3)
    with pytest.raises(ValueError, match="lr must be"):
        ref.adam_step(p, p, p, p, 1, -1e-3)
    with pytest.raises(ValueError, match="grad must have shape"):
        ref.adam_step(p, p[:2], p, p, 1, 1e-3)


# ---------------------------------------------------------------------------- the numpy backend
def test_numpy_backend_training_ops(rng):
    """Each training method of the numpy backend is the reference (float64, in place where the
    interface says so)."""
    bk = get_backend("numpy")
    x, w, b = r(rng, 2, 5, 6).astype(np.float32), r(rng, 4, 6), r(rng, 4)
    dy = r(rng, 2, 5, 4)
    for got, want in zip(bk.linear_backward(x, w, dy), ref.linear_backward(x, w, dy)):
        assert got.dtype == np.float64 and np.array_equal(got, want)
    assert bk.linear_backward(x, w, dy, bias=False)[2] is None
    assert np.array_equal(bk.activation_backward(x, x, "gelu"), ref.gelu_backward(x, x))
    g, beta = r(rng, 6), r(rng, 6)
    y, mean, rstd = bk.layer_norm_train(x, g, beta, 1e-5, x)
    assert np.array_equal(y, ref.layer_norm_train(x, g, beta, 1e-5, x)[0])
    dx = bk.layer_norm_backward(x, x, g, mean, rstd, x)
    assert np.array_equal(dx[0], ref.layer_norm_backward(x, x, g, mean, rstd, x)[0])
    s = ref.softmax(x)
    assert np.array_equal(bk.softmax_backward(s, x), ref.softmax_backward(s, x))
    assert np.array_equal(bk.log_softmax_backward(np.log(s), x), ref.log_softmax_backward(np.log(s), x))
    logits, targets, weights = r(rng, 7, 5), rng.integers(0, 5, 7), np.full(7, 1 / 7)
    losses, dlogits = bk.cross_entropy(logits, targets, weights, 0.1)
    assert np.array_equal(losses, ref.cross_entropy(logits, targets, 0.1))
    assert np.array_equal(dlogits, ref.cross_entropy_backward(logits, targets, weights, 0.1))
    ids = rng.integers(0, 9, (2, 5))
    assert np.array_equal(bk.embedding_backward(ids, x, 9, 2.0), ref.embed_backward(ids, x, 9, 2.0))
    q, k, v = r(rng, 2, 3, 5, 4), r(rng, 2, 3, 6, 4), r(rng, 2, 3, 6, 2)
    mask = padding_mask(rng, 2, 5, 6)
    out, lse = bk.attention_train(q, k, v, mask=mask, causal=True, impl="naive")
    grads = bk.attention_backward(q, k, v, out, lse, out, mask=mask, causal=True)
    want = ref.scaled_dot_product_attention_backward(q, k, v, out, lse, out, mask=mask, causal=True)
    assert all(np.array_equal(a, b) for a, b in zip(grads, want))
    fused = bk.zeros((2, 5, 14), np.float32)
    assert fused.dtype == np.float64 and not fused.any()
    bk.merge_heads_into(q, fused, 2)
    assert np.array_equal(fused[:, :, 2:14], ref.merge_heads(q)) and not fused[:, :, :2].any()
    acc = r(rng, 3, 4)
    before = acc.copy()
    bk.axpy(acc, np.ones((3, 4)), -0.5)
    assert np.array_equal(acc, before - 0.5)
    assert np.array_equal(bk.dropout(x, 0.2, 5, 11), ref.dropout(x, 0.2, 5, 11))
    xc, wc = r(rng, 2, 9, 3), r(rng, 4, 3, 2)
    dyc = r(rng, 2, 9 + 3 - 2, 4)
    for got, want in zip(bk.conv1d_backward(xc, wc, dyc, 2, 2, 1), rb.conv1d_backward(xc, wc, dyc, 2, 2, 1)):
        assert np.array_equal(got, want)
    assert np.array_equal(bk.glu_backward(xc[..., :2], xc[..., :1]), rb.glu_backward(xc[..., :2], xc[..., :1]))
    out, lse = bk.restricted_attention_train(q, q, k[..., :5, :], 3, True)
    assert np.array_equal(out, rb.restricted_attention_train(q, q, k[..., :5, :], 3, True)[0])
    grads = bk.restricted_attention_backward(q, q, k[..., :5, :], out, lse, out, 3, True)
    want = rb.restricted_attention_backward(q, q, k[..., :5, :], out, lse, out, 3, True)
    assert all(np.array_equal(a, b) for a, b in zip(grads, want))
    for kind, method in (("rnn_relu", "rnn_layer"), ("lstm", "lstm_layer"), ("gru", "gru_layer")):
        args = recurrent_inputs(rng, kind, 2, 4, 3, 5)
        kw = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
        *outs, saved = getattr(bk, method + "_train")(*args, **kw)
        *want, want_saved = recurrent_forward(kind)[1](*args)
        assert all(np.array_equal(a, b) for a, b in zip(outs, want))
        grads = getattr(bk, method + "_backward")(saved, *outs)
        want = recurrent_forward(kind)[2](want_saved, *outs)
        assert all(np.array_equal(a, b) for a, b in zip(grads, want))
    param, grad, m, v2 = r(rng, 6), r(rng, 6), r(rng, 6) * 0.1, r(rng, 6) ** 2
    want = ref.adam_step(param, grad, m, v2, 3, 1e-3, 0.9, 0.98, 1e-9, 0.01)
    bk.adam_step(param, grad, m, v2, 3, 1e-3, 0.9, 0.98, 1e-9, 0.01)
    assert all(np.array_equal(a, b) for a, b in zip((param, m, v2), want))


# ---------------------------------------------------------------------------- PyTorch autograd
torch_test = [requires_torch, pytest.mark.torch]


def _torch():
    import torch

    return torch


def t64(x, grad=True):
    torch = _torch()
    return torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=grad)


def grads_of(out, dout, *inputs):
    torch = _torch()
    return [g.numpy() for g in torch.autograd.grad(out, inputs, torch.from_numpy(np.asarray(dout)))]


@pytest.mark.torch
@requires_torch
def test_torch_linear_activations_layer_norm_softmax(rng):
    torch = _torch()
    F = torch.nn.functional
    x, w, b, dy = r(rng, 2, 37, 6), r(rng, 5, 6), r(rng, 5), r(rng, 2, 37, 5)
    tx, tw, tb = t64(x), t64(w), t64(b)
    for got, want in zip(ref.linear_backward(x, w, dy), grads_of(F.linear(tx, tw, tb), dy, tx, tw, tb)):
        assert rel_err(got, want) < TORCH_TOL
    for kind, tf in (("relu", F.relu), ("gelu", F.gelu)):
        got = ref.transformer.ACTIVATION_BACKWARDS[kind](x, x)
        assert rel_err(got, grads_of(tf(tx), x, tx)[0]) < TORCH_TOL
    res, g, beta = r(rng, 2, 37, 6), r(rng, 6), r(rng, 6)
    tres, tg, tbeta = t64(res), t64(g), t64(beta)
    out = F.layer_norm(tx + tres, (6,), tg, tbeta, 1e-5)
    want = grads_of(out, x, tx, tres, tg, tbeta)
    y, mean, rstd = ref.layer_norm_train(x, g, beta, 1e-5, res)
    assert rel_err(y, out.detach().numpy()) < TORCH_TOL
    dx, dg, db = ref.layer_norm_backward(x, x, g, mean, rstd, res)
    for got, w_ in zip((dx, dx, dg, db), want):
        assert rel_err(got, w_) < TORCH_TOL
    assert rel_err(ref.softmax_backward(ref.softmax(x), dy[..., :1] * x),
                   grads_of(torch.softmax(tx, -1), dy[..., :1] * x, tx)[0]) < TORCH_TOL
    assert rel_err(ref.log_softmax_backward(ref.log_softmax(x), dy[..., :1] * x),
                   grads_of(torch.log_softmax(tx, -1), dy[..., :1] * x, tx)[0]) < TORCH_TOL


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_torch_cross_entropy(rng, label_smoothing):
    torch = _torch()
    t, v = 37, 11
    logits, targets = r(rng, t, v), rng.integers(0, v, t)
    ignored = np.zeros(t, bool)
    ignored[[2, 3, 30]] = True
    torch_targets = torch.from_numpy(np.where(ignored, -100, targets))
    tz = t64(logits)
    loss = torch.nn.functional.cross_entropy(tz, torch_targets, ignore_index=-100,
                                             label_smoothing=label_smoothing)
    (want,) = torch.autograd.grad(loss, tz)
    weights = np.where(ignored, 0.0, 1.0 / (~ignored).sum())
    ours = np.where(ignored, 0, targets)
    got = np.sum(weights * ref.cross_entropy(logits, ours, label_smoothing))
    assert abs(got - loss.item()) < TORCH_TOL * abs(got)
    assert rel_err(ref.cross_entropy_backward(logits, ours, weights, label_smoothing), want.numpy()) < TORCH_TOL


@pytest.mark.torch
@requires_torch
def test_torch_embedding(rng):
    torch = _torch()
    ids, table, dy = rng.integers(0, 9, (2, 37)), r(rng, 9, 6), r(rng, 2, 37, 6)
    tt = t64(table)
    out = torch.nn.functional.embedding(torch.from_numpy(ids), tt) * math.sqrt(6)
    assert rel_err(ref.embed_backward(ids, dy, 9, math.sqrt(6)), grads_of(out, dy, tt)[0]) < TORCH_TOL


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("case", [c for c in ATTENTION_CASES], ids=str)
def test_torch_sdpa(rng, case):
    torch = _torch()
    b, h, nq, nk, dk, dv, causal, masked = case
    q, k, v = r(rng, b, h, nq, dk), r(rng, b, h, nk, dk), r(rng, b, h, nk, dv)
    mask = padding_mask(rng, b, nq, nk) if masked else None
    visible = ref.attention_visibility(nq, nk, mask, causal)
    blind = ~np.broadcast_to(visible, (b, 1, nq, nk)).any(-1)  # (B, 1, Nq): SDPA gives NaN there
    out, lse = ref.scaled_dot_product_attention_train(q, k, v, mask=mask, causal=causal)
    dout = r(rng, *out.shape) * ~blind[..., None]
    tq, tk, tv = t64(q), t64(k), t64(v)
    if masked:  # SDPA takes a mask or is_causal, not both
        tout = torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=torch.from_numpy(np.broadcast_to(visible, (b, 1, nq, nk)).copy()))
        tout = torch.nan_to_num(tout)
    else:
        tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    assert rel_err(out, tout.detach().numpy()) < TORCH_TOL
    want = grads_of(tout, dout, tq, tk, tv)
    got = ref.scaled_dot_product_attention_backward(q, k, v, out, lse, dout, mask=mask, causal=causal)
    for g, w in zip(got, want):
        assert rel_err(g, np.nan_to_num(w)) < TORCH_TOL


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_torch_adam(rng, weight_decay):
    torch = _torch()
    shapes = [(5, 3), (7,)]
    params = [r(rng, *s) for s in shapes]
    tparams = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    opt = torch.optim.Adam(tparams, lr=3e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=weight_decay)
    state = [(np.zeros(s), np.zeros(s)) for s in shapes]
    for step in range(1, 8):
        grads = [r(rng, *s) * (0.1 if step % 2 else 2.0) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        opt.step()
        for i, g in enumerate(grads):
            params[i], m, v = ref.adam_step(params[i], g, *state[i], step, 3e-2, 0.9, 0.98, 1e-9, weight_decay)
            state[i] = (m, v)
            assert rel_err(params[i], tparams[i].detach().numpy()) < TORCH_TOL
            assert rel_err(v, opt.state[tparams[i]]["exp_avg_sq"].numpy()) < TORCH_TOL


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_torch_conv1d_and_glu(rng, case):
    torch = _torch()
    F = torch.nn.functional
    n, k, dilation, pad_left, pad_right = case
    x, w, b = r(rng, 2, n, 3), r(rng, 6, 3, k), r(rng, 6)
    tx, tw, tb = t64(x), t64(w), t64(b)
    ty = F.conv1d(F.pad(tx.transpose(1, 2), (pad_left, pad_right)), tw, tb, dilation=dilation).transpose(1, 2)
    y = rb.conv1d(x, w, b, dilation, pad_left, pad_right)
    assert rel_err(y, ty.detach().numpy()) < TORCH_TOL
    dy = r(rng, *y.shape)
    got = rb.conv1d_backward(x, w, dy, dilation, pad_left, pad_right)
    for g, want in zip(got, grads_of(ty, dy, tx, tw, tb)):
        assert rel_err(g, want) < TORCH_TOL
    dglu = r(rng, *y.shape[:-1], 3)
    ty = t64(y)
    assert rel_err(rb.glu_backward(y, dglu), grads_of(F.glu(ty, dim=-1), dglu, ty)[0]) < TORCH_TOL


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("kind", list(RECURRENT))
@pytest.mark.parametrize("n", [1, 37])
def test_torch_recurrent(rng, kind, n):
    torch = _torch()
    b, i, hid = 2, 4, 5
    args = recurrent_inputs(rng, kind, b, n, i, hid)
    cell = RECURRENT[kind][1]
    if kind.startswith("rnn"):
        net = torch.nn.RNN(i, hid, batch_first=True, nonlinearity=kind[4:])
    else:
        net = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](i, hid, batch_first=True)
    net = net.double()
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    with torch.no_grad():
        for name, w in zip(names, args[-4:]):
            getattr(net, name).copy_(torch.from_numpy(w))
    tx, th0 = t64(args[0]), t64(args[1][None])
    state = (th0, t64(args[2][None])) if cell else th0
    tout, tstate = net(tx, state)
    tstates = tstate if cell else (tstate,)
    *outs, saved = recurrent_forward(kind)[1](*args)
    assert rel_err(outs[0], tout.detach().numpy()) < TORCH_TOL
    cotangents = tuple(r(rng, *o.shape) for o in outs)
    inputs = (tx, th0) + ((state[1],) if cell else ()) + tuple(getattr(net, nm) for nm in names)
    want = torch.autograd.grad((tout,) + tuple(tstates), inputs,
                               tuple(torch.from_numpy(c if j == 0 else c[None]) for j, c in enumerate(cotangents)))
    got = recurrent_forward(kind)[2](saved, *cotangents)
    for g, w in zip(got, want):
        assert rel_err(g, w.numpy().reshape(g.shape)) < TORCH_TOL
