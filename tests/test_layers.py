"""The Transformer's sublayers (tfm.layers) and the Module plumbing they share: each layer
against the float64 reference (tfm.reference) on the numpy backend, the cpu kernels against
the numpy backend with the same weights, PyTorch's modules with their state dicts copied in
(the names must match exactly), the key/value cache against full causal attention,
save/load and backend moves, and every bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tfm
from tfm import reference as ref
from tfm.layers import (Decoder, DecoderLayer, Embedding, Encoder, EncoderLayer, FeedForward, LayerNorm,
                        Linear, Module, MultiHeadAttention, ResidualNorm, TransformerEmbedding)
from tfm.layers.attention import key_mask

from conftest import HAVE_TORCH, TOL, rel_err, requires_torch

if HAVE_TORCH:
    import torch
    import torch.nn as nn

# Layers compound a few kernel errors: the bound the whole-model tests use.
LAYER_TOL = {"float32": 1e-4, "float64": 1e-10}


def randomise(module, rng):
    """Non-zero values everywhere (biases, LayerNorm gains) so that no mixed-up weight hides."""
    module.load_state_dict({k: rng.uniform(-0.5, 0.5, v.shape) for k, v in module.params.items()})
    return module


def outputs(result):
    return result if isinstance(result, tuple) else (result,)


def padding(rng, b, n):
    """(B, N) True = padding, each row keeping at least one position."""
    return np.arange(n)[None, :] >= rng.integers(1, n + 1, size=b)[:, None]


def keep(pad):
    return None if pad is None else ~pad[:, None, None, :]


def mha_ref(p, x_q, x_kv, h, mask=None, causal=False, prefix=""):
    """Multi-head attention of tfm.reference with the fused in_proj split into W^Q, W^K, W^V."""
    d = x_q.shape[-1]
    w, b = p[f"{prefix}in_proj_weight"], p[f"{prefix}in_proj_bias"]
    return ref.multi_head_attention(x_q, x_kv, w[:d], b[:d], w[d:2 * d], b[d:2 * d], w[2 * d:], b[2 * d:],
                                    p[f"{prefix}out_proj.weight"], p[f"{prefix}out_proj.bias"], h,
                                    mask=mask, causal=causal)


def ffn_ref(p, x, activation, prefix=""):
    return ref.position_wise_ffn(x, p[f"{prefix}linear1.weight"], p[f"{prefix}linear1.bias"],
                                 p[f"{prefix}linear2.weight"], p[f"{prefix}linear2.bias"], activation)


# ---------------------------------------------------------------------- Module plumbing
def test_names_follow_the_tree():
    enc = Encoder(2, 6, 3, 5, final_norm=True)
    names = list(enc.params)
    assert names[:6] == ["layers.0.self_attn.in_proj_weight", "layers.0.self_attn.in_proj_bias",
                         "layers.0.self_attn.out_proj.weight", "layers.0.self_attn.out_proj.bias",
                         "layers.0.linear1.weight", "layers.0.linear1.bias"]  # the FFN has no prefix
    assert names[-2:] == ["norm.weight", "norm.bias"]
    assert "layers.1.norm2.weight" in names and len(names) == 2 * 12 + 2
    # a submodule's own view of its parameters uses local names, the same arrays
    layer = enc.layers[1]
    assert set(layer.params) == {k[len("layers.1."):] for k in names if k.startswith("layers.1.")}
    assert layer.params["norm1.weight"] is enc.params["layers.1.norm1.weight"]


def test_backend_moves_the_whole_tree(rng):
    layer = DecoderLayer(6, 2, 7, seed=1, backend="numpy")
    assert {m.backend.name for m in layer.modules()} == {"numpy"}
    assert layer.to("cpu") is layer
    assert {m.backend.name for m in layer.modules()} == {"cpu"}
    assert all(isinstance(w, np.ndarray) and w.dtype == np.float32 for m in layer.modules() for w in m.weights.values())


def test_impl_reaches_every_attention():
    model = tfm.Transformer(tfm.TransformerConfig.tiny(), backend=None, impl="naive")
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attentions) == 6 and {m.impl for m in attentions} == {"naive"}
    model.decoder.impl = "fused"
    assert model.impl == "naive" and {m.impl for m in model.encoder.modules() if m in attentions} == {"naive"}
    assert {m.impl for m in model.decoder.modules() if m in attentions} == {"fused"}


def test_seeded_initialisation(rng):
    a, b, c = (EncoderLayer(8, 2, 12, seed=s, backend="numpy") for s in (5, 5, 6))
    for name, p in a.params.items():
        np.testing.assert_array_equal(p, b.params[name])
        if p.ndim == 2:  # Xavier-uniform matrices differ between seeds
            assert not np.array_equal(p, c.params[name])
        elif name.startswith("norm") and name.endswith("weight"):
            np.testing.assert_array_equal(p, 1.0)
        else:
            np.testing.assert_array_equal(p, 0.0)


def test_load_state_dict_checks_names_and_shapes_and_copies(rng):
    layer = FeedForward(4, 6, backend="numpy")
    state = {k: rng.standard_normal(v.shape) for k, v in layer.params.items()}
    layer.load_state_dict(state)
    state["linear1.bias"][0] = 123.0  # the layer holds its own copy
    assert layer.params["linear1.bias"][0] != 123.0
    with pytest.raises(ValueError, match=r"parameters do not match FeedForward: missing \['linear2.bias'\], "
                                         r"unexpected \['w'\]"):
        layer.load_state_dict({**{k: v for k, v in state.items() if k != "linear2.bias"}, "w": np.zeros(1)})
    with pytest.raises(ValueError, match=r"parameter 'linear1.weight' has shape \(4, 6\), expected \(6, 4\)"):
        layer.load_state_dict({**state, "linear1.weight": np.zeros((4, 6))})


LAYERS = {
    "Linear": lambda **kw: Linear(5, 3, **kw),
    "Linear-no-bias": lambda **kw: Linear(5, 3, bias=False, **kw),
    "FeedForward": lambda **kw: FeedForward(5, 7, "gelu", **kw),
    "LayerNorm": lambda **kw: LayerNorm(5, 1e-3, **kw),
    "Embedding": lambda **kw: Embedding(11, 5, **kw),
    "TransformerEmbedding": lambda **kw: TransformerEmbedding(11, 6, 20, **kw),
    "MultiHeadAttention": lambda **kw: MultiHeadAttention(6, 3, **kw),
    "EncoderLayer": lambda **kw: EncoderLayer(6, 3, 7, "gelu", "pre", 1e-4, **kw),
    "DecoderLayer": lambda **kw: DecoderLayer(6, 2, 7, **kw),
    "Encoder": lambda **kw: Encoder(2, 6, 3, 7, final_norm=True, **kw),
    "Decoder": lambda **kw: Decoder(1, 6, 3, 7, norm="pre", **kw),
    "ResidualNorm": lambda **kw: ResidualNorm(5, "pre", **kw),
    "LSTM": lambda **kw: tfm.LSTM(5, 4, 2, **kw),
    "RNN": lambda **kw: tfm.RNN(5, 4, nonlinearity="relu", bias=False, **kw),
    "Conv1d": lambda **kw: tfm.Conv1d(5, 4, 3, padding=(2, 1), **kw),
    "ConvStack": lambda **kw: tfm.ConvStack(5, 2, 3, dilated=True, **kw),
    "ConvS2SBlock": lambda **kw: tfm.ConvS2SBlock(5, 3, causal=True, input_scale=0.5, **kw),
}


def sample_input(name, rng):
    if "Embedding" in name:
        return (rng.integers(0, 11, (2, 4)),)
    d = 6 if name in ("TransformerEmbedding", "MultiHeadAttention") or "coder" in name else 5
    x = rng.standard_normal((2, 4, d))
    return (x, rng.standard_normal((2, 3, d))) if name.startswith("Decoder") else (x,)


@pytest.mark.parametrize("name", LAYERS)
def test_save_load_roundtrip(tmp_path, rng, name):
    layer = randomise(LAYERS[name](seed=3, backend="cpu", dtype="float64"), rng)
    args = sample_input(name, rng)
    if name == "ResidualNorm":
        args = args + (FeedForward(5, 3, seed=1, dtype="float64"),)
    loaded = type(layer).load(layer.save(tmp_path / name), backend="cpu")
    assert loaded.params.keys() == layer.params.keys() and repr(loaded) == repr(layer)
    for a, b in zip(outputs(loaded(*args)), outputs(layer(*args)), strict=True):
        np.testing.assert_array_equal(a, b)
    other = Embedding if name.startswith("Linear") else Linear
    with pytest.raises(ValueError, match=f"holds a {type(layer).__name__}, not a {other.__name__}"):
        other.load(tmp_path / f"{name}.npz")


def test_construction_bad_input():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(TypeError, match="n_heads must be an integer, got float"):
        EncoderLayer(8, 2.0, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(4, 4, "tanh")
    with pytest.raises(ValueError, match="norm must be one of"):
        ResidualNorm(4, "sandwich")
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        LayerNorm(4, 0.0)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        MultiHeadAttention(4, 2, impl="flash")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        Linear(2, 2, backend="tpu")
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        Linear(2, 2, dtype="float16")
    with pytest.raises(TypeError, match="seed must be an integer"):
        Linear(2, 2, seed="1")
    with pytest.raises(ValueError, match="n_layers must be >= 0"):
        Decoder(-1, 4, 2, 4)
    parent = Module("float64")
    with pytest.raises(ValueError, match="a float32 Linear cannot be part of a float64 Module"):
        parent.add("proj", Linear(2, 2, backend=None))


# ---------------------------------------------------------------------- each sublayer
@pytest.mark.parametrize("b,n,m,d,h", [(1, 1, 1, 4, 1), (2, 37, 5, 15, 3), (3, 7, 37, 10, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_the_reference(rng, b, n, m, d, h, causal):
    """Self- and cross-attention on the numpy backend equal tfm.reference's multi_head_attention,
    and the cpu kernels (float32, both attention impls) equal the numpy backend."""
    mha = randomise(MultiHeadAttention(d, h, backend="numpy", dtype="float64"), rng)
    x, mem = rng.standard_normal((b, n, d)), rng.standard_normal((b, m, d))
    pad_x, pad_m = padding(rng, b, n), padding(rng, b, m)
    for memory, pad in ((None, pad_x), (mem, pad_m)):
        kv = x if memory is None else memory
        want = mha_ref(mha.params, x, kv, h, keep(pad), causal)
        got = mha(x, memory, key_padding_mask=pad, causal=causal)
        assert got.dtype == np.float64 and rel_err(got, want) < TOL["float64"]
        for impl in ("fused", "naive"):
            cpu = MultiHeadAttention(d, h, impl=impl, backend=None)
            cpu.load_state_dict(mha.params)
            cpu.backend = "cpu"
            out = cpu(x.astype(np.float32), memory, key_padding_mask=pad, causal=causal)
            assert out.dtype == np.float32 and rel_err(out, want) < LAYER_TOL["float32"]


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_kv_cache_equals_causal_attention(rng, backend, monkeypatch):
    """One position at a time through the cache (greedy decoding) gives the rows of one
    causal pass; the cache starts as NaN, so reading an unwritten row would show."""
    bk = tfm.get_backend(backend)
    poison = np.float64 if backend == "numpy" else None
    monkeypatch.setattr(bk, "empty", lambda shape, dtype: np.full(shape, np.nan, dtype=poison or dtype))
    mha = randomise(MultiHeadAttention(12, 3, backend=backend), rng)
    x = bk.asarray(rng.standard_normal((2, 6, 12)), mha.dtype)
    full = bk.to_numpy(mha.forward(x, causal=True))
    cache = mha.new_cache(2, 8)
    for t in range(6):
        row = bk.to_numpy(mha.forward(x[:, t:t + 1], cache=cache))
        assert cache.length == t + 1
        assert rel_err(row[:, 0], full[:, t]) < LAYER_TOL[mha.dtype.name]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_feed_forward_and_linear_are_the_reference(rng, activation):
    ffn = randomise(FeedForward(9, 37, activation, backend="numpy", dtype="float64"), rng)
    lin = randomise(Linear(9, 4, backend="numpy", dtype="float64"), rng)
    x = rng.standard_normal((3, 5, 9))
    assert rel_err(ffn(x), ffn_ref(ffn.params, x, activation)) < TOL["float64"]
    assert rel_err(lin(x), ref.linear(x, lin.params["weight"], lin.params["bias"])) < TOL["float64"]
    for layer, want in ((ffn, ffn(x)), (lin, lin(x))):
        layer.backend = "cpu"
        assert rel_err(layer(x), want) < TOL["float64"]  # cpu kernels in float64


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_residual_norm_is_the_paper_or_pre_norm(rng, norm):
    unit = randomise(ResidualNorm(6, norm, 1e-3, backend="numpy", dtype="float64"), rng)
    ffn = randomise(FeedForward(6, 11, backend="numpy", dtype="float64"), rng)
    x = rng.standard_normal((2, 7, 6))
    g, b = unit.params["weight"], unit.params["bias"]
    f = lambda z: ffn_ref(ffn.params, z, "relu")  # noqa: E731
    want = (ref.layer_norm(x + f(x), g, b, 1e-3) if norm == "post" else x + f(ref.layer_norm(x, g, b, 1e-3)))
    assert rel_err(unit(x, ffn), want) < TOL["float64"]
    assert rel_err(unit.norm(x), ref.layer_norm(x, g, b, 1e-3)) < TOL["float64"]
    with pytest.raises(TypeError, match="sublayer must be a tfm module"):
        unit(x, lambda z: z)
    with pytest.raises(ValueError, match="sublayer runs on backend 'cpu', this unit on 'numpy'"):
        unit(x, ffn.to("cpu"))


def test_embeddings_are_the_reference(rng):
    emb = TransformerEmbedding(13, 10, 40, backend="numpy", dtype="float64", seed=2)
    ids = rng.integers(0, 13, (3, 9))
    want = ref.embed(ids, emb.params["weight"], math.sqrt(10)) + ref.positional_encoding(9, 10, 5)
    assert rel_err(emb(ids, offset=5), want) < TOL["float64"]
    plain = Embedding(13, 10, backend="cpu", seed=2)
    np.testing.assert_array_equal(plain(ids), plain.params["weight"][ids])
    with pytest.raises(ValueError, match=r"positions 35..43 reach past the layer's max_len=40"):
        emb(ids, offset=35)
    with pytest.raises(ValueError, match=r"ids holds token id 13 outside the vocabulary \[0, 13\)"):
        plain(np.full((1, 2), 13))
    with pytest.raises(TypeError, match="ids must be an integer array"):
        emb(ids.astype(np.float32))
    with pytest.raises(ValueError, match="offset must be >= 0"):
        emb(ids, offset=-1)


@pytest.mark.parametrize("norm,activation", [("post", "relu"), ("pre", "gelu")])
def test_layers_and_stacks_are_the_paper(rng, norm, activation):
    """Encoder and decoder layers and stacks on the numpy backend equal section 3.1 written
    with tfm.reference (the paper's post-norm, or pre-norm), with padding and odd heads."""
    d, h, f, eps = 15, 3, 37, 1e-5
    kw = dict(activation=activation, norm=norm, backend="numpy", dtype="float64")
    x, mem = rng.standard_normal((2, 9, d)), rng.standard_normal((2, 11, d))
    pad_x, pad_m = padding(rng, 2, 9), padding(rng, 2, 11)

    def sub(p, z, fn, name):
        ln = lambda u: ref.layer_norm(u, p[f"{name}.weight"], p[f"{name}.bias"], eps)  # noqa: E731
        return ln(z + fn(z)) if norm == "post" else z + fn(ln(z))

    def enc_ref(p, z, pre=""):
        q = {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}
        z = sub(q, z, lambda u: mha_ref(q, u, u, h, keep(pad_x), prefix="self_attn."), "norm1")
        return sub(q, z, lambda u: ffn_ref(q, u, activation), "norm2")

    def dec_ref(p, z, pre=""):
        q = {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}
        z = sub(q, z, lambda u: mha_ref(q, u, u, h, keep(pad_x), True, prefix="self_attn."), "norm1")
        z = sub(q, z, lambda u: mha_ref(q, u, mem, h, keep(pad_m), prefix="multihead_attn."), "norm2")
        return sub(q, z, lambda u: ffn_ref(q, u, activation), "norm3")

    enc = randomise(EncoderLayer(d, h, f, **kw), rng)
    assert rel_err(enc(x, pad_x), enc_ref(enc.params, x)) < TOL["float64"]
    dec = randomise(DecoderLayer(d, h, f, **kw), rng)
    assert rel_err(dec(x, mem, pad_x, pad_m), dec_ref(dec.params, x)) < TOL["float64"]
    stack = randomise(Encoder(2, d, h, f, final_norm=True, **kw), rng)
    p = stack.params
    want = ref.layer_norm(enc_ref(p, enc_ref(p, x, "layers.0."), "layers.1."), p["norm.weight"], p["norm.bias"])
    assert rel_err(stack(x, pad_x), want) < TOL["float64"]
    stack = randomise(Decoder(2, d, h, f, **kw), rng)
    p = stack.params
    assert rel_err(stack(x, mem, pad_x, pad_m), dec_ref(p, dec_ref(p, x, "layers.0."), "layers.1.")) < TOL["float64"]
    stack.backend = "cpu"  # float64 kernels with the same weights
    assert rel_err(stack(x, mem, pad_x, pad_m), dec_ref(p, dec_ref(p, x, "layers.0."), "layers.1.")) < LAYER_TOL["float64"]


# ---------------------------------------------------------------------- against PyTorch
def _from(module_tfm, module_torch):
    """The PyTorch module's weights in the tfm module: the state-dict names must be the same."""
    module_tfm.load_state_dict({k: v.detach().numpy() for k, v in module_torch.state_dict().items()})
    return module_tfm


def _perturbed(m):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


@requires_torch
@pytest.mark.parametrize("h", [1, 3])
def test_attention_matches_pytorch(rng, h):
    torch.manual_seed(int(rng.integers(1 << 30)))
    d = 12
    tm = _perturbed(nn.MultiheadAttention(d, h, batch_first=True))
    mha = _from(MultiHeadAttention(d, h), tm)
    x, mem = rng.standard_normal((3, 7, d)).astype(np.float32), rng.standard_normal((3, 10, d)).astype(np.float32)
    pad = padding(rng, 3, 10)
    t = torch.from_numpy
    causal_mask = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True = masked
    with torch.no_grad():
        self_causal = tm(t(x), t(x), t(x), attn_mask=causal_mask, need_weights=False)[0].numpy()
        cross = tm(t(x), t(mem), t(mem), key_padding_mask=t(pad), need_weights=False)[0].numpy()
    assert rel_err(mha(x, causal=True), self_causal) < LAYER_TOL["float32"]
    assert rel_err(mha(x, mem, key_padding_mask=pad), cross) < LAYER_TOL["float32"]


@requires_torch
@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_layers_and_stacks_match_pytorch(rng, norm_first, activation):
    torch.manual_seed(int(rng.integers(1 << 30)))
    d, h, f = 16, 4, 24
    kw = dict(dim_feedforward=f, activation=activation, batch_first=True, norm_first=norm_first, dropout=0.0)
    ours = dict(activation=activation, norm="pre" if norm_first else "post")
    x, mem = rng.standard_normal((2, 9, d)).astype(np.float32), rng.standard_normal((2, 6, d)).astype(np.float32)
    pad_x, pad_m = padding(rng, 2, 9), padding(rng, 2, 6)
    t = torch.from_numpy
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)  # True = masked, as the key padding masks
    t_enc = _perturbed(nn.TransformerEncoder(nn.TransformerEncoderLayer(d, h, **kw), 2, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False))
    t_dec = _perturbed(nn.TransformerDecoder(nn.TransformerDecoderLayer(d, h, **kw), 2, norm=nn.LayerNorm(d)))
    with torch.no_grad():
        want_layer = t_enc.layers[0](t(x), src_key_padding_mask=t(pad_x)).numpy()
        want_enc = t_enc(t(x), src_key_padding_mask=t(pad_x)).numpy()
        want_dlayer = t_dec.layers[1](t(x), t(mem), tgt_mask=causal, tgt_is_causal=True,
                                      tgt_key_padding_mask=t(pad_x), memory_key_padding_mask=t(pad_m)).numpy()
        want_dec = t_dec(t(x), t(mem), tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=t(pad_x),
                         memory_key_padding_mask=t(pad_m)).numpy()
    layer = _from(EncoderLayer(d, h, f, **ours), t_enc.layers[0])
    assert rel_err(layer(x, pad_x), want_layer) < LAYER_TOL["float32"]
    enc = _from(Encoder(2, d, h, f, final_norm=True, **ours), t_enc)
    assert rel_err(enc(x, pad_x), want_enc) < LAYER_TOL["float32"]
    dlayer = _from(DecoderLayer(d, h, f, **ours), t_dec.layers[1])
    assert rel_err(dlayer(x, mem, pad_x, pad_m), want_dlayer) < LAYER_TOL["float32"]
    dec = _from(Decoder(2, d, h, f, final_norm=True, **ours), t_dec)
    assert rel_err(dec(x, mem, pad_x, pad_m), want_dec) < LAYER_TOL["float32"]


