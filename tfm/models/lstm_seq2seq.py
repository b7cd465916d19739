"""LSTM encoder-decoder with Luong-style global attention: the recurrent baseline of Table 1.

    e = E_src[src]                                        (B, Ns, d)
    M, (h_l, c_l) = LSTM_enc^{n_layers}(e)                encoder stack, zero initial states
    S = LSTM_dec^{n_layers}(E_tgt[tgt]; (h_l, c_l))       decoder stack starts from the encoder's final states
    C = softmax((S W_a^T) M^T / sqrt(d)) M                Luong's "general" score (one head)
    H = relu(W_c [C; S] + b_c)                            the attentional hidden state
    logits = H W_g^T + b_g                                (B, Nt, tgt_vocab)

Luong et al. (2015) use tanh in the attentional layer; the backend interface offers relu
(the Transformer's activation), which costs the same. No input feeding, so the decoder runs
over the whole target at once in teacher forcing; greedy ``generate`` carries each layer's
(h, c) from step to step and equals the argmax loop over ``forward``. The stacks are
:class:`tfm.LSTM` s named ``encoder`` and ``decoder`` (parameters ``encoder.weight_ih_l0``
...), initialised as PyTorch does (U(-1/sqrt(d), 1/sqrt(d))); embeddings and matrices
Xavier-uniform.
"""

from __future__ import annotations

from ..config import LSTMSeq2SeqConfig
from ..layers.embedding import Embedding
from ..layers.linear import Linear
from ..layers.module import Module, upload, xavier_uniform, zeros
from ..layers.recurrent import LSTM
from .base import Seq2Seq

__all__ = ["LSTMSeq2Seq", "LSTMSeq2SeqConfig"]


class _LuongAttention(Module):
    """C = softmax((S W_a^T) M^T / sqrt(d)) M, then H = relu(W_c [C; S] + b_c).

    Parameters ``attn.weight`` (W_a, d x d), ``combine.weight`` (W_c, d x 2d) and
    ``combine.bias``. The backend has no concatenation: W_c is uploaded as its two column
    blocks, and W_c [C; S] is computed as W_cc C + W_cs S.
    """

    def __init__(self, d_model: int, dtype):
        super().__init__(dtype)
        self.d_model = d_model
        self.param("attn.weight", (d_model, d_model), xavier_uniform)
        self.param("combine.weight", (d_model, 2 * d_model), xavier_uniform)
        self.param("combine.bias", (d_model,), zeros)

    def _device_params(self, bk):
        p, d = self._params, self.d_model
        return upload(bk, {"attn.weight": p["attn.weight"], "combine.context": p["combine.weight"][:, :d],
                           "combine.state": p["combine.weight"][:, d:], "combine.bias": p["combine.bias"]},
                      self.dtype)

    def forward(self, s, memory):
        """Decoder states s (B, Nt, d), memory as one head (B, 1, Ns, d) -> H (B, Nt, d)."""
        bk, w = self.backend, self.weights
        q = bk.split_heads(bk.linear(s, w["attn.weight"]), 1)  # (B, 1, Nt, d)
        context = bk.merge_heads(bk.attention(q, memory, memory))  # (B, Nt, d)
        return bk.activation(bk.add(bk.linear(context, w["combine.context"]),
                                    bk.linear(s, w["combine.state"], w["combine.bias"])), "relu")


class LSTMSeq2Seq(Seq2Seq):
    """LSTM encoder-decoder with attention (module docstring), on any backend.

    >>> model = LSTMSeq2Seq(LSTMSeq2SeqConfig.tiny(), seed=0, backend="cpu")
    >>> logits = model.forward(src_ids, tgt_ids)          # (B, Nt, tgt_vocab)
    >>> out = model.generate(src_ids, max_new_tokens=20, bos_id=1, eos_id=2)
    """

    config_class = LSTMSeq2SeqConfig

    def __init__(self, config, seed: int = 0, backend="cpu"):
        super().__init__(config)
        c, kw = self.config, {"backend": None, "dtype": self.config.dtype}
        d = c.d_model
        self.src_embed = self.add("src_embed", Embedding(c.src_vocab, d, **kw))
        self.tgt_embed = self.add("tgt_embed", Embedding(c.tgt_vocab, d, **kw))
        self.encoder = self.add("encoder", LSTM(d, d, c.n_layers, **kw))
        self.decoder = self.add("decoder", LSTM(d, d, c.n_layers, **kw))
        self.attention = self.add(None, _LuongAttention(d, c.dtype))
        self.generator = self.add("generator", Linear(d, c.tgt_vocab, **kw))
        self._build(seed, backend)

    def _encode(self, src):
        """-> memory as one attention head (B, 1, Ns, d) and each layer's final (h, c)."""
        memory, states = self.encoder.forward(self.src_embed.forward(src))
        return self.backend.split_heads(memory, 1), states

    def _output(self, s, memory):
        return self.generator.forward(self.attention.forward(s, memory))  # (B, Nt, V)

    def _logits(self, src, tgt):
        memory, states = self._encode(src)
        s, _ = self.decoder.forward(self.tgt_embed.forward(tgt), states)
        return self._output(s, memory)

    def _decoding_step(self, src, max_new_tokens):
        # One decoder step per token, carrying each layer's (h, c).
        bk = self.backend
        memory, states = self._encode(src)
        carry = {"states": states}

        def step(out, t):
            s, carry["states"] = self.decoder.forward(self.tgt_embed.forward(out[:, t:t + 1]), carry["states"])
            return bk.argmax(self._output(s, memory))[:, 0]

        return step
