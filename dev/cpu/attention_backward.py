"""Lab: the backward of scaled dot-product attention on the CPU (``tfm/backends/cpu/attention.py``,
``attention_backward``): the paired tfm / PyTorch SDPA-backward ratio (``versus_sdpa``), where
the fused kernel's time goes (gemms against elementwise work, against square sgemms of the
same FLOPs on the same threading and the NumPy sgemm ceiling: ``ceiling``; each product of
the block step on one thread: ``gemm_shapes``), naive against fused (``versions``), tile
sizes and causal diagonal chunks (``tiles``), the forward with and without the saved
log-sum-exp (``forward_lse``), and the memory of one call, naive against fused (``memory``).

    python -m dev.cpu.attention_backward [--out DIR] [--quick]

float32, B=1, H=8, d=64, Numba's threads (2 here) each calling single-threaded OpenBLAS,
against ``torch.autograd.grad`` of ``torch.nn.functional.scaled_dot_product_attention``
(PyTorch's CPU flash-attention backward) on as many PyTorch threads. Every variant is
checked against the float64 reference (``tfm.reference.scaled_dot_product_attention_backward``)
on awkward sizes first, timed interleaved, and its timed output checked again. Writes
DIR/attention_backward.csv, DIR/attention_backward_check.csv and
DIR/attention_backward_memory.csv.

The "gemms only" and "elementwise only" variants are the library's loop (``_lab_kernel``, a
copy of ``_fused_backward_kernel`` without masks) with one half of each block step left out:
the five gemms alone show the ceiling the elementwise work (recomputing P with 2**x, dS =
P (dP - D)) is added to.
"""

from __future__ import annotations

import math
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from tfm import cost
from tfm.backends.cpu import attention as att
from tfm.backends.cpu._blas import N as _N
from tfm.backends.cpu._blas import T as _T
from tfm.backends.cpu._blas import gemm
from tfm.backends.cpu._threads import single_threaded_blas
from tfm.backends.cpu.norm import exp2_shift
from tfm.reference import scaled_dot_product_attention_backward as reference_backward
from tfm.reference import scaled_dot_product_attention_train as reference_train

from .common import (check, compare, interleave, parse_out, print_rows, rel_err, run_family, torch_threads,
                     write_csv)

VARIANTS = {
    "naive": "per (b, h): S and dP as full (Nq, Nk) matrices, five gemms over them",
    "fused": "FlashAttention-2's backward: key blocks of BWD_TILE_K keys (dK, dV accumulate "
             "over the block's query steps of BWD_TILE_Q rows; dQ over the key blocks), P "
             "recomputed from lse, causal blocks skipped and the diagonal in 128-row chunks",
    "gemms only": "the fused loop with its five gemms and nothing else (the ceiling)",
    "elementwise only": "the fused loop with only its elementwise work (2**x of the scores, "
                        "dS = P (dP - D))",
}
B, H, D = 1, 8, 64
# (query rows per step, keys per block[, causal diagonal rows per chunk]); the first: the library's
TILES = ((att.BWD_TILE_Q, att.BWD_TILE_K), (128, 512), (256, 256), (256, 1024), (512, 512),
         (512, 1024), (128, 256), (att.BWD_TILE_Q, att.BWD_TILE_K, 128),
         (att.BWD_TILE_Q, att.BWD_TILE_K, 32))
_LOG2E = 1.4426950408889634


@njit(cache=True)
def _lab_block(q, k, v, do, causal, dq, dk, dv, consts, s, dp, lse2, drow, b, h, i0, i1, j0, j1,
               gemms, elementwise):
    """``att._backward_block`` on contiguous operands without a padding mask; ``gemms`` and
    ``elementwise`` switch its two halves."""
    d, dv_ = q.shape[3], v.shape[3]
    rows, tk = i1 - i0, j1 - j0
    ld_s = s.shape[1]
    if gemms:
        gemm(_T, _N, tk, rows, d, consts[0:], k[b, h, j0:], d, q[b, h, i0:], d, consts[2:], s, ld_s)
    if elementwise:
        for r in range(rows):
            row = s[r]
            att._mask_row(row, tk, att._NO_MASK[0, 0, 0], False, j0, i0 + r if causal else j1)
            exp2_shift(row, tk, lse2[i0 + r])
    if gemms:
        gemm(_N, _T, dv_, tk, rows, consts[1:], do[b, h, i0:], dv_, s, ld_s, consts[1:], dv[b, h, j0:], dv_)
        gemm(_T, _N, tk, rows, dv_, consts[1:], v[b, h, j0:], dv_, do[b, h, i0:], dv_, consts[2:], dp, ld_s)
    if elementwise:
        att._ds_rows(s, dp, drow, i0, rows, tk)
    if gemms:
        gemm(_N, _N, d, rows, tk, consts[3:], k[b, h, j0:], d, dp, ld_s, consts[1:], dq[b, h, i0:], d)
        gemm(_N, _T, d, tk, rows, consts[3:], q[b, h, i0:], d, dp, ld_s, consts[1:], dk[b, h, j0:], d)


