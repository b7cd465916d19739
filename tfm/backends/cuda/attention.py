"""Scaled dot-product attention on the GPU, head split/merge, and in-place KV-cache writes.

Layout: ``split_heads`` returns a strided (B, H, N, Dh) view of the (B, N, C) projection (no
copy, no launch) and the kernels write their output head-merged, as a (B, H, N, Dv) view of
a (B, N, H*Dv) array, so ``merge_heads`` returns it for free: a base forward pass lost the 72
split/merge launches and allocations of the first GPU run (dev/cuda/profile_forward.txt).

Variants (``VARIANTS``; versions in ``ATTN_VERSIONS``, chosen by ``Tuning.attn_version``; the
tilings each version is timed at in ``TILINGS``). Every verdict comes from
``python3 -m dev.cuda.lab --out DIR --family attention`` (B=4, H=16, d=64, n = 1024, 4096,
16384, against SDPA's math and memory-efficient backends), and the static figures from
``python3 -m dev.cuda.lab --out DIR --family ptx`` (no GPU needed; committed output in
dev/cuda/host/). GPU figures: NVIDIA H200, dev/cuda/gpu/attention.csv (lab at --budget-s 90;
"Nx SDPA's speed" = SDPA's time / tfm's time), and the peers study of ``python3 -m
studies.gpu`` (results/gpu/studies.csv, study=peers; "time ratio" = tfm time / peer time,
with its bootstrap 95% interval).

* ``naive`` — the O(n^2)-memory reference point: the batched GEMM (``linear.gemm``) writes
  the scaled (B*H, Nq, Nk) scores, the row softmax (``norm.softmax_kernel``) applies
  mask/causal in place, a second GEMM multiplies by V; one score array, so its memory guard
  counts one. Verdict: v1 GEMMs, 56 ms at n = 4096 on the first GPU run (commit 1f1f9ac,
  results/gpu/attention.csv); with the v2 GEMM not timed on the H200 run (lab budget).
* ``fused_v1`` — FlashAttention-2 style, one kernel, scores never leave the chip. One block
  per (query tile of BQ rows, b*h), TY x TX threads; Q (pre-scaled by 1/sqrt(d_k)) and each
  K tile staged d-major in shared memory, V row-major; per K tile: (1) a (BQ/TY) x (BK/TX)
  register tile of scores, rows and columns interleaved (``ty + i*TY``, ``tx + j*TX``);
  (2) row maxima combined across the TX threads of a row through shared memory (no warp
  shuffles: the simulator has none); (3) online softmax in registers (partial row sums
  combined once, at the end), probabilities to a shared P tile; (4) O += P V into a
  (BQ/TY) x ceil(Dv/TX) register tile. Scalar shared loads: 8 per 16 FMAs for the scores,
  12 per 32 for P V. Verdict (H200, at (64, 32, 16, 8)): 29.9 ms at n = 4096 non-causal,
  13.7% of the FP32 peak, 0.52x SDPA math's speed; 443.8 ms at n = 16384, 0.27x SDPA
  mem-efficient's speed; (64, 32, 8, 8) slower (45.7 ms at n = 4096), (32, 32, 8, 8) not timed
  on the H200 run (lab budget). 110 registers at 128 threads, 43.8 KB shared memory, no
  spills (ptx family).
* ``fused_v2`` (default) — v1's algorithm with the instruction overhead cut: 4-wide register
  blocks (rows ``4*ty + r + g*4*TY``, keys ``4*tx + c + g*4*TX``) read from 16-byte aligned
  shared rows in 16-byte loads (2 per 16 FMAs for the scores, 3 per 32 for P V); scores in
  log2 units so each probability is one ``exp2``; the d loop of the scores unrolled by 4;
  the next K/V tile loaded into registers while the current one is multiplied; clamped,
  unconditional, unsigned-index loads. 230 registers at 128 threads, 46.1 KB shared memory,
  no spills; its hottest basic block issues 64 FMAs in 101 PTX instructions (ptx family;
  v1's scores loop: 16 FMAs in 82); where its tiles
  cannot fit 48 KB (d = 128 in float32, float64) ``fused_plan`` runs v1. Verdict (H200, at
  (64, 32, 16, 8)): 1.20 / 13.78 ms at n = 1024 / 4096 non-causal, 1.10 / 8.19 ms causal:
  1.7-2.2x v1's speed, 1.04x / 1.14x SDPA math's speed non-causal and 1.55x / 2.45x causal
  (29.8% of the FP32 peak at n = 4096); n = 16384: 200.8 ms, 0.61x SDPA mem-efficient's speed
  (122.0 ms). (64, 16, 16, 4): faster non-causal (1.05 / 13.18 ms), slower causal (1.25 /
  8.44 ms). The peers study: time ratio to SDPA math 1.10 [1.08, 1.12] at n = 1024
  non-causal, 0.41-0.89 in the other three cases; to SDPA mem-efficient 1.64-2.07 for
  n = 1024..16384 (n = 16384: one round, no interval). Goal (>= 1.0x SDPA math) met except
  at n = 1024 non-causal in the peers study; the memory-efficient backend stays ahead.

Common to both: extra device memory is the output only (O(n*d)), so n = 16384 and beyond
run. Masking: an optional broadcast boolean mask read through per-axis 0/1 index factors
and a key band [i - wl, i + wr] (causal: wl unbounded, wr = 0), one device function
(``norm.visibility``); key tiles outside the band of a whole query tile are skipped (causal:
half the work), query tiles run heaviest-first. Rows with no visible key give zeros.
``attention_train`` is the same launch writing each query's log-sum-exp too (one store per
row; -inf where a row sees no key), all the backward needs besides q, k, v and the output.

Backward variants (``BWD_VARIANTS``; the fused one's dQ summation in ``BWD_DQ``, chosen by
``Tuning.attn_bwd_dq``, its tilings (BQ, BKV, TY, TX) in ``BWD_TILINGS``). Verdicts from
``python3 -m dev.cuda.lab --out DIR --family backward`` (B=4, H=16, d=64, n = 1024, 4096,
against SDPA's math and memory-efficient backward; on the H200, dev/cuda/gpu/backward.csv,
only n = 1024 at (32, 32, 8, 16) and SDPA math were timed before the lab budget ran out),
the peers study (as above) and ``--family ptx`` (no GPU needed):

* ``naive_backward`` — S = Q K^T / sqrt(d_k) and dP = dO V^T as two (B*H, Nq, Nk) arrays
  (batched Numba GEMMs), one elementwise kernel turning them into P = exp(S - lse) and dS =
  P (dP - D), then dV = P^T dO, dQ = dS K, dK = dS^T Q (the GEMM with A transposed).
  Refuses with InsufficientMemoryError what would not fit. Verdict: correct on the H200 up to
  n = 4096 (``python3 -m studies.gpu``; results/gpu/correctness.csv); not timed on the H200
  run (lab budget).
* ``fused_atomic`` (default) — FlashAttention-2's backward (Dao 2023, Algorithm 2) in one
  key-block kernel (``bwd_kv_kernel``): a block keeps its BKV keys' dK and dV in registers
  while it walks the query tiles that can see them, recomputing S and P from q, k and lse,
  and adds each tile's dQ = dS K into dq with float32 atomics (the order of those additions,
  so dQ's last bits, vary by run). D = rowsum(dO * O) is computed once per row by a small
  kernel that also zeroes dq. Never materialises (Nq, Nk): extra memory O(Nq) for D.
  At the default (32, 32, 8, 16): 127 registers at 128 threads, 44.3 KB shared memory, no
  spills (ptxas, sm_90): 4 blocks per SM. Loading the next Q/dO tile into registers during
  the current one (as the forward v2 does) took it to 254 registers (2 blocks per SM): the
  loads go straight to shared memory and other blocks hide their latency. Verdict (H200,
  n = 1024): 3.79 ms non-causal, 2.47 ms causal: 0.52x / 0.69x SDPA math backward's speed,
  1.49x / 1.41x fused_pass's. The peers study: time ratio to SDPA math backward 2.40
  [2.37, 2.43] / 2.16 [2.15, 2.17] at n = 1024 / 4096 non-causal, 1.69 / 1.16 causal; to SDPA
  mem-efficient backward 1.95-2.40 for n = 1024..16384 (n = 16384: one round). Goal
  (>= 1.0x SDPA's math-backend backward in float32) not met.
* ``fused_pass`` — the same key-block kernel without dQ, then a query-block kernel
  (``bwd_dq_kernel``) that recomputes S and dP for its BQ queries and sums dQ = dS K over
  the key tiles in registers: 7 matrix products per tile instead of 5, no atomics,
  deterministic. 96-128 registers at 128 threads, no spills. Verdict (H200, n = 1024):
  5.63 ms non-causal (IQR 9.93 ms), 3.49 ms causal, 0.35x / 0.49x SDPA math backward's speed;
  a base training step (B=8, n=128) with it took 181.0 ms against fused_atomic's 138.9 ms
  (IQR 188.5 ms). Kept as the deterministic option.

Both fused backwards take the same masks and bands as the forward (causal: a key block
visits only the queries from its first key on; restricted attention: only its window).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda, uint64

from ._launch import SHARED_BYTES_LIMIT, cdiv, grid_1d, launch, numba_dtype
from ._views import c_strides, c_view, strided_view
from .linear import contiguous, gemm
from .norm import UNBOUNDED, no_mask, run_softmax, visibility

ATTN_VERSIONS = {1: "v1: interleaved register tiles, scalar shared loads, exp, K/V loaded after a barrier",
                 2: "v2: 4-wide register blocks with 16-byte shared loads, exp2 in log2 units, next "
                    "K/V tile prefetched into registers, clamped unsigned loads"}

VARIANTS = {
    "naive": "GEMM -> (B*H, Nq, Nk) scores in global memory -> masked row softmax -> GEMM",
    "fused_v1": "FlashAttention-2 tiles, online softmax in registers; " + ATTN_VERSIONS[1],
    "fused_v2": "FlashAttention-2 tiles, online softmax in registers; " + ATTN_VERSIONS[2],
}

BWD_VARIANTS = {
    "naive_backward": "S and dP as (B*H, Nq, Nk) arrays, an elementwise dS kernel, five batched GEMMs",
    "fused_atomic": "key-block kernel: dK, dV in registers, P recomputed from lse, dQ by float32 atomics",
    "fused_pass": "key-block kernel for dK, dV, then a query-block kernel for dQ (no atomics)",
}

# Tilings (BQ, BK, TY, TX) per version that the lab times, the default first (dev/cuda/lab.py,
# family "attention"); tests/test_cuda_ptx.py compiles each for sm_90. v2 prefetches a K/V
# tile into registers, (BK * d) / threads of each: with 64 threads and BK = 32 that spills.
TILINGS = {1: ((64, 32, 16, 8), (64, 32, 8, 8), (32, 32, 8, 8)),
           2: ((64, 32, 16, 8), (64, 16, 16, 4))}


def fused_shared_bytes(dk, dv, bq, bk, tx, itemsize, version: int = 1) -> int:
    """Static shared memory of the fused kernel of ``version`` for these tiles."""
    if version == 2:
        dvp = cdiv(dv, 4 * tx) * 4 * tx
        return itemsize * (dk * (bq + 4) + dk * (bk + 4) + bk * (dvp + 4) + bk * (bq + 4) + bq * tx)
    return itemsize * (dk * (bq + 1) + dk * (bk + 1) + bk * dv + bq * (bk + 1) + bq * tx)


def fused_tiles(tuning, dk: int, dv: int, itemsize: int, version: int = 1) -> tuple:
    """``tuning.attn`` shrunk (BK first, then BQ) until the tiles of ``version`` fit in 48 KB
    of shared memory (v2 keeps BQ and BK multiples of 4*TY and 4*TX, for its 4-wide register
    blocks); ValueError if they cannot."""
    bq, bk, ty, tx = tuning.attn
    unit = 4 if version == 2 else 1
    while fused_shared_bytes(dk, dv, bq, bk, tx, itemsize, version) > SHARED_BYTES_LIMIT:
        if bk >= 2 * unit * tx and (bk // 2) % (unit * tx) == 0:
            bk //= 2
        elif bq >= 2 * unit * ty and (bq // 2) % (unit * ty) == 0:
            bq //= 2
        else:
            raise ValueError(
                f"head dims d_k={dk}, d_v={dv} are too large for the fused CUDA kernel's shared "
                f"memory with tuning.attn={tuning.attn} ({itemsize}-byte floats); use impl='naive' "
                f"or a Tuning with a smaller thread grid (TY, TX) in attn"
            )
    return bq, bk, ty, tx


@lru_cache(maxsize=1024)
def fused_plan(tuning, dk: int, dv: int, itemsize: int) -> tuple:
    """(version, tiles): ``tuning.attn_version`` where its tiles fit, else v1, whose tiles
    shrink further (v2's 4-wide blocks fit d = 64 in float32 at the default 16 x 8 threads;
    larger heads and float64 run v1)."""
    try:
        return tuning.attn_version, fused_tiles(tuning, dk, dv, itemsize, tuning.attn_version)
    except ValueError:
        if tuning.attn_version == 1:
            raise
    return 1, fused_tiles(tuning, dk, dv, itemsize, 1)


@lru_cache(maxsize=None)
def fused_kernel(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked: bool, band: bool, version: int = 1,
                 save_lse: bool = False):
    """The fused kernel of ``version`` (``ATTN_VERSIONS``) for these compile-time constants;
    ``save_lse``: also write each query's log-sum-exp (``attention_train``)."""
    if version == 2:  # Tuning checks BQ % (4*TY) == 0 and BK % (4*TX) == 0
        return _fused_v2(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked, band, save_lse)
    return _fused_v1(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked, band, save_lse)


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@lru_cache(maxsize=None)
def _fused_v2(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked: bool, band: bool, save_lse: bool = False):
    """v2 of :func:`_fused_v1`: same operands, launch and results.

    * Register blocks of 4: a thread's query rows are ``4*ty + r + g*4*TY`` and its keys
      ``4*tx + c + g*4*TX``; Q and K are staged d-major, P key-major and V key-major in
      16-byte aligned shared rows (padded by 4), so every operand of the two inner products
      arrives in 16-byte shared loads: 2 per 16 FMAs for the scores (v1: 8), 3 per 32 for
      P V (v1: 12).
    * Scores are kept in log2 units (Q pre-scaled by log2(e)/sqrt(d_k) as it is staged), so
      each probability costs one ``exp2`` (a single MUFU.EX2) instead of libdevice's ``exp``.
    * The next K/V tile is loaded from global memory into registers while the current one is
      multiplied; loads are unconditional at clamped indices (keys past the end repeat key
      Nk - 1 and are then masked to probability 0; queries past the end repeat row Nq - 1
      and are never stored); shared indices are unsigned (no wraparound selects).
    """
    dt = numba_dtype(dtype)
    visible = visibility(masked, band)
    tm = bq // ty_n  # query rows per thread (tm/4 blocks of 4)
    sc = bkt // tx_n  # keys per thread per tile (sc/4 blocks of 4)
    dvg = cdiv(dv, 4 * tx_n)  # output column blocks of 4 per thread
    oc = 4 * dvg
    dvp = dvg * 4 * tx_n  # V tile width padded to whole blocks
    nt = ty_n * tx_n
    ldq, ldk, ldv, ldp = bq + 4, bkt + 4, dvp + 4, bq + 4
    q_size, k_size, v_size, p_size, red_size = dk * ldq, dk * ldk, bkt * ldv, bkt * ldp, bq * tx_n
    q_loads, k_loads, v_loads = cdiv(bq * dk, nt), cdiv(bkt * dk, nt), cdiv(bkt * dv, nt)
    s_shape, acc_shape = (tm, sc), (tm, oc)
    log2e = dt(LOG2E)
    ln2 = dt(LN2)
    unroll_d = 4 if dk % 4 == 0 else 1  # head dims of the tests (5, 6, ...) keep a plain loop

    @cuda.jit(cache=True)
    def fused(q, k, v, out, lse, mask, fb, fh, fi, fj, scale, wl, wr):
        q_s = cuda.shared.array(q_size, dt, alignment=16)
        k_s = cuda.shared.array(k_size, dt, alignment=16)
        v_s = cuda.shared.array(v_size, dt, alignment=16)
        p_s = cuda.shared.array(p_size, dt, alignment=16)
        red = cuda.shared.array(red_size, dt, alignment=16)
        s_r = cuda.local.array(s_shape, dt)
        acc = cuda.local.array(acc_shape, dt)
        m_r = cuda.local.array(tm, dt)
        l_r = cuda.local.array(tm, dt)
        a_r = cuda.local.array(tm, dt)
        b_r = cuda.local.array(oc, dt)
        c_r = cuda.local.array(sc, dt)
        pk = cuda.local.array(k_loads, dt)
        pv = cuda.local.array(v_loads, dt)
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        nq = q.shape[2]
        nk = k.shape[2]
        q0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * bq  # heaviest causal tiles first
        b = uint64(cuda.blockIdx.y // q.shape[1])
        h = uint64(cuda.blockIdx.y % q.shape[1])
        ninf = dt(-math.inf)
        zero = dt(0.0)
        qscale = scale * log2e

        for load in range(q_loads):
            idx = tid + load * nt
            if idx < bq * dk:
                r = idx // dk
                c = idx - r * dk
                q_s[uint64(c * ldq + r)] = q[b, h, uint64(min(q0 + r, nq - 1)), uint64(c)] * qscale
        for i in range(tm):
            m_r[i] = ninf
            l_r[i] = zero
            for e in range(oc):
                acc[i, e] = zero

        k_lo = 0
        k_hi = nk
        if band:  # keys outside [q0 - wl, q0 + bq - 1 + wr] are invisible to the whole tile
            k_lo = max(0, q0 - wl)
            k_hi = min(nk, q0 + bq + wr)

        if k_lo < k_hi:  # the first K/V tile into registers
            for load in range(k_loads):
                idx = tid + load * nt
                r = idx // dk
                pk[load] = k[b, h, uint64(min(k_lo + r, nk - 1)), uint64(idx - r * dk)]
            for load in range(v_loads):
                idx = tid + load * nt
                r = idx // dv
                pv[load] = v[b, h, uint64(min(k_lo + r, nk - 1)), uint64(idx - r * dv)]

        for k0 in range(k_lo, k_hi, bkt):
            cuda.syncthreads()  # the previous tile's readers are done (and Q is staged)
            for load in range(k_loads):
                idx = tid + load * nt
                if idx < bkt * dk:
                    r = idx // dk
                    k_s[uint64((idx - r * dk) * ldk + r)] = pk[load]
            for load in range(v_loads):
                idx = tid + load * nt
                if idx < bkt * dv:
                    r = idx // dv
                    v_s[uint64(r * ldv + idx - r * dv)] = pv[load]
            cuda.syncthreads()
            k1 = k0 + bkt
            if k1 < k_hi:  # the next tile's loads fly while this one is multiplied
                for load in range(k_loads):
                    idx = tid + load * nt
                    r = idx // dk
                    pk[load] = k[b, h, uint64(min(k1 + r, nk - 1)), uint64(idx - r * dk)]
                for load in range(v_loads):
                    idx = tid + load * nt
                    r = idx // dv
                    pv[load] = v[b, h, uint64(min(k1 + r, nk - 1)), uint64(idx - r * dv)]

            # (1) scores (log2 units) of this thread's rows x keys
            for i in range(tm):
                for j in range(sc):
                    s_r[i, j] = zero
            qb = uint64(4 * ty)
            kb = uint64(4 * tx)
            for d0 in range(0, dk, unroll_d):  # unrolled by hand: the loop control is paid once per 4 d
                for dd in range(unroll_d):
                    qo = qb + uint64((d0 + dd) * ldq)
                    ko = kb + uint64((d0 + dd) * ldk)
                    for g in range(tm // 4):
                        for r in range(4):
                            a_r[4 * g + r] = q_s[qo + uint64(4 * ty_n * g + r)]
                    for g in range(sc // 4):
                        for c in range(4):
                            c_r[4 * g + c] = k_s[ko + uint64(4 * tx_n * g + c)]
                    for i in range(tm):
                        for j in range(sc):
                            s_r[i, j] += a_r[i] * c_r[j]
            # (2) visibility and this thread's share of the row maxima
            for i in range(tm):
                rl = 4 * ty + (i // 4) * 4 * ty_n + i % 4
                row = min(q0 + rl, nq - 1)  # rows past the end are computed, never stored
                mx = ninf
                for j in range(sc):
                    col = k0 + 4 * tx + (j // 4) * 4 * tx_n + j % 4
                    if col < k_hi and visible(mask, b, h, row, col, fb, fh, fi, fj, wl, wr):
                        if s_r[i, j] > mx:
                            mx = s_r[i, j]
                    else:
                        s_r[i, j] = ninf
                red[uint64(rl * tx_n + tx)] = mx
            cuda.syncthreads()
            # (3) online softmax: new running max, rescale, probabilities (key-major) to shared
            for i in range(tm):
                rl = 4 * ty + (i // 4) * 4 * ty_n + i % 4
                mx = m_r[i]
                for t in range(tx_n):
                    mx = max(mx, red[uint64(rl * tx_n + t)])
                if mx > ninf:
                    alpha = math.exp2(m_r[i] - mx)  # exp2(-inf) = 0 on the first visible tile
                    m_r[i] = mx
                    l_r[i] *= alpha
                    for e in range(oc):
                        acc[i, e] *= alpha
                psum = zero
                for j in range(sc):
                    p = zero
                    if s_r[i, j] > ninf:
                        p = math.exp2(s_r[i, j] - mx)
                    p_s[uint64((4 * tx + (j // 4) * 4 * tx_n + j % 4) * ldp + rl)] = p
                    psum += p
                l_r[i] += psum
            cuda.syncthreads()
            # (4) O += P V
            vb = uint64(4 * tx)
            for j in range(bkt):  # (unrolling by hand here did not change the PTX)
                po = qb + uint64(j * ldp)
                vo = vb + uint64(j * ldv)
                for g in range(tm // 4):
                    for r in range(4):
                        a_r[4 * g + r] = p_s[po + uint64(4 * ty_n * g + r)]
                for g in range(dvg):
                    for c in range(4):
                        b_r[4 * g + c] = v_s[vo + uint64(4 * tx_n * g + c)]
                for i in range(tm):
                    for e in range(oc):
                        acc[i, e] += a_r[i] * b_r[e]

        # combine the partial row sums of the TX threads sharing each row, normalise, store
        cuda.syncthreads()
        for i in range(tm):
            red[uint64((4 * ty + (i // 4) * 4 * ty_n + i % 4) * tx_n + tx)] = l_r[i]
        cuda.syncthreads()
        for i in range(tm):
            rl = 4 * ty + (i // 4) * 4 * ty_n + i % 4
            row = q0 + rl
            if row < nq:
                total = zero
                for t in range(tx_n):
                    total += red[uint64(rl * tx_n + t)]
                inv = dt(1.0) / total if total > zero else zero
                if save_lse and tx == 0:  # m is in log2 units of the scaled scores
                    lse[b, h, uint64(row)] = (m_r[i] + math.log2(total)) * ln2 if total > zero else ninf
                for e in range(oc):
                    col = 4 * tx + (e // 4) * 4 * tx_n + e % 4
                    if col < dv:
                        out[b, h, uint64(row), uint64(col)] = acc[i, e] * inv

    return fused


@lru_cache(maxsize=None)
def _fused_v1(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked: bool, band: bool, save_lse: bool = False):
    """Fused attention for q (B, H, Nq, dk), k (B, H, Nk, dk), v (B, H, Nk, dv) -> out (B, H, Nq, dv)
    (and with ``save_lse`` lse (B, H, Nq), -inf for a query that sees no key).

    Operands may be strided views (e.g. a prefix of a KV cache). Launch: grid
    (cdiv(Nq, bq), B*H), block ty_n * tx_n threads.
    """
    dt = numba_dtype(dtype)
    visible = visibility(masked, band)
    tm = bq // ty_n  # query rows per thread
    sc = bkt // tx_n  # score columns per thread per key tile
    oc = cdiv(dv, tx_n)  # output columns per thread
    nt = ty_n * tx_n
    q_loads, k_loads, v_loads = cdiv(bq * dk, nt), cdiv(bkt * dk, nt), cdiv(bkt * dv, nt)
    # shared/local shapes must be compile-time constants: computed here, not in the kernel
    q_shape, k_shape, v_shape, p_shape = (dk, bq + 1), (dk, bkt + 1), (bkt, dv), (bq, bkt + 1)
    red_shape, s_shape, acc_shape = (bq, tx_n), (tm, sc), (tm, oc)

    @cuda.jit(cache=True)
    def fused(q, k, v, out, lse, mask, fb, fh, fi, fj, scale, wl, wr):
        q_s = cuda.shared.array(q_shape, dt)
        k_s = cuda.shared.array(k_shape, dt)
        v_s = cuda.shared.array(v_shape, dt)
        p_s = cuda.shared.array(p_shape, dt)
        red = cuda.shared.array(red_shape, dt)
        s_r = cuda.local.array(s_shape, dt)
        acc = cuda.local.array(acc_shape, dt)
        m_r = cuda.local.array(tm, dt)
        l_r = cuda.local.array(tm, dt)
        a_r = cuda.local.array(tm, dt)
        b_r = cuda.local.array(oc, dt)
        c_r = cuda.local.array(sc, dt)
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        nq = q.shape[2]
        nk = k.shape[2]
        q0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * bq  # heaviest causal tiles first
        b = cuda.blockIdx.y // q.shape[1]
        h = cuda.blockIdx.y % q.shape[1]
        ninf = dt(-math.inf)
        zero = dt(0.0)

        for load in range(q_loads):
            idx = tid + load * nt
            if idx < bq * dk:
                r = idx // dk
                c = idx % dk
                val = zero
                if q0 + r < nq:
                    val = q[b, h, q0 + r, c] * scale
                q_s[c, r] = val
        for i in range(tm):
            m_r[i] = ninf
            l_r[i] = zero
            for e in range(oc):
                acc[i, e] = zero

        k_lo = 0
        k_hi = nk
        if band:  # keys outside [q0 - wl, q0 + bq - 1 + wr] are invisible to the whole tile
            k_lo = max(0, q0 - wl)
            k_hi = min(nk, q0 + bq + wr)

        for k0 in range(k_lo, k_hi, bkt):
            cuda.syncthreads()  # the previous tile's readers are done (and Q is staged)
            for load in range(k_loads):
                idx = tid + load * nt
                if idx < bkt * dk:
                    r = idx // dk
                    c = idx % dk
                    val = zero
                    if k0 + r < nk:
                        val = k[b, h, k0 + r, c]
                    k_s[c, r] = val
            for load in range(v_loads):
                idx = tid + load * nt
                if idx < bkt * dv:
                    r = idx // dv
                    c = idx % dv
                    val = zero
                    if k0 + r < nk:
                        val = v[b, h, k0 + r, c]
                    v_s[r, c] = val
            cuda.syncthreads()

            # (1) scores of this thread's rows x columns
            for i in range(tm):
                for j in range(sc):
                    s_r[i, j] = zero
            for d in range(dk):
                for i in range(tm):
                    a_r[i] = q_s[d, ty + i * ty_n]
                for j in range(sc):
                    c_r[j] = k_s[d, tx + j * tx_n]
                for i in range(tm):
                    for j in range(sc):
                        s_r[i, j] += a_r[i] * c_r[j]
            # (2) visibility and this thread's share of the row maxima
            for i in range(tm):
                row = q0 + ty + i * ty_n
                mx = ninf
                for j in range(sc):
                    col = k0 + tx + j * tx_n
                    # rows past the end are computed (never stored): clamp their mask reads
                    if col < k_hi and visible(mask, b, h, min(row, nq - 1), col, fb, fh, fi, fj, wl, wr):
                        if s_r[i, j] > mx:
                            mx = s_r[i, j]
                    else:
                        s_r[i, j] = ninf
                red[ty + i * ty_n, tx] = mx
            cuda.syncthreads()
            # (3) online softmax: new running max, rescale, probabilities to shared memory
            for i in range(tm):
                r = ty + i * ty_n
                mx = m_r[i]
                for t in range(tx_n):
                    if red[r, t] > mx:
                        mx = red[r, t]
                if mx > ninf:
                    alpha = math.exp(m_r[i] - mx)  # exp(-inf) = 0 on the first visible tile
                    m_r[i] = mx
                    l_r[i] *= alpha
                    for e in range(oc):
                        acc[i, e] *= alpha
                psum = zero
                for j in range(sc):
                    p = zero
                    if s_r[i, j] > ninf:
                        p = math.exp(s_r[i, j] - mx)
                    p_s[r, tx + j * tx_n] = p
                    psum += p
                l_r[i] += psum
            cuda.syncthreads()
            # (4) O += P V
            for j in range(bkt):
                for i in range(tm):
                    a_r[i] = p_s[ty + i * ty_n, j]
                for e in range(oc):
                    col = tx + e * tx_n
                    b_r[e] = v_s[j, col] if col < dv else zero
                for i in range(tm):
                    for e in range(oc):
                        acc[i, e] += a_r[i] * b_r[e]

        # combine the partial row sums of the TX threads sharing each row, normalise, store
        cuda.syncthreads()
        for i in range(tm):
            red[ty + i * ty_n, tx] = l_r[i]
        cuda.syncthreads()
        for i in range(tm):
            r = ty + i * ty_n
            row = q0 + r
            if row < nq:
                total = zero
                for t in range(tx_n):
                    total += red[r, t]
                inv = dt(1.0) / total if total > zero else zero
                if save_lse and tx == 0:
                    lse[b, h, row] = m_r[i] + math.log(total) if total > zero else ninf
                for e in range(oc):
                    col = tx + e * tx_n
                    if col < dv:
                        out[b, h, row, col] = acc[i, e] * inv

    return fused


def _mask4(mask):
    """A device bool mask -> (4-D view, per-axis index factors: 1 = indexed, 0 = broadcast)."""
    shape = tuple(mask.shape)
    if len(shape) < 4:
        mask = mask.reshape((1,) * (4 - len(shape)) + shape)
    return mask, tuple(int(s > 1) for s in mask.shape)


def attention(q, k, v, mask, causal, impl, tuning, save_lse: bool = False):
    """Attention (B, H, Nq, Dv); with ``save_lse`` -> (out, lse (B, H, Nq)) (``attention_train``)."""
    b, h, nq, dk = q.shape
    nk, dv = k.shape[2], v.shape[3]
    dtype = np.dtype(q.dtype)
    mask4, factors = _mask4(mask) if mask is not None else (None, (0, 0, 0, 0))
    lse = cuda.device_array((b, h, nq), dtype=dtype) if save_lse else None
    if impl == "fused":
        out = empty_heads(b, h, nq, dv, dtype)
        run_fused(q, k, v, out, tuning, mask4=mask4, factors=factors,
                  window=(UNBOUNDED, 0) if causal else None, lse=lse)
        return (out, lse) if save_lse else out
    q3 = c_view(contiguous(q, tuning), (b * h, nq, dk))
    k3 = c_view(contiguous(k, tuning), (b * h, nk, dk))
    v3 = c_view(contiguous(v, tuning), (b * h, nk, dv))
    scores = cuda.device_array((b * h, nq, nk), dtype=dtype)
    gemm(q3, k3, scores, tuning, trans_b=True, alpha=1.0 / math.sqrt(dk))
    s2 = c_view(scores, (b * h * nq, nk))
    run_softmax(s2, s2, tuning, mask4=mask4, factors=factors, n_heads=h, nq=nq, causal=causal,
                lse=None if lse is None else c_view(lse, (b * h * nq,)))
    out3 = cuda.device_array((b * h, nq, dv), dtype=dtype)
    gemm(scores, v3, out3, tuning, trans_b=False)
    out = c_view(out3, (b, h, nq, dv))
    return (out, lse) if save_lse else out


@lru_cache(maxsize=None)
def _lse_placeholder(dtype):
    return cuda.to_device(np.zeros((1, 1, 1), dtype=dtype))


def run_fused(q, k, v, out, tuning, *, mask4=None, factors=(0, 0, 0, 0), window=None, lse=None):
    """Launch the fused kernel on 4-D operands; ``window=(wl, wr)``: query i sees keys [i - wl, i + wr];
    ``lse`` (B, H, Nq): also write each query's log-sum-exp there."""
    b, h, nq, dk = q.shape
    dv = v.shape[3]
    dtype = np.dtype(q.dtype)
    version, (bq, bkt, ty, tx) = fused_plan(tuning, dk, dv, dtype.itemsize)
    kern = fused_kernel(dtype, dk, dv, bq, bkt, ty, tx, mask4 is not None, window is not None, version,
                        lse is not None)
    wl, wr = window if window is not None else (0, 0)
    launch("attention_fused", kern, (cdiv(nq, bq), b * h), ty * tx, q, k, v, out,
           _lse_placeholder(dtype) if lse is None else lse, mask4 if mask4 is not None else no_mask(), *factors,
           dtype.type(1.0 / math.sqrt(dk)), wl, wr)


# ------------------------------------------------------------------- layout kernels
@lru_cache(maxsize=None)
def _merge_kernel():
    @cuda.jit(cache=True)
    def merge(x, out):  # x (B, H, N, Dh) -> out (B, N, H*Dh); consecutive threads write
        i = cuda.grid(1)
        bb, hh, n, dh = x.shape
        if i < bb * hh * n * dh:
            col = i % (hh * dh)
            pos = (i // (hh * dh)) % n
            bi = i // (hh * dh * n)
            out[bi, pos, col] = x[bi, col // dh, pos, col % dh]

    return merge


@lru_cache(maxsize=None)
def _write_rows_kernel():
    @cuda.jit(cache=True)
    def write_rows(dst, src, start):  # dst[:, :, start:start+n] = src
        i = cuda.grid(1)
        bb, hh, n, d = src.shape
        if i < bb * hh * n * d:
            e = i % d
            pos = (i // d) % n
            head = (i // (d * n)) % hh
            bi = i // (d * n * hh)
            dst[bi, head, start + pos, e] = src[bi, head, pos, e]

    return write_rows


def split_heads(x, n_heads, tuning, start=0, width=None):
    """Columns [start, start + width) of x (B, N, C) as (B, H, N, width / H): a strided view of
    x, no copy and no launch (the attention kernels read any strides). A strided x is made
    contiguous first (one copy)."""
    b, n, c = x.shape
    width = c - start if width is None else width
    x = contiguous(x, tuning)
    dh = width // n_heads
    s = x.dtype.itemsize
    return strided_view(x, (b, n_heads, n, dh), (n * c * s, dh * s, c * s, s), start)


def merged_layout(b, h, n, dh, itemsize) -> tuple:
    """Byte strides of a (B, H, N, Dh) view of a contiguous (B, N, H*Dh) array."""
    return (n * h * dh * itemsize, dh * itemsize, h * dh * itemsize, itemsize)


def empty_heads(b, h, n, dh, dtype):
    """A (B, H, N, Dh) output whose memory is laid out as (B, N, H*Dh), so that
    :func:`merge_heads` returns it without a copy."""
    dtype = np.dtype(dtype)
    merged = cuda.device_array((b, n, h * dh), dtype=dtype)
    return strided_view(merged, (b, h, n, dh), merged_layout(b, h, n, dh, dtype.itemsize))


def merge_heads(x, tuning):
    """(B, H, N, Dh) -> (B, N, H*Dh): free (a view) for the attention kernels' outputs, which
    are written in that layout already; one copy kernel otherwise."""
    b, h, n, dh = x.shape
    if tuple(x.strides) == merged_layout(b, h, n, dh, x.dtype.itemsize):
        return strided_view(x, (b, n, h * dh), c_strides((b, n, h * dh), x.dtype.itemsize))
    out = cuda.device_array((b, n, h * dh), dtype=x.dtype)
    launch("merge_heads", _merge_kernel(), grid_1d(out.size, tuning.elem_threads),
           tuning.elem_threads, x, out)
    return out


def write_rows(dst, src, start, tuning):
    launch("write_rows", _write_rows_kernel(), grid_1d(src.size, tuning.elem_threads),
           tuning.elem_threads, dst, src, start)


# ------------------------------------------------------------------- backward
# O = P V, P = softmax(S), S = Q K^T / sqrt(d_k). Given dO and the forward's lse (FlashAttention-2,
# Dao 2023, Algorithm 2): P = exp(S - lse), dV = P^T dO, dP = dO V^T, D = rowsum(dO * O),
# dS = P (dP - D), dQ = dS K / sqrt(d_k), dK = dS^T Q / sqrt(d_k): five products against the
# forward's two. D is computed once per query row by ``_bwd_pre_kernel`` (which also zeroes dQ
# for the atomic variant); the fused kernels recompute S tile by tile from q, k and lse.

BWD_DQ = {"atomic": "dQ summed over the key blocks with float32 atomics from the key-block kernel "
                    "(5 products per tile; the additions' order, hence dQ's last bits, varies by run)",
          "pass": "dQ in a second, query-block kernel that recomputes S and dP (7 products per tile, "
                  "no atomics, deterministic)"}

# Tilings (BQ, BKV, TY, TX) the lab times (dev/cuda/lab.py, family "backward"), the default
# first; tests/test_cuda_ptx.py compiles each for sm_90 at d = 64 in float32.
BWD_TILINGS = ((32, 32, 8, 16), (32, 32, 8, 8), (16, 64, 16, 8))
# Smaller tilings tried, in order, when a head dimension or float64 does not fit the tuning's.
_BWD_FALLBACKS = ((16, 16, 4, 4), (8, 8, 2, 2), (4, 4, 1, 1))


def _bwd_widths(d: int, tx: int) -> tuple:
    """(column blocks of 4 per thread, padded width) of a head dimension d over TX threads."""
    groups = cdiv(d, 4 * tx)
    return groups, groups * 4 * tx


def fused_bwd_shared_bytes(dk, dv, bq, bkv, tx, itemsize, single: bool = False) -> int:
    """Static shared memory of the key-block backward kernel (the dQ pass needs no more than
    its single-buffer form): K, V, Q and dO tiles in 16-byte aligned rows padded by 4, the P
    and dS tiles (one buffer for both with ``single``), lse and D of the query tile."""
    ldk, ldv = _bwd_widths(dk, tx)[1] + 4, _bwd_widths(dv, tx)[1] + 4
    return itemsize * ((bkv + bq) * (ldk + ldv) + (1 if single else 2) * bq * (bkv + 4) + 2 * bq)


@lru_cache(maxsize=1024)
def fused_bwd_plan(tuning, dk: int, dv: int, itemsize: int) -> tuple:
    """((BQ, BKV, TY, TX), single): ``tuning.attn_bwd`` with separate P and dS tiles if they fit
    in 48 KB of shared memory, else with one buffer for both, else the first of the smaller
    fallback tilings that fits; ValueError naming the way out if none does."""
    for tiles in (tuning.attn_bwd,) + _BWD_FALLBACKS:
        bq, bkv, ty, tx = tiles
        for single in (False, True):
            if fused_bwd_shared_bytes(dk, dv, bq, bkv, tx, itemsize, single) <= SHARED_BYTES_LIMIT:
                return tiles, single
    raise ValueError(f"head dims d_k={dk}, d_v={dv} are too large for the fused CUDA attention backward's "
                     f"shared memory ({itemsize}-byte floats); use impl='naive'")


@lru_cache(maxsize=None)
def _bwd_pre_kernel(dtype, nt: int, zero_dq: bool):
    """D = rowsum(dO * O) per query row (delta (B, H, Nq)); with ``zero_dq`` also dq[b, h, i, :]
    = 0 (the atomic variant adds into it). nt/8 rows per block, 8 lanes per row reading
    consecutive columns, their partial sums combined in shared memory in a fixed order."""
    dt = numba_dtype(dtype)
    lanes = 8 if nt % 8 == 0 else 1
    rows_pb = nt // lanes

    @cuda.jit(cache=True)
    def bwd_pre(out, dout, delta, dq):
        part = cuda.shared.array(nt, dt)
        t = cuda.threadIdx.x
        lane = t % lanes
        row = cuda.blockIdx.x * rows_pb + t // lanes
        b = cuda.blockIdx.y // out.shape[1]
        h = cuda.blockIdx.y % out.shape[1]
        s = dt(0.0)
        if row < out.shape[2]:
            for c in range(lane, out.shape[3], lanes):
                s += dout[b, h, row, c] * out[b, h, row, c]
            if zero_dq:
                for c in range(lane, dq.shape[3], lanes):
                    dq[b, h, row, c] = dt(0.0)
        part[t] = s
        cuda.syncthreads()
        if lane == 0 and row < out.shape[2]:
            for other in range(1, lanes):
                s += part[t + other]
            delta[b, h, row] = s

    return bwd_pre


@lru_cache(maxsize=None)
def bwd_kv_kernel(dtype, dk, dv, bq, bkv, ty_n, tx_n, masked: bool, band: bool, atomic_dq: bool,
                  single: bool = False):
    """The key-block kernel of the fused backward: dK, dV (and with ``atomic_dq`` dQ).

    q, k, v, do, dq, dk_out, dv_out (B, H, N, D) (any strides); lse, delta (B, H, Nq).
    Launch: grid (cdiv(Nk, BKV), B*H), block TY*TX threads. A block stages its BKV keys and
    values once, then walks the query tiles that can see them (causal or banded: only those)
    BQ rows at a time (the loads' latency is hidden by the other blocks on the SM, not by a
    register prefetch: that doubled the registers). Per tile, in registers and shared memory:

    * S^T and dP^T (BKV x BQ): a thread owns keys ``4*ty + r + g*4*TY`` and queries
      ``tx + c*TX``; both products reduce over d in steps of 4 (16-byte shared loads of K, Q,
      V and dO rows, padded to 16-byte aligned rows whose 4-float offset keeps the 8 rows a
      quarter-warp reads in distinct banks);
    * P = exp2(S log2(e)/sqrt(d_k) - lse log2(e)) (0 where masked, past the ends, or for a
      row with no visible key), dS = P (dP - D), both to shared tiles [query][key];
    * dV += P^T dO and dK += dS^T Q: a thread owns the same keys x columns ``4*tx + c +
      g*4*TX``; each query step reads 4 keys of P (or dS) and 4 columns of dO (or Q) per
      16-byte load;
    * (``atomic_dq``) dQ_tile = dS K, a thread owning queries ``ty + c*TY`` x the same
      columns, reduced over keys in steps of 4, then added to dq with float32 atomics.

    dK and dV (scaled by 1/sqrt(d_k) for dK) are written once at the end. ``single``: P and
    dS share one shared tile (two more barriers per step) where two do not fit in 48 KB.
    """
    dt = numba_dtype(dtype)
    visible = visibility(masked, band)
    nt = ty_n * tx_n
    tk, tq, tqe = bkv // ty_n, bq // tx_n, bq // ty_n
    dkg, dkw = _bwd_widths(dk, tx_n)
    dvg, dvw = _bwd_widths(dv, tx_n)
    ck, cv = 4 * dkg, 4 * dvg
    ldk, ldv, ldp = dkw + 4, dvw + 4, bkv + 4
    dk4, dv4 = cdiv(dk, 4), cdiv(dv, 4)
    k_size, v_size, q_size, o_size, p_size = bkv * ldk, bkv * ldv, bq * ldk, bq * ldv, bq * ldp
    ds_size = 1 if single else p_size
    k_loads, v_loads, q_loads, o_loads = (cdiv(bkv * dkw, nt), cdiv(bkv * dvw, nt), cdiv(bq * dkw, nt),
                                          cdiv(bq * dvw, nt))
    s_shape, dk_shape, dv_shape = (tk, tq), (tk, ck), (tk, cv)
    dq_shape, sr_shape = ((tqe, ck), (tqe, 4)) if atomic_dq else ((1, 1), (1, 1))
    cw = max(ck, cv)
    log2e = dt(LOG2E)

    @cuda.jit(cache=True)
    def bwd_kv(q, k, v, do, lse, delta, dq, dk_out, dv_out, mask, fb, fh, fi, fj, scale, wl, wr):
        k_s = cuda.shared.array(k_size, dt, alignment=16)
        v_s = cuda.shared.array(v_size, dt, alignment=16)
        q_s = cuda.shared.array(q_size, dt, alignment=16)
        o_s = cuda.shared.array(o_size, dt, alignment=16)
        p_s = cuda.shared.array(p_size, dt, alignment=16)
        ds_s = cuda.shared.array(ds_size, dt, alignment=16)
        l_s = cuda.shared.array(bq, dt)
        d_s = cuda.shared.array(bq, dt)
        s_r = cuda.local.array(s_shape, dt)
        g_r = cuda.local.array(s_shape, dt)
        dk_acc = cuda.local.array(dk_shape, dt)
        dv_acc = cuda.local.array(dv_shape, dt)
        a_r = cuda.local.array((tk, 4), dt)
        b_r = cuda.local.array((tq, 4), dt)
        kr = cuda.local.array(tk, dt)
        cr = cuda.local.array(cw, dt)
        dq_r = cuda.local.array(dq_shape, dt)
        sr = cuda.local.array(sr_shape, dt)
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        nq = q.shape[2]
        nk = k.shape[2]
        j0 = cuda.blockIdx.x * bkv
        b = uint64(cuda.blockIdx.y // q.shape[1])
        h = uint64(cuda.blockIdx.y % q.shape[1])
        zero = dt(0.0)
        ninf = dt(-math.inf)
        qscale = scale * log2e

        # this block's keys and values, once (rows past Nk repeat the last key, their P is 0;
        # columns past d are zeros, so the padded d steps add nothing)
        for load in range(k_loads):
            idx = tid + load * nt
            if idx < bkv * dkw:
                r = idx // dkw
                c = idx - r * dkw
                val = k[b, h, uint64(min(j0 + r, nk - 1)), uint64(min(c, dk - 1))]
                k_s[uint64(r * ldk + c)] = val if c < dk else zero
        for load in range(v_loads):
            idx = tid + load * nt
            if idx < bkv * dvw:
                r = idx // dvw
                c = idx - r * dvw
                val = v[b, h, uint64(min(j0 + r, nk - 1)), uint64(min(c, dv - 1))]
                v_s[uint64(r * ldv + c)] = val if c < dv else zero
        for i in range(tk):
            for e in range(ck):
                dk_acc[i, e] = zero
            for e in range(cv):
                dv_acc[i, e] = zero

        i_lo = 0
        i_hi = nq
        if band:  # query i sees key j iff j - wr <= i <= j + wl
            i_lo = max(0, j0 - wr)
            i_hi = min(nq, min(nk, j0 + bkv) + wl)
        for i0 in range(i_lo, i_hi, bq):
            cuda.syncthreads()  # the previous step's readers are done (and K, V are staged)
            # Q and dO straight to shared memory (rows past Nq repeat the last row, their P is 0):
            # prefetching the next tile into registers, as the forward does, took the kernel from
            # 127 to 254 registers at 128 threads (ptxas, sm_90), halving the blocks per SM
            for load in range(q_loads):
                idx = tid + load * nt
                if idx < bq * dkw:
                    r = idx // dkw
                    c = idx - r * dkw
                    val = q[b, h, uint64(min(i0 + r, nq - 1)), uint64(min(c, dk - 1))]
                    q_s[uint64(r * ldk + c)] = val if c < dk else zero
            for load in range(o_loads):
                idx = tid + load * nt
                if idx < bq * dvw:
                    r = idx // dvw
                    c = idx - r * dvw
                    val = do[b, h, uint64(min(i0 + r, nq - 1)), uint64(min(c, dv - 1))]
                    o_s[uint64(r * ldv + c)] = val if c < dv else zero
            for r in range(tid, bq, nt):
                row = uint64(min(i0 + r, nq - 1))
                l_s[r] = lse[b, h, row] * log2e
                d_s[r] = delta[b, h, row]
            cuda.syncthreads()

            # (1) S^T = K Q^T and dP^T = V dO^T for this thread's keys x queries
            for i in range(tk):
                for j in range(tq):
                    s_r[i, j] = zero
                    g_r[i, j] = zero
            for d4 in range(dk4):
                for g in range(tk // 4):
                    for r in range(4):
                        ko = uint64((4 * ty + r + g * 4 * ty_n) * ldk + 4 * d4)
                        for u in range(4):
                            a_r[4 * g + r, u] = k_s[ko + uint64(u)]
                for j in range(tq):
                    qo = uint64((tx + j * tx_n) * ldk + 4 * d4)
                    for u in range(4):
                        b_r[j, u] = q_s[qo + uint64(u)]
                for i in range(tk):
                    for j in range(tq):
                        for u in range(4):
                            s_r[i, j] += a_r[i, u] * b_r[j, u]
            for d4 in range(dv4):
                for g in range(tk // 4):
                    for r in range(4):
                        vo = uint64((4 * ty + r + g * 4 * ty_n) * ldv + 4 * d4)
                        for u in range(4):
                            a_r[4 * g + r, u] = v_s[vo + uint64(u)]
                for j in range(tq):
                    oo = uint64((tx + j * tx_n) * ldv + 4 * d4)
                    for u in range(4):
                        b_r[j, u] = o_s[oo + uint64(u)]
                for i in range(tk):
                    for j in range(tq):
                        for u in range(4):
                            g_r[i, j] += a_r[i, u] * b_r[j, u]
            # (2) P and dS = P (dP - D); P is 0 where masked, past either end, or for a row
            # that sees no key at all (lse = -inf)
            for j in range(tq):
                ql = tx + j * tx_n
                row = i0 + ql
                lrow = l_s[ql]
                drow = d_s[ql]
                for i in range(tk):
                    col = j0 + 4 * ty + (i // 4) * 4 * ty_n + i % 4
                    p = zero
                    if row < nq and col < nk and lrow > ninf and visible(mask, b, h, row, col, fb, fh, fi, fj,
                                                                          wl, wr):
                        p = math.exp2(s_r[i, j] * qscale - lrow)
                    s_r[i, j] = p
                    g_r[i, j] = p * (g_r[i, j] - drow)
                for g in range(tk // 4):
                    po_ = uint64(ql * ldp + 4 * ty + g * 4 * ty_n)
                    for r in range(4):
                        p_s[po_ + uint64(r)] = s_r[4 * g + r, j]
                        if not single:
                            ds_s[po_ + uint64(r)] = g_r[4 * g + r, j]
            cuda.syncthreads()
            # (3) dV += P^T dO
            kb = uint64(4 * ty)
            cb = uint64(4 * tx)
            for qq in range(bq):
                pb = kb + uint64(qq * ldp)
                ob = cb + uint64(qq * ldv)
                for g in range(tk // 4):
                    for r in range(4):
                        kr[4 * g + r] = p_s[pb + uint64(4 * ty_n * g + r)]
                for g in range(dvg):
                    for c in range(4):
                        cr[4 * g + c] = o_s[ob + uint64(4 * tx_n * g + c)]
                for i in range(tk):
                    for e in range(cv):
                        dv_acc[i, e] += kr[i] * cr[e]
            if single:  # dS replaces P in the one tile
                cuda.syncthreads()
                for j in range(tq):
                    ql = tx + j * tx_n
                    for g in range(tk // 4):
                        po_ = uint64(ql * ldp + 4 * ty + g * 4 * ty_n)
                        for r in range(4):
                            p_s[po_ + uint64(r)] = g_r[4 * g + r, j]
                cuda.syncthreads()
            dsb = p_s if single else ds_s
            # (4) dK += dS^T Q (scaled by 1/sqrt(d_k) when written)
            for qq in range(bq):
                pb = kb + uint64(qq * ldp)
                qb = cb + uint64(qq * ldk)
                for g in range(tk // 4):
                    for r in range(4):
                        kr[4 * g + r] = dsb[pb + uint64(4 * ty_n * g + r)]
                for g in range(dkg):
                    for c in range(4):
                        cr[4 * g + c] = q_s[qb + uint64(4 * tx_n * g + c)]
                for i in range(tk):
                    for e in range(ck):
                        dk_acc[i, e] += kr[i] * cr[e]
            # (5) dQ_tile = dS K / sqrt(d_k), added into dq with atomics
            if atomic_dq:
                for c in range(tqe):
                    for e in range(ck):
                        dq_r[c, e] = zero
                for r4 in range(bkv // 4):
                    for c in range(tqe):
                        so = uint64((ty + c * ty_n) * ldp + 4 * r4)
                        for u in range(4):
                            sr[c, u] = dsb[so + uint64(u)]
                    for u in range(4):
                        ko = cb + uint64((4 * r4 + u) * ldk)
                        for g in range(dkg):
                            for cc in range(4):
                                cr[4 * g + cc] = k_s[ko + uint64(4 * tx_n * g + cc)]
                        for c in range(tqe):
                            for e in range(ck):
                                dq_r[c, e] += sr[c, u] * cr[e]
                for c in range(tqe):
                    row = i0 + ty + c * ty_n
                    if row < nq:
                        for e in range(ck):
                            col = 4 * tx + (e // 4) * 4 * tx_n + e % 4
                            if col < dk:
                                cuda.atomic.add(dq, (b, h, uint64(row), uint64(col)), dq_r[c, e] * scale)

        for i in range(tk):
            key = j0 + 4 * ty + (i // 4) * 4 * ty_n + i % 4
            if key < nk:
                for e in range(ck):
                    col = 4 * tx + (e // 4) * 4 * tx_n + e % 4
                    if col < dk:
                        dk_out[b, h, uint64(key), uint64(col)] = dk_acc[i, e] * scale
                for e in range(cv):
                    col = 4 * tx + (e // 4) * 4 * tx_n + e % 4
                    if col < dv:
                        dv_out[b, h, uint64(key), uint64(col)] = dv_acc[i, e]

    return bwd_kv


@lru_cache(maxsize=None)
def bwd_dq_kernel(dtype, dk, dv, bq, bkv, ty_n, tx_n, masked: bool, band: bool):
    """The dQ pass of the fused backward (``BWD_DQ["pass"]``): dq = sum over key tiles of dS K.

    Launch: grid (cdiv(Nq, BQ), B*H), block TY*TX threads, heaviest causal tiles first. A block
    stages its BQ queries (Q, dO, lse, D) once and walks the key tiles that its queries can see
    (no register prefetch, as the key-block kernel): S and dP
    (thread: queries ``ty + c*TY`` x keys ``tx + j*TX``, reduced over d in 16-byte steps), dS to
    a shared tile, then dQ += dS K (thread: its queries x columns ``4*tx + c + g*4*TX``,
    reduced over keys in steps of 4). Every dQ element is summed by one thread in key order:
    deterministic.
    """
    dt = numba_dtype(dtype)
    visible = visibility(masked, band)
    nt = ty_n * tx_n
    tq, tk = bq // ty_n, bkv // tx_n
    dkg, dkw = _bwd_widths(dk, tx_n)
    dvg, dvw = _bwd_widths(dv, tx_n)
    ck = 4 * dkg
    ldk, ldv, ldp = dkw + 4, dvw + 4, bkv + 4
    dk4, dv4 = cdiv(dk, 4), cdiv(dv, 4)
    k_size, v_size, q_size, o_size, p_size = bkv * ldk, bkv * ldv, bq * ldk, bq * ldv, bq * ldp
    k_loads, v_loads, q_loads, o_loads = (cdiv(bkv * dkw, nt), cdiv(bkv * dvw, nt), cdiv(bq * dkw, nt),
                                          cdiv(bq * dvw, nt))
    s_shape, acc_shape = (tq, tk), (tq, ck)
    log2e = dt(LOG2E)

    @cuda.jit(cache=True)
    def bwd_dq(q, k, v, do, lse, delta, dq, mask, fb, fh, fi, fj, scale, wl, wr):
        k_s = cuda.shared.array(k_size, dt, alignment=16)
        v_s = cuda.shared.array(v_size, dt, alignment=16)
        q_s = cuda.shared.array(q_size, dt, alignment=16)
        o_s = cuda.shared.array(o_size, dt, alignment=16)
        ds_s = cuda.shared.array(p_size, dt, alignment=16)
        l_s = cuda.shared.array(bq, dt)
        d_s = cuda.shared.array(bq, dt)
        s_r = cuda.local.array(s_shape, dt)
        g_r = cuda.local.array(s_shape, dt)
        acc = cuda.local.array(acc_shape, dt)
        a_r = cuda.local.array((tq, 4), dt)
        b_r = cuda.local.array((tk, 4), dt)
        cr = cuda.local.array(ck, dt)
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        nq = q.shape[2]
        nk = k.shape[2]
        q0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * bq  # heaviest causal tiles first
        b = uint64(cuda.blockIdx.y // q.shape[1])
        h = uint64(cuda.blockIdx.y % q.shape[1])
        zero = dt(0.0)
        ninf = dt(-math.inf)
        qscale = scale * log2e

        for load in range(q_loads):
            idx = tid + load * nt
            if idx < bq * dkw:
                r = idx // dkw
                c = idx - r * dkw
                val = q[b, h, uint64(min(q0 + r, nq - 1)), uint64(min(c, dk - 1))]
                q_s[uint64(r * ldk + c)] = val if c < dk else zero
        for load in range(o_loads):
            idx = tid + load * nt
            if idx < bq * dvw:
                r = idx // dvw
                c = idx - r * dvw
                val = do[b, h, uint64(min(q0 + r, nq - 1)), uint64(min(c, dv - 1))]
                o_s[uint64(r * ldv + c)] = val if c < dv else zero
        for r in range(tid, bq, nt):
            row = uint64(min(q0 + r, nq - 1))
            l_s[r] = lse[b, h, row] * log2e
            d_s[r] = delta[b, h, row]
        for i in range(tq):
            for e in range(ck):
                acc[i, e] = zero

        k_lo = 0
        k_hi = nk
        if band:  # keys outside [q0 - wl, q0 + bq - 1 + wr] are invisible to the whole tile
            k_lo = max(0, q0 - wl)
            k_hi = min(nk, q0 + bq + wr)
        for k0 in range(k_lo, k_hi, bkv):
            cuda.syncthreads()  # the previous tile's readers are done (and Q, dO are staged)
            for load in range(k_loads):  # straight to shared memory, as the key-block kernel
                idx = tid + load * nt
                if idx < bkv * dkw:
                    r = idx // dkw
                    c = idx - r * dkw
                    val = k[b, h, uint64(min(k0 + r, nk - 1)), uint64(min(c, dk - 1))]
                    k_s[uint64(r * ldk + c)] = val if c < dk else zero
            for load in range(v_loads):
                idx = tid + load * nt
                if idx < bkv * dvw:
                    r = idx // dvw
                    c = idx - r * dvw
                    val = v[b, h, uint64(min(k0 + r, nk - 1)), uint64(min(c, dv - 1))]
                    v_s[uint64(r * ldv + c)] = val if c < dv else zero
            cuda.syncthreads()

            # (1) S = Q K^T and dP = dO V^T: this thread's queries x keys
            for i in range(tq):
                for j in range(tk):
                    s_r[i, j] = zero
                    g_r[i, j] = zero
            for d4 in range(dk4):
                for i in range(tq):
                    qo = uint64((ty + i * ty_n) * ldk + 4 * d4)
                    for u in range(4):
                        a_r[i, u] = q_s[qo + uint64(u)]
                for j in range(tk):
                    ko = uint64((tx + j * tx_n) * ldk + 4 * d4)
                    for u in range(4):
                        b_r[j, u] = k_s[ko + uint64(u)]
                for i in range(tq):
                    for j in range(tk):
                        for u in range(4):
                            s_r[i, j] += a_r[i, u] * b_r[j, u]
            for d4 in range(dv4):
                for i in range(tq):
                    oo = uint64((ty + i * ty_n) * ldv + 4 * d4)
                    for u in range(4):
                        a_r[i, u] = o_s[oo + uint64(u)]
                for j in range(tk):
                    vo = uint64((tx + j * tx_n) * ldv + 4 * d4)
                    for u in range(4):
                        b_r[j, u] = v_s[vo + uint64(u)]
                for i in range(tq):
                    for j in range(tk):
                        for u in range(4):
                            g_r[i, j] += a_r[i, u] * b_r[j, u]
            # (2) dS = P (dP - D) to shared
            for i in range(tq):
                ql = ty + i * ty_n
                row = q0 + ql
                lrow = l_s[ql]
                drow = d_s[ql]
                for j in range(tk):
                    rl = tx + j * tx_n
                    col = k0 + rl
                    ds = zero
                    if row < nq and col < k_hi and lrow > ninf and visible(mask, b, h, row, col, fb, fh, fi, fj,
                                                                            wl, wr):
                        ds = math.exp2(s_r[i, j] * qscale - lrow) * (g_r[i, j] - drow)
                    ds_s[uint64(ql * ldp + rl)] = ds
            cuda.syncthreads()
            # (3) dQ += dS K
            cb = uint64(4 * tx)
            for r4 in range(bkv // 4):
                for i in range(tq):
                    so = uint64((ty + i * ty_n) * ldp + 4 * r4)
                    for u in range(4):
                        a_r[i, u] = ds_s[so + uint64(u)]
                for u in range(4):
                    ko = cb + uint64((4 * r4 + u) * ldk)
                    for g in range(dkg):
                        for c in range(4):
                            cr[4 * g + c] = k_s[ko + uint64(4 * tx_n * g + c)]
                    for i in range(tq):
                        for e in range(ck):
                            acc[i, e] += a_r[i, u] * cr[e]

        for i in range(tq):
            row = q0 + ty + i * ty_n
            if row < nq:
                for e in range(ck):
                    col = 4 * tx + (e // 4) * 4 * tx_n + e % 4
                    if col < dk:
                        dq[b, h, uint64(row), uint64(col)] = acc[i, e] * scale

    return bwd_dq


def zeros_heads(b, h, n, dh, dtype, tuning):
    """:func:`empty_heads` filled with zeros."""
    from .training import zeros

    merged = zeros((b, n, h * dh), dtype, tuning)
    return strided_view(merged, (b, h, n, dh), merged_layout(b, h, n, dh, np.dtype(dtype).itemsize))


@lru_cache(maxsize=None)
def _placeholder4(dtype):
    return cuda.to_device(np.zeros((1, 1, 1, 1), dtype=dtype))


def fused_backward(q, k, v, out, lse, dout, tuning, *, mask4=None, factors=(0, 0, 0, 0), window=None):
    """(dq, dk, dv) of the fused attention on 4-D operands (any strides); dq, dk, dv come back
    head-merged (views of (B, N, H*D) arrays), as the forward's output. ``window``: as
    :func:`run_fused`; the variant is ``tuning.attn_bwd_dq`` (``BWD_DQ``)."""
    b, h, nq, dk = q.shape
    nk, dv = k.shape[2], v.shape[3]
    dtype = np.dtype(q.dtype)
    if min(b, h, nq, nk) == 0:  # an empty sum: zero gradients
        return (zeros_heads(b, h, nq, dk, dtype, tuning), zeros_heads(b, h, nk, dk, dtype, tuning),
                zeros_heads(b, h, nk, dv, dtype, tuning))
    (bq, bkv, ty, tx), single = fused_bwd_plan(tuning, dk, dv, dtype.itemsize)
    atomic = tuning.attn_bwd_dq == "atomic"
    dq = empty_heads(b, h, nq, dk, dtype)
    dk_ = empty_heads(b, h, nk, dk, dtype)
    dv_ = empty_heads(b, h, nk, dv, dtype)
    delta = cuda.device_array((b, h, nq), dtype=dtype)
    nt = tuning.elem_threads
    rows_pb = nt // (8 if nt % 8 == 0 else 1)
    launch("attention_backward_pre", _bwd_pre_kernel(dtype, nt, atomic), (cdiv(nq, rows_pb), b * h), nt,
           out, dout, delta, dq)
    masked, band = mask4 is not None, window is not None
    wl, wr = window if band else (0, 0)
    mask_args = (mask4 if masked else no_mask(), *factors)
    scale = dtype.type(1.0 / math.sqrt(dk))
    launch("attention_backward_kv", bwd_kv_kernel(dtype, dk, dv, bq, bkv, ty, tx, masked, band, atomic, single),
           (cdiv(nk, bkv), b * h), ty * tx, q, k, v, dout, lse, delta, dq, dk_, dv_, *mask_args, scale, wl, wr)
    if not atomic:
        launch("attention_backward_dq", bwd_dq_kernel(dtype, dk, dv, bq, bkv, ty, tx, masked, band),
               (cdiv(nq, bq), b * h), ty * tx, q, k, v, dout, lse, delta, dq, *mask_args, scale, wl, wr)
    return dq, dk_, dv_


@lru_cache(maxsize=None)
def _naive_ds_kernel(dtype, masked: bool, causal: bool):
    """In place over the (B*H*Nq, Nk) rows: s <- P = exp(s - lse) (0 where masked or for a row
    with no visible key), dp <- dS = P (dp - D)."""
    dt = numba_dtype(dtype)
    visible = visibility(masked, causal)
    wl = UNBOUNDED

    @cuda.jit(cache=True)
    def naive_ds(s, dp, lse, delta, mask, fb, fh, fi, fj, n_heads, nq):
        idx = cuda.grid(1)
        nk = s.shape[1]
        if idx < s.shape[0] * nk:
            row = idx // nk
            j = idx - row * nk
            i = row % nq
            bh = row // nq
            p = dt(0.0)
            lrow = lse[row]
            if lrow > dt(-math.inf) and visible(mask, bh // n_heads, bh % n_heads, i, j, fb, fh, fi, fj, wl, 0):
                p = math.exp(s[row, j] - lrow)
            s[row, j] = p
            dp[row, j] = p * (dp[row, j] - delta[row])

    return naive_ds


def naive_backward(q, k, v, out, lse, dout, tuning, *, mask4=None, factors=(0, 0, 0, 0), causal=False,
                   free_bytes=None):
    """(dq, dk, dv) with the (Nq, Nk) matrices materialised: S and dP as two (B*H, Nq, Nk)
    arrays (refused with InsufficientMemoryError if they would not fit), five batched
    Numba GEMMs around one elementwise kernel."""
    b, h, nq, dk = q.shape
    nk, dv = k.shape[2], v.shape[3]
    dtype = np.dtype(q.dtype)
    need = 2 * b * h * nq * nk * dtype.itemsize
    if free_bytes is not None and need > free_bytes:
        from ..._checks import format_bytes
        from ...errors import InsufficientMemoryError

        raise InsufficientMemoryError(
            f"the naive attention backward needs {format_bytes(need)} for its two (B={b}, H={h}, Nq={nq}, "
            f"Nk={nk}) matrices but only {format_bytes(free_bytes)} is free; use impl='fused'")
    z = b * h
    q3 = c_view(contiguous(q, tuning), (z, nq, dk))
    k3 = c_view(contiguous(k, tuning), (z, nk, dk))
    v3 = c_view(contiguous(v, tuning), (z, nk, dv))
    do3 = c_view(contiguous(dout, tuning), (z, nq, dv))
    delta = cuda.device_array((b, h, nq), dtype=dtype)
    nt = tuning.elem_threads
    rows_pb = nt // (8 if nt % 8 == 0 else 1)
    launch("attention_backward_pre", _bwd_pre_kernel(dtype, nt, False), (cdiv(nq, rows_pb), z), nt,
           out, dout, delta, _placeholder4(dtype))
    s = cuda.device_array((z, nq, nk), dtype=dtype)
    dp = cuda.device_array((z, nq, nk), dtype=dtype)
    scale = 1.0 / math.sqrt(dk)
    gemm(q3, k3, s, tuning, trans_b=True, alpha=scale)  # S
    gemm(do3, v3, dp, tuning, trans_b=True)  # dP = dO V^T
    launch("attention_backward_ds", _naive_ds_kernel(dtype, mask4 is not None, bool(causal)),
           grid_1d(z * nq * nk, tuning.elem_threads), tuning.elem_threads, c_view(s, (z * nq, nk)),
           c_view(dp, (z * nq, nk)), c_view(contiguous(lse, tuning), (z * nq,)), c_view(delta, (z * nq,)),
           mask4 if mask4 is not None else no_mask(), *factors, h, nq)
    dq3 = cuda.device_array((z, nq, dk), dtype=dtype)
    dk3 = cuda.device_array((z, nk, dk), dtype=dtype)
    dv3 = cuda.device_array((z, nk, dv), dtype=dtype)
    gemm(s, do3, dv3, tuning, trans_b=False, trans_a=True)  # dV = P^T dO
    gemm(dp, k3, dq3, tuning, trans_b=False, alpha=scale)  # dQ = dS K / sqrt(d_k)
    gemm(dp, q3, dk3, tuning, trans_b=False, trans_a=True, alpha=scale)  # dK = dS^T Q / sqrt(d_k)
    return c_view(dq3, (b, h, nq, dk)), c_view(dk3, (b, h, nk, dk)), c_view(dv3, (b, h, nk, dv))


def attention_backward(q, k, v, out, lse, dout, mask, causal, impl, tuning, free_bytes=None):
    """(dq, dk, dv) of :func:`attention` from its inputs, output, lse and dout."""
    b, h, nq, dk = q.shape
    nk, dv = k.shape[2], v.shape[3]
    for name, a, shape in (("out", out, (b, h, nq, dv)), ("dout", dout, (b, h, nq, dv)), ("lse", lse, (b, h, nq))):
        if tuple(a.shape) != shape:
            raise ValueError(f"attention_backward: {name} must have shape {shape}, got {tuple(a.shape)}")
    mask4, factors = _mask4(mask) if mask is not None else (None, (0, 0, 0, 0))
    if impl == "naive" and min(b, h, nq, nk) > 0:
        return naive_backward(q, k, v, out, lse, dout, tuning, mask4=mask4, factors=factors, causal=causal,
                              free_bytes=free_bytes)
    return fused_backward(q, k, v, out, lse, dout, tuning, mask4=mask4, factors=factors,
                          window=(UNBOUNDED, 0) if causal else None)


@lru_cache(maxsize=None)
def _merge_into_kernel():
    @cuda.jit(cache=True)
    def merge_into(x, out, start):  # out[b, n, start + h*Dh + d] = x[b, h, n, d]; writes coalesced
        i = cuda.grid(1)
        bb, hh, n, dh = x.shape
        if i < bb * hh * n * dh:
            col = i % (hh * dh)
            pos = (i // (hh * dh)) % n
            bi = i // (hh * dh * n)
            out[bi, pos, start + col] = x[bi, col // dh, pos, col % dh]

    return merge_into


def merge_heads_into(x, out, start, tuning) -> None:
    """In place: columns [start, start + H*Dh) of out (B, N, C) = merge_heads(x), x (B, H, N, Dh)."""
    b, h, n, dh = x.shape
    if len(out.shape) != 3 or tuple(out.shape[:2]) != (b, n) or not 0 <= start <= out.shape[2] - h * dh:
        raise ValueError(f"merge_heads_into: out of shape {tuple(out.shape)} has no columns "
                         f"[{start}, {start + h * dh}) for (B, N) = {(b, n)}")
    if x.size:
        launch("merge_heads_into", _merge_into_kernel(), grid_1d(x.size, tuning.elem_threads), tuning.elem_threads,
               x, out, start)
