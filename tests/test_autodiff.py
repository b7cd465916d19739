"""``tfm.vjp`` on every function, layer and model of the Transformer path, checked three ways:
float64 central differences on the numpy reference backend, the cpu backend against the
reference (float32 and float64), and PyTorch autograd on modules converted by
``tfm.from_torch``; and every bad input of the API.

Sizes are awkward on purpose: n = 1 and 37, Nq != Nk, d_v != d_k, three heads, padding
that leaves some queries with no visible key at all.
"""

from __future__ import annotations

import numpy as np
import pytest

import tfm
from tfm.layers import (Decoder, DecoderLayer, Embedding, Encoder, EncoderLayer, FeedForward, LayerNorm,
                        Linear, MultiHeadAttention, ResidualNorm, TransformerEmbedding)

from conftest import HAVE_TORCH, rel_err, requires_torch
from gradtools import backend_errors, central_difference_errors, randomise, sampled_error, vjp_grads, worst

if HAVE_TORCH:
    import torch
    import torch.nn as nn

# Central differences in float64 reach ~1e-9 relative; a wrong formula is off by O(1).
CD_TOL = 1e-6
# cpu backend against the float64 reference: a backward chains a few more kernels than the
# forward, and float32 gradients of whole models sum over every position.
GRAD_TOL = {"float32": 3e-4, "float64": 1e-9}


def padding(rng, b, n, empty_row=False):
    """(B, N) True = padding; each row keeps >= 2 positions (one visible key would make the
    queries' gradient exactly zero, and the cpu-against-reference error one of rounding
    noise) unless ``empty_row`` pads all of row 0."""
    pad = np.arange(n)[None, :] >= rng.integers(min(2, n), n + 1, size=b)[:, None]
    if empty_row:
        pad[0] = True
    return pad


def x(rng, *shape):
    return rng.standard_normal(shape)


# ---------------------------------------------------------------------- the cases
# name -> (build(backend, dtype) -> module with non-trivial weights, inputs(rng) -> (args, kwargs))
def _layer(cls, *a, **kw):
    def build(backend, dtype, rng):
        return randomise(cls(*a, **kw, seed=3, backend=backend, dtype=dtype), rng)
    return build


def _stack_inputs(rng, b=2, n=5, d=9, memory_n=None, causal=False, pad=True, empty_row=False):
    args = [x(rng, b, n, d)]
    kwargs = {}
    if memory_n is None:
        kwargs = {"src_key_padding_mask": padding(rng, b, n, empty_row) if pad else None, "causal": causal}
    else:
        args.append(x(rng, b, memory_n, d))
        kwargs = {"memory_key_padding_mask": padding(rng, b, memory_n, empty_row) if pad else None}
    return args, kwargs


CASES = {
    "linear": (_layer(Linear, 5, 7), lambda rng: ([x(rng, 2, 3, 5)], {})),
    "linear-no-bias": (_layer(Linear, 5, 4, bias=False), lambda rng: ([x(rng, 1, 1, 5)], {})),
    "ffn-relu-n37": (_layer(FeedForward, 6, 11), lambda rng: ([x(rng, 2, 37, 6)], {})),
    "ffn-gelu": (_layer(FeedForward, 6, 11, "gelu"), lambda rng: ([x(rng, 2, 4, 6)], {})),
    "layer-norm": (_layer(LayerNorm, 7), lambda rng: ([x(rng, 2, 3, 7)], {})),
    "mha-self-causal-padded": (_layer(MultiHeadAttention, 9, 3),
                               lambda rng: ([x(rng, 3, 6, 9)], {"key_padding_mask": padding(rng, 3, 6, True),
                                                                "causal": True})),
    "mha-self-n1": (_layer(MultiHeadAttention, 6, 2), lambda rng: ([x(rng, 2, 1, 6)], {})),
    "mha-cross-nq-ne-nk": (_layer(MultiHeadAttention, 9, 3),
                           lambda rng: ([x(rng, 2, 4, 9), x(rng, 2, 7, 9)],
                                        {"key_padding_mask": padding(rng, 2, 7, True)})),
    "embedding": (_layer(Embedding, 11, 5), lambda rng: ([rng.integers(0, 11, (3, 7))], {})),
    "transformer-embedding": (_layer(TransformerEmbedding, 13, 6, max_len=20),
                              lambda rng: ([rng.integers(0, 13, (2, 5))], {"offset": 3})),
    "encoder-layer-post-relu": (_layer(EncoderLayer, 9, 3, 10),
                                lambda rng: _stack_inputs(rng, empty_row=True)),
    "encoder-layer-pre-gelu-causal": (_layer(EncoderLayer, 9, 3, 10, "gelu", "pre"),
                                      lambda rng: _stack_inputs(rng, causal=True)),
    "decoder-layer-post": (_layer(DecoderLayer, 9, 3, 10), lambda rng: _stack_inputs(rng, memory_n=7)),
    "decoder-layer-pre-gelu": (_layer(DecoderLayer, 9, 3, 10, "gelu", "pre"),
                               lambda rng: _stack_inputs(rng, n=1, memory_n=4, empty_row=True)),
    "encoder-final-norm": (_layer(Encoder, 2, 6, 2, 8, final_norm=True), lambda rng: _stack_inputs(rng, d=6)),
    "decoder-final-norm-pre": (_layer(Decoder, 2, 6, 2, 8, norm="pre", final_norm=True),
                               lambda rng: _stack_inputs(rng, d=6, memory_n=3)),
}


