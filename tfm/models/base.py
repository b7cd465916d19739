"""``Model``: a :class:`~tfm.layers.module.Module` built from a validated config, and
``Seq2Seq``, the teacher-forced ``forward``, greedy ``generate`` and training loss
(``loss``, ``loss_and_grad``, ``train_step``) of the token-level encoder-decoders
(Transformer, LSTMSeq2Seq, ConvS2S).

A model's constructor takes ``(config, seed=0, backend="cpu")``, adds its layers and calls
``self._build(seed, backend)``; the config (a :mod:`tfm.config` dataclass) is what
``save`` stores, so ``Model.load(path)`` and ``Model.from_params(config, params)`` rebuild
it. ``greedy`` is the decoding loop (eos handling, early stop) every ``generate`` runs.
"""

from __future__ import annotations

import numpy as np

from .._checks import (check_generation_args, check_label_smoothing, check_padding_mask, check_same_batch,
                       check_token_ids)
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

    # --------------------------------------------------------------- training
    # Subclasses implement forward_train(src, tgt, src_pad, tgt_pad) -> (logits, saved) on checked
    # host ids (padding masks True = padding, or None) and backward(saved, dlogits) -> ((), grads).

    def _teacher_forcing(self, src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask):
        """Checked inputs of a loss: (src, tgt_ids[:, :-1], src_pad, its pad, labels (T,),
        weights (T,), label_smoothing), each target weighted 1 / (number of non-padding targets)."""
        src, tgt = self._check_pair(src_ids, tgt_ids)
        if tgt.shape[1] < 2:
            raise ValueError(f"tgt_ids must have at least 2 positions (tgt_ids[:, :-1] goes in, "
                             f"tgt_ids[:, 1:] is predicted), got shape {tgt.shape}")
        label_smoothing = check_label_smoothing(label_smoothing)
        src_pad = check_padding_mask("src_pad_mask", src_pad_mask, *src.shape)
        tgt_pad = check_padding_mask("tgt_pad_mask", tgt_pad_mask, *tgt.shape)
        keep = np.ones(tgt[:, 1:].shape) if tgt_pad is None else ~tgt_pad[:, 1:]
        count = int(keep.sum())
        if count == 0:
            raise ValueError("tgt_pad_mask marks every predicted position tgt_ids[:, 1:] as padding: "
                             "there is no target to take a loss over")
        weights = keep.reshape(-1).astype(np.float64) / count
        return (src, np.ascontiguousarray(tgt[:, :-1]), src_pad, None if tgt_pad is None else tgt_pad[:, :-1],
                np.ascontiguousarray(tgt[:, 1:]).reshape(-1), weights, label_smoothing)

    def _forward_loss(self, src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask):
        """-> (mean token cross-entropy, its gradient with respect to the logits, saved)."""
        src, tgt_in, src_pad, tgt_pad, labels, weights, eps = self._teacher_forcing(
            src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask)
        logits, saved = self.forward_train(src, tgt_in, src_pad, tgt_pad)  # (B, Nt - 1, V)
        b, n, v = logits.shape
        losses, dlogits = self.backend.cross_entropy(logits.reshape(b * n, v), labels, weights, eps)
        return float(np.dot(weights, losses)), dlogits.reshape(b, n, v), saved

    def loss(self, src_ids, tgt_ids, *, label_smoothing: float = 0.0, src_pad_mask=None,
             tgt_pad_mask=None) -> float:
        """Mean token cross-entropy under teacher forcing: ``tgt_ids[:, :-1]`` goes in,
        ``tgt_ids[:, 1:]`` is predicted; targets marked by ``tgt_pad_mask`` (B, Nt) (True =
        padding) are left out of the mean. ``label_smoothing`` as PyTorch's
        ``CrossEntropyLoss``: eps of each target's mass spread uniformly over the vocabulary.
        In training mode dropout acts (see ``train``)."""
        return self._forward_loss(src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask)[0]

    def _loss_and_slot_grads(self, src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask,
                             before_backward=None):
        loss, dlogits, saved = self._forward_loss(src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask)
        if before_backward is not None:
            before_backward(loss)
        return loss, self.backward(saved, dlogits)[1]

    def loss_and_grad(self, src_ids, tgt_ids, *, label_smoothing: float = 0.0, src_pad_mask=None,
                      tgt_pad_mask=None):
        """-> (:meth:`loss`, its gradient with respect to every parameter: host arrays by
        parameter name, as ``params``)."""
        loss, grads = self._loss_and_slot_grads(src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask)
        return loss, self.param_grads(grads)

    def train_step(self, optimizer, src_ids, tgt_ids, *, label_smoothing: float = 0.0, src_pad_mask=None,
                   tgt_pad_mask=None) -> float:
        """One training step: :meth:`loss`, its gradients and one update by ``optimizer`` (a
        ``tfm.optim.Adam`` of this model); returns the loss before the update.

        A loss that is NaN or infinite raises ``FloatingPointError`` before any gradient is
        computed, and the weights and the optimizer's state stay as they were.
        """
        if getattr(optimizer, "module", None) is not self:
            raise TypeError(f"optimizer must be a tfm.optim.Adam built for this model "
                            f"(tfm.optim.Adam(model, lr)), got {type(optimizer).__name__}")
        optimizer._check_backend()

        def check(loss):
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"the loss is {loss} at step {optimizer.steps + 1}: the step was not taken and the "
                    f"weights are those before it (a lower learning rate may help)")

        loss, grads = self._loss_and_slot_grads(src_ids, tgt_ids, label_smoothing, src_pad_mask, tgt_pad_mask,
                                                before_backward=check)
        optimizer._apply(grads)
        return loss

    def _vjp(self, src_ids, tgt_ids):
        logits, saved = self.forward_train(*self._check_pair(src_ids, tgt_ids), None, None)
        return self._pullback(logits, saved, ())

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
