"""Multi-head attention (section 3.2.2) as a sublayer: self-attention (optionally causal),
cross-attention to an encoder's output, and the key/value cache of greedy decoding.

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Parameters carry ``torch.nn.MultiheadAttention``'s names: ``in_proj_weight`` (3 d_model,
d_model) = [W^Q; W^K; W^V], ``in_proj_bias``, ``out_proj.weight`` (W^O), ``out_proj.bias``;
Xavier-uniform matrices and zero biases, as PyTorch initialises them. Self-attention runs
one GEMM for Q, K and V together and takes each head's columns from the fused result
(``split_heads(x, h, start, width)``); cross-attention runs one GEMM for Q and one for the
fused K, V of the memory (``project_memory``, once per source sequence).
"""

from __future__ import annotations

from .._checks import (check_bool, check_features, check_impl, check_int, check_padding_mask,
                       check_same_batch)
from .module import Module, xavier_uniform, zeros

__all__ = ["KVCache", "MultiHeadAttention"]


def key_mask(backend, pad):
    """(B, Nk) host bool, True = padding (PyTorch's key_padding_mask) -> (B, 1, 1, Nk) backend
    bool, True = may attend (the backend's convention); None stays None."""
    return None if pad is None else backend.asarray(~pad[:, None, None, :])


class KVCache:
    """Keys and values of the positions decoded so far, preallocated on the backend as
    (B, h, max_len, d_k) each; ``append`` writes the new positions after the old ones."""

    def __init__(self, backend, batch: int, n_heads: int, max_len: int, d_head: int, dtype):
        shape = (batch, n_heads, max_len, d_head)
        self._bk = backend
        self.k, self.v = backend.empty(shape, dtype), backend.empty(shape, dtype)
        self.length = 0

    def append(self, k, v):
        """Store k, v (B, h, n, d_k); return the keys and values of every position so far."""
        start, self.length = self.length, self.length + k.shape[2]
        self._bk.write_rows(self.k, k, start)
        self._bk.write_rows(self.v, v, start)
        return self._bk.leading_rows(self.k, self.length), self._bk.leading_rows(self.v, self.length)


