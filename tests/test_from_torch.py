"""tfm.from_torch(nn.Transformer) against PyTorch itself, and tfm.Transformer against an
equivalent PyTorch composition (embeddings + PE + nn.Transformer + projection)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tfm
from tfm.config import TransformerConfig
from tfm.models import EncoderDecoder, Transformer

from conftest import HAVE_TORCH, rel_err, requires_torch

if HAVE_TORCH:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

pytestmark = [requires_torch, pytest.mark.filterwarnings("ignore::UserWarning:torch.*")]

TOL = {"float32": 1e-4, "float64": 1e-10}


def torch_transformer(d_model, nhead, n_enc, n_dec, d_ff, norm_first=False, activation="relu",
                      dtype="float32", seed=0, **kwargs):
    """A random nn.Transformer in eval mode; every parameter (LayerNorms and biases too) is
    perturbed so that a mixed-up weight cannot go unnoticed."""
    torch.manual_seed(seed)
    m = nn.Transformer(d_model=d_model, nhead=nhead, num_encoder_layers=n_enc, num_decoder_layers=n_dec,
                       dim_feedforward=d_ff, dropout=0.1, activation=activation, batch_first=True,
                       norm_first=norm_first, **kwargs)
    m = m.to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def run_torch(m, src, tgt, causal=True, src_pad=None, tgt_pad=None, mem_pad=None):
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    kw = {}
    if causal:
        dtype = next(m.parameters()).dtype
        kw = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=dtype),
                  tgt_is_causal=True)
    with torch.inference_mode():
        return m(t(src), t(tgt), src_key_padding_mask=t(src_pad), tgt_key_padding_mask=t(tgt_pad),
                 memory_key_padding_mask=t(mem_pad), **kw).numpy()


def right_padding(rng, b, n):
    """(B, N) True = padding, every row keeping at least one position."""
    return np.arange(n)[None, :] >= rng.integers(1, n + 1, size=b)[:, None]


# d_model, heads, encoder layers, decoder layers, d_ff, norm_first, activation
MODULES = {
    "post-relu-h4": (16, 4, 1, 1, 24, False, "relu"),
    "pre-gelu-h4": (16, 4, 2, 3, 40, True, "gelu"),
    "post-Frelu-h3": (15, 3, 3, 2, 37, False, "F.relu"),
    "pre-Fgelu-h5": (45, 5, 2, 2, 23, True, "F.gelu"),
    "post-nnReLU-h2": (8, 2, 2, 1, 16, False, "nn.ReLU"),
}


def activation(spec):
    return {"F.relu": F.relu, "F.gelu": F.gelu, "nn.GELU": nn.GELU(), "nn.ReLU": nn.ReLU()}.get(spec, spec)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 37, 5), (3, 6, 37)], ids=lambda s: "B{}-Ns{}-Nt{}".format(*s))
@pytest.mark.parametrize("name", MODULES)
def test_matches_pytorch(rng, name, shape, dtype):
    d, h, ne, nd, f, nf, act = MODULES[name]
    m = torch_transformer(d, h, ne, nd, f, nf, activation(act), dtype=dtype, seed=len(name))
    conv = tfm.from_torch(m, backend="cpu")
    assert type(conv) is EncoderDecoder and conv.dtype == np.dtype(dtype)
    b, ns, nt = shape
    src, tgt = rng.standard_normal((b, ns, d)).astype(dtype), rng.standard_normal((b, nt, d)).astype(dtype)
    src_pad, tgt_pad = right_padding(rng, b, ns), right_padding(rng, b, nt)
    tgt_pad[0, 0] = True  # target query 0 of row 0 sees no key at all
    out = conv(src, tgt, tgt_is_causal=True, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
               memory_key_padding_mask=src_pad)
    assert out.dtype == np.dtype(dtype) and out.shape == (b, nt, d)
    assert rel_err(out, run_torch(m, src, tgt, True, src_pad, tgt_pad, src_pad)) < TOL[dtype]
    assert rel_err(conv(src, tgt), run_torch(m, src, tgt)) < TOL[dtype]  # no masks at all


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_non_causal_target(rng, backend):
    m = torch_transformer(16, 4, 2, 2, 24, True, "gelu")
    conv = tfm.from_torch(m, backend=backend)
    src, tgt = rng.standard_normal((2, 9, 16), dtype=np.float32), rng.standard_normal((2, 7, 16), dtype=np.float32)
    out = conv(src, tgt, tgt_is_causal=False)
    assert rel_err(out, run_torch(m, src, tgt, causal=False)) < TOL["float32"]
    assert rel_err(out, conv(src, tgt, tgt_is_causal=True)) > 1e-3  # causality matters here


def test_custom_standard_stacks_convert(rng):
    """custom_encoder/custom_decoder built from the standard layers are supported (here also
    with an nn.GELU() module as the encoder's activation)."""
    torch.manual_seed(8)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 24, activation=nn.GELU(), batch_first=True),
                                num_layers=2, norm=nn.LayerNorm(16))
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 24, activation="gelu", batch_first=True),
                                num_layers=1, norm=nn.LayerNorm(16))
    m = nn.Transformer(16, 4, batch_first=True, custom_encoder=enc, custom_decoder=dec).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    conv = tfm.from_torch(m, backend="cpu")
    assert conv.config.activation == "gelu" and conv.config.n_encoder_layers == 2
    src, tgt = rng.standard_normal((2, 6, 16), dtype=np.float32), rng.standard_normal((2, 4, 16), dtype=np.float32)
    assert rel_err(conv(src, tgt), run_torch(m, src, tgt)) < TOL["float32"]


