"""The encoder-decoder Transformer of section 3, on any backend.

Two public classes share one implementation of the layers:

* :class:`EncoderDecoder` -- the stack of section 3.1 alone (N encoder layers, N decoder
  layers, optional final LayerNorm after each stack) on embedded inputs (B, N, d_model).
  Called like ``torch.nn.Transformer`` (batch_first); ``tfm.from_torch(nn.Transformer)``
  returns one.
* :class:`Transformer` -- the full model: embeddings scaled by sqrt(d_model) plus the
  sinusoidal positional encoding (sections 3.4, 3.5), the stack, and the pre-softmax
  output projection; ``forward`` (logits or log-probabilities), greedy ``generate`` with
  a key/value cache, ``save``/``load`` (from :class:`tfm.models.base.Model`).

Activations live on the backend and are touched only through its methods
(``tfm/backends/base.py``); the host handles token ids, padding masks and argmax results.

Parameters carry ``torch.nn.Transformer``'s state-dict names (``encoder.layers.0.self_attn
.in_proj_weight`` ...), so converting a PyTorch model is a rename-free copy. Self-attention
keeps Q, K, V in one (3 d_model, d_model) matrix and runs one GEMM for all three; cross-
attention runs one GEMM for Q and one for the fused K, V of the memory.

Initialisation (deterministic from ``seed``): Xavier-uniform (Glorot & Bengio, 2010) for
every matrix, embeddings included, as ``torch.nn.Transformer._reset_parameters`` and the
Annotated Transformer do; zero biases; LayerNorm gain 1 and bias 0. The output projection
has no bias; with ``tie_embeddings`` it is the target embedding table (section 3.4).

Padding masks are (B, N) bool arrays with True = padding, PyTorch's ``key_padding_mask``
convention; padded positions are never attended to. Positions that are themselves padding
still get (meaningless) outputs, computed like any other position.
"""

from __future__ import annotations

import math

import numpy as np

from .._checks import (check_float, check_generation_args, check_impl, check_padding_mask,
                       check_token_ids)
from ..config import TransformerConfig
from .base import Model, greedy, ones, xavier_uniform, zeros

__all__ = ["EncoderDecoder", "Transformer"]


def _keep_mask(pad: np.ndarray | None):
    """(B, N) True = padding  ->  (B, 1, 1, N) True = may attend (the backend's convention)."""
    return None if pad is None else ~pad[:, None, None, :]


