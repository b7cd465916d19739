"""Training: ``loss``/``loss_and_grad``/``train_step``, ``tfm.optim.Adam`` and ``noam``, dropout,
trained weights reaching ``params``, parity with PyTorch over 30 Adam steps, a tiny
Transformer learning to copy, and every bad input of the training API."""

from __future__ import annotations

import numpy as np
import pytest

import tfm
from tfm.layers import Linear

from conftest import HAVE_TORCH, rel_err, requires_torch
from gradtools import randomise, sampled_error

if HAVE_TORCH:
    import torch

    from torch_models import TorchTransformer, load_tfm_params, teacher_forcing_loss


def padding(rng, b, n, low=1):
    """(B, N) True = padding, each row keeping >= ``low`` positions."""
    return np.arange(n)[None, :] >= rng.integers(low, n + 1, size=b)[:, None]


def _transformer_config(**kw):
    return tfm.TransformerConfig.tiny(**{"d_model": 16, "n_heads": 2, "d_ff": 24, "src_vocab": 17, "tgt_vocab": 19,
                                         "max_len": 24, **kw})


def _baseline_config(config_class, **kw):
    return config_class.tiny(**{"d_model": 8, "src_vocab": 17, "tgt_vocab": 19, "max_len": 24, **kw})


MODELS = {
    "transformer": lambda **kw: tfm.Transformer(_transformer_config(**kw), seed=1, backend="numpy"),
    "transformer-pre-tied": lambda **kw: tfm.Transformer(_transformer_config(norm="pre", tie_embeddings=True, **kw),
                                                         seed=1, backend="numpy"),
    "lstm-seq2seq": lambda **kw: tfm.LSTMSeq2Seq(_baseline_config(tfm.LSTMSeq2SeqConfig, **kw), seed=1,
                                                 backend="numpy"),
    "convs2s": lambda **kw: tfm.ConvS2S(_baseline_config(tfm.ConvS2SConfig, **kw), seed=1, backend="numpy"),
}


def _batch(rng, b=3, ns=6, nt=5):
    return (rng.integers(0, 17, (b, ns)), rng.integers(0, 19, (b, nt)),
            dict(src_pad_mask=padding(rng, b, ns), tgt_pad_mask=padding(rng, b, nt, low=2)))


# ---------------------------------------------------------------------- loss and its gradient
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_and_grad_central_differences(rng, name):
    """The loss's gradient, with label smoothing and both padding masks, for every parameter."""
    model = randomise(MODELS[name](dtype="float64"), rng)
    src, tgt, pads = _batch(rng)
    loss, grads = model.loss_and_grad(src, tgt, label_smoothing=0.1, **pads)
    assert loss == pytest.approx(model.loss(src, tgt, label_smoothing=0.1, **pads), rel=1e-12)
    assert set(grads) == set(model.params)
    params = {k: v.copy() for k, v in model.params.items()}
    errors = {}
    for pname, p in params.items():
        def f(value, pname=pname):
            model.load_state_dict({**params, pname: value})
            return np.array(model.loss(src, tgt, label_smoothing=0.1, **pads))
        errors[pname] = sampled_error(f, [p], 0, np.array(1.0), grads[pname], rng)
    model.load_state_dict(params)
    assert max(errors.values()) < 1e-6, max(errors.items(), key=lambda kv: kv[1])


@requires_torch
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_loss_is_pytorchs_cross_entropy(rng, label_smoothing):
    """Mean over non-padding targets of F.cross_entropy(label_smoothing=...) on the logits."""
    model = MODELS["lstm-seq2seq"](dtype="float64")
    src, tgt, pads = _batch(rng, b=4, nt=7)
    logits = model.forward(src, tgt[:, :-1])
    labels = tgt[:, 1:].copy()
    labels[pads["tgt_pad_mask"][:, 1:]] = -100
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits.reshape(-1, 19)), torch.tensor(labels.ravel()),
                                                 label_smoothing=label_smoothing).item()
    got = model.loss(src, tgt, label_smoothing=label_smoothing, tgt_pad_mask=pads["tgt_pad_mask"])
    assert got == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------- the optimiser
