"""tfm.Transformer: forward against a paper-style float64 composition of tfm.reference,
cpu (float32/float64) against the numpy backend with the same weights, cached greedy
generation against the uncached argmax loop, save/load, initialisation and every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import tfm
from tfm import reference as ref
from tfm.config import TransformerConfig
from tfm.models import Transformer
from tfm.models.base import Model, xavier_uniform

from conftest import TOL, rel_err

# A whole model compounds a few kernel errors per layer: a looser bound than one kernel's.
MODEL_TOL = {"float32": 1e-4, "float64": 1e-10}

CONFIGS = {
    # odd head counts with d_model 15 / 45, odd vocabularies, Ns != Nt below
    "post-relu-h3": dict(d_model=15, n_heads=3, d_ff=37, n_encoder_layers=2, n_decoder_layers=1,
                         src_vocab=29, tgt_vocab=31, max_len=64),
    "pre-gelu-h5-final": dict(d_model=45, n_heads=5, d_ff=23, n_encoder_layers=1, n_decoder_layers=2,
                              src_vocab=97, tgt_vocab=61, max_len=64, norm="pre", activation="gelu",
                              final_norm=True),
    "post-gelu-tied-final": dict(d_model=16, n_heads=4, d_ff=40, n_encoder_layers=1, n_decoder_layers=1,
                                 src_vocab=23, tgt_vocab=19, max_len=64, activation="gelu",
                                 final_norm=True, tie_embeddings=True),
    "pre-relu-no-encoder-layers": dict(d_model=12, n_heads=1, d_ff=8, n_encoder_layers=0,
                                       n_decoder_layers=2, src_vocab=11, tgt_vocab=13, max_len=64,
                                       norm="pre", final_norm=True),
}
SHAPES = [(1, 1, 1), (2, 37, 5), (3, 7, 37)]  # (B, Ns, Nt)


def make_config(name, dtype="float64", **overrides):
    return TransformerConfig(**{**CONFIGS[name], "dtype": dtype, **overrides})


def random_batch(rng, cfg, b, ns, nt, pad=True):
    """Ids plus right-padding masks (True = padding); the last target row is all padding."""
    src = rng.integers(0, cfg.src_vocab, size=(b, ns))
    tgt = rng.integers(0, cfg.tgt_vocab, size=(b, nt))
    if not pad:
        return src, tgt, None, None
    src_len = rng.integers(1, ns + 1, size=b)
    tgt_len = rng.integers(1, nt + 1, size=b)
    tgt_len[-1] = 0 if b > 1 else tgt_len[-1]
    src_pad = np.arange(ns)[None, :] >= src_len[:, None]
    tgt_pad = np.arange(nt)[None, :] >= tgt_len[:, None]
    return src, tgt, src_pad, tgt_pad


# ---------------------------------------------------------------------- the oracle
def paper_forward(cfg, P, src, tgt, src_pad=None, tgt_pad=None):
    """Section 3 written out with tfm.reference, one line per sublayer (float64)."""
    d, h, eps = cfg.d_model, cfg.n_heads, cfg.layer_norm_eps
    keep_src = None if src_pad is None else ~src_pad[:, None, None, :]  # (B, 1, 1, Ns)
    keep_tgt = None if tgt_pad is None else ~tgt_pad[:, None, None, :]  # (B, 1, 1, Nt)

    def mha(prefix, x_q, x_kv, mask, causal):
        w, b = P[f"{prefix}.in_proj_weight"], P[f"{prefix}.in_proj_bias"]
        return ref.multi_head_attention(x_q, x_kv, w[:d], b[:d], w[d:2 * d], b[d:2 * d], w[2 * d:],
                                        b[2 * d:], P[f"{prefix}.out_proj.weight"],
                                        P[f"{prefix}.out_proj.bias"], h, mask=mask, causal=causal)

    def ffn(prefix, x):
        return ref.position_wise_ffn(x, P[f"{prefix}.linear1.weight"], P[f"{prefix}.linear1.bias"],
                                     P[f"{prefix}.linear2.weight"], P[f"{prefix}.linear2.bias"],
                                     cfg.activation)

    def ln(prefix, x):
        return ref.layer_norm(x, P[f"{prefix}.weight"], P[f"{prefix}.bias"], eps)

    def sublayer(x, f, norm):
        return ln(norm, x + f(x)) if cfg.norm == "post" else x + f(ln(norm, x))

    x = ref.embed(src, P["src_embed.weight"], math.sqrt(d)) + ref.positional_encoding(src.shape[1], d)
    for i in range(cfg.n_encoder_layers):
        p = f"encoder.layers.{i}"
        x = sublayer(x, lambda z: mha(f"{p}.self_attn", z, z, keep_src, False), f"{p}.norm1")
        x = sublayer(x, lambda z: ffn(p, z), f"{p}.norm2")
    memory = ln("encoder.norm", x) if cfg.final_norm else x  # (B, Ns, d)

    y = ref.embed(tgt, P["tgt_embed.weight"], math.sqrt(d)) + ref.positional_encoding(tgt.shape[1], d)
    for i in range(cfg.n_decoder_layers):
        p = f"decoder.layers.{i}"
        y = sublayer(y, lambda z: mha(f"{p}.self_attn", z, z, keep_tgt, True), f"{p}.norm1")
        y = sublayer(y, lambda z: mha(f"{p}.multihead_attn", z, memory, keep_src, False), f"{p}.norm2")
        y = sublayer(y, lambda z: ffn(p, z), f"{p}.norm3")
    if cfg.final_norm:
        y = ln("decoder.norm", y)
    w_out = P["tgt_embed.weight"] if cfg.tie_embeddings else P["generator.weight"]
    return ref.linear(y, w_out)  # (B, Nt, tgt_vocab)


def argmax_loop(model, src, n_new, bos, eos=None, src_pad=None):
    """Greedy decoding the slow way: a full forward pass per generated token."""
    out = np.full((src.shape[0], 1), bos, dtype=np.int64)
    for _ in range(n_new):
        nxt = model.forward(src, out, src_pad_mask=src_pad)[:, -1].argmax(-1)
        if eos is not None:
            nxt[(out == eos).any(axis=1)] = eos
        out = np.concatenate([out, nxt[:, None]], axis=1)
        if eos is not None and (out == eos).any(axis=1).all():
            break
    return out


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Ns{}-Nt{}".format(*s))
@pytest.mark.parametrize("name", CONFIGS)
def test_numpy_backend_is_the_paper(rng, name, shape):
    cfg = make_config(name)
    model = Transformer(cfg, seed=int(rng.integers(1 << 30)), backend="numpy")
    src, tgt, src_pad, tgt_pad = random_batch(rng, cfg, *shape)
    out = model.forward(src, tgt, src_pad_mask=src_pad, tgt_pad_mask=tgt_pad)
    assert out.dtype == np.float64 and out.shape == (shape[0], shape[2], cfg.tgt_vocab)
    assert rel_err(out, paper_forward(cfg, model.params, src, tgt, src_pad, tgt_pad)) < TOL["float64"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Ns{}-Nt{}".format(*s))
@pytest.mark.parametrize("name", CONFIGS)
def test_cpu_matches_reference_backend(rng, name, shape, dtype):
    cfg = make_config(name, dtype)
    model = Transformer(cfg, seed=int(rng.integers(1 << 30)), backend="cpu")
    oracle = Transformer.from_params(cfg, model.params, backend="numpy")
    src, tgt, src_pad, tgt_pad = random_batch(rng, cfg, *shape)
    out = model.forward(src, tgt, src_pad_mask=src_pad, tgt_pad_mask=tgt_pad)
    assert out.dtype == np.dtype(dtype)
    assert rel_err(out, oracle.forward(src, tgt, src_pad, tgt_pad)) < MODEL_TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_naive_and_fused_attention_agree(rng, dtype):
    cfg = make_config("pre-gelu-h5-final", dtype)
    model = Transformer(cfg, seed=3, backend="cpu")
    src, tgt, src_pad, tgt_pad = random_batch(rng, cfg, 2, 37, 5)
    fused = model.forward(src, tgt, src_pad, tgt_pad)
    model.impl = "naive"
    assert rel_err(model.forward(src, tgt, src_pad, tgt_pad), fused) < MODEL_TOL[dtype]


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_log_probs_are_log_softmax_of_logits(rng, backend):
    cfg = make_config("post-relu-h3", "float32")
    model = Transformer(cfg, seed=5, backend=backend)
    src, tgt, src_pad, tgt_pad = random_batch(rng, cfg, 3, 7, 6)
    logits = model.forward(src, tgt, src_pad, tgt_pad)
    logp = model.forward(src, tgt, src_pad, tgt_pad, log_probs=True)
    assert logp.dtype == logits.dtype and logp.shape == logits.shape
    assert rel_err(logp, ref.log_softmax(logits)) < MODEL_TOL["float32"]
    assert np.allclose(np.exp(logp.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_call_is_forward(rng):
    cfg = make_config("post-relu-h3")
    model = Transformer(cfg, seed=1, backend="numpy")
    src, tgt, _, _ = random_batch(rng, cfg, 2, 5, 4, pad=False)
    np.testing.assert_array_equal(model(src, tgt), model.forward(src, tgt))


def test_padding_keys_are_ignored(rng):
    """Changing padded source tokens or padded target tokens leaves the unpadded outputs alone."""
    cfg = make_config("pre-gelu-h5-final")
    model = Transformer(cfg, seed=2, backend="numpy")
    src, tgt, _, _ = random_batch(rng, cfg, 2, 9, 6, pad=False)
    src_pad = np.zeros_like(src, dtype=bool)
    src_pad[:, 6:] = True
    tgt_pad = np.zeros_like(tgt, dtype=bool)
    tgt_pad[:, 4:] = True
    out = model.forward(src, tgt, src_pad, tgt_pad)
    src2, tgt2 = src.copy(), tgt.copy()
    src2[:, 6:] = (src2[:, 6:] + 1) % cfg.src_vocab
    tgt2[:, 4:] = (tgt2[:, 4:] + 1) % cfg.tgt_vocab
    out2 = model.forward(src2, tgt2, src_pad, tgt_pad)
    np.testing.assert_allclose(out2[:, :4], out[:, :4], rtol=1e-12, atol=1e-12)
    assert not np.allclose(model.forward(src2, tgt2)[:, :4], out[:, :4])  # the masks mattered


# ---------------------------------------------------------------------- generation
@pytest.fixture
def poisoned_caches(monkeypatch):
    """The cpu backend's ``empty`` (the KV caches) returns NaN-filled arrays: reading a
    cache row before it is written poisons the logits."""
    bk = tfm.get_backend("cpu")
    monkeypatch.setattr(bk, "empty", lambda shape, dtype: np.full(shape, np.nan, dtype=dtype))
    return bk


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", CONFIGS)
def test_generate_equals_argmax_loop(rng, name, seed, poisoned_caches):
    cfg = make_config(name, "float32")
    model = Transformer(cfg, seed=seed, backend="cpu")
    src, _, src_pad, _ = random_batch(rng, cfg, 3, 11, 1)
    got = model.generate(src, max_new_tokens=9, bos_id=1, src_pad_mask=src_pad)
    assert got.dtype == np.int64 and got.shape == (3, 10)
    np.testing.assert_array_equal(got, argmax_loop(model, src, 9, 1, src_pad=src_pad))


def test_generate_on_reference_backend(rng):
    cfg = make_config("pre-gelu-h5-final")
    model = Transformer(cfg, seed=4, backend="numpy")
    src = rng.integers(0, cfg.src_vocab, size=(2, 6))
    np.testing.assert_array_equal(model.generate(src, 7, bos_id=0), argmax_loop(model, src, 7, 0))


def test_generate_eos_sticks_and_stops_early(rng, poisoned_caches):
    cfg = make_config("post-relu-h3", "float32", tgt_vocab=5)  # few tokens: eos comes soon
    model = Transformer(cfg, seed=7, backend="cpu")
    src = rng.integers(0, cfg.src_vocab, size=(4, 8))
    free = model.generate(src, 12, bos_id=0)
    eos = int(free[0, 2])  # a token row 0 emits as its second generated token
    got = model.generate(src, 12, bos_id=0, eos_id=eos)
    np.testing.assert_array_equal(got, argmax_loop(model, src, 12, 0, eos=eos))
    for row, free_row in zip(got, free):
        hits = np.flatnonzero(row[1:] == eos)
        stop = 1 + hits[0] if hits.size else row.size
        np.testing.assert_array_equal(row[:stop], free_row[:stop])  # same tokens until eos
        assert (row[stop:] == eos).all()  # then eos forever
    if got.shape[1] < 13:  # stopped early: every row done, and not one step later than needed
        assert (got[:, 1:] == eos).any(axis=1).all()
        assert not (got[:, 1:-1] == eos).any(axis=1).all()


def test_generate_zero_new_tokens_returns_bos(rng):
    model = Transformer(make_config("post-relu-h3"), backend="numpy")
    out = model.generate(rng.integers(0, 29, size=(2, 3)), 0, bos_id=4)
    np.testing.assert_array_equal(out, np.full((2, 1), 4))


# ---------------------------------------------------------------------- save / load / backends
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_roundtrip_is_bitwise(tmp_path, rng, dtype):
    cfg = make_config("post-gelu-tied-final", dtype)
    model = Transformer(cfg, seed=11, backend="cpu")
    src, tgt, src_pad, tgt_pad = random_batch(rng, cfg, 2, 6, 5)
    path = model.save(tmp_path / "model")
    assert path.endswith(".npz")
    loaded = Transformer.load(path, backend="cpu")
    assert loaded.config == cfg and loaded.params.keys() == model.params.keys()
    np.testing.assert_array_equal(loaded.forward(src, tgt, src_pad, tgt_pad),
                                  model.forward(src, tgt, src_pad, tgt_pad))


def test_load_rejects_foreign_and_mismatched_files(tmp_path):
    cfg = make_config("post-relu-h3")
    model = Transformer(cfg, backend="numpy")
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="not a tfm model file"):
        Transformer.load(tmp_path / "plain.npz")

    class Other(Model):
        config_class = TransformerConfig

        def __init__(self, config, seed=0, backend="cpu"):
            super().__init__(config)
            self.param("w", (2, 2), xavier_uniform)
            self._build(seed, backend)

    path = Other(cfg, backend="numpy").save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="holds a Other, not a Transformer"):
        Transformer.load(path)
    params = dict(model.params)
    params.pop("generator.weight")
    with pytest.raises(ValueError, match=r"missing \['generator.weight'\]"):
        Transformer.from_params(cfg, params)
    params["generator.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="'generator.weight' has shape"):
        Transformer.from_params(cfg, params)


@pytest.mark.parametrize("name", ["Transformer", "EncoderDecoder", "LSTMSeq2Seq", "ConvS2S"])
def test_loads_files_saved_by_1d4e43a(tmp_path, name):
    """Files saved before the models were built from tfm.layers (commit 1d4e43a; float64
    models, tests/data/saved_1d4e43a.npz holds each file's bytes and what the model computed
    then on the numpy backend) load and compute the same."""
    with np.load(Path(__file__).parent / "data" / "saved_1d4e43a.npz") as data:
        path = tmp_path / f"{name}.npz"
        path.write_bytes(data[f"{name}.file"].tobytes())
        model = getattr(tfm, name).load(path, backend="numpy")
        out = model(data["x"], data["y"]) if name == "EncoderDecoder" else model.forward(data["src"], data["tgt"])
        assert rel_err(out, data[f"{name}.out"]) < TOL["float64"]


def test_switching_backend_keeps_the_weights(rng):
    cfg = make_config("pre-gelu-h5-final", "float64")
    model = Transformer(cfg, seed=9, backend="numpy")
    src, tgt, src_pad, tgt_pad = random_batch(rng, cfg, 2, 5, 4)
    on_numpy = model.forward(src, tgt, src_pad, tgt_pad)
    assert model.to("cpu") is model and model.backend is tfm.get_backend("cpu")
    assert rel_err(model.forward(src, tgt, src_pad, tgt_pad), on_numpy) < MODEL_TOL["float64"]


def test_initialisation_is_deterministic_xavier():
    cfg = make_config("post-relu-h3", "float32")
    a, b, c = (Transformer(cfg, seed=s, backend="numpy") for s in (0, 0, 1))
    for name, p in a.params.items():
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p, b.params[name])
        if p.ndim == 2:  # Xavier-uniform: U(-r, r), r = sqrt(6 / (fan_in + fan_out))
            r = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
            assert np.abs(p).max() <= r and np.abs(p).max() > 0.8 * r
            assert abs(p.std() / (r / math.sqrt(3)) - 1) < 0.25
            assert not np.array_equal(p, c.params[name])
        elif "norm" in name and name.endswith(".weight"):  # LayerNorm gains
            np.testing.assert_array_equal(p, 1.0)
        else:
            np.testing.assert_array_equal(p, 0.0)
    assert a.n_params == sum(p.size for p in a.params.values())


def test_tied_embeddings_share_the_projection():
    cfg = make_config("post-gelu-tied-final")
    model = Transformer(cfg, backend="numpy")
    assert "generator.weight" not in model.params
    untied = Transformer(cfg.replace(tie_embeddings=False), backend="numpy")
    assert untied.n_params == model.n_params + cfg.tgt_vocab * cfg.d_model


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_model():
    return Transformer(make_config("post-relu-h3", max_len=10), backend="numpy")


@pytest.mark.parametrize("src, tgt, kwargs, err, match", [
    (np.zeros((2, 3)), np.zeros((2, 3), int), {}, TypeError, "src_ids must be an integer array"),
    (np.zeros((2, 3), int), np.zeros((2, 3), bool), {}, TypeError, "tgt_ids must be an integer array"),
    (np.zeros(3, int), np.zeros((1, 3), int), {}, ValueError, r"src_ids must have shape \(batch, length\)"),
    (np.zeros((1, 3), int), np.zeros((1, 1, 3), int), {}, ValueError, "tgt_ids must have shape"),
    (np.zeros((1, 0), int), np.zeros((1, 3), int), {}, ValueError, "src_ids must not be empty"),
    (np.full((1, 3), 29), np.zeros((1, 3), int), {}, ValueError, r"token id 29 outside the vocabulary \[0, 29\)"),
    (np.zeros((1, 3), int), np.full((1, 3), -1), {}, ValueError, "tgt_ids holds token id -1"),
    (np.zeros((1, 11), int), np.zeros((1, 3), int), {}, ValueError, "length 11, longer than the model's max_len=10"),
    (np.zeros((1, 3), int), np.zeros((1, 11), int), {}, ValueError, "tgt_ids has length 11"),
    (np.zeros((2, 3), int), np.zeros((3, 3), int), {}, ValueError, "batch sizes differ: 2 != 3"),
    (np.zeros((2, 3), int), np.zeros((2, 4), int), {"src_pad_mask": np.zeros((2, 3))}, TypeError,
     r"src_pad_mask must be boolean \(True = padding\)"),
    (np.zeros((2, 3), int), np.zeros((2, 4), int), {"tgt_pad_mask": np.zeros((2, 3), bool)}, ValueError,
     r"tgt_pad_mask must have shape \(2, 4\)"),
    (np.zeros((2, 3), int), np.zeros((2, 4), int), {"log_probs": "yes"}, TypeError, "log_probs must be a bool"),
])
def test_forward_bad_input(small_model, src, tgt, kwargs, err, match):
    with pytest.raises(err, match=match):
        small_model.forward(src, tgt, **kwargs)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(max_new_tokens=10, bos_id=1), ValueError, "1 \\(bos\\) \\+ max_new_tokens=10 exceeds the model's max_len=10"),
    (dict(max_new_tokens=-1, bos_id=1), ValueError, "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.0, bos_id=1), TypeError, "max_new_tokens must be an integer"),
    (dict(max_new_tokens=2, bos_id=31), ValueError, r"bos_id=31 is outside the target vocabulary \[0, 31\)"),
    (dict(max_new_tokens=2, bos_id=1, eos_id=-2), ValueError, "eos_id=-2 is outside"),
    (dict(max_new_tokens=2, bos_id=1, eos_id="2"), TypeError, "eos_id must be an integer or None"),
    (dict(max_new_tokens=2, bos_id=1, src_pad_mask=np.zeros((2, 4), bool)), ValueError,
     r"src_pad_mask must have shape \(2, 3\)"),
])
def test_generate_bad_input(small_model, kwargs, err, match):
    with pytest.raises(err, match=match):
        small_model.generate(np.zeros((2, 3), int), **kwargs)


def test_generate_checks_source_ids(small_model):
    with pytest.raises(ValueError, match="src_ids holds token id 99"):
        small_model.generate(np.full((1, 2), 99), 3, bos_id=0)
    with pytest.raises(ValueError, match="src_ids has length 11"):
        small_model.generate(np.zeros((1, 11), int), 3, bos_id=0)


def test_constructor_bad_input():
    cfg = make_config("post-relu-h3")
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of numpy, cpu, cuda"):
        Transformer(cfg, backend="tpu")
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        Transformer(cfg, backend="numpy", impl="flash")
    with pytest.raises(TypeError, match="Transformer needs a TransformerConfig, got dict"):
        Transformer(CONFIGS["post-relu-h3"], backend="numpy")
    with pytest.raises(TypeError, match="seed must be an integer"):
        Transformer(cfg, seed=1.5, backend="numpy")
    model = Transformer(cfg, backend="numpy")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        model.backend = "gpu"
    assert model.backend.name == "numpy"  # a failed switch leaves the model where it was


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=45, n_heads=4), "d_model=45 is not divisible by n_heads=4"),
    (dict(activation="swish"), "activation must be one of \\('relu', 'gelu'\\), got 'swish'"),
    (dict(norm="sandwich"), "norm must be one of \\('post', 'pre'\\), got 'sandwich'"),
    (dict(dtype="float16"), "dtype must be one of \\('float32', 'float64'\\), got 'float16'"),
    (dict(d_model=0), "d_model must be a positive integer, got 0"),
    (dict(n_decoder_layers=-1), "n_decoder_layers must be a non-negative integer"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be > 0"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


def test_config_presets_and_dict_roundtrip():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of base, big, small, tiny"):
        TransformerConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown TransformerConfig fields: \\['colour'\\]"):
        TransformerConfig.from_dict({"colour": 1})
    base = TransformerConfig.preset("base")
    assert (base.d_model, base.n_heads, base.d_ff, base.n_encoder_layers, base.d_head) == (512, 8, 2048, 6, 64)
    assert TransformerConfig.from_dict(TransformerConfig.big().to_dict()) == TransformerConfig.big()
