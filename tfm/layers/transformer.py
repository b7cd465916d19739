"""The Transformer's layers and stacks (section 3.1), composed from its sublayers.

    EncoderLayer   x -> ResidualNorm(self-attention) -> ResidualNorm(FFN)
    DecoderLayer   y -> ResidualNorm(causal self-attention) -> ResidualNorm(cross-attention to
                   the encoder output) -> ResidualNorm(FFN)
    Encoder        N encoder layers, then an optional final LayerNorm (nn.Transformer's)
    Decoder        N decoder layers, then an optional final LayerNorm

Parameter names are ``torch.nn.Transformer``'s: ``layers.0.self_attn.in_proj_weight``,
``layers.0.linear1.weight``, ``layers.0.norm1.weight``, ``norm.weight`` ... (the FFN's
``linear1``/``linear2`` sit directly in the layer, as in PyTorch). Masks on backend arrays
are bool, True = may attend (:func:`~tfm.layers.attention.key_mask` makes them from
PyTorch-style padding masks); the public calls take padding masks, True = padding.
"""

from __future__ import annotations

from .._checks import (check_bool, check_dropout, check_features, check_int, check_padding_mask,
                       check_same_batch)
from .attention import HasAttention, MultiHeadAttention, key_mask
from .linear import FeedForward
from .module import Module
from .norm import LayerNorm, ResidualNorm

__all__ = ["Decoder", "DecoderLayer", "Encoder", "EncoderLayer"]