def _residual_norm(norm):
    def build(backend, dtype, rng):
        unit = randomise(ResidualNorm(7, norm, seed=1, backend=backend, dtype=dtype), rng)
        unit.ff = randomise(FeedForward(7, 5, seed=2, backend=backend, dtype=dtype), rng)
        return unit
    return build


def _residual_inputs(rng, unit):
    return [x(rng, 2, 3, 7), unit.ff], {}


def _config(**kw):
    return tfm.TransformerConfig.tiny(d_model=9, n_heads=3, d_ff=10, n_encoder_layers=2, n_decoder_layers=1,
                                      src_vocab=11, tgt_vocab=13, max_len=40, **kw)


def _encoder_decoder(norm, activation):
    def build(backend, dtype, rng):
        cfg = _config(norm=norm, activation=activation, final_norm=True, dtype=dtype)
        return randomise(tfm.EncoderDecoder(cfg, seed=4, backend=backend), rng)
    return build


def _encoder_decoder_inputs(rng):
    b, ns, nt = 2, 5, 4
    return [x(rng, b, ns, 9), x(rng, b, nt, 9)], {
        "src_key_padding_mask": padding(rng, b, ns), "tgt_key_padding_mask": padding(rng, b, nt),
        "memory_key_padding_mask": padding(rng, b, ns)}


def _transformer(**kw):
    def build(backend, dtype, rng):
        return randomise(tfm.Transformer(_config(dtype=dtype, **kw), seed=5, backend=backend), rng)
    return build


def _transformer_inputs(log_probs=False):
    def inputs(rng):
        src, tgt = rng.integers(0, 11, (2, 6)), rng.integers(0, 13, (2, 4))
        return [src, tgt], {"src_pad_mask": padding(rng, 2, 6), "tgt_pad_mask": padding(rng, 2, 4),
                            "log_probs": log_probs}
    return inputs


CASES.update({
    "encoder-decoder-post-relu": (_encoder_decoder("post", "relu"), _encoder_decoder_inputs),
    "encoder-decoder-pre-gelu": (_encoder_decoder("pre", "gelu"), _encoder_decoder_inputs),
    "transformer": (_transformer(), _transformer_inputs()),
    "transformer-tied-pre-log-probs": (_transformer(tie_embeddings=True, norm="pre", final_norm=True),
                                       _transformer_inputs(log_probs=True)),
})


def _recurrent_inputs(b, n, i, h, layers, states):
    def inputs(rng):
        args = [x(rng, b, n, i)] + [x(rng, layers, b, h) for _ in range(states)]
        return args, {}
    return inputs


def _baseline(model, config, **kw):
    def build(backend, dtype, rng):
        cfg = config.tiny(d_model=6, src_vocab=7, tgt_vocab=9, max_len=12, dtype=dtype, **kw)
        return randomise(model(cfg, seed=2, backend=backend), rng)
    return build


