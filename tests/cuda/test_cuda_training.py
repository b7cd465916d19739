"""Training on backend="cuda" under the simulator: dropout's counter-based masks, the Adam step,
gradient accumulation, and the training API (``tfm.vjp``, ``loss_and_grad``, ``train_step``)
against the float64 reference and the CPU backend's loss trajectory."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, randn, rel_err

import tfm
import tfm.layers
from tfm import reference as ref
from tfm.backends.cuda import CudaBackend
from tfm.backends.cuda._launch import Tuning
from tfm.models import ConvS2S, LSTMSeq2Seq, Transformer


# ---------------------------------------------------------------------- elementwise ops
@pytest.mark.parametrize("p", [0.1, 0.5, 1 / 3, 0.3, 0.9999999])
def test_dropout_masks_are_bit_identical_to_the_reference_and_cpu(bk, rng, p):
    """Element i is kept iff dropout_uniform(seed, offset + i) >= p, compared as integers (p =
    0.3 rounds in float32: a float32 comparison would differ); the kept values are the CPU
    backend's, bit for bit."""
    cpu = tfm.get_backend("cpu")
    x = randn(rng, 3, 37, 5)
    x[x == 0] = 1.0
    for seed, offset in ((0, 0), (2**64 - 1, 7), (12345, 2**40 + 3)):
        got = bk.to_numpy(bk.dropout(bk.asarray(x), p, seed, offset))
        np.testing.assert_array_equal(got != 0, ref.dropout_keep(x.shape, p, seed, offset))
        np.testing.assert_array_equal(got, cpu.dropout(x, p, seed, offset))
        assert rel_err(got, ref.dropout(x, p, seed, offset)) < TOL[np.float32]


