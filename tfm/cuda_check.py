"""``make gpu-check``: CUDA correctness at real sizes and timings against PyTorch on the same GPU.

    python -m tfm.cuda_check --out results/gpu            # full run (H100/H200: ~10 minutes)
    python -m tfm.cuda_check --out results/gpu --quick    # smaller grid, fewer repeats
    NUMBA_ENABLE_CUDASIM=1 python -m tfm.cuda_check --out /tmp/x --sim-smoke   # toy sizes, CI

Writes under ``--out``: ``device.csv``, ``correctness.csv``, ``gemm.csv``, ``attention.csv``,
``forward.csv``, ``memory.csv`` and ``SUMMARY.md`` (device, driver, the float32 peak and how
it was derived, every table, the exact command).

1. Correctness against float64: fused (n up to 16384) and naive attention, causal or not,
   with a key-padding mask: every row against PyTorch's SDPA in float64 on the GPU up to
   n = 4097, beyond that (or without CUDA PyTorch) on query rows sampled from the output
   (first, last, ragged and random rows) against float64 NumPy, plus the whole float32
   base-config encoder-decoder against the float64 numpy backend with the same weights.
2. Timings, side by side in one process (A B A B ...; warm-up first; median and
   inter-quartile range of repeats; a synchronize closes every timed call): the linear
   layer's GEMM at model shapes for several Numba tilings vs cuBLAS (CuPy; PyTorch, which
   also gives the measured sgemm ceiling); tfm fused and
   naive attention vs ``torch.nn.functional.scaled_dot_product_attention`` in float32
   (B=4, H=16, d=64, n = 1024 ... 16384), and the base-config ``nn.Transformer`` forward
   (eager, float32) vs the same weights in ``tfm.from_torch(...)`` on backend "cuda" with
   the Numba GEMM and, if CuPy is importable, with cuBLAS through CuPy. TF32 is off in
   PyTorch (``allow_tf32 = False`` for matmul and cuDNN) and CuPy (its default). Both
   forward passes start and end on the device except for one download of the (B, N, d)
   output, which both sides pay.
3. Peak extra device memory of fused vs naive attention: bytes allocated by the call
   (every ``cuda.device_array`` it makes, minus the output) and the drop in free device
   memory with deallocation deferred (``cuda.defer_cleanup``); PyTorch's
   ``max_memory_allocated`` for SDPA.

Rows that cannot run (no PyTorch/CuPy, no CUDA build of PyTorch, not enough memory) are
NaN with the reason in a ``note`` column.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

# FP32 lanes (CUDA cores) per SM by compute capability (CUDA C Programming Guide, "Arithmetic
# Instructions" throughput table).
FP32_LANES_PER_SM = {(6, 0): 64, (6, 1): 128, (6, 2): 128, (7, 0): 64, (7, 2): 64, (7, 5): 64,
                     (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128,
                     (10, 0): 128, (12, 0): 128}

GRIDS = {
    "full": {"attn_n": [1024, 2048, 4096, 8192, 16384], "attn_bhd": (4, 16, 64),
             "naive_max_n": 8192, "attn_sweep_n": [4096],
             "attn_tiles": [(64, 32, 8, 8), (32, 32, 8, 8), (128, 32, 16, 8)], "check_n": [1, 37, 1000, 4097, 16384],
             "fwd": [(8, 128), (8, 256)], "mem_n": [1024, 2048, 4096, 8192, 16384],
             "repeats": 10, "warmup": 2, "preset": "base",
             "gemm": [(2048, 512, 2048), (2048, 2048, 512), (2048, 512, 1536), (8192, 8192, 8192)],
             "gemm_tiles": [(128, 128, 16, 8, 8), (128, 64, 16, 8, 4), (64, 64, 16, 4, 4),
                            (64, 128, 8, 4, 8)]},
    "quick": {"attn_n": [1024, 4096], "attn_bhd": (4, 16, 64), "naive_max_n": 4096,
              "attn_sweep_n": [4096], "attn_tiles": [(64, 32, 8, 8), (32, 32, 8, 8)],
              "check_n": [37, 1000, 4097], "fwd": [(8, 128)], "mem_n": [1024, 4096],
              "repeats": 5, "warmup": 1, "preset": "base",
              "gemm": [(2048, 512, 2048), (4096, 4096, 4096)],
              "gemm_tiles": [(128, 128, 16, 8, 8), (128, 64, 16, 8, 4), (64, 64, 16, 4, 4)]},
    "sim": {"attn_n": [13], "attn_bhd": (1, 2, 8), "naive_max_n": 13, "attn_sweep_n": [13],
            "attn_tiles": [(8, 4, 4, 2)], "check_n": [1, 13],
            "fwd": [(1, 4)], "mem_n": [8, 16], "repeats": 1, "warmup": 1, "preset": "sim",
            "gemm": [(9, 12, 10)], "gemm_tiles": [(8, 8, 4, 2, 2), (4, 8, 2, 2, 4)]},
}


# ------------------------------------------------------------------------------ helpers
@lru_cache(maxsize=None)
def _torch_cuda():
    """(torch, None) when PyTorch with CUDA is usable, else (None, reason)."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, "this PyTorch has no usable CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, None


