"""PyTorch twins of tfm's models, for training parity tests and the training-step benchmarks.

``TorchTransformer(config)`` computes what ``tfm.Transformer(config)`` computes (with
``final_norm=True``: ``nn.Transformer`` always ends each stack with a LayerNorm):
embeddings * sqrt(d_model) + sinusoidal positions, ``nn.Transformer`` (batch-first) and a
bias-free output projection. ``load_tfm_params`` copies a tfm model's parameters into it,
``teacher_forcing_loss`` is ``model.loss``'s definition written with PyTorch's own
cross-entropy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class TorchTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        if not c.final_norm or c.tie_embeddings:
            raise ValueError("the twin has nn.Transformer's final norms and an untied output projection")
        dtype = getattr(torch, c.dtype)
        self.src_embed = nn.Embedding(c.src_vocab, c.d_model, dtype=dtype)
        self.tgt_embed = nn.Embedding(c.tgt_vocab, c.d_model, dtype=dtype)
        self.core = nn.Transformer(d_model=c.d_model, nhead=c.n_heads, num_encoder_layers=c.n_encoder_layers,
                                   num_decoder_layers=c.n_decoder_layers, dim_feedforward=c.d_ff, dropout=0.0,
                                   activation=c.activation, layer_norm_eps=c.layer_norm_eps, batch_first=True,
                                   norm_first=c.norm == "pre", dtype=dtype)
        self.generator = nn.Linear(c.d_model, c.tgt_vocab, bias=False, dtype=dtype)
        pos = torch.arange(c.max_len, dtype=torch.float64)[:, None]
        div = torch.pow(10000.0, torch.arange(0, c.d_model, 2, dtype=torch.float64) / c.d_model)
        pe = torch.zeros(c.max_len, c.d_model, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / div), torch.cos(pos / div)[:, : c.d_model // 2]
        self.register_buffer("pe", pe.to(dtype), persistent=False)
        self.scale = math.sqrt(c.d_model)

    def forward(self, src, tgt, src_pad=None, tgt_pad=None):
        """Logits (B, Nt, tgt_vocab); pads (B, N) bool, True = padding, as tfm's."""
        ns, nt = src.shape[1], tgt.shape[1]
        x = self.src_embed(src) * self.scale + self.pe[:ns]
        y = self.tgt_embed(tgt) * self.scale + self.pe[:nt]
        causal = torch.ones(nt, nt, dtype=torch.bool).triu(1)  # True = masked, as the pads
        return self.generator(self.core(x, y, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                                        tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad))


def load_tfm_params(net: TorchTransformer, params: dict) -> None:
    """Copy a tfm.Transformer's parameters (its ``params``) into the twin."""
    state = {(f"core.{k}" if k.startswith(("encoder.", "decoder.")) else k): torch.tensor(np.asarray(v))
             for k, v in params.items()}
    net.load_state_dict(state, strict=True)


def tfm_grad_names(net: TorchTransformer) -> dict:
    """The twin's parameter name -> the tfm parameter name."""
    return {name: name[len("core."):] if name.startswith("core.") else name for name, _ in net.named_parameters()}


def teacher_forcing_loss(net, src, tgt, src_pad=None, tgt_pad=None, label_smoothing=0.0):
    """Mean token cross-entropy of tgt[:, 1:] given tgt[:, :-1]; padded targets left out."""
    logits = net(src, tgt[:, :-1], src_pad, None if tgt_pad is None else tgt_pad[:, :-1])
    labels = tgt[:, 1:].clone()
    if tgt_pad is not None:
        labels[tgt_pad[:, 1:]] = -100  # F.cross_entropy's ignore_index
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           label_smoothing=label_smoothing)
