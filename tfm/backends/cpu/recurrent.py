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
(libm's tanhf takes 46x as long: ``fastmath``'s header). The kernels compile with
``error_model="numpy"``, as the rational tanh does. float64 uses libm.

Verdicts, from ``python -m dev.cpu.run_all`` (dev/cpu/recurrent.py; the run:
dev/cpu/results/recurrent.csv and machine.json: a 2-core AMD EPYC VM, Zen 4 with AVX-512,
shared with other jobs, 1-minute load 6 at the start and up to 17 during the run). float32;
each figure a paired ratio: time / the baseline's time in the same interleaved round, median
over rounds with a bootstrap 95% interval.

    step product h W_hh^T, (8,512)x(512,2048), one thread, unit block by unit block,
    64-byte-aligned operands; time / ``_hidden_block``'s (217 us a step, 77 GFLOP/s):
      v1 plain k-b-j loop (a load and a store of acc per multiply-add)  2.03 (2.00-2.05)
      v2 OpenBLAS sgemm, one thread (packs W every call)                2.40 (2.39-2.42)
      v3 4 k x 2 rows                                                   1.22 (1.21-1.22)
      v4 4 k x 4 rows without FMA contraction                           1.02 (1.02-1.03)
      v5 4 k x 4 rows with FMAs: ``_hidden_block`` (kept)
      torch.mm, one thread                                              2.04 (2.01-2.08)
      v5 with W_hh^T and acc 16 bytes past a cache line                 2.12 (2.10-2.13)
    (the kernels allocate W_hh^T, acc and h_buf in Numba, which aligns them to 64 bytes: a
    check in dev/cpu/recurrent.py).

    schedules, n=128; time by units / time by rows (one row group), step MFLOP in brackets:
      LSTM B=1 H=256 (0.5) 1.75 (1.74-1.76)     RNN B=1 H=1024 (2.1) 1.43 (1.42-1.43)
      GRU B=1 H=512 (3.1) 2.07 (2.03-2.10)      RNN B=8 H=512 (4.2) 1.25 (1.25-1.29)
      LSTM B=4 H=512 (8.4) 0.65 (0.65-0.65)     LSTM B=1 H=1024 (8.4) 1.06 (0.97-1.10)
      GRU B=2 H=1024 (12.6) 1.38 (0.88-1.72)    GRU B=8 H=512 (12.6) 0.99 (0.96-1.03)
      LSTM B=8 H=512 (16.8) 1.26 (1.24-1.28)
    B=16 (two row groups), by units / by rows: LSTM 0.99 (0.89-1.54), GRU 0.74 (0.58-0.90),
    RNN 0.93 (0.89-0.99). LSTM B=8 H=512, two row groups of 4 / one of 8: 1.59 (1.28-1.66).
    In this run, below MIN_SPLIT_STEP_FLOPS the units schedule lost everywhere but at LSTM
    B=4 (0.65); above it, where the library takes it (B=8), it lost for the LSTM and tied for
    the GRU. Its barrier per step waits for whichever thread the OS has parked, so it fares
    worst on a loaded machine like this run's. MIN_GROUP_ROWS and MIN_SPLIT_STEP_FLOPS were
    set from measurements on a quieter machine that this loaded run neither confirms nor
    clearly refutes: rerun the lab on a quiet machine before moving them.

    units per block, LSTM B=8 H=512, one thread, time / UNITS=128's: 16 units 2.15
    (1.92-2.30), 32 1.48 (1.37-1.62), 64 1.14 (0.96-1.28), 512 2.63 (2.32-2.82). The RNN
    with 128-unit blocks / with RNN_UNITS=512: B=8 1.58 (1.53-1.62), B=64 0.98 (0.56-1.70).

    W_hh -> W_hh^T in unit-block order (``_permuted_transpose``, 16 x 16 tiles, once per
    call): NumPy's ``ascontiguousarray(w[perm].T)`` takes 1.58 (1.55-1.65) times as long.

Both schedules of each kind come from one factory (``_schedules``) over its block; the
factory's kernels replaced six written-out ones with bitwise-identical outputs and no
measurable change in time (``python -m dev.cpu.ab --rev 1d4e43a --only recurrent``).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange, types
from numba.extending import overload

from .fastmath import sigmoid, tanh
from .linear import linear

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


def _schedules(name: str, n_gates: int):
    """The two schedule kernels of one cell kind, (by_rows, by_units), over its block.

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
            acc = np.empty((r1 - r0, n_gates * units), dtype=xw.dtype)
            h_buf = np.empty((2, r1 - r0, hidden), dtype=xw.dtype)
            h_buf[0] = h0[r0:r1]
            for t in range(n):
                for blk in range(n_blocks):
                    u0 = blk * units
                    _cell_block(n_gates, h_buf[t % 2], w_hhT, acc, xw, state, h_buf[(t + 1) % 2],
                                out, r0, t, u0, min(units, hidden - u0))
            h_n[r0:r1] = h_buf[n % 2]
        return h_n

    def by_units(xw, h0, w_hhT, state, out, units):
        batch, n, gates = xw.shape
        hidden = gates // n_gates
        n_blocks = (hidden + units - 1) // units
        acc = np.empty((n_blocks, batch, n_gates * units), dtype=xw.dtype)
        h_buf = np.empty((2, batch, hidden), dtype=xw.dtype)
        h_buf[0] = h0
        for t in range(n):
            for blk in prange(n_blocks):
                u0 = blk * units
                _cell_block(n_gates, h_buf[t % 2], w_hhT, acc[blk], xw, state,
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
    element, takes 1.58x as long (header).
    """
    g, hidden = w.shape
    out = np.empty((hidden, g), dtype=w.dtype)
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