@njit(cache=True, parallel=True)
def _lab_kernel(q, k, v, o, do, lse, causal, dq, dk, dv, tile_q, tile_k, gemms, elementwise):
    """The library's fused loop (one item per head) over ``_lab_block``."""
    nb, nh, nq, d = q.shape
    nk = k.shape[2]
    consts = np.array([_LOG2E / math.sqrt(d), 1.0, 0.0, 1.0 / math.sqrt(d)], q.dtype)
    ld_s = max(min(tile_k, nk), 1)
    rows_s = max(min(max(tile_q, att.DIAG_ROWS), nq), 1)
    for bh in prange(nb * nh):
        b, h = bh // nh, bh % nh
        s = np.zeros((rows_s, ld_s), q.dtype)  # zeros: "elementwise only" reads it unwritten
        dp = np.zeros((rows_s, ld_s), q.dtype)
        lse2 = np.empty(nq, q.dtype)
        drow = np.empty(nq, q.dtype)
        att._head_rows(o, do, lse, b, h, lse2, drow)
        dq[b, h] = 0
        for j0 in range(0, nk, tile_k):
            j1 = min(nk, j0 + tile_k)
            dk[b, h, j0:j1] = 0
            dv[b, h, j0:j1] = 0
            first_full = 0
            if causal:
                for a in range(j0, min(j1, nq), att.DIAG_ROWS):
                    e = min(a + att.DIAG_ROWS, j1, nq)
                    _lab_block(q, k, v, do, True, dq, dk, dv, consts, s, dp, lse2, drow, b, h, a,
                               e, j0, e, gemms, elementwise)
                first_full = j1
            for i0 in range(first_full, nq, tile_q):
                _lab_block(q, k, v, do, False, dq, dk, dv, consts, s, dp, lse2, drow, b, h, i0,
                           min(nq, i0 + tile_q), j0, j1, gemms, elementwise)


@njit(cache=True, parallel=True)
def _square_kernel(a, b, c, calls):
    """``calls`` single-threaded (n, n) x (n, n) sgemms spread over the threads (each item its
    own output): the same threading as the attention kernels, on the shape gemm likes best."""
    n = a.shape[0]
    consts = np.array([1.0, 0.0], a.dtype)
    for item in prange(calls):
        gemm(_N, _N, n, n, n, consts[0:], a, n, b, n, consts[1:], c[item % c.shape[0]], n)


