"""Recurrent layers on the CPU: Elman RNN (tanh/relu), LSTM and GRU, with PyTorch's equations
and gate layouts (LSTM: i, f, g, o; GRU: r, z, n), batch-first (B, N, I) -> (B, N, H).

Each layer runs in two phases:

1. The input projections of all N steps at once: one (B*N, I) x (I, G) product through the
   dense kernels' ``linear`` (Numba's threads, single-threaded BLAS), with every bias that no
   gate multiplies folded in; W_hh is permuted and transposed once per call (16 x 16 tiles).
2. The recurrence, inside one ``@njit(parallel=True)`` kernel, on one of two schedules
   (``_row_schedule``). By rows: the batch rows are split into contiguous groups of at least
   ``MIN_GROUP_ROWS`` rows, at most one per Numba thread, and each thread runs all N steps
   for its rows, so the threads never synchronise between steps. By units, when the batch
   is too small for a row group per thread (B < 16 on 2 threads) and a step has enough
   work (``MIN_SPLIT_STEP_FLOPS``): every step shares its
   unit blocks out over the threads (a parallel region, i.e. a barrier, per step), so each
   thread streams only its blocks' part of W_hh^T, as PyTorch does. Per step and per block
   of ``UNITS`` hidden units, a thread computes its rows' slice of h_{t-1} W_hh^T with its
   own register-blocked loops (W_hh^T is permuted once per call so that a block's gate
   columns are contiguous) and then the fused gate/state update of those units
   (``_lstm_block`` and its twins, shared by both schedules). No BLAS call runs inside the
   parallel region (no oversubscription).

float32 gates use ``fastmath.tanh`` and ``fastmath.sigmoid``: rational forms that vectorise
(libm's tanhf takes 123x as long: ``fastmath``'s header). The kernels compile with
``error_model="numpy"``, as the rational tanh does. float64 uses libm.

Verdicts, from ``python -m dev.cpu.run_all`` (dev/cpu/recurrent.py; the run:
dev/cpu/results/recurrent.csv and machine.json: a 2-core AMD EPYC VM, Zen 4 with AVX-512,
shared with other jobs, 1-minute load 5-9 during the run). float32; each figure a paired
ratio: time / the baseline's time in the same interleaved round, median over rounds with a
bootstrap 95% interval.

    step product h W_hh^T, (8,512)x(512,2048), one thread, unit block by unit block,
    64-byte-aligned operands; time / ``_hidden_block``'s (224 us a step, 75 GFLOP/s):
      v1 plain k-b-j loop (a load and a store of acc per multiply-add)  2.06 (1.95-2.31)
      v2 OpenBLAS sgemm, one thread (packs W every call)                2.50 (2.44-2.63)
      v3 4 k x 2 rows                                                   1.24 (1.21-1.27)
      v4 4 k x 4 rows without FMA contraction                           1.11 (1.11-1.12)
      v5 4 k x 4 rows with FMAs: ``_hidden_block`` (kept)
      torch.mm, one thread                                              2.35 (2.25-2.46)
      v5 with W_hh^T and acc 32 bytes past a cache line                 2.13 (2.10-2.15)
    The last row matters: Numba's allocator aligns arrays to 32 bytes (a check in the lab),
    so the kernels' own W_hh^T, acc and h_buf start on a cache line or half-way into one,
    as each allocation falls. Those timings can move by up to that factor from one call to
    the next; 64-byte-aligned buffers in the kernels would pin them (not done here).

    schedules, n=128; time by units / time by rows (one row group), step MFLOP in brackets:
      LSTM B=1 H=256 (0.5) 1.28 (1.12-1.56)     RNN B=1 H=1024 (2.1) 1.33 (1.23-1.36)
      GRU B=1 H=512 (3.1) 1.18 (1.11-1.22)      RNN B=8 H=512 (4.2) 1.60 (1.51-2.09)
      LSTM B=4 H=512 (8.4) 1.09 (0.96-1.12)     LSTM B=1 H=1024 (8.4) 1.81 (1.22-1.93)
      GRU B=2 H=1024 (12.6) 1.21 (0.90-1.33)    GRU B=8 H=512 (12.6) 1.46 (0.81-2.01)
      LSTM B=8 H=512 (16.8) 1.01 (0.69-1.35)
    B=16 (two row groups), by units / by rows: LSTM 1.85 (1.14-1.96), GRU 1.14 (1.00-2.46),
    RNN 1.29 (1.23-1.42). LSTM B=8 H=512, two row groups of 4 / one of 8: 1.07 (1.02-1.15).
    Below MIN_SPLIT_STEP_FLOPS the units schedule lost, as the threshold intends; above it,
    where the library takes it (B < 16 on 2 threads), it tied or lost in this run, with wide
    intervals. Its barrier per step waits for whichever thread the OS has parked, so it
    fares worst on a loaded machine like this run's; the threshold was set from
    measurements on a quieter machine that this run does not confirm: rerun the lab on a
    quiet machine before moving MIN_SPLIT_STEP_FLOPS or MIN_GROUP_ROWS.

    units per block, LSTM B=8 H=512, one thread, time / UNITS=128's: 16 units 2.16
    (1.97-3.13), 32 1.45 (1.13-1.77), 64 1.22 (1.04-1.45), 512 1.24 (0.87-1.45). The RNN
    with 128-unit blocks / with RNN_UNITS=512: B=8 1.65 (1.40-1.89), B=64 1.30 (1.25-1.41).

    W_hh -> W_hh^T in unit-block order (``_permuted_transpose``, 16 x 16 tiles, once per
    call): NumPy's ``ascontiguousarray(w[perm].T)`` takes 1.47 (1.22-2.04) times as long.

Both schedules of each kind come from one factory (``_schedules``) over its block. The
factory's kernels replaced six written-out ones (``python -m dev.cpu.ab --rev 1d4e43a --new
34dd8e8``, dev/cpu/results/ab.csv, load ~10): outputs bitwise identical on all 16 workloads;
time 0.93-1.11 of before, 12 of the 16 intervals spanning 1, one below it, three above it
(RNN B=8 and B=16 at H=512, a 1-ms float64 LSTM): no difference this loaded machine can
tell from its noise; a quiet rerun should confirm.

Training: backpropagation through time (``*_layer_train``, ``*_layer_backward``).

1'. The training forward is phases 1 and 2 with a training block (``_lstm_train_block``,
    ``_gru_train_block``, on the same schedules) that also keeps, per step, the activated
    gates, the LSTM's c_t and the GRU's W_hn h_{t-1} + b_hn, in PyTorch's gate-major layout
    (``LSTMSaved``, ``GRUSaved``); the RNN keeps only its outputs (act' is a function of h_t).
3.  The reverse sweep, n steps in reverse: per step and unit block, the recurrent part of
    dh_t, dgh_{t+1} W_hh (the same ``_hidden_block``, G deep, reading W_hh as stored), then
    the gate gradients dgi_t, dgh_t of those units and the carried dc (LSTM) or dh z (GRU)
    (``_lstm_bptt_block`` and its twins). Same schedule rule as the forward's; by units, one
    block per thread (``_split_units``); by rows, BPTT_UNITS-unit blocks.
4.  The weight gradients over all B*N steps at once: dx = dgi W_ih, dW_ih = dgi^T x,
    dW_hh = dgh^T h_prev, each split into one single-threaded gemm per thread (3 x threads
    items in one prange), the bias sums (float64) beside dW.
The buffers the step products stream (acc, h_buf, W_hh^T, the saved W_hh) start on a cache
line (``_aligned_empty``); the forward's outputs stay bitwise identical (``python -m
dev.cpu.ab --rev 9d81f7f --only recurrent``: 8 of 8 workloads).

Verdicts from ``python -m dev.cpu.recurrent_backward`` (dev/cpu/results/recurrent_backward.csv,
its ``load_1min`` column: 4.7-8.2 on this 2-core VM, whose float32 sgemm fell to 45-52
GFLOP/s from ~165 quiet; rerun on a quiet machine). float32, B=8, I=H=512, n=128 unless
said; paired ratios as above.

    forward + backward / PyTorch's (module call + torch.autograd.grad of x, h0 (c0) and the
    four parameters; 2 threads each):
      LSTM n=128 1.08 (1.01-1.32), n=512 1.25 (1.15-1.64)  nn.LSTM runs oneDNN's RNN
                                                            primitive (mkldnn_rnn_layer)
      GRU  n=128 0.39 (0.34-0.43), n=512 0.38 (0.33-0.48)  PyTorch's per-step ATen ops
      RNN  n=128 0.42 (0.40-0.44), n=512 0.46 (0.39-0.53)
    The LSTM misses the 1.0x goal in this run; GRU and RNN meet it.

    where the time goes, LSTM (GRU), ms and fraction of an sgemm 2048^3 through ``linear``
    on the same threads, timed in the same rounds (45 (52) GFLOP/s):
      training forward 168 (99): input projection 58 (39) at 0.81 (0.80), recurrence
      86 (58) at 0.55 (0.53); backward 313 (198): reverse sweep 132 (57) at 0.35 (0.54),
      weight gradients 185 (127) at 0.77 (0.73). The products of all steps run near the
      ceiling; the recurrences, a (8, 512) x (512, 2048)-sized product and a barrier per
      step, at half of it.

    reverse sweep alone, time / the library's (by units, 256-unit blocks, at B=8):
      LSTM: by rows (one thread) 512 units 0.68 (0.49-0.88), 256 0.93 (0.80-1.31), 128 0.99
      (0.72-1.25); by units, 128-unit blocks 1.16 (0.98-1.40).
      GRU: by rows 512 0.80 (0.66-0.96), 256 0.88 (0.76-1.34), 128 1.08 (0.94-1.46); by units,
      128 1.27 (1.08-1.57).
      RNN (library: by rows, 512): 256 units 0.80 (0.71-0.89), 128 1.06 (0.89-1.20); by units,
      256 0.99 (0.86-1.06), 128 1.22 (1.07-1.33).
      B=16, LSTM (library: two row groups, 512 units): 256 units 0.82 (0.51-1.52), by units
      256 0.97 (0.63-1.44).
    On this loaded machine one thread beat the per-step barrier at B=8, as in the forward's
    table; the rule stays the forward's until a quiet run decides both.

    weight gradients, time / the library's gemm items: the same gemms on one thread LSTM
    0.83 (0.72-0.96), GRU 1.05 (0.86-1.22); NumPy on OpenBLAS's own threads 0.98
    (0.75-1.09), 1.17 (0.99-1.41). Kept: one thread pool (``_threads.py``).

    step products of the sweep (B=8, G=2048, 256-unit blocks, one thread) with W_hh 16 or
    32 bytes past a cache line / aligned: 1.26 (1.09-1.33), 1.10 (1.02-1.17); acc 32 bytes
    off: 1.00 (0.96-1.15).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import get_num_threads, njit, prange, types
from numba.extending import overload

from ._blas import N as _N
from ._blas import T as _T
from ._blas import gemm
from ._threads import single_threaded_blas
from .fastmath import sigmoid, tanh
from .linear import SMALL_FLOPS, linear

# Hidden units per block: 4*128 LSTM gate columns = a 2 KB segment of each W_hh^T row, and
# a (rows, 512) float32 accumulator that stays in L1 (block sizes compared in the header).
UNITS = 128
# The RNN's one gate: 512-unit blocks give it the LSTM's 512-column block width (header).
RNN_UNITS = 4 * UNITS

# Fewest batch rows per thread: each group streams the whole W_hh^T (4 MB at H=512) every
# step, so a group needs rows enough for its arithmetic to outweigh that (header).
MIN_GROUP_ROWS = 8

# Fewest FLOPs of a step's product h W_hh^T for the units schedule: a smaller step does
# not pay for its barrier (with OMP_WAIT_POLICY=PASSIVE, which tfm sets, the threads sleep
# between parallel regions). The header's schedule table spans this threshold.
MIN_SPLIT_STEP_FLOPS = 8_000_000

_NONLINEARITIES = {"tanh": 0, "relu": 1}


# ------------------------------------------------------------------------------ kernels
# Buffers the step products read or write with vector instructions start on a cache line:
# Numba's allocator returns 32-byte-aligned arrays and NumPy's big ones start 16 or 48 bytes
# into a line; a misaligned W_hh^T or W_hh slows the step product (the header's figures).
@njit(cache=True)
def _aligned_empty(shape, dtype):
    """``np.empty(shape, dtype)`` starting on a 64-byte boundary (a view into a larger buffer)."""
    size = 1
    for s in shape:
        size *= s
    buf = np.empty(size + 64, dtype)  # 64 spare elements: at least 64 spare bytes
    off = ((-buf.ctypes.data) % 64) // buf.itemsize
    return buf[off:off + size].reshape(shape)


def _aligned(shape, dtype) -> np.ndarray:
    """``_aligned_empty`` for host code (shape an int or a tuple)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    buf = np.empty(size + 64, dtype)
    off = ((-buf.ctypes.data) % 64) // dtype.itemsize
    return buf[off:off + size].reshape(shape)


