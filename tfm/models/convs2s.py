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
from ..layers.attention import key_mask
from ..layers.module import Module, scaled, upload, xavier_uniform, zeros
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

    def _folds(self) -> dict:
        """Parameter name -> the constant folded into it at upload."""
        c, m = self.scale, self.memory_scale
        # query: h = c h', scored against z = m v_L; output: a = m a', divided by c to stay in
        # the carried scale
        return {"attn_in.weight": m * c, "attn_in.bias": m, "attn_out.weight": m / c, "attn_out.bias": 1.0 / c}

    def _device_params(self, bk):
        p = self._params
        folded = upload(bk, {name: p[name] * f for name, f in self._folds().items()}, self.dtype)
        # The parameters themselves too: an optimizer updates them and refolds (_refresh).
        return {**folded, **upload(bk, {f"true.{name}": a for name, a in p.items()}, self.dtype)}

    def _slots(self):
        return {name: self.weights[f"true.{name}"] for name in self._params}

    def _refresh(self):
        w, bk = self.weights, self.backend
        for name, f in self._folds().items():
            w[name] = scaled(bk, w[f"true.{name}"], f)

    def forward(self, u, keys, values):
        bk, w = self.backend, self.weights
        h = self.conv.glu_conv(u)  # h / s^layer
        q = bk.split_heads(bk.linear(h, w["attn_in.weight"], w["attn_in.bias"]), 1)  # (B, 1, Nt, d)
        a = bk.merge_heads(bk.attention(q, keys, values))  # (B, Nt, d)
        return bk.add(bk.add(u, h), bk.linear(a, w["attn_out.weight"], w["attn_out.bias"]))

    def forward_train(self, u, keys, values, mask=None, p: float = 0.0):
        """``forward`` with dropout (probability p) on h, attending where ``mask`` allows."""
        bk, w = self.backend, self.weights
        h, conv_saved = self.conv.glu_conv_train(u)  # (B, Nt, d), h / s^layer
        h, key = self._dropout(h, p)
        q = bk.split_heads(bk.linear(h, w["attn_in.weight"], w["attn_in.bias"]), 1)  # (B, 1, Nt, d)
        a, lse = bk.attention_train(q, keys, values, mask=mask)  # (B, 1, Nt, d)
        merged = bk.merge_heads(a)  # (B, Nt, d)
        out = bk.add(bk.add(u, h), bk.linear(merged, w["attn_out.weight"], w["attn_out.bias"]))
        return out, (conv_saved, h, key, p, q, keys, values, mask, a, lse, merged)

    def backward(self, saved, dy):
        """-> ((du, dkeys, dvalues), gradients of the parameters)."""
        bk, w = self.backend, self.weights
        conv_saved, h, key, p, q, keys, values, mask, a, lse, merged = saved
        dmerged, dw_out, db_out = bk.linear_backward(merged, w["attn_out.weight"], dy)  # (B, Nt, d)
        dq, dkeys, dvalues = bk.attention_backward(q, keys, values, a, lse, bk.split_heads(dmerged, 1), mask=mask)
        dh, dw_in, db_in = bk.linear_backward(h, w["attn_in.weight"], bk.merge_heads(dq))  # (B, Nt, d)
        bk.axpy(dh, dy)  # h also joins the residual sum
        du, conv_grads = self.conv.glu_conv_backward(conv_saved, self._dropout_with(dh, p, key))
        bk.axpy(du, dy)  # the residual
        folds = self._folds()
        grads = {name: scaled(bk, g, folds[name]) for name, g in (
            ("attn_in.weight", dw_in), ("attn_in.bias", db_in), ("attn_out.weight", dw_out),
            ("attn_out.bias", db_out))}
        return (du, dkeys, dvalues), self._merge(grads, "conv", conv_grads)


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
                           "generator.bias": p["generator.bias"], "true.generator.weight": p["generator.weight"]},
                      self.dtype)

    def _slots(self):
        return {"generator.weight": self.weights["true.generator.weight"],
                "generator.bias": self.weights["generator.bias"]}

    def _refresh(self):
        w = self.weights
        w["generator.weight"] = scaled(self.backend, w["true.generator.weight"], S ** self.config.n_layers)

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

    # --------------------------------------------------------------- training
    def _embed_train(self, ids, table: Embedding, positions: Embedding, scale=1.0, mask_of=None):
        """``_embed`` with dropout on the sum; ``mask_of``: the saved state of an earlier call
        whose mask to use again (the encoder's attention values add the dropped source
        embedding a second time, in another scale)."""
        bk = self.backend
        pos = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape))
        e = bk.add(table.forward(ids, scale), positions.forward(pos, scale))
        if mask_of is None:
            e, key = self._dropout(e, self.config.dropout)
        else:
            key = mask_of[3]
            e = self._dropout_with(e, self.config.dropout, key)
        return e, (ids, pos, scale, key)

    def _embed_backward(self, saved, de, side: str, grads: dict):
        """Add the gradients of the token and position tables of ``side`` ("src" or "tgt")."""
        ids, pos, scale, key = saved
        de = self._dropout_with(de, self.config.dropout, key)
        for name, table_ids in ((f"{side}_embed", ids), (f"{side}_pos", pos)):
            table = getattr(self, name)
            g = self.backend.embedding_backward(table_ids, de, table.num_embeddings, scale)
            if f"{name}.weight" in grads:
                self.backend.axpy(grads[f"{name}.weight"], g)
            else:
                grads[f"{name}.weight"] = g

    def forward_train(self, src, tgt, src_pad=None, tgt_pad=None):
        """Teacher-forced logits with what :meth:`backward` needs. Dropout (training mode): on
        the embedding sums and on each block's GLU output. ``src_pad`` hides padded source
        positions from the decoder's attention; ``tgt_pad`` has nothing to hide (the decoder
        is causal), padded targets only leave the loss."""
        bk, c = self.backend, self.config
        v, src_saved = self._embed_train(src, self.src_embed, self.src_pos)  # (B, Ns, d)
        enc_saved = []
        for block in self.encoder:
            g, block_saved = block.glu_conv_train(v)
            g, key = self._dropout(g, c.dropout)
            v = bk.add(v, g)  # v_{l+1}, carried scale
            enc_saved.append((block_saved, key))
        e_scaled, scaled_saved = self._embed_train(src, self.src_embed, self.src_pos, 1.0 / S ** c.n_layers,
                                                   mask_of=src_saved)
        keys, values = bk.split_heads(v, 1), bk.split_heads(bk.add(v, e_scaled), 1)  # (B, 1, Ns, d)
        mask = key_mask(bk, src_pad)
        u, tgt_saved = self._embed_train(tgt, self.tgt_embed, self.tgt_pos)  # (B, Nt, d)
        dec_saved = []
        for layer in self.decoder:
            u, layer_saved = layer.forward_train(u, keys, values, mask, c.dropout)
            dec_saved.append(layer_saved)
        w = self.weights
        logits = bk.linear(u, w["generator.weight"], w["generator.bias"])  # (B, Nt, V)
        return logits, (src_saved, enc_saved, scaled_saved, tgt_saved, dec_saved, u)

    def backward(self, saved, dlogits):
        """dlogits (B, Nt, tgt_vocab) -> ((), gradients of every parameter)."""
        bk, c = self.backend, self.config
        src_saved, enc_saved, scaled_saved, tgt_saved, dec_saved, u = saved
        du, dw_gen, db_gen = bk.linear_backward(u, self.weights["generator.weight"], dlogits)
        grads = {"generator.weight": scaled(bk, dw_gen, S ** c.n_layers), "generator.bias": db_gen}
        dkeys = dvalues = None  # every decoder layer attends to the same keys and values
        for i in reversed(range(c.n_layers)):
            (du, dk, dv), g = self.decoder[i].backward(dec_saved[i], du)
            self._merge(grads, f"decoder.{i}", g)
            if dkeys is None:
                dkeys, dvalues = dk, dv
            else:
                bk.axpy(dkeys, dk)
                bk.axpy(dvalues, dv)
        self._embed_backward(tgt_saved, du, "tgt", grads)
        dvalues = bk.merge_heads(dvalues)  # (B, Ns, d): of v_L + e_scaled
        self._embed_backward(scaled_saved, dvalues, "src", grads)
        dv = bk.merge_heads(dkeys)  # (B, Ns, d)
        bk.axpy(dv, dvalues)
        for i in reversed(range(c.n_layers)):
            block_saved, key = enc_saved[i]
            dblock, g = self.encoder[i].glu_conv_backward(block_saved, self._dropout_with(dv, c.dropout, key))
            bk.axpy(dblock, dv)  # the residual
            self._merge(grads, f"encoder.{i}.conv", g)
            dv = dblock
        self._embed_backward(src_saved, dv, "src", grads)
        return (), grads

    def _decoding_step(self, src, max_new_tokens):
        keys, values = self._encode(src)

        def step(out, t):
            return self.backend.argmax(self._decode(np.ascontiguousarray(out[:, :t + 1]), keys, values))[:, t]

        return step