def test_dropout_edges_and_errors(bk, rng):
    x = randn(rng, 4, 9)
    np.testing.assert_array_equal(bk.to_numpy(bk.dropout(bk.asarray(x), 0.0, 3)), x)
    np.testing.assert_array_equal(bk.to_numpy(bk.dropout(bk.asarray(x), 1.0, 3)), np.zeros_like(x))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        bk.dropout(bk.asarray(x), 1.5, 3)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        bk.dropout(bk.asarray(x), 0.1, 3, -1)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\^64\)"):
        bk.dropout(bk.asarray(x), 0.1, 2**64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_steps_in_place_match_the_reference(bk, rng, dtype, weight_decay):
    param, m, v = randn(rng, 7, 5, dtype=dtype), np.zeros((7, 5), dtype), np.zeros((7, 5), dtype)
    dp, dm, dv = bk.asarray(param), bk.asarray(m), bk.asarray(v)
    want = (param.astype(np.float64), m.astype(np.float64), v.astype(np.float64))
    for step in (1, 2, 3):
        grad = randn(rng, 7, 5, dtype=dtype)
        bk.adam_step(dp, bk.asarray(grad), dm, dv, step, 1e-2, 0.9, 0.98, 1e-9, weight_decay)
        want = ref.adam_step(*want[:1], grad, *want[1:], step, 1e-2, 0.9, 0.98, 1e-9, weight_decay)
    for got, exp in zip((dp, dm, dv), want):
        assert rel_err(bk.to_numpy(got), exp) < (1e-6 if dtype == np.float32 else 1e-12)
    with pytest.raises(ValueError, match="same shape"):
        bk.adam_step(dp, bk.asarray(randn(rng, 5, 7, dtype=dtype)), dm, dv, 1, 1e-2, 0.9, 0.98, 1e-9)


def test_axpy_and_zeros(bk, rng):
    a, b = randn(rng, 3, 11), randn(rng, 3, 11)
    da = bk.asarray(a)
    bk.axpy(da, bk.asarray(b), -0.5)
    assert rel_err(bk.to_numpy(da), a.astype(np.float64) - 0.5 * b) < TOL[np.float32]
    z = bk.zeros((2, 3, 4), np.float64)
    assert not isinstance(z, np.ndarray) and np.array_equal(bk.to_numpy(z), np.zeros((2, 3, 4)))
    assert bk.to_numpy(z).dtype == np.float64
    full = bk.asarray(np.zeros((6, 4), np.float32))
    bk.axpy(full[2:], bk.asarray(np.ones((4, 4), np.float32)))  # a row block, as a layer accumulates
    assert np.array_equal(bk.to_numpy(full), np.r_[np.zeros((2, 4)), np.ones((4, 4))])


# ---------------------------------------------------------------------- the training API
def test_vjp_of_attention_keeps_device_arrays_on_the_device(bk, rng):
    q, k, v = randn(rng, 1, 3, 7, 4), randn(rng, 1, 3, 9, 4), randn(rng, 1, 3, 9, 5)
    mask = rng.random((1, 1, 1, 9)) > 0.3
    mask[..., :2] = True
    dout = randn(rng, 1, 3, 7, 5)
    for impl in ("fused", "naive"):
        out, pullback = tfm.vjp(tfm.attention, *(bk.asarray(a) for a in (q, k, v)), mask=bk.asarray(mask),
                                causal=True, impl=impl, backend="cuda")
        assert not isinstance(out, np.ndarray)
        grads, params = pullback(bk.asarray(dout))
        assert params == {} and not any(isinstance(g, np.ndarray) for g in grads)
        w_out, w_lse = ref.scaled_dot_product_attention_train(q, k, v, mask=mask, causal=True)
        want = ref.scaled_dot_product_attention_backward(q, k, v, w_out, w_lse, dout, mask=mask, causal=True)
        for g, e in zip(grads, want):
            assert rel_err(bk.to_numpy(g), e) < TOL[np.float32]


def test_vjp_of_a_cross_attention_layer_with_padding(rng):
    kw = dict(seed=4)
    layer = tfm.layers.MultiHeadAttention(12, 3, backend="cuda", **kw)
    oracle = tfm.layers.MultiHeadAttention(12, 3, backend="numpy", dtype="float64", **kw)
    x, memory, dy = randn(rng, 2, 5, 12), randn(rng, 2, 7, 12), randn(rng, 2, 5, 12)
    pad = np.zeros((2, 7), bool)
    pad[1, 5:] = True
    out, pullback = tfm.vjp(layer, x, memory, key_padding_mask=pad)
    want_out, want_pullback = tfm.vjp(oracle, x.astype(np.float64), memory.astype(np.float64), key_padding_mask=pad)
    assert rel_err(out, want_out) < 1e-5
    (dx, dmem), grads = pullback(dy)
    (wx, wmem), wgrads = want_pullback(dy.astype(np.float64))
    assert rel_err(tfm.get_backend("cuda").to_numpy(dx), wx) < 1e-5
    assert rel_err(tfm.get_backend("cuda").to_numpy(dmem), wmem) < 1e-5
    assert sorted(grads) == sorted(wgrads)
    for name in grads:
        assert rel_err(grads[name], wgrads[name]) < 1e-5, name


def _tiny(**overrides):
    return tfm.TransformerConfig(**{"d_model": 12, "n_heads": 3, "d_ff": 20, "n_encoder_layers": 1,
                                    "n_decoder_layers": 1, "src_vocab": 11, "tgt_vocab": 13, "max_len": 32,
                                    **overrides})


def _batch(rng, cfg, b=2, ns=6, nt=5):
    src, tgt = rng.integers(2, cfg.src_vocab, (b, ns)), rng.integers(2, cfg.tgt_vocab, (b, nt))
    src_pad, tgt_pad = np.zeros((b, ns), bool), np.zeros((b, nt), bool)
    src_pad[1, ns - 2:] = True
    tgt_pad[0, nt - 1:] = True
    return src, tgt, src_pad, tgt_pad


@pytest.mark.parametrize("overrides,impl", [({"dropout": 0.1}, "fused"),
                                            ({"norm": "pre", "activation": "gelu", "final_norm": True,
                                              "tie_embeddings": True}, "naive")])
def test_transformer_loss_and_grad_match_the_reference(rng, overrides, impl):
    cfg = _tiny(**overrides)
    model = Transformer(cfg, seed=5, backend="cuda", impl=impl).train(seed=9)
    oracle = Transformer.from_params(cfg, model.params, backend="numpy").train(seed=9)  # the same masks
    src, tgt, src_pad, tgt_pad = _batch(rng, cfg)
    kw = dict(label_smoothing=0.1, src_pad_mask=src_pad, tgt_pad_mask=tgt_pad)
    loss, grads = model.loss_and_grad(src, tgt, **kw)
    want_loss, want_grads = oracle.loss_and_grad(src, tgt, **kw)
    assert abs(loss - want_loss) < 1e-5 * abs(want_loss)
    assert sorted(grads) == sorted(want_grads)
    for name, g in grads.items():
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        assert rel_err(g, want_grads[name]) < 1e-4, name


def test_train_steps_follow_the_cpu_backends_trajectory(rng):
    """A few paper-recipe steps (Adam, noam warm-up, label smoothing, dropout) from the same
    weights on the same batches: the cuda and cpu backends' losses agree step by step."""
    cfg = _tiny(dropout=0.1)
    losses = {}
    for backend in ("cpu", "cuda"):
        model = Transformer(cfg, seed=3, backend=backend)
        opt = tfm.optim.Adam(model, lr=tfm.optim.noam(cfg.d_model, warmup_steps=10))
        batches = np.random.default_rng(1)
        losses[backend] = [model.train_step(opt, *_batch(batches, cfg)[:2], label_smoothing=0.1)
                           for _ in range(4)]
        if backend == "cpu":
            cpu_params = model.params
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-5)
    assert losses["cuda"][-1] != losses["cuda"][0]  # the weights moved
    for name, p in model.params.items():
        # not the attention biases: the key bias's gradient is zero in exact arithmetic (softmax
        # ignores a constant added to every score of a row), so each backend's is rounding
        # noise, which Adam normalises into steps of +-lr with the noise's sign
        if not name.endswith("in_proj_bias"):
            assert rel_err(p, cpu_params[name]) < 1e-4, name


