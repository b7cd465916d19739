"""The sequence-to-sequence baselines (LSTMSeq2Seq, ConvS2S): forward against independent float64
implementations of their equations, cpu against the reference backend, greedy generation equal to
the argmax loop over forward, decoder causality, save/load, config validation, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfm.models.convs2s import ConvS2S, ConvS2SConfig
from tfm.models.lstm_seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig
from tfm.reference import baselines as rb
from tfm.reference import transformer as rt

from conftest import TOL, rel_err

MODELS = [(LSTMSeq2Seq, LSTMSeq2SeqConfig), (ConvS2S, ConvS2SConfig)]


def _ids(rng, vocab, b, n):
    return rng.integers(0, vocab, size=(b, n))


def _lstm_seq2seq_reference(p, cfg, src, tgt):
    """The module docstring's equations, written out with the float64 reference functions."""
    d = cfg.d_model
    x = p["src_embed.weight"][src]
    zero = np.zeros((src.shape[0], d))
    states = []
    for i in range(cfg.n_layers):
        x, h, c = rb.lstm_layer(x, zero, zero, *(p[f"encoder.{n}_l{i}"] for n in
                                                 ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
        states.append((h, c))
    s = p["tgt_embed.weight"][tgt]
    for i, (h, c) in enumerate(states):
        s, _, _ = rb.lstm_layer(s, h, c, *(p[f"decoder.{n}_l{i}"] for n in
                                           ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    scores = (s @ p["attn.weight"].T) @ x.transpose(0, 2, 1) / math.sqrt(d)  # (B, Nt, Ns)
    context = rt.softmax(scores) @ x
    hidden = np.maximum(np.concatenate([context, s], -1) @ p["combine.weight"].T + p["combine.bias"], 0)
    return hidden @ p["generator.weight"].T + p["generator.bias"]


def _convs2s_reference(p, cfg, src, tgt):
    """ConvS2S as its docstring states it, with the explicit sqrt(1/2) factors (unfolded)."""
    s, k, d = math.sqrt(0.5), cfg.kernel_size, cfg.d_model
    e = p["src_embed.weight"][src] + p["src_pos.weight"][np.arange(src.shape[1])]
    x = e
    for i in range(cfg.n_layers):
        conv = rb.conv1d(x, p[f"encoder.{i}.conv.weight"], p[f"encoder.{i}.conv.bias"], 1,
                         (k - 1) // 2, k - 1 - (k - 1) // 2)
        x = s * (x + rb.glu(conv))
    z = x
    y = p["tgt_embed.weight"][tgt] + p["tgt_pos.weight"][np.arange(tgt.shape[1])]
    for i in range(cfg.n_layers):
        q = f"decoder.{i}"
        h = rb.glu(rb.conv1d(y, p[f"{q}.conv.weight"], p[f"{q}.conv.bias"], 1, k - 1, 0))
        query = h @ p[f"{q}.attn_in.weight"].T + p[f"{q}.attn_in.bias"]
        a = rt.softmax(query @ z.transpose(0, 2, 1) / math.sqrt(d)) @ (z + e)
        y = s * (y + h + a @ p[f"{q}.attn_out.weight"].T + p[f"{q}.attn_out.bias"])
    return y @ p["generator.weight"].T + p["generator.bias"]


REFERENCES = {LSTMSeq2Seq: _lstm_seq2seq_reference, ConvS2S: _convs2s_reference}


def _random_params(model, rng):
    """Non-zero biases everywhere so that every folded term is exercised."""
    return {k: rng.uniform(-0.5, 0.5, v.shape) for k, v in model.params.items()}


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
@pytest.mark.parametrize("kernel_size", [1, 4])
def test_forward_matches_equations(rng, model_cls, cfg_cls, kernel_size):
    extra = {"kernel_size": kernel_size} if cfg_cls is ConvS2SConfig else {}
    cfg = cfg_cls.tiny(dtype="float64", n_layers=3, **extra)
    params = _random_params(model_cls(cfg), rng)
    src, tgt = _ids(rng, cfg.src_vocab, 3, 11), _ids(rng, cfg.tgt_vocab, 3, 7)
    want = REFERENCES[model_cls](params, cfg, src, tgt)
    for backend in ("numpy", "cpu"):
        got = model_cls.from_params(cfg, params, backend=backend).forward(src, tgt)
        assert got.shape == (3, 7, cfg.tgt_vocab)
        assert rel_err(got, want) < TOL[np.float64]


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
@pytest.mark.parametrize("ns,nt", [(1, 1), (37, 5), (6, 37)])
def test_cpu_float32_matches_reference_backend(rng, model_cls, cfg_cls, ns, nt):
    cfg = cfg_cls.tiny()
    model = model_cls(cfg, seed=7, backend="cpu")
    src, tgt = _ids(rng, cfg.src_vocab, 2, ns), _ids(rng, cfg.tgt_vocab, 2, nt)
    got = model.forward(src, tgt)
    assert got.dtype == np.float32
    model.backend = "numpy"
    assert rel_err(got, model.forward(src, tgt)) < TOL[np.float32]


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_generate_is_the_argmax_loop_over_forward(rng, model_cls, cfg_cls, backend):
    cfg = cfg_cls.tiny(dtype="float64")
    model = model_cls(cfg, seed=3, backend=backend)
    src = _ids(rng, cfg.src_vocab, 3, 9)
    out = model.generate(src, max_new_tokens=8, bos_id=1)
    loop = np.full((3, 1), 1)
    for _ in range(8):
        loop = np.concatenate([loop, model.forward(src, loop)[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, loop)
    assert out.dtype == np.int64 and out.shape == (3, 9)


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
def test_generate_stops_at_eos(rng, model_cls, cfg_cls):
    cfg = cfg_cls.tiny()
    model = model_cls(cfg, seed=1)
    src = _ids(rng, cfg.src_vocab, 2, 5)
    free = model.generate(src, max_new_tokens=6, bos_id=0)
    eos = int(free[0, 2])  # the first sequence emits it at step 2
    out = model.generate(src, max_new_tokens=6, bos_id=0, eos_id=eos)
    assert out[0, 2] == eos and np.all(out[0, 2:] == eos)
    for row in out:
        hits = np.flatnonzero(row[1:] == eos)
        if hits.size:
            assert np.all(row[1 + hits[0]:] == eos)
    assert model.generate(src, max_new_tokens=0, bos_id=4).tolist() == [[4], [4]]


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
def test_decoder_is_causal(rng, model_cls, cfg_cls):
    cfg = cfg_cls.tiny()
    model = model_cls(cfg, seed=2)
    src, tgt = _ids(rng, cfg.src_vocab, 2, 8), _ids(rng, cfg.tgt_vocab, 2, 12)
    base = model.forward(src, tgt)
    tgt2 = tgt.copy()
    tgt2[:, 7] = (tgt2[:, 7] + 1) % cfg.tgt_vocab
    moved = model.forward(src, tgt2)
    np.testing.assert_array_equal(moved[:, :7], base[:, :7])
    assert np.abs(moved[:, 7] - base[:, 7]).max() > 1e-6


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
def test_save_load_roundtrip(rng, tmp_path, model_cls, cfg_cls):
    cfg = cfg_cls.tiny()
    model = model_cls(cfg, seed=11)
    path = model.save(tmp_path / "m")
    loaded = model_cls.load(path, backend="cpu")
    assert loaded.config == cfg
    for k, v in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)
    src, tgt = _ids(rng, cfg.src_vocab, 2, 5), _ids(rng, cfg.tgt_vocab, 2, 4)
    np.testing.assert_array_equal(loaded.forward(src, tgt), model.forward(src, tgt))
    assert model_cls.__name__ in repr(loaded)


@pytest.mark.parametrize("cfg_cls", [LSTMSeq2SeqConfig, ConvS2SConfig])
def test_config_validation(cfg_cls):
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        cfg_cls.tiny(d_model=0)
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        cfg_cls.tiny(n_layers=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cfg_cls.tiny(dtype="float16")
    with pytest.raises(ValueError, match="unknown"):
        cfg_cls.from_dict({**cfg_cls.tiny().to_dict(), "heads": 2})
    assert cfg_cls.from_dict(cfg_cls.tiny().to_dict()) == cfg_cls.tiny()
    if cfg_cls is ConvS2SConfig:
        with pytest.raises(ValueError, match="kernel_size must be a positive integer"):
            cfg_cls.tiny(kernel_size=0)


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
def test_bad_inputs(rng, model_cls, cfg_cls):
    cfg = cfg_cls.tiny()
    model = model_cls(cfg)
    src, tgt = _ids(rng, cfg.src_vocab, 2, 5), _ids(rng, cfg.tgt_vocab, 2, 4)
    with pytest.raises(TypeError, match="needs a"):
        model_cls(object())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward(src, np.full((2, 4), cfg.tgt_vocab))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward(np.full((2, 5), -1), tgt)
    with pytest.raises(TypeError, match="integer array"):
        model.forward(src.astype(np.float32), tgt)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        model.forward(src[0], tgt)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.forward(src, tgt[:1])
    with pytest.raises(ValueError, match="longer than the model's max_len"):
        model.forward(_ids(rng, cfg.src_vocab, 2, cfg.max_len + 1), tgt)
    with pytest.raises(ValueError, match="must not be empty"):
        model.forward(src[:, :0], tgt)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        model.generate(src, max_new_tokens=cfg.max_len, bos_id=1)
    with pytest.raises(ValueError, match="bos_id=47 is outside"):
        model.generate(src, max_new_tokens=2, bos_id=47)
    with pytest.raises(TypeError, match="max_new_tokens must be an integer"):
        model.generate(src, max_new_tokens=2.0, bos_id=1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(src, max_new_tokens=-1, bos_id=1)
