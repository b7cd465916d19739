"""Convolutional encoder-decoder in the style of ConvS2S (Gehring et al., 2017): the
convolutional baseline of Table 1.

With s = sqrt(1/2), one attention head and GLU(a, b) = a * sigmoid(b):

    e   = E_src[src] + P_src[0..Ns)                       learned positions (B, Ns, d)
    x_0 = e;  x_{l+1} = s (x_l + GLU(conv_l(x_l)))          centred convs, C -> 2C, k = kernel_size
    z   = x_L                                             encoder output
    g   = E_tgt[tgt] + P_tgt[0..Nt)
    y_0 = g;  for each decoder layer l:
          h       = GLU(causalconv_l(y_l))                no position sees a later target
          a       = softmax((h W_q^T + b_q) z^T / sqrt(d)) (z + e)
          y_{l+1} = s (y_l + h + a W_o^T + b_o)
    logits = y_L W_g^T + b_g                              (B, Nt, tgt_vocab)

The backend interface has no scalar multiply, so the s factors are folded into the weights
when they are uploaded (``_device_params``): the kernels carry v_l = x_l / s^l instead of
x_l, which turns every block into v_{l+1} = v_l + GLU(conv'(v_l)) with the GLU's gate
half scaled by s^l and its value bias by s^-l, and the last factors move into the query,
attention-output and generator weights. ``params`` and ``save`` keep the unfolded weights.

Greedy ``generate`` runs the encoder once and then the decoder over the growing prefix at
each step (the argmax loop over ``forward``, O(n^2) in the output length: a conv decoder
has no recurrent state to carry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import Model, greedy, xavier_uniform, zeros
from .lstm_seq2seq import _ConfigMixin, check_generate_args, check_pair, validate_config

__all__ = ["ConvS2S", "ConvS2SConfig"]

S = math.sqrt(0.5)


@dataclass(frozen=True)
class ConvS2SConfig(_ConfigMixin):
    """Hyper-parameters of :class:`ConvS2S`; ``n_layers`` blocks in each stack."""

    d_model: int = 512
    n_layers: int = 6
    kernel_size: int = 3
    src_vocab: int = 32000
    tgt_vocab: int = 32000
    max_len: int = 1024
    dtype: str = "float32"

    def __post_init__(self):
        validate_config(self, ("d_model", "n_layers", "kernel_size", "src_vocab", "tgt_vocab", "max_len"))

    @classmethod
    def tiny(cls, **overrides) -> "ConvS2SConfig":
        """For tests: d_model=32, 2 layers, k=3, odd-sized vocabularies."""
        return cls(**{"d_model": 32, "n_layers": 2, "kernel_size": 3, "src_vocab": 53,
                      "tgt_vocab": 47, "max_len": 128, **overrides})


def _fold_glu_conv(weight, bias, c):
    """GLU(conv(c v)) / c == GLU(conv'(v)): value half bias / c, gate half weight * c."""
    half = weight.shape[0] // 2
    w, b = weight.copy(), bias.copy()
    w[half:] *= c
    b[:half] /= c
    return w, b


class ConvS2S(Model):
    """ConvS2S-style convolutional encoder-decoder (module docstring), on any backend.

    >>> model = ConvS2S(ConvS2SConfig.tiny(), seed=0, backend="cpu")
    >>> logits = model.forward(src_ids, tgt_ids)          # (B, Nt, tgt_vocab)
    >>> out = model.generate(src_ids, max_new_tokens=20, bos_id=1, eos_id=2)
    """

    config_class = ConvS2SConfig

    def _param_specs(self):
        c = self.config
        d, k = c.d_model, c.kernel_size
        specs = {"src_embed.weight": ((c.src_vocab, d), xavier_uniform),
                 "src_pos.weight": ((c.max_len, d), xavier_uniform),
                 "tgt_embed.weight": ((c.tgt_vocab, d), xavier_uniform),
                 "tgt_pos.weight": ((c.max_len, d), xavier_uniform)}
        for stack in ("encoder", "decoder"):
            for i in range(c.n_layers):
                specs[f"{stack}.{i}.conv.weight"] = ((2 * d, d, k), xavier_uniform)
                specs[f"{stack}.{i}.conv.bias"] = ((2 * d,), zeros)
                if stack == "decoder":
                    specs[f"decoder.{i}.attn_in.weight"] = ((d, d), xavier_uniform)
                    specs[f"decoder.{i}.attn_in.bias"] = ((d,), zeros)
                    specs[f"decoder.{i}.attn_out.weight"] = ((d, d), xavier_uniform)
                    specs[f"decoder.{i}.attn_out.bias"] = ((d,), zeros)
        specs["generator.weight"] = ((c.tgt_vocab, d), xavier_uniform)
        specs["generator.bias"] = ((c.tgt_vocab,), zeros)
        return specs

    def _device_params(self, params):
        n = self.config.n_layers
        out = dict(params)
        enc_scale = S ** n  # z = enc_scale * v_L
        for i in range(n):
            for stack in ("encoder", "decoder"):
                p = f"{stack}.{i}.conv"
                out[f"{p}.weight"], out[f"{p}.bias"] = _fold_glu_conv(params[f"{p}.weight"],
                                                                       params[f"{p}.bias"], S ** i)
            p = f"decoder.{i}"
            # query: h = S^i h', scores against z = enc_scale * v_L
            out[f"{p}.attn_in.weight"] = params[f"{p}.attn_in.weight"] * (enc_scale * S ** i)
            out[f"{p}.attn_in.bias"] = params[f"{p}.attn_in.bias"] * enc_scale
            # output: a = enc_scale * a', divided by S^i to stay in the carried scale
            out[f"{p}.attn_out.weight"] = params[f"{p}.attn_out.weight"] * (enc_scale / S ** i)
            out[f"{p}.attn_out.bias"] = params[f"{p}.attn_out.bias"] / S ** i
        out["generator.weight"] = params["generator.weight"] * S ** n
        return out

    # ------------------------------------------------------------------ pieces
    def _embed(self, ids, table, positions, scale=1.0):
        bk = self.backend
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        return bk.add(bk.embedding(ids, self.weights[table], scale),
                      bk.embedding(np.ascontiguousarray(pos), self.weights[positions], scale))

    def _block(self, prefix, v, causal):
        """GLU(conv'(v)) with the folded weights, length-preserving padding."""
        k = self.config.kernel_size
        pad = (k - 1, 0) if causal else ((k - 1) // 2, k - 1 - (k - 1) // 2)
        w = self.weights
        return self.backend.glu(self.backend.conv1d(v, w[f"{prefix}.conv.weight"],
                                                    w[f"{prefix}.conv.bias"], 1, *pad))

    def _encode(self, src):
        """-> keys v_L and values (z + e) / S^L, each as one head (B, 1, Ns, d)."""
        bk = self.backend
        v = self._embed(src, "src_embed.weight", "src_pos.weight")
        for i in range(self.config.n_layers):
            v = bk.add(v, self._block(f"encoder.{i}", v, causal=False))
        e_scaled = self._embed(src, "src_embed.weight", "src_pos.weight", 1.0 / S ** self.config.n_layers)
        return bk.split_heads(v, 1), bk.split_heads(bk.add(v, e_scaled), 1)

    def _decode_logits(self, tgt, keys, values):
        bk, w = self.backend, self.weights
        u = self._embed(tgt, "tgt_embed.weight", "tgt_pos.weight")
        for i in range(self.config.n_layers):
            p = f"decoder.{i}"
            h = self._block(p, u, causal=True)  # h / S^i
            q = bk.split_heads(bk.linear(h, w[f"{p}.attn_in.weight"], w[f"{p}.attn_in.bias"]), 1)
            a = bk.merge_heads(bk.attention(q, keys, values))  # (B, Nt, d)
            o = bk.linear(a, w[f"{p}.attn_out.weight"], w[f"{p}.attn_out.bias"])
            u = bk.add(bk.add(u, h), o)
        return bk.linear(u, w["generator.weight"], w["generator.bias"])  # (B, Nt, V)

    # ------------------------------------------------------------------ public
    def forward(self, src_ids, tgt_ids):
        """Teacher-forced logits (B, Nt, tgt_vocab), a host array in the config dtype
        (float64 on the numpy backend); ids are (B, N) integers, N <= max_len."""
        src, tgt = check_pair(self, src_ids, tgt_ids)
        keys, values = self._encode(src)
        return self.backend.to_numpy(self._decode_logits(tgt, keys, values))

    def __call__(self, src_ids, tgt_ids):
        """Same as :meth:`forward`."""
        return self.forward(src_ids, tgt_ids)

    def generate(self, src_ids, max_new_tokens: int, bos_id: int, eos_id: int | None = None) -> np.ndarray:
        """Greedy decoding: encoder once, decoder over the prefix at each step.

        Returns host int64 ids (B, 1 + generated) starting with ``bos_id``; a sequence that
        emitted ``eos_id`` keeps emitting it and decoding stops once all have.
        """
        src = check_generate_args(self, src_ids, max_new_tokens, bos_id, eos_id)
        if max_new_tokens == 0:
            return np.full((src.shape[0], 1), bos_id, dtype=np.int64)
        bk = self.backend
        keys, values = self._encode(src)

        def step(out, t):
            logits = self._decode_logits(np.ascontiguousarray(out[:, :t + 1]), keys, values)
            return bk.argmax(logits)[:, t]

        return greedy(src.shape[0], max_new_tokens, bos_id, eos_id, step)