def test_a_training_step_moves_only_the_losses_to_the_host(rng, monkeypatch):
    """One download per step (the (T,) losses); uploads only of host inputs: the token ids (the
    embeddings and their backward's sorted positions), the padding mask, the targets and their
    weights. Everything else stays on the device."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv import devicearray

    cfg = _tiny(dropout=0.1)
    model = Transformer(cfg, seed=3, backend="cuda")
    opt = tfm.optim.Adam(model, lr=1e-3)
    src, tgt, src_pad, _ = _batch(rng, cfg)
    model.train_step(opt, src, tgt, label_smoothing=0.1, src_pad_mask=src_pad)  # warm the caches
    counts = {"up": 0, "down": 0}
    to_device, copy_to_host = cuda.to_device, devicearray.FakeCUDAArray.copy_to_host

    def up(*a, **k):
        counts["up"] += 1
        return to_device(*a, **k)

    def down(self, *a, **k):
        counts["down"] += 1
        return copy_to_host(self, *a, **k)

    monkeypatch.setattr(cuda, "to_device", up)
    monkeypatch.setattr(devicearray.FakeCUDAArray, "copy_to_host", down)
    model.train_step(opt, src, tgt, label_smoothing=0.1, src_pad_mask=src_pad)
    assert counts == {"up": 7, "down": 1}  # 2 x ids, 2 x sorted positions, 1 mask, targets, weights


@pytest.mark.parametrize("make", [
    lambda bk, dt: LSTMSeq2Seq(tfm.LSTMSeq2SeqConfig.tiny(d_model=8, n_layers=1, src_vocab=11, tgt_vocab=9,
                                                          dtype=dt), seed=2, backend=bk),
    lambda bk, dt: ConvS2S(tfm.ConvS2SConfig.tiny(d_model=8, n_layers=1, src_vocab=11, tgt_vocab=9, dtype=dt),
                           seed=2, backend=bk),
], ids=["lstm_seq2seq", "convs2s"])
def test_baseline_models_loss_and_grad_match_the_reference(rng, make):
    model, oracle = make("cuda", "float32"), make("numpy", "float64")
    oracle.load_state_dict(model.params)
    src, tgt = rng.integers(0, 11, (2, 5)), rng.integers(0, 9, (2, 4))
    loss, grads = model.loss_and_grad(src, tgt, label_smoothing=0.1)
    want_loss, want_grads = oracle.loss_and_grad(src, tgt, label_smoothing=0.1)
    assert abs(loss - want_loss) < 1e-5 * abs(want_loss)
    for name, g in grads.items():
        assert rel_err(g, want_grads[name]) < 1e-4, name


def test_a_training_step_at_the_gpu_default_tilings(rng):
    """The H100/H200 tiles (not the simulator's toy ones) through a whole training step."""
    cfg = _tiny(dropout=0.1)
    bk = CudaBackend(tuning=Tuning(), gemm="numba")
    model = Transformer(cfg, seed=5, backend=bk).train(seed=9)
    oracle = Transformer.from_params(cfg, model.params, backend="numpy").train(seed=9)
    src, tgt, src_pad, tgt_pad = _batch(rng, cfg)
    loss, grads = model.loss_and_grad(src, tgt, label_smoothing=0.1, src_pad_mask=src_pad)
    want_loss, want_grads = oracle.loss_and_grad(src, tgt, label_smoothing=0.1, src_pad_mask=src_pad)
    assert abs(loss - want_loss) < 1e-5 * abs(want_loss)
    for name, g in grads.items():
        assert rel_err(g, want_grads[name]) < 1e-4, name