# fastmath={"contract"} here only: fuses each multiply-add into one FMA (one rounding instead
# of two, so never less accurate; no reassociation, no finite-math assumptions); v4 in the
# header is this loop without it.
@njit(cache=True, fastmath={"contract"})
def _hidden_block(h, w_hhT, acc, col0, width):
    """acc[:, :width] = h @ w_hhT[:, col0:col0+width]  (B, width), for one unit block.

    Unrolled 4 deep in k and 4 wide in b so that each vector of accumulators is loaded and
    stored once per 4 multiply-adds and each weight vector serves 4 rows (a plain k-b-j loop
    is bound by one store per multiply-add); the sums still run in sequential k order, so no
    reassociation is needed. Rows left over (B % 4) run one at a time.
    """
    batch, hidden = h.shape
    for b in range(batch):
        row = acc[b]
        for j in range(width):
            row[j] = 0.0
    # Loop bounds written as `n - 3`: with `n - n % 4` LLVM lost the trip count and the
    # inner loop ran several times slower (seen when this was written; not in the lab).
    for k in range(0, hidden - 3, 4):
        w0, w1 = w_hhT[k, col0:col0 + width], w_hhT[k + 1, col0:col0 + width]
        w2, w3 = w_hhT[k + 2, col0:col0 + width], w_hhT[k + 3, col0:col0 + width]
        for b in range(0, batch - 3, 4):
            p0, p1, p2, p3 = h[b, k], h[b, k + 1], h[b, k + 2], h[b, k + 3]
            q0, q1, q2, q3 = h[b + 1, k], h[b + 1, k + 1], h[b + 1, k + 2], h[b + 1, k + 3]
            s0, s1, s2, s3 = h[b + 2, k], h[b + 2, k + 1], h[b + 2, k + 2], h[b + 2, k + 3]
            t0, t1, t2, t3 = h[b + 3, k], h[b + 3, k + 1], h[b + 3, k + 2], h[b + 3, k + 3]
            r0, r1, r2, r3 = acc[b], acc[b + 1], acc[b + 2], acc[b + 3]
            for j in range(width):  # independent lanes: vectorised without reassociation
                a0, a1, a2, a3 = w0[j], w1[j], w2[j], w3[j]
                r0[j] = r0[j] + p0 * a0 + p1 * a1 + p2 * a2 + p3 * a3
                r1[j] = r1[j] + q0 * a0 + q1 * a1 + q2 * a2 + q3 * a3
                r2[j] = r2[j] + s0 * a0 + s1 * a1 + s2 * a2 + s3 * a3
                r3[j] = r3[j] + t0 * a0 + t1 * a1 + t2 * a2 + t3 * a3
        for b in range(batch - batch % 4, batch):
            p0, p1, p2, p3 = h[b, k], h[b, k + 1], h[b, k + 2], h[b, k + 3]
            r0 = acc[b]
            for j in range(width):
                r0[j] = r0[j] + p0 * w0[j] + p1 * w1[j] + p2 * w2[j] + p3 * w3[j]
    for k in range(hidden - hidden % 4, hidden):
        w0 = w_hhT[k, col0:col0 + width]
        for b in range(batch):
            p0 = h[b, k]
            r0 = acc[b]
            for j in range(width):
                r0[j] += p0 * w0[j]