class _Stack(Model):
    """Encoder and decoder layers on backend arrays; shared by EncoderDecoder and Transformer."""

    config_class = TransformerConfig

    def __init__(self, config, seed: int = 0, backend="cpu", impl: str = "fused"):
        self.impl = impl
        super().__init__(config, seed=seed, backend=backend)

    @classmethod
    def from_params(cls, config, params, backend="cpu", impl: str = "fused"):
        self = super().from_params(config, params, backend=backend)
        self.impl = impl
        return self

    @classmethod
    def load(cls, path, backend="cpu", impl: str = "fused"):
        self = super().load(path, backend=backend)
        self.impl = impl
        return self

    @property
    def impl(self) -> str:
        """Attention kernel: "fused" (online softmax, O(N) memory) or "naive"."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        self._impl = check_impl(impl)

    # ------------------------------------------------------------------ parameters
    def _param_specs(self):
        c = self.config
        d, f = c.d_model, c.d_ff
        specs = {}

        def attention(prefix):
            specs[f"{prefix}.in_proj_weight"] = ((3 * d, d), xavier_uniform)  # [W_Q; W_K; W_V]
            specs[f"{prefix}.in_proj_bias"] = ((3 * d,), zeros)
            specs[f"{prefix}.out_proj.weight"] = ((d, d), xavier_uniform)  # W_O
            specs[f"{prefix}.out_proj.bias"] = ((d,), zeros)

        def norm(prefix):
            specs[f"{prefix}.weight"] = ((d,), ones)
            specs[f"{prefix}.bias"] = ((d,), zeros)

        def ffn(prefix):
            specs[f"{prefix}.linear1.weight"] = ((f, d), xavier_uniform)
            specs[f"{prefix}.linear1.bias"] = ((f,), zeros)
            specs[f"{prefix}.linear2.weight"] = ((d, f), xavier_uniform)
            specs[f"{prefix}.linear2.bias"] = ((d,), zeros)

        for i in range(c.n_encoder_layers):
            p = f"encoder.layers.{i}"
            attention(f"{p}.self_attn")
            ffn(p)
            norm(f"{p}.norm1")
            norm(f"{p}.norm2")
        if c.final_norm:
            norm("encoder.norm")
        for i in range(c.n_decoder_layers):
            p = f"decoder.layers.{i}"
            attention(f"{p}.self_attn")
            attention(f"{p}.multihead_attn")
            ffn(p)
            norm(f"{p}.norm1")
            norm(f"{p}.norm2")
            norm(f"{p}.norm3")
        if c.final_norm:
            norm("decoder.norm")
        return specs

    def _device_params(self, params):
        # Cross-attention projects queries (decoder side) and keys/values (memory side)
        # separately: upload W_Q and the fused [W_K; W_V] as their own contiguous arrays.
        d = self.config.d_model
        out = {}
        for name, a in params.items():
            if ".multihead_attn.in_proj_" in name:
                out[name.replace("in_proj_", "q_proj_")] = a[:d]
                out[name.replace("in_proj_", "kv_proj_")] = a[d:]
            else:
                out[name] = a
        return out

    # ------------------------------------------------------------------ sublayers
    def _heads(self, x, start: int):
        """Columns [start, start + d_model) of a fused projection, split into heads."""
        return self.backend.split_heads(x, self.config.n_heads, start, self.config.d_model)

    def _attend(self, q, k, v, prefix, mask, causal):
        bk, w = self.backend, self.weights
        out = bk.attention(q, k, v, mask=mask, causal=causal, impl=self.impl)  # (B, h, Nq, d_k)
        return bk.linear(bk.merge_heads(out), w[f"{prefix}.out_proj.weight"],
                         w[f"{prefix}.out_proj.bias"])  # (B, Nq, d_model)

    def _self_attention(self, x, prefix, mask, causal, cache=None, pos: int = 0):
        """Multi-head self-attention; with ``cache=(K, V)`` x holds new positions from ``pos``."""
        bk, w = self.backend, self.weights
        qkv = bk.linear(x, w[f"{prefix}.in_proj_weight"], w[f"{prefix}.in_proj_bias"])  # (B, N, 3d)
        d = self.config.d_model
        q, k, v = self._heads(qkv, 0), self._heads(qkv, d), self._heads(qkv, 2 * d)  # (B, h, N, d_k)
        if cache is not None:
            k_cache, v_cache = cache  # (B, h, max_steps, d_k)
            bk.write_rows(k_cache, k, pos)
            bk.write_rows(v_cache, v, pos)
            end = pos + x.shape[1]
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # every position so far
        return self._attend(q, k, v, prefix, mask, causal)

    def _memory_kv(self, memory, prefix):
        """Cross-attention keys and values of the encoder output (computed once per source)."""
        bk, w = self.backend, self.weights
        kv = bk.linear(memory, w[f"{prefix}.kv_proj_weight"], w[f"{prefix}.kv_proj_bias"])  # (B, Ns, 2d)
        return self._heads(kv, 0), self._heads(kv, self.config.d_model)

    def _cross_attention(self, y, memory_kv, prefix, mask):
        bk, w = self.backend, self.weights
        q = bk.split_heads(bk.linear(y, w[f"{prefix}.q_proj_weight"], w[f"{prefix}.q_proj_bias"]),
                           self.config.n_heads)  # (B, h, Nt, d_k)
        return self._attend(q, *memory_kv, prefix, mask, causal=False)

    def _feed_forward(self, x, prefix):
        w = self.weights
        return self.backend.feed_forward(x, w[f"{prefix}.linear1.weight"], w[f"{prefix}.linear1.bias"],
                                         w[f"{prefix}.linear2.weight"], w[f"{prefix}.linear2.bias"],
                                         self.config.activation)

    def _residual(self, x, sublayer, norm):
        """Post-norm LayerNorm(x + Sublayer(x)) (paper) or pre-norm x + Sublayer(LayerNorm(x))."""
        bk, w, eps = self.backend, self.weights, self.config.layer_norm_eps
        gamma, beta = w[f"{norm}.weight"], w[f"{norm}.bias"]
        if self.config.norm == "post":
            return bk.layer_norm(sublayer(x), gamma, beta, eps, residual=x)
        return bk.add(x, sublayer(bk.layer_norm(x, gamma, beta, eps)))

    def _final_norm(self, x, stack):
        if not self.config.final_norm:
            return x
        w = self.weights
        return self.backend.layer_norm(x, w[f"{stack}.norm.weight"], w[f"{stack}.norm.bias"],
                                       self.config.layer_norm_eps)

    # ------------------------------------------------------------------ stacks
    def _encode(self, x, src_keep):
        """Encoder over embedded x (B, Ns, d); src_keep (B, 1, 1, Ns) backend bool or None."""
        for i in range(self.config.n_encoder_layers):
            p = f"encoder.layers.{i}"
            x = self._residual(x, lambda h: self._self_attention(h, f"{p}.self_attn", src_keep, False),
                               f"{p}.norm1")
            x = self._residual(x, lambda h: self._feed_forward(h, p), f"{p}.norm2")
        return self._final_norm(x, "encoder")  # (B, Ns, d)

    def _memory_kvs(self, memory):
        return [self._memory_kv(memory, f"decoder.layers.{i}.multihead_attn")
                for i in range(self.config.n_decoder_layers)]

    def _decode(self, y, memory_kvs, tgt_keep, mem_keep, causal=True, caches=None, pos=0):
        """Decoder over embedded y (B, Nt, d) given each layer's cross-attention K/V."""
        for i in range(self.config.n_decoder_layers):
            p = f"decoder.layers.{i}"
            cache = None if caches is None else caches[i]
            y = self._residual(y, lambda h: self._self_attention(h, f"{p}.self_attn", tgt_keep, causal,
                                                                 cache, pos), f"{p}.norm1")
            y = self._residual(y, lambda h: self._cross_attention(h, memory_kvs[i],
                                                                  f"{p}.multihead_attn", mem_keep),
                               f"{p}.norm2")
            y = self._residual(y, lambda h: self._feed_forward(h, p), f"{p}.norm3")
        return self._final_norm(y, "decoder")  # (B, Nt, d)

    def _mask(self, pad):
        keep = _keep_mask(pad)
        return None if keep is None else self.backend.asarray(keep)


