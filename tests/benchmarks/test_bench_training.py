"""Training-step benchmarks: one ``model.train_step`` (forward, loss, backward, Adam) of
``tfm.Transformer`` against PyTorch's eager training step of the same model (its twin in
tests/torch_models.py: nn.Transformer between the same embeddings and projection), on the
same weights, batch and thread count, float32 on the cpu backend, dropout off.

Sizes: the small and the base configurations at B = 8, n = 64 (source and target), label
smoothing 0.1. The base size runs only when timing (``make bench``); CI runs the small one
once. ``extra_info["flops"]``: the forward's counted FLOPs (``tfm.cost``) plus a backward of
twice the forward for every linear layer and 2.5 times for attention (which recomputes its
scores), Adam's few FLOPs per parameter left out.
"""

from __future__ import annotations

import numpy as np
import pytest

import tfm
from tfm import cost
from tfm.config import TransformerConfig

from conftest import large, measure, requires_torch, torch

if torch is not None:
    from torch_models import TorchTransformer, load_tfm_params, teacher_forcing_loss

B, N = 8, 64  # batch and sequence length (source and target)
LR = 1e-4  # constant: every benchmark round takes a step, the model must not diverge


def _config(preset: str) -> TransformerConfig:
    return TransformerConfig.preset(preset, dtype="float32", final_norm=True)  # as nn.Transformer


def training_flops(cfg, b: int, n_src: int, n_tgt: int) -> float:
    """Forward + backward FLOPs of a teacher-forced step (n_tgt - 1 positions predicted)."""
    nt = n_tgt - 1
    forward = cost.flops("transformer_forward", config=cfg, b=b, n_src=n_src, n_tgt=nt)
    h, dk = cfg.n_heads, cfg.d_model // cfg.n_heads
    attention = (cfg.n_encoder_layers * cost.flops("attention", b=b, h=h, nq=n_src, nk=n_src, dk=dk)
                 + cfg.n_decoder_layers * (cost.flops("attention", b=b, h=h, nq=nt, nk=nt, dk=dk, causal=True)
                                           + cost.flops("attention", b=b, h=h, nq=nt, nk=n_src, dk=dk)))
    return 3 * forward + 0.5 * attention


def _batch(cfg):
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg.src_vocab, size=(B, N)), rng.integers(0, cfg.tgt_vocab, size=(B, N))


@requires_torch
@pytest.mark.parametrize("impl", ["tfm", "torch"])
@pytest.mark.parametrize("preset", ["small", "base"])
def test_training_step(benchmark, preset, impl):
    if preset == "base":
        large(benchmark)
    cfg = _config(preset)
    src, tgt = _batch(cfg)
    model = tfm.Transformer(cfg, seed=0, backend="cpu")
    benchmark.group = f"training-step-{preset}"
    flops = training_flops(cfg, B, N, N)
    if impl == "tfm":
        opt = tfm.optim.Adam(model, lr=LR)
        first = model.train_step(opt, src, tgt, label_smoothing=0.1)  # compiles outside the timing
        loss = measure(benchmark, model.train_step, opt, src, tgt, flops=flops, label_smoothing=0.1)
    else:
        net = TorchTransformer(cfg).train()
        load_tfm_params(net, model.params)
        opt = torch.optim.Adam(net.parameters(), lr=LR, betas=(0.9, 0.98), eps=1e-9)
        ts, tt = torch.from_numpy(src), torch.from_numpy(tgt)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = teacher_forcing_loss(net, ts, tt, label_smoothing=0.1)
            loss.backward()
            opt.step()
            return loss.item()

        first = step()
        loss = measure(benchmark, step, flops=flops)
    # validated after the timing loop: the same starting loss as tfm's reference, and learning
    expected = tfm.Transformer(cfg, seed=0, backend="numpy").loss(src, tgt, label_smoothing=0.1)
    assert abs(first - expected) < 1e-4 * expected
    assert np.isfinite(loss) and loss < first
