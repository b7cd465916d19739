"""Embeddings: a plain lookup table (``Embedding``) and the Transformer's input embedding,
scaled by sqrt(d_model) with the sinusoidal positional encoding added (sections 3.4, 3.5).

Token ids are host integer arrays (B, N) on every backend; tables are Xavier-uniform, as
nn.Transformer's reset and the Annotated Transformer initialise every matrix.
"""

from __future__ import annotations

import math

from .._checks import check_dropout, check_int, check_token_ids
from .module import Module, xavier_uniform

__all__ = ["Embedding", "TransformerEmbedding"]


class Embedding(Module):
    """``weight[ids] * scale``: torch.nn.Embedding's lookup; parameter ``weight`` (num, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, seed: int = 0, backend="cpu",
                 dtype="float32"):
        super().__init__(dtype)
        self.num_embeddings = check_int("num_embeddings", num_embeddings)
        self.embedding_dim = check_int("embedding_dim", embedding_dim)
        self.param("weight", (self.num_embeddings, self.embedding_dim), xavier_uniform)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "dtype": self.dtype.name}

    def forward(self, ids, scale: float = 1.0):
        """ids (B, N) host int64, already in range -> (B, N, embedding_dim) backend array."""
        return self.backend.embedding(ids, self.weights["weight"], scale)

    def forward_train(self, ids, scale: float = 1.0):
        return self.forward(ids, scale), (ids, scale)

    def backward(self, saved, dy):
        """-> ((), {"weight": scatter-add of scale * dy into the rows of ids}); ids have no gradient."""
        ids, scale = saved
        return (), {"weight": self.backend.embedding_backward(ids, dy, self.num_embeddings, scale)}

    def __call__(self, ids):
        """ids (B, N) integers in [0, num_embeddings) -> (B, N, embedding_dim), a host array."""
        return self._host(self.forward(check_token_ids("ids", ids, self.num_embeddings)))

    def _vjp(self, ids):
        return self._pullback(*self.forward_train(check_token_ids("ids", ids, self.num_embeddings)), ())


class TransformerEmbedding(Module):
    """Embedding(ids) * sqrt(d_model) + PE[offset : offset + N] (sections 3.4 and 3.5).

    Parameter ``weight`` (vocab, d_model). ``offset`` shifts the positions, for decoding
    one position at a time; ``max_len`` bounds the sequence length the public call accepts.
    ``dropout``: applied to the sums in training mode (section 5.4).
    """

    def __init__(self, vocab: int, d_model: int, max_len: int = 1024, *, dropout: float = 0.0,
                 seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.vocab = check_int("vocab", vocab)
        self.d_model = check_int("d_model", d_model)
        self.max_len = check_int("max_len", max_len)
        self.dropout = check_dropout(dropout)
        self.scale = math.sqrt(self.d_model)
        self.param("weight", (self.vocab, self.d_model), xavier_uniform)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"vocab": self.vocab, "d_model": self.d_model, "max_len": self.max_len,
                "dropout": self.dropout, "dtype": self.dtype.name}

    def forward(self, ids, offset: int = 0):
        """ids (B, N) host int64, already in range -> (B, N, d_model) backend array."""
        bk = self.backend
        return bk.add_positional_encoding(bk.embedding(ids, self.weights["weight"], self.scale), offset)

    def forward_train(self, ids, offset: int = 0):
        """``forward`` with dropout on the sums of embeddings and positional encodings."""
        x, key = self._dropout(self.forward(ids, offset), self.dropout)
        return x, (ids, key)

    def backward(self, saved, dx):
        """-> ((), {"weight": dtable}); the positional encodings are constants."""
        ids, key = saved
        dx = self._dropout_with(dx, self.dropout, key)
        return (), {"weight": self.backend.embedding_backward(ids, dx, self.vocab, self.scale)}

    def _inputs(self, ids, offset):
        offset = check_int("offset", offset, 0)
        ids = check_token_ids("ids", ids, self.vocab)
        if offset + ids.shape[1] > self.max_len:
            raise ValueError(f"positions {offset}..{offset + ids.shape[1] - 1} reach past the "
                             f"layer's max_len={self.max_len}")
        return ids, offset

    def __call__(self, ids, offset: int = 0):
        """ids (B, N) integers in [0, vocab), offset + N <= max_len -> (B, N, d_model) host array."""
        return self._host(self.forward(*self._inputs(ids, offset)))

    def _vjp(self, ids, offset: int = 0):
        return self._pullback(*self.forward_train(*self._inputs(ids, offset)), ())
