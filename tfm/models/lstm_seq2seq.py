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

import numpy as np

from ..config import LSTMSeq2SeqConfig
from ..layers.attention import key_mask
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
        return upload(bk, self._slots_from_params(self._params), self.dtype)

    # W_c's column blocks are the slots an optimizer updates: Adam is elementwise, so updating
    # the blocks is updating W_c; the host joins them (gradients, trained weights).
    def _slots(self):
        return {name: self.weights[name] for name in ("attn.weight", "combine.context", "combine.state",
                                                      "combine.bias")}

    def _params_from_slots(self, slots):
        return {"attn.weight": slots["attn.weight"],
                "combine.weight": np.concatenate([slots["combine.context"], slots["combine.state"]], axis=1),
                "combine.bias": slots["combine.bias"]}

    def _slots_from_params(self, params):
        d = self.d_model
        return {"attn.weight": params["attn.weight"], "combine.context": params["combine.weight"][:, :d],
                "combine.state": params["combine.weight"][:, d:], "combine.bias": params["combine.bias"]}

    def forward(self, s, memory):
        """Decoder states s (B, Nt, d), memory as one head (B, 1, Ns, d) -> H (B, Nt, d)."""
        bk, w = self.backend, self.weights
        q = bk.split_heads(bk.linear(s, w["attn.weight"]), 1)  # (B, 1, Nt, d)
        context = bk.merge_heads(bk.attention(q, memory, memory))  # (B, Nt, d)
        return bk.activation(bk.add(bk.linear(context, w["combine.context"]),
                                    bk.linear(s, w["combine.state"], w["combine.bias"])), "relu")

    def forward_train(self, s, memory, mask=None):
        """``forward`` keeping what the backward needs; ``mask`` hides memory positions."""
        bk, w = self.backend, self.weights
        q = bk.split_heads(bk.linear(s, w["attn.weight"]), 1)  # (B, 1, Nt, d)
        heads, lse = bk.attention_train(q, memory, memory, mask=mask)  # (B, 1, Nt, d)
        context = bk.merge_heads(heads)  # (B, Nt, d)
        pre = bk.add(bk.linear(context, w["combine.context"]), bk.linear(s, w["combine.state"], w["combine.bias"]))
        return bk.activation(pre, "relu"), (s, memory, mask, q, heads, lse, context, pre)

    def backward(self, saved, dout):
        """-> ((ds, dmemory), gradients by slot); dmemory (B, 1, Ns, d) sums its uses as keys and values."""
        bk, w = self.backend, self.weights
        s, memory, mask, q, heads, lse, context, pre = saved
        dpre = bk.activation_backward(pre, dout, "relu")  # (B, Nt, d)
        dcontext, dw_context, _ = bk.linear_backward(context, w["combine.context"], dpre, bias=False)
        ds, dw_state, db = bk.linear_backward(s, w["combine.state"], dpre)
        dq, dk, dv = bk.attention_backward(q, memory, memory, heads, lse, bk.split_heads(dcontext, 1), mask=mask)
        bk.axpy(dk, dv)
        ds_query, dw_attn, _ = bk.linear_backward(s, w["attn.weight"], bk.merge_heads(dq), bias=False)
        bk.axpy(ds, ds_query)
        return (ds, dk), {"attn.weight": dw_attn, "combine.context": dw_context, "combine.state": dw_state,
                          "combine.bias": db}


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

    # --------------------------------------------------------------- training
    def forward_train(self, src, tgt, src_pad=None, tgt_pad=None):
        """Teacher-forced logits with what :meth:`backward` needs. Dropout (training mode): on
        the embeddings and on the outputs of both LSTM stacks. ``src_pad`` hides padded source
        positions from the attention (the encoder still reads them; pad on the right); padded
        targets only leave the loss."""
        bk, p = self.backend, self.config.dropout
        e, src_saved = self.src_embed.forward_train(src)  # (B, Ns, d)
        e, e_key = self._dropout(e, p)
        (memory, states), enc_saved = self.encoder.forward_train(e)  # (B, Ns, d)
        memory, m_key = self._dropout(memory, p)
        t, tgt_saved = self.tgt_embed.forward_train(tgt)  # (B, Nt, d)
        t, t_key = self._dropout(t, p)
        (s, _), dec_saved = self.decoder.forward_train(t, states)  # (B, Nt, d)
        s, s_key = self._dropout(s, p)
        h, attn_saved = self.attention.forward_train(s, bk.split_heads(memory, 1), key_mask(bk, src_pad))
        logits, gen_saved = self.generator.forward_train(h)  # (B, Nt, V)
        return logits, (src_saved, e_key, enc_saved, m_key, tgt_saved, t_key, dec_saved, s_key, attn_saved,
                        gen_saved)

    def backward(self, saved, dlogits):
        """dlogits (B, Nt, tgt_vocab) -> ((), gradients by slot): the decoder's initial states
        carry the gradient back into the encoder's final states."""
        (src_saved, e_key, enc_saved, m_key, tgt_saved, t_key, dec_saved, s_key, attn_saved,
         gen_saved) = saved
        p = self.config.dropout
        (dh,), g_gen = self.generator.backward(gen_saved, dlogits)
        (ds, dmemory), g_attn = self.attention.backward(attn_saved, dh)
        (dt, dstates), g_dec = self.decoder.backward(dec_saved, self._dropout_with(ds, p, s_key))
        _, g_tgt = self.tgt_embed.backward(tgt_saved, self._dropout_with(dt, p, t_key))
        dmemory = self._dropout_with(self.backend.merge_heads(dmemory), p, m_key)  # (B, Ns, d)
        (de, _), g_enc = self.encoder.backward(enc_saved, dmemory, dstates)
        _, g_src = self.src_embed.backward(src_saved, self._dropout_with(de, p, e_key))
        grads = {}
        for name, g in (("src_embed", g_src), ("tgt_embed", g_tgt), ("encoder", g_enc), ("decoder", g_dec),
                        (None, g_attn), ("generator", g_gen)):
            self._merge(grads, name, g)
        return (), grads

    def _decoding_step(self, src, max_new_tokens):
        # One decoder step per token, carrying each layer's (h, c).
        bk = self.backend
        memory, states = self._encode(src)
        carry = {"states": states}

        def step(out, t):
            s, carry["states"] = self.decoder.forward(self.tgt_embed.forward(out[:, t:t + 1]), carry["states"])
            return bk.argmax(self._output(s, memory))[:, 0]

        return step