CASES.update({
    "rnn-tanh-2-layers-h0": (_layer(tfm.RNN, 4, 5, 2), _recurrent_inputs(2, 6, 4, 5, 2, 1)),
    "rnn-relu-no-bias-n1": (_layer(tfm.RNN, 3, 4, 1, nonlinearity="relu", bias=False),
                            _recurrent_inputs(1, 1, 3, 4, 1, 0)),
    "lstm-3-layers-h0-c0": (_layer(tfm.LSTM, 4, 5, 3), _recurrent_inputs(2, 7, 4, 5, 3, 2)),
    "lstm-n37": (_layer(tfm.LSTM, 3, 4, 1), _recurrent_inputs(1, 37, 3, 4, 1, 0)),
    "gru-2-layers-h0": (_layer(tfm.GRU, 4, 5, 2), _recurrent_inputs(3, 5, 4, 5, 2, 1)),
    "conv1d-dilated-padded": (_layer(tfm.Conv1d, 3, 5, 3, dilation=2, padding=(3, 1)),
                              lambda rng: ([x(rng, 2, 7, 3)], {})),
    "conv1d-valid-no-bias": (_layer(tfm.Conv1d, 4, 2, 2, padding="valid", bias=False),
                             lambda rng: ([x(rng, 1, 37, 4)], {})),
    "conv-stack-dilated-causal": (_layer(tfm.ConvStack, 4, 3, 3, dilated=True, causal=True),
                                  lambda rng: ([x(rng, 2, 9, 4)], {})),
    "conv-stack-same": (_layer(tfm.ConvStack, 3, 2, 2), lambda rng: ([x(rng, 2, 5, 3)], {})),
    "convs2s-block-scaled": (_layer(tfm.ConvS2SBlock, 4, 3, input_scale=0.5), lambda rng: ([x(rng, 2, 6, 4)], {})),
    "convs2s-block-causal": (_layer(tfm.ConvS2SBlock, 4, 5, causal=True, dilation=2),
                             lambda rng: ([x(rng, 1, 1, 4)], {})),
    "lstm-seq2seq": (_baseline(tfm.LSTMSeq2Seq, tfm.LSTMSeq2SeqConfig),
                     lambda rng: ([rng.integers(0, 7, (2, 5)), rng.integers(0, 9, (2, 4))], {})),
    "convs2s": (_baseline(tfm.ConvS2S, tfm.ConvS2SConfig, n_layers=3),
                lambda rng: ([rng.integers(0, 7, (2, 5)), rng.integers(0, 9, (2, 4))], {})),
})
MODULE_CASES = sorted(CASES) + ["residual-norm-post", "residual-norm-pre"]


def _case(name, backend, dtype, rng):
    """(module, args, kwargs) of a case on a backend, inputs drawn from rng."""
    if name.startswith("residual-norm"):
        unit = _residual_norm(name.rsplit("-", 1)[1])(backend, dtype, rng)
        return unit, *_residual_inputs(rng, unit)
    build, inputs = CASES[name]
    module = build(backend, dtype, rng)
    return module, *inputs(rng)


# ---------------------------------------------------------------------- central differences
@pytest.mark.parametrize("name", MODULE_CASES)
def test_module_gradients_central_differences(rng, name):
    module, args, kwargs = _case(name, "numpy", "float64", rng)
    errors = central_difference_errors(module, args, kwargs, rng=rng)
    if name.startswith("residual-norm"):  # the sublayer's parameters come back under "sublayer."
        _, _, _, grads = vjp_grads(module, args, kwargs, rng=rng)
        assert {k for k in grads if k.startswith("sublayer.")} == {f"sublayer.{k}" for k in module.ff.params}
    assert worst(errors)[1] < CD_TOL, worst(errors)


def test_residual_norm_sublayer_gradients_central_differences(rng):
    unit, args, _ = _case("residual-norm-post", "numpy", "float64", rng)
    _, cot, _, grads = vjp_grads(unit, args, rng=rng)
    ff = unit.ff
    params = {k: v.copy() for k, v in ff.params.items()}
    for name, p in params.items():
        def call(value, name=name):
            ff.load_state_dict({**params, name: value})
            return unit(*args)
        err = sampled_error(call, [p], 0, cot, grads[f"sublayer.{name}"], rng)
        assert err < CD_TOL, (name, err)


ATTENTION_CASES = {
    "n1": dict(b=1, h=1, nq=1, nk=1, dk=4, dv=4),
    "nq37-nk23-dv-ne-dk-3-heads": dict(b=2, h=3, nq=37, nk=23, dk=5, dv=7),
    "causal-nq-gt-nk": dict(b=1, h=2, nq=9, nk=6, dk=4, dv=3, causal=True),
    "masked-rows": dict(b=2, h=3, nq=5, nk=8, dk=4, dv=6, mask=True),
    "causal-and-mask": dict(b=2, h=1, nq=7, nk=7, dk=3, dv=3, causal=True, mask=True),
}