def _square(flops, n=512):
    """Square sgemms of about ``flops`` FLOPs in total, threaded as the kernels are."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    threads = numba.get_num_threads()
    calls = max(threads, int(round(flops / (2 * n ** 3) / threads)) * threads)
    c = np.empty((threads, n, n), np.float32)

    def run():
        with single_threaded_blas():
            _square_kernel(a, b, c, calls)

    return run, calls * 2 * n ** 3


def _lab(q, k, v, o, lse, do, causal, grads, tiles=(att.BWD_TILE_Q, att.BWD_TILE_K), gemms=True,
         elementwise=True):
    def run():
        with single_threaded_blas():
            _lab_kernel(q, k, v, o, do, lse, causal, *grads, *tiles, gemms, elementwise)
        return grads

    return run


def _library(q, k, v, o, lse, do, causal, impl="fused", tiles=None):
    """The library's backward (at other tile sizes when ``tiles`` is given: query rows per
    step, keys per block and, optionally, causal diagonal rows per chunk)."""
    def run():
        if tiles is None:
            return att.attention_backward(q, k, v, o, lse, do, None, causal, impl)
        saved = att.BWD_TILE_Q, att.BWD_TILE_K, att.BWD_DIAG_ROWS
        att.BWD_TILE_Q, att.BWD_TILE_K = tiles[:2]
        att.BWD_DIAG_ROWS = tiles[2] if len(tiles) > 2 else saved[2]
        try:
            return att.attention_backward(q, k, v, o, lse, do, None, causal, impl)
        finally:
            att.BWD_TILE_Q, att.BWD_TILE_K, att.BWD_DIAG_ROWS = saved

    return run


def _tile_name(tiles):
    return f"{tiles[0]} x {tiles[1]}" + (f", diagonal {tiles[2]}" if len(tiles) > 2 else "")


def _inputs(rng, nq, nk, dk=D, dv=D, h=H):
    q, k = (rng.standard_normal((B, h, n, dk)).astype(np.float32) for n in (nq, nk))
    v = rng.standard_normal((B, h, nk, dv)).astype(np.float32)
    do = rng.standard_normal((B, h, nq, dv)).astype(np.float32)
    return q, k, v, do


def _nan_grads(q, k, v):
    return tuple(np.full(x.shape, np.nan, np.float32) for x in (q, k, v))


def _flops(n, causal):
    return 2.5 * cost.flops("attention", b=B, h=H, nq=n, nk=n, dk=D, causal=causal)


def run_checks(rng) -> list[dict]:
    """The library's kernels (and the lab loop and every tile size) on sizes that are not
    multiples of any tile, against the float64 reference backward."""
    rows: list[dict] = []
    for nq, nk, dk, dv, h in ((37, 37, 64, 64, 3), (97, 1025, 64, 32, 3), (1025, 1025, 64, 64, 1),
                              (300, 130, 16, 8, 2)):
        q, k, v, do = _inputs(rng, nq, nk, dk, dv, h)
        for causal in (False, True):
            o, lse = att.attention_train(q, k, v, None, causal)
            want = reference_backward(q, k, v, *reference_train(q, k, v, causal=causal), do, causal=causal)
            label = f"Nq={nq} Nk={nk} d_k={dk} d_v={dv} H={h}{' causal' if causal else ''}"
            runs = {f"library {impl}": _library(q, k, v, o, lse, do, causal, impl)
                    for impl in ("naive", "fused")}
            runs["lab loop"] = _lab(q, k, v, o, lse, do, causal, _nan_grads(q, k, v))
            for tiles in TILES[1:]:
                runs[f"fused {_tile_name(tiles)}"] = _library(q, k, v, o, lse, do, causal, tiles=tiles)
            for name, run in runs.items():
                got = run()
                for g, w, what in zip(got, want, ("dq", "dk", "dv")):
                    check(f"backward {name} {what}, {label}", rel_err(g, w), 2e-5, rows)
    return rows


def _check_timed(label, outs: dict, q, k, v, do, causal, checks) -> None:
    """The timed gradients against the float64 reference on head 0 (n <= 2048), else against
    PyTorch's (when timed beside it) and the naive kernel's on head 0."""
    if q.shape[2] <= 2048:
        want = reference_backward(q[:, :1], k[:, :1], v[:, :1],
                                  *reference_train(q[:, :1], k[:, :1], v[:, :1], causal=causal),
                                  do[:, :1], causal=causal)
    else:
        h0 = tuple(np.ascontiguousarray(x[:, :1]) for x in (q, k, v, do))
        o, lse = att.attention_train(*h0[:3], None, causal, "naive")
        want = att.attention_backward(*h0[:3], o, lse, h0[3], None, causal, "naive")
    for name, grads in outs.items():
        for g, w, what in zip(grads, want, ("dq", "dk", "dv")):
            check(f"backward {name} {what}, {label}, head 0, after timing",
                  rel_err(g[:, :1], w), 2e-5, checks)


def versus_sdpa(rng, quick, checks) -> list[dict]:
    """attention_backward (fused) against autograd through torch's SDPA, alternating, same
    threads; the quoted figure is the median of the per-round ratios with its interval."""
    rows = []
    with torch_threads(numba.get_num_threads()) as torch:
        if torch is None:
            return []
        F = torch.nn.functional
        for n in (1024,) if quick else (1024, 4096):
            q, k, v, do = _inputs(rng, n, n)
            tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
            tdo = torch.from_numpy(do)
            for causal in (False, True):
                label = f"n={n}{' causal' if causal else ''}"
                o, lse = att.attention_train(q, k, v, None, causal)
                tout = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                outs = {}

                def tfm_run():
                    outs["tfm fused"] = att.attention_backward(q, k, v, o, lse, do, None, causal)

                def torch_run():
                    grads = torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)
                    outs["torch SDPA backward"] = tuple(g.numpy() for g in grads)

                budget = 1.0 if quick else (20.0 if n > 2048 else 6.0)
                times = interleave({"tfm fused": tfm_run, "torch SDPA backward": torch_run},
                                   budget_s=budget, min_rounds=5 if quick else 11)
                _check_timed(label, outs, q, k, v, do, causal, checks)
                extra = {name: {"gflops": _flops(n, causal) / np.median(t) / 1e9,
                                "torch_threads": torch.get_num_threads(),
                                "torch_grad_fn": type(tout.grad_fn).__name__}
                         for name, t in times.items()}
                got = compare("attention_backward", f"vs SDPA backward, {label}", times,
                              "torch SDPA backward", extra)
                print_rows(got)
                rows += got
    return rows


def versions(rng, quick, checks) -> list[dict]:
    """The naive backward (two (Nq, Nk) matrices per head) against the fused one."""
    rows = []
    for n in (1024,) if quick else (1024, 2048):
        q, k, v, do = _inputs(rng, n, n)
        for causal in (False, True):
            label = f"n={n}{' causal' if causal else ''}"
            o, lse = att.attention_train(q, k, v, None, causal)
            outs = {}
            fns = {}
            for impl in ("fused", "naive"):
                run = _library(q, k, v, o, lse, do, causal, impl)
                fns[impl] = (lambda run=run, impl=impl: outs.__setitem__(impl, run()))
            times = interleave(fns, budget_s=1.0 if quick else (10.0 if n > 1024 else 5.0),
                               min_rounds=3 if quick else 9)
            _check_timed(label, outs, q, k, v, do, causal, checks)
            extra = {name: {"gflops": _flops(n, causal) / np.median(t) / 1e9} for name, t in times.items()}
            got = compare("attention_backward", f"naive vs fused, {label}", times, "fused", extra)
            print_rows(got)
            rows += got
    return rows


def tiles(rng, quick, checks) -> list[dict]:
    """The library's fused backward at other tile sizes (query rows per step x keys per block;
    causal: also the diagonal's rows per chunk)."""
    rows = []
    for n, causal in ((1024, False),) if quick else ((1024, False), (4096, False), (4096, True)):
        q, k, v, do = _inputs(rng, n, n)
        o, lse = att.attention_train(q, k, v, None, causal)
        label = f"n={n}{' causal' if causal else ''}"
        names = [_tile_name(t) for t in TILES]
        outs = {}
        fns = {}
        for name, size in zip(names, TILES):
            run = _library(q, k, v, o, lse, do, causal, tiles=size)
            fns[name] = (lambda run=run, name=name: outs.__setitem__(name, run()))
        times = interleave(fns, budget_s=1.0 if quick else (25.0 if n > 2048 else 8.0),
                           min_rounds=3 if quick else 7)
        _check_timed(label, outs, q, k, v, do, causal, checks)
        extra = {name: {"gflops": _flops(n, causal) / np.median(t) / 1e9} for name, t in times.items()}
        got = compare("attention_backward", f"tiles (query rows x key rows), {label}", times,
                      names[0], extra)
        print_rows(got)
        rows += got
    return rows