class _Layer(HasAttention, Module):
    """The arguments every Transformer layer and stack shares, their checks and the
    construction sequence: store them, ``_add_sublayers``, pick the attention kernel, build."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, activation: str = "relu",
                 norm: str = "post", layer_norm_eps: float = 1e-5, *, dropout: float = 0.0,
                 impl: str = "fused", seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.d_model, self.n_heads = check_int("d_model", d_model), check_int("n_heads", n_heads)
        self.d_ff = check_int("d_ff", d_ff)
        self.activation, self.norm, self.layer_norm_eps = activation, norm, layer_norm_eps
        self.dropout = check_dropout(dropout)
        self._add_sublayers({"backend": None, "dtype": dtype})
        self.impl = impl
        self._build(seed, backend)

    def _add_sublayers(self, kw: dict) -> None:
        """Add the submodules, unfilled (``kw``: backend=None and the dtype)."""
        raise NotImplementedError

    def _layer_args(self) -> dict:
        return {"d_model": self.d_model, "n_heads": self.n_heads, "d_ff": self.d_ff,
                "activation": self.activation, "norm": self.norm, "layer_norm_eps": self.layer_norm_eps,
                "dropout": self.dropout}

    def _config(self) -> dict:
        return {**self._layer_args(), "dtype": self.dtype.name}

    def _sequence(self, name: str, x):
        return check_features(name, x, 3, self.d_model, "d_model")


class _Encoding(_Layer):
    """The public call of an encoder layer or stack: ``forward(x, mask, causal)``."""

    def _inputs(self, x, src_key_padding_mask, causal):
        x = self._sequence("x", x)
        pad = check_padding_mask("src_key_padding_mask", src_key_padding_mask, *x.shape[:2])
        bk = self.backend
        return bk.asarray(x, self.dtype), key_mask(bk, pad), check_bool("causal", causal)

    def __call__(self, x, src_key_padding_mask=None, causal: bool = False):
        """x (B, N, d_model) -> (B, N, d_model), a host array.

        ``src_key_padding_mask`` (B, N) bool, True = padding: keys no query attends to.
        ``causal``: position i attends to positions <= i only.
        """
        return self._host(self.forward(*self._inputs(x, src_key_padding_mask, causal)))

    def _vjp(self, x, src_key_padding_mask=None, causal: bool = False):
        return self._pullback(*self.forward_train(*self._inputs(x, src_key_padding_mask, causal)), ("x",))


class _Decoding(_Layer):
    """The public call of a decoder layer or stack: ``forward(y, project_memory(memory), ...)``."""

    def _inputs(self, y, memory, tgt_key_padding_mask, memory_key_padding_mask, causal):
        """Checked backend arrays: (y, memory, self-attention mask, memory mask, causal)."""
        y, memory = self._sequence("y", y), self._sequence("memory", memory)
        check_same_batch("y and memory", y, memory)
        tgt_pad = check_padding_mask("tgt_key_padding_mask", tgt_key_padding_mask, *y.shape[:2])
        mem_pad = check_padding_mask("memory_key_padding_mask", memory_key_padding_mask, *memory.shape[:2])
        bk = self.backend
        return (bk.asarray(y, self.dtype), bk.asarray(memory, self.dtype), key_mask(bk, tgt_pad),
                key_mask(bk, mem_pad), check_bool("causal", causal))

    def __call__(self, y, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                 causal: bool = True):
        """y (B, Nt, d_model) attending to memory (B, Ns, d_model) -> (B, Nt, d_model), a host array.

        Padding masks are (B, N) bool, True = padding: ``tgt_key_padding_mask`` for the
        self-attention keys, ``memory_key_padding_mask`` for the cross-attention keys.
        ``causal`` (default True): target position i attends to targets <= i only.
        """
        y, memory, mask, memory_mask, causal = self._inputs(y, memory, tgt_key_padding_mask,
                                                            memory_key_padding_mask, causal)
        return self._host(self.forward(y, self.project_memory(memory), mask, memory_mask, causal))

    def _vjp(self, y, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None, causal: bool = True):
        inputs = self._inputs(y, memory, tgt_key_padding_mask, memory_key_padding_mask, causal)
        return self._pullback(*self.forward_train(*inputs), ("y", "memory"))


class EncoderLayer(_Encoding):
    """Self-attention and a feed-forward network, each inside a :class:`ResidualNorm`.

    Parameters: ``self_attn.*`` (:class:`MultiHeadAttention`), ``linear1.*``, ``linear2.*``
    (:class:`FeedForward`), ``norm1.*``, ``norm2.*``. ``norm``: "post" (the paper's) or "pre".
    """

    def _add_sublayers(self, kw):
        d, norm, eps, p = self.d_model, self.norm, self.layer_norm_eps, self.dropout
        self.self_attn = self.add("self_attn", MultiHeadAttention(d, self.n_heads, **kw))
        self.ff = self.add(None, FeedForward(d, self.d_ff, self.activation, **kw))
        self.norm1 = self.add("norm1", ResidualNorm(d, norm, eps, dropout=p, **kw))
        self.norm2 = self.add("norm2", ResidualNorm(d, norm, eps, dropout=p, **kw))

    def forward(self, x, mask=None, causal: bool = False):
        """x (B, N, d_model) backend array; mask: backend bool, True = may attend."""
        x = self.norm1.forward(x, self.self_attn, mask, causal)
        return self.norm2.forward(x, self.ff)

    def forward_train(self, x, mask=None, causal: bool = False):
        x, saved1 = self.norm1.forward_train(x, self.self_attn, mask, causal)
        x, saved2 = self.norm2.forward_train(x, self.ff)
        return x, (saved1, saved2)

    def backward(self, saved, dy):
        """-> ((dx,), gradients of the layer's parameters)."""
        saved1, saved2 = saved
        (dy,), g_norm2, g_ff = self.norm2.backward(saved2, dy)
        (dx,), g_norm1, g_attn = self.norm1.backward(saved1, dy)
        grads = self._merge({}, "norm1", g_norm1)
        self._merge(grads, "norm2", g_norm2)
        self._merge(grads, "self_attn", g_attn)
        return (dx,), self._merge(grads, None, g_ff)


class DecoderLayer(_Decoding):
    """Causal self-attention, cross-attention to the encoder output and a feed-forward network,
    each inside a :class:`ResidualNorm`.

    Parameters: ``self_attn.*``, ``multihead_attn.*`` (cross-attention), ``linear1.*``,
    ``linear2.*``, ``norm1.*``, ``norm2.*``, ``norm3.*``.
    """

    def _add_sublayers(self, kw):
        d, norm, eps, p = self.d_model, self.norm, self.layer_norm_eps, self.dropout
        self.self_attn = self.add("self_attn", MultiHeadAttention(d, self.n_heads, **kw))
        self.multihead_attn = self.add("multihead_attn", MultiHeadAttention(d, self.n_heads, **kw))
        self.ff = self.add(None, FeedForward(d, self.d_ff, self.activation, **kw))
        self.norm1 = self.add("norm1", ResidualNorm(d, norm, eps, dropout=p, **kw))
        self.norm2 = self.add("norm2", ResidualNorm(d, norm, eps, dropout=p, **kw))
        self.norm3 = self.add("norm3", ResidualNorm(d, norm, eps, dropout=p, **kw))

    def project_memory(self, memory):
        """The cross-attention keys and values of the encoder output (once per source)."""
        return self.multihead_attn.project_memory(memory)

    def new_cache(self, batch: int, max_len: int):
        """An empty self-attention key/value cache for greedy decoding."""
        return self.self_attn.new_cache(batch, max_len)

    def forward(self, y, memory_kv, mask=None, memory_mask=None, causal: bool = True, cache=None):
        """y (B, Nt, d_model) backend array; ``memory_kv`` from :meth:`project_memory`;
        ``mask``/``memory_mask``: the self- and cross-attention masks (True = may attend);
        ``cache``: y holds the next positions and earlier keys/values are cached."""
        y = self.norm1.forward(y, self.self_attn, mask, causal, cache=cache)
        y = self.norm2.forward(y, self.multihead_attn, memory_mask, memory_kv=memory_kv)
        return self.norm3.forward(y, self.ff)

    def forward_train(self, y, memory, mask=None, memory_mask=None, causal: bool = True):
        """``forward`` on the memory itself (B, Ns, d_model): cross-attention projects it here."""
        y, saved1 = self.norm1.forward_train(y, self.self_attn, mask, causal)
        y, saved2 = self.norm2.forward_train(y, self.multihead_attn, memory_mask, False, memory)
        y, saved3 = self.norm3.forward_train(y, self.ff)
        return y, (saved1, saved2, saved3)

    def backward(self, saved, dout):
        """-> ((dy, dmemory), gradients of the layer's parameters)."""
        saved1, saved2, saved3 = saved
        (dy,), g_norm3, g_ff = self.norm3.backward(saved3, dout)
        (dy, dmemory), g_norm2, g_cross = self.norm2.backward(saved2, dy)
        (dy,), g_norm1, g_self = self.norm1.backward(saved1, dy)
        grads = self._merge({}, "self_attn", g_self)
        self._merge(grads, "multihead_attn", g_cross)
        self._merge(grads, None, g_ff)
        for name, g in (("norm1", g_norm1), ("norm2", g_norm2), ("norm3", g_norm3)):
            self._merge(grads, name, g)
        return (dy, dmemory), grads


class _Stack(_Layer):
    """``n_layers`` layers (``layers.{i}``, of ``layer_class``) and an optional final LayerNorm
    (``norm``)."""

    layer_class: type = None  # set by subclasses

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, activation: str = "relu",
                 norm: str = "post", layer_norm_eps: float = 1e-5, final_norm: bool = False, **options):
        self.n_layers = check_int("n_layers", n_layers, 0)
        self.final_norm = check_bool("final_norm", final_norm)
        super().__init__(d_model, n_heads, d_ff, activation, norm, layer_norm_eps, **options)

    def _add_sublayers(self, kw):
        self.layers = [self.add(f"layers.{i}", self.layer_class(**self._layer_args(), **kw))
                       for i in range(self.n_layers)]
        self.norm_out = (self.add("norm", LayerNorm(self.d_model, self.layer_norm_eps, **kw))
                         if self.final_norm else None)

    def _config(self) -> dict:
        return {"n_layers": self.n_layers, **super()._config(), "final_norm": self.final_norm}

    def _final(self, x):
        return x if self.norm_out is None else self.norm_out.forward(x)

    def _final_train(self, x):
        return (x, None) if self.norm_out is None else self.norm_out.forward_train(x)

    def _final_backward(self, saved, dy, grads: dict):
        if self.norm_out is None:
            return dy
        (dy,), g = self.norm_out.backward(saved, dy)
        self._merge(grads, "norm", g)
        return dy


class Encoder(_Stack, _Encoding):
    """N :class:`EncoderLayer` s (``layers.{i}``), then a LayerNorm (``norm``) if ``final_norm``."""

    layer_class = EncoderLayer

    def forward(self, x, mask=None, causal: bool = False):
        """x (B, Ns, d_model) backend array -> the memory (B, Ns, d_model)."""
        for layer in self.layers:
            x = layer.forward(x, mask, causal)
        return self._final(x)

    def forward_train(self, x, mask=None, causal: bool = False):
        saved = []
        for layer in self.layers:
            x, s = layer.forward_train(x, mask, causal)
            saved.append(s)
        x, final = self._final_train(x)
        return x, (saved, final)

    def backward(self, saved, dy):
        """-> ((dx,), gradients of the stack's parameters), the layers in reverse."""
        layers_saved, final = saved
        grads = {}
        dy = self._final_backward(final, dy, grads)
        for i in reversed(range(self.n_layers)):
            (dy,), g = self.layers[i].backward(layers_saved[i], dy)
            self._merge(grads, f"layers.{i}", g)
        return (dy,), grads


class Decoder(_Stack, _Decoding):
    """N :class:`DecoderLayer` s (``layers.{i}``), then a LayerNorm (``norm``) if ``final_norm``."""

    layer_class = DecoderLayer

    def project_memory(self, memory) -> list:
        """Each layer's cross-attention keys and values of the encoder output."""
        return [layer.project_memory(memory) for layer in self.layers]

    def new_cache(self, batch: int, max_len: int) -> list:
        """Each layer's empty self-attention key/value cache."""
        return [layer.new_cache(batch, max_len) for layer in self.layers]

    def forward(self, y, memory_kv, mask=None, memory_mask=None, causal: bool = True, cache=None):
        """y (B, Nt, d_model) backend array; ``memory_kv`` and ``cache``: one entry per layer,
        from :meth:`project_memory` and :meth:`new_cache`."""
        for i, layer in enumerate(self.layers):
            y = layer.forward(y, memory_kv[i], mask, memory_mask, causal, None if cache is None else cache[i])
        return self._final(y)

    def forward_train(self, y, memory, mask=None, memory_mask=None, causal: bool = True):
        """``forward`` on the memory itself (B, Ns, d_model); every layer attends to it."""
        saved = []
        for layer in self.layers:
            y, s = layer.forward_train(y, memory, mask, memory_mask, causal)
            saved.append(s)
        y, final = self._final_train(y)
        return y, (saved, final, memory)

    def backward(self, saved, dout):
        """-> ((dy, dmemory), gradients): dmemory sums every layer's cross-attention gradient."""
        layers_saved, final, memory = saved
        grads, dmemory = {}, None
        dy = self._final_backward(final, dout, grads)
        for i in reversed(range(self.n_layers)):
            (dy, dm), g = self.layers[i].backward(layers_saved[i], dy)
            self._merge(grads, f"layers.{i}", g)
            if dmemory is None:
                dmemory = dm  # a fresh array of the layer's backward: accumulate into it
            else:
                self.backend.axpy(dmemory, dm)
        if dmemory is None:  # no layer: the output does not depend on the memory
            dmemory = self.backend.zeros(memory.shape, self.dtype)
        return (dy, dmemory), grads