@requires_torch
def test_norm_linear_embedding_match_pytorch(rng):
    torch.manual_seed(int(rng.integers(1 << 30)))
    x = rng.standard_normal((2, 5, 7)).astype(np.float32)
    t = torch.from_numpy
    tn, tl, te = _perturbed(nn.LayerNorm(7, eps=1e-3)), _perturbed(nn.Linear(7, 3)), nn.Embedding(11, 7)
    ids = rng.integers(0, 11, (2, 5))
    with torch.no_grad():
        want = tn(t(x)).numpy(), tl(t(x)).numpy(), te(t(ids)).numpy()
    assert rel_err(_from(LayerNorm(7, 1e-3), tn)(x), want[0]) < LAYER_TOL["float32"]
    assert rel_err(_from(Linear(7, 3), tl)(x), want[1]) < LAYER_TOL["float32"]
    np.testing.assert_array_equal(_from(Embedding(11, 7), te)(ids), want[2])


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny_layers():
    return {"mha": MultiHeadAttention(6, 2, backend="numpy"), "enc": EncoderLayer(6, 2, 5, backend="numpy"),
            "dec": Decoder(1, 6, 2, 5, backend="numpy")}


@pytest.mark.parametrize("call, err, match", [
    (lambda L: L["mha"](np.zeros((2, 3, 5))), ValueError,
     r"x must have d_model=6 features in its last dimension, got shape \(2, 3, 5\)"),
    (lambda L: L["mha"](np.zeros((3, 6))), ValueError, "x must have 3 dimensions"),
    (lambda L: L["mha"](np.zeros((2, 3, 6), int)), TypeError, "x must be float32 or float64"),
    (lambda L: L["mha"](np.zeros((2, 0, 6))), ValueError, "x must not be empty"),
    (lambda L: L["mha"](np.zeros((2, 3, 6)), np.zeros((1, 4, 6))), ValueError,
     "x and memory batch sizes differ: 2 != 1"),
    (lambda L: L["mha"](np.zeros((2, 3, 6)), np.zeros((2, 4, 6)), key_padding_mask=np.zeros((2, 3), bool)),
     ValueError, r"key_padding_mask must have shape \(2, 4\)"),
    (lambda L: L["mha"](np.zeros((2, 3, 6)), key_padding_mask=np.zeros((2, 3))), TypeError,
     r"key_padding_mask must be boolean \(True = padding\)"),
    (lambda L: L["mha"](np.zeros((2, 3, 6)), causal=1), TypeError, "causal must be a bool"),
    (lambda L: L["enc"](np.zeros((2, 3, 6)), np.zeros((2, 4), bool)), ValueError,
     r"src_key_padding_mask must have shape \(2, 3\)"),
    (lambda L: L["dec"](np.zeros((2, 3, 6)), np.zeros((2, 4, 7))), ValueError,
     "memory must have d_model=6 features"),
    (lambda L: L["dec"](np.zeros((2, 3, 6)), np.zeros((2, 4, 6)), memory_key_padding_mask=np.zeros((2, 3), bool)),
     ValueError, r"memory_key_padding_mask must have shape \(2, 4\)"),
])
def test_call_bad_input(tiny_layers, call, err, match):
    with pytest.raises(err, match=match):
        call(tiny_layers)


def test_key_mask_convention():
    pad = np.array([[False, True, True]])
    np.testing.assert_array_equal(key_mask(tfm.get_backend("numpy"), pad), [[[[True, False, False]]]])
    assert key_mask(tfm.get_backend("numpy"), None) is None
