"""Convolutional encoder-decoder in the style of ConvS2S (Gehring et al., 2017): the
convolutional baseline of Table 1.

With s = sqrt(1/2), one attention head and GLU(a, b) = a * sigmoid(b):

    e   = E_src[src] + P_src[0..Ns)                       learned positions (B, Ns, d)
    x_0 = e;  x_{l+1} = s (x_l + GLU(conv_l(x_l)))          ConvS2SBlocks, centred, k = kernel_size
    z   = x_L                                             encoder output
    g   = E_tgt[tgt] + P_tgt[0..Nt)
    y_0 = g;  for each decoder layer l:
          h       = GLU(causalconv_l(y_l))                no position sees a later target
          a       = softmax((h W_q^T + b_q) z^T / sqrt(d)) (z + e)
          y_{l+1} = s (y_l + h + a W_o^T + b_o)
    logits = y_L W_g^T + b_g                              (B, Nt, tgt_vocab)

The backend interface has no scalar multiply, so the s factors are folded into the weights
when they are uploaded: the kernels carry v_l = x_l / s^l instead of x_l. Each
:class:`~tfm.layers.ConvS2SBlock` (``encoder.{l}.conv``, and ``decoder.{l}.conv`` for the
decoder's h) folds its own input scale s^l (see its docstring); the last factors move into
the query, attention-output and generator weights. ``params`` and ``save`` keep the
unfolded weights. Matrices and convolution weights are Xavier-uniform, biases zero.

Greedy ``generate`` runs the encoder once and then the decoder over the growing prefix at
each step (the argmax loop over ``forward``, O(n^2) in the output length: a conv decoder
has no recurrent state to carry).
"""

from __future__ import annotations

import numpy as np

from ..config import ConvS2SConfig
from ..layers.conv import S, ConvS2SBlock
from ..layers.embedding import Embedding
from ..layers.module import Module, upload, xavier_uniform, zeros
from .base import Seq2Seq

__all__ = ["ConvS2S", "ConvS2SConfig"]


class _DecoderLayer(Module):
    """Decoder layer ``layer`` of ``n_layers`` in the carried scale: u -> u + h' + o', where
    h' = h / s^layer comes from the causal block's GLU conv and o' = a W_o^T + b_o over
    s^layer, attending to keys v_L = z / s^L and values (z + e) / s^L.

    Parameters ``conv.*`` (a causal ConvS2SBlock), ``attn_in.*`` (W_q, b_q), ``attn_out.*``
    (W_o, b_o).
    """

    def __init__(self, d_model: int, kernel_size: int, layer: int, n_layers: int, dtype):
        super().__init__(dtype)
        self.scale, self.memory_scale = S ** layer, S ** n_layers
        self.conv = self.add("conv", ConvS2SBlock(d_model, kernel_size, causal=True, input_scale=self.scale,
                                                  backend=None, dtype=dtype))
        for name in ("attn_in", "attn_out"):
            self.param(f"{name}.weight", (d_model, d_model), xavier_uniform)
            self.param(f"{name}.bias", (d_model,), zeros)

    def _device_params(self, bk):
        p, c, m = self._params, self.scale, self.memory_scale
        return upload(bk, {
            # query: h = c h', scored against z = m v_L
            "attn_in.weight": p["attn_in.weight"] * (m * c), "attn_in.bias": p["attn_in.bias"] * m,
            # output: a = m a', divided by c to stay in the carried scale
            "attn_out.weight": p["attn_out.weight"] * (m / c), "attn_out.bias": p["attn_out.bias"] / c,
        }, self.dtype)

    def forward(self, u, keys, values):
        bk, w = self.backend, self.weights
        h = self.conv.glu_conv(u)  # h / s^layer
        q = bk.split_heads(bk.linear(h, w["attn_in.weight"], w["attn_in.bias"]), 1)  # (B, 1, Nt, d)
        a = bk.merge_heads(bk.attention(q, keys, values))  # (B, Nt, d)
        return bk.add(bk.add(u, h), bk.linear(a, w["attn_out.weight"], w["attn_out.bias"]))


class ConvS2S(Seq2Seq):
    """ConvS2S-style convolutional encoder-decoder (module docstring), on any backend.

    >>> model = ConvS2S(ConvS2SConfig.tiny(), seed=0, backend="cpu")
    >>> logits = model.forward(src_ids, tgt_ids)          # (B, Nt, tgt_vocab)
    >>> out = model.generate(src_ids, max_new_tokens=20, bos_id=1, eos_id=2)
    """

    config_class = ConvS2SConfig

    def __init__(self, config, seed: int = 0, backend="cpu"):
        super().__init__(config)
        c, kw = self.config, {"backend": None, "dtype": self.config.dtype}
        d, k, n = c.d_model, c.kernel_size, c.n_layers
        self.src_embed = self.add("src_embed", Embedding(c.src_vocab, d, **kw))
        self.src_pos = self.add("src_pos", Embedding(c.max_len, d, **kw))
        self.tgt_embed = self.add("tgt_embed", Embedding(c.tgt_vocab, d, **kw))
        self.tgt_pos = self.add("tgt_pos", Embedding(c.max_len, d, **kw))
        self.encoder = [self.add(f"encoder.{i}.conv", ConvS2SBlock(d, k, input_scale=S ** i, **kw))
                        for i in range(n)]
        self.decoder = [self.add(f"decoder.{i}", _DecoderLayer(d, k, i, n, c.dtype)) for i in range(n)]
        self.param("generator.weight", (c.tgt_vocab, d), xavier_uniform)
        self.param("generator.bias", (c.tgt_vocab,), zeros)
        self._build(seed, backend)

    def _init_rule(self, name, shape, init):
        # Xavier-uniform for every matrix and convolution (not Conv1d's PyTorch default), zero biases.
        return xavier_uniform if len(shape) >= 2 else zeros

    def _device_params(self, bk):
        p = self._params
        return upload(bk, {"generator.weight": p["generator.weight"] * S ** self.config.n_layers,
                           "generator.bias": p["generator.bias"]}, self.dtype)

    def _embed(self, ids, table: Embedding, positions: Embedding, scale=1.0):
        pos = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape))
        return self.backend.add(table.forward(ids, scale), positions.forward(pos, scale))

    def _encode(self, src):
        """-> keys v_L and values (z + e) / s^L, each as one head (B, 1, Ns, d)."""
        bk = self.backend
        v = self._embed(src, self.src_embed, self.src_pos)
        for block in self.encoder:
            v = block.forward(v)
        e_scaled = self._embed(src, self.src_embed, self.src_pos, 1.0 / S ** self.config.n_layers)
        return bk.split_heads(v, 1), bk.split_heads(bk.add(v, e_scaled), 1)

    def _decode(self, tgt, keys, values):
        u = self._embed(tgt, self.tgt_embed, self.tgt_pos)
        for layer in self.decoder:
            u = layer.forward(u, keys, values)
        w = self.weights
        return self.backend.linear(u, w["generator.weight"], w["generator.bias"])  # (B, Nt, V)

    def _logits(self, src, tgt):
        return self._decode(tgt, *self._encode(src))

    def _decoding_step(self, src, max_new_tokens):
        keys, values = self._encode(src)

        def step(out, t):
            return self.backend.argmax(self._decode(np.ascontiguousarray(out[:, :t + 1]), keys, values))[:, t]

        return step