def _attention_inputs(rng, b, h, nq, nk, dk, dv, causal=False, mask=False, dtype=np.float64):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((b, h, nq, dk), (b, h, nk, dk), (b, h, nk, dv)))
    kwargs = {"causal": causal}
    if mask:
        m = rng.random((b, 1, nq, nk)) < 0.6
        m[0, 0, 1] = False  # a query with no visible key: zero output, zero gradient
        kwargs["mask"] = m
    return (q, k, v), kwargs


RESTRICTED_CASES = {"n1": (1, 1, False), "n37-w5": (37, 5, False), "n37-w4-causal": (37, 4, True),
                    "n9-w20": (9, 20, False)}


def _restricted_inputs(rng, n, window, causal, dtype=np.float64):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((2, 3, n, 5), (2, 3, n, 5), (2, 3, n, 4)))
    return (q, k, v, window), {"causal": causal}


@pytest.mark.parametrize("case", sorted(RESTRICTED_CASES))
def test_restricted_attention_central_differences(rng, case):
    args, kwargs = _restricted_inputs(rng, *RESTRICTED_CASES[case])
    _, cot, grads, params = vjp_grads(tfm.restricted_attention, args, {**kwargs, "backend": "numpy"}, rng=rng)
    assert params == {} and len(grads) == 3  # the window is an int: no gradient
    f = lambda q, k, v: tfm.restricted_attention(q, k, v, args[3], backend="numpy", **kwargs)  # noqa: E731
    errors = [sampled_error(f, list(args[:3]), i, cot, grads[i], rng, entries=20) for i in range(3)]
    assert max(errors) < CD_TOL, errors


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(RESTRICTED_CASES))
def test_restricted_attention_cpu_against_reference(rng, case, dtype):
    args, kwargs = _restricted_inputs(rng, *RESTRICTED_CASES[case], dtype=dtype)
    out_ref, cot, ref, _ = vjp_grads(tfm.restricted_attention, args, {**kwargs, "backend": "numpy"}, rng=rng)
    try:
        out, _, got, _ = vjp_grads(tfm.restricted_attention, args, kwargs, cotangent=cot)
    except NotImplementedError as exc:
        pytest.skip(f"cpu backend: {exc}")
    errors = [rel_err(out, out_ref)] + [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errors) < GRAD_TOL[dtype], errors


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_central_differences(rng, case):
    (q, k, v), kwargs = _attention_inputs(rng, **ATTENTION_CASES[case])
    out, cot, grads, params = vjp_grads(tfm.attention, (q, k, v), {**kwargs, "backend": "numpy"}, rng=rng)
    assert params == {} and len(grads) == 3
    f = lambda q, k, v: tfm.attention(q, k, v, backend="numpy", **kwargs)  # noqa: E731
    errors = [sampled_error(f, [q, k, v], i, cot, grads[i], rng, entries=20) for i in range(3)]
    assert max(errors) < CD_TOL, errors
    if "mask" in kwargs:  # the query that sees nothing
        assert np.all(out[0, :, 1] == 0) and np.all(grads[0][0, :, 1] == 0)


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_cpu_against_reference(rng, case, dtype, impl):
    (q, k, v), kwargs = _attention_inputs(rng, **ATTENTION_CASES[case], dtype=dtype)
    out_ref, cot, ref, _ = vjp_grads(tfm.attention, (q, k, v), {**kwargs, "backend": "numpy"}, rng=rng)
    try:
        out, _, got, _ = vjp_grads(tfm.attention, (q, k, v), {**kwargs, "impl": impl}, cotangent=cot)
    except NotImplementedError as exc:
        pytest.skip(f"cpu backend: {exc}")
    assert out.dtype == np.dtype(dtype) and all(g.dtype == np.dtype(dtype) for g in got)
    errors = [rel_err(out, out_ref)] + [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errors) < GRAD_TOL[dtype], errors


