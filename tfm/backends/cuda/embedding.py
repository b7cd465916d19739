"""Embedding lookup and sinusoidal positional encoding on the GPU.

* ``embedding``: one thread per output element (consecutive threads walk d_model, so both
  the table row read and the output write are coalesced); the host int64 ids are uploaded
  once per call (they arrive already range-checked).
* ``add_positional_encoding``: the PE table (section 3.5) is computed once in float64 by the
  reference, cast to the activation dtype and kept on the device per (d_model, dtype),
  growing by doubling when a longer position is requested; the kernel then only adds rows
  ``offset .. offset + N`` (no sin/cos per call, bit-identical to the reference table).

* ``embedding_backward``: a deterministic scatter-add without atomics. The ids are host
  arrays (the interface's contract), so the host sorts the (B*N) positions by id (a stable
  argsort of a few thousand integers) and uploads one int64 array: the positions in that
  order, where each distinct id's run starts, and the ids. A fill kernel zeroes the
  (vocab, D) table, then one thread per (distinct id, column) sums that id's rows of scale *
  dy in position order, so every run gives the same bits (atomics would add repeated ids in
  whatever order the threads arrive, and a seed would no longer fix a training run). Both
  kernels are coalesced along D; the zeroing writes the whole table, which dominates for a
  large vocabulary (37000 x 512 floats: 76 MB, ~20 us at HBM bandwidth).

Variants: one each. Verdict: correct under the simulator and on the H200, the backward
included (``python3 -m studies.gpu``, results/gpu/smoke.csv); not timed on their own
(bandwidth-bound gathers and adds, once per forward pass; the backward once per training
step).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import cuda

from ...reference import positional_encoding
from ._launch import grid_1d, launch
from ._views import c_view

VARIANTS = {"gather": "one thread per output element", "pe_table": "cached device PE table",
            "sorted_segments": "backward: host-sorted positions, one thread per (id, column), no atomics"}

_PE_TABLES: dict = {}


@lru_cache(maxsize=None)
def _embedding_kernel():
    @cuda.jit(cache=True)
    def embed(ids, table, scale, out):
        i = cuda.grid(1)
        d = table.shape[1]
        if i < out.shape[0] * d:
            row = i // d
            out[row, i % d] = table[ids[row], i % d] * scale

    return embed


@lru_cache(maxsize=None)
def _add_pe_kernel():
    @cuda.jit(cache=True)
    def add_pe(x, pe, offset, out):
        i = cuda.grid(1)
        n, d = x.shape[1], x.shape[2]
        if i < x.shape[0] * n * d:
            col = i % d
            pos = (i // d) % n
            b = i // (n * d)
            out[b, pos, col] = x[b, pos, col] + pe[offset + pos, col]

    return add_pe


def embedding(ids, table, scale, tuning):
    b, n = ids.shape
    d = table.shape[1]
    out = cuda.device_array((b * n, d), dtype=table.dtype)
    d_ids = cuda.to_device(np.ascontiguousarray(ids, dtype=np.int64).reshape(b * n))
    launch("embedding", _embedding_kernel(), grid_1d(b * n * d, tuning.elem_threads),
           tuning.elem_threads, d_ids, table, np.dtype(table.dtype).type(scale), out)
    return out.reshape(b, n, d)


def pe_table(n_positions: int, d: int, dtype):
    """A device PE table with at least ``n_positions`` rows (cached, grown by doubling)."""
    key = (d, np.dtype(dtype))
    table = _PE_TABLES.get(key)
    if table is None or table.shape[0] < n_positions:
        rows = max(n_positions, 2 * (table.shape[0] if table is not None else 256))
        table = cuda.to_device(positional_encoding(rows, d).astype(dtype))
        _PE_TABLES[key] = table
    return table


def add_positional_encoding(x, offset, tuning):
    b, n, d = x.shape
    pe = pe_table(offset + n, d, x.dtype)
    out = cuda.device_array((b, n, d), dtype=x.dtype)
    launch("add_positional_encoding", _add_pe_kernel(), grid_1d(b * n * d, tuning.elem_threads),
           tuning.elem_threads, x, pe, offset, out)
    return out


# ---------------------------------------------------------------------- backward
@lru_cache(maxsize=None)
def _segment_sum_kernel():
    @cuda.jit(cache=True)
    def segment_sum(plan, n_pos, n_seg, dy, scale, dtable):
        # plan = [positions sorted by id (n_pos) | run starts (n_seg + 1) | run ids (n_seg)]
        i = cuda.grid(1)
        d = dy.shape[1]
        if i < n_seg * d:
            u = i // d
            c = i - u * d
            acc = dy[plan[plan[n_pos + u]], c]
            for p in range(plan[n_pos + u] + 1, plan[n_pos + u + 1]):
                acc += dy[plan[p], c]
            dtable[plan[n_pos + n_seg + 1 + u], c] = acc * scale

    return segment_sum


def segment_plan(ids: np.ndarray) -> tuple:
    """(packed int64 plan, number of distinct ids) for ``_segment_sum_kernel`` (host side)."""
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if flat.size else np.zeros(0, np.int64)
    plan = np.concatenate([order, starts, [flat.size], sorted_ids[starts]]).astype(np.int64)
    return plan, len(starts)


def embedding_backward(ids, dy, vocab_size, scale, tuning):
    """dtable (vocab_size, D) of ``embedding(ids, table, scale)``: rows of scale * dy summed by id."""
    from .linear import contiguous
    from .training import zeros

    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
    d = tuple(dy.shape)[-1]
    if tuple(dy.shape) != tuple(ids.shape) + (d,):
        raise ValueError(f"embedding_backward: dy must have shape {tuple(ids.shape) + (d,)}, got {tuple(dy.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    dtype = np.dtype(dy.dtype)
    dtable = zeros((vocab_size, d), dtype, tuning)
    if ids.size == 0 or d == 0:
        return dtable
    plan, n_seg = segment_plan(ids)
    dy2 = c_view(contiguous(dy, tuning), (ids.size, d))
    launch("embedding_backward", _segment_sum_kernel(), grid_1d(n_seg * d, tuning.elem_threads),
           tuning.elem_threads, cuda.to_device(plan), ids.size, n_seg, dy2, dtype.type(scale), dtable)
    return dtable