def test_noam_is_section_5_3():
    lr = tfm.optim.noam(512)
    assert lr(1) == pytest.approx(512 ** -0.5 * 4000 ** -1.5)
    assert lr(4000) == pytest.approx(512 ** -0.5 * 4000 ** -0.5)  # the peak, end of warm-up
    assert lr(16000) == pytest.approx(512 ** -0.5 * 16000 ** -0.5)
    assert max(range(1, 10000), key=lr) == 4000
    assert repr(tfm.optim.noam(64, warmup_steps=10)) == "noam(d_model=64, warmup_steps=10)"


@requires_torch
@pytest.mark.parametrize("backend,dtype", [("numpy", "float64"), ("cpu", "float32")])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_makes_torchs_updates(rng, backend, dtype, weight_decay):
    layer = randomise(Linear(5, 3, backend=backend, dtype=dtype), rng)
    params = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in layer.params.items()}
    lr = tfm.optim.noam(5, warmup_steps=3)
    opt = tfm.optim.Adam(layer, lr, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
    topt = torch.optim.Adam(params.values(), lr=1.0, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda e: lr(e + 1))
    for _ in range(6):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in layer.params.items()}
        try:
            opt.step(grads)
        except NotImplementedError as exc:
            pytest.skip(f"{backend} backend: {exc}")
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        topt.step()
        sched.step()
    tol = 1e-13 if dtype == "float64" else 1e-6
    for k, p in params.items():
        assert rel_err(layer.params[k], p.detach().numpy()) < tol, k
    assert opt.steps == 6


# ---------------------------------------------------------------------- training
def test_train_step_updates_params_and_what_the_model_computes(rng):
    """After training, params (what save writes) hold the trained weights, and every derived
    backend array (ConvS2S's folded weights, LSTMSeq2Seq's blocks) follows them."""
    for name in ("convs2s", "lstm-seq2seq", "transformer"):
        model = MODELS[name](dtype="float64")
        before = {k: v.copy() for k, v in model.params.items()}
        opt = tfm.optim.Adam(model, lr=1e-2)
        src, tgt, _ = _batch(rng)
        losses = [model.train_step(opt, src, tgt) for _ in range(3)]
        assert losses[-1] < losses[0], name
        after = model.params
        assert all(not np.array_equal(after[k], before[k]) for k in before), name
        fresh = type(model).from_params(model.config, after, backend="numpy")
        np.testing.assert_allclose(model.forward(src, tgt), fresh.forward(src, tgt), rtol=1e-12, atol=1e-12)
        assert model.loss(src, tgt) == pytest.approx(fresh.loss(src, tgt), rel=1e-12)


def test_trained_weights_save_and_move(rng, tmp_path):
    model = MODELS["convs2s"](dtype="float64")  # folded weights: save must write the parameters
    opt = tfm.optim.Adam(model, lr=1e-2)
    src, tgt, _ = _batch(rng)
    model.train_step(opt, src, tgt)
    loaded = tfm.ConvS2S.load(model.save(tmp_path / "trained"), backend="numpy")
    np.testing.assert_array_equal(loaded.forward(src, tgt), model.forward(src, tgt))
    model = MODELS["transformer"](dtype="float64")
    opt = tfm.optim.Adam(model, lr=1e-2)
    model.train_step(opt, src, tgt)
    expected = model.forward(src, tgt)
    model.backend = "cpu"  # the newest weights move
    np.testing.assert_allclose(model.forward(src, tgt), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="moved from backend 'numpy' to 'cpu'"):
        model.train_step(opt, src, tgt)


@requires_torch
@pytest.mark.parametrize("backend,dtype,tol", [
    ("numpy", "float64", 1e-12),
    # float32: each step's loss within 1e-5 (relative) of PyTorch's float32 run. Measured: at
    # most 1.2e-7 over the 30 steps (the roundings of two float32 implementations; Adam's
    # normalised steps do not amplify them at these learning rates).
    ("cpu", "float32", 1e-5),
])
def test_training_follows_pytorch_step_by_step(backend, dtype, tol):
    """30 Adam steps with the noam schedule, label smoothing and padding, from the same
    weights on the same batches, dropout off: the two loss curves agree step by step."""
    torch.set_num_threads(2)
    cfg = _transformer_config(final_norm=True, dtype=dtype)
    model = tfm.Transformer(cfg, seed=0, backend=backend)
    net = TorchTransformer(cfg)
    load_tfm_params(net, model.params)
    schedule = tfm.optim.noam(cfg.d_model, warmup_steps=10)
    opt = tfm.optim.Adam(model, lr=schedule)
    topt = torch.optim.Adam(net.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda e: schedule(e + 1))
    rng = np.random.default_rng(0)
    ours, theirs = [], []
    for _ in range(30):
        src, tgt, pads = _batch(rng, b=4, ns=7, nt=6)
        try:
            ours.append(model.train_step(opt, src, tgt, label_smoothing=0.1, **pads))
        except NotImplementedError as exc:
            pytest.skip(f"{backend} backend: {exc}")
        topt.zero_grad()
        loss = teacher_forcing_loss(net, torch.tensor(src), torch.tensor(tgt), torch.tensor(pads["src_pad_mask"]),
                                    torch.tensor(pads["tgt_pad_mask"]), label_smoothing=0.1)
        loss.backward()
        topt.step()
        sched.step()
        theirs.append(loss.item())
    ours, theirs = np.array(ours), np.array(theirs)
    assert ours[-5:].mean() < ours[:5].mean()  # it learns something
    np.testing.assert_allclose(ours, theirs, rtol=tol)