class EncoderDecoder(_Stack):
    """The encoder-decoder stack on embedded inputs, called like ``torch.nn.Transformer``.

    ``EncoderDecoder(config, seed=0, backend="cpu", impl="fused")`` (random weights) or
    ``tfm.from_torch(nn.Transformer(..., batch_first=True))`` (PyTorch's weights; there
    ``final_norm=True`` as nn.Transformer always adds one). The config's vocabulary sizes
    and ``max_len`` are unused here: there are no embeddings.
    """

    def __call__(self, src, tgt, tgt_is_causal: bool = True, src_key_padding_mask=None,
                 tgt_key_padding_mask=None, memory_key_padding_mask=None):
        """src (B, Ns, d_model), tgt (B, Nt, d_model) float arrays -> (B, Nt, d_model).

        ``tgt_is_causal=True`` masks future target positions (PyTorch:
        ``tgt_mask=nn.Transformer.generate_square_subsequent_mask(Nt), tgt_is_causal=True``).
        Padding masks are (B, N) bool, True = padding: ``src_key_padding_mask`` masks the
        encoder's self-attention keys, ``memory_key_padding_mask`` the decoder's cross-
        attention keys (pass the same mask for both, as usual) and ``tgt_key_padding_mask``
        the decoder's self-attention keys. A query with no visible key gets a zero
        attention output. Returns a host array in the config dtype.

        Differences from PyTorch, both from its inference fast paths (eval mode, even head
        count, ``src_key_padding_mask`` given), measured with torch 2.13:

        * post-norm: the nested-tensor path zeroes the encoder output at padded source
          positions before the final encoder norm; tfm computes those positions like every
          other. Results agree wherever ``memory_key_padding_mask`` masks them out.
        * pre-norm: the fused encoder-layer kernel returns NaN for a source sequence that is
          entirely padding; tfm (like PyTorch's standard path, e.g. with an odd head count)
          gives such queries a zero attention output and stays finite.
        """
        d = self.config.d_model
        src = check_float("src", src, 3)
        tgt = check_float("tgt", tgt, 3)
        for name, x in (("src", src), ("tgt", tgt)):
            if x.shape[2] != d:
                raise ValueError(f"{name} must have d_model={d} features, got shape {tuple(x.shape)}")
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src and tgt batch sizes differ: {src.shape[0]} != {tgt.shape[0]}")
        if not isinstance(tgt_is_causal, (bool, np.bool_)):
            raise TypeError(f"tgt_is_causal must be a bool, got {type(tgt_is_causal).__name__}")
        b, ns, nt = src.shape[0], src.shape[1], tgt.shape[1]
        src_pad = check_padding_mask("src_key_padding_mask", src_key_padding_mask, b, ns)
        tgt_pad = check_padding_mask("tgt_key_padding_mask", tgt_key_padding_mask, b, nt)
        mem_pad = check_padding_mask("memory_key_padding_mask", memory_key_padding_mask, b, ns)
        bk = self.backend
        memory = self._encode(bk.asarray(src, self.dtype), self._mask(src_pad))
        out = self._decode(bk.asarray(tgt, self.dtype), self._memory_kvs(memory), self._mask(tgt_pad),
                           self._mask(mem_pad), causal=bool(tgt_is_causal))
        return bk.to_numpy(out)