def slow_path(m, *args):
    """PyTorch's standard (non-fast-path) layers: train mode with dropout off."""
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        elif isinstance(mod, nn.MultiheadAttention):
            mod.dropout = 0.0
    m.train()
    try:
        with torch.no_grad():
            return run_torch(m, *args)
    finally:
        m.eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_fully_padded_rows(rng, norm_first):
    """A source or target sequence that is all padding: attention outputs zero for queries
    with no visible key, as PyTorch's standard path (its fast paths differ; see
    EncoderDecoder.__call__)."""
    m = torch_transformer(16, 4, 2, 2, 24, norm_first, "relu", seed=3)
    conv = tfm.from_torch(m, backend="cpu")
    src, tgt = rng.standard_normal((3, 7, 16), dtype=np.float32), rng.standard_normal((3, 5, 16), dtype=np.float32)
    src_pad, tgt_pad = right_padding(rng, 3, 7), right_padding(rng, 3, 5)
    src_pad[1], tgt_pad[2] = True, True
    args = (src, tgt, True, src_pad, tgt_pad, src_pad)
    out = conv(*args)
    assert np.isfinite(out).all()
    assert rel_err(out, slow_path(m, *args)) < TOL["float32"]
    if not norm_first:  # the nested-tensor fast path agrees too
        assert rel_err(out, run_torch(m, *args)) < TOL["float32"]


def test_unmasked_padded_memory_matches_the_standard_path(rng):
    """Without memory_key_padding_mask the decoder sees padded encoder positions, which
    PyTorch's nested-tensor fast path zeroes; tfm agrees with the standard path."""
    m = torch_transformer(16, 4, 2, 1, 24, False, "relu", seed=4)
    conv = tfm.from_torch(m, backend="cpu")
    src, tgt = rng.standard_normal((2, 8, 16), dtype=np.float32), rng.standard_normal((2, 5, 16), dtype=np.float32)
    src_pad = np.zeros((2, 8), dtype=bool)
    src_pad[:, 5:] = True
    args = (src, tgt, True, src_pad, None, None)
    assert rel_err(conv(*args), slow_path(m, *args)) < TOL["float32"]