def ceiling(rng, quick, checks) -> list[dict]:
    """Where the time goes: the library's fused backward against its loop with only the gemms
    and with only the elementwise work, each as GFLOP/s (of the backward's 2.5x-forward
    count) and as a fraction of two ceilings: the machine's sgemm (NumPy, 2048^3, all BLAS
    threads: what one large product reaches, measured once at the start) and, timed in the
    same rounds, 512^3 sgemms of the same FLOPs on the kernels' threading ("square sgemm":
    each Numba thread calling single-threaded OpenBLAS), which a loaded machine slows alike."""
    from tfm.bench.machine import measure_sgemm_gflops

    ceiling_gflops = measure_sgemm_gflops()
    print(f"  sgemm ceiling {ceiling_gflops:.1f} GFLOP/s")
    rows = []
    for n, causal in ((1024, False),) if quick else ((1024, False), (4096, False), (4096, True)):
        q, k, v, do = _inputs(rng, n, n)
        o, lse = att.attention_train(q, k, v, None, causal)
        label = f"n={n}{' causal' if causal else ''}"
        outs = {}

        def library():
            outs["library fused"] = att.attention_backward(q, k, v, o, lse, do, None, causal)

        fns = {"library fused": library,
               "lab loop": _lab(q, k, v, o, lse, do, causal, _nan_grads(q, k, v)),
               "gemms only": _lab(q, k, v, o, lse, do, causal, _nan_grads(q, k, v), elementwise=False),
               "elementwise only": _lab(q, k, v, o, lse, do, causal, _nan_grads(q, k, v), gemms=False)}
        fns["square sgemm"], square_flops = _square(_flops(n, causal))
        times = interleave(fns, budget_s=1.0 if quick else (25.0 if n > 2048 else 8.0),
                           min_rounds=3 if quick else 7)
        _check_timed(label, outs, q, k, v, do, causal, checks)
        extra = {}
        square = square_flops / np.median(times["square sgemm"]) / 1e9
        for name, t in times.items():
            gflops = (square_flops if name == "square sgemm" else _flops(n, causal)) / np.median(t) / 1e9
            extra[name] = {"gflops": gflops, "sgemm_ceiling_gflops": ceiling_gflops,
                           "fraction_of_ceiling": gflops / ceiling_gflops,
                           "fraction_of_square_sgemm": gflops / square}
        got = compare("attention_backward", f"where the time goes, {label}", times, "gemms only", extra)
        print_rows(got)
        print("  " + ", ".join(f"{r['variant']} {r['fraction_of_square_sgemm']:.2f}" for r in got)
              + " of the square sgemm's GFLOP/s")
        rows += got
    return rows