# ---------------------------------------------------------------------- cpu against the reference
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", MODULE_CASES)
def test_module_gradients_cpu_against_reference(rng, name, dtype):
    seed = int(rng.integers(1 << 30))

    def make(backend):  # the same weights on both backends: the same draws
        return _case(name, backend, dtype, np.random.default_rng(seed))[0]

    if name.startswith("residual-norm"):  # the sublayer argument lives on the unit's backend
        results = {}
        for backend in ("numpy", "cpu"):
            unit, args, kwargs = _case(name, backend, dtype, np.random.default_rng(seed))
            cot = np.random.default_rng(seed).standard_normal((2, 3, 7))  # the reference's float64
            cot = cot if backend == "numpy" else cot.astype(dtype)
            results[backend] = vjp_grads(unit, args, kwargs, cotangent=cot)
        (out_ref, _, in_ref, par_ref), (out, _, ins, pars) = results["numpy"], results["cpu"]
        errors = {"out": rel_err(out, out_ref), "input 0": rel_err(ins[0], in_ref[0])}
        errors.update({k: rel_err(pars[k], g) for k, g in par_ref.items()})
    else:
        _, args, kwargs = _case(name, "numpy", dtype, np.random.default_rng(seed))
        errors = backend_errors(make, args, kwargs, rng=rng, dtype=dtype)
    assert worst(errors)[1] < GRAD_TOL[dtype], worst(errors)


# ---------------------------------------------------------------------- PyTorch autograd
def _torch_transformer(rng, norm_first, activation, dtype):
    torch.manual_seed(int(rng.integers(1 << 30)))
    net = nn.Transformer(d_model=12, nhead=3, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=10,
                         dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first,
                         dtype=getattr(torch, dtype))
    with torch.no_grad():  # non-trivial biases and norm gains
        for p in net.parameters():
            p.uniform_(-0.4, 0.4)
    return net.train()  # train mode: PyTorch's standard layers (no inference fast path)


@requires_torch
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("backend,dtype", [("numpy", "float64"), ("cpu", "float64"), ("cpu", "float32")])
@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu"), (False, "gelu")])
def test_encoder_decoder_against_torch_autograd(rng, norm_first, activation, backend, dtype):
    net = _torch_transformer(rng, norm_first, activation, dtype)
    b, ns, nt, d = 3, 7, 5, 12
    src, tgt = rng.standard_normal((b, ns, d)).astype(dtype), rng.standard_normal((b, nt, d)).astype(dtype)
    src_pad, tgt_pad = padding(rng, b, ns), padding(rng, b, nt)
    cot = rng.standard_normal((b, nt, d)).astype(dtype)
    ts, tt = torch.tensor(src, requires_grad=True), torch.tensor(tgt, requires_grad=True)
    out_t = net(ts, tt, tgt_mask=torch.ones(nt, nt, dtype=torch.bool).triu(1),  # True = masked, as the pads
                tgt_is_causal=True, src_key_padding_mask=torch.tensor(src_pad),
                tgt_key_padding_mask=torch.tensor(tgt_pad), memory_key_padding_mask=torch.tensor(src_pad))
    out_t.backward(torch.tensor(cot))
    model = tfm.from_torch(net, backend=backend)
    try:
        out, _, (dsrc, dtgt), grads = vjp_grads(model, (src, tgt), dict(
            src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad),
            cotangent=cot.astype(np.float64 if backend == "numpy" else dtype))
    except NotImplementedError as exc:
        pytest.skip(f"{backend} backend: {exc}")
    tol = GRAD_TOL[dtype]
    assert rel_err(out, out_t.detach().numpy()) < tol
    assert rel_err(dsrc, ts.grad.numpy()) < tol and rel_err(dtgt, tt.grad.numpy()) < tol
    torch_grads = dict(net.named_parameters())
    assert set(grads) == set(torch_grads)  # PyTorch's state-dict names
    errors = {name: rel_err(grads[name], p.grad.numpy()) for name, p in torch_grads.items()}
    assert worst(errors)[1] < tol, worst(errors)


