"""The GPU run in one command: ``make gpu-check GPU_PYTHON=python3 GPU_OUT=<dir>``.

Made for a machine lent for a few minutes (../shared/GPU.md): no network, preinstalled
packages, one output folder of at most 8 files kept. ``python -m studies.gpu --out DIR``
runs these sections in order, each inside its own error handling (a failure becomes rows
with the error as the reason, and the next section still runs), each writing its file as
soon as it ends, with progress and elapsed time on stdout:

  machine      machine.json     host fingerprint; the device (name, compute capability, SMs,
                                boost clock, memory, driver, CUDA runtime, numba/numba-cuda/
                                numpy/torch/cupy versions); ceilings measured now: FP32
                                CUDA-core peak, cuBLAS SGEMM, device copy bandwidth
  smoke        smoke.csv        every backend method once at ragged sizes, default (H100/H200)
                                tiles, checked launches (TFM_CUDA_CHECK=1), against the float64
                                reference (tfm.bench.conformance)
  correctness  correctness.csv  real sizes: fused attention B=4 H=16 d=64 up to n = 16384,
                                naive to 4097 (key padding, causal or not), each GEMM at model
                                shapes, recurrent, convolutional and restricted layers, the
                                base-config encoder-decoder, all against float64; backward
                                passes (check_backward): attention (fused with atomic dQ and
                                with the dQ pass, naive) to n = 4096, linear, layer norm,
                                cross-entropy, LSTM BPTT at d = 512, and a base-config training
                                step's loss and gradients against the float64 numpy backend
  studies      studies.csv      the studies on backend "cuda" with their ``gpu`` grids, in the
                                studies' own row format (fingerprint, status, reason,
                                tfm_source), one ``study`` column naming each; the report
                                (studies/report.py) reads them from results/gpu/
  SUMMARY.md                    rewritten after every section: what ran, what failed, headlines

``--budget-s`` (default 330) caps the whole run: a section starts only if its minimum fits
in what is left, and each study stops measuring at the end of its share of what is left (by
``SHARE_WEIGHT``, over the studies not yet run; its remaining cases become ``over_budget`` rows
that say so). ``--smoke`` runs every section at toy sizes under Numba's
simulator (``NUMBA_ENABLE_CUDASIM=1``); CI runs it through the Makefile.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _source_hash() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tfm_source", _ROOT / "tfm" / "_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash()


# Before numba is imported (studies._common would otherwise choose a folder under .venv, and
# the GPU run creates no virtual environment).
os.environ.setdefault("NUMBA_CACHE_DIR", str(_ROOT / ".numba-cache" / _source_hash()))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import _common  # noqa: E402,F401 - Agg backend, OMP wait policy, torch after tfm

from . import GPU_STUDIES  # noqa: E402 - most telling first, so a run cut short keeps what matters most
FILES = ("machine.json", "smoke.csv", "correctness.csv", "studies.csv", "SUMMARY.md")
# Seconds a section needs at least to start (compilation dominates the first two).
MIN_SECONDS = {"smoke": 20.0, "correctness": 20.0, "study": 15.0}
# Each study's weight in the share of what is left: peers holds the most pairs (35 on the H200
# run, 103 s of measuring, its training pairs last).
SHARE_WEIGHT = {"peers": 3.0}

GRIDS = {
    "gpu": dict(attn_bhd=(4, 16, 64), attn_n=(1, 37, 1000, 4097, 16384), naive_max_n=4097, torch_full_max_n=4097,
                gemm=((2048, 512, 2048), (2048, 2048, 512), (8192, 512, 1536)), layers_bnd=(4, 1000, 512),
                model="base", model_bn=(2, 19, 16), conformance="ragged",
                bwd_n=(37, 1000, 4096), bwd_naive_max_n=4096, ce_tv=(1024, 32000), train_bn=(2, 7)),
    "smoke": dict(attn_bhd=(1, 2, 8), attn_n=(1, 13), naive_max_n=13, torch_full_max_n=13, gemm=((9, 12, 10),),
                  layers_bnd=(2, 9, 8), model="tiny", model_bn=(2, 5, 4), conformance="tiny",
                  bwd_n=(13,), bwd_naive_max_n=13, ce_tv=(9, 11), train_bn=(2, 5)),
}


class Run:
    """Clock, budget, output folder and the summary of one GPU run."""

    def __init__(self, out: Path, budget_s: float, command: str):
        self.out, self.budget_s, self.command = out, budget_s, command
        self.t0 = time.perf_counter()
        self.sections: list[dict] = []
        self.machine: dict = {}
        self.tables: dict[str, pd.DataFrame] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def write_csv(self, name: str, df: pd.DataFrame) -> None:
        from tfm.bench import write_atomic

        self.tables[name] = df
        write_atomic(df, self.out / f"{name}.csv")

    def section(self, name: str, fn, minimum: float) -> None:
        """Run ``fn()`` if ``minimum`` seconds are left; record how it went either way."""
        rec = {"section": name, "status": "ok", "seconds": 0.0, "reason": ""}
        if self.left() < minimum:
            rec.update(status="over_budget", reason=f"{self.left():.0f} s of the {self.budget_s:.0f} s budget "
                                                    f"left, the section needs at least {minimum:.0f} s")
            self.say(f"{name}: skipped ({rec['reason']})")
        else:
            self.say(f"{name} ...")
            t0 = time.perf_counter()
            try:
                fn()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: the next section still runs
                traceback.print_exc()
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
            rec["seconds"] = time.perf_counter() - t0
            self.say(f"{name}: {rec['status']} in {rec['seconds']:.1f} s" + (f" ({rec['reason']})" if rec["reason"] else ""))
        self.sections.append(rec)
        self.write_summary()

    def write_summary(self) -> None:
        (self.out / "SUMMARY.md").write_text(summary_markdown(self))


# ------------------------------------------------------------------------------ sections
def section_machine(run: Run, smoke: bool) -> None:
    from tfm.bench import fingerprint, measure_ceilings

    m = {**fingerprint(), **measure_ceilings(quick=smoke)}
    m.update(command=run.command, budget_s=run.budget_s)
    run.machine = m
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
    (run.out / "machine.json").write_text(json.dumps(clean, indent=2, default=str))
    run.say(f"device: {m.get('device_name')} (sm_{str(m.get('device_cc', '')).replace('.', '')}, "
            f"{m.get('device_sms')} SMs, {m.get('device_clock_mhz')} MHz max), driver {m.get('device_driver')}, "
            f"runtime {m.get('device_cuda_runtime')}; FP32 peak {m.get('device_fp32_peak_gflops'):.0f} GFLOP/s, "
            f"cuBLAS SGEMM {m.get('device_sgemm_gflops'):.0f} GFLOP/s, copy {m.get('device_mem_bw_gbs'):.0f} GB/s")


def section_smoke(run: Run, bk, grid: dict) -> None:
    from tfm.bench.conformance import check_backend

    previous = os.environ.get("TFM_CUDA_CHECK")
    os.environ["TFM_CUDA_CHECK"] = "1"  # synchronize after every launch: a failure names its kernel
    rows: list[dict] = []

    def progress(row):
        rows.append(row)
        mark = "ok" if row["passed"] else ("FAIL " + (row["reason"] or f"rel_err {row['rel_err']:.2e}"))
        run.say(f"  smoke {row['op']:<28} {row['seconds']:6.2f} s  {mark}")
        run.write_csv("smoke", pd.DataFrame(rows))

    try:
        check_backend(bk, grid["conformance"], progress=progress)
    finally:
        if previous is None:
            os.environ.pop("TFM_CUDA_CHECK", None)
        else:
            os.environ["TFM_CUDA_CHECK"] = previous


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, "this PyTorch has no usable CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, ""


def _sample_rows(n: int, rng, k: int = 6) -> np.ndarray:
    """First, last, middle, the last full 64-row tile's end, and k random query rows."""
    return np.array(sorted({0, n - 1, n // 2, max(0, n - 1 - (n % 64))} | set(rng.integers(0, n, k).tolist())))


def check_attention(bk, grid, rng, emit) -> None:
    from tfm.bench.conformance import attention_rows_reference, rel_err

    torch, _ = _torch_cuda()
    b, h, d = grid["attn_bhd"]
    for n in grid["attn_n"]:
        q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(3))
        keep = np.ones((b, n), bool)
        keep[0, n - max(1, n // 5):] = False  # padding at the end of sequence 0
        dq, dk, dv, dmask = bk.asarray(q), bk.asarray(k), bk.asarray(v), bk.asarray(keep[:, None, None, :])
        for impl in ("fused", "naive"):
            if impl == "naive" and n > grid["naive_max_n"]:
                continue
            for causal in (False, True):
                out = bk.to_numpy(bk.attention(dq, dk, dv, dmask, causal, impl))
                if torch is not None and n <= grid["torch_full_max_n"]:
                    allowed = torch.as_tensor(keep, device="cuda")[:, None, None, :]
                    if causal:
                        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
                    tq, tk, tv = (torch.as_tensor(a, device="cuda", dtype=torch.float64) for a in (q, k, v))
                    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed)
                    ref = torch.nan_to_num(ref, nan=0.0).cpu().numpy()  # rows with no key: SDPA NaN, tfm 0
                    err, how = rel_err(out, ref), "every row vs PyTorch SDPA in float64 on the GPU"
                    del tq, tk, tv, ref
                else:
                    rows = _sample_rows(n, rng)
                    err = rel_err(out[:, :, rows], attention_rows_reference(q, k, v, rows, keep, causal))
                    how = f"{len(rows)} sampled query rows vs float64 NumPy"
                emit(f"attention_{impl}", f"B={b} H={h} n={n} d={d}", causal, err, 2e-5, how + "; key padding")


def check_layers(bk, grid, rng, emit) -> None:
    from tfm import get_backend, table1
    from tfm.backends.cuda import CudaBackend
    from tfm.bench.conformance import rel_err

    ref = get_backend("numpy")
    for m, k, n in grid["gemm"]:
        x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64).T
        for gemm in ("numba", "cupy"):
            try:
                other = CudaBackend(tuning=bk.tuning, gemm=gemm)
            except ValueError as exc:  # CuPy absent
                emit(f"linear_{gemm}", f"{m}x{k} @ {k}x{n}", False, math.nan, 2e-5, str(exc), status="unavailable")
                continue
            got = other.to_numpy(other.linear(other.asarray(x), other.asarray(w)))
            emit(f"linear_{gemm}", f"{m}x{k} @ {k}x{n}", False, rel_err(got, want), 2e-5, "vs float64 NumPy")

    b, n, d = grid["layers_bnd"]
    x = rng.standard_normal((b, n, d), dtype=np.float32)
    h0 = (0.5 * rng.standard_normal((b, d))).astype(np.float32)
    s = 1.0 / math.sqrt(d)
    for kind, gates in (("lstm", 4), ("gru", 3)):
        w_ih, w_hh = ((s * rng.standard_normal((gates * d, d))).astype(np.float32) for _ in range(2))
        b_ih, b_hh = ((0.1 * rng.standard_normal(gates * d)).astype(np.float32) for _ in range(2))
        args = (x, h0) + ((h0,) if kind == "lstm" else ()) + (w_ih, w_hh, b_ih, b_hh)
        got = getattr(bk, f"{kind}_layer")(*(bk.asarray(a) for a in args))
        want = getattr(ref, f"{kind}_layer")(*(a.astype(np.float64) for a in args))
        err = max(rel_err(bk.to_numpy(g), w_) for g, w_ in zip(got, want))
        emit(kind, f"B={b} n={n} d={d}", False, err, 1e-4, "every output and final state vs float64 NumPy")
    k, dil = table1.K, table1.DILATION
    w = (rng.standard_normal((d, d, k)) / math.sqrt(k * d)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(d)).astype(np.float32)
    pad = dil * (k - 1)  # causal: every pad on the left
    got = bk.to_numpy(bk.conv1d(bk.asarray(x), bk.asarray(w), bk.asarray(bias), dil, pad, 0))
    want = ref.conv1d(x.astype(np.float64), w.astype(np.float64), bias.astype(np.float64), dil, pad, 0)
    emit("conv1d_dilated_causal", f"B={b} n={n} d={d} k={k} dilation={dil}", True, rel_err(got, want), 2e-5,
         "vs float64 NumPy")
    hb = max(1, d // 64)
    q, kk, v = (rng.standard_normal((b, hb, n, d // hb), dtype=np.float32) for _ in range(3))
    for causal in (False, True):
        got = bk.to_numpy(bk.restricted_attention(bk.asarray(q), bk.asarray(kk), bk.asarray(v), table1.R, causal))
        want = ref.restricted_attention(*(a.astype(np.float64) for a in (q, kk, v)), table1.R, causal)
        emit("restricted_attention", f"B={b} H={hb} n={n} r={table1.R}", causal, rel_err(got, want), 2e-5,
             "vs float64 NumPy")


def check_model(bk, grid, rng, emit) -> None:
    from tfm.bench.conformance import rel_err
    from tfm.config import TransformerConfig
    from tfm.models import EncoderDecoder

    cfg = (TransformerConfig.base() if grid["model"] == "base" else
           TransformerConfig.tiny(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2, d_ff=24))
    b, ns, nt = grid["model_bn"]
    model = EncoderDecoder(cfg, seed=0, backend=bk)
    oracle = EncoderDecoder.from_params(cfg, model.params, backend="numpy")
    src = rng.standard_normal((b, ns, cfg.d_model)).astype(np.float32)
    tgt = rng.standard_normal((b, nt, cfg.d_model)).astype(np.float32)
    err = rel_err(bk.to_numpy(model(src, tgt, tgt_is_causal=True)), oracle(src, tgt, tgt_is_causal=True))
    emit("encoder_decoder_forward", f"{grid['model']} B={b} Ns={ns} Nt={nt}", True, err, 1e-4,
         "float32 cuda vs float64 numpy backend, same weights")


def check_backward(bk, grid, rng, emit) -> None:
    """Backward passes at real sizes against float64: attention (two whole heads of B=4, H=16,
    d=64 per n; key padding, causal or not), linear (both GEMMs), layer norm with residual,
    cross-entropy with label smoothing, LSTM backpropagation through time at d=512, and a
    training step's loss and every parameter gradient (dropout on, the same masks) against the
    float64 numpy backend with the same weights."""
    from tfm import get_backend
    from tfm import reference as ref
    from tfm.backends.cuda import CudaBackend
    from tfm.bench.conformance import rel_err
    from tfm.config import TransformerConfig
    from tfm.models import Transformer
    from tfm.reference import baselines as ref_base

    b, h, d = grid["attn_bhd"]
    heads = [(0, 0), (b - 1, h - 1)]
    pass_bk = CudaBackend(tuning=bk.tuning.replace(attn_bwd_dq="pass"), gemm=bk.gemm)
    for n in grid["bwd_n"]:
        q, k, v, dout = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(4))
        keep = np.ones((b, n), bool)
        keep[0, n - max(1, n // 5):] = False  # padding at the end of sequence 0
        dev, dmask = [bk.asarray(a) for a in (q, k, v, dout)], bk.asarray(keep[:, None, None, :])
        for causal in (False, True):
            want = []
            for hb, hh in heads:
                args = [a[hb, hh].astype(np.float64) for a in (q, k, v)]
                out, lse = ref.scaled_dot_product_attention_train(*args, mask=keep[hb], causal=causal)
                want.append(ref.scaled_dot_product_attention_backward(*args, out, lse, dout[hb, hh].astype(np.float64),
                                                                      mask=keep[hb], causal=causal))
            for label, other, impl in (("fused_atomic", bk, "fused"), ("fused_pass", pass_bk, "fused"),
                                       ("naive", bk, "naive")):
                if (impl == "naive" and n > grid["bwd_naive_max_n"]) or (other is pass_bk and not causal):
                    continue  # the dQ pass causal only: each mask form it meets is one more compilation
                out, lse = other.attention_train(*dev[:3], dmask, causal, impl)
                grads = [other.to_numpy(g) for g in other.attention_backward(*dev[:3], out, lse, dev[3], dmask,
                                                                             causal, impl)]
                err = max(rel_err(np.stack([g[hb, hh] for hb, hh in heads]), np.stack([w[i] for w in want]))
                          for i, g in enumerate(grads))
                emit(f"attention_backward_{label}", f"B={b} H={h} n={n} d={d}", causal, err, 5e-5,
                     f"dq, dk, dv of heads {heads} vs float64 NumPy; key padding")

    m, kk, nn = grid["gemm"][0]
    x, w, dy = (rng.standard_normal(shape, dtype=np.float32) for shape in ((m, kk), (nn, kk), (m, nn)))
    want = ref.linear_backward(x, w, dy)
    for gemm in ("numba", "cupy"):
        try:
            other = CudaBackend(tuning=bk.tuning, gemm=gemm)
        except ValueError as exc:  # CuPy absent
            emit(f"linear_backward_{gemm}", f"{m}x{kk} -> {nn}", False, math.nan, 2e-5, str(exc), status="unavailable")
            continue
        got = other.linear_backward(other.asarray(x), other.asarray(w), other.asarray(dy))
        emit(f"linear_backward_{gemm}", f"{m}x{kk} -> {nn}", False,
             max(rel_err(other.to_numpy(g), e) for g, e in zip(got, want)), 2e-5, "dx, dW, db vs float64 NumPy")

    b, n, d = grid["layers_bnd"]
    x, res, dy = (rng.standard_normal((b, n, d), dtype=np.float32) for _ in range(3))
    gamma, beta = (rng.standard_normal(d, dtype=np.float32) for _ in range(2))
    _, mean, rstd = bk.layer_norm_train(bk.asarray(x), bk.asarray(gamma), bk.asarray(beta), 1e-5, bk.asarray(res))
    got = bk.layer_norm_backward(bk.asarray(dy), bk.asarray(x), bk.asarray(gamma), mean, rstd, bk.asarray(res))
    _, w_mean, w_rstd = ref.layer_norm_train(x, gamma, beta, 1e-5, res)
    want = ref.layer_norm_backward(dy, x, gamma, w_mean, w_rstd, res)
    emit("layer_norm_backward", f"B={b} n={n} d={d} + residual", False,
         max(rel_err(bk.to_numpy(g), e) for g, e in zip(got, want)), 2e-5, "dx, dgamma, dbeta vs float64 NumPy")

    t, vocab = grid["ce_tv"]
    z = (3 * rng.standard_normal((t, vocab))).astype(np.float32)
    targets, weights = rng.integers(0, vocab, t), np.full(t, 1.0 / t)
    losses, dz = bk.cross_entropy(bk.asarray(z), targets, weights, 0.1)
    err = max(rel_err(losses, ref.cross_entropy(z, targets, 0.1)),
              rel_err(bk.to_numpy(dz), ref.cross_entropy_backward(z, targets, weights, 0.1)))
    emit("cross_entropy", f"T={t} V={vocab} smoothing=0.1", False, err, 2e-5, "losses and dlogits vs float64 NumPy")

    s = 1.0 / math.sqrt(d)
    args = [rng.standard_normal((b, n, d), dtype=np.float32)] + [(0.5 * rng.standard_normal((b, d))).astype(np.float32)
                                                                for _ in range(2)]
    args += [(s * rng.standard_normal((4 * d, d))).astype(np.float32) for _ in range(2)]
    args += [(0.1 * rng.standard_normal(4 * d)).astype(np.float32) for _ in range(2)]
    cots = [rng.standard_normal((b, n, d), dtype=np.float32)] + [rng.standard_normal((b, d), dtype=np.float32)
                                                                 for _ in range(2)]
    *_, saved = bk.lstm_layer_train(*(bk.asarray(a) for a in args))
    got = bk.lstm_layer_backward(saved, *(bk.asarray(c) for c in cots))
    *_, w_saved = ref_base.lstm_layer_train(*args)
    want = ref_base.lstm_layer_backward(w_saved, *cots)
    emit("lstm_backward", f"B={b} n={n} d={d}", False, max(rel_err(bk.to_numpy(g), e) for g, e in zip(got, want)),
         1e-4, "BPTT: dx, dh0, dc0 and the four parameter gradients vs float64 NumPy")

    cfg = (TransformerConfig.base(dropout=0.1) if grid["model"] == "base" else
           TransformerConfig.tiny(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2, d_ff=24, dropout=0.1))
    bt, nt = grid["train_bn"]
    model = Transformer(cfg, seed=0, backend=bk).train(seed=3)
    oracle = Transformer.from_params(cfg, model.params, backend=get_backend("numpy")).train(seed=3)
    src, tgt = rng.integers(0, cfg.src_vocab, (bt, nt)), rng.integers(0, cfg.tgt_vocab, (bt, nt + 1))
    loss, grads = model.loss_and_grad(src, tgt, label_smoothing=0.1)
    w_loss, w_grads = oracle.loss_and_grad(src, tgt, label_smoothing=0.1)
    err = max([abs(loss - w_loss) / abs(w_loss)] + [rel_err(g, w_grads[name]) for name, g in grads.items()])
    emit("training_step_gradients", f"{grid['model']} B={bt} n={nt}", True, err, 1e-4,
         f"loss and all {len(grads)} parameter gradients (dropout 0.1, label smoothing 0.1, same masks) vs the "
         f"float64 numpy backend, same weights")


def section_correctness(run: Run, bk, grid: dict, seed: int) -> None:
    rows: list[dict] = []

    def emit(check, size, causal, err, tol, note, status="ok"):
        """One row; ``status`` "unavailable" (e.g. no cuBLAS under the simulator) is not a failure."""
        rows.append({"check": check, "size": size, "causal": causal, "rel_err": err, "tol": tol,
                     "passed": bool(err <= tol), "status": status, "note": note})
        mark = "unavailable" if status == "unavailable" else ("ok" if err <= tol else "FAIL")
        run.say(f"  {check:<24} {size:<28} causal={causal!s:<5} rel_err {err:.2e} {mark}")
        run.write_csv("correctness", pd.DataFrame(rows))

    rng = np.random.default_rng(seed)
    for part in (check_attention, check_layers, check_model, check_backward):
        try:
            part(bk, grid, rng, emit)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one part failing keeps the others
            traceback.print_exc()
            emit(part.__name__, "", False, math.nan, 0.0, f"{type(exc).__name__}: {exc}"[:400], status="error")


def section_studies(run: Run, smoke: bool, names, scratch: Path) -> None:
    from tfm.bench import Skip, run_study

    frames: list[pd.DataFrame] = []

    def save():
        run.write_csv("studies", pd.concat(frames, ignore_index=True, sort=False))

    names = list(names)
    for i, name in enumerate(names):
        left = run.left()
        if left < MIN_SECONDS["study"]:
            frames.append(pd.DataFrame([{"study": name, "status": "over_budget",
                                         "reason": f"the GPU run's budget ({run.budget_s:.0f} s) ran out "
                                                   f"before this study started"}]))
            run.say(f"  {name}: skipped, budget spent")
            save()
            continue
        # A weighted share of what is left (what a study leaves unused passes to the next): on the
        # H200 run of 2026-11-29, peers alone spent 103 s and the six studies after sequential none.
        weights = [SHARE_WEIGHT.get(n, 1.0) for n in names[i:]]
        deadline = time.perf_counter() + left * weights[0] / sum(weights)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"studies.{name}")
            args = mod.arg_parser().parse_args(["--backend", "cuda", "--grid", "smoke" if smoke else "gpu",
                                                "--out", str(scratch), "--no-progress"])
            study = mod.build(args)
            count = {"done": 0}

            def measure(case, ctx, _inner=study.measure, _name=name, _total=len(study.cases)):
                if time.perf_counter() > deadline:
                    raise Skip(f"this study's share of the GPU run's budget ({run.budget_s:.0f} s) ran out",
                               "over_budget")
                t = time.perf_counter()
                try:
                    return _inner(case, ctx)
                finally:
                    count["done"] += 1
                    run.say(f"  {_name} {count['done']}/{_total} "
                            f"{', '.join(f'{k}={v}' for k, v in case.items())[:70]} ({time.perf_counter() - t:.2f} s)")

            df = run_study(dataclasses.replace(study, measure=measure), scratch, quick=smoke, fresh=True,
                           progress=False)
            df.insert(0, "study", name)
            counts = df["status"].value_counts().to_dict() if "status" in df.columns else {}
            run.say(f"  {name}: {counts} in {time.perf_counter() - t0:.1f} s")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a study's argument parser too
            traceback.print_exc()
            df = pd.DataFrame([{"study": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}])
            run.say(f"  {name}: error ({type(exc).__name__}: {exc})")
        frames.append(df)
        save()


# ------------------------------------------------------------------------------ summary
def _md(df: pd.DataFrame, cols=None, max_rows: int = 60) -> str:
    from .report import md_table

    if df is not None and cols is not None:
        df = df[[c for c in cols if c in df.columns]]
    return md_table(None if df is None else df.head(max_rows))


def summary_markdown(run: Run) -> str:
    m = run.machine
    lines = ["# tfm GPU run", "", f"- command: `{run.command}`", f"- budget: {run.budget_s:.0f} s; "
             f"elapsed: {run.elapsed():.0f} s"]
    if m:
        lines += [f"- started: {m.get('date_utc')} at commit {m.get('git_commit')} (tfm sources {m.get('tfm_source')})",
                  f"- device: {m.get('device_name')}, compute capability {m.get('device_cc')}, {m.get('device_sms')} SMs, "
                  f"max SM clock {m.get('device_clock_mhz')} MHz, driver {m.get('device_driver')}, "
                  f"CUDA runtime {m.get('device_cuda_runtime')}" + (f" ({m['device_reason']})" if m.get("device_reason") else ""),
                  f"- versions: numba {m.get('v_numba')}, numba-cuda {m.get('v_numba_cuda')}, numpy {m.get('v_numpy')}, "
                  f"torch {m.get('v_torch')}, cupy {m.get('v_cupy')}",
                  f"- FP32 CUDA-core peak: {m.get('device_fp32_peak_gflops')} GFLOP/s = {m.get('device_peak_derivation')}",
                  f"- measured now: cuBLAS SGEMM {m.get('device_sgemm_gflops')} GFLOP/s ({m.get('device_sgemm_by')}), "
                  f"device copy {m.get('device_mem_bw_gbs')} GB/s; host {m.get('cpu_model')}"]
    lines += ["", "## Sections", "", _md(pd.DataFrame(run.sections))]
    smoke = run.tables.get("smoke")
    if smoke is not None:
        lines += ["## Smoke: every kernel once, ragged sizes, checked launches, against float64", "",
                  f"{int(smoke['passed'].sum())} of {len(smoke)} passed, {_wrong(smoke)} failed, "
                  f"{int((smoke['status'] == 'unavailable').sum())} not implemented on this backend.", "",
                  _md(smoke, ["op", "dtype", "shape", "rel_err", "tol", "passed", "seconds", "reason"])]
    corr = run.tables.get("correctness")
    if corr is not None:
        lines += ["## Correctness at real sizes", "",
                  f"{int(corr['passed'].sum())} of {len(corr)} passed, {_wrong(corr)} failed, "
                  f"{int((corr['status'] == 'unavailable').sum())} unavailable here.", "", _md(corr)]
    st = run.tables.get("studies")
    if st is not None:
        lines += ["## Studies on the GPU (rows in results/gpu/studies.csv; the report draws them)", ""]
        for name, grp in st.groupby("study", sort=False):
            counts = grp["status"].value_counts().to_dict() if "status" in grp.columns else {}
            reasons = sorted(set(grp.loc[grp["status"] != "ok", "reason"].dropna().astype(str)))[:5] \
                if "reason" in grp.columns else []
            lines.append(f"- {name}: {counts}" + (f"; reasons: {'; '.join(reasons)}" if reasons else ""))
        lines.append("")
    return "\n".join(lines) + "\n"


def _wrong(table: pd.DataFrame) -> int:
    """Smoke or correctness rows that failed (what the backend or machine lacks is
    ``unavailable``, not wrong)."""
    return int(((table["status"] != "unavailable") & ~table["passed"].astype(bool)).sum())


# ------------------------------------------------------------------------------ main
def arg_parser():
    p = argparse.ArgumentParser(prog="python -m studies.gpu", description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default="results/gpu", help="output folder (default results/gpu); at most 8 files")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="wall-clock cap for the whole run in seconds (default 330); what does not fit is "
                        "skipped with the reason in its rows")
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes, for Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1); timings meaningless")
    p.add_argument("--studies", default=",".join(GPU_STUDIES),
                   help=f"comma-separated studies to run on the GPU (default {','.join(GPU_STUDIES)}; '' for none)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = arg_parser().parse_args(argv)
    names = [s for s in args.studies.split(",") if s]
    bad = set(names) - set(GPU_STUDIES)
    if bad:
        raise SystemExit(f"unknown studies {sorted(bad)}; choose from {', '.join(GPU_STUDIES)}")
    if not args.budget_s > 0:
        raise SystemExit(f"--budget-s must be > 0, got {args.budget_s}")

    from tfm.backends.cuda import CudaBackend, cuda_unavailable_reason
    from tfm.backends.cuda._launch import simulator_enabled

    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"studies.gpu: backend 'cuda' is unavailable: {reason}", file=sys.stderr)
        return 2
    if args.smoke != simulator_enabled():
        print("studies.gpu: --smoke runs only under NUMBA_ENABLE_CUDASIM=1, and the simulator only with --smoke "
              "(its sizes are toys)", file=sys.stderr)
        return 2
    if args.smoke:  # simulated threads are Python threads: switch between them often
        sys.setswitchinterval(min(sys.getswitchinterval(), 5e-4))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [f for f in FILES if (out / f).exists()]
    for f in stale:  # a run writes a complete set: no file from an earlier run may pass for this one's
        (out / f).unlink()
    argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run = Run(out, args.budget_s, f"python -m studies.gpu {argv_text}".strip())
    grid = GRIDS["smoke" if args.smoke else "gpu"]
    run.say(f"tfm GPU run -> {out} (budget {args.budget_s:.0f} s)")

    import tempfile

    bk = CudaBackend()
    run.section("machine", lambda: section_machine(run, args.smoke), 0.0)
    run.section("smoke", lambda: section_smoke(run, bk, grid), MIN_SECONDS["smoke"])
    run.section("correctness", lambda: section_correctness(run, bk, grid, args.seed), MIN_SECONDS["correctness"])
    with tempfile.TemporaryDirectory(prefix="tfm-gpu-studies-") as scratch:
        run.section("studies", lambda: section_studies(run, args.smoke, names, Path(scratch)), 0.0)
    run.say("done")
    failed = [s for s in run.sections if s["status"] == "error"]
    smoke = run.tables.get("smoke")
    corr = run.tables.get("correctness")
    wrong = sum(_wrong(t) for t in (smoke, corr) if t is not None)
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
