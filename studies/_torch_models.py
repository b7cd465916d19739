"""PyTorch twins of tfm's models, for timing a training step beside tfm's on the same weights.

``twin(model, device)`` returns an ``nn.Module`` that computes what the tfm model computes,
with its parameters copied in, or raises ``Skip`` (unavailable) saying why there is none:

* ``tfm.Transformer`` (with ``final_norm=True``: ``nn.Transformer`` always ends each stack
  with a LayerNorm; untied embeddings): embeddings * sqrt(d_model) + sinusoidal positions,
  ``nn.Transformer`` (batch-first, post-norm, dropout 0) and a bias-free output projection;
* ``tfm.LSTMSeq2Seq``: ``nn.LSTM`` encoder and decoder stacks, the decoder starting from the
  encoder's final states, Luong's "general" score (q = W_a s, softmax(q M^T / sqrt(d)) M) and
  relu(W_c [context; s] + b_c) before the output projection;
* ``tfm.ConvS2S``: none (PyTorch has no such module, and this project writes no twin of it).

``TrainStep(net, lr)`` is PyTorch's eager training step with the paper's Adam (betas 0.9,
0.98, eps 1e-9): zero the gradients, the teacher-forced loss (``tgt[:, :-1]`` in,
``tgt[:, 1:]`` predicted, mean cross-entropy with label smoothing, as ``model.loss``),
backward, ``optimizer.step()``; it returns the loss as a float (a host synchronisation).
"""

from __future__ import annotations

import math


def _positions(torch, max_len: int, d: int, dtype):
    """Sinusoidal positions (section 3.5): PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    div = torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.zeros(max_len, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos / div)
    pe[:, 1::2] = torch.cos(pos / div)[:, : d // 2]
    return pe.to(dtype)


def _transformer(torch, c):
    nn = torch.nn

    class TransformerTwin(nn.Module):
        def __init__(self):
            super().__init__()
            self.src_embed = nn.Embedding(c.src_vocab, c.d_model)
            self.tgt_embed = nn.Embedding(c.tgt_vocab, c.d_model)
            self.core = nn.Transformer(d_model=c.d_model, nhead=c.n_heads, num_encoder_layers=c.n_encoder_layers,
                                       num_decoder_layers=c.n_decoder_layers, dim_feedforward=c.d_ff, dropout=0.0,
                                       activation=c.activation, layer_norm_eps=c.layer_norm_eps, batch_first=True,
                                       norm_first=c.norm == "pre")
            self.generator = nn.Linear(c.d_model, c.tgt_vocab, bias=False)
            self.register_buffer("pe", _positions(torch, c.max_len, c.d_model, torch.float32), persistent=False)
            self.scale = math.sqrt(c.d_model)

        def forward(self, src, tgt):
            ns, nt = src.shape[1], tgt.shape[1]
            x = self.src_embed(src) * self.scale + self.pe[:ns]
            y = self.tgt_embed(tgt) * self.scale + self.pe[:nt]
            causal = torch.ones(nt, nt, dtype=torch.bool, device=src.device).triu(1)  # True = masked
            return self.generator(self.core(x, y, tgt_mask=causal, tgt_is_causal=True))

    return TransformerTwin()


def _lstm_seq2seq(torch, c):
    nn, F = torch.nn, torch.nn.functional

    class LSTMSeq2SeqTwin(nn.Module):
        def __init__(self):
            super().__init__()
            d = c.d_model
            self.src_embed = nn.Embedding(c.src_vocab, d)
            self.tgt_embed = nn.Embedding(c.tgt_vocab, d)
            self.encoder = nn.LSTM(d, d, c.n_layers, batch_first=True)
            self.decoder = nn.LSTM(d, d, c.n_layers, batch_first=True)
            self.attn = nn.Linear(d, d, bias=False)
            self.combine = nn.Linear(2 * d, d)
            self.generator = nn.Linear(d, c.tgt_vocab)

        def forward(self, src, tgt):
            memory, states = self.encoder(self.src_embed(src))  # (B, Ns, d)
            s, _ = self.decoder(self.tgt_embed(tgt), states)  # (B, Nt, d)
            scores = self.attn(s) @ memory.transpose(1, 2) / math.sqrt(c.d_model)  # (B, Nt, Ns)
            context = torch.softmax(scores, dim=-1) @ memory  # (B, Nt, d)
            return self.generator(F.relu(self.combine(torch.cat([context, s], dim=-1))))

    return LSTMSeq2SeqTwin()


def twin(model, device: str = "cpu"):
    """The PyTorch twin of a tfm model with its parameters (module docstring)."""
    import numpy as np
    import torch

    import tfm
    from tfm.bench import Skip

    c = model.config
    if isinstance(model, tfm.Transformer):
        if not c.final_norm or c.tie_embeddings:
            raise Skip("the PyTorch twin is nn.Transformer, which ends each stack with a LayerNorm: the tfm model "
                       "needs final_norm=True and untied embeddings")
        net = _transformer(torch, c)
        rename = {k: (f"core.{k}" if k.startswith(("encoder.", "decoder.")) else k) for k in model.params}
    elif isinstance(model, tfm.LSTMSeq2Seq):
        net = _lstm_seq2seq(torch, c)
        rename = {k: k for k in model.params}
    else:
        raise Skip(f"no PyTorch twin of {type(model).__name__} (PyTorch has no such module)")
    if np.dtype(c.dtype) != np.float32:
        raise Skip(f"the PyTorch twins run in float32, the model is {c.dtype}")
    state = {rename[k]: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in model.params.items()}
    net.load_state_dict(state, strict=True)
    return net.to(device).train()


def teacher_forcing_loss(net, src, tgt, label_smoothing: float = 0.0):
    """model.loss's definition: mean cross-entropy of tgt[:, 1:] given tgt[:, :-1]."""
    import torch

    logits = net(src, tgt[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1),
                                             label_smoothing=label_smoothing)


class TrainStep:
    """PyTorch's eager training step of ``net`` (module docstring); call it with (src, tgt) tensors."""

    def __init__(self, net, lr: float, label_smoothing: float = 0.0):
        import torch

        self.net, self.label_smoothing = net, label_smoothing
        self.opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)

    def __call__(self, src, tgt) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = teacher_forcing_loss(self.net, src, tgt, self.label_smoothing)
        loss.backward()
        self.opt.step()
        return float(loss.item())
