"""Lab: scaled dot-product attention on the CPU (``tfm/backends/cpu/attention.py``): the naive
kernel, the fused kernel's versions 1..5, its tile sizes, its gemm-only ceiling, and the
paired tfm / PyTorch SDPA ratio.

    python -m dev.cpu.attention [--out DIR] [--quick]    (part of python -m dev.cpu.run_all)

float32, B=1, H=8, d=64, Numba's threads (2 here) each calling single-threaded OpenBLAS,
against ``torch.nn.functional.scaled_dot_product_attention`` on as many PyTorch threads.
Every variant is checked against the float64 reference on awkward sizes first, timed
interleaved, and its timed output checked again. Writes DIR/attention.csv and
DIR/attention_check.csv.

The fused versions are one parametrised kernel (``_lab_kernel``) with the library's loop
structure; v6's settings are the library's, and v6 against the library's own kernel
("library fused") shows how faithful the frame is.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import numba
import numpy as np
from numba import njit, prange

from tfm.backends.cpu import attention as att
from tfm.backends.cpu._blas import N as _N
from tfm.backends.cpu._blas import T as _T
from tfm.backends.cpu._blas import gemm
from tfm.backends.cpu._threads import _blas_libraries, single_threaded_blas
from tfm.backends.cpu.fastmath import maxnum
from tfm.backends.cpu.norm import exp2_shift_sum, exp_shift_sum, row_max
from tfm.reference import scaled_dot_product_attention as reference

from .common import check, compare, interleave, main, print_rows, rel_err, torch_threads
from .fastmath import _exp_one_loop, _max_scalar

# Versions of the fused kernel, oldest first: (tile_q, tile_k, causal diagonal rows per chunk
# (0: the whole tile_q block at once), exp form, vectorised row max).
EXP_ONE_LOOP, EXP_THEN_SUM, EXP2_THEN_SUM = 0, 1, 2
VERSIONS = {
    "v1": (128, 256, 0, EXP_ONE_LOOP, False),
    "v2": (128, 256, 0, EXP_ONE_LOOP, True),
    "v3": (256, 1024, 0, EXP_ONE_LOOP, True),
    "v4": (256, 1024, 0, EXP_THEN_SUM, True),
    "v5": (256, 1024, 0, EXP2_THEN_SUM, True),
    "v6": (att.TILE_Q, att.TILE_K, att.DIAG_ROWS, EXP2_THEN_SUM, True),
}
VARIANTS = {
    "naive": "the library's naive kernel: the full (Nq, Nk) score matrix per head, 2 gemms",
    "v1": "fused, 128 x 256 tiles, scalar row max, exp and its float64 sum in one loop",
    "v2": "v1 with the row max as llvm.maxnum (vectorised)",
    "v3": "v2 with 256 x 1024 tiles (fewer, larger gemms)",
    "v4": "v3 with the exp loop and the sum loop apart (norm.exp_shift_sum)",
    "v5": "v4 with scores in log2 units (log2(e) folded into the gemm's alpha) and 2**x",
    "v6": "v5 with 512-row query tiles and the causal diagonal in 128-row chunks: the "
          "library's settings (\"library fused\": the library's own kernel)",
}
B, H, D = 1, 8, 64
_NO_MASK = np.ones(1, np.bool_)
_LOG2E = 1.4426950408889634


@njit(cache=True)
def _lab_block(q, k, v, causal, o, lds, scale, s, ld_s, m_run, l_run, b, h, i0, r0, r1, j0, j1,
               exp_form, vector_max, softmax):
    """One online-softmax step of the lab kernel (the library's ``_fused_block`` with the
    version's exp form and row max; ``softmax=False`` keeps only the two gemms)."""
    ldq, ldk, ldv, ldo = lds
    rows, tk = r1 - r0, j1 - j0
    consts = np.array([scale, 1.0, 0.0], q.dtype)  # gemm's alpha, one, zero
    gemm(_T, _N, tk, rows, q.shape[3], consts[0:], k[b, h, j0:j1], ldk, q[b, h, i0 + r0:i0 + r1],
         ldq, consts[2:], s, ld_s)
    for rr in range(rows if softmax else 0):
        row, r = s[rr], r0 + rr
        att._mask_row(row, tk, _NO_MASK, False, j0, i0 + r if causal else j1)
        m_new = maxnum(row_max(row, tk) if vector_max else _max_scalar(row, tk), m_run[r])
        if m_new == -np.inf:
            row[:tk] = 0
            continue
        if exp_form == EXP2_THEN_SUM:
            l_tile, c = exp2_shift_sum(row, tk, m_new), 2.0 ** (m_run[r] - m_new)
        elif exp_form == EXP_THEN_SUM:
            l_tile, c = exp_shift_sum(row, tk, m_new), math.exp(m_run[r] - m_new)
        else:
            l_tile, c = _exp_one_loop(row, tk, m_new), math.exp(m_run[r] - m_new)
        l_run[r] = l_run[r] * c + l_tile
        m_run[r] = m_new
        if c != 1:
            o[r] *= q.dtype.type(c)
    gemm(_N, _N, v.shape[3], rows, tk, consts[1:], v[b, h, j0:j1], ldv, s, ld_s, consts[1:],
         o[r0:r1], ldo)


@njit(cache=True, parallel=True)
def _lab_kernel(q, k, v, causal, out, tile_q, tile_k, diag_rows, exp_form, vector_max, softmax):
    """The fused kernel of one version (contiguous (B, H, N, D) operands, no padding mask).

    As in the library: work items are (b, h, query tiles t and T-1-t under ``causal``); keys
    below the tile go in ``tile_k`` blocks, the diagonal block in ``diag_rows`` chunks (0: as
    one block, each row masked at its own position).
    """
    nb, nh, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    log2 = exp_form == EXP2_THEN_SUM
    scale = q.dtype.type((_LOG2E if log2 else 1.0) / math.sqrt(d))
    lds = (d, d, dv, dv)
    n_tiles = (nq + tile_q - 1) // tile_q
    per_head = (n_tiles + 1) // 2 if causal else n_tiles
    chunk = diag_rows if diag_rows > 0 else tile_q
    ld_s = max(min(tile_k, nk), min(tile_q, nk) if causal else 1, 1)
    for item in prange(nb * nh * per_head):
        b, h, first = item // (nh * per_head), (item // per_head) % nh, item % per_head
        s = np.empty((max(min(tile_q, nq), 1), ld_s), q.dtype)
        m_run = np.empty(tile_q, q.dtype)
        l_run = np.empty(tile_q, np.float64)
        tiles = (first, n_tiles - 1 - first) if causal and n_tiles - 1 - first != first else (first, -1)
        for t in tiles:
            if t < 0:
                continue
            i0 = t * tile_q
            tq = min(nq, i0 + tile_q) - i0
            o = out[b, h, i0:i0 + tq]
            o[:] = 0
            m_run[:] = -np.inf
            l_run[:] = 0
            below = min(nk, i0) if causal else nk
            for j0 in range(0, below, tile_k):
                _lab_block(q, k, v, False, o, lds, scale, s, ld_s, m_run, l_run, b, h, i0, 0, tq,
                           j0, min(below, j0 + tile_k), exp_form, vector_max, softmax)
            for r0 in range(0, tq if causal else 0, chunk):
                r1 = min(tq, r0 + chunk)
                if min(nk, i0 + r1) > i0:
                    _lab_block(q, k, v, True, o, lds, scale, s, ld_s, m_run, l_run, b, h, i0, r0,
                               r1, i0, min(nk, i0 + r1), exp_form, vector_max, softmax)
            for r in range(tq):
                o[r] *= q.dtype.type(1.0 / l_run[r] if l_run[r] > 0 else 0.0)


def _version(name, q, k, v, causal, out, softmax=True):
    tile_q, tile_k, diag, exp_form, vmax = VERSIONS[name]

    def run():
        with single_threaded_blas():
            _lab_kernel(q, k, v, causal, out, tile_q, tile_k, diag, exp_form, vmax, softmax)
        return out

    return run


def _library(q, k, v, causal, out, impl="fused", tiles=(att.TILE_Q, att.TILE_K)):
    """The library's kernel itself, into a preallocated output (as the lab versions); its
    gemms single-threaded unless ``blas=True`` (the thread count is then the caller's)."""
    keep = np.broadcast_to(att._NO_MASK, q.shape[:3] + (k.shape[2],))
    args = (q, k, v, keep, False, causal, out, q.shape[3], k.shape[3], v.shape[3], v.shape[3])

    def run(blas=False):
        with contextlib.nullcontext() if blas else single_threaded_blas():
            if impl == "naive":
                att._naive_kernel(*args)
            else:
                att._fused_kernel(*args, *tiles)
        return out

    return run


def _qkv(rng, nq, nk, dk=D, dv=D, h=H):
    return (rng.standard_normal((B, h, n, d)).astype(np.float32) for n, d in ((nq, dk), (nk, dk), (nk, dv)))


def run_checks(rng) -> list[dict]:
    """Every version and the library's kernels on sizes that are not multiples of any tile."""
    rows: list[dict] = []
    for nq, nk, dk, dv, h in ((37, 37, 64, 64, 3), (97, 1025, 64, 32, 3), (1025, 1025, 64, 64, 1),
                              (300, 130, 16, 8, 2)):
        q, k, v = _qkv(rng, nq, nk, dk, dv, h)
        for causal in (False, True):
            want = reference(q, k, v, causal=causal)
            label = f"Nq={nq} Nk={nk} d_k={dk} d_v={dv} H={h}{' causal' if causal else ''}"
            runs = {name: _version(name, q, k, v, causal, np.full(want.shape, np.nan, np.float32))
                    for name in VERSIONS}
            for impl in ("naive", "fused"):
                runs[f"library {impl}"] = _library(q, k, v, causal,
                                                   np.full(want.shape, np.nan, np.float32), impl)
            for name, run in runs.items():
                check(f"attention {name}, {label}", rel_err(run(), want), 2e-5, rows)
    return rows


def _check_timed(label, outs: dict, q, k, v, causal, checks) -> None:
    """The timed outputs against the reference on head 0's first (and, without the causal
    mask, last) 256 query rows."""
    nq = q.shape[2]
    parts = [slice(0, min(nq, 256))] + ([] if causal or nq <= 256 else [slice(nq - 256, nq)])
    for part in parts:
        want = reference(q[:, :1, part], k[:, :1], v[:, :1], causal=causal)
        for name, out in outs.items():
            check(f"attention {name}, {label}, rows {part.start}-{part.stop}, after timing",
                  rel_err(out[:, :1, part], want), 2e-5, checks)


def _flops(n, causal):
    return 4 * B * H * n * n * D / (2 if causal else 1)


def versions(rng, quick, checks) -> list[dict]:
    rows = []
    for n in (1024,) if quick else (1024, 4096):
        q, k, v = _qkv(rng, n, n)
        for causal in (False, True):
            label = f"n={n}{' causal' if causal else ''}"
            outs = {name: np.empty((B, H, n, D), np.float32) for name in ("naive", *VERSIONS, "library fused")}
            fns = {name: _version(name, q, k, v, causal, outs[name]) for name in VERSIONS}
            fns["naive"] = _library(q, k, v, causal, outs["naive"], "naive")
            fns["library fused"] = _library(q, k, v, causal, outs["library fused"])
            times = interleave(fns, budget_s=1.0 if quick else (12.0 if n > 2048 else 4.0),
                               min_rounds=3 if quick else 7)
            _check_timed(label, outs, q, k, v, causal, checks)
            extra = {name: {"gflops": _flops(n, causal) / np.median(t) / 1e9} for name, t in times.items()}
            got = compare("attention", f"versions, {label}", times, "library fused", extra)
            print_rows(got)
            rows += got
    return rows


def tiles(rng, quick, checks) -> list[dict]:
    """The library's fused kernel at other tile sizes (n=4096, no mask)."""
    n = 1024 if quick else 4096
    q, k, v = _qkv(rng, n, n)
    sizes = ((512, 1024), (256, 256), (256, 1024), (512, 512), (1024, 1024))
    outs = {f"{tq} x {tk}": np.empty((B, H, n, D), np.float32) for tq, tk in sizes}
    fns = {name: _library(q, k, v, False, outs[name], tiles=size) for name, size in zip(outs, sizes)}
    times = interleave(fns, budget_s=1.0 if quick else 10.0, min_rounds=3 if quick else 7)
    _check_timed(f"n={n}", outs, q, k, v, False, checks)
    extra = {name: {"gflops": _flops(n, False) / np.median(t) / 1e9} for name, t in times.items()}
    rows = compare("attention", f"tiles (query x key rows), n={n}", times, "512 x 1024", extra)
    print_rows(rows)
    return rows


def gemm_ceiling(rng, quick, checks) -> list[dict]:
    """The library's kernel against the same loop with only its two gemms (v6 in the lab frame, no
    mask, no softmax): what the softmax adds on top of OpenBLAS."""
    n = 1024 if quick else 4096
    q, k, v = _qkv(rng, n, n)
    out, scratch = np.empty((B, H, n, D), np.float32), np.empty((B, H, n, D), np.float32)
    fns = {"library fused": _library(q, k, v, False, out),
           "gemms only": _version("v6", q, k, v, False, scratch, softmax=False)}
    times = interleave(fns, budget_s=1.0 if quick else 6.0, min_rounds=3 if quick else 7)
    _check_timed(f"n={n}", {"library fused": out}, q, k, v, False, checks)
    extra = {name: {"gflops": _flops(n, False) / np.median(t) / 1e9} for name, t in times.items()}
    rows = compare("attention", f"gemm ceiling, n={n}", times, "gemms only", extra)
    print_rows(rows)
    return rows


@contextlib.contextmanager
def _stderr_to_devnull():
    """OpenBLAS warns on stderr at every call it makes inside an OpenMP region ("Detect
    OpenMP Loop"): thousands of lines for the oversubscribed variant."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _threads(kernel, numba_threads, blas_threads):
    """``kernel`` (a ``_library`` run) on the given Numba and BLAS thread counts. BLAS is set
    through the libraries' own setters (``_threads``), not a threadpoolctl limiter, whose
    library scan costs ~1 ms, more than a small call itself."""
    def run():
        previous = numba.get_num_threads()
        saved = [lib.get_num_threads() for lib in _blas_libraries()]
        numba.set_num_threads(numba_threads)
        for lib in _blas_libraries():
            lib.set_num_threads(blas_threads)
        try:
            return kernel(blas=blas_threads > 1)
        finally:
            numba.set_num_threads(previous)
            for lib, n in zip(_blas_libraries(), saved):
                lib.set_num_threads(n)

    return run


def threads(rng, quick, checks) -> list[dict]:
    """Who runs the gemms (``_threads``): Numba's threads each calling one-thread BLAS, one
    Numba thread calling multi-threaded BLAS, or both (oversubscribed); and a decoding-step
    call (one query, 100 keys) on one thread (what ``SMALL_FLOPS`` picks) against two."""
    most = numba.get_num_threads()
    rows = []
    n = 1024
    q, k, v = _qkv(rng, n, n)
    outs = {name: np.empty((B, H, n, D), np.float32)
            for name in (f"{most} Numba x 1 BLAS (library)", f"1 Numba x {most} BLAS",
                         f"{most} Numba x {most} BLAS")}
    counts = ((most, 1), (1, most), (most, most))
    fns = {name: _threads(_library(q, k, v, False, out), *c) for (name, out), c in zip(outs.items(), counts)}
    with _stderr_to_devnull():
        times = interleave(fns, budget_s=1.0 if quick else 4.0, min_rounds=3 if quick else 7)
    _check_timed(f"n={n}", outs, q, k, v, False, checks)
    got = compare("attention", f"threads, n={n}", times, f"{most} Numba x 1 BLAS (library)")
    print_rows(got)
    rows += got
    q, k, v = _qkv(rng, 1, 100)
    outs = {"1 thread (library)": np.empty((B, H, 1, D), np.float32),
            f"{most} threads": np.empty((B, H, 1, D), np.float32)}
    fns = {name: _threads(_library(q, k, v, False, out), t, 1) for (name, out), t in zip(outs.items(), (1, most))}
    times = interleave(fns, budget_s=0.3 if quick else 2.0, min_rounds=20, max_rounds=5000)
    _check_timed("Nq=1 Nk=100", outs, q, k, v, False, checks)
    got = compare("attention", "threads, one query x 100 keys", times, "1 thread (library)")
    print_rows(got)
    return rows + got


def versus_sdpa(rng, quick, checks) -> list[dict]:
    """tfm.attention (fused) against torch's SDPA, alternating, same threads; the quoted
    figure is the median of the per-round ratios tfm / SDPA with its bootstrap interval."""
    rows = []
    with torch_threads(numba.get_num_threads()) as torch:
        if torch is None:
            return rows
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for n in (1024,) if quick else (1024, 4096):
            q, k, v = _qkv(rng, n, n)
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            for causal in (False, True):
                label = f"n={n}{' causal' if causal else ''}"
                outs = {}

                def tfm_run():
                    outs["tfm fused"] = att.attention(q, k, v, causal=causal)

                def sdpa_run():
                    with torch.inference_mode():
                        outs["torch SDPA"] = sdpa(tq, tk, tv, is_causal=causal).numpy()

                budget = 1.0 if quick else (10.0 if n > 2048 else 3.0)
                times = interleave({"tfm fused": tfm_run, "torch SDPA": sdpa_run}, budget_s=budget,
                                   min_rounds=5 if quick else 15)
                _check_timed(label, outs, q, k, v, causal, checks)
                extra = {name: {"gflops": _flops(n, causal) / np.median(t) / 1e9,
                                "torch_threads": torch.get_num_threads()} for name, t in times.items()}
                got = compare("attention", f"vs SDPA, {label}", times, "torch SDPA", extra)
                print_rows(got)
                rows += got
    return rows


PARTS = (versus_sdpa, versions, tiles, gemm_ceiling, threads)

if __name__ == "__main__":
    raise SystemExit(main("attention", PARTS, run_checks, __doc__))