@requires_torch
@pytest.mark.parametrize("causal", [False, True])
def test_attention_against_sdpa_backward(rng, causal):
    (q, k, v), kwargs = _attention_inputs(rng, b=2, h=3, nq=37, nk=37 if causal else 23, dk=8, dv=8,
                                          causal=causal, mask=not causal)
    kwargs["mask"] = None if causal else kwargs["mask"] | np.eye(37, 23, dtype=bool)  # SDPA: no empty rows
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out_t = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=None if causal else torch.tensor(kwargs["mask"]), is_causal=causal)
    cot = rng.standard_normal(out_t.shape)
    out_t.backward(torch.tensor(cot))
    for backend in ("numpy", "cpu"):
        try:
            out, _, grads, _ = vjp_grads(tfm.attention, (q, k, v), {**kwargs, "backend": backend}, cotangent=cot)
        except NotImplementedError as exc:
            pytest.skip(f"{backend} backend: {exc}")
        assert rel_err(out, out_t.detach().numpy()) < 1e-12
        for g, t in zip(grads, (tq, tk, tv)):
            assert rel_err(g, t.grad.numpy()) < 1e-12


@requires_torch
@pytest.mark.parametrize("backend,dtype", [("numpy", "float64"), ("cpu", "float64"), ("cpu", "float32")])
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_recurrent_against_torch_autograd(rng, kind, backend, dtype):
    torch.manual_seed(int(rng.integers(1 << 30)))
    net = getattr(nn, kind)(5, 6, num_layers=3, batch_first=True, dtype=getattr(torch, dtype))
    b, n = 3, 11
    xs = rng.standard_normal((b, n, 5)).astype(dtype)
    states = [rng.standard_normal((3, b, 6)).astype(dtype) for _ in range(2 if kind == "LSTM" else 1)]
    tx, *ts = (torch.tensor(a, requires_grad=True) for a in [xs, *states])
    out_t, final_t = net(tx, tuple(ts) if kind == "LSTM" else ts[0])
    final_t = final_t if kind == "LSTM" else (final_t,)
    cots = [rng.standard_normal(t.shape).astype(dtype) for t in (out_t, *final_t)]
    torch.autograd.backward((out_t, *final_t), [torch.tensor(c) for c in cots])
    layer = tfm.from_torch(net, backend=backend).layer
    out_dtype = np.float64 if backend == "numpy" else dtype
    try:
        _, _, input_grads, grads = vjp_grads(layer, [xs, *states], cotangent=tuple(c.astype(out_dtype) for c in cots))
    except NotImplementedError as exc:
        pytest.skip(f"{backend} backend: {exc}")
    tol = GRAD_TOL[dtype]
    errors = {f"input {i}": rel_err(g, t.grad.numpy()) for i, (g, t) in enumerate(zip(input_grads, [tx, *ts]))}
    errors.update({name: rel_err(grads[name], p.grad.numpy()) for name, p in net.named_parameters()})
    assert set(grads) == {name for name, _ in net.named_parameters()}
    assert worst(errors)[1] < tol, worst(errors)


@requires_torch
@pytest.mark.parametrize("backend,dtype", [("numpy", "float64"), ("cpu", "float64"), ("cpu", "float32")])
@pytest.mark.parametrize("dilation,padding", [(1, "same"), (3, 4), (2, "valid")])
def test_conv1d_against_torch_autograd(rng, dilation, padding, backend, dtype):
    torch.manual_seed(int(rng.integers(1 << 30)))
    net = nn.Conv1d(4, 6, 3, dilation=dilation, padding=padding, dtype=getattr(torch, dtype))
    xs = rng.standard_normal((2, 4, 29)).astype(dtype)  # PyTorch's (B, C, N)
    tx = torch.tensor(xs, requires_grad=True)
    out_t = net(tx)
    cot = rng.standard_normal(out_t.shape).astype(dtype)
    out_t.backward(torch.tensor(cot))
    layer = tfm.from_torch(net, backend=backend).layer  # tfm's (B, N, C)
    out_dtype = np.float64 if backend == "numpy" else dtype
    try:
        out, _, (dx,), grads = vjp_grads(layer, [np.swapaxes(xs, 1, 2)],
                                         cotangent=np.swapaxes(cot, 1, 2).astype(out_dtype))
    except NotImplementedError as exc:
        pytest.skip(f"{backend} backend: {exc}")
    tol = GRAD_TOL[dtype]
    assert rel_err(np.swapaxes(out, 1, 2), out_t.detach().numpy()) < tol
    assert rel_err(np.swapaxes(dx, 1, 2), tx.grad.numpy()) < tol
    for name, p in net.named_parameters():
        assert rel_err(grads[name], p.grad.numpy()) < tol, name


