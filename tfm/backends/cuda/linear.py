"""Dense layers on the GPU: linear layers and the FFN, batched GEMM, add, activations, casts.

Variants (``VARIANTS``; the Numba GEMM's versions in ``GEMM_VERSIONS``, chosen by
``Tuning.gemm_version``, each timed at the ``TILINGS``). Verdicts come from
``python3 -m dev.cuda.lab --out DIR --family gemm`` (base-model shapes and 4096^3, against
torch.matmul with TF32 off), static figures from ``--family ptx`` (no GPU needed; committed
output in dev/cuda/host/). GPU figures: NVIDIA H200, dev/cuda/gpu/gemm.csv (M x K x N;
"Nx torch.matmul's speed" = torch.matmul's time / tfm's time), and the peers study of
``python3 -m studies.gpu`` (results/gpu/studies.csv, study=peers; "time ratio" = tfm time /
peer time, with its bootstrap 95% interval).

* ``cupy`` (the default where CuPy imports and passes the backend's self-check) — cuBLAS
  SGEMM/DGEMM called through CuPy's raw bindings on the numba arrays' device pointers
  (``_cublas.py``: no CuPy arrays, no ``__cuda_array_interface__`` synchronisation, no CuPy
  allocation), then one elementwise kernel adds the bias and applies ReLU/GELU in place.
  Verdict (H200): 3.41 ms at 4096^3, 60.3% of the FP32 peak, 0.87x torch.matmul's speed; at
  the base model's 1024 x 512 x 1536 and 1024 x 2048 x 512, 0.30 and 0.21 ms against
  torch.matmul's 0.064 and 0.067 ms (0.21x and 0.31x its speed): host cost per call. The
  first GPU run's path through ``cupy.matmul`` (the lab's cupy_matmul_v0) was faster at all
  three shapes (0.23, 0.14, 3.06 ms). The peers study: time ratio to torch.matmul 1.12
  [1.11, 1.15] at 4096^3, 1.43 [1.42, 1.44] at 8192 x 512 x 2048.
* ``numba_v1`` — tiled SIMT GEMM ``C = alpha * A @ op(B) (+ bias, + activation)``: a block
  computes a BM x BN tile of C, K advances in BK-wide k-major slabs in shared memory, each
  thread accumulates a TM x TN register tile with interleaved rows/columns
  (``ty + i*TY``, ``tx + j*TX``); bias and activation fused into the epilogue; small
  products switch to ``gemm_small`` so the grid fills the GPU (``Tuning.min_blocks``).
  Verdict (H200): 20.07 ms at 4096^3 at (128, 128, 16, 8, 8), 10.2% of the FP32 peak (11.4%
  at (64, 64, 16, 4, 4), its best): each k step spent 4-5 integer instructions per scalar
  shared load on 64-bit addresses and negative-index selects (ptx family: 64 FMAs in 162 PTX
  instructions per k step at 128 x 128), and each slab's global loads waited at a barrier.
* ``numba_v2`` (default) — 4 x 4 register blocks (rows ``4*ty + r + g*4*TY``) read in 16-byte
  shared loads from 16-byte aligned, padded slabs; the next slab loaded into registers
  while the current one is multiplied, double-buffered slabs (one barrier per k step);
  clamped unconditional global loads; unsigned indices (no wraparound selects). 218
  registers at 256 threads, 33.8 KB shared memory, no spills; its k loop issues 64 FMAs in
  88 PTX instructions (v1: 64 in 162; ptx family). Verdict (H200): 6.05 ms at 4096^3 at
  (128, 128, 16, 8, 8), 34.0% of the FP32 peak (goal 40%: not met), 3.3x v1's speed, 0.49x
  torch.matmul's; at 1024 x 512 x 1536 and 1024 x 2048 x 512 with (64, 64, 16, 4, 4), the
  tiling the default picks there, 0.26 and 0.20 ms (0.25x and 0.34x torch.matmul's speed).
  The peers study: time ratio to torch.matmul 2.10 [2.10, 2.13] at 4096^3, 2.33 [2.31, 2.35]
  at 8192 x 512 x 2048. In a base forward pass (B=8, n=128, caching pool off; ``--family
  forward``, dev/cuda/gpu/forward.csv) it took 29.1 ms against 34.9 ms with ``cupy``.

Backward (``linear_backward``; after the forward below): dx = dy W and dW = dy^T x through
the backend's GEMM, db by a column-sum kernel. With ``cupy`` both products are cuBLAS calls
(``_cublas.gemm_into``: any transposes, one call each). With ``numba`` dx is the tiled GEMM
without transpose and dW the tiled GEMM reading A transposed (``trans_a``: its slab loads
walk A's contiguous axis, coalesced), its rows (the reduction axis) split into batches when
the (out, in) output alone has fewer tiles than ``Tuning.min_blocks`` (a 512 x 512 weight is
16 tiles of 128 x 128 on 132 SMs), the partial products summed in a fixed order (no
atomics). Verdicts: both correct on the H200 (2048 x 512 -> 2048, results/gpu/correctness.csv);
not timed on their own. A base training step (B=8, n=128; ``python3 -m dev.cuda.lab --out DIR
--family backward``, dev/cuda/gpu/backward.csv) took 138.9 ms with ``cupy`` (IQR 188.5 ms)
and 179.3 ms with ``numba``, eager PyTorch 47.5 ms.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda, uint64

from ._cublas import linear_into
from ._launch import SHARED_BYTES_LIMIT, cdiv, gemm_shared_bytes, grid_1d, launch, numba_dtype
from ._views import c_view

GEMM_VERSIONS = {1: "v1: single-buffered slabs, interleaved register tile, scalar shared loads",
                 2: "v2: 4 x 4 register blocks with 16-byte shared loads, next slab prefetched into "
                    "registers, double-buffered slabs, clamped unsigned global loads"}

VARIANTS = {
    "cupy": "cuBLAS sgemm/dgemm through CuPy's raw bindings, then a bias + activation kernel; "
            "backward: two cuBLAS calls and a column-sum kernel",
    "numba_v1": "tiled shared-memory GEMM, fused bias + activation; " + GEMM_VERSIONS[1],
    "numba_v2": "tiled shared-memory GEMM, fused bias + activation; " + GEMM_VERSIONS[2],
}

# Tilings (BM, BN, BK, TM, TN) the lab times (dev/cuda/lab.py, family "gemm"); the first two
# are Tuning's defaults; tests/test_cuda_ptx.py compiles each of them for sm_90.
TILINGS = ((128, 128, 16, 8, 8), (64, 64, 16, 4, 4), (128, 64, 16, 8, 4))

ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2}
_SQRT1_2 = 1.0 / math.sqrt(2.0)


def _make_act(dt):
    """Device function ``act(v, code)`` for dtype ``dt`` (code 0 none, 1 relu, 2 exact gelu)."""
    half, one, zero, inv_sqrt2 = dt(0.5), dt(1.0), dt(0.0), dt(_SQRT1_2)

    @cuda.jit(device=True)
    def act(v, code):
        if code == 1:
            return v if v > zero else zero
        if code == 2:
            return half * v * (one + math.erf(v * inv_sqrt2))
        return v

    return act


@lru_cache(maxsize=None)
def gemm_kernel(dtype, bm, bn, bk, tm, tn, trans_b: bool, act_code: int, has_bias: bool, version: int = 1,
                trans_a: bool = False):
    """The GEMM kernel of ``version`` (``GEMM_VERSIONS``) for these compile-time constants;
    ``trans_a``: A is given as (Z, K, M) and used transposed (the backward's dW = dY^T X)."""
    if version == 2:  # Tuning checks that TM and TN are multiples of 4
        return _gemm_v2(dtype, bm, bn, bk, tm, tn, trans_b, act_code, has_bias, trans_a)
    return _gemm_v1(dtype, bm, bn, bk, tm, tn, trans_b, act_code, has_bias, trans_a)


@lru_cache(maxsize=None)
def _gemm_v2(dtype, bm, bn, bk, tm, tn, trans_b: bool, act_code: int, has_bias: bool, trans_a: bool = False):
    """v2 of :func:`_gemm_v1`'s product: same operands, launch and results.

    * The thread tile is (TM/4) x (TN/4) blocks of 4 x 4: rows ``4*ty + r + g*4*TY`` and
      columns ``4*tx + c + g*4*TX``, so each k step reads 4 consecutive floats of a slab row
      per block: one 16-byte shared load (the slabs are 16-byte aligned, rows padded by 4).
    * The next BK slab is loaded from global memory into registers while the current one is
      multiplied, then stored to the other half of a double-buffered slab: one barrier per
      k step, and the global latency hides behind TM x TN x BK FMAs.
    * Global loads are unconditional at clamped indices (the row of A past M repeats row
      M - 1, whose products are never stored; a k past K is zeroed by a select), and every
      index is unsigned, so numba emits no negative-index wraparound selects.
    """
    dt = numba_dtype(dtype)
    act = _make_act(dt)
    ty_n, tx_n = bm // tm, bn // tn
    nt = ty_n * tx_n
    gm, gn = tm // 4, tn // 4
    lda, ldb = bm + 4, bn + 4  # slab row lengths: 16-byte aligned rows, and fewer bank conflicts
    a_half, b_half = bk * lda, bk * ldb
    a_size, b_size = 2 * a_half, 2 * b_half  # shapes must be compile-time constants
    a_loads, b_loads = cdiv(bm * bk, nt), cdiv(bn * bk, nt)
    zero = dt(0.0)

    @cuda.jit(cache=True)
    def gemm(a, b, bias, c, m, n, k, alpha):
        a_s = cuda.shared.array(a_size, dt, alignment=16)
        b_s = cuda.shared.array(b_size, dt, alignment=16)
        acc = cuda.local.array((tm, tn), dt)
        a_r = cuda.local.array(tm, dt)
        b_r = cuda.local.array(tn, dt)
        pa = cuda.local.array(a_loads, dt)
        pb = cuda.local.array(b_loads, dt)
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        m0 = cuda.blockIdx.y * bm
        n0 = cuda.blockIdx.x * bn
        z = uint64(cuda.blockIdx.z)
        m_last = m - 1
        n_last = n - 1
        k_last = k - 1
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = zero

        n_tiles = (k + bk - 1) // bk
        for t in range(n_tiles + 1):
            k0 = t * bk
            if t < n_tiles:  # the slab of step t into registers (step t - 1 is in shared memory)
                for load in range(a_loads):
                    idx = tid + load * nt
                    if trans_a:  # A is (K, M): walk M, the contiguous axis
                        r = idx // bm
                        cc = idx - r * bm
                        v = a[z, uint64(min(k0 + r, k_last)), uint64(min(m0 + cc, m_last))]
                        pa[load] = v if k0 + r < k else zero
                    else:
                        r = idx // bk
                        cc = idx - r * bk
                        v = a[z, uint64(min(m0 + r, m_last)), uint64(min(k0 + cc, k_last))]
                        pa[load] = v if k0 + cc < k else zero
                for load in range(b_loads):
                    idx = tid + load * nt
                    if trans_b:  # B is (N, K): walk K, the contiguous axis
                        r = idx // bk
                        cc = idx - r * bk
                        v = b[z, uint64(min(n0 + r, n_last)), uint64(min(k0 + cc, k_last))]
                        pb[load] = v if k0 + cc < k else zero
                    else:  # B is (K, N): walk N
                        r = idx // bn
                        cc = idx - r * bn
                        v = b[z, uint64(min(k0 + r, k_last)), uint64(min(n0 + cc, n_last))]
                        pb[load] = v if k0 + r < k else zero
            if t > 0:  # multiply the slab of step t - 1
                # offsets kept visibly multiples of 4, so that the compiler proves the 16-byte
                # alignment its vector loads need
                prev = uint64((t - 1) & 1)
                a0 = prev * uint64(a_half) + uint64(4 * ty)
                b0 = prev * uint64(b_half) + uint64(4 * tx)
                for kk in range(bk):
                    ao = a0 + uint64(kk * lda)
                    bo = b0 + uint64(kk * ldb)
                    for g in range(gm):
                        for r in range(4):
                            a_r[4 * g + r] = a_s[ao + uint64(4 * ty_n * g + r)]
                    for g in range(gn):
                        for r in range(4):
                            b_r[4 * g + r] = b_s[bo + uint64(4 * tx_n * g + r)]
                    for i in range(tm):
                        for j in range(tn):
                            acc[i, j] += a_r[i] * b_r[j]
            if t < n_tiles:  # registers -> the other half of the slabs
                half = t & 1
                for load in range(a_loads):
                    idx = tid + load * nt
                    if idx < bm * bk:
                        if trans_a:
                            r = idx // bm
                            a_s[uint64(half * a_half + r * lda + idx - r * bm)] = pa[load]
                        else:
                            r = idx // bk
                            a_s[uint64(half * a_half + (idx - r * bk) * lda + r)] = pa[load]
                for load in range(b_loads):
                    idx = tid + load * nt
                    if idx < bn * bk:
                        if trans_b:
                            r = idx // bk
                            b_s[uint64(half * b_half + (idx - r * bk) * ldb + r)] = pb[load]
                        else:
                            r = idx // bn
                            b_s[uint64(half * b_half + r * ldb + idx - r * bn)] = pb[load]
            cuda.syncthreads()
        for i in range(tm):
            row = m0 + 4 * ty + (i // 4) * 4 * ty_n + i % 4
            if row < m:
                for j in range(tn):
                    col = n0 + 4 * tx + (j // 4) * 4 * tx_n + j % 4
                    if col < n:
                        v = alpha * acc[i, j]
                        if has_bias:
                            v += bias[col]
                        c[z, uint64(row), uint64(col)] = act(v, act_code)

    return gemm


@lru_cache(maxsize=None)
def _gemm_v1(dtype, bm, bn, bk, tm, tn, trans_b: bool, act_code: int, has_bias: bool, trans_a: bool = False):
    """C[z] = alpha * op(A[z]) @ op(B[z]) (+ bias) (act) for 3-D operands.

    A (Z, M, K), or (Z, K, M) used transposed if trans_a; B (Z, N, K) if trans_b else
    (Z, K, N); C (Z, M, N); bias (N,).
    Launch: grid (cdiv(N, bn), cdiv(M, bm), Z), block (bm/tm)*(bn/tn) threads.
    """
    dt = numba_dtype(dtype)
    act = _make_act(dt)
    ty_n, tx_n = bm // tm, bn // tn
    nt = ty_n * tx_n
    a_loads, b_loads = cdiv(bm * bk, nt), cdiv(bn * bk, nt)
    a_shape, b_shape = (bk, bm + 1), (bk, bn + 1)  # shapes must be compile-time constants

    @cuda.jit(cache=True)
    def gemm(a, b, bias, c, m, n, k, alpha):
        a_s = cuda.shared.array(a_shape, dt)
        b_s = cuda.shared.array(b_shape, dt)
        acc = cuda.local.array((tm, tn), dt)
        a_r = cuda.local.array(tm, dt)
        b_r = cuda.local.array(tn, dt)
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        m0 = cuda.blockIdx.y * bm
        n0 = cuda.blockIdx.x * bn
        z = cuda.blockIdx.z
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = dt(0.0)
        for k0 in range(0, k, bk):
            for load in range(a_loads):
                idx = tid + load * nt
                if idx < bm * bk:
                    v = dt(0.0)
                    if trans_a:  # A is (K, M): walk M, the contiguous axis
                        r = idx // bm
                        cc = idx % bm
                        if k0 + r < k and m0 + cc < m:
                            v = a[z, k0 + r, m0 + cc]
                        a_s[r, cc] = v
                    else:
                        r = idx // bk
                        cc = idx % bk
                        if m0 + r < m and k0 + cc < k:
                            v = a[z, m0 + r, k0 + cc]
                        a_s[cc, r] = v
            for load in range(b_loads):
                idx = tid + load * nt
                if idx < bn * bk:
                    v = dt(0.0)
                    if trans_b:  # B is (N, K): walk K, the contiguous axis
                        r = idx // bk
                        cc = idx % bk
                        if n0 + r < n and k0 + cc < k:
                            v = b[z, n0 + r, k0 + cc]
                        b_s[cc, r] = v
                    else:  # B is (K, N): walk N
                        r = idx // bn
                        cc = idx % bn
                        if k0 + r < k and n0 + cc < n:
                            v = b[z, k0 + r, n0 + cc]
                        b_s[r, cc] = v
            cuda.syncthreads()
            for kk in range(bk):
                for i in range(tm):
                    a_r[i] = a_s[kk, ty + i * ty_n]
                for j in range(tn):
                    b_r[j] = b_s[kk, tx + j * tx_n]
                for i in range(tm):
                    for j in range(tn):
                        acc[i, j] += a_r[i] * b_r[j]
            cuda.syncthreads()
        for i in range(tm):
            row = m0 + ty + i * ty_n
            if row < m:
                for j in range(tn):
                    col = n0 + tx + j * tx_n
                    if col < n:
                        v = alpha * acc[i, j]
                        if has_bias:
                            v += bias[col]
                        c[z, row, col] = act(v, act_code)

    return gemm


@lru_cache(maxsize=None)
def placeholder(dtype):
    """A one-element device array passed where a kernel's optional operand is compiled out."""
    return cuda.to_device(np.zeros(1, dtype=dtype))


@lru_cache(maxsize=1024)
def pick_gemm_tiles(tuning, z: int, m: int, n: int, itemsize: int = 4) -> tuple:
    """The large tile when it still gives ``tuning.min_blocks`` blocks, else the small one;
    BK halved until the slabs fit in 48 KB of shared memory for this itemsize (float64)."""
    bm, bn = tuning.gemm_large[:2]
    tiles = tuning.gemm_large if z * cdiv(m, bm) * cdiv(n, bn) >= tuning.min_blocks else tuning.gemm_small
    bm, bn, bk, tm, tn = tiles
    while gemm_shared_bytes(bm, bn, bk, itemsize) > SHARED_BYTES_LIMIT:
        if bk == 1:
            raise ValueError(f"GEMM tiling {tiles} does not fit {SHARED_BYTES_LIMIT} bytes of shared "
                             f"memory for {itemsize}-byte floats even with BK = 1; use smaller BM, BN")
        bk //= 2
    return bm, bn, bk, tm, tn


def gemm(a, b, c, tuning, *, trans_b: bool, alpha: float = 1.0, bias=None, act=None, trans_a: bool = False) -> None:
    """Batched product into the preallocated 3-D ``c`` (see :func:`gemm_kernel`)."""
    if trans_a:
        z, k, m = a.shape
    else:
        z, m, k = a.shape
    n = b.shape[1] if trans_b else b.shape[2]
    dtype = np.dtype(c.dtype)
    bm, bn, bk, tm, tn = tiles = pick_gemm_tiles(tuning, z, m, n, dtype.itemsize)
    kern = gemm_kernel(dtype, *tiles, bool(trans_b), ACTIVATIONS[act], bias is not None, tuning.gemm_version,
                       bool(trans_a))
    launch("gemm", kern, (cdiv(n, bn), cdiv(m, bm), z), (bm // tm) * (bn // tn),
           a, b, placeholder(dtype) if bias is None else bias, c, m, n, k, dtype.type(alpha))


@lru_cache(maxsize=None)
def _bias_act_kernel(dtype, act_code: int, has_bias: bool):
    act = _make_act(numba_dtype(dtype))

    @cuda.jit(cache=True)
    def bias_act(y, bias):  # in place: y (M, N) = act(y + bias); consecutive threads walk N
        i = cuda.grid(1)
        n = y.shape[1]
        if i < y.shape[0] * n:
            r = i // n
            c = i - r * n
            v = y[r, c]
            if has_bias:
                v += bias[c]
            y[r, c] = act(v, act_code)

    return bias_act


def linear(x, weight, bias, tuning, gemm_impl: str = "numba", act=None):
    """``act(x @ weight.T + bias)`` for x (..., in), weight (out, in) -> (..., out)."""
    x = contiguous(x, tuning)
    lead = tuple(x.shape)[:-1]
    k = tuple(x.shape)[-1]
    m = math.prod(lead)
    n = weight.shape[0]
    dtype = np.dtype(x.dtype)
    out = cuda.device_array((m, n), dtype=dtype)
    if gemm_impl == "cupy":  # cuBLAS, then bias and activation in one elementwise pass
        linear_into(c_view(x, (m, k)), weight, out)
        if bias is not None or act is not None:
            launch("bias_act", _bias_act_kernel(dtype, ACTIVATIONS[act], bias is not None),
                   grid_1d(m * n, tuning.elem_threads), tuning.elem_threads, out,
                   placeholder(dtype) if bias is None else bias)
    else:
        gemm(c_view(x, (1, m, k)), c_view(weight, (1, n, k)), c_view(out, (1, m, n)), tuning,
             trans_b=True, bias=bias, act=act)
    return c_view(out, lead + (n,))


def feed_forward(x, w1, b1, w2, b2, activation_kind, tuning, gemm_impl="numba"):
    """Position-wise FFN (eq. 2): the activation is fused into the first GEMM's epilogue."""
    hidden = linear(x, w1, b1, tuning, gemm_impl, act=activation_kind)
    return linear(hidden, w2, b2, tuning, gemm_impl)


# ---------------------------------------------------------------------- elementwise
@lru_cache(maxsize=None)
def _add_kernel():
    @cuda.jit(cache=True)
    def add_(a, b, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = a[i] + b[i]

    return add_


@lru_cache(maxsize=None)
def _unary_kernel(dtype, act_code: int):
    act = _make_act(numba_dtype(dtype))

    @cuda.jit(cache=True)
    def unary(x, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = act(x[i], act_code)

    return unary


@lru_cache(maxsize=None)
def _cast_kernel():
    @cuda.jit(cache=True)
    def cast(x, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = x[i]

    return cast


@lru_cache(maxsize=None)
def _copy_kernel(ndim: int):
    if ndim == 3:
        @cuda.jit(cache=True)
        def copy3(x, out):
            i = cuda.grid(1)
            n1, n2 = out.shape[1], out.shape[2]
            if i < out.shape[0] * n1 * n2:
                out[i // (n1 * n2), (i // n2) % n1, i % n2] = x[i // (n1 * n2), (i // n2) % n1, i % n2]

        return copy3

    @cuda.jit(cache=True)
    def copy4(x, out):
        i = cuda.grid(1)
        n1, n2, n3 = out.shape[1], out.shape[2], out.shape[3]
        if i < out.shape[0] * n1 * n2 * n3:
            a, b, c, d = i // (n1 * n2 * n3), (i // (n2 * n3)) % n1, (i // n3) % n2, i % n3
            out[a, b, c, d] = x[a, b, c, d]

    return copy4


def contiguous(x, tuning):
    """``x`` itself if C-contiguous, else a contiguous device copy (3-D and 4-D strided views)."""
    if x.is_c_contiguous():
        return x
    if len(x.shape) not in (3, 4):
        raise ValueError(
            f"device array of shape {tuple(x.shape)} with strides {tuple(x.strides)} is not "
            f"C-contiguous; the cuda backend copies only 3-D and 4-D strided views "
            f"(call .contiguous() / cupy.ascontiguousarray first)"
        )
    out = cuda.device_array(tuple(x.shape), dtype=x.dtype)
    launch("contiguous", _copy_kernel(len(x.shape)), grid_1d(out.size, tuning.elem_threads),
           tuning.elem_threads, x, out)
    return out


def add(a, b, tuning):
    out = cuda.device_array(tuple(a.shape), dtype=a.dtype)
    n = out.size
    launch("add", _add_kernel(), grid_1d(n, tuning.elem_threads),
           tuning.elem_threads, c_view(a, (n,)), c_view(b, (n,)), c_view(out, (n,)))
    return out


def activation(x, kind, tuning):
    out = cuda.device_array(tuple(x.shape), dtype=x.dtype)
    n = out.size
    launch(f"activation[{kind}]", _unary_kernel(np.dtype(x.dtype), ACTIVATIONS[kind]),
           grid_1d(n, tuning.elem_threads), tuning.elem_threads, c_view(x, (n,)), c_view(out, (n,)))
    return out


def cast(x, dtype, tuning):
    """A converted copy of a contiguous device array (e.g. float64 -> float32)."""
    out = cuda.device_array(tuple(x.shape), dtype=dtype)
    n = out.size
    launch("cast", _cast_kernel(), grid_1d(n, tuning.elem_threads), tuning.elem_threads,
           c_view(x, (n,)), c_view(out, (n,)))
    return out


# ---------------------------------------------------------------------- backward
# y = x W^T + b:  dx = dy W,  dW = dy^T x (one product over every row),  db = column sums of dy.
# With gemm "cupy" both products are cuBLAS calls (_cublas.gemm_into); with "numba" dx is the
# tiled GEMM without transpose and dW the tiled GEMM with A transposed, split over the rows
# (the reduction axis) into batches when its (out, in) output alone has too few tiles to fill
# the GPU, the partial products then summed in a fixed order (deterministic, no atomics).


@lru_cache(maxsize=None)
def _column_sums_kernel(dtype, nt: int):
    """out[c] = sum over rows of x[r, c] (x (M, N)): 32 columns per block, nt/32 row lanes each
    summing every (nt/32)-th row (a warp reads 32 consecutive columns of one row: coalesced),
    the lanes' partial sums combined in shared memory in a fixed order (deterministic)."""
    dt = numba_dtype(dtype)
    lanes = max(1, nt // 32)
    width = nt // lanes

    @cuda.jit(cache=True)
    def column_sums(x, out):
        part = cuda.shared.array(nt, dt)
        t = cuda.threadIdx.x
        lane = t // width
        col = cuda.blockIdx.x * width + t - lane * width
        n = x.shape[1]
        s = dt(0.0)
        if col < n:
            for r in range(lane, x.shape[0], lanes):
                s += x[r, col]
        part[t] = s
        cuda.syncthreads()
        if lane == 0 and col < n:
            for other in range(1, lanes):
                s += part[other * width + t]
            out[col] = s

    return column_sums


def column_sums(x2, tuning, out=None):
    """Sums over the rows of a 2-D device array x2 (M, N) -> (N,) (a new array unless ``out``)."""
    m, n = x2.shape
    dtype = np.dtype(x2.dtype)
    if out is None:
        out = cuda.device_array(n, dtype=dtype)
    if n == 0:
        return out
    nt = tuning.elem_threads
    width = nt // max(1, nt // 32)
    launch("column_sums", _column_sums_kernel(dtype, nt), (cdiv(n, width),), nt, x2, out)
    return out


@lru_cache(maxsize=None)
def _sum_parts_kernel():
    @cuda.jit(cache=True)
    def sum_parts(parts, out):  # out[i] = sum over s of parts[s, i], s ascending
        i = cuda.grid(1)
        if i < out.shape[0]:
            acc = parts[0, i]
            for s in range(1, parts.shape[0]):
                acc += parts[s, i]
            out[i] = acc

    return sum_parts


def _row_splits(rows: int, out_blocks: int, tuning) -> int:
    """How many batches to split a product's reduction axis of ``rows`` into: enough that
    the output's ``out_blocks`` tiles times the batches reach ``tuning.min_blocks``, each
    batch at least 64 rows, and the count divides ``rows`` (a batch is then a plain view)."""
    want = min(-(-tuning.min_blocks // max(1, out_blocks)), rows // 64)
    for s in range(max(1, want), 1, -1):
        if rows % s == 0:
            return s
    return 1


def gemm_tn(a2, b2, c2, tuning, alpha: float = 1.0) -> None:
    """Numba GEMM ``c2 (M, N) = alpha * a2^T @ b2`` for a2 (R, M), b2 (R, N) contiguous: the
    weight-gradient product, its R rows split into batches when the output is small."""
    r, m = a2.shape
    n = b2.shape[1]
    dtype = np.dtype(c2.dtype)
    bm, bn = pick_gemm_tiles(tuning, 1, m, n, dtype.itemsize)[:2]
    splits = _row_splits(r, cdiv(m, bm) * cdiv(n, bn), tuning) if r else 1
    if splits == 1:
        gemm(c_view(a2, (1, r, m)), c_view(b2, (1, r, n)), c_view(c2, (1, m, n)), tuning, trans_b=False,
             trans_a=True, alpha=alpha)
        return
    parts = cuda.device_array((splits, m, n), dtype=dtype)
    gemm(c_view(a2, (splits, r // splits, m)), c_view(b2, (splits, r // splits, n)), parts, tuning,
         trans_b=False, trans_a=True, alpha=alpha)
    launch("sum_parts", _sum_parts_kernel(), grid_1d(m * n, tuning.elem_threads), tuning.elem_threads,
           c_view(parts, (splits, m * n)), c_view(c2, (m * n,)))


def matmul_into(a2, b2, c2, tuning, gemm_impl: str, *, trans_a: bool = False, trans_b: bool = False,
                alpha: float = 1.0) -> None:
    """``c2 = alpha * op(a2) @ op(b2)`` for contiguous 2-D device arrays, through cuBLAS
    (``gemm_impl`` "cupy") or the Numba GEMM; an empty reduction gives zeros."""
    m, n = c2.shape
    k = a2.shape[0] if trans_a else a2.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        from .training import fill_

        fill_(c2, 0.0, tuning)
        return
    if gemm_impl == "cupy":
        from ._cublas import gemm_into

        gemm_into(a2, b2, c2, trans_a=trans_a, trans_b=trans_b, alpha=alpha)
    elif trans_a and not trans_b:
        gemm_tn(a2, b2, c2, tuning, alpha)
    elif trans_a:
        raise NotImplementedError("the Numba GEMM has no product with both operands transposed")
    else:
        gemm(c_view(a2, (1,) + tuple(a2.shape)), c_view(b2, (1,) + tuple(b2.shape)), c_view(c2, (1, m, n)),
             tuning, trans_b=trans_b, alpha=alpha)


def linear_backward(x, weight, dy, bias, tuning, gemm_impl: str = "numba"):
    """(dx (..., in), dweight (out, in), dbias (out,) or None) of ``x @ weight.T + b``."""
    x = contiguous(x, tuning)
    dy = contiguous(dy, tuning)
    k = tuple(x.shape)[-1]
    n = weight.shape[0]
    lead = tuple(x.shape)[:-1]
    m = math.prod(lead)
    if tuple(dy.shape) != lead + (n,):
        raise ValueError(f"linear_backward: dy must have shape {lead + (n,)}, got {tuple(dy.shape)}")
    dtype = np.dtype(x.dtype)
    x2, dy2 = c_view(x, (m, k)), c_view(dy, (m, n))
    dx = cuda.device_array((m, k), dtype=dtype)
    dw = cuda.device_array((n, k), dtype=dtype)
    matmul_into(dy2, weight, dx, tuning, gemm_impl)  # dx = dy W
    matmul_into(dy2, x2, dw, tuning, gemm_impl, trans_a=True)  # dW = dy^T x
    db = column_sums(dy2, tuning) if bias else None
    return c_view(dx, lead + (k,)), dw, db


@lru_cache(maxsize=None)
def _activation_backward_kernel(dtype, act_code: int):
    dt = numba_dtype(dtype)
    half, one, zero = dt(0.5), dt(1.0), dt(0.0)
    inv_sqrt2, inv_sqrt_2pi = dt(_SQRT1_2), dt(1.0 / math.sqrt(2.0 * math.pi))

    @cuda.jit(cache=True)
    def act_backward(x, dy, dx):
        i = cuda.grid(1)
        if i < x.shape[0]:
            v = x[i]
            if act_code == 1:  # relu: 0 at x = 0, as PyTorch
                dx[i] = dy[i] if v > zero else zero
            else:  # exact gelu: Phi(x) + x phi(x)
                cdf = half * (one + math.erf(v * inv_sqrt2))
                dx[i] = dy[i] * (cdf + v * math.exp(-half * v * v) * inv_sqrt_2pi)

    return act_backward


def activation_backward(x, dy, kind, tuning):
    """dx of ``activation(x, kind)`` given dy (x: the activation's input)."""
    if kind not in ("relu", "gelu"):
        raise ValueError(f"unknown activation {kind!r}; choose relu or gelu")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"activation_backward: dy {tuple(dy.shape)} does not match x {tuple(x.shape)}")
    x, dy = contiguous(x, tuning), contiguous(dy, tuning)
    dx = cuda.device_array(tuple(x.shape), dtype=x.dtype)
    n = x.size
    if n:
        launch(f"activation_backward[{kind}]", _activation_backward_kernel(np.dtype(x.dtype), ACTIVATIONS[kind]),
               grid_1d(n, tuning.elem_threads), tuning.elem_threads, c_view(x, (n,)), c_view(dy, (n,)),
               c_view(dx, (n,)))
    return dx
