"""The CUDA kernel lab: every kernel variant tfm keeps, validated, then timed side by side.

    python3 -m dev.cuda.lab --out DIR [--budget-s 100] [--family gemm,attention,launch,forward]
    python3 -m dev.cuda.lab --out DIR --family ptx,launch                # without a GPU
    NUMBA_ENABLE_CUDASIM=1 python3 -m dev.cuda.lab --out DIR --smoke     # toy sizes, CI

(from the repository root). After llm.c's ``dev/cuda``: for each kernel family with
variants (the ``VARIANTS`` and ``TILINGS`` of ``tfm/backends/cuda/*.py``, and their peers),
each case first checks every variant against a float64 reference (sampled rows where the
full product would take the host too long) and then times the variants interleaved
(A B A B ..., CUDA-synchronised, a warm-up call first, which also JIT-compiles), and reports
median and interquartile range. Families and their peers:

* ``gemm``      tfm's Numba GEMM (each version, each tiling of ``linear.TILINGS``), tfm's
                cuBLAS path (CuPy's raw sgemm) and the first GPU run's (``cupy.matmul`` through
                __cuda_array_interface__), torch.matmul (TF32 off); FP32 peak fraction.
* ``attention`` tfm's fused kernel (each version, each tiling of ``attention.TILINGS``) and
                naive kernel, PyTorch SDPA's math backend (cuBLAS, FP32 on CUDA cores with
                TF32 off) and memory-efficient backend (float32 as 3xTF32 on tensor cores,
                per PyTorch's mem_eff_attention/gemm_kernel_utils.h), B=4, H=16, d=64.
* ``launch``    the launch paths of ``_launch.LAUNCH_MODES``: host microseconds per launch of a
                small elementwise kernel (with no GPU and no simulator, the driver call is
                stubbed: ``--family launch`` then measures the host side alone).
* ``ptx``       no GPU needed (a CUDA toolkit and numba outside simulator mode): each GEMM
                and fused-attention version and tiling (forward, and the backward's kernels at
                each ``BWD_TILINGS`` entry) compiled for sm_90; ptxas registers,
                static shared memory and spills, and the PTX instruction mix of the kernel
                (FMAs, 16-byte and scalar shared loads, all instructions). Not run by default.
* ``forward``   the base-config forward pass (``from_torch(nn.Transformer)``, B=8, n=128):
                cuBLAS vs Numba GEMM, the launch paths, the caching pool on and off
                (``_memory.PoolMemoryManager.caching``), against eager nn.Transformer (FP32);
                both sides end with the result on the host.
* ``backward``  (1) attention backward, B=4, H=16, d=64, n = 1024 and 4096, causal or not:
                tfm's fused backward with atomic dQ and with the dQ pass (each tiling of
                ``attention.BWD_TILINGS``) and its naive backward, against SDPA's backward
                (``torch.autograd.grad`` on a retained graph) on its math backend (cuBLAS,
                FP32 on CUDA cores with TF32 off) and its memory-efficient backend (3xTF32 on
                tensor cores); each checked on two whole heads against float64. FLOPs: 2.5x the
                forward's (5 matrix products). (2) one training step of the base config
                (``TransformerConfig.base(final_norm=True, dropout=0.1)``, label smoothing 0.1,
                Adam 0.9/0.98/1e-9, B=8, n=128): tfm with cuBLAS, with the Numba GEMM and with
                the dQ pass, against eager PyTorch in float32 with TF32 off (nn.Embedding,
                sinusoidal positions, nn.Transformer, a bias-free output Linear,
                F.cross_entropy, torch.optim.Adam), the same weights; each side returns the
                loss to the host. Checked first at B=2, n=7 against the float64 numpy backend
                (tfm: loss and every gradient; PyTorch: its loss, same weights, no dropout).

Writes one CSV per family into DIR and ``SUMMARY.md`` (at most 7 files), each as soon as its
family ends; a case that does not fit in the time left becomes a row with the reason. Every
failure becomes a row too. Numbers are ratios measured in one process, never across runs.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback

import numpy as np

FAMILIES = ("gemm", "attention", "launch", "forward", "backward", "ptx")
GPU_FAMILIES = FAMILIES[:5]  # the default: what a GPU run measures (ptx needs no GPU)
FP32_LANES_PER_SM = {(7, 0): 64, (8, 0): 64, (8, 6): 128, (8, 9): 128, (9, 0): 128}


# ---------------------------------------------------------------------- infrastructure
class Budget:
    """Seconds left for the whole lab, shared out over the families still to run."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def log(budget: Budget, msg: str) -> None:
    print(f"[lab {budget.elapsed():6.1f}s] {msg}", flush=True)


def simulator() -> bool:
    from tfm.backends.cuda._launch import simulator_enabled

    return simulator_enabled()


def gpu_present() -> bool:
    if simulator():
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


def sync() -> None:
    from numba import cuda

    cuda.synchronize()


def torch_cuda():
    """(torch, None) with CUDA and TF32 off, or (None, reason)."""
    if simulator():
        return None, "the simulator has no CUDA PyTorch peer"
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, "this PyTorch has no usable CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, None


def device_row() -> dict:
    """Device, SM count, clock and the FP32 CUDA-core peak derived from them."""
    if simulator():
        return {"device": "numba CUDA simulator", "sms": 0, "clock_mhz": 0.0, "fp32_peak_gflops": math.nan}
    from numba import cuda

    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    sms = int(dev.MULTIPROCESSOR_COUNT)
    try:
        clock_khz = int(dev.CLOCK_RATE)
    except Exception:  # deprecated in newer drivers: ask nvidia-smi for the maximum SM clock
        clock_khz = _smi_max_clock_khz()
    lanes = FP32_LANES_PER_SM.get(tuple(dev.compute_capability))
    peak = sms * lanes * 2 * clock_khz / 1e6 if lanes and clock_khz else math.nan
    return {"device": name, "sms": sms, "clock_mhz": clock_khz / 1e3, "fp32_peak_gflops": peak}