def _row_starts(batch: int) -> np.ndarray:
    """Contiguous batch-row groups, one per thread: group g is rows starts[g]:starts[g+1].

    Every group streams all of W_hh^T once per step, so a group needs enough rows for the
    arithmetic, not that stream, to bound its step: at least MIN_GROUP_ROWS.
    """
    n_groups = max(1, min(get_num_threads(), batch // MIN_GROUP_ROWS))
    return np.array([g * batch // n_groups for g in range(n_groups + 1)], dtype=np.int64)


def _row_schedule(batch: int, hidden: int, units: int, n_gates: int):
    """Row-group starts (``_row_starts``) for the by-rows schedule, or None for by units:
    when the batch is too small for a row group per thread, there are blocks to share, and
    a step has the work (>= MIN_SPLIT_STEP_FLOPS) to pay for its barrier."""
    starts = _row_starts(batch)
    threads = get_num_threads()
    step_flops = 2 * batch * hidden * n_gates * hidden
    if (threads > 1 and len(starts) - 1 < threads and hidden > units
            and step_flops >= MIN_SPLIT_STEP_FLOPS):
        return None
    return starts


# One step of one unit block [u0, u0 + w) for the batch rows r0 .. r0 + len(h_prev): the
# block's slice of h_{t-1} W_hh^T into ``acc``, then the gate/state update of those units.
# ``h_prev`` / ``h_next`` hold only those rows; ``xw``, ``out`` (and ``c``) the whole batch.
# The fifth argument is the kind's own state: the RNN's relu flag, the LSTM's cell state
# (B, H), updated in place, the GRU's b_hn (H,).
@njit(cache=True, fastmath=False, error_model="numpy")
def _rnn_block(h_prev, w_hhT, acc, xw, relu, h_next, out, r0, t, u0, w):
    _hidden_block(h_prev, w_hhT, acc, u0, w)
    for b in range(h_prev.shape[0]):
        a_row, x_row = acc[b], xw[r0 + b, t, u0:u0 + w]
        h_row, o_row = h_next[b, u0:u0 + w], out[r0 + b, t, u0:u0 + w]
        for u in range(w):
            z = a_row[u] + x_row[u]
            hh = max(z, 0.0) if relu else tanh(z)
            h_row[u] = hh
            o_row[u] = hh


@njit(cache=True, fastmath=False, error_model="numpy")
def _lstm_block(h_prev, w_hhT, acc, xw, c, h_next, out, r0, t, u0, w):
    col0 = 4 * u0  # block layout: [i(w), f(w), g(w), o(w)]
    _hidden_block(h_prev, w_hhT, acc, col0, 4 * w)
    for b in range(h_prev.shape[0]):
        a_row, x_row = acc[b], xw[r0 + b, t, col0:col0 + 4 * w]
        c_row, h_row = c[r0 + b, u0:u0 + w], h_next[b, u0:u0 + w]
        o_row = out[r0 + b, t, u0:u0 + w]
        for u in range(w):
            i = sigmoid(a_row[u] + x_row[u])
            f = sigmoid(a_row[w + u] + x_row[w + u])
            g = tanh(a_row[2 * w + u] + x_row[2 * w + u])
            o = sigmoid(a_row[3 * w + u] + x_row[3 * w + u])
            cc = f * c_row[u] + i * g
            c_row[u] = cc
            hh = o * tanh(cc)
            h_row[u] = hh
            o_row[u] = hh


@njit(cache=True, fastmath=False, error_model="numpy")
def _gru_block(h_prev, w_hhT, acc, xw, b_hn, h_next, out, r0, t, u0, w):
    col0 = 3 * u0  # block layout: [r(w), z(w), n(w)]
    _hidden_block(h_prev, w_hhT, acc, col0, 3 * w)
    for b in range(h_prev.shape[0]):
        a_row, x_row = acc[b], xw[r0 + b, t, col0:col0 + 3 * w]
        hp_row, bn = h_prev[b, u0:u0 + w], b_hn[u0:u0 + w]
        h_row, o_row = h_next[b, u0:u0 + w], out[r0 + b, t, u0:u0 + w]
        for u in range(w):
            r = sigmoid(a_row[u] + x_row[u])
            z = sigmoid(a_row[w + u] + x_row[w + u])
            nn = tanh(x_row[2 * w + u] + r * (a_row[2 * w + u] + bn[u]))
            hh = nn + z * (hp_row[u] - nn)
            h_row[u] = hh
            o_row[u] = hh


_BLOCKS = {1: _rnn_block, 4: _lstm_block, 3: _gru_block}


def _cell_block(n_gates, h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
    """The block step of the cell with ``n_gates`` gates (a constant); @njit code only."""
    raise NotImplementedError("_cell_block is only callable from @njit code")


@overload(_cell_block, prefer_literal=True)
def _cell_block_impl(n_gates, h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
    # Resolved at compile time from the literal gate count: a direct call, as if written out.
    if not isinstance(n_gates, types.IntegerLiteral):
        return None
    block = _BLOCKS[n_gates.literal_value]

    def impl(n_gates, h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
        block(h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w)

    return impl


# The training forwards' blocks: the same step, and what backpropagation through time needs
# kept per step in PyTorch's gate-major layout (gate q of unit u at column q*H + u, whatever
# the block permutation of W_hh^T), so that the backward reads W_hh and W_ih as they are. The
# state is a tuple: the LSTM's (c, gates, cells), the GRU's (b_hn, gates, hn). The RNN keeps
# nothing beyond its outputs (act' is a function of h_t), so it trains on ``_rnn_block``.
@njit(cache=True, fastmath=False, error_model="numpy")
def _lstm_train_block(h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
    c, gates, cells = state  # (B, H) in place, (B, N, 4H) i f g o activated, (B, N, H) c_t
    hidden = c.shape[1]
    col0 = 4 * u0
    _hidden_block(h_prev, w_hhT, acc, col0, 4 * w)
    for b in range(h_prev.shape[0]):
        a_row, x_row = acc[b], xw[r0 + b, t, col0:col0 + 4 * w]
        c_row, h_row = c[r0 + b, u0:u0 + w], h_next[b, u0:u0 + w]
        o_row, s_row = out[r0 + b, t, u0:u0 + w], cells[r0 + b, t, u0:u0 + w]
        g_all = gates[r0 + b, t]
        gi, gf = g_all[u0:u0 + w], g_all[hidden + u0:hidden + u0 + w]
        gg, go = g_all[2 * hidden + u0:2 * hidden + u0 + w], g_all[3 * hidden + u0:3 * hidden + u0 + w]
        for u in range(w):
            i = sigmoid(a_row[u] + x_row[u])
            f = sigmoid(a_row[w + u] + x_row[w + u])
            g = tanh(a_row[2 * w + u] + x_row[2 * w + u])
            o = sigmoid(a_row[3 * w + u] + x_row[3 * w + u])
            cc = f * c_row[u] + i * g
            c_row[u] = cc
            hh = o * tanh(cc)
            h_row[u] = hh
            o_row[u] = hh
            gi[u], gf[u], gg[u], go[u] = i, f, g, o
            s_row[u] = cc


@njit(cache=True, fastmath=False, error_model="numpy")
def _gru_train_block(h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
    b_hn, gates, hn = state  # (H,), (B, N, 3H) r z n activated, (B, N, H) W_hn h_{t-1} + b_hn
    hidden = b_hn.shape[0]
    col0 = 3 * u0
    _hidden_block(h_prev, w_hhT, acc, col0, 3 * w)
    for b in range(h_prev.shape[0]):
        a_row, x_row = acc[b], xw[r0 + b, t, col0:col0 + 3 * w]
        hp_row, bn = h_prev[b, u0:u0 + w], b_hn[u0:u0 + w]
        h_row, o_row = h_next[b, u0:u0 + w], out[r0 + b, t, u0:u0 + w]
        g_all, hn_row = gates[r0 + b, t], hn[r0 + b, t, u0:u0 + w]
        gr, gz, gn = (g_all[u0:u0 + w], g_all[hidden + u0:hidden + u0 + w],
                      g_all[2 * hidden + u0:2 * hidden + u0 + w])
        for u in range(w):
            r = sigmoid(a_row[u] + x_row[u])
            z = sigmoid(a_row[w + u] + x_row[w + u])
            hnu = a_row[2 * w + u] + bn[u]
            nn = tanh(x_row[2 * w + u] + r * hnu)
            hh = nn + z * (hp_row[u] - nn)
            h_row[u] = hh
            o_row[u] = hh
            gr[u], gz[u], gn[u] = r, z, nn
            hn_row[u] = hnu


_TRAIN_BLOCKS = {4: _lstm_train_block, 3: _gru_train_block}


def _train_block(n_gates, h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
    """The training block step of the cell with ``n_gates`` gates; @njit code only."""
    raise NotImplementedError("_train_block is only callable from @njit code")


@overload(_train_block, prefer_literal=True)
def _train_block_impl(n_gates, h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
    if not isinstance(n_gates, types.IntegerLiteral):
        return None
    block = _TRAIN_BLOCKS[n_gates.literal_value]

    def impl(n_gates, h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w):
        block(h_prev, w_hhT, acc, xw, state, h_next, out, r0, t, u0, w)

    return impl


def _schedules(name: str, n_gates: int, cell=_cell_block):
    """The two schedule kernels of one cell kind, (by_rows, by_units), over its block
    (``cell``: ``_cell_block``, or ``_train_block`` for the training forwards).

    By rows: each thread runs all n steps for its own row group (no barriers). By units:
    every step's unit blocks are shared out over the threads (one parallel region, i.e. one
    barrier, per step; each thread streams only its blocks' share of W_hh^T), for batches
    too small for a row group per thread. Both return h_n; the LSTM's cell state is
    ``state``, updated in place. ``n_gates`` is a closure constant, so each kind compiles
    (and caches) its own kernels, with its block called directly.
    """

    def by_rows(xw, h0, w_hhT, state, out, units, starts):
        batch, n, gates = xw.shape
        hidden = gates // n_gates
        n_blocks = (hidden + units - 1) // units
        h_n = np.empty((batch, hidden), dtype=xw.dtype)
        for grp in prange(starts.shape[0] - 1):
            r0, r1 = starts[grp], starts[grp + 1]
            acc = _aligned_empty((r1 - r0, n_gates * units), xw.dtype)
            h_buf = _aligned_empty((2, r1 - r0, hidden), xw.dtype)
            h_buf[0] = h0[r0:r1]
            for t in range(n):
                for blk in range(n_blocks):
                    u0 = blk * units
                    cell(n_gates, h_buf[t % 2], w_hhT, acc, xw, state, h_buf[(t + 1) % 2],
                         out, r0, t, u0, min(units, hidden - u0))
            h_n[r0:r1] = h_buf[n % 2]
        return h_n

    def by_units(xw, h0, w_hhT, state, out, units):
        batch, n, gates = xw.shape
        hidden = gates // n_gates
        n_blocks = (hidden + units - 1) // units
        acc = _aligned_empty((n_blocks, batch, n_gates * units), xw.dtype)
        h_buf = _aligned_empty((2, batch, hidden), xw.dtype)
        h_buf[0] = h0
        for t in range(n):
            for blk in prange(n_blocks):
                u0 = blk * units
                cell(n_gates, h_buf[t % 2], w_hhT, acc[blk], xw, state,
                     h_buf[(t + 1) % 2], out, 0, t, u0, min(units, hidden - u0))
        return h_buf[n % 2].copy()

    kernels = []
    for fn in (by_rows, by_units):
        # its own name: the cache file and profiles tell the kinds apart
        fn.__name__ = fn.__qualname__ = f"_{name}_{fn.__name__}"
        kernels.append(njit(cache=True, fastmath=False, error_model="numpy", parallel=True)(fn))
    return tuple(kernels)


_rnn_by_rows, _rnn_by_units = _schedules("rnn", 1)
_lstm_by_rows, _lstm_by_units = _schedules("lstm", 4)
_gru_by_rows, _gru_by_units = _schedules("gru", 3)
_lstm_train_by_rows, _lstm_train_by_units = _schedules("lstm_train", 4, _train_block)
_gru_train_by_rows, _gru_train_by_units = _schedules("gru_train", 3, _train_block)


# ------------------------------------------------------------------------------ BPTT kernels
# Backpropagation through time mirrors the forward: phase 2 runs first, in reverse, then
# phase 1's backward. The reverse sweep carries dh (and the LSTM's dc) from step t + 1 to t:
#     dh_t = dout_t + dgh_{t+1} W_hh (+ dh_{t+1} z_{t+1} for the GRU),
# and turns it, unit by unit, into the gate-input gradients dgi_t, dgh_t (B, G) (the same
# array but for the GRU, whose r gates W_hn h). The product's output columns are hidden
# units and its inner dimension the G gate rows of W_hh as PyTorch stores it, so a unit
# block reads every gate of step t + 1 and writes only its own units' gates of step t:
# the forward's structure exactly, with W_hh (G, H) in the place of W_hh^T (H, G), and the
# same two schedules (a thread's rows through all steps; or every step's unit blocks shared
# out, a barrier per step). All gradients are in gate-major layout, so the weight gradients
# after the sweep are three plain products over all B*N steps (``_weight_grads``).
@njit(cache=True, fastmath=False, error_model="numpy")
def _dh_recurrent(da_next, w_hh, acc, dh_n, r0, u0, w, first):
    """acc[:, :w] = the recurrent part of dh_t on units [u0, u0 + w): da_{t+1} W_hh, or dh_n
    at the last step."""
    if first:
        for b in range(da_next.shape[0]):
            acc[b, :w] = dh_n[r0 + b, u0:u0 + w]
    else:
        _hidden_block(da_next, w_hh, acc, u0, w)


# One reverse step of one unit block [u0, u0 + w) for the batch rows r0 .. r0 + len(da_next):
# ``saved`` is the kind's tuple (below), ``carry`` (B, H) the state that crosses steps at
# these units (the LSTM's dc, the GRU's dh z; unused by the RNN); dgi, dgh (B, N, G).
@njit(cache=True, fastmath=False, error_model="numpy")
def _rnn_bptt_block(da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh, r0, t, u0, w, first):
    out, relu = saved
    one, zero = acc.dtype.type(1), acc.dtype.type(0)
    _dh_recurrent(da_next, w_hh, acc, dh_n, r0, u0, w, first)
    for b in range(da_next.shape[0]):
        a_row, d_row = acc[b], dout[r0 + b, t, u0:u0 + w]
        h_row, g_row = out[r0 + b, t, u0:u0 + w], dgi[r0 + b, t, u0:u0 + w]
        if relu:  # act' from h_t itself: [h_t > 0], 1 - h_t^2
            for u in range(w):
                g_row[u] = a_row[u] + d_row[u] if h_row[u] > zero else zero
        else:
            for u in range(w):
                hh = h_row[u]
                g_row[u] = (a_row[u] + d_row[u]) * (one - hh * hh)


@njit(cache=True, fastmath=False, error_model="numpy")
def _lstm_bptt_block(da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh, r0, t, u0, w, first):
    gates, cells, c0 = saved  # (B, N, 4H) i f g o, (B, N, H) c_t, (B, H)
    hidden = w_hh.shape[1]
    one = acc.dtype.type(1)
    _dh_recurrent(da_next, w_hh, acc, dh_n, r0, u0, w, first)
    for b in range(da_next.shape[0]):
        a_row, d_row = acc[b], dout[r0 + b, t, u0:u0 + w]
        dc_row, c_row = carry[r0 + b, u0:u0 + w], cells[r0 + b, t, u0:u0 + w]
        cp_row = cells[r0 + b, t - 1, u0:u0 + w] if t > 0 else c0[r0 + b, u0:u0 + w]
        g_all, d_all = gates[r0 + b, t], dgi[r0 + b, t]
        gi, gf = g_all[u0:u0 + w], g_all[hidden + u0:hidden + u0 + w]
        gg, go = g_all[2 * hidden + u0:2 * hidden + u0 + w], g_all[3 * hidden + u0:3 * hidden + u0 + w]
        di, df = d_all[u0:u0 + w], d_all[hidden + u0:hidden + u0 + w]
        dg, do = d_all[2 * hidden + u0:2 * hidden + u0 + w], d_all[3 * hidden + u0:3 * hidden + u0 + w]
        for u in range(w):
            i, f, g, o = gi[u], gf[u], gg[u], go[u]
            tc = tanh(c_row[u])  # recomputed: the same function as the forward's, so equal
            dh = a_row[u] + d_row[u]
            dc = dc_row[u] + dh * o * (one - tc * tc)
            di[u] = dc * g * i * (one - i)
            df[u] = dc * cp_row[u] * f * (one - f)
            dg[u] = dc * i * (one - g * g)
            do[u] = dh * tc * o * (one - o)
            dc_row[u] = dc * f  # dc_{t-1}


@njit(cache=True, fastmath=False, error_model="numpy")
def _gru_bptt_block(da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh, r0, t, u0, w, first):
    gates, hn, out, h0 = saved  # (B, N, 3H) r z n, (B, N, H) W_hn h + b_hn, h_1..h_n, h_0
    hidden = w_hh.shape[1]
    one = acc.dtype.type(1)
    _dh_recurrent(da_next, w_hh, acc, dh_n, r0, u0, w, first)
    for b in range(da_next.shape[0]):
        a_row, d_row, z_carry = acc[b], dout[r0 + b, t, u0:u0 + w], carry[r0 + b, u0:u0 + w]
        hp_row = out[r0 + b, t - 1, u0:u0 + w] if t > 0 else h0[r0 + b, u0:u0 + w]
        hn_row, g_all = hn[r0 + b, t, u0:u0 + w], gates[r0 + b, t]
        gr, gz = g_all[u0:u0 + w], g_all[hidden + u0:hidden + u0 + w]
        gn = g_all[2 * hidden + u0:2 * hidden + u0 + w]
        i_all, h_all = dgi[r0 + b, t], dgh[r0 + b, t]
        ir, iz, i_n = (i_all[u0:u0 + w], i_all[hidden + u0:hidden + u0 + w],
                       i_all[2 * hidden + u0:2 * hidden + u0 + w])
        hr, hz, h_n = (h_all[u0:u0 + w], h_all[hidden + u0:hidden + u0 + w],
                       h_all[2 * hidden + u0:2 * hidden + u0 + w])
        for u in range(w):
            r, z, nn = gr[u], gz[u], gn[u]
            dh = a_row[u] + z_carry[u] + d_row[u]
            da_n = dh * (one - z) * (one - nn * nn)
            da_r = da_n * hn_row[u] * r * (one - r)
            da_z = dh * (hp_row[u] - nn) * z * (one - z)
            ir[u], iz[u], i_n[u] = da_r, da_z, da_n
            hr[u], hz[u], h_n[u] = da_r, da_z, da_n * r
            z_carry[u] = dh * z  # h_{t-1}'s direct share of dh_t


_BPTT_BLOCKS = {1: _rnn_bptt_block, 4: _lstm_bptt_block, 3: _gru_bptt_block}


def _bptt_block(n_gates, da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh, r0, t, u0, w, first):
    """The reverse block step of the cell with ``n_gates`` gates; @njit code only."""
    raise NotImplementedError("_bptt_block is only callable from @njit code")


@overload(_bptt_block, prefer_literal=True)
def _bptt_block_impl(n_gates, da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh, r0, t, u0, w, first):
    if not isinstance(n_gates, types.IntegerLiteral):
        return None
    block = _BPTT_BLOCKS[n_gates.literal_value]

    def impl(n_gates, da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh, r0, t, u0, w, first):
        block(da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh, r0, t, u0, w, first)

    return impl


@njit(cache=True, fastmath=False)
def _dh0_block(da_first, w_hh, acc, carry, add_carry, dh0, r0, u0, w):
    """dh_0 on units [u0, u0 + w): da_1 W_hh (+ the GRU's carried dh_1 z_1)."""
    _hidden_block(da_first, w_hh, acc, u0, w)
    for b in range(da_first.shape[0]):
        row, a_row, c_row = dh0[r0 + b, u0:u0 + w], acc[b], carry[r0 + b, u0:u0 + w]
        for u in range(w):
            row[u] = a_row[u] + c_row[u] if add_carry else a_row[u]


def _bptt_schedules(name: str, n_gates: int):
    """The reverse sweep of one cell kind on the forward's two schedules, (by_rows, by_units).

    Both fill dgi, dgh (B, N, G) and dh0 (B, H); ``carry`` (B, H) enters as the LSTM's dc_n
    (zeros for the GRU) and leaves as dc_0. ``units``: hidden units per block, the width of
    the product's output.
    """

    def by_rows(dgi, dgh, w_hh, saved, dout, dh_n, carry, dh0, units, starts):
        batch, n, gates = dgi.shape
        hidden = w_hh.shape[1]
        n_blocks = (hidden + units - 1) // units
        for grp in prange(starts.shape[0] - 1):
            r0, r1 = starts[grp], starts[grp + 1]
            acc = _aligned_empty((r1 - r0, units), dgi.dtype)
            for s in range(n):
                t = n - 1 - s
                da_next = dgh[r0:r1, min(t + 1, n - 1)]
                for blk in range(n_blocks):
                    u0 = blk * units
                    _bptt_block(n_gates, da_next, w_hh, acc, saved, dout, dh_n, carry, dgi, dgh,
                                r0, t, u0, min(units, hidden - u0), s == 0)
            for blk in range(n_blocks):
                u0 = blk * units
                _dh0_block(dgh[r0:r1, 0], w_hh, acc, carry, n_gates == 3, dh0, r0, u0,
                           min(units, hidden - u0))

    def by_units(dgi, dgh, w_hh, saved, dout, dh_n, carry, dh0, units):
        batch, n, gates = dgi.shape
        hidden = w_hh.shape[1]
        n_blocks = (hidden + units - 1) // units
        acc = _aligned_empty((n_blocks, batch, units), dgi.dtype)
        for s in range(n):
            t = n - 1 - s
            da_next = dgh[:, min(t + 1, n - 1)]
            for blk in prange(n_blocks):
                u0 = blk * units
                _bptt_block(n_gates, da_next, w_hh, acc[blk], saved, dout, dh_n, carry, dgi, dgh,
                            0, t, u0, min(units, hidden - u0), s == 0)
        for blk in prange(n_blocks):
            u0 = blk * units
            _dh0_block(dgh[:, 0], w_hh, acc[blk], carry, n_gates == 3, dh0, 0, u0,
                       min(units, hidden - u0))

    kernels = []
    for fn in (by_rows, by_units):
        fn.__name__ = fn.__qualname__ = f"_{name}_bptt_{fn.__name__}"
        kernels.append(njit(cache=True, fastmath=False, error_model="numpy", parallel=True)(fn))
    return tuple(kernels)


_rnn_bptt_by_rows, _rnn_bptt_by_units = _bptt_schedules("rnn", 1)
_lstm_bptt_by_rows, _lstm_bptt_by_units = _bptt_schedules("lstm", 4)
_gru_bptt_by_rows, _gru_bptt_by_units = _bptt_schedules("gru", 3)


@njit(cache=True)
def _weight_grad_item(item, parts, x, h_prev, w_ih, dgi, dgh, dx, dw_ih, dw_hh, db_ih, db_hh):
    """Item ``item`` of 3 * parts: part ``item % parts`` of product ``item // parts``, each a
    single-threaded gemm over all M = B*N steps (rows of the gate gradients):
    0: dx = dgi W_ih (row blocks);  1: dW_ih = dgi^T x;  2: dW_hh = dgh^T h_prev (blocks of
    gate rows, with their biases' column sums, in float64: M terms each)."""
    m, g = dgi.shape
    one = np.ones(1, dgi.dtype)
    zero = np.zeros(1, dgi.dtype)
    product, p = item // parts, item % parts
    if product == 0:
        d_in = x.shape[1]
        r0, r1 = p * m // parts, (p + 1) * m // parts
        if r1 > r0:  # row-major dx (r, I) is column-major (I, r) = W_ih^T (I, G) @ dgi^T (G, r)
            gemm(_N, _N, d_in, r1 - r0, g, one, w_ih, d_in, dgi[r0], g, zero, dx[r0], d_in)
        return
    da, src = (dgi, x) if product == 1 else (dgh, h_prev)
    dw, db = (dw_ih, db_ih) if product == 1 else (dw_hh, db_hh)
    k = src.shape[1]
    g0, g1 = p * g // parts, (p + 1) * g // parts
    if g1 > g0:  # column-major dW^T block (k, c) = src^T (k, M) @ da[:, g0:g1] (M, c)
        gemm(_N, _T, k, g1 - g0, m, one, src, k, da[0, g0:], g, zero, dw[g0], k)
        acc = np.zeros(g1 - g0, np.float64)
        for i in range(m):
            row = da[i]
            for j in range(g0, g1):
                acc[j - g0] += row[j]
        for j in range(g0, g1):
            db[j] = acc[j - g0]


@njit(cache=True)
def _weight_grads_serial(x, h_prev, w_ih, dgi, dgh, dx, dw_ih, dw_hh, db_ih, db_hh):
    for item in range(3):
        _weight_grad_item(item, 1, x, h_prev, w_ih, dgi, dgh, dx, dw_ih, dw_hh, db_ih, db_hh)


@njit(cache=True, parallel=True)
def _weight_grads_parallel(x, h_prev, w_ih, dgi, dgh, dx, dw_ih, dw_hh, db_ih, db_hh, parts):
    # 3 * parts items of about equal FLOPs when I = H; a static schedule gives each thread 3.
    for item in prange(3 * parts):
        _weight_grad_item(item, parts, x, h_prev, w_ih, dgi, dgh, dx, dw_ih, dw_hh, db_ih, db_hh)


# ------------------------------------------------------------------------------ wrappers
def _block_permutation(n_gates: int, hidden: int, units: int = UNITS) -> np.ndarray:
    """Gate-major rows (PyTorch) -> per-unit-block rows [gate0(w), gate1(w), ...]."""
    perm = []
    for u0 in range(0, hidden, units):
        w = min(units, hidden - u0)
        for q in range(n_gates):
            perm.append(np.arange(q * hidden + u0, q * hidden + u0 + w))
    return np.concatenate(perm)


def _vec(b, size, dtype):
    return np.zeros(size, dtype) if b is None else np.asarray(b, dtype).reshape(size)


@njit(cache=True, fastmath=False)
def _permuted_transpose(w, perm):
    """out[k, j] = w[perm[j], k]: (G, H) -> (H, G) in 16 x 16 tiles.

    Contiguous stores; NumPy's ``ascontiguousarray(w[perm].T)``, a strided gather per
    element, takes 1.47x as long (header).
    """
    g, hidden = w.shape
    out = _aligned_empty((hidden, g), w.dtype)
    for j0 in range(0, g, 16):
        j1 = min(j0 + 16, g)
        for k0 in range(0, hidden, 16):
            k1 = min(k0 + 16, hidden)
            for k in range(k0, k1):
                row = out[k]
                for j in range(j0, j1):
                    row[j] = w[perm[j], k]
    return out


def _prepare(x, h0, w_ih, w_hh, bias_in, n_gates, units=UNITS):
    """Permute the weights to unit blocks and run the input projection of all steps."""
    dtype = x.dtype
    batch, n, d_in = x.shape
    hidden = h0.shape[1]
    perm = _block_permutation(n_gates, hidden, units)
    w_ih = np.asarray(w_ih, dtype)[perm]  # (G, I) permuted rows
    w_hhT = _permuted_transpose(np.ascontiguousarray(w_hh, dtype), perm)  # (H, G)
    # One product for all N steps, (B*N, I) x (I, G), on the dense kernels' thread policy.
    xw = linear(x.reshape(batch * n, d_in), w_ih, np.ascontiguousarray(bias_in[perm]))
    return xw.reshape(batch, n, n_gates * hidden), w_hhT


def _host(x, dtype=None):
    return np.ascontiguousarray(x, dtype=dtype)


def rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
    """Elman RNN: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) -> (out, h_n)."""
    x = _host(x)
    h0 = _host(h0, x.dtype)
    hidden = h0.shape[1]
    bias = _vec(b_ih, hidden, x.dtype) + _vec(b_hh, hidden, x.dtype)
    xw, w_hhT = _prepare(x, h0, w_ih, w_hh, bias, 1)
    out = np.empty((x.shape[0], x.shape[1], hidden), x.dtype)
    relu = _NONLINEARITIES[nonlinearity] == 1
    split_units = max(UNITS, RNN_UNITS // get_num_threads())  # the one gate needs no permutation
    starts = _row_schedule(x.shape[0], hidden, split_units, 1)
    if starts is None:
        h_n = _rnn_by_units(xw, h0, w_hhT, relu, out, split_units)
    else:
        h_n = _rnn_by_rows(xw, h0, w_hhT, relu, out, RNN_UNITS, starts)
    return out, h_n


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """LSTM (gates i, f, g, o) -> (out (B, N, H), h_n (B, H), c_n (B, H))."""
    x = _host(x)
    h0 = _host(h0, x.dtype)
    c = np.array(c0, dtype=x.dtype, order="C")  # the cell state, a copy the kernels update in place
    hidden = h0.shape[1]
    bias = _vec(b_ih, 4 * hidden, x.dtype) + _vec(b_hh, 4 * hidden, x.dtype)
    xw, w_hhT = _prepare(x, h0, w_ih, w_hh, bias, 4)
    out = np.empty((x.shape[0], x.shape[1], hidden), x.dtype)
    starts = _row_schedule(x.shape[0], hidden, UNITS, 4)
    if starts is None:
        h_n = _lstm_by_units(xw, h0, w_hhT, c, out, UNITS)
    else:
        h_n = _lstm_by_rows(xw, h0, w_hhT, c, out, UNITS, starts)
    return out, h_n, c


def gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh):
    """GRU (gates r, z, n; b_hn stays inside r * (W_hn h + b_hn)) -> (out, h_n)."""
    x = _host(x)
    h0 = _host(h0, x.dtype)
    hidden = h0.shape[1]
    b_ih = _vec(b_ih, 3 * hidden, x.dtype)
    b_hh = _vec(b_hh, 3 * hidden, x.dtype)
    bias = b_ih.copy()
    bias[:2 * hidden] += b_hh[:2 * hidden]  # r and z: both biases add outside any gate
    xw, w_hhT = _prepare(x, h0, w_ih, w_hh, bias, 3)
    out = np.empty((x.shape[0], x.shape[1], hidden), x.dtype)
    b_hn = np.ascontiguousarray(b_hh[2 * hidden:])
    starts = _row_schedule(x.shape[0], hidden, UNITS, 3)
    if starts is None:
        h_n = _gru_by_units(xw, h0, w_hhT, b_hn, out, UNITS)
    else:
        h_n = _gru_by_rows(xw, h0, w_hhT, b_hn, out, UNITS, starts)
    return out, h_n


# ------------------------------------------------------------------------------ training
# The training forwards keep, per step, what the reverse sweep needs (the ``*Saved`` tuples,
# opaque to the layers); the backwards run the sweep on the schedule the forward would pick
# and then the weight gradients as three products over all steps.
class RNNSaved(NamedTuple):
    x: np.ndarray  # (B, N, I)
    h0: np.ndarray  # (B, H)
    w_ih: np.ndarray  # (H, I)
    w_hh: np.ndarray  # (H, H)
    out: np.ndarray  # (B, N, H): h_1 .. h_n
    relu: bool


class LSTMSaved(NamedTuple):
    x: np.ndarray  # (B, N, I)
    h0: np.ndarray  # (B, H)
    c0: np.ndarray  # (B, H)
    w_ih: np.ndarray  # (4H, I)
    w_hh: np.ndarray  # (4H, H)
    out: np.ndarray  # (B, N, H)
    gates: np.ndarray  # (B, N, 4H): i, f, g, o after their sigmoid / tanh
    cells: np.ndarray  # (B, N, H): c_1 .. c_n


class GRUSaved(NamedTuple):
    x: np.ndarray  # (B, N, I)
    h0: np.ndarray  # (B, H)
    w_ih: np.ndarray  # (3H, I)
    w_hh: np.ndarray  # (3H, H)
    out: np.ndarray  # (B, N, H)
    gates: np.ndarray  # (B, N, 3H): r, z, n after their sigmoid / tanh
    hn: np.ndarray  # (B, N, H): W_hn h_{t-1} + b_hn, the term r gates


# Every array the training kernels must fill comes from here (the tests swap in a NaN fill,
# so an element a kernel leaves unwritten cannot pass).
_alloc = _aligned


def _weights(w_ih, w_hh, dtype):
    """W_ih as it is (only gemm reads it); W_hh copied onto a cache line: the reverse
    sweep's step product streams its rows."""
    w_hh_aligned = _aligned(np.shape(w_hh), dtype)
    w_hh_aligned[...] = w_hh
    return np.ascontiguousarray(w_ih, dtype), w_hh_aligned


def rnn_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
    """``rnn_layer`` -> (out, h_n, RNNSaved): its outputs are all the backward needs."""
    x = _host(x)
    h0 = _host(h0, x.dtype)
    out, h_n = rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    relu = _NONLINEARITIES[nonlinearity] == 1
    return out, h_n, RNNSaved(x, h0, *_weights(w_ih, w_hh, x.dtype), out, relu)


def lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """``lstm_layer`` that also keeps its gates and cell states -> (out, h_n, c_n, LSTMSaved)."""
    x = _host(x)
    h0 = _host(h0, x.dtype)
    c0 = _host(c0, x.dtype)
    c = c0.copy()  # the cell state, updated in place
    batch, n, _ = x.shape
    hidden = h0.shape[1]
    bias = _vec(b_ih, 4 * hidden, x.dtype) + _vec(b_hh, 4 * hidden, x.dtype)
    xw, w_hhT = _prepare(x, h0, w_ih, w_hh, bias, 4)
    out = _alloc((batch, n, hidden), x.dtype)
    gates = _alloc((batch, n, 4 * hidden), x.dtype)
    cells = _alloc((batch, n, hidden), x.dtype)
    state = (c, gates, cells)
    starts = _row_schedule(batch, hidden, UNITS, 4)
    if starts is None:
        h_n = _lstm_train_by_units(xw, h0, w_hhT, state, out, UNITS)
    else:
        h_n = _lstm_train_by_rows(xw, h0, w_hhT, state, out, UNITS, starts)
    saved = LSTMSaved(x, h0, c0, *_weights(w_ih, w_hh, x.dtype), out, gates, cells)
    return out, h_n, c, saved


def gru_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh):
    """``gru_layer`` that also keeps its gates and W_hn h + b_hn -> (out, h_n, GRUSaved)."""
    x = _host(x)
    h0 = _host(h0, x.dtype)
    batch, n, _ = x.shape
    hidden = h0.shape[1]
    b_ih = _vec(b_ih, 3 * hidden, x.dtype)
    b_hh = _vec(b_hh, 3 * hidden, x.dtype)
    bias = b_ih.copy()
    bias[:2 * hidden] += b_hh[:2 * hidden]
    xw, w_hhT = _prepare(x, h0, w_ih, w_hh, bias, 3)
    out = _alloc((batch, n, hidden), x.dtype)
    gates = _alloc((batch, n, 3 * hidden), x.dtype)
    hn = _alloc((batch, n, hidden), x.dtype)
    state = (np.ascontiguousarray(b_hh[2 * hidden:]), gates, hn)
    starts = _row_schedule(batch, hidden, UNITS, 3)
    if starts is None:
        h_n = _gru_train_by_units(xw, h0, w_hhT, state, out, UNITS)
    else:
        h_n = _gru_train_by_rows(xw, h0, w_hhT, state, out, UNITS, starts)
    return out, h_n, GRUSaved(x, h0, *_weights(w_ih, w_hh, x.dtype), out, gates, hn)


def _cotangent(name, c, shape, dtype):
    """A cotangent as a contiguous array of ``dtype``; None is zeros; the shape is checked."""
    if c is None:
        return np.zeros(shape, dtype)
    c = np.asarray(c)
    if tuple(c.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(c.shape)}")
    return np.ascontiguousarray(c, dtype)


# Hidden units per block of the reverse sweep's product dgh W_hh (G-deep, its output the
# block's units). By rows: blocks of BPTT_UNITS (512: the forward's 512-column accumulator,
# all of H = 512). By units: one block per thread (``_split_units``), each reading the step's
# dgh once; two 128-unit blocks per thread took 1.16 (0.98-1.40) (LSTM) and 1.27 (1.08-1.57)
# (GRU) times as long (B=8, H=512; the header's sweep table).
BPTT_UNITS = 512


def _split_units(hidden: int) -> int:
    """Units per block of the by-units sweep: H over the threads, rounded up to 16 units."""
    per_thread = -(-hidden // get_num_threads())
    return -(-per_thread // 16) * 16


def _backward(n_gates, kernels, saved_args, x, h0, w_ih, w_hh, out, dout, dh_n, carry, gru):
    """The reverse sweep (``kernels`` = the kind's (by_rows, by_units)), then dx, dW_ih,
    dW_hh, db_ih, db_hh over all steps -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh)."""
    dtype = x.dtype
    batch, n, d_in = x.shape
    hidden = h0.shape[1]
    g = n_gates * hidden
    dout = _cotangent("dout", dout, out.shape, dtype)
    dh_n = _cotangent("dh_n", dh_n, h0.shape, dtype)
    if n == 0:  # nothing to sweep: the final state is the initial one
        return (np.zeros(x.shape, dtype), dh_n, np.zeros((g, d_in), dtype),
                np.zeros((g, hidden), dtype), np.zeros(g, dtype), np.zeros(g, dtype))
    dgi = _alloc((batch, n, g), dtype)
    dgh = _alloc((batch, n, g), dtype) if gru else dgi
    dh0 = _alloc((batch, hidden), dtype)
    by_rows, by_units = kernels
    split = _split_units(hidden)
    starts = _row_schedule(batch, hidden, split, n_gates)
    if starts is None:
        by_units(dgi, dgh, w_hh, saved_args, dout, dh_n, carry, dh0, split)
    else:
        by_rows(dgi, dgh, w_hh, saved_args, dout, dh_n, carry, dh0, BPTT_UNITS, starts)
    m = batch * n
    h_prev = np.concatenate((h0[:, None], out[:, :-1]), axis=1).reshape(m, hidden)  # (B*N, H)
    dx = _alloc((m, d_in), dtype)
    dw_ih = _alloc((g, d_in), dtype)
    dw_hh = _alloc((g, hidden), dtype)
    db_ih = _alloc(g, dtype)
    db_hh = _alloc(g, dtype)
    args = (x.reshape(m, d_in), h_prev, w_ih, dgi.reshape(m, g), dgh.reshape(m, g),
            dx, dw_ih, dw_hh, db_ih, db_hh)
    parts = get_num_threads()
    with single_threaded_blas():
        if parts == 1 or 2 * m * g * (2 * d_in + hidden) < SMALL_FLOPS:
            _weight_grads_serial(*args)
        else:
            _weight_grads_parallel(*args, parts)
    return dx.reshape(x.shape), dh0, dw_ih, dw_hh, db_ih, db_hh


def rnn_layer_backward(saved, dout, dh_n):
    """Backpropagation through time of ``rnn_layer_train`` -> (dx, dh0, dw_ih, dw_hh, db_ih,
    db_hh); None cotangents are zeros."""
    x, h0, w_ih, w_hh, out, relu = saved
    carry = np.zeros(h0.shape, x.dtype)  # never read: the RNN carries nothing but dh
    return _backward(1, (_rnn_bptt_by_rows, _rnn_bptt_by_units), (out, relu), x, h0, w_ih, w_hh,
                     out, dout, dh_n, carry, False)


def lstm_layer_backward(saved, dout, dh_n, dc_n):
    """-> (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh) of ``lstm_layer_train``."""
    x, h0, c0, w_ih, w_hh, out, gates, cells = saved
    dc = _cotangent("dc_n", dc_n, c0.shape, x.dtype).copy()  # dc_n in, dc_0 out
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = _backward(
        4, (_lstm_bptt_by_rows, _lstm_bptt_by_units), (gates, cells, c0), x, h0, w_ih, w_hh,
        out, dout, dh_n, dc, False)
    return dx, dh0, dc, dw_ih, dw_hh, db_ih, db_hh


def gru_layer_backward(saved, dout, dh_n):
    """-> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh) of ``gru_layer_train``."""
    x, h0, w_ih, w_hh, out, gates, hn = saved
    carry = np.zeros(h0.shape, x.dtype)  # dh_{t+1} z_{t+1}: zero after the last step
    return _backward(3, (_gru_bptt_by_rows, _gru_bptt_by_units), (gates, hn, out, h0), x, h0,
                     w_ih, w_hh, out, dout, dh_n, carry, True)