class HasAttention:
    """Mixin for modules that are or contain ``MultiHeadAttention``: ``impl`` ("fused" or
    "naive") picks the attention kernel of every one of them."""

    @property
    def impl(self) -> str:
        """Attention kernel: "fused" (online softmax, O(N) memory) or "naive"."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        impl = check_impl(impl)
        for module in self.modules():
            if isinstance(module, HasAttention):
                module._impl = impl


class MultiHeadAttention(HasAttention, Module):
    """Multi-head attention over (B, N, d_model) sequences with ``n_heads`` heads.

    ``impl`` picks the attention kernel: "fused" (online softmax, O(N) memory) or "naive".
    """

    def __init__(self, d_model: int, n_heads: int, *, impl: str = "fused", seed: int = 0,
                 backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.d_model = check_int("d_model", d_model)
        self.n_heads = check_int("n_heads", n_heads)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                             f"each head needs d_model/n_heads dimensions")
        self.impl = impl
        d = self.d_model
        self.param("in_proj_weight", (3 * d, d), xavier_uniform)
        self.param("in_proj_bias", (3 * d,), zeros)
        self.param("out_proj.weight", (d, d), xavier_uniform)
        self.param("out_proj.bias", (d,), zeros)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"d_model": self.d_model, "n_heads": self.n_heads, "dtype": self.dtype.name}

    def _device_params(self, bk):
        # Cross-attention projects queries and keys/values from different inputs: views of
        # the uploaded W^Q rows and of the fused [W^K; W^V] rows (row blocks are contiguous).
        w, d = super()._device_params(bk), self.d_model
        w["q_proj_weight"], w["kv_proj_weight"] = w["in_proj_weight"][:d], w["in_proj_weight"][d:]
        w["q_proj_bias"], w["kv_proj_bias"] = w["in_proj_bias"][:d], w["in_proj_bias"][d:]
        return w

    # --------------------------------------------------------------- backend arrays
    def project_memory(self, memory):
        """The keys and values of a memory (B, Nk, d_model): heads (B, h, Nk, d_k) each."""
        w, d = self.weights, self.d_model
        kv = self.backend.linear(memory, w["kv_proj_weight"], w["kv_proj_bias"])  # (B, Nk, 2d)
        return self.backend.split_heads(kv, self.n_heads, 0, d), self.backend.split_heads(kv, self.n_heads, d, d)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty key/value cache for decoding up to ``max_len`` positions."""
        return KVCache(self.backend, batch, self.n_heads, max_len, self.d_model // self.n_heads, self.dtype)

    def forward(self, x, mask=None, causal: bool = False, memory_kv=None, cache: KVCache | None = None):
        """Attention from x (B, Nq, d_model) on backend arrays -> (B, Nq, d_model).

        Self-attention by default; cross-attention to the keys and values ``memory_kv``
        from :meth:`project_memory`. ``mask``: backend bool broadcastable to
        (B, h, Nq, Nk), True = may attend (see :func:`key_mask`). ``causal``: query i sees
        keys j <= i. ``cache``: x holds the next positions of a sequence whose earlier
        keys and values are cached; the new ones are appended and every cached position
        is attended to (no causal mask inside a block of new positions: greedy decoding
        feeds one position at a time).
        """
        bk, w, h, d = self.backend, self.weights, self.n_heads, self.d_model
        if memory_kv is None:
            qkv = bk.linear(x, w["in_proj_weight"], w["in_proj_bias"])  # (B, Nq, 3d)
            q = bk.split_heads(qkv, h, 0, d)  # (B, h, Nq, d_k)
            k = bk.split_heads(qkv, h, d, d)  # (B, h, Nq, d_k)
            v = bk.split_heads(qkv, h, 2 * d, d)  # (B, h, Nq, d_v)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, h, every position so far, d_k)
        else:
            q = bk.split_heads(bk.linear(x, w["q_proj_weight"], w["q_proj_bias"]), h)  # (B, h, Nq, d_k)
            k, v = memory_kv  # (B, h, Nk, d_k)
        heads = bk.attention(q, k, v, mask=mask, causal=causal, impl=self._impl)  # (B, h, Nq, d_v)
        return bk.linear(bk.merge_heads(heads), w["out_proj.weight"], w["out_proj.bias"])  # (B, Nq, d)

    def forward_train(self, x, mask=None, causal: bool = False, memory=None):
        """``forward`` (without a cache) keeping what the backward needs; cross-attention
        takes the ``memory`` (B, Nk, d_model) itself and projects it here."""
        bk, w, h, d = self.backend, self.weights, self.n_heads, self.d_model
        if memory is None:
            qkv = bk.linear(x, w["in_proj_weight"], w["in_proj_bias"])  # (B, Nq, 3d)
            q, k, v = (bk.split_heads(qkv, h, start, d) for start in (0, d, 2 * d))  # (B, h, Nq, d_k)
        else:
            q = bk.split_heads(bk.linear(x, w["q_proj_weight"], w["q_proj_bias"]), h)  # (B, h, Nq, d_k)
            kv = bk.linear(memory, w["kv_proj_weight"], w["kv_proj_bias"])  # (B, Nk, 2d)
            k, v = bk.split_heads(kv, h, 0, d), bk.split_heads(kv, h, d, d)  # (B, h, Nk, d_k)
        heads, lse = bk.attention_train(q, k, v, mask=mask, causal=causal, impl=self._impl)  # (B, h, Nq, d_v)
        merged = bk.merge_heads(heads)  # (B, Nq, d)
        out = bk.linear(merged, w["out_proj.weight"], w["out_proj.bias"])  # (B, Nq, d)
        return out, (x, memory, q, k, v, heads, lse, merged, mask, causal, self._impl)

    def backward(self, saved, dout):
        """dout (B, Nq, d_model) -> ((dx,) or (dx, dmemory), gradients of the four parameters)."""
        bk, w, h, d = self.backend, self.weights, self.n_heads, self.d_model
        x, memory, q, k, v, heads, lse, merged, mask, causal, impl = saved
        dmerged, dw_out, db_out = bk.linear_backward(merged, w["out_proj.weight"], dout)  # (B, Nq, d)
        dheads = bk.split_heads(dmerged, h)  # (B, h, Nq, d_v): merge_heads' backward
        dq, dk, dv = bk.attention_backward(q, k, v, heads, lse, dheads, mask=mask, causal=causal, impl=impl)
        grads = {"out_proj.weight": dw_out, "out_proj.bias": db_out}
        if memory is None:
            dqkv = bk.empty((x.shape[0], x.shape[1], 3 * d), self.dtype)  # (B, Nq, 3d)
            for g, start in ((dq, 0), (dk, d), (dv, 2 * d)):
                bk.merge_heads_into(g, dqkv, start)
            dx, grads["in_proj_weight"], grads["in_proj_bias"] = bk.linear_backward(
                x, w["in_proj_weight"], dqkv)  # (B, Nq, d)
            return (dx,), grads
        dx, dw_q, db_q = bk.linear_backward(x, w["q_proj_weight"], bk.merge_heads(dq))  # (B, Nq, d)
        dkv = bk.empty((memory.shape[0], memory.shape[1], 2 * d), self.dtype)  # (B, Nk, 2d)
        bk.merge_heads_into(dk, dkv, 0)
        bk.merge_heads_into(dv, dkv, d)
        dmemory, dw_kv, db_kv = bk.linear_backward(memory, w["kv_proj_weight"], dkv)  # (B, Nk, d)
        # W^Q and [W^K; W^V] are row blocks of in_proj_weight: their gradients fill its rows.
        dw, db = bk.zeros((3 * d, d), self.dtype), bk.zeros((3 * d,), self.dtype)
        bk.axpy(dw[:d], dw_q)
        bk.axpy(dw[d:], dw_kv)
        bk.axpy(db[:d], db_q)
        bk.axpy(db[d:], db_kv)
        grads["in_proj_weight"], grads["in_proj_bias"] = dw, db
        return (dx, dmemory), grads

    # --------------------------------------------------------------- host arrays
    def _inputs(self, x, memory, key_padding_mask, causal):
        """Checked backend arguments of ``forward_train``: (x, mask, causal, memory)."""
        x = check_features("x", x, 3, self.d_model, "d_model")
        causal = check_bool("causal", causal)
        bk = self.backend
        if memory is None:
            pad = check_padding_mask("key_padding_mask", key_padding_mask, *x.shape[:2])
        else:
            memory = check_features("memory", memory, 3, self.d_model, "d_model")
            check_same_batch("x and memory", x, memory)
            pad = check_padding_mask("key_padding_mask", key_padding_mask, *memory.shape[:2])
            memory = bk.asarray(memory, self.dtype)
        return bk.asarray(x, self.dtype), key_mask(bk, pad), causal, memory

    def __call__(self, x, memory=None, *, key_padding_mask=None, causal: bool = False):
        """Self-attention over x (B, N, d_model), or cross-attention from x to ``memory``
        (B, M, d_model); returns (B, N, d_model) as a host array.

        ``key_padding_mask`` (B, number of keys) bool, True = padding: the keys of x, or of
        the memory, that no query may attend to. ``causal``: query i sees keys j <= i.
        A query with no visible key gets a zero attention output.
        """
        x, mask, causal, memory = self._inputs(x, memory, key_padding_mask, causal)
        memory_kv = None if memory is None else self.project_memory(memory)
        return self._host(self.forward(x, mask, causal, memory_kv=memory_kv))

    def _vjp(self, x, memory=None, *, key_padding_mask=None, causal: bool = False):
        x, mask, causal, memory = self._inputs(x, memory, key_padding_mask, causal)
        out, saved = self.forward_train(x, mask, causal, memory)
        return self._pullback(out, saved, ("x",) if memory is None else ("x", "memory"))
