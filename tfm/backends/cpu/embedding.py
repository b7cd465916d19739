"""Embeddings on the CPU: scaled token lookup (section 3.4) and sinusoidal positions (section 3.5).

The lookup gathers and scales rows in one parallel Numba pass. The positional table is
computed once per (d_model, dtype) in float64 with the reference formula, cast, and kept;
it grows (doubling) when a longer position is asked for, so decoding step by step never
recomputes sin/cos. Lookups of fewer than ``_threads.SMALL_ELEMENTS`` elements (a decoding
step) run on the calling thread.

Backward: a scatter-add of scale * dy into a zeroed (vocab, D) table; each thread owns a range
of the vocabulary and adds, in token order, the tokens that fall in it (no atomics, results
independent of the thread count). Time / PyTorch autograd's (vocab 32000, 1024 tokens, D 512;
``python -m dev.cpu.training_ops``, dev/cpu/results/training_ops.csv, load ~7): 0.15
(0.11-0.18); zeroing the table is most of the work.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

from ...reference import positional_encoding
from ._threads import SMALL_ELEMENTS


@njit(cache=True)
def _gather_rows(ids, table, scale, out, t0, t1):
    """Tokens t0:t1 (flat over (B, N)) of out[b, n, :] = table[ids[b, n], :] * scale."""
    n = ids.shape[1]
    d = table.shape[1]
    s = table.dtype.type(scale)
    for t in range(t0, t1):
        row = table[ids[t // n, t % n]]
        o = out[t // n, t % n]
        for j in range(d):
            o[j] = row[j] * s


@njit(cache=True, parallel=True)
def _gather_scale(ids, table, scale, out):
    """out[b, n, :] = table[ids[b, n], :] * scale, parallel over tokens."""
    for t in prange(ids.size):
        _gather_rows(ids, table, scale, out, t, t + 1)


def embedding(ids, table, scale=1.0):
    """table[ids] * scale; ids (B, N) host int64 (range-checked by the caller) -> (B, N, D)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    table = np.ascontiguousarray(table)
    out = np.empty(ids.shape + (table.shape[1],), dtype=table.dtype)
    if out.size < SMALL_ELEMENTS:
        _gather_rows(ids, table, float(scale), out, 0, ids.size)
    else:
        _gather_scale(ids, table, float(scale), out)
    return out


_pe_tables: dict[tuple[int, np.dtype], np.ndarray] = {}
_pe_lock = threading.Lock()


def positional_table(n_positions: int, d_model: int, dtype) -> np.ndarray:
    """PE[0:n_positions] of section 3.5 in ``dtype`` (read-only, from the per-(d, dtype) cache)."""
    key = (int(d_model), np.dtype(dtype))
    table = _pe_tables.get(key)
    if table is None or table.shape[0] < n_positions:
        with _pe_lock:
            table = _pe_tables.get(key)
            if table is None or table.shape[0] < n_positions:
                size = max(n_positions, 2 * (0 if table is None else table.shape[0]), 512)
                table = positional_encoding(size, d_model).astype(key[1])
                table.flags.writeable = False
                _pe_tables[key] = table
    return table[:n_positions]


def add_positional_encoding(x, offset=0):
    """x + PE[offset : offset + N] for x (B, N, D), in x's dtype."""
    _, n, d = x.shape
    pe = positional_table(offset + n, d, x.dtype)[offset:]
    return x + pe


# ---------------------------------------------------------------------------- backward
@njit(cache=True)
def _scatter_rows(ids, dy, scale, out, v0, v1):
    """out[v0:v1] = sum over tokens t with ids[t] in [v0, v1) of scale * dy[t], in token order."""
    s = out.dtype.type(scale)
    out[v0:v1] = 0
    for t in range(ids.shape[0]):
        i = ids[t]
        if v0 <= i < v1:
            o = out[i]
            g = dy[t]
            for j in range(out.shape[1]):
                o[j] += g[j] * s


@njit(cache=True, parallel=True)
def _scatter_parallel(ids, dy, scale, out, parts):
    """Each thread owns a range of the vocabulary (zeroes it, adds the tokens that fall in it):
    no two threads write one row, and every row sums its tokens in the same order."""
    v = out.shape[0]
    for p in prange(parts):
        _scatter_rows(ids, dy, scale, out, p * v // parts, (p + 1) * v // parts)


def embedding_backward(ids, dy, vocab_size, scale=1.0):
    """dtable (vocab_size, D) of table[ids] * scale: the scatter-add of scale * dy (B, N, D)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    dy = np.ascontiguousarray(dy)
    d = dy.shape[-1]
    dy2 = dy.reshape(-1, d)
    out = np.empty((int(vocab_size), d), dy.dtype)
    # The zeroing of the table (vocab x D) is most of the work: parallel once it is large.
    if out.size + dy2.size < SMALL_ELEMENTS:
        _scatter_rows(ids, dy2, float(scale), out, 0, out.shape[0])
    else:
        _scatter_parallel(ids, dy2, float(scale), out, numba.get_num_threads())
    return out