def test_backend_switch_of_converted_model(rng):
    m = torch_transformer(15, 3, 1, 2, 20, True, "gelu")
    conv = tfm.from_torch(m, backend="numpy")
    src, tgt = rng.standard_normal((2, 4, 15), dtype=np.float32), rng.standard_normal((2, 3, 15), dtype=np.float32)
    ref = conv(src, tgt)
    assert ref.dtype == np.float64  # the numpy backend is the float64 reference
    assert rel_err(conv.to("cpu")(src, tgt), ref) < TOL["float32"]


def test_converted_model_save_load(tmp_path, rng):
    conv = tfm.from_torch(torch_transformer(15, 5, 2, 1, 20, True, "gelu"), backend="cpu")
    loaded = EncoderDecoder.load(conv.save(tmp_path / "converted"), backend="cpu")
    assert loaded.config == conv.config
    src, tgt = rng.standard_normal((2, 4, 15), dtype=np.float32), rng.standard_normal((2, 3, 15), dtype=np.float32)
    np.testing.assert_array_equal(loaded(src, tgt), conv(src, tgt))


# ---------------------------------------------------------------------- full model vs PyTorch
class TorchSeq2Seq(nn.Module if HAVE_TORCH else object):
    """Embeddings * sqrt(d) + sinusoidal PE -> nn.Transformer -> bias-free projection."""

    def __init__(self, core, src_vocab, tgt_vocab, max_len):
        super().__init__()
        d = core.d_model
        self.core = core
        self.src_embed = nn.Embedding(src_vocab, d)
        self.tgt_embed = nn.Embedding(tgt_vocab, d)
        self.generator = nn.Linear(d, tgt_vocab, bias=False)
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        div = torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d)
        pe = torch.zeros(max_len, d, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos / div)
        pe[:, 1::2] = torch.cos(pos / div)[:, : d // 2]
        self.register_buffer("pe", pe.float())

    def forward(self, src, tgt, src_pad, tgt_pad):
        d, nt = self.core.d_model, tgt.shape[1]
        x = self.src_embed(src) * math.sqrt(d) + self.pe[: src.shape[1]]
        y = self.tgt_embed(tgt) * math.sqrt(d) + self.pe[:nt]
        h = self.core(x, y, tgt_mask=nn.Transformer.generate_square_subsequent_mask(nt), tgt_is_causal=True,
                      src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
        return self.generator(h)


@pytest.mark.parametrize("norm_first, act, d, h", [(False, "relu", 16, 4), (True, "gelu", 15, 3)])
def test_transformer_matches_pytorch_composition(rng, norm_first, act, d, h):
    core = torch_transformer(d, h, 2, 2, 29, norm_first, act, seed=5)
    torch.manual_seed(6)
    peer = TorchSeq2Seq(core, src_vocab=41, tgt_vocab=37, max_len=64).eval()
    params = {k: v.detach().numpy() for k, v in core.state_dict().items()}
    params.update({k: v.detach().numpy() for k, v in peer.state_dict().items() if not k.startswith("core.")
                   and k != "pe"})
    cfg = TransformerConfig(d_model=d, n_heads=h, d_ff=29, n_encoder_layers=2, n_decoder_layers=2,
                            src_vocab=41, tgt_vocab=37, max_len=64, activation=act,
                            norm="pre" if norm_first else "post", final_norm=True)
    model = Transformer.from_params(cfg, params, backend="cpu")
    src, tgt = rng.integers(0, 41, size=(3, 23)), rng.integers(0, 37, size=(3, 11))
    src_pad, tgt_pad = right_padding(rng, 3, 23), right_padding(rng, 3, 11)
    with torch.inference_mode():
        expect = peer(*(torch.from_numpy(a) for a in (src, tgt, src_pad, tgt_pad))).numpy()
    assert rel_err(model.forward(src, tgt, src_pad, tgt_pad), expect) < TOL["float32"]


# ---------------------------------------------------------------------- what cannot convert
@pytest.mark.parametrize("make, err, match", [
    (lambda: nn.Transformer(16, 4, 1, 1, 24), ValueError, "needs nn.Transformer\\(..., batch_first=True\\)"),
    (lambda: nn.Transformer(16, 4, 1, 1, 24, batch_first=True, custom_encoder=nn.Identity()), TypeError,
     "custom_encoder/custom_decoder of type Identity/TransformerDecoder are not supported"),
    (lambda: nn.Transformer(16, 4, 1, 1, 24, batch_first=True, activation=F.silu), ValueError,
     "unsupported activation .*silu.* relu and exact gelu"),
    (lambda: nn.Transformer(16, 4, 1, 1, 24, batch_first=True, activation=nn.GELU(approximate="tanh")),
     ValueError, "unsupported activation GELU\\(approximate='tanh'\\)"),
    (lambda: nn.Transformer(16, 4, 1, 1, 24, batch_first=True, bias=False), ValueError,
     "LayerNorm without an affine weight and bias is not supported"),
    (lambda: nn.Transformer(16, 4, 1, 1, 24, batch_first=True).half(), TypeError,
     "must all be float32 or all float64, got \\['torch.float16'\\]"),
])
def test_unsupported_modules_raise(make, err, match):
    with pytest.raises(err, match=match):
        tfm.from_torch(make())


def test_custom_decoder_layers_raise():
    class MyLayer(nn.TransformerDecoderLayer):
        pass

    decoder = nn.TransformerDecoder(MyLayer(16, 4, 24, batch_first=True), num_layers=1, norm=nn.LayerNorm(16))
    m = nn.Transformer(16, 4, 1, 1, 24, batch_first=True, custom_decoder=decoder)
    with pytest.raises(TypeError, match="decoder.layers.0 is a MyLayer; only TransformerDecoderLayer"):
        tfm.from_torch(m)


def test_from_torch_rejects_other_objects():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got ndarray"):
        tfm.from_torch(np.zeros(3))
    with pytest.raises(TypeError, match="does not support torch.nn.modules.linear.Linear"):
        tfm.from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        tfm.from_torch(nn.Transformer(16, 4, 1, 1, 24, batch_first=True), backend="tpu")


@pytest.fixture(scope="module")
def converted():
    return tfm.from_torch(torch_transformer(16, 4, 1, 1, 24), backend="numpy")


@pytest.mark.parametrize("src, tgt, kwargs, err, match", [
    (np.zeros((2, 3, 16)), np.zeros((2, 3, 15)), {}, ValueError, "tgt must have d_model=16 features"),
    (np.zeros((3, 16)), np.zeros((2, 3, 16)), {}, ValueError, "src must have 3 dimensions"),
    (np.zeros((2, 3, 16), int), np.zeros((2, 3, 16)), {}, TypeError, "src must be float32 or float64"),
    (np.zeros((2, 3, 16)), np.zeros((1, 3, 16)), {}, ValueError, "src and tgt batch sizes differ: 2 != 1"),
    (np.zeros((2, 3, 16)), np.zeros((2, 4, 16)), {"tgt_is_causal": None}, TypeError, "tgt_is_causal must be a bool"),
    (np.zeros((2, 3, 16)), np.zeros((2, 4, 16)), {"src_key_padding_mask": np.zeros((2, 3), int)}, TypeError,
     "src_key_padding_mask must be boolean"),
    (np.zeros((2, 3, 16)), np.zeros((2, 4, 16)), {"memory_key_padding_mask": np.zeros((2, 4), bool)}, ValueError,
     r"memory_key_padding_mask must have shape \(2, 3\)"),
    (np.zeros((2, 3, 16)), np.zeros((2, 4, 16)), {"tgt_key_padding_mask": np.zeros((2, 3), bool)}, ValueError,
     r"tgt_key_padding_mask must have shape \(2, 4\)"),
])
def test_converted_call_bad_input(converted, src, tgt, kwargs, err, match):
    with pytest.raises(err, match=match):
        converted(src, tgt, **kwargs)
