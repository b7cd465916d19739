"""Model-level benchmarks: tfm.Transformer forward, from_torch(nn.Transformer) against PyTorch's
eager nn.Transformer, and cached greedy generation. float32 on the cpu backend; PyTorch runs
under inference_mode with as many threads as Numba (tests/benchmarks/conftest.py).

Groups put tfm and its PyTorch peer side by side (``--benchmark-group-by=group``). The base
configuration (d_model 512, 8 heads, d_ff 2048, 6+6 layers, batch 8, n = 128) runs only when
timing (``make bench``); CI runs the tiny and small sizes once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import tfm
from tfm import cost
from tfm.config import TransformerConfig

from conftest import large, measure, requires_torch, torch

# preset -> (batch, source length, target length)
SIZES = {"tiny": (2, 16, 16), "small": (4, 64, 64), "base": (8, 128, 128)}


def _config(preset: str) -> TransformerConfig:
    # final_norm: as nn.Transformer, the peer; base: vocabularies of 32000
    return TransformerConfig.preset(preset, dtype="float32", final_norm=True)


def _inputs(cfg, b, ns, nt, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.src_vocab, size=(b, ns)), rng.integers(0, cfg.tgt_vocab, size=(b, nt))


def _maybe_large(benchmark, preset):
    if preset == "base":
        large(benchmark)


def _torch_peer(cfg):
    """nn.Transformer with the config's sizes, eval mode (dropout off), float32."""
    torch.manual_seed(0)
    return torch.nn.Transformer(d_model=cfg.d_model, nhead=cfg.n_heads, num_encoder_layers=cfg.n_encoder_layers,
                                num_decoder_layers=cfg.n_decoder_layers, dim_feedforward=cfg.d_ff,
                                activation=cfg.activation, batch_first=True,
                                norm_first=cfg.norm == "pre").eval()


class _TorchSeq2Seq(torch.nn.Module if torch is not None else object):
    """PyTorch equivalent of tfm.Transformer: embeddings * sqrt(d) + PE, nn.Transformer, projection."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.core = _torch_peer(cfg)
        self.src_embed = torch.nn.Embedding(cfg.src_vocab, d)
        self.tgt_embed = torch.nn.Embedding(cfg.tgt_vocab, d)
        self.generator = torch.nn.Linear(d, cfg.tgt_vocab, bias=False)
        pos = torch.arange(cfg.max_len, dtype=torch.float32)[:, None]
        div = torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float32) / d)
        pe = torch.zeros(cfg.max_len, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / div), torch.cos(pos / div)
        self.register_buffer("pe", pe)
        self.scale = math.sqrt(d)

    def forward(self, src, tgt):
        nt = tgt.shape[1]
        x = self.src_embed(src) * self.scale + self.pe[: src.shape[1]]
        y = self.tgt_embed(tgt) * self.scale + self.pe[:nt]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(nt)
        return self.generator(self.core(x, y, tgt_mask=mask, tgt_is_causal=True))


def _torch_forward(model, *args, **kwargs):
    with torch.inference_mode():
        return model(*args, **kwargs)


@pytest.mark.parametrize("impl", ["tfm", "torch"])
@pytest.mark.parametrize("preset", list(SIZES))
def test_transformer_forward(benchmark, preset, impl):
    """The complete model: ids -> logits (B, Nt, tgt_vocab)."""
    _maybe_large(benchmark, preset)
    if impl == "torch" and torch is None:
        pytest.skip("PyTorch is not installed")
    cfg = _config(preset)
    b, ns, nt = SIZES[preset]
    src, tgt = _inputs(cfg, b, ns, nt)
    benchmark.group = f"transformer-forward-{preset}"
    flops = cost.flops("transformer_forward", config=cfg, b=b, n_src=ns, n_tgt=nt)
    if impl == "tfm":
        model = tfm.Transformer(cfg, seed=0, backend="cpu")
        model.forward(src, tgt)  # compile outside the timing
        out = measure(benchmark, model.forward, src, tgt, flops=flops)
    else:
        peer = _TorchSeq2Seq(cfg).eval()
        out = measure(benchmark, _torch_forward, peer, torch.from_numpy(src), torch.from_numpy(tgt),
                      flops=flops).numpy()
    assert out.shape == (b, nt, cfg.tgt_vocab) and np.isfinite(out).all()


@requires_torch
@pytest.mark.parametrize("impl", ["tfm", "torch"])
@pytest.mark.parametrize("preset", list(SIZES))
def test_encoder_decoder_vs_torch(benchmark, preset, impl):
    """from_torch(nn.Transformer) against the same nn.Transformer, on embedded inputs."""
    _maybe_large(benchmark, preset)
    cfg = _config(preset)
    b, ns, nt = SIZES[preset]
    rng = np.random.default_rng(1)
    src = rng.standard_normal((b, ns, cfg.d_model), dtype=np.float32)
    tgt = rng.standard_normal((b, nt, cfg.d_model), dtype=np.float32)
    m = _torch_peer(cfg)
    benchmark.group = f"encoder-decoder-{preset}"
    flops = cost.flops("transformer_forward", config=cfg, b=b, n_src=ns, n_tgt=nt, output_projection=False)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(nt)
    expect = _torch_forward(m, torch.from_numpy(src), torch.from_numpy(tgt), tgt_mask=mask,
                            tgt_is_causal=True).numpy()
    if impl == "tfm":
        conv = tfm.from_torch(m, backend="cpu")
        conv(src, tgt)  # compile outside the timing
        out = measure(benchmark, conv, src, tgt, flops=flops)
    else:
        out = measure(benchmark, _torch_forward, m, torch.from_numpy(src), torch.from_numpy(tgt),
                      flops=flops, tgt_mask=mask, tgt_is_causal=True).numpy()
    # validated after the timing loop, against PyTorch
    assert np.linalg.norm(out - expect) / np.linalg.norm(expect) < 1e-4


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_generate_cached(benchmark, preset):
    """Greedy decoding of 32 tokens with the key/value cache (encoder once, one token per step)."""
    _maybe_large(benchmark, preset)
    cfg = _config(preset)
    b, ns, _ = SIZES[preset]
    n_new = 32
    src, _ = _inputs(cfg, b, ns, 1)
    model = tfm.Transformer(cfg, seed=0, backend="cpu")
    model.generate(src, 2, bos_id=1)  # compile outside the timing
    benchmark.group = f"transformer-generate-{preset}"
    flops = cost.flops("transformer_generate", config=cfg, b=b, n_src=ns, n_new=n_new)
    out = measure(benchmark, model.generate, src, n_new, 1, flops=flops)
    assert out.shape == (b, 1 + n_new)
