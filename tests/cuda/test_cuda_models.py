"""Whole models on backend="cuda" (simulator): the Transformer forward pass and cached greedy
generation, and the baseline layers, against the float64 numpy backend with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err

import tfm
import tfm.layers
from tfm.models import EncoderDecoder, Transformer

MODEL_TOL = {"float32": 1e-4, "float64": 1e-10}


def tiny(dtype="float32", **overrides):
    return tfm.TransformerConfig(**{"d_model": 12, "n_heads": 3, "d_ff": 20, "n_encoder_layers": 1,
                                    "n_decoder_layers": 1, "src_vocab": 11, "tgt_vocab": 13,
                                    "max_len": 32, "dtype": dtype, **overrides})


def batch(rng, cfg, b, ns, nt):
    src = rng.integers(0, cfg.src_vocab, (b, ns))
    tgt = rng.integers(0, cfg.tgt_vocab, (b, nt))
    src_pad = np.zeros((b, ns), bool)
    src_pad[0, ns - 2:] = True
    tgt_pad = np.zeros((b, nt), bool)
    tgt_pad[-1, nt - 1:] = True
    return src, tgt, src_pad, tgt_pad


# The simulator runs a tiny forward pass in seconds: cover both dtypes, both norm
# placements/activations and both attention kernels without the full cross product.
@pytest.mark.parametrize("dtype,overrides,impl", [
    ("float32", {}, "fused"),
    ("float64", {"norm": "pre", "activation": "gelu", "final_norm": True}, "fused"),
    ("float32", {"norm": "pre", "activation": "gelu", "final_norm": True}, "naive"),
], ids=["f32-post-relu-fused", "f64-pre-gelu-final-fused", "f32-pre-gelu-final-naive"])
def test_transformer_forward_matches_reference(rng, dtype, overrides, impl):
    cfg = tiny(dtype, **overrides)
    model = Transformer(cfg, seed=7, backend="cuda", impl=impl)
    oracle = Transformer.from_params(cfg, model.params, backend="numpy")
    src, tgt, src_pad, tgt_pad = batch(rng, cfg, 2, 5, 4)
    out = model.forward(src, tgt, src_pad, tgt_pad)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 4, cfg.tgt_vocab)
    assert rel_err(out, oracle.forward(src, tgt, src_pad, tgt_pad)) < MODEL_TOL[dtype]
    logp = model.forward(src, tgt, src_pad, tgt_pad, log_probs=True)
    assert rel_err(logp, oracle.forward(src, tgt, src_pad, tgt_pad, log_probs=True)) < MODEL_TOL[dtype]


def test_generation_with_device_kv_cache_equals_reference_tokens(rng):
    cfg = tiny("float32")
    model = Transformer(cfg, seed=11, backend="cuda")
    src, _, src_pad, _ = batch(rng, cfg, 2, 5, 1)
    got = model.generate(src, max_new_tokens=5, bos_id=1, src_pad_mask=src_pad)
    oracle = Transformer.from_params(cfg, model.params, backend="numpy")
    np.testing.assert_array_equal(got, oracle.generate(src, 5, bos_id=1, src_pad_mask=src_pad))


def test_encoder_decoder_on_embedded_inputs(rng):
    cfg = tiny("float32")
    model = EncoderDecoder(cfg, seed=3, backend="cuda")
    oracle = EncoderDecoder.from_params(cfg, model.params, backend="numpy")
    src = rng.standard_normal((2, 6, cfg.d_model)).astype(np.float32)
    tgt = rng.standard_normal((2, 3, cfg.d_model)).astype(np.float32)
    assert rel_err(model(src, tgt, tgt_is_causal=True), oracle(src, tgt, tgt_is_causal=True)) < 1e-4


@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
def test_recurrent_layers(rng, cls):
    layer = getattr(tfm.layers, cls)(4, 5, num_layers=2, seed=2, backend="cuda")
    oracle = getattr(tfm.layers, cls)(4, 5, num_layers=2, seed=2, backend="numpy", dtype="float64")
    x = rng.standard_normal((2, 6, 4)).astype(np.float32)
    for a, b in zip(layer(x), oracle(x)):
        assert rel_err(a, b) < 1e-5


def test_conv_layers(rng):
    x = rng.standard_normal((2, 7, 4)).astype(np.float32)
    for make in (lambda bk, dt: tfm.layers.ConvStack(4, 3, 2, dilated=True, causal=True, seed=1,
                                                     backend=bk, dtype=dt),
                 lambda bk, dt: tfm.layers.ConvS2SBlock(4, 3, seed=1, backend=bk, dtype=dt)):
        assert rel_err(make("cuda", "float32")(x), make("numpy", "float64")(x)) < 1e-5


def test_restricted_attention_layer(rng):
    q, k, v = (rng.standard_normal((1, 3, 9, 4)).astype(np.float32) for _ in range(3))
    out = tfm.layers.restricted_attention(q, k, v, 3, causal=True, backend="cuda")
    ref = tfm.layers.restricted_attention(q, k, v, 3, causal=True, backend="numpy")
    assert rel_err(out, ref) < 2e-5
