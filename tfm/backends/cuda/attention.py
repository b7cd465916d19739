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
dev/cuda/host/).

* ``naive`` — the O(n^2)-memory reference point: the batched GEMM (``linear.gemm``) writes
  the scaled (B*H, Nq, Nk) scores, the row softmax (``norm.softmax_kernel``) applies
  mask/causal in place, a second GEMM multiplies by V; one score array, so its memory guard
  counts one. Verdict: v1 GEMMs, 56 ms at n = 4096 on the first GPU run
  (results/gpu/attention.csv); with the v2 GEMM not yet measured on a GPU.
* ``fused_v1`` — FlashAttention-2 style, one kernel, scores never leave the chip. One block
  per (query tile of BQ rows, b*h), TY x TX threads; Q (pre-scaled by 1/sqrt(d_k)) and each
  K tile staged d-major in shared memory, V row-major; per K tile: (1) a (BQ/TY) x (BK/TX)
  register tile of scores, rows and columns interleaved (``ty + i*TY``, ``tx + j*TX``);
  (2) row maxima combined across the TX threads of a row through shared memory (no warp
  shuffles: the simulator has none); (3) online softmax in registers (partial row sums
  combined once, at the end), probabilities to a shared P tile; (4) O += P V into a
  (BQ/TY) x ceil(Dv/TX) register tile. Scalar shared loads: 8 per 16 FMAs for the scores,
  12 per 32 for P V. Verdict: 29.5 ms at n = 4096 (9.3 TFLOP/s, 14% of the FP32 peak,
  0.27x SDPA's default backend) on the first GPU run (results/gpu/attention.csv); 110
  registers at 128 threads, 43.8 KB shared memory, no spills (ptx family).
* ``fused_v2`` (default) — v1's algorithm with the instruction overhead cut: 4-wide register
  blocks (rows ``4*ty + r + g*4*TY``, keys ``4*tx + c + g*4*TX``) read from 16-byte aligned
  shared rows in 16-byte loads (2 per 16 FMAs for the scores, 3 per 32 for P V); scores in
  log2 units so each probability is one ``exp2``; the d loop of the scores unrolled by 4;
  the next K/V tile loaded into registers while the current one is multiplied; clamped,
  unconditional, unsigned-index loads. 230 registers at 128 threads, 46.1 KB shared memory,
  no spills; its hottest basic block issues 64 FMAs in 101 PTX instructions (ptx family;
  v1's scores loop: 16 FMAs in 82); where its tiles
  cannot fit 48 KB (d = 128 in float32, float64) ``fused_plan`` runs v1. Verdict: not yet
  measured on a GPU (goal: >= 1.0x SDPA's math backend, n = 1024..16384).

Common to both: extra device memory is the output only (O(n*d)), so n = 16384 and beyond
run. Masking: an optional broadcast boolean mask read through per-axis 0/1 index factors
and a key band [i - wl, i + wr] (causal: wl unbounded, wr = 0), one device function
(``norm.visibility``); key tiles outside the band of a whole query tile are skipped (causal:
half the work), query tiles run heaviest-first. Rows with no visible key give zeros.
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
def fused_kernel(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked: bool, band: bool, version: int = 1):
    """The fused kernel of ``version`` (``ATTN_VERSIONS``) for these compile-time constants."""
    if version == 2:  # Tuning checks BQ % (4*TY) == 0 and BK % (4*TX) == 0
        return _fused_v2(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked, band)
    return _fused_v1(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked, band)


LOG2E = 1.4426950408889634


@lru_cache(maxsize=None)
def _fused_v2(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked: bool, band: bool):
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
    unroll_d = 4 if dk % 4 == 0 else 1  # head dims of the tests (5, 6, ...) keep a plain loop

    @cuda.jit(cache=True)
    def fused(q, k, v, out, mask, fb, fh, fi, fj, scale, wl, wr):
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
                for e in range(oc):
                    col = 4 * tx + (e // 4) * 4 * tx_n + e % 4
                    if col < dv:
                        out[b, h, uint64(row), uint64(col)] = acc[i, e] * inv

    return fused


@lru_cache(maxsize=None)
def _fused_v1(dtype, dk, dv, bq, bkt, ty_n, tx_n, masked: bool, band: bool):
    """Fused attention for q (B, H, Nq, dk), k (B, H, Nk, dk), v (B, H, Nk, dv) -> out (B, H, Nq, dv).

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
    def fused(q, k, v, out, mask, fb, fh, fi, fj, scale, wl, wr):
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


def attention(q, k, v, mask, causal, impl, tuning):
    b, h, nq, dk = q.shape
    nk, dv = k.shape[2], v.shape[3]
    dtype = np.dtype(q.dtype)
    mask4, factors = _mask4(mask) if mask is not None else (None, (0, 0, 0, 0))
    if impl == "fused":
        out = empty_heads(b, h, nq, dv, dtype)
        run_fused(q, k, v, out, tuning, mask4=mask4, factors=factors,
                  window=(UNBOUNDED, 0) if causal else None)
        return out
    q3 = contiguous(q, tuning).reshape(b * h, nq, dk)
    k3 = contiguous(k, tuning).reshape(b * h, nk, dk)
    v3 = contiguous(v, tuning).reshape(b * h, nk, dv)
    scores = cuda.device_array((b * h, nq, nk), dtype=dtype)
    gemm(q3, k3, scores, tuning, trans_b=True, alpha=1.0 / math.sqrt(dk))
    s2 = scores.reshape(b * h * nq, nk)
    run_softmax(s2, s2, tuning, mask4=mask4, factors=factors, n_heads=h, nq=nq, causal=causal)
    out3 = cuda.device_array((b * h, nq, dv), dtype=dtype)
    gemm(scores, v3, out3, tuning, trans_b=False)
    return c_view(out3, (b, h, nq, dv))


def run_fused(q, k, v, out, tuning, *, mask4=None, factors=(0, 0, 0, 0), window=None):
    """Launch the fused kernel on 4-D operands; ``window=(wl, wr)``: query i sees keys [i - wl, i + wr]."""
    b, h, nq, dk = q.shape
    dv = v.shape[3]
    dtype = np.dtype(q.dtype)
    version, (bq, bkt, ty, tx) = fused_plan(tuning, dk, dv, dtype.itemsize)
    kern = fused_kernel(dtype, dk, dv, bq, bkt, ty, tx, mask4 is not None, window is not None, version)
    wl, wr = window if window is not None else (0, 0)
    launch("attention_fused", kern, (cdiv(nq, bq), b * h), ty * tx, q, k, v, out,
           mask4 if mask4 is not None else no_mask(), *factors,
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