def _smi_max_clock_khz() -> int:
    """Maximum SM clock from nvidia-smi, or 0 (then no peak column; the ratios still stand)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.split()[0]) * 1000)
    except Exception:
        return 0


def rel_err(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape or not np.all(np.isfinite(out)):
        return math.inf
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (den if den > 0 else 1.0))


ROUNDS = {"min": 3, "max": 15}  # --smoke sets 1 and 2: the simulator takes seconds per call


def interleaved(fns: dict, budget_s: float, *, sample_ms: float = 2.0, wait=None) -> dict:
    """Time each callable (one op, then a device synchronize) interleaved A B A B ...; each was
    called once already (its correctness check, which also compiled it). The first round times
    one call of each; short ops then run ``inner`` times per sample so a sample lasts about
    ``sample_ms``. Rounds continue up to ROUNDS["max"] while ``budget_s`` lasts, and never
    fewer than ROUNDS["min"]. Returns {name: (median_ms, iqr_ms, samples)}. ``wait`` replaces
    the device synchronize (host-only timing)."""
    sync = wait or globals()["sync"]
    t_end = time.monotonic() + budget_s
    samples = {name: [] for name in fns}
    inner = dict.fromkeys(fns, 1)
    for r in range(ROUNDS["max"]):
        if r >= ROUNDS["min"] and time.monotonic() > t_end:
            break
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3 / inner[name])
        if r == 0:
            inner = {name: max(1, min(1000, int(sample_ms / max(s[0], 1e-4)))) for name, s in samples.items()}
    out = {}
    for name, s in samples.items():
        q1, med, q3 = np.percentile(s, [25, 50, 75])
        out[name] = (float(med), float(q3 - q1), len(s))
    return out


def write_csv(path: str, rows: list) -> None:
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def run_case(rows: list, base: dict, variants: dict, check, budget_s: float, tol: float, flops=None,
             peak=math.nan, peer=None, wait=None) -> None:
    """Validate each variant (``check(name, fn) -> rel_err``; the first call also compiles),
    then time the ones that pass, all within ``budget_s`` from now: a variant reached after
    that is skipped (its row says so), the peer never. ``variants``: {name: callable, or a
    reason string where the variant is unavailable}, defaults first."""
    deadline = time.monotonic() + budget_s
    good = {}
    for name, fn in variants.items():
        row = dict(base, variant=name)
        if isinstance(fn, str):
            rows.append(dict(row, status="skipped", reason=fn))
            continue
        if name != peer and time.monotonic() > deadline:
            rows.append(dict(row, status="skipped", reason="lab budget spent before this variant"))
            continue
        try:
            err = check(name, fn)
        except Exception as exc:
            rows.append(dict(row, status="failed", reason=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        if not err < tol:
            rows.append(dict(row, status="wrong", rel_err=err, reason=f"relative error {err:.2e} >= {tol:.0e}"))
            continue
        good[name] = (fn, err)
    if not good:
        return
    try:
        times = interleaved({n: f for n, (f, _) in good.items()}, deadline - time.monotonic(), wait=wait)
    except Exception as exc:
        for name, (_, err) in good.items():
            rows.append(dict(base, variant=name, status="failed", rel_err=err,
                             reason=f"timing: {type(exc).__name__}: {exc}"[:300]))
        return
    peer_ms = times[peer][0] if peer in times else math.nan
    for name, (_, err) in good.items():
        med, iqr, n = times[name]
        row = dict(base, variant=name, status="ok", rel_err=err, median_ms=med, iqr_ms=iqr, samples=n)
        if flops:
            gflops = flops / med / 1e6
            row.update(gflops=gflops, frac_fp32_peak=gflops / peak if peak == peak else math.nan)
        if peer:
            row[f"speed_vs_{peer}"] = peer_ms / med
        rows.append(row)


# ---------------------------------------------------------------------- families
def family_gemm(budget_s: float, smoke: bool, dev: dict) -> list:
    from numba import cuda

    from tfm.backends.cuda import CudaBackend, linear
    from tfm.backends.cuda._launch import Tuning, default_tuning

    rng = np.random.default_rng(0)
    shapes = [(37, 19, 23)] if smoke else [(1024, 512, 1536), (1024, 2048, 512), (4096, 4096, 4096)]
    tilings = [(8, 8, 4, 4, 4)] if smoke else list(linear.TILINGS)
    versions = sorted(linear.GEMM_VERSIONS)
    torch, torch_reason = torch_cuda()
    base_tuning = default_tuning()
    rows = []
    t_end = time.monotonic() + budget_s
    for i, (m, k, n) in enumerate(shapes):
        left = t_end - time.monotonic()
        base = {"M": m, "K": k, "N": n}
        if left < 3:
            rows.append(dict(base, variant="*", status="skipped", reason="lab budget spent"))
            continue
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        sample = np.sort(rng.choice(m, size=min(m, 64), replace=False))
        expect = x[sample].astype(np.float64) @ w.T.astype(np.float64)
        dx, dw = cuda.to_device(x), cuda.to_device(w)
        variants, outputs = {}, {}

        def tfm_variant(bk, key):
            def fn():
                outputs[key] = bk.linear(dx, dw)
            return fn

        try:
            variants["tfm_cublas"] = tfm_variant(CudaBackend(gemm="cupy"), "tfm_cublas")
            variants["cupy_matmul_v0"] = cupy_matmul_v0(dx, dw, outputs)
        except ValueError as exc:
            variants["tfm_cublas"] = variants["cupy_matmul_v0"] = str(exc)
        if torch is not None:
            tx, tw = torch.as_tensor(x, device="cuda"), torch.as_tensor(w, device="cuda")

            def torch_fn():
                outputs["torch_matmul"] = tx @ tw.T
            variants["torch_matmul"] = torch_fn
        else:
            variants["torch_matmul"] = torch_reason
        # each version's first tiling (the default), then the other tilings
        for tiles in tilings:
            for version in reversed(versions):
                t = base_tuning.replace(gemm_large=tiles, gemm_small=tiles, gemm_version=version)
                variants[f"numba_v{version}{tiles}"] = tfm_variant(CudaBackend(tuning=t, gemm="numba"),
                                                                   f"numba_v{version}{tiles}")

        def check(name, fn):
            fn()
            sync()
            out = outputs[name]
            host = out.cpu().numpy() if hasattr(out, "cpu") else out.copy_to_host()
            return rel_err(host[sample], expect)

        run_case(rows, base, variants, check, max(1.0, 0.9 * left / (len(shapes) - i)), 1e-4,
                 flops=2.0 * m * n * k, peak=dev["fp32_peak_gflops"],
                 peer="torch_matmul" if torch is not None else None)
    return rows


def cupy_matmul_v0(dx, dw, outputs):
    """The cuBLAS path of the first GPU run, kept to time against: CuPy arrays made from the
    numba arrays through __cuda_array_interface__, ``cupy.matmul``, and the result wrapped
    back with ``cuda.as_cuda_array`` (which synchronises on CuPy's stream every call)."""
    import cupy as cp
    from numba import cuda

    def fn():
        outputs["cupy_matmul_v0"] = cuda.as_cuda_array(cp.asarray(dx) @ cp.asarray(dw).T)
    return fn


def attention_rows_reference(q, k, v, rows, causal):
    """Float64 attention outputs of query ``rows`` only (every key), eq. 1."""
    qs = q[:, :, rows].astype(np.float64)  # (B, H, r, d)
    s = qs @ np.swapaxes(k.astype(np.float64), -1, -2) / math.sqrt(q.shape[-1])  # (B, H, r, Nk)
    if causal:
        s = np.where(np.arange(k.shape[2])[None, None, None, :] <= rows[None, None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)  # (B, H, r, d)


def family_attention(budget_s: float, smoke: bool, dev: dict) -> list:
    from numba import cuda

    from tfm.backends.cuda import CudaBackend, attention
    from tfm.backends.cuda._launch import default_tuning

    rng = np.random.default_rng(1)
    b, h, d = (1, 2, 8) if smoke else (4, 16, 64)
    ns = [13] if smoke else [1024, 4096, 16384]
    versions = sorted(attention.ATTN_VERSIONS)
    tilings = {v: [(8, 8, 2, 2)] if smoke else list(attention.TILINGS[v]) for v in versions}
    torch, torch_reason = torch_cuda()
    base_tuning = default_tuning()
    rows = []
    t_end = time.monotonic() + budget_s
    cases = [(n, causal) for n in ns for causal in (False, True)]
    for i, (n, causal) in enumerate(cases):
        left = t_end - time.monotonic()
        base = {"B": b, "H": h, "n": n, "d": d, "causal": causal}
        if left < 3:
            rows.append(dict(base, variant="*", status="skipped", reason="lab budget spent"))
            continue
        q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
        sample = np.sort(rng.choice(n, size=min(n, 32 if n <= 4096 else 8), replace=False))
        expect = attention_rows_reference(q, k, v, sample, causal)
        dq, dk, dv = cuda.to_device(q), cuda.to_device(k), cuda.to_device(v)
        variants, outputs = {}, {}

        def tfm_variant(bk, key, impl="fused"):
            def fn():
                outputs[key] = bk.attention(dq, dk, dv, causal=causal, impl=impl)
            return fn

        # each version's default tiling first, then the other tilings; the largest n costs
        # ~0.1-1 s per call: there, only the defaults
        for j in range(max(len(tilings[v]) for v in versions) if n <= 4096 else 1):
            for version in reversed(versions):
                if j < len(tilings[version]):
                    tiles = tilings[version][j]
                    bk = CudaBackend(tuning=base_tuning.replace(attn=tiles, attn_version=version), gemm="numba")
                    variants[f"fused_v{version}{tiles}"] = tfm_variant(bk, f"fused_v{version}{tiles}")
        naive_bytes = b * h * n * n * 4
        free = CudaBackend(gemm="numba").free_memory_bytes()
        if naive_bytes > 0.8 * free:
            variants["tfm_naive"] = f"needs {naive_bytes / 2**30:.0f} GiB of scores; {free / 2**30:.0f} GiB free"
        elif n > 4096 and budget_s < 300:
            variants["tfm_naive"] = "about 1 s per call at this n: timed only with --budget-s >= 300"
        else:
            variants["tfm_naive"] = tfm_variant(CudaBackend(gemm="numba"), "tfm_naive", "naive")
        if torch is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            tq, tk, tv = (torch.as_tensor(a, device="cuda") for a in (q, k, v))
            for label, backend, copies in (("sdpa_math", SDPBackend.MATH, 3),
                                           ("sdpa_mem_efficient", SDPBackend.EFFICIENT_ATTENTION, 0)):
                if copies * naive_bytes > 0.8 * free:  # scores, their softmax and a mask/temporary
                    variants[label] = f"would need about {copies * naive_bytes / 2**30:.0f} GiB"
                    continue

                def sdpa(label=label, backend=backend):
                    with sdpa_kernel(backend):
                        outputs[label] = torch.nn.functional.scaled_dot_product_attention(
                            tq, tk, tv, is_causal=causal)
                variants[label] = sdpa
        else:
            variants["sdpa_math"] = variants["sdpa_mem_efficient"] = torch_reason

        def check(name, fn):
            fn()
            sync()
            out = outputs[name]
            host = out.cpu().numpy() if hasattr(out, "cpu") else out.copy_to_host()
            return rel_err(host[:, :, sample], expect)

        flops = 4.0 * b * h * n * n * d / (2 if causal else 1)  # QK^T and PV (FlashAttention's count)
        share = max(1.0, left / (len(cases) - i))
        first = len(rows)
        run_case(rows, base, variants, check, share * 0.9, 1e-4, flops=flops, peak=dev["fp32_peak_gflops"],
                 peer="sdpa_math" if torch is not None else None)
        mem_eff = [r["median_ms"] for r in rows[first:] if r["variant"] == "sdpa_mem_efficient" and "median_ms" in r]
        for r in rows[first:]:  # the second peer (3xTF32 on tensor cores: not like for like)
            if mem_eff and "median_ms" in r:
                r["speed_vs_sdpa_mem_efficient"] = mem_eff[0] / r["median_ms"]
        del dq, dk, dv, outputs
    return rows


def family_launch(budget_s: float, smoke: bool, dev: dict) -> list:
    """Host cost per launch of each launch path: a 1024-element add launched ``reps`` times."""
    from tfm.backends.cuda import _launch
    from tfm.backends.cuda.linear import _add_kernel

    rows = []
    base = {"kernel": "add", "elements": 1024}
    if simulator():
        return [dict(base, variant=m, status="skipped", reason="the simulator launches through numba's "
                     "dispatcher only") for m in _launch.LAUNCH_MODES]
    import contextlib

    offline = not gpu_present()
    if offline:
        from tfm.backends.cuda import _offline

        ctx = _offline.offline(stub_launch=True)
        arrays = [_offline.fake_device_array((1024,), np.float32, ptr=1 << (20 + i)) for i in range(3)]
        base["driver"] = "stubbed (no GPU): host side only"
    else:
        from numba import cuda

        ctx = contextlib.nullcontext()
        arrays = [cuda.to_device(np.ones(1024, np.float32)) for _ in range(3)]
        base["driver"] = dev["device"]
    reps = 200
    kernel = _add_kernel()
    t0 = time.monotonic()
    with ctx:
        def path(mode):
            def fn():
                _launch.set_launch_mode(mode)
                for _ in range(reps):
                    _launch.launch("add", kernel, (4,), 256, *arrays)
            return fn

        def check(name, fn):
            if offline:
                return 0.0  # nothing runs: the marshalling itself is tested in tests/test_cuda_ptx.py
            a, b = (np.random.default_rng(3).standard_normal(1024).astype(np.float32) for _ in range(2))
            arrays[0].copy_to_device(a)
            arrays[1].copy_to_device(b)
            fn()
            sync()
            return rel_err(arrays[2].copy_to_host(), a.astype(np.float64) + b)

        try:
            run_case(rows, base, {m: path(m) for m in _launch.LAUNCH_MODES}, check, budget_s * 0.8, 1e-6,
                     peer="dispatch", wait=(lambda: None) if offline else None)
        finally:
            _launch.set_launch_mode("direct")
    for row in rows:
        if "median_ms" in row:
            row["us_per_launch"] = row["median_ms"] * 1e3 / reps
    if offline:
        try:
            rows += host_forward(budget_s * 0.8 - (time.monotonic() - t0), smoke)
        except Exception as exc:  # the model's own code: a row, the kernel rows above stand
            rows.append({"kernel": "forward (host side only)", "variant": "*", "status": "failed",
                         "reason": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def host_forward(budget_s: float, smoke: bool) -> list:
    """Without a GPU: the host side of a base forward pass per launch path (driver stubbed,
    device memory made up, nothing computed): what the launch paths cost a whole model."""
    import torch

    import tfm
    from tfm.backends.cuda import CudaBackend, _launch, _offline

    cfg = dict(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24) \
        if smoke else dict(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048)
    b, n = (2, 5) if smoke else (8, 128)
    base = {"kernel": "forward (host side only)", "config": "toy" if smoke else "base", "B": b, "n": n,
            "driver": "stubbed (no GPU): host side only"}
    rows = []
    with _offline.offline(stub_launch=True, fake_memory=True):
        torch.manual_seed(0)
        module = torch.nn.Transformer(**cfg, dropout=0.0, batch_first=True).eval()
        model = tfm.from_torch(module, backend=CudaBackend(gemm="numba"))
        src = np.zeros((b, n, cfg["d_model"]), np.float32)
        ds, dt = _offline.fake_device_array(src.shape, src.dtype, ptr=1 << 30), \
            _offline.fake_device_array(src.shape, src.dtype, ptr=1 << 31)

        def path(mode):
            def fn():
                _launch.set_launch_mode(mode)
                model(ds, dt, tgt_is_causal=True)
            return fn

        try:
            run_case(rows, base, {m: path(m) for m in _launch.LAUNCH_MODES}, lambda name, fn: (fn(), 0.0)[1],
                     max(1.0, budget_s), 1.0, peer="dispatch", wait=lambda: None)
        finally:
            _launch.set_launch_mode("direct")
    return rows


def family_forward(budget_s: float, smoke: bool, dev: dict) -> list:
    from numba import cuda

    import tfm
    from tfm.backends.cuda import CudaBackend, _launch

    torch, torch_reason = torch_cuda()
    rng = np.random.default_rng(2)
    cfg = dict(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24) \
        if smoke else dict(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048)
    b, n = (2, 5) if smoke else (8, 128)
    base = {"config": "toy" if smoke else "base", "B": b, "n": n}
    try:
        import torch as torch_cpu
    except ImportError:
        return [dict(base, variant="*", status="skipped", reason="PyTorch is needed for the weights")]
    torch_cpu.manual_seed(0)
    module = torch_cpu.nn.Transformer(**cfg, dropout=0.0, batch_first=True).eval()
    src = rng.standard_normal((b, n, cfg["d_model"])).astype(np.float32)
    tgt = rng.standard_normal((b, n, cfg["d_model"])).astype(np.float32)
    mask = torch_cpu.nn.Transformer.generate_square_subsequent_mask(n)
    with torch_cpu.no_grad():
        ref64 = module.double()(torch_cpu.as_tensor(src, dtype=torch_cpu.float64),
                                torch_cpu.as_tensor(tgt, dtype=torch_cpu.float64),
                                tgt_mask=mask.double(), tgt_is_causal=True).numpy()
    module.float()
    pool = _pool_manager()
    variants, outputs, models = {}, {}, {}
    ds, dt = cuda.to_device(src), cuda.to_device(tgt)

    def tfm_variant(name, gemm, mode, caching):
        try:
            bk = CudaBackend(gemm=gemm)
        except ValueError as exc:
            return str(exc)
        if caching and pool is None:
            return "the caching pool is not installed in this process (see the lab's start)"
        models[name] = tfm.from_torch(module, backend=bk)

        def fn():
            _launch.set_launch_mode(mode)
            if pool is not None:
                pool.caching = caching
            outputs[name] = models[name](ds, dt, tgt_is_causal=True)
        return fn

    gemm_default = "cupy"
    for name, gemm, mode, caching in (("tfm_cublas_direct", gemm_default, "direct", False),
                                      ("tfm_cublas_direct_pool", gemm_default, "direct", True),
                                      ("tfm_cublas_dispatch", gemm_default, "dispatch", False),
                                      ("tfm_cublas_overload", gemm_default, "overload", False),
                                      ("tfm_numba_direct", "numba", "direct", False)):
        variants[name] = tfm_variant(name, gemm, mode, caching)
    if torch is not None:
        gpu_module = torch_cpu.nn.Transformer(**cfg, dropout=0.0, batch_first=True).eval()
        gpu_module.load_state_dict(module.state_dict())
        gpu_module = gpu_module.cuda()
        ts, tt, tm = (torch.as_tensor(a, device="cuda") for a in (src, tgt, mask.numpy()))

        def eager():  # to the host, as tfm's model returns a host array
            with torch.no_grad():
                outputs["torch_eager"] = gpu_module(ts, tt, tgt_mask=tm, tgt_is_causal=True).cpu()
        variants["torch_eager"] = eager
    else:
        variants["torch_eager"] = torch_reason

    counts = {}

    def check(name, fn):
        """One call, counting tfm's kernel launches, cuBLAS calls and device allocations."""
        from tfm.backends.cuda._launch import COUNTS

        allocs = [0]
        device_array = cuda.device_array

        def counting(*a, **kw):
            allocs[0] += 1
            return device_array(*a, **kw)

        before = dict(COUNTS)
        cuda.device_array = counting
        try:
            fn()
        finally:
            cuda.device_array = device_array
        sync()
        if name.startswith("tfm"):
            counts[name] = {"launches": COUNTS["launches"] - before["launches"],
                            "cublas_calls": COUNTS["cublas"] - before["cublas"], "allocations": allocs[0]}
        out = outputs[name]
        host = out.cpu().numpy() if hasattr(out, "cpu") else np.asarray(out)
        return rel_err(host, ref64)

    rows = []
    try:
        run_case(rows, base, variants, check, budget_s * 0.8, 1e-4,
                 peer="torch_eager" if torch is not None else None)
    finally:
        _launch.set_launch_mode("direct")
        if pool is not None:
            pool.caching = False
    for row in rows:
        row.update(counts.get(row["variant"], {}))
    return rows


def attention_backward_heads_reference(q, k, v, dout, heads, causal) -> list:
    """Float64 (dq, dk, dv) of the given (b, h) heads only, eq. 1's backward (tfm.reference)."""
    from tfm import reference as ref

    out = []
    for b, h in heads:
        qs, ks, vs, ds = (a[b, h].astype(np.float64) for a in (q, k, v, dout))
        o, lse = ref.scaled_dot_product_attention_train(qs, ks, vs, causal=causal)
        out.append(ref.scaled_dot_product_attention_backward(qs, ks, vs, o, lse, ds, causal=causal))
    return out


def family_backward(budget_s: float, smoke: bool, dev: dict) -> list:
    t_end = time.monotonic() + budget_s
    rows = backward_attention(0.55 * budget_s, smoke, dev)
    try:
        rows += backward_training_step(t_end - time.monotonic(), smoke, dev)
    except Exception as exc:  # the models' own code: a row, the kernel rows above stand
        traceback.print_exc()
        rows.append({"part": "training step", "variant": "*", "status": "failed",
                     "reason": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def backward_attention(budget_s: float, smoke: bool, dev: dict) -> list:
    """tfm's attention backward variants and tilings against SDPA's backward, interleaved."""
    from numba import cuda

    from tfm.backends.cuda import CudaBackend, attention
    from tfm.backends.cuda._launch import default_tuning

    rng = np.random.default_rng(3)
    b, h, d = (1, 2, 8) if smoke else (4, 16, 64)
    ns = [13] if smoke else [1024, 4096]
    tilings = [(8, 8, 2, 2)] if smoke else list(attention.BWD_TILINGS)
    torch, torch_reason = torch_cuda()
    base_tuning = default_tuning()
    heads = [(0, 0), (b - 1, h - 1)]
    rows = []
    t_end = time.monotonic() + budget_s
    cases = [(n, causal) for n in ns for causal in (False, True)]
    for i, (n, causal) in enumerate(cases):
        left = t_end - time.monotonic()
        base = {"part": "attention backward", "B": b, "H": h, "n": n, "d": d, "causal": causal}
        if left < 3:
            rows.append(dict(base, variant="*", status="skipped", reason="lab budget spent"))
            continue
        q, k, v, dout = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(4))
        expect = attention_backward_heads_reference(q, k, v, dout, heads, causal)
        dq_, dk_, dv_, ddo = (cuda.to_device(a) for a in (q, k, v, dout))
        ref_bk = CudaBackend(gemm="numba")
        out, lse = ref_bk.attention_train(dq_, dk_, dv_, causal=causal)
        variants, outputs = {}, {}

        def tfm_variant(bk, key, impl="fused"):
            def fn():
                outputs[key] = bk.attention_backward(dq_, dk_, dv_, out, lse, ddo, causal=causal, impl=impl)
            return fn

        # the default first (atomic dQ, default tiling), then the dQ pass, then the other tilings
        for tiles in tilings:
            for mode in ("atomic", "pass"):
                t = base_tuning.replace(attn_bwd=tiles, attn_bwd_dq=mode)
                variants[f"fused_{mode}{tiles}"] = tfm_variant(CudaBackend(tuning=t, gemm="numba"),
                                                                f"fused_{mode}{tiles}")
        free = ref_bk.free_memory_bytes()
        naive_bytes = 2 * b * h * n * n * 4
        if naive_bytes > 0.8 * free:
            variants["tfm_naive"] = f"needs {naive_bytes / 2**30:.0f} GiB for S and dP; {free / 2**30:.0f} GiB free"
        else:
            variants["tfm_naive"] = tfm_variant(CudaBackend(gemm="numba"), "tfm_naive", "naive")
        if torch is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            tq, tk, tv = (torch.as_tensor(a, device="cuda").requires_grad_() for a in (q, k, v))
            tdo = torch.as_tensor(dout, device="cuda")
            for label, backend, copies in (("sdpa_math", SDPBackend.MATH, 3),
                                           ("sdpa_mem_efficient", SDPBackend.EFFICIENT_ATTENTION, 0)):
                if copies * b * h * n * n * 4 > 0.8 * free:  # the graph keeps the weights (and more)
                    variants[label] = f"would need about {copies * b * h * n * n * 4 / 2**30:.0f} GiB"
                    continue
                with sdpa_kernel(backend):  # the forward once; the timed call is its backward
                    tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                def sdpa_backward(label=label, tout=tout):
                    outputs[label] = torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)
                variants[label] = sdpa_backward
        else:
            variants["sdpa_math"] = variants["sdpa_mem_efficient"] = torch_reason

        def check(name, fn):
            fn()
            sync()
            errs = []
            for grad, want in zip(outputs[name], zip(*expect)):
                host = grad.detach().cpu().numpy() if hasattr(grad, "cpu") else grad.copy_to_host()
                errs.append(rel_err(np.stack([host[bb, hh] for bb, hh in heads]), np.stack(want)))
            return max(errs)

        flops = 10.0 * b * h * n * n * d / (2 if causal else 1)  # 5 products of 2 n^2 d: 2.5x the forward
        first = len(rows)
        run_case(rows, base, variants, check, max(1.0, 0.9 * left / (len(cases) - i)), 1e-4, flops=flops,
                 peak=dev["fp32_peak_gflops"], peer="sdpa_math" if torch is not None else None)
        mem_eff = [r["median_ms"] for r in rows[first:] if r["variant"] == "sdpa_mem_efficient" and "median_ms" in r]
        for r in rows[first:]:  # the second peer (3xTF32 on tensor cores: not like for like)
            if mem_eff and "median_ms" in r:
                r["speed_vs_sdpa_mem_efficient"] = mem_eff[0] / r["median_ms"]
        del dq_, dk_, dv_, ddo, out, lse, outputs
    return rows


class _TorchTransformer:
    """The eager PyTorch peer of tfm.Transformer (built lazily: torch is imported only here)."""

    @staticmethod
    def build(torch, cfg):
        import math as _math

        from tfm.reference import positional_encoding

        nn = torch.nn

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.src_embed = nn.Embedding(cfg.src_vocab, cfg.d_model)
                self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.d_model)
                self.transformer = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_encoder_layers,
                                                  cfg.n_decoder_layers, cfg.d_ff, dropout=cfg.dropout,
                                                  batch_first=True)
                self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab, bias=False)
                self.drop = nn.Dropout(cfg.dropout)
                self.register_buffer("pe", torch.as_tensor(positional_encoding(cfg.max_len, cfg.d_model),
                                                           dtype=torch.float32))
                self.scale = _math.sqrt(cfg.d_model)

            def forward(self, src, tgt_in):
                ns, nt = src.shape[1], tgt_in.shape[1]
                x = self.drop(self.src_embed(src) * self.scale + self.pe[:ns])
                y = self.drop(self.tgt_embed(tgt_in) * self.scale + self.pe[:nt])
                mask = nn.Transformer.generate_square_subsequent_mask(nt, device=src.device, dtype=x.dtype)
                return self.generator(self.transformer(x, y, tgt_mask=mask, tgt_is_causal=True))

        return Model()

    @staticmethod
    def load(torch, module, params: dict) -> None:
        """tfm's parameter names are nn.Transformer's under ``transformer.``."""
        state = {}
        for name, value in params.items():
            key = f"transformer.{name}" if name.startswith(("encoder.", "decoder.")) else name
            state[key] = torch.as_tensor(np.asarray(value, np.float32))
        state["pe"] = module.pe
        module.load_state_dict(state)


def backward_training_step(budget_s: float, smoke: bool, dev: dict) -> list:
    """A base-config training step, tfm (cuBLAS, Numba GEMM, dQ pass) vs eager PyTorch, same weights."""
    import tfm
    from tfm.backends.cuda import CudaBackend
    from tfm.backends.cuda._launch import default_tuning
    from tfm.models import Transformer

    torch, torch_reason = torch_cuda()
    cfg = (tfm.TransformerConfig(d_model=12, n_heads=3, d_ff=20, n_encoder_layers=1, n_decoder_layers=1, src_vocab=11,
                                 tgt_vocab=13, max_len=32, final_norm=True, dropout=0.1) if smoke
           else tfm.TransformerConfig.base(final_norm=True, dropout=0.1))
    b, n = (2, 5) if smoke else (8, 128)
    base = {"part": "training step", "config": "toy" if smoke else "base", "B": b, "n": n}
    rng = np.random.default_rng(4)
    src, tgt = rng.integers(0, cfg.src_vocab, (b, n)), rng.integers(0, cfg.tgt_vocab, (b, n + 1))
    # the check batch: small enough for the float64 numpy backend on the host
    c_src, c_tgt = rng.integers(0, cfg.src_vocab, (2, 7)), rng.integers(0, cfg.tgt_vocab, (2, 8))
    start = Transformer(cfg, seed=0, backend="numpy")
    params = start.params
    want_loss, want_grads = start.eval().loss_and_grad(c_src, c_tgt, label_smoothing=0.1)
    variants, models, checks = {}, {}, {}
    lr = tfm.optim.noam(cfg.d_model, warmup_steps=4000)

    def tfm_variant(name, **backend_kw):
        try:
            bk = CudaBackend(**backend_kw)
        except ValueError as exc:
            return str(exc)
        model = Transformer.from_params(cfg, params, backend=bk)
        opt = tfm.optim.Adam(model, lr=lr)
        models[name] = model

        def check():
            model.eval()
            loss, grads = model.loss_and_grad(c_src, c_tgt, label_smoothing=0.1)
            model.train()
            return max([abs(loss - want_loss) / abs(want_loss)] + [rel_err(g, want_grads[k]) for k, g in grads.items()])
        checks[name] = check

        def fn():
            model.train_step(opt, src, tgt, label_smoothing=0.1)
        return fn

    variants["tfm_cublas"] = tfm_variant("tfm_cublas", gemm="cupy")
    variants["tfm_cublas_dq_pass"] = tfm_variant("tfm_cublas_dq_pass", gemm="cupy",
                                                 tuning=default_tuning().replace(attn_bwd_dq="pass"))
    variants["tfm_numba"] = tfm_variant("tfm_numba", gemm="numba")
    if torch is not None:
        module = _TorchTransformer.build(torch, cfg)
        _TorchTransformer.load(torch, module, params)
        module = module.cuda().train()
        opt_t = torch.optim.Adam(module.parameters(), lr=lr(1), betas=(0.9, 0.98), eps=1e-9)
        ts, tt = torch.as_tensor(src, device="cuda"), torch.as_tensor(tgt, device="cuda")

        def torch_check():
            module.eval()
            with torch.no_grad():
                cs, ct = torch.as_tensor(c_src, device="cuda"), torch.as_tensor(c_tgt, device="cuda")
                logits = module(cs, ct[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.tgt_vocab), ct[:, 1:].reshape(-1),
                                                         label_smoothing=0.1).item()
            module.train()
            return abs(loss - want_loss) / abs(want_loss)
        checks["torch_eager"] = torch_check

        def torch_step():
            opt_t.zero_grad(set_to_none=True)
            logits = module(ts, tt[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.tgt_vocab), tt[:, 1:].reshape(-1),
                                                     label_smoothing=0.1)
            loss.backward()
            opt_t.step()
            loss.item()  # the loss on the host, as tfm's train_step returns it
        variants["torch_eager"] = torch_step
    else:
        variants["torch_eager"] = torch_reason

    def check(name, fn):
        err = checks[name]()  # the same weights, before any step
        fn()  # one step (compiles what the check did not)
        sync()
        return err

    rows = []
    run_case(rows, base, variants, check, max(1.0, 0.9 * budget_s), 1e-4,
             peer="torch_eager" if torch is not None else None)
    for row in rows:
        if "median_ms" in row:
            row["tokens_per_s"] = b * n / (row["median_ms"] / 1e3)
            row["peer_note"] = ("eager nn.Transformer + nn.Embedding + F.cross_entropy + Adam (foreach), "
                                "float32, TF32 off" if row["variant"] == "torch_eager" else "")
    return rows


def ptx_mix(ptx: str) -> dict:
    """Instruction counts of a kernel's PTX body: the static mix (loops counted once), and the
    FMA share of the basic block with the most FMAs, the hot inner loop, which is what the
    dynamic mix approaches (64-bit integer PTX instructions become two SASS instructions, so
    the share on the card is lower still)."""
    counts = {"fma": 0, "lds_v4": 0, "lds_v2": 0, "lds_scalar": 0, "instructions": 0}
    block, blocks = [], []
    for line in ptx.split(".entry", 1)[1].splitlines():
        line = line.strip()
        if line.startswith("$") and line.endswith(":"):  # a label starts a new basic block
            blocks.append(block)
            block = []
            continue
        if not line or line.startswith(("//", ".", "{", "}", "(", ")", "$")) or line.endswith(":"):
            continue
        op = line.split()[1] if line.startswith("@") else line.split()[0]
        block.append(op)
        counts["instructions"] += 1
        if op.startswith("fma."):
            counts["fma"] += 1
        elif op.startswith("ld.shared"):
            counts["lds_v4" if ".v4." in op else "lds_v2" if ".v2." in op else "lds_scalar"] += 1
    blocks.append(block)
    hot = max(blocks, key=lambda b: sum(op.startswith("fma.") for op in b))
    counts["hot_loop_fma"] = sum(op.startswith("fma.") for op in hot)
    counts["hot_loop_instructions"] = len(hot)
    return counts


def family_ptx(budget_s: float, smoke: bool, dev: dict) -> list:
    """Static resources and instruction mix of every GEMM and fused-attention variant (sm_90)."""
    if simulator():
        return [{"variant": "*", "status": "skipped", "reason": "needs numba outside simulator mode"}]
    from numba import types as T

    from tfm.backends.cuda import _offline, attention, linear
    from tfm.backends.cuda._launch import Tuning

    if _offline.toolkit()[0] is None:
        return [{"variant": "*", "status": "skipped", "reason": "no CUDA toolkit (libNVVM, libdevice)"}]
    f1, f3 = T.Array(T.float32, 1, "C"), T.Array(T.float32, 3, "C")  # f3 also: lse and D (B, H, Nq)
    s4, mask = T.Array(T.float32, 4, "A"), T.Array(T.boolean, 4, "A")
    s32 = np.dtype(np.float32)
    cases = []
    for v in linear.GEMM_VERSIONS:
        for tiles in linear.TILINGS:
            threads = (tiles[0] // tiles[3]) * (tiles[1] // tiles[4])
            cases.append(({"kernel": "gemm", "version": v, "tiling": str(tiles), "threads": threads},
                          linear.gemm_kernel(s32, *tiles, True, 0, True, v), (f3, f3, f1, f3) + (T.int64,) * 3 + (T.float32,)))
    t = Tuning()
    for v in attention.ATTN_VERSIONS:
        for attn in attention.TILINGS[v]:
            tiles = attention.fused_tiles(t.replace(attn=attn), 64, 64, 4, v)
            cases.append(({"kernel": "attention_fused d=64", "version": v, "tiling": str(attn),
                           "threads": tiles[2] * tiles[3]},
                          attention.fused_kernel(s32, 64, 64, *tiles, False, False, v),
                          (s4,) * 4 + (f3, mask) + (T.int64,) * 4 + (T.float32, T.int64, T.int64)))
    bwd_tail = (mask,) + (T.int64,) * 4 + (T.float32, T.int64, T.int64)
    for tiling in attention.BWD_TILINGS:
        (bq, bkv, ty, tx), single = attention.fused_bwd_plan(t.replace(attn_bwd=tiling), 64, 64, 4)
        for atomic in (True, False):
            cases.append(({"kernel": f"attention_backward_kv d=64 {'atomic dQ' if atomic else 'no dQ'}", "version": 1,
                           "tiling": str(tiling), "threads": ty * tx},
                          attention.bwd_kv_kernel(s32, 64, 64, bq, bkv, ty, tx, False, False, atomic, single),
                          (s4,) * 4 + (f3, f3) + (s4,) * 3 + bwd_tail))
        cases.append(({"kernel": "attention_backward_dq_pass d=64", "version": 1, "tiling": str(tiling),
                       "threads": ty * tx},
                      attention.bwd_dq_kernel(s32, 64, 64, bq, bkv, ty, tx, False, False),
                      (s4,) * 4 + (f3, f3, s4) + bwd_tail))
    rows = []
    t_end = time.monotonic() + budget_s
    with _offline.offline():
        for base, kernel, sig in cases:
            if time.monotonic() > t_end:
                rows.append(dict(base, variant=f"v{base['version']}", status="skipped", reason="lab budget spent"))
                continue
            try:
                ptx = _offline.compile_ptx(kernel, sig)
                rep = _offline.ptxas_report(ptx) or {}
            except Exception as exc:
                rows.append(dict(base, variant=f"v{base['version']}", status="failed",
                                 reason=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            mix = ptx_mix(ptx)
            rows.append(dict(base, variant=f"v{base['version']}", status="ok",
                             registers=rep.get("registers"), smem_bytes=rep.get("smem"),
                             spill_bytes=(rep.get("spill_stores", 0) or 0) + (rep.get("spill_loads", 0) or 0),
                             **mix, hot_loop_fma_share=mix["hot_loop_fma"] / max(1, mix["hot_loop_instructions"])))
    return rows


# ---------------------------------------------------------------------- main
_POOL = []


def _pool_manager():
    """The lab's PoolMemoryManager (installed at start, before any CUDA context), or None."""
    if not _POOL:
        return None
    from numba import cuda

    mm = cuda.current_context().memory_manager
    return mm if hasattr(mm, "caching") else None


def install_pool() -> None:
    """Every allocation of the lab goes through the pool, with caching off except where a
    ``forward`` variant turns it on: pool on/off is then timed interleaved in one process."""
    if simulator():
        return
    from numba import cuda

    from tfm.backends.cuda._memory import PoolMemoryManager

    cuda.set_memory_manager(PoolMemoryManager)
    mm = cuda.current_context().memory_manager
    if isinstance(mm, PoolMemoryManager):
        mm.caching = False
        _POOL.append(mm)


def summary(results: dict, dev: dict, args, budget: Budget) -> str:
    lines = [f"# CUDA lab: {dev['device']}", "",
             f"`python3 -m dev.cuda.lab --out {args.out} --budget-s {args.budget_s:g}"
             + ("" if args.family == ",".join(GPU_FAMILIES) else f" --family {args.family}")
             + (" --smoke" if args.smoke else "") + f"` ({budget.elapsed():.0f} s; FP32 peak "
             f"{dev['fp32_peak_gflops']:.0f} GFLOP/s from {dev['sms']} SMs at {dev['clock_mhz']:.0f} MHz)", ""]
    for family, rows in results.items():
        lines += [f"## {family}", ""]
        for row in rows:
            shape = ", ".join(f"{k}={row[k]}" for k in ("part", "M", "K", "N", "B", "H", "n", "d", "causal", "config")
                              if k in row)
            if row.get("status") == "ok":
                extra = "".join(f", {k} {row[k]:.2f}" for k in row if k.startswith("speed_vs_"))
                if "frac_fp32_peak" in row and row["frac_fp32_peak"] == row["frac_fp32_peak"]:
                    extra += f", {100 * row['frac_fp32_peak']:.1f}% of FP32 peak"
                if "us_per_launch" in row:
                    extra += f", {row['us_per_launch']:.1f} us/launch"
                if "launches" in row:
                    extra += (f", {row['launches']} launches + {row['cublas_calls']} cuBLAS calls, "
                              f"{row['allocations']} allocations per call")
                if "registers" in row:
                    lines.append(f"- {row['kernel']} {row['variant']}{row['tiling']}: {row['registers']} registers "
                                 f"x {row['threads']} threads, {row['smem_bytes']} B smem, {row['spill_bytes']} B "
                                 f"spilled; hot loop {row['hot_loop_fma']} FMA / {row['hot_loop_instructions']} PTX "
                                 f"instructions; shared loads {row['lds_v4']} x16 B, {row['lds_v2']} x8 B, "
                                 f"{row['lds_scalar']} x4 B")
                    continue
                lines.append(f"- {shape}: {row['variant']} {row['median_ms']:.3f} ms "
                             f"(IQR {row['iqr_ms']:.3f}){extra}")
            else:
                lines.append(f"- {shape}: {row['variant']} {row.get('status')}: {row.get('reason')}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the CSV files and SUMMARY.md")
    p.add_argument("--budget-s", type=float, default=100.0, help="wall-clock budget, JIT included")
    p.add_argument("--smoke", action="store_true", help="toy sizes (for the simulator)")
    p.add_argument("--family", default=",".join(GPU_FAMILIES),
                   help="comma-separated subset of " + ", ".join(FAMILIES) + " (default: all but ptx)")
    args = p.parse_args(argv)
    families = [f for f in args.family.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    budget = Budget(args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    if not (simulator() or gpu_present()) and not set(families) <= {"launch", "ptx"}:
        print("no GPU and no simulator: only `--family ptx,launch` run here (compiled offline; launches "
              "with the driver stubbed); set NUMBA_ENABLE_CUDASIM=1 for the --smoke run", file=sys.stderr)
        return 2
    if simulator() and not args.smoke:
        print("under NUMBA_ENABLE_CUDASIM=1 the lab runs only with --smoke (toy sizes)", file=sys.stderr)
        return 2
    if gpu_present():
        install_pool()
    if args.smoke:
        ROUNDS.update(min=1, max=2)
    if simulator():
        # every simulated thread is a Python thread: switching more often than every 5 ms makes
        # barrier-heavy kernels several times faster (as tests/cuda/conftest.py does)
        sys.setswitchinterval(5e-4)
    dev = device_row() if (simulator() or gpu_present()) else {"device": "none (host only)", "sms": 0,
                                                               "clock_mhz": 0.0, "fp32_peak_gflops": math.nan}
    log(budget, f"device: {dev}")
    runners = {"gemm": family_gemm, "attention": family_attention, "launch": family_launch,
               "forward": family_forward, "backward": family_backward, "ptx": family_ptx}
    weights = {"gemm": 0.3, "attention": 0.4, "launch": 0.05, "forward": 0.25, "backward": 0.5, "ptx": 0.3}
    results = {}
    for i, family in enumerate(families):
        left = budget.left() - 3.0  # keep time to write the summary
        share = left * weights[family] / sum(weights[f] for f in families[i:])
        log(budget, f"{family}: {share:.0f} s of {left:.0f} s left")
        try:
            rows = runners[family](share, args.smoke, dev) if left > 2 else \
                [{"variant": "*", "status": "skipped", "reason": "lab budget spent"}]
        except Exception as exc:
            traceback.print_exc()
            rows = [{"variant": "*", "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}]
        for row in rows:
            row.setdefault("device", dev["device"])
        results[family] = rows
        write_csv(os.path.join(args.out, f"{family}.csv"), rows)
        log(budget, f"{family}: {sum(r.get('status') == 'ok' for r in rows)} timed, "
                    f"{sum(r.get('status') != 'ok' for r in rows)} other rows")
    text = summary(results, dev, args, budget)
    with open(os.path.join(args.out, "SUMMARY.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    bad = [r for rows in results.values() for r in rows if r.get("status") in ("failed", "wrong")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