PRODUCTS = ("S = Q K^T", "dV += P^T dO", "dP = dO V^T", "dQ += dS K", "dK += dS^T Q", "square 512^3")


@njit(cache=True)
def _product(which, reps, q, k, v, do, s, dp, gq, gk, gv, a, b, c):
    """``reps`` calls of one of the block step's five gemms at the library's block shape (query
    rows = s.shape[0], keys = s.shape[1]), or of a square sgemm (``which`` = 5); one thread."""
    rows, tk = s.shape
    d, dv = q.shape[1], v.shape[1]
    consts = np.array([0.125, 1.0, 0.0], q.dtype)
    for _ in range(reps):
        if which == 0:
            gemm(_T, _N, tk, rows, d, consts[0:], k, d, q, d, consts[2:], s, tk)
        elif which == 1:
            gemm(_N, _T, dv, tk, rows, consts[1:], do, dv, s, tk, consts[1:], gv, dv)
        elif which == 2:
            gemm(_T, _N, tk, rows, dv, consts[1:], v, dv, do, dv, consts[2:], dp, tk)
        elif which == 3:
            gemm(_N, _N, d, rows, tk, consts[0:], k, d, dp, tk, consts[1:], gq, d)
        elif which == 4:
            gemm(_N, _T, d, tk, rows, consts[0:], q, d, dp, tk, consts[1:], gk, d)
        else:
            n = a.shape[0]
            gemm(_N, _N, n, n, n, consts[1:], a, n, b, n, consts[2:], c, n)


