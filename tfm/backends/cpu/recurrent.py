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

float32 gates use a rational tanh (Eigen's, |error| < 4e-7) with sigmoid(x) = (1 + tanh(x/2))
/ 2; libm's scalar expf/tanhf took ~270 us per step at B=8, H=512. The kernels compile with
``error_model="numpy"``: under Numba's default ("python") every float division checks for a
zero divisor to raise ZeroDivisionError, and that branch kept LLVM from vectorising the
rational tanh (8.4 vs 1.5 ns per element; the LSTM gate update of a B=8, H=512 step 220 vs
~100 us). The only divisions are the tanh's, whose denominator is >= 4.9e-3. float64 uses libm.

Measured on this shared 2-core AVX-512 machine while other jobs loaded it (load 2-8), so
only ratios taken side by side in one process mean anything. float32, I=H=512:

    step product h W_hh^T, (8,512)x(512,2048), one thread, side by side:
      _hidden_block, 4 k x 4 rows, FMA (kept)   300-334 us  (torch.mm / MKL: 185 us)
      4 k x 4 rows, separate mul/add            352-413 us  (twice the FP-port work)
      4 k x 2 rows (previous kernel)            420-463 us
      8 rows x 4 k / 4 rows x 8 k                no better (too noisy to separate; more
                                                 live registers)
      scalar accumulators, 4 columns x 8 rows   2000-3000 us (LLVM's SLP vectoriser left
                                                 them scalar)
      OpenBLAS sgemm, one thread (dropped)       410 us  (no faster than ours; packs W
                                                 every call)
      plain k-b-j loop (dropped)                 770 us  (one store per multiply-add)
      unrolled, bounds `n - n % 4` (a fixed bug) 2000 us (LLVM lost the trip count)
    At B=8 the 4 MB W_hh^T streams from L3 every step: ~185 us at ~22 GB/s is MKL's floor
    as well, so the step product cannot get much below MKL's on one core.
    whole layer vs PyTorch 2.13 (MKL, OpenMP), float32, I=H=512, one process, A B C A B C,
    ms median / min; torch.set_num_threads(2) ("torch2") and (1) ("torch1"); tfm on Numba's
    2 threads (B=8: one row group, i.e. one thread):
      kind  B   n    tfm            torch2          tfm/torch2   torch1
      LSTM  8  128    72.6 /   50.8   533.5 /  24.8  0.14 / 2.04    46.6 /   45.0
      LSTM 64  128   242.3 /  224.1   133.9 / 128.6  1.81 / 1.74   246.7 /  240.9
      LSTM  8  512   236.0 /  232.6  8005   / 7991   0.03 / 0.03   187.6 /  185.1
      LSTM 64  512  1605.9 / 1022.8   616.7 / 584.3  2.60 / 1.75  1009.1 / 1006.0
      GRU   8  128    57.9 /   53.4   638.6 / 159.6  0.09 / 0.33    56.6 /   54.8
      GRU  64  128   162.3 /  156.5   172.7 / 140.9  0.94 / 1.11   253.6 /  247.7
      GRU   8  512   174.6 /  154.0   487.3 / 116.0  0.36 / 1.33   253.6 /  228.5
      GRU  64  512  1540.6 / 1030.4  3229   / 642.1  0.48 / 1.60  1049.0 / 1047.9
      RNN   8  128    28.8 /   12.7  2077   /   9.9  0.01 / 1.28    14.0 /   13.7
      RNN  64  128   110.9 /  108.9  2112   / 2098   0.05 / 0.05    87.8 /   82.4
      RNN   8  512    44.9 /   44.9    41.7 /  40.8  1.08 / 1.10    47.7 /   41.2
      RNN  64  512   406.0 /  280.8   245.2 / 234.9  1.66 / 1.20   385.4 /  381.8
    Against one PyTorch thread this is at parity (B=8) or ahead (B=64, two row groups).
    Two PyTorch threads are 1.1-2x faster at their best (min): MKL's sgemm uses 512-bit
    vectors (LLVM emits 256-bit ones here) and both threads share every step's product.
    Their medians are often 2-300x their minima: a barrier per step waits for a parked
    thread under load, and this process holds two OpenMP pools (Numba's "omp" layer and
    PyTorch's) on 2 cores (nn.RNN, B=64, n=128: 2.1 s in all 7 runs with 2 threads, 82 ms
    with 1). Target "at least as fast as nn.LSTM / nn.GRU with 2 threads": not met at
    their best; met on medians only because of that fragility.
    threading, LSTM, wall clock (loaded machine), us per step:
      row groups (kept), B=8, 2 threads: 935 ms at n=128 vs 2194 ms for a prange over
      unit blocks inside every step (a barrier per step; later 7800 vs 650 us per step
      with the fast step product; again with the current kernels at load ~5: 12100-15800
      vs 1190-1260 us per step, two threads each taking half of the hidden units). A
      per-step barrier waits for whichever thread the OS has parked; PyTorch (OpenMP, also
      a barrier per step) suffers the same way under load: there nn.LSTM ran 2-16x slower.
      One group vs two: 540 vs 650 (B=8), 1000 vs 1125 (B=16), 1870 vs 1940 (B=32): with
      other jobs on the second core it never paid here, hence MIN_GROUP_ROWS = 8 (B=8 runs
      on one thread); on an idle machine groups of >= 8 rows should scale.

Later, on a quiet 2-core AMD EPYC VM (AVX2), side by side in one process, median / min ms,
I=H=512, float32, one layer:
    by units (B=8, 2 threads x 2 of the 4 unit blocks per step) against one row group (one
    thread), n=512:  LSTM 173.9 / 165.6 vs 250.6 / 214.4;  GRU 135.4 / 116.6 vs 178.6 /
    173.5;  RNN 53.3 / 50.0 vs 53.2 / 51.5 (its step is too small to gain). Predicted: the
    step product halves (each thread streams 2 of the 4 MB of W_hh^T; the product alone:
    (8,512)x(512,2048) 346 us, (8,512)x(512,1024) 129 us, one thread), less a barrier per
    step. pytest-benchmark against nn.LSTM (2 threads), medians: n=128 58 vs 88 ms, 512 217
    vs 316, 1024 458 vs 579.
    by rows still wins from B=16 (two groups of 8; n=256): LSTM 164 / 152 vs 270 / 204 by
    units, GRU 139 / 124 vs 180 / 152, RNN 40 / 36 vs 79 / 76; likewise at B=32 and 64.
    A barrier per step is fragile on a loaded machine (above: 10x slower at load ~5), so
    the units schedule is used only where rows would leave a thread idle, and only for
    steps of >= MIN_SPLIT_STEP_FLOPS: at B=1 the studies measured it 1.5-4.7x slower on
    small steps (LSTM H=256, RNN H=512 and 1024) before that threshold (its barrier costs
    ~90 us a step; numbers at the constant).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange, types
from numba.extending import overload

from .fastmath import sigmoid, tanh
from .linear import linear

# Hidden units per block: 4*128 LSTM gate columns = a 2 KB segment of each W_hh^T row, and
# a (rows, 512) float32 accumulator that stays in L1. Measured at B=8, H=512, one thread:
# 753 / 632 / 561 / 500 / 541 us per LSTM step for 16 / 32 / 64 / 128 / 512 units.
UNITS = 128
# The RNN's one gate: 512-unit blocks give it the LSTM's 512-column block width. B=8 / 64,
# H=512, us per step (median, side by side): 185 / 1095 vs 219 / 1260 with 128 units.
RNN_UNITS = 4 * UNITS

# Fewest batch rows per thread. At B=8 (LSTM, H=512) two groups of 4 rows took 650 us per
# step against 540 us for one group of 8 (each group streams the 4 MB W_hh^T every step).
MIN_GROUP_ROWS = 8

# Fewest FLOPs of a step's product h W_hh^T for the units schedule. Its barrier per step
# costs ~90 us here (OMP_WAIT_POLICY=PASSIVE, which tfm sets: the threads sleep between
# parallel regions). n=512, side by side, ms median, rows vs units: LSTM B=1 H=256 (0.5
# MFLOP a step) 18 vs 65, GRU B=1 H=512 (3.1) 61 vs 151, RNN B=1 H=1024 (2.1) 74 vs 168,
# RNN B=8 H=512 (4.2) 62 vs 93, LSTM B=4 H=512 (8.4) 143 vs 145, LSTM B=1 H=1024 (8.4)
# 575 vs 417, GRU B=2 H=1024 (12.6) 451 vs 417, LSTM B=8 H=512 (16.8) 251 vs 174.
MIN_SPLIT_STEP_FLOPS = 8_000_000

_NONLINEARITIES = {"tanh": 0, "relu": 1}


# ------------------------------------------------------------------------------ kernels
# fastmath={"contract"} here only: fuses each multiply-add into one FMA (one rounding instead
# of two, so never less accurate; no reassociation, no finite-math assumptions). Step product
# at B=8, H=512, one thread, side by side: 300-334 us vs 352-413 us without.
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
    # Loop bounds written as `n - 3`: with `n - n % 4` LLVM loses the trip count and the
    # inner loop ran 4.7x slower (2.0 ms vs 0.42 ms at (8,512)x(512,2048)).
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

    The 4 MB LSTM W_hh (H=512), side by side: NumPy's ``ascontiguousarray(w[perm].T)``
    13-25 ms (a strided gather per element; 15% of an n=128, B=8 layer), 32 x 32 tiles with
    strided stores 8-12 ms, these tiles (contiguous stores) 2.1 ms.
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
