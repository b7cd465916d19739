"""The encoder-decoder Transformer of section 3, on any backend, composed from tfm.layers.

* :class:`EncoderDecoder` -- the stack of section 3.1 alone (an :class:`~tfm.layers.Encoder`
  and a :class:`~tfm.layers.Decoder`, each with an optional final LayerNorm) on embedded
  inputs (B, N, d_model). Called like ``torch.nn.Transformer`` (batch_first);
  ``tfm.from_torch(nn.Transformer)`` returns one.
* :class:`Transformer` -- the full model: :class:`~tfm.layers.TransformerEmbedding` s
  (x sqrt(d_model) + sinusoidal positions, sections 3.4, 3.5), the stack, and the
  pre-softmax output projection; ``forward`` (logits or log-probabilities), greedy
  ``generate`` with a key/value cache, ``save``/``load``.

Activations live on the backend and are touched only through its methods; the host
handles token ids, padding masks and argmax results. Parameters carry
``torch.nn.Transformer``'s state-dict names (``encoder.layers.0.self_attn.in_proj_weight``
...), so converting a PyTorch model is a rename-free copy.

Initialisation (deterministic from ``seed``): Xavier-uniform for every matrix, embeddings
included, as ``torch.nn.Transformer._reset_parameters`` and the Annotated Transformer do;
zero biases; LayerNorm gain 1 and bias 0. The output projection has no bias; with
``tie_embeddings`` it is the target embedding table (section 3.4).

Padding masks are (B, N) bool arrays with True = padding, PyTorch's ``key_padding_mask``
convention; padded positions are never attended to. Positions that are themselves padding
still get (meaningless) outputs, computed like any other position.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_bool, check_float, check_padding_mask, check_same_batch
from ..config import TransformerConfig
from ..layers.attention import HasAttention, key_mask
from ..layers.embedding import TransformerEmbedding
from ..layers.linear import Linear
from ..layers.transformer import Decoder, Encoder
from .base import Model, Seq2Seq

__all__ = ["EncoderDecoder", "Transformer"]


def _stacks(config: TransformerConfig) -> tuple[Encoder, Decoder]:
    """The encoder and decoder stacks a config describes (unfilled: the model builds them)."""
    c = config
    kw = dict(d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, activation=c.activation, norm=c.norm,
              layer_norm_eps=c.layer_norm_eps, final_norm=c.final_norm, dropout=c.dropout, backend=None,
              dtype=c.dtype)
    return Encoder(c.n_encoder_layers, **kw), Decoder(c.n_decoder_layers, **kw)


class EncoderDecoder(HasAttention, Model):
    """The encoder-decoder stack on embedded inputs, called like ``torch.nn.Transformer``.

    ``EncoderDecoder(config, seed=0, backend="cpu", impl="fused")`` (random weights) or
    ``tfm.from_torch(nn.Transformer(..., batch_first=True))`` (PyTorch's weights; there
    ``final_norm=True`` as nn.Transformer always adds one). The config's vocabulary sizes
    and ``max_len`` are unused here: there are no embeddings.
    """

    config_class = TransformerConfig

    def __init__(self, config, seed: int = 0, backend="cpu", impl: str = "fused"):
        super().__init__(config)
        encoder, decoder = _stacks(self.config)
        self.encoder = self.add("encoder", encoder)
        self.decoder = self.add("decoder", decoder)
        self.impl = impl
        self._build(seed, backend)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, causal: bool = True):
        """Backend arrays src (B, Ns, d), tgt (B, Nt, d) -> (B, Nt, d); masks: backend bool,
        True = may attend (:func:`~tfm.layers.attention.key_mask`)."""
        memory = self.encoder.forward(src, src_mask)
        return self.decoder.forward(tgt, self.decoder.project_memory(memory), tgt_mask, memory_mask, causal)

    def forward_train(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, causal: bool = True):
        memory, enc_saved = self.encoder.forward_train(src, src_mask)
        out, dec_saved = self.decoder.forward_train(tgt, memory, tgt_mask, memory_mask, causal)
        return out, (enc_saved, dec_saved)

    def backward(self, saved, dout):
        """-> ((dsrc, dtgt), gradients by PyTorch's state-dict names)."""
        enc_saved, dec_saved = saved
        (dtgt, dmemory), g_dec = self.decoder.backward(dec_saved, dout)
        (dsrc,), g_enc = self.encoder.backward(enc_saved, dmemory)
        return (dsrc, dtgt), self._merge(self._merge({}, "encoder", g_enc), "decoder", g_dec)

    def _inputs(self, src, tgt, tgt_is_causal, src_key_padding_mask, tgt_key_padding_mask,
                memory_key_padding_mask):
        """Checked backend arguments of ``forward``: (src, tgt, src_mask, tgt_mask, memory_mask, causal)."""
        d = self.config.d_model
        src = check_float("src", src, 3)
        tgt = check_float("tgt", tgt, 3)
        for name, x in (("src", src), ("tgt", tgt)):
            if x.shape[2] != d:
                raise ValueError(f"{name} must have d_model={d} features, got shape {tuple(x.shape)}")
        check_same_batch("src and tgt", src, tgt)
        causal = check_bool("tgt_is_causal", tgt_is_causal)
        b, ns, nt = src.shape[0], src.shape[1], tgt.shape[1]
        src_pad = check_padding_mask("src_key_padding_mask", src_key_padding_mask, b, ns)
        tgt_pad = check_padding_mask("tgt_key_padding_mask", tgt_key_padding_mask, b, nt)
        mem_pad = check_padding_mask("memory_key_padding_mask", memory_key_padding_mask, b, ns)
        bk = self.backend
        return (bk.asarray(src, self.dtype), bk.asarray(tgt, self.dtype), key_mask(bk, src_pad),
                key_mask(bk, tgt_pad), key_mask(bk, mem_pad), causal)

    def _vjp(self, src, tgt, tgt_is_causal: bool = True, src_key_padding_mask=None,
             tgt_key_padding_mask=None, memory_key_padding_mask=None):
        inputs = self._inputs(src, tgt, tgt_is_causal, src_key_padding_mask, tgt_key_padding_mask,
                              memory_key_padding_mask)
        return self._pullback(*self.forward_train(*inputs), ("src", "tgt"))

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
        return self._host(self.forward(*self._inputs(src, tgt, tgt_is_causal, src_key_padding_mask,
                                                     tgt_key_padding_mask, memory_key_padding_mask)))


class Transformer(HasAttention, Seq2Seq):
    """The Transformer of "Attention Is All You Need" (section 3), for any config.

    >>> model = Transformer(TransformerConfig.tiny(), seed=0, backend="cpu")
    >>> logits = model.forward(src_ids, tgt_ids)               # (B, Nt, tgt_vocab)
    >>> logp = model.forward(src_ids, tgt_ids, log_probs=True)  # log-softmax of the logits
    >>> out = model.generate(src_ids, max_new_tokens=20, bos_id=1, eos_id=2)

    ``backend``: "numpy" (float64 reference), "cpu" or "cuda"; ``impl``: the attention
    kernel ("fused" or "naive"), also settable later (``model.impl = "naive"``).
    Parameters: ``src_embed.weight``, ``tgt_embed.weight``, the stack's (``encoder.*``,
    ``decoder.*``) and ``generator.weight`` (absent with ``tie_embeddings``).
    """

    config_class = TransformerConfig

    def __init__(self, config, seed: int = 0, backend="cpu", impl: str = "fused"):
        super().__init__(config)
        c, kw = self.config, {"backend": None, "dtype": self.config.dtype}
        self.src_embed = self.add("src_embed", TransformerEmbedding(c.src_vocab, c.d_model, c.max_len, **kw))
        self.tgt_embed = self.add("tgt_embed", TransformerEmbedding(c.tgt_vocab, c.d_model, c.max_len, **kw))
        encoder, decoder = _stacks(c)
        self.encoder = self.add("encoder", encoder)
        self.decoder = self.add("decoder", decoder)
        # The output projection: its own matrix, or the target embedding's (section 3.4).
        self.generator = (self.tgt_embed if c.tie_embeddings else
                          self.add("generator", Linear(c.d_model, c.tgt_vocab, bias=False, **kw)))
        self.impl = impl
        self._build(seed, backend)

    # --------------------------------------------------------------- backend arrays
    def _encode(self, src, src_pad):
        """-> the memory (B, Ns, d) and the source key mask (None without padding)."""
        src_keep = key_mask(self.backend, src_pad)
        return self.encoder.forward(self.src_embed.forward(src), src_keep), src_keep

    def _project(self, y):
        return self.backend.linear(y, self.generator.weights["weight"])  # (B, Nt, tgt_vocab)

    def _logits(self, src, tgt, src_pad=None, tgt_pad=None):
        memory, src_keep = self._encode(src, src_pad)
        y = self.decoder.forward(self.tgt_embed.forward(tgt), self.decoder.project_memory(memory),
                                 key_mask(self.backend, tgt_pad), src_keep, causal=True)
        return self._project(y)

    def forward_train(self, src, tgt, src_pad=None, tgt_pad=None):
        """``_logits`` on checked host ids, keeping what :meth:`backward` needs; dropout (in
        training mode) on the embedding sums and on every sublayer's output."""
        bk = self.backend
        src_keep, tgt_keep = key_mask(bk, src_pad), key_mask(bk, tgt_pad)
        x, src_saved = self.src_embed.forward_train(src)  # (B, Ns, d)
        memory, enc_saved = self.encoder.forward_train(x, src_keep)  # (B, Ns, d)
        y, tgt_saved = self.tgt_embed.forward_train(tgt)  # (B, Nt, d)
        y, dec_saved = self.decoder.forward_train(y, memory, tgt_keep, src_keep, True)  # (B, Nt, d)
        return self._project(y), (src_saved, enc_saved, tgt_saved, dec_saved, y)

    def backward(self, saved, dlogits):
        """dlogits (B, Nt, tgt_vocab) -> ((), gradients of every parameter); token ids have none."""
        bk = self.backend
        src_saved, enc_saved, tgt_saved, dec_saved, y = saved
        dy, dw_out, _ = bk.linear_backward(y, self.generator.weights["weight"], dlogits, bias=False)
        (dy, dmemory), g_dec = self.decoder.backward(dec_saved, dy)
        (dx,), g_enc = self.encoder.backward(enc_saved, dmemory)
        _, g_tgt = self.tgt_embed.backward(tgt_saved, dy)
        _, g_src = self.src_embed.backward(src_saved, dx)
        grads = {}
        for name, g in (("src_embed", g_src), ("tgt_embed", g_tgt), ("encoder", g_enc), ("decoder", g_dec)):
            self._merge(grads, name, g)
        if self.config.tie_embeddings:  # one matrix, two uses: the gradients add up
            bk.axpy(grads["tgt_embed.weight"], dw_out)
        else:
            grads["generator.weight"] = dw_out
        return (), grads

    def _decoding_step(self, src, max_new_tokens, src_pad=None):
        # The encoder runs once and each decoder layer's cross-attention keys/values are
        # projected once; self-attention keys/values of past positions live in caches
        # preallocated on the backend, so each step feeds one token per sequence.
        bk = self.backend
        memory, src_keep = self._encode(src, src_pad)
        memory_kv = self.decoder.project_memory(memory)
        cache = self.decoder.new_cache(src.shape[0], max_new_tokens)

        def step(out, t):
            y = self.tgt_embed.forward(out[:, t:t + 1], offset=t)  # (B, 1, d)
            y = self.decoder.forward(y, memory_kv, None, src_keep, causal=False, cache=cache)
            return bk.argmax(self._project(y))[:, 0]  # (B,) host int64

        return step

    # --------------------------------------------------------------- public
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
        log_probs = check_bool("log_probs", log_probs)
        logits = self._logits(*self._check_inputs(src_ids, tgt_ids, src_pad_mask, tgt_pad_mask))
        return self._host(self.backend.log_softmax(logits) if log_probs else logits)

    def _check_inputs(self, src_ids, tgt_ids, src_pad_mask, tgt_pad_mask):
        """-> (src, tgt, src_pad, tgt_pad): checked host ids and padding masks."""
        src, tgt = self._check_pair(src_ids, tgt_ids)
        return (src, tgt, check_padding_mask("src_pad_mask", src_pad_mask, *src.shape),
                check_padding_mask("tgt_pad_mask", tgt_pad_mask, *tgt.shape))

    def _vjp(self, src_ids, tgt_ids, src_pad_mask=None, tgt_pad_mask=None, log_probs: bool = False):
        log_probs = check_bool("log_probs", log_probs)
        logits, saved = self.forward_train(*self._check_inputs(src_ids, tgt_ids, src_pad_mask, tgt_pad_mask))
        if not log_probs:
            return self._pullback(logits, saved, ())
        bk = self.backend
        logp = bk.log_softmax(logits)

        def pullback(cotangent):
            dlogits = bk.log_softmax_backward(logp, bk.asarray(cotangent, self.dtype))
            return {}, self.param_grads(self.backward(saved, dlogits)[1])

        return self._host(logp), pullback

    def generate(self, src_ids, max_new_tokens: int, bos_id: int, eos_id: int | None = None,
                 src_pad_mask=None) -> np.ndarray:
        """Greedy decoding with a key/value cache.

        The tokens are exactly those of an argmax loop over :meth:`forward` (up to ties
        within rounding). A sequence that has emitted ``eos_id`` keeps emitting ``eos_id``;
        decoding stops early once every sequence has. Returns host int64 ids
        (B, 1 + generated), starting with ``bos_id``; 1 + max_new_tokens must not exceed the
        config's max_len. ``src_pad_mask`` (B, Ns) bool, True = padding.
        """
        src = self._check_src(src_ids)
        src_pad = check_padding_mask("src_pad_mask", src_pad_mask, *src.shape)
        return self._generate(src, max_new_tokens, bos_id, eos_id, src_pad=src_pad)