def test_a_tiny_transformer_learns_to_copy():
    """Copying 8 tokens (vocabulary of 10 plus bos and an unused pad id): 100% token accuracy
    under greedy decoding on 64 unseen sequences within 600 steps of batch 32 (measured: 400)."""
    rng = np.random.default_rng(0)
    vocab, n, batch = 12, 8, 32
    cfg = tfm.TransformerConfig.tiny(d_model=32, n_heads=4, d_ff=64, src_vocab=vocab, tgt_vocab=vocab, max_len=16,
                                     dtype="float32")
    model = tfm.Transformer(cfg, seed=0, backend="numpy")
    opt = tfm.optim.Adam(model, lr=tfm.optim.noam(32, warmup_steps=100))
    test_src = np.random.default_rng(1).integers(2, vocab, (64, n))
    accuracy = 0.0
    for step in range(1, 601):
        src = rng.integers(2, vocab, (batch, n))
        model.train_step(opt, src, np.concatenate([np.ones((batch, 1), np.int64), src], axis=1))
        if step % 50 == 0:
            accuracy = (model.generate(test_src, max_new_tokens=n, bos_id=1)[:, 1:] == test_src).mean()
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"token accuracy {accuracy} after {step} steps"


# ---------------------------------------------------------------------- dropout
def test_dropout_is_reproducible_and_only_in_training_mode(rng):
    src, tgt, pads = _batch(rng)
    runs = []
    for _ in range(2):
        model = MODELS["transformer"](dropout=0.3, dtype="float64")
        opt = tfm.optim.Adam(model, lr=1e-3)
        runs.append([model.train_step(opt, src, tgt, **pads) for _ in range(3)])
    assert runs[0] == runs[1]  # the same seed, the same calls: the same masks
    plain = MODELS["transformer"](dtype="float64")
    model = MODELS["transformer"](dropout=0.3, dtype="float64")
    assert model.training and model.loss(src, tgt, **pads) != plain.loss(src, tgt, **pads)
    assert model.loss(src, tgt, **pads) != model.loss(src, tgt, **pads)  # the stream moves on
    model.eval()
    assert not any(m.training for m in model.modules())
    assert model.loss(src, tgt, **pads) == plain.loss(src, tgt, **pads)
    model.train(seed=7)
    first = model.loss(src, tgt, **pads)
    model.train(seed=7)
    assert model.loss(src, tgt, **pads) == first
    np.testing.assert_array_equal(model.forward(src, tgt), plain.forward(src, tgt))  # inference never drops


def test_dropout_gradient_central_differences(rng):
    """With the stream restarted before every call, the loss is a fixed function of the
    weights (the same masks) and its gradient is what loss_and_grad returns."""
    for name in ("transformer", "lstm-seq2seq", "convs2s"):
        model = randomise(MODELS[name](dropout=0.25, dtype="float64"), rng)
        src, tgt, pads = _batch(rng)
        model.train(seed=3)
        loss, grads = model.loss_and_grad(src, tgt, **pads)
        params = {k: v.copy() for k, v in model.params.items()}
        for pname in list(params)[::3]:
            def f(value, pname=pname):
                model.load_state_dict({**params, pname: value})
                model.train(seed=3)
                return np.array(model.loss(src, tgt, **pads))
            assert sampled_error(f, [params[pname]], 0, np.array(1.0), grads[pname], rng) < 1e-6, (name, pname)
        model.load_state_dict(params)


