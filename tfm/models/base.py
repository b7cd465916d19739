"""``Model``: a :class:`~tfm.layers.module.Module` built from a validated config, and
``Seq2Seq``, the teacher-forced ``forward`` and greedy ``generate`` of the token-level
encoder-decoders (Transformer, LSTMSeq2Seq, ConvS2S).

A model's constructor takes ``(config, seed=0, backend="cpu")``, adds its layers and calls
``self._build(seed, backend)``; the config (a :mod:`tfm.config` dataclass) is what
``save`` stores, so ``Model.load(path)`` and ``Model.from_params(config, params)`` rebuild
it. ``greedy`` is the decoding loop (eos handling, early stop) every ``generate`` runs.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_generation_args, check_same_batch, check_token_ids
from ..layers.module import Init, Module, normal, ones, uniform, xavier_uniform, zeros  # noqa: F401

__all__ = ["Init", "Model", "Seq2Seq", "greedy", "normal", "ones", "uniform", "xavier_uniform", "zeros"]


# ---------------------------------------------------------------------- decoding
def greedy(batch: int, max_new_tokens: int, bos_id: int, eos_id, next_tokens) -> np.ndarray:
    """Greedy loop shared by every model: ``next_tokens(out, t)`` -> (B,) host ids for step t.

    Sequences that emitted ``eos_id`` keep emitting it; stops once all have.
    """
    out = np.full((batch, 1 + max_new_tokens), bos_id, dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    for t in range(max_new_tokens):
        nxt = next_tokens(out, t)
        if eos_id is not None:
            nxt[done] = eos_id
            done |= nxt == eos_id
        out[:, t + 1] = nxt
        if eos_id is not None and done.all():
            return out[:, :t + 2]
    return out


# ---------------------------------------------------------------------- models
class Model(Module):
    """A module whose structure is a config dataclass (``config_class``); ``dtype`` is the
    config's. Subclass constructors: ``super().__init__(config)``, add layers, ``_build``."""

    config_class: type = None  # set by subclasses

    def __init__(self, config):
        self.config = self._check_config(config)
        super().__init__(self.config.dtype)

    @classmethod
    def _check_config(cls, config):
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}"
            )
        return config

    def _config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def _structure(cls, config: dict, **options) -> "Model":
        return cls(cls.config_class.from_dict(config), backend=None, **options)

    @classmethod
    def from_params(cls, config, params: dict, backend="cpu", **options):
        """A model with the given host parameters (names and shapes must match; copied)."""
        self = cls(config, backend=None, **options)
        self.load_state_dict(params)
        self.backend = backend
        return self

    def __repr__(self) -> str:
        backend = None if self.backend is None else self.backend.name
        return f"{type(self).__name__}({self.config!r}, backend={backend!r}, n_params={self.n_params:,})"


class Seq2Seq(Model):
    """Token-level encoder-decoder: ``forward`` (teacher forcing) and greedy ``generate``.

    Subclasses implement ``_logits(src, tgt)`` (checked host ids -> backend logits
    (B, Nt, tgt_vocab)) and ``_decoding_step(src, max_new_tokens)``, which encodes the
    source and returns ``step(out, t)``: the (B,) host ids that follow ``out[:, :t + 1]``.
    """

    def _check_src(self, src_ids) -> np.ndarray:
        c = self.config
        return check_token_ids("src_ids", src_ids, c.src_vocab, c.max_len)

    def _check_pair(self, src_ids, tgt_ids):
        src = self._check_src(src_ids)
        tgt = check_token_ids("tgt_ids", tgt_ids, self.config.tgt_vocab, self.config.max_len)
        check_same_batch("src_ids and tgt_ids", src, tgt)
        return src, tgt

    def forward(self, src_ids, tgt_ids):
        """Teacher-forced logits (B, Nt, tgt_vocab), a host array in the config dtype
        (float64 on the numpy backend); ids are (B, N) integers, N <= max_len."""
        return self._host(self._logits(*self._check_pair(src_ids, tgt_ids)))

    def __call__(self, *args, **kwargs):
        """Same as :meth:`forward`."""
        return self.forward(*args, **kwargs)

    def generate(self, src_ids, max_new_tokens: int, bos_id: int, eos_id: int | None = None) -> np.ndarray:
        """Greedy decoding. Returns host int64 ids (B, 1 + generated) starting with ``bos_id``;
        a sequence that emitted ``eos_id`` keeps emitting it and decoding stops once all have.
        1 + max_new_tokens must not exceed the config's max_len."""
        return self._generate(self._check_src(src_ids), max_new_tokens, bos_id, eos_id)

    def _generate(self, src, max_new_tokens, bos_id, eos_id, **encoder_inputs) -> np.ndarray:
        c = self.config
        check_generation_args(max_new_tokens, bos_id, eos_id, c.tgt_vocab, c.max_len)
        if max_new_tokens == 0:
            return np.full((src.shape[0], 1), bos_id, dtype=np.int64)
        step = self._decoding_step(src, max_new_tokens, **encoder_inputs)
        return greedy(src.shape[0], max_new_tokens, bos_id, eos_id, step)