def _cupy():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None


def device_info() -> dict:
    from numba import cuda

    from .backends.cuda._launch import simulator_enabled

    if simulator_enabled():
        return {"device": "Numba CUDA simulator", "compute_capability": "n/a", "sms": np.nan,
                "clock_mhz": np.nan, "driver": "n/a", "fp32_peak_gflops": np.nan,
                "peak_derivation": "none: the simulator has no timing model"}
    dev = cuda.get_current_device()
    cc = tuple(dev.compute_capability)
    sms = int(dev.MULTIPROCESSOR_COUNT)
    try:
        clock_khz = int(dev.CLOCK_RATE)
    except Exception:  # deprecated attribute; then the peak column is NaN, the measured sgemm stays
        clock_khz = 0
    lanes = FP32_LANES_PER_SM.get(cc) if clock_khz else None
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    try:
        from numba.cuda.cudadrv.driver import driver

        drv = ".".join(map(str, driver.get_version()))
    except Exception as exc:  # pragma: no cover - depends on the driver bindings
        drv = f"unknown ({type(exc).__name__})"
    peak = sms * lanes * 2 * clock_khz / 1e6 if lanes else np.nan
    return {"device": name, "compute_capability": f"{cc[0]}.{cc[1]}", "sms": sms,
            "clock_mhz": clock_khz / 1e3, "driver": drv, "fp32_peak_gflops": peak,
            "peak_derivation": (f"{sms} SMs x {lanes} FP32 lanes/SM x 2 FLOP/FMA x "
                                f"{clock_khz / 1e6:.3f} GHz (max boost clock, device attribute)"
                                if lanes else f"unknown FP32 lanes per SM or clock for sm_{cc[0]}{cc[1]}")}


def _allocator() -> str:
    from .backends.cuda._launch import simulator_enabled

    if simulator_enabled():
        return "simulator (host memory)"
    from numba import cuda

    from .backends.cuda._memory import PoolMemoryManager

    if isinstance(cuda.current_context().memory_manager, PoolMemoryManager):
        return "tfm caching pool (TFM_CUDA_POOL=1)"
    return "numba's default (cuMemAlloc/cuMemFree; frees batched, see tfm.backends.cuda)"


def _sync():
    from numba import cuda

    cuda.synchronize()
    torch, _ = _torch_cuda()
    if torch is not None:
        torch.cuda.synchronize()


