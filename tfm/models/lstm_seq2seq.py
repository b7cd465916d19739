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
(h, c) from step to step and equals the argmax loop over ``forward``. Parameters use
PyTorch's LSTM names per stack (``encoder.weight_ih_l0`` ...) and are initialised as
PyTorch does (U(-1/sqrt(d), 1/sqrt(d))); embeddings and matrices Xavier-uniform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .._checks import check_generation_args, check_token_ids
from .base import Model, greedy, uniform, xavier_uniform, zeros

__all__ = ["LSTMSeq2Seq", "LSTMSeq2SeqConfig"]

DTYPES = ("float32", "float64")


def validate_config(config, positive: tuple[str, ...]) -> None:
    """The Transformer's config rules: positive integers, a known dtype."""
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")


class _ConfigMixin:
    def replace(self, **changes):
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class LSTMSeq2SeqConfig(_ConfigMixin):
    """Hyper-parameters of :class:`LSTMSeq2Seq`; ``d_model`` is the embedding and hidden size."""

    d_model: int = 512
    n_layers: int = 2
    src_vocab: int = 32000
    tgt_vocab: int = 32000
    max_len: int = 1024
    dtype: str = "float32"

    def __post_init__(self):
        validate_config(self, ("d_model", "n_layers", "src_vocab", "tgt_vocab", "max_len"))

    @classmethod
    def tiny(cls, **overrides) -> "LSTMSeq2SeqConfig":
        """For tests: d_model=32, 2 layers, odd-sized vocabularies (as TransformerConfig.tiny)."""
        return cls(**{"d_model": 32, "n_layers": 2, "src_vocab": 53, "tgt_vocab": 47,
                      "max_len": 128, **overrides})


def check_pair(model, src_ids, tgt_ids):
    c = model.config
    src = check_token_ids("src_ids", src_ids, c.src_vocab, c.max_len)
    tgt = check_token_ids("tgt_ids", tgt_ids, c.tgt_vocab, c.max_len)
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"src_ids and tgt_ids batch sizes differ: {src.shape[0]} != {tgt.shape[0]}")
    return src, tgt


def check_generate_args(model, src_ids, max_new_tokens, bos_id, eos_id):
    """The Transformer's generate() rules; returns the checked source ids."""
    c = model.config
    src = check_token_ids("src_ids", src_ids, c.src_vocab, c.max_len)
    check_generation_args(max_new_tokens, bos_id, eos_id, c.tgt_vocab, c.max_len)
    return src