# ---------------------------------------------------------------------- the API and bad input
def test_pullback_twice_gives_the_same_result(rng):
    module, args, kwargs = _case("decoder-layer-post", "numpy", "float64", rng)
    out, pullback = tfm.vjp(module, *args, **kwargs)
    cot = rng.standard_normal(out.shape)
    first_inputs, first_params = pullback(cot)
    second_inputs, second_params = pullback(cot)
    for a, b in zip(first_inputs, second_inputs):
        np.testing.assert_array_equal(a, b)
    for name in first_params:
        np.testing.assert_array_equal(first_params[name], second_params[name])


def test_only_float_positional_arguments_get_gradients(rng):
    mha = MultiHeadAttention(6, 2, backend="numpy", dtype="float64")
    xs, mem = x(rng, 2, 3, 6), x(rng, 2, 4, 6)
    assert len(tfm.vjp(mha, xs)[1](None)[0]) == 1
    assert len(tfm.vjp(mha, xs, mem)[1](None)[0]) == 2
    assert len(tfm.vjp(mha, xs, memory=mem)[1](None)[0]) == 1  # by keyword: not differentiated
    model = tfm.Transformer(_config(dtype="float64"), backend="numpy")
    out, pullback = tfm.vjp(model, rng.integers(0, 11, (1, 3)), rng.integers(0, 13, (1, 2)))
    inputs, params = pullback(np.zeros_like(out))
    assert inputs == () and set(params) == set(model.params)
    assert all(not g.any() for g in params.values())  # a zero cotangent: zero gradients


def test_none_cotangent_is_zero(rng):
    layer = LayerNorm(4, backend="numpy", dtype="float64")
    (dx,), grads = tfm.vjp(layer, x(rng, 1, 2, 4))[1](None)
    assert not dx.any() and not grads["weight"].any()


def test_bad_cotangent(rng):
    layer = Linear(4, 3, backend="numpy")
    out, pullback = tfm.vjp(layer, x(rng, 2, 5, 4))
    with pytest.raises(ValueError, match=r"cotangent has shape \(2, 5, 4\), but the output has shape \(2, 5, 3\)"):
        pullback(np.zeros((2, 5, 4)))
    with pytest.raises(TypeError, match="cotangent has dtype float32, but the output has dtype float64"):
        pullback(np.zeros(out.shape, np.float32))
    with pytest.raises(TypeError, match="cotangent has dtype int64"):
        pullback(np.zeros(out.shape, np.int64))
    _, attn_pullback = tfm.vjp(tfm.attention, *(x(rng, 1, 1, 2, 4) for _ in range(3)), backend="numpy")
    with pytest.raises(ValueError, match="cotangent has shape"):
        attn_pullback(np.zeros((1, 1, 2, 5)))


def test_vjp_of_something_else():
    with pytest.raises(TypeError, match="tfm.vjp differentiates tfm.attention"):
        tfm.vjp(np.tanh, np.ones(3))
    with pytest.raises(TypeError, match="tfm.vjp differentiates"):
        tfm.vjp("attention", np.ones(3))
    with pytest.raises(TypeError, match="cannot be called with these arguments"):
        tfm.vjp(Linear(3, 2, backend="numpy"), np.ones((1, 1, 3)), np.ones(3), np.ones(3))
    with pytest.raises(TypeError, match="Transformer cannot be called with these arguments: got an unexpected"):
        tfm.vjp(tfm.Transformer(_config(), backend="numpy"), np.ones((1, 2), int), np.ones((1, 2), int), bogus=1)
    with pytest.raises(TypeError, match=r"differentiate the tfm layer inside the TorchConv1d, its \.layer"):
        from tfm.interop.conv import TorchConv1d

        tfm.vjp(TorchConv1d(tfm.Conv1d(2, 2, 3, backend="numpy")), np.ones((1, 2, 5)))


def test_vjp_checks_inputs_like_the_call(rng):
    with pytest.raises(ValueError, match="in_features=3"):
        tfm.vjp(Linear(3, 2, backend="numpy"), x(rng, 1, 2, 4))
    with pytest.raises(ValueError, match="q and k head dims differ"):
        tfm.vjp(tfm.attention, x(rng, 1, 1, 2, 4), x(rng, 1, 1, 2, 3), x(rng, 1, 1, 2, 3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tfm.vjp(tfm.Transformer(_config(), backend="numpy"), np.array([[1, 99]]), np.array([[1, 2]]))