def time_side_by_side(fns: dict, repeats: int, warmup: int) -> dict:
    """Median and IQR seconds per callable, timed in rounds A B A B ... after warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(s)), float(np.subtract(*np.percentile(s, [75, 25]))))
            for name, s in samples.items()}


def sample_rows(n: int, rng, k: int = 6) -> np.ndarray:
    rows = {0, n - 1, n // 2, max(0, n - 1 - (n % 64))} | set(rng.integers(0, n, k).tolist())
    return np.array(sorted(rows))


def attention_rows_reference(q, k, v, rows, keep=None, causal=False) -> np.ndarray:
    """Float64 attention outputs for query ``rows`` only; keep (B, Nk) True = may attend."""
    qs = q[:, :, rows].astype(np.float64)  # (B, H, r, d)
    s = qs @ np.swapaxes(k.astype(np.float64), -1, -2) / math.sqrt(q.shape[-1])  # (B, H, r, Nk)
    allowed = np.ones(s.shape, bool)
    if causal:
        allowed &= np.arange(k.shape[2])[None, None, None, :] <= rows[None, None, :, None]
    if keep is not None:
        allowed &= keep[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(allowed, np.exp(s - m), 0.0)
    den = p.sum(-1, keepdims=True)
    p = np.divide(p, den, out=np.zeros_like(p), where=den > 0)
    return p @ v.astype(np.float64)


# Largest n checked against a full float64 SDPA on the GPU ((B, H, n, n) float64 scores).
TORCH_FULL_MAX_N = 4097


def _torch_reference(q, k, v, keep, causal):
    """Float64 SDPA on the GPU, or None without CUDA PyTorch or when a row has no visible key
    (SDPA returns NaN there, tfm returns zeros)."""
    torch, _ = _torch_cuda()
    if torch is None:
        return None
    n = q.shape[2]
    allowed = torch.as_tensor(keep, device="cuda")[:, None, None, :]  # (B, 1, 1, Nk)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    if not bool(allowed.any(-1).all()):
        return None
    tq, tk, tv = (torch.as_tensor(a, device="cuda", dtype=torch.float64) for a in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed).cpu().numpy()


@contextmanager
def track_allocations():
    """Record the bytes of every ``numba.cuda.device_array`` made inside the block."""
    from numba import cuda

    original, sizes = cuda.device_array, []

    def tracked(shape, dtype=np.float64, *args, **kwargs):
        arr = original(shape, dtype, *args, **kwargs)
        sizes.append(int(arr.nbytes))
        return arr

    cuda.device_array = tracked
    try:
        yield sizes
    finally:
        cuda.device_array = original


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def _gflops(flops, seconds):
    return flops / seconds / 1e9 if seconds and seconds == seconds else np.nan


# ------------------------------------------------------------------------------ sections
def check_correctness(bk, grid, rng) -> list[dict]:
    from . import reference as ref
    from .config import TransformerConfig
    from .models import EncoderDecoder

    rows_out = []
    b, h, d = grid["attn_bhd"]
    for n in grid["check_n"]:
        for impl in ("fused", "naive"):
            if impl == "naive" and n > grid["naive_max_n"]:
                continue
            for causal in (False, True):
                q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
                keep = np.ones((b, n), bool)
                keep[0, n - max(1, n // 5):] = False  # padding at the end of sequence 0
                out = bk.to_numpy(bk.attention(bk.asarray(q), bk.asarray(k), bk.asarray(v),
                                               bk.asarray(keep[:, None, None, :]), causal, impl))
                full = _torch_reference(q, k, v, keep, causal) if n <= TORCH_FULL_MAX_N else None
                if full is not None:
                    err, note = _rel(out, full), "every row vs PyTorch SDPA in float64 on the GPU"
                else:
                    rows = sample_rows(n, rng)
                    err = _rel(out[:, :, rows], attention_rows_reference(q, k, v, rows, keep, causal))
                    note = f"{len(rows)} sampled query rows vs float64 NumPy"
                rows_out.append({"check": f"attention_{impl}", "size": f"B={b} H={h} n={n} d={d}",
                                 "causal": causal, "rel_err": err, "tol": 2e-5,
                                 "passed": err < 2e-5, "note": note + "; key padding"})
    cfg = (TransformerConfig.base() if grid["preset"] == "base" else
           TransformerConfig.tiny(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2, d_ff=24))
    bsz, n = 2, 16 if grid["preset"] == "base" else 4
    model = EncoderDecoder(cfg, seed=0, backend=bk)
    oracle = EncoderDecoder.from_params(cfg, model.params, backend="numpy")
    src = rng.standard_normal((bsz, n + 3, cfg.d_model)).astype(np.float32)
    tgt = rng.standard_normal((bsz, n, cfg.d_model)).astype(np.float32)
    err = _rel(model(src, tgt, tgt_is_causal=True), oracle(src, tgt, tgt_is_causal=True))
    rows_out.append({"check": "encoder_decoder_forward", "size": f"{grid['preset']} B={bsz} Ns={n + 3} Nt={n}",
                     "causal": True, "rel_err": err, "tol": 1e-4, "passed": err < 1e-4,
                     "note": "float32 cuda vs float64 numpy backend, same weights"})
    x = rng.standard_normal((bsz * n, cfg.d_model)).astype(np.float32)
    w = rng.standard_normal((cfg.d_ff, cfg.d_model)).astype(np.float32)
    err = _rel(bk.to_numpy(bk.linear(bk.asarray(x), bk.asarray(w))), ref.linear(x, w))
    rows_out.append({"check": "linear", "size": f"{bsz * n}x{cfg.d_model} @ {cfg.d_model}x{cfg.d_ff}",
                     "causal": False, "rel_err": err, "tol": 2e-5, "passed": err < 2e-5, "note": ""})
    return rows_out


def time_attention(bk, grid, peak, rng) -> list[dict]:
    from . import cost
    from .backends.cuda import CudaBackend

    torch, torch_reason = _torch_cuda()
    b, h, d = grid["attn_bhd"]
    out = []
    for n in grid["attn_n"]:
        for causal in (False, True):
            q, k, v = (bk.asarray(rng.standard_normal((b, h, n, d)).astype(np.float32)) for _ in range(3))
            fns = {"tfm_fused": lambda: bk.attention(q, k, v, None, causal, "fused")}
            notes = {}
            if n in grid["attn_sweep_n"]:  # other tilings of the fused kernel (Tuning.attn)
                for tiles in grid["attn_tiles"]:
                    other = CudaBackend(tuning=bk.tuning.replace(attn=tiles))
                    fns[f"tfm_fused{tiles}"] = (lambda b=other: b.attention(q, k, v, None, causal, "fused"))
            naive_bytes = 3 * b * h * n * n * 4
            if n <= grid["naive_max_n"] and naive_bytes < 0.8 * bk.free_memory_bytes():
                fns["tfm_naive"] = lambda: bk.attention(q, k, v, None, causal, "naive")
            else:
                notes["tfm_naive"] = "skipped: O(n^2) scores exceed the grid's naive limit or free memory"
            if torch is not None:
                tq, tk, tv = (torch.as_tensor(a, device="cuda") for a in (q, k, v))  # zero copy
                fns["torch_sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=causal)
            else:
                notes["torch_sdpa"] = torch_reason
            timed = time_side_by_side(fns, grid["repeats"], grid["warmup"])
            flops = cost.flops("attention", b=b, h=h, nq=n, nk=n, dk=d, causal=causal)
            sdpa = timed.get("torch_sdpa", (np.nan, np.nan))[0]
            for impl in list(fns) + [name for name in notes if name not in fns]:
                med, iqr = timed.get(impl, (np.nan, np.nan))
                gf = _gflops(flops, med)
                out.append({"impl": impl, "B": b, "H": h, "n": n, "d": d, "causal": causal,
                            "median_ms": med * 1e3, "iqr_ms": iqr * 1e3, "gflops": gf,
                            "frac_fp32_peak": gf / peak if peak == peak else np.nan,
                            "throughput_vs_sdpa": sdpa / med if med == med else np.nan,
                            "note": notes.get(impl, "")})
    return out


def time_gemm(grid, peak, rng) -> list[dict]:
    """``linear`` (x @ W.T) at model shapes: each Numba GEMM tiling, cuBLAS via CuPy and torch."""
    from . import cost
    from .backends.cuda import CudaBackend

    torch, torch_reason = _torch_cuda()
    cupy_reason = _cupy()
    out = []
    for m, k, n in grid["gemm"]:
        x, w = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k)))
        fns, notes = {}, {}
        for tiles in grid["gemm_tiles"]:
            bk = CudaBackend(tuning=CudaBackend().tuning.replace(gemm_large=tiles, gemm_small=tiles))
            dx, dw = bk.asarray(x), bk.asarray(w)
            fns[f"numba{tiles}"] = (lambda b=bk, a=dx, c=dw: b.linear(a, c))
        if cupy_reason is None:
            bk = CudaBackend(gemm="cupy")
            dx, dw = bk.asarray(x), bk.asarray(w)
            fns["cupy_cublas"] = lambda: bk.linear(dx, dw)
        else:
            notes["cupy_cublas"] = cupy_reason
        if torch is not None:
            tx, tw = torch.as_tensor(x, device="cuda"), torch.as_tensor(w, device="cuda")
            fns["torch_matmul"] = lambda: tx @ tw.T
        else:
            notes["torch_matmul"] = torch_reason
        timed = time_side_by_side(fns, grid["repeats"], grid["warmup"])
        flops = cost.flops("linear", tokens=m, d_in=k, d_out=n, bias=False)
        for impl in list(fns) + list(notes):
            med, iqr = timed.get(impl, (np.nan, np.nan))
            gf = _gflops(flops, med)
            out.append({"impl": impl, "M": m, "K": k, "N": n, "median_ms": med * 1e3, "iqr_ms": iqr * 1e3,
                        "gflops": gf, "frac_fp32_peak": gf / peak if peak == peak else np.nan,
                        "note": notes.get(impl, "")})
    return out


def time_forward(grid, peak, rng) -> list[dict]:
    from . import cost
    from .backends.cuda import CudaBackend
    from .config import TransformerConfig
    from .interop import from_torch

    torch, torch_reason = _torch_cuda()
    cupy_reason = _cupy()
    try:
        import torch as torch_cpu
    except ImportError:
        torch_cpu = None
    cfg = (TransformerConfig.base() if grid["preset"] == "base" else
           TransformerConfig.tiny(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2, d_ff=24))
    out = []
    for bsz, n in grid["fwd"]:
        fns, notes, models = {}, {}, {}
        src = rng.standard_normal((bsz, n, cfg.d_model)).astype(np.float32)
        tgt = rng.standard_normal((bsz, n, cfg.d_model)).astype(np.float32)
        if torch_cpu is None:
            notes = {k: "PyTorch is not installed (weights come from nn.Transformer)"
                     for k in ("tfm_numba_gemm", "tfm_cupy_gemm", "torch_eager")}
        else:
            torch_cpu.manual_seed(0)
            module = torch_cpu.nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_encoder_layers,
                                              cfg.n_decoder_layers, cfg.d_ff, dropout=0.0,
                                              batch_first=True).eval()
            for name, gemm in (("tfm_numba_gemm", "numba"), ("tfm_cupy_gemm", "cupy")):
                if gemm == "cupy" and cupy_reason:
                    notes[name] = cupy_reason
                    continue
                bk = CudaBackend(gemm=gemm)
                model = from_torch(module, backend=bk)
                ds, dt = bk.asarray(src), bk.asarray(tgt)
                models[name] = model
                fns[name] = (lambda m=model, s=ds, t=dt: m(s, t, tgt_is_causal=True))
            if torch is not None:
                tmod = module.to("cuda")
                ts, tt = (torch.as_tensor(a, device="cuda") for a in (src, tgt))
                mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device="cuda")

                def torch_fwd():
                    with torch.no_grad():
                        return tmod(ts, tt, tgt_mask=mask, tgt_is_causal=True).cpu()

                fns["torch_eager"] = torch_fwd
                ref_out = torch_fwd().numpy()
                for name, fn in list(fns.items()):
                    if name != "torch_eager":
                        notes[name] = f"rel_err vs torch: {_rel(fn(), ref_out):.2e}"
            else:
                notes["torch_eager"] = torch_reason
        timed = time_side_by_side(fns, grid["repeats"], grid["warmup"]) if fns else {}
        flops = cost.flops("transformer_forward", config=cfg, b=bsz, n_src=n, n_tgt=n,
                           output_projection=False)
        base = timed.get("torch_eager", (np.nan, np.nan))[0]
        for impl in ("tfm_numba_gemm", "tfm_cupy_gemm", "torch_eager"):
            med, iqr = timed.get(impl, (np.nan, np.nan))
            gf = _gflops(flops, med)
            out.append({"impl": impl, "config": grid["preset"], "B": bsz, "n_src": n, "n_tgt": n,
                        "median_ms": med * 1e3, "iqr_ms": iqr * 1e3, "gflops": gf,
                        "frac_fp32_peak": gf / peak if peak == peak else np.nan,
                        "throughput_vs_torch": base / med if med == med else np.nan,
                        "note": notes.get(impl, "")})
    return out


def measure_memory(bk, grid, rng) -> list[dict]:
    from numba import cuda

    from .backends.cuda._launch import simulator_enabled

    torch, torch_reason = _torch_cuda()
    b, h, d = grid["attn_bhd"]
    out = []
    for n in grid["mem_n"]:
        q, k, v = (bk.asarray(rng.standard_normal((b, h, n, d)).astype(np.float32)) for _ in range(3))
        out_bytes = b * h * n * d * 4
        for impl in ("fused", "naive"):
            row = {"impl": f"tfm_{impl}", "B": b, "H": h, "n": n, "d": d, "output_bytes": out_bytes}
            if impl == "naive" and 3 * b * h * n * n * 4 > 0.8 * bk.free_memory_bytes():
                out.append({**row, "extra_alloc_bytes": np.nan, "free_drop_bytes": np.nan,
                            "note": "skipped: the score matrix would not fit in free device memory"})
                continue
            bk.synchronize()
            with cuda.defer_cleanup(), track_allocations() as sizes:
                free0 = bk.free_memory_bytes()
                res = bk.attention(q, k, v, None, False, impl)
                bk.synchronize()
                free1 = bk.free_memory_bytes()
            del res
            drop = np.nan if simulator_enabled() else free0 - free1  # simulator: host RAM
            out.append({**row, "extra_alloc_bytes": sum(sizes) - out_bytes, "free_drop_bytes": drop,
                        "note": "free-memory drop is rounded to the allocator's granularity"})
        if torch is not None:
            tq, tk, tv = (torch.as_tensor(a, device="cuda") for a in (q, k, v))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            res = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del res
            out.append({"impl": "torch_sdpa", "B": b, "H": h, "n": n, "d": d, "output_bytes": out_bytes,
                        "extra_alloc_bytes": peak - out_bytes, "free_drop_bytes": np.nan,
                        "note": "torch.cuda.max_memory_allocated"})
        else:
            out.append({"impl": "torch_sdpa", "B": b, "H": h, "n": n, "d": d, "output_bytes": out_bytes,
                        "extra_alloc_bytes": np.nan, "free_drop_bytes": np.nan, "note": torch_reason})
    return out


# ------------------------------------------------------------------------------ output
def markdown_table(df) -> str:
    cols = list(df.columns)

    def fmt(x):
        if isinstance(x, float):
            return "" if x != x else (f"{x:.3g}" if abs(x) < 1e5 else f"{x:.4g}")
        return str(x)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfm.cuda_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/gpu", help="output folder (default results/gpu)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller grid and fewer repeats")
    mode.add_argument("--sim-smoke", action="store_true",
                      help="toy sizes for Numba's CUDA simulator (timings meaningless)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import pandas as pd

    from .backends.cuda import CudaBackend, cuda_unavailable_reason
    from .backends.cuda._launch import simulator_enabled

    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"tfm.cuda_check: backend 'cuda' is unavailable: {reason}", file=sys.stderr)
        return 2
    if args.sim_smoke != simulator_enabled():
        print("tfm.cuda_check: --sim-smoke runs only under NUMBA_ENABLE_CUDASIM=1, and the "
              "simulator only with --sim-smoke (its sizes are toys)", file=sys.stderr)
        return 2
    if args.sim_smoke:  # simulated threads are Python threads: switch between them often
        sys.setswitchinterval(min(sys.getswitchinterval(), 5e-4))
    grid = GRIDS["sim" if args.sim_smoke else "quick" if args.quick else "full"]
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    command = "python -m tfm.cuda_check " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    bk = CudaBackend()
    info = device_info()
    peak = info["fp32_peak_gflops"]
    t0 = time.perf_counter()
    pd.DataFrame([info]).to_csv(os.path.join(args.out, "device.csv"), index=False)
    sections = {
        "correctness": lambda: check_correctness(bk, grid, rng),
        "gemm": lambda: time_gemm(grid, peak, rng),
        "attention": lambda: time_attention(bk, grid, peak, rng),
        "forward": lambda: time_forward(grid, peak, rng),
        "memory": lambda: measure_memory(bk, grid, rng),
    }
    tables = {}
    for name, section in sections.items():
        print(f"[{time.perf_counter() - t0:6.1f} s] {name} ...", flush=True)
        try:
            tables[name] = pd.DataFrame(section())
        except Exception as exc:  # one failing section must not cost the others
            import traceback

            traceback.print_exc()
            tables[name] = pd.DataFrame([{"error": f"{type(exc).__name__}: {exc}"[:500]}])
        tables[name].to_csv(os.path.join(args.out, f"{name}.csv"), index=False)
    corr = tables["correctness"]
    failed = int((~corr["passed"].astype(bool)).sum()) if "passed" in corr else len(corr)
    lines = [
        "# tfm CUDA check", "",
        f"- command: `{command}`",
        f"- device: {info['device']} (compute capability {info['compute_capability']}, "
        f"{info['sms']} SMs, driver {info['driver']})",
        f"- float32 FMA peak: {peak:.0f} GFLOP/s = {info['peak_derivation']}",
        f"- tuning: {bk.tuning.to_dict()}",
        f"- device allocator: {_allocator()}",
        f"- correctness: {len(tables['correctness']) - failed} of {len(tables['correctness'])} checks passed",
        f"- wall time: {time.perf_counter() - t0:.0f} s", "",
        "Timings: median of repeats after warm-up, A B A B order in one process; GFLOP/s from "
        "`tfm.cost.flops` (attention: 4*B*H*n^2*d, causal pairs only); PyTorch with TF32 off.", "",
    ]
    for name, df in tables.items():
        lines += [f"## {name}", "", markdown_table(df), ""]
    with open(os.path.join(args.out, "SUMMARY.md"), "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