class LSTMSeq2Seq(Model):
    """LSTM encoder-decoder with attention (module docstring), on any backend.

    >>> model = LSTMSeq2Seq(LSTMSeq2SeqConfig.tiny(), seed=0, backend="cpu")
    >>> logits = model.forward(src_ids, tgt_ids)          # (B, Nt, tgt_vocab)
    >>> out = model.generate(src_ids, max_new_tokens=20, bos_id=1, eos_id=2)
    """

    config_class = LSTMSeq2SeqConfig

    def _param_specs(self):
        c = self.config
        d = c.d_model
        lstm = uniform(1.0 / math.sqrt(d))
        specs = {"src_embed.weight": ((c.src_vocab, d), xavier_uniform),
                 "tgt_embed.weight": ((c.tgt_vocab, d), xavier_uniform)}
        for stack in ("encoder", "decoder"):
            for i in range(c.n_layers):
                specs[f"{stack}.weight_ih_l{i}"] = ((4 * d, d), lstm)
                specs[f"{stack}.weight_hh_l{i}"] = ((4 * d, d), lstm)
                specs[f"{stack}.bias_ih_l{i}"] = ((4 * d,), lstm)
                specs[f"{stack}.bias_hh_l{i}"] = ((4 * d,), lstm)
        specs["attn.weight"] = ((d, d), xavier_uniform)  # W_a
        specs["combine.weight"] = ((d, 2 * d), xavier_uniform)  # W_c over [context; state]
        specs["combine.bias"] = ((d,), zeros)
        specs["generator.weight"] = ((c.tgt_vocab, d), xavier_uniform)
        specs["generator.bias"] = ((c.tgt_vocab,), zeros)
        return specs

    def _device_params(self, params):
        d = self.config.d_model
        out = {k: v for k, v in params.items() if k != "combine.weight"}
        out["combine.context"] = params["combine.weight"][:, :d]  # W_c = [W_cc | W_cs]
        out["combine.state"] = params["combine.weight"][:, d:]
        return out

    # ------------------------------------------------------------------ pieces
    def _lstm(self, stack, i, x, h, c):
        w = self.weights
        return self.backend.lstm_layer(x, h, c, w[f"{stack}.weight_ih_l{i}"], w[f"{stack}.weight_hh_l{i}"],
                                       w[f"{stack}.bias_ih_l{i}"], w[f"{stack}.bias_hh_l{i}"])

    def _encode(self, src):
        """-> memory as one attention head (B, 1, Ns, d) and each layer's final (h, c)."""
        bk = self.backend
        x = bk.embedding(src, self.weights["src_embed.weight"])  # (B, Ns, d)
        zero = bk.asarray(np.zeros((src.shape[0], self.config.d_model), self.dtype))
        states = []
        for i in range(self.config.n_layers):
            x, h, c = self._lstm("encoder", i, x, zero, zero)
            states.append((h, c))
        return bk.split_heads(x, 1), states

    def _decode(self, y, states):
        """Decoder stack over embedded y from ``states``; returns (S, new states)."""
        new = []
        for i, (h, c) in enumerate(states):
            y, h, c = self._lstm("decoder", i, y, h, c)
            new.append((h, c))
        return y, new

    def _logits(self, s, memory):
        """Attention over the memory, the attentional state and the projection: (B, Nt, V)."""
        bk, w = self.backend, self.weights
        q = bk.split_heads(bk.linear(s, w["attn.weight"]), 1)  # (B, 1, Nt, d)
        context = bk.merge_heads(bk.attention(q, memory, memory))  # (B, Nt, d)
        hidden = bk.activation(bk.add(bk.linear(context, w["combine.context"]),
                                      bk.linear(s, w["combine.state"], w["combine.bias"])), "relu")
        return bk.linear(hidden, w["generator.weight"], w["generator.bias"])

    # ------------------------------------------------------------------ public
    def forward(self, src_ids, tgt_ids):
        """Teacher-forced logits (B, Nt, tgt_vocab), a host array in the config dtype
        (float64 on the numpy backend); ids are (B, N) integers below the vocabularies."""
        src, tgt = check_pair(self, src_ids, tgt_ids)
        bk = self.backend
        memory, states = self._encode(src)
        s, _ = self._decode(bk.embedding(tgt, self.weights["tgt_embed.weight"]), states)
        return bk.to_numpy(self._logits(s, memory))

    def __call__(self, src_ids, tgt_ids):
        """Same as :meth:`forward`."""
        return self.forward(src_ids, tgt_ids)

    def generate(self, src_ids, max_new_tokens: int, bos_id: int, eos_id: int | None = None) -> np.ndarray:
        """Greedy decoding, one decoder step per token with carried (h, c) states.

        Returns host int64 ids (B, 1 + generated) starting with ``bos_id``; a sequence that
        emitted ``eos_id`` keeps emitting it and decoding stops once all have.
        """
        src = check_generate_args(self, src_ids, max_new_tokens, bos_id, eos_id)
        if max_new_tokens == 0:
            return np.full((src.shape[0], 1), bos_id, dtype=np.int64)
        bk = self.backend
        memory, states = self._encode(src)
        carry = {"states": states}

        def step(out, t):
            y = bk.embedding(out[:, t:t + 1], self.weights["tgt_embed.weight"])  # (B, 1, d)
            s, carry["states"] = self._decode(y, carry["states"])
            return bk.argmax(self._logits(s, memory))[:, 0]

        return greedy(src.shape[0], max_new_tokens, bos_id, eos_id, step)