def test_dropout_drops_the_embedding_sums_and_scales_the_rest(rng):
    emb = tfm.TransformerEmbedding(50, 64, dropout=0.4, backend="numpy")
    ids = rng.integers(0, 50, (8, 40))
    clean = emb.eval()(ids)
    out, pullback = tfm.vjp(emb.train(), ids)
    dropped = out == 0
    assert 0.35 < dropped.mean() < 0.45
    np.testing.assert_allclose(out[~dropped], clean[~dropped] / 0.6, rtol=1e-12)
    _, grads = pullback(np.ones_like(out))  # the gradient goes through the same mask
    expected = np.zeros((50, 64))
    np.add.at(expected, ids, np.where(dropped, 0.0, 8.0 / 0.6))
    np.testing.assert_allclose(grads["weight"], expected, rtol=1e-12)


# ---------------------------------------------------------------------- bad input
def test_bad_learning_rates_and_options():
    layer = Linear(3, 2, backend="numpy")
    for lr in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning rate must be a finite number > 0"):
            tfm.optim.Adam(layer, lr=lr)
    with pytest.raises(TypeError, match="learning rate must be a number"):
        tfm.optim.Adam(layer, lr="fast")
    opt = tfm.optim.Adam(layer, lr=lambda step: 0.1 - 0.1 * step)  # 0 at step 1
    with pytest.raises(ValueError, match="learning rate at step 1 must be a finite number > 0, got 0.0"):
        opt.step({k: np.zeros_like(v) for k, v in layer.params.items()})
    assert opt.steps == 0
    with pytest.raises(ValueError, match="beta2 must be a number in"):
        tfm.optim.Adam(layer, lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        tfm.optim.Adam(layer, lr=1e-3, weight_decay=-1)
    with pytest.raises(TypeError, match="Adam optimises a tfm module"):
        tfm.optim.Adam([np.zeros(3)], lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        tfm.optim.noam(512, warmup_steps=0)


def test_bad_gradients_for_step():
    layer = Linear(3, 2, backend="numpy")
    opt = tfm.optim.Adam(layer, lr=1e-3)
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \['extra'\]"):
        opt.step({"weight": np.zeros((2, 3)), "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"the gradient of 'bias' has shape \(3,\), the parameter \(2,\)"):
        opt.step({"weight": np.zeros((2, 3)), "bias": np.zeros(3)})


def test_bad_training_input(rng):
    model = MODELS["transformer"](dtype="float64")
    src, tgt, _ = _batch(rng)
    with pytest.raises(ValueError, match="tgt_ids holds token id 19 outside the vocabulary"):
        model.loss(src, np.array([[1, 19], [2, 3], [4, 5]]))
    with pytest.raises(ValueError, match="tgt_ids must have at least 2 positions"):
        model.loss(src, tgt[:, :1])
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        model.loss(src, tgt, label_smoothing=1.5)
    with pytest.raises(ValueError, match="every predicted position"):
        model.loss(src, tgt, tgt_pad_mask=np.arange(5)[None].repeat(3, 0) >= 1)
    with pytest.raises(ValueError, match="tgt_pad_mask must have shape"):
        model.loss(src, tgt, tgt_pad_mask=np.zeros((3, 4), bool))
    other = MODELS["transformer"](dtype="float64")
    with pytest.raises(TypeError, match="optimizer must be a tfm.optim.Adam built for this model"):
        model.train_step(tfm.optim.Adam(other, lr=1e-3), src, tgt)
    with pytest.raises(ValueError, match="dropout must be a probability in"):
        _transformer_config(dropout=1.0)


def test_a_nan_loss_stops_the_step_and_keeps_the_weights(rng):
    model = MODELS["transformer"](dtype="float64")
    opt = tfm.optim.Adam(model, lr=1e-3)
    src, tgt, _ = _batch(rng)
    model.train_step(opt, src, tgt)
    params = {k: v.copy() for k, v in model.params.items()}
    params["generator.weight"][3, 0] = np.inf  # every logit of token 3 turns inf or nan
    model.load_state_dict(params)
    with pytest.raises(FloatingPointError, match="the loss is nan at step 2: the step was not taken"), \
            np.errstate(invalid="ignore"):
        model.train_step(opt, src, tgt)
    assert opt.steps == 1
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, params[k])