class Transformer(_Stack):
    """The Transformer of "Attention Is All You Need" (section 3), for any config.

    >>> model = Transformer(TransformerConfig.tiny(), seed=0, backend="cpu")
    >>> logits = model.forward(src_ids, tgt_ids)               # (B, Nt, tgt_vocab)
    >>> logp = model.forward(src_ids, tgt_ids, log_probs=True)  # log-softmax of the logits
    >>> out = model.generate(src_ids, max_new_tokens=20, bos_id=1, eos_id=2)

    ``backend``: "numpy" (float64 reference), "cpu" or "cuda"; ``impl``: the attention
    kernel ("fused" or "naive"), also settable later (``model.impl = "naive"``).
    """

    def _param_specs(self):
        c = self.config
        specs = {"src_embed.weight": ((c.src_vocab, c.d_model), xavier_uniform),
                 "tgt_embed.weight": ((c.tgt_vocab, c.d_model), xavier_uniform)}
        specs.update(super()._param_specs())
        if not c.tie_embeddings:
            specs["generator.weight"] = ((c.tgt_vocab, c.d_model), xavier_uniform)
        return specs

    @property
    def _out_weight(self):
        name = "tgt_embed.weight" if self.config.tie_embeddings else "generator.weight"
        return self.weights[name]  # (tgt_vocab, d_model)

    def _embed(self, ids, table, offset=0):
        """Embedding * sqrt(d_model) + PE (sections 3.4 and 3.5): ids (B, N) -> (B, N, d)."""
        bk = self.backend
        x = bk.embedding(ids, self.weights[table], math.sqrt(self.config.d_model))
        return bk.add_positional_encoding(x, offset)

    def _check_src(self, src_ids, src_pad_mask):
        c = self.config
        src = check_token_ids("src_ids", src_ids, c.src_vocab, c.max_len)
        pad = check_padding_mask("src_pad_mask", src_pad_mask, *src.shape)
        return src, pad

    def _encode_ids(self, src, src_pad):
        mask = self._mask(src_pad)
        return self._encode(self._embed(src, "src_embed.weight"), mask), mask

    def forward(self, src_ids, tgt_ids, src_pad_mask=None, tgt_pad_mask=None, log_probs: bool = False):
        """Teacher-forced decoder outputs for every target position.

        src_ids (B, Ns), tgt_ids (B, Nt): integer token ids (lengths <= max_len).
        src_pad_mask (B, Ns), tgt_pad_mask (B, Nt): bool, True = padding (PyTorch's
        key_padding_mask); the source mask applies to the encoder's self-attention and the
        decoder's cross-attention keys, the target mask to the decoder's self-attention keys
        (on top of the causal mask). Target query rows that see no key get a zero attention
        output.

        Returns logits (B, Nt, tgt_vocab) as a host array in the config dtype (float64 on
        the numpy backend); ``log_probs=True`` returns log-softmax(logits) instead.
        """
        if not isinstance(log_probs, (bool, np.bool_)):
            raise TypeError(f"log_probs must be a bool, got {type(log_probs).__name__}")
        c = self.config
        src, src_pad = self._check_src(src_ids, src_pad_mask)
        tgt = check_token_ids("tgt_ids", tgt_ids, c.tgt_vocab, c.max_len)
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src_ids and tgt_ids batch sizes differ: {src.shape[0]} != {tgt.shape[0]}")
        tgt_pad = check_padding_mask("tgt_pad_mask", tgt_pad_mask, *tgt.shape)
        bk = self.backend
        memory, src_keep = self._encode_ids(src, src_pad)
        y = self._decode(self._embed(tgt, "tgt_embed.weight"), self._memory_kvs(memory),
                         self._mask(tgt_pad), src_keep, causal=True)
        logits = bk.linear(y, self._out_weight)  # (B, Nt, tgt_vocab)
        return bk.to_numpy(bk.log_softmax(logits) if log_probs else logits)

    def __call__(self, *args, **kwargs):
        """Same as :meth:`forward`."""
        return self.forward(*args, **kwargs)

    def generate(self, src_ids, max_new_tokens: int, bos_id: int, eos_id: int | None = None,
                 src_pad_mask=None) -> np.ndarray:
        """Greedy decoding with a key/value cache.

        The encoder runs once and each decoder layer's cross-attention keys/values are
        projected once; self-attention keys/values of past positions live in caches
        preallocated on the backend (``backend.empty``), so each step feeds one token per
        sequence and attends over the cached prefix. The tokens are exactly those of an
        argmax loop over :meth:`forward` (up to ties within rounding).

        A sequence that has emitted ``eos_id`` keeps emitting ``eos_id``; decoding stops
        early once every sequence has. Returns host int64 ids (B, 1 + generated), starting
        with ``bos_id``; 1 + max_new_tokens must not exceed the config's max_len.
        """
        c = self.config
        src, src_pad = self._check_src(src_ids, src_pad_mask)
        check_generation_args(max_new_tokens, bos_id, eos_id, c.tgt_vocab, c.max_len)

        bk, b = self.backend, src.shape[0]
        if max_new_tokens == 0:
            return np.full((b, 1), bos_id, dtype=np.int64)
        memory, src_keep = self._encode_ids(src, src_pad)
        memory_kvs = self._memory_kvs(memory)
        cache_shape = (b, c.n_heads, max_new_tokens, c.d_head)
        caches = [(bk.empty(cache_shape, self.dtype), bk.empty(cache_shape, self.dtype))
                  for _ in range(c.n_decoder_layers)]

        def step(out, t):
            y = self._embed(out[:, t:t + 1], "tgt_embed.weight", offset=t)  # (B, 1, d)
            y = self._decode(y, memory_kvs, None, src_keep, causal=False, caches=caches, pos=t)
            return bk.argmax(bk.linear(y, self._out_weight))[:, 0]  # (B,) host int64

        return greedy(b, max_new_tokens, bos_id, eos_id, step)