def gemm_shapes(rng, quick, checks) -> list[dict]:
    """Each of the block step's five products at the library's block shape (BWD_TILE_Q query
    rows x BWD_TILE_K keys, d = 64), on one thread with one-thread OpenBLAS, against a 512^3
    sgemm: GFLOP/s and the time per FLOP relative to the square product's."""
    rows, tk = att.BWD_TILE_Q, att.BWD_TILE_K
    q, do = (rng.standard_normal((rows, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((tk, D)).astype(np.float32) for _ in range(2))
    s, dp = (rng.standard_normal((rows, tk)).astype(np.float32) for _ in range(2))
    gq, gk, gv = np.zeros((rows, D), np.float32), np.zeros((tk, D), np.float32), np.zeros((tk, D), np.float32)
    a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    c = np.empty((512, 512), np.float32)
    block_flops, square_flops = 2 * rows * tk * D, 2 * 512 ** 3
    reps = {name: (4 if name.startswith("square") else 4 * square_flops // block_flops) for name in PRODUCTS}
    args = (q, k, v, do, s, dp, gq, gk, gv, a, b, c)
    fns = {}
    for which, name in enumerate(PRODUCTS):
        def run(which=which, name=name):
            with single_threaded_blas():
                _product(which, reps[name], *args)
        fns[name] = run
    times = interleave(fns, budget_s=1.0 if quick else 6.0, min_rounds=5 if quick else 15)
    flops = {name: reps[name] * (square_flops if name.startswith("square") else block_flops) for name in PRODUCTS}
    per_flop = {name: t / flops[name] for name, t in times.items()}  # same-round seconds per FLOP
    extra = {name: {"gflops": flops[name] / np.median(t) / 1e9, "block": f"{rows} x {tk}, d={D}"}
             for name, t in times.items()}
    got = compare("attention_backward", f"block products, one thread, {rows} x {tk}", per_flop,
                  "square 512^3", extra)
    for r in got:
        r["median_ms"] = 1e3 * float(np.median(times[r["variant"]]))
        r["min_ms"] = 1e3 * float(np.min(times[r["variant"]]))
    print_rows(got)
    return got


def forward_lse(rng, quick, checks) -> list[dict]:
    """The fused forward with the log-sum-exp written (``attention_train``) against without."""
    rows = []
    for n in (1024,) if quick else (1024, 4096):
        q, k, v, _ = _inputs(rng, n, n)
        for causal in (False, True):
            label = f"n={n}{' causal' if causal else ''}"
            outs = {}

            def plain():
                outs["attention"] = att.attention(q, k, v, None, causal)

            def train():
                outs["attention_train"] = att.attention_train(q, k, v, None, causal)[0]

            times = interleave({"attention": plain, "attention_train": train},
                               budget_s=1.0 if quick else (10.0 if n > 2048 else 4.0),
                               min_rounds=5 if quick else 15)
            check(f"forward with lse equals forward, {label}",
                  0.0 if np.array_equal(outs["attention"], outs["attention_train"]) else math.inf,
                  1e-30, checks)
            got = compare("attention_backward", f"forward with lse, {label}", times, "attention")
            print_rows(got)
            rows += got
    return rows


def memory(rng, quick, checks) -> list[dict]:
    """Peak extra memory of one backward call (``tfm.bench.peak_memory``: resident-set growth,
    which sees Numba's and BLAS's allocations too), naive against fused, as n doubles. Written
    to attention_backward_memory.csv (no timing, so not in the ratio table)."""
    from tfm.bench.memory import peak_memory

    rows = []
    for n in (512, 1024) if quick else (512, 1024, 2048, 4096):
        q, k, v, do = _inputs(rng, n, n)
        o, lse = att.attention_train(q, k, v)
        grads_bytes = 3 * q.nbytes
        for impl in ("naive", "fused"):
            att.attention_backward(q, k, v, o, lse, do, None, False, impl)  # compiled, warm
            peak = peak_memory(lambda: att.attention_backward(q, k, v, o, lse, do, None, False, impl))
            rss = peak.rss_bytes
            rows.append({"family": "attention_backward", "case": f"memory, n={n}", "variant": impl,
                         "n": n, "rss_mib": None if rss is None else rss / 2**20,
                         "traced_mib": peak.traced_bytes / 2**20,
                         "beyond_gradients_mib": None if rss is None else (rss - grads_bytes) / 2**20})
            print(f"  memory n={n:5d} {impl:6s} rss {rows[-1]['rss_mib']} MiB, traced "
                  f"{rows[-1]['traced_mib']:.1f} MiB (gradients {grads_bytes / 2**20:.1f} MiB)")
    write_csv(_OUT[0] / "attention_backward_memory.csv", rows)
    return []


PARTS = (versus_sdpa, ceiling, gemm_shapes, versions, tiles, forward_lse, memory)
_OUT = [Path(__file__).parent / "results"]  # where ``memory`` writes (set by --out)


def _main(argv=None) -> int:
    out, quick = parse_out(argv, __doc__)
    _OUT[0] = out
    run_family("attention_backward", PARTS, run_checks, out, quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
