"""Peers: tfm against PyTorch (and cuBLAS) on the same inputs and weights, timed A B A B in one process.

Pairs on either device: fused attention (tfm.attention) against
torch.nn.functional.scaled_dot_product_attention; the base-config encoder-decoder stack
(tfm.from_torch(nn.Transformer) -> tfm.EncoderDecoder; the tiny preset on the smoke grid)
against nn.Transformer itself, both returning to the host; one LSTM and one GRU layer (the backend's kernels fed nn.LSTM /
nn.GRU's weights) against nn.LSTM / nn.GRU; a k=3 'same' convolution against nn.Conv1d
(each side in its own layout: tfm (B, N, C), PyTorch (B, C, N)). Training pairs: the fused
attention backward (from the forward's output and log-sum-exp, computed once) against
``torch.autograd.grad`` through SDPA; one LSTM and one GRU layer's forward + backward through
time against the nn module + ``torch.autograd.grad`` (x, states and the four parameters); a
full training step (forward, loss, backward, Adam) of ``tfm.Transformer`` (small and base,
``final_norm=True``) against PyTorch's eager step of its twin (studies._torch_models) from the
same weights, the first losses checked equal. On a GPU (``--backend
cuda``) SDPA, forward and backward, runs with each of its math and memory-efficient backends
(``torch.nn.attention.sdpa_kernel``), and tfm's GEMM (its default, and the Numba kernel)
meets cuBLAS SGEMM through CuPy and through torch.matmul; TF32 is off, and every row names
the arithmetic each side uses.

Each pair is interleaved (tfm, peer, tfm, peer, ...) so both see the same machine load;
on the CPU PyTorch uses as many threads as Numba, on a GPU both sides are synchronised
before each clock stops. ``ratio`` is tfm's median time over the peer's (below 1: tfm
faster); ``ratio_paired`` the median of the per-round ratios with a bootstrap 95% interval
(tfm.bench.timing.paired_ratio); ``rel_err`` checks both computed the same thing.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd

from tfm import TransformerConfig

from ._common import grid_name, make_study, ok, parser, run_main
from ._report import prose

NAME = "peers"
TITLE = "tfm against PyTorch"
GRIDS = {
    # Training pairs: bwd_n (attention backward lengths), rnn_train (b, n, d), train (preset, b, n).
    "default": dict(att_n=(256, 1024, 4096), att_bh=(1, 8), model=[(1, 64), (8, 128)],
                    rnn=[(16, 128, 256), (8, 128, 512)], conv=[(8, 512, 512)], bwd_n=(1024, 4096),
                    rnn_train=[(8, 128, 512)], train=[("small", 8, 64), ("base", 8, 64)], budget_s=1.0),
    "quick": dict(att_n=(256, 1024), att_bh=(1, 8), model=[(1, 32)], rnn=[(8, 64, 256)], conv=[(8, 128, 256)],
                  bwd_n=(256,), rnn_train=[(8, 64, 256)], train=[("small", 4, 32)], budget_s=0.2),
    "smoke": dict(att_n=(13,), att_bh=(1, 2), model=[(2, 4)], config="tiny", rnn=[(2, 5, 8)], conv=[(2, 5, 8)],
                  bwd_n=(13,), rnn_train=[(2, 5, 8)], train=[("tiny", 2, 4)], budget_s=0.01,
                  gemm=[(9, 12, 10)], sdpa_n={"math": (13,), "mem_efficient": (13,)},
                  sdpa_bwd_n={"math": (13,), "mem_efficient": (13,)}),
    # An H100/H200: attention at B=4, H=16, d=64; SDPA's math backend materialises the
    # (n, n) scores (4 GiB per score tensor at n=4096, 64 GiB at n=16384), so it stops at 4096
    # (its backward holds the probabilities and their gradient). Estimated 25-45 s with compilation.
    "gpu": dict(att_bh=(4, 16), sdpa_n={"math": (1024, 4096), "mem_efficient": (1024, 4096, 16384)},
                gemm=[(4096, 4096, 4096), (8192, 512, 2048)], model=[(8, 128)], rnn=[(64, 256, 512)],
                conv=[(8, 2048, 512)], sdpa_bwd_n={"math": (1024, 4096), "mem_efficient": (1024, 4096, 16384)},
                rnn_train=[(64, 256, 512)], train=[("base", 8, 64)], budget_s=0.05),
}
MAX_REL_ERR = 1e-3  # beyond this the two sides did not compute the same thing: no timing
# The arithmetic each side of a row uses.
ARITHMETIC = {
    "cpu": "FP32 (Numba kernels; OpenBLAS sgemm single-threaded inside them)",
    "cuda": "FP32 FMA on CUDA cores (numba-cuda kernels)",
    "torch cpu": "FP32 (PyTorch CPU kernels)",
    "torch cuda": "FP32 on CUDA cores (cuBLAS / cuDNN, TF32 off)",
    "cupy": "cuBLAS SGEMM through CuPy (FP32 on CUDA cores; CuPy leaves TF32 off by default)",
    "torch.matmul": "cuBLAS SGEMM through torch.matmul (FP32 on CUDA cores, TF32 off)",
}


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str, backend: str) -> list[dict]:
    g = GRIDS[grid]
    b, h = g["att_bh"]
    gpu = backend == "cuda"
    out = []
    if gpu:
        for sdpa, ns in g.get("sdpa_n", {"math": g.get("att_n", ()), "mem_efficient": g.get("att_n", ())}).items():
            out += [{"pair": f"attention vs SDPA ({sdpa})", "b": b, "h": h, "n": n, "d": 64, "causal": c}
                    for c in (False, True) for n in ns]
        out += [{"pair": f"gemm ({impl}) vs {peer}", "b": 1, "n": m, "d": k, "d_out": nn, "causal": False}
                for m, k, nn in g.get("gemm", ()) for impl in ("default", "numba") for peer in ("cupy", "torch.matmul")]
        for sdpa, ns in g.get("sdpa_bwd_n", {}).items():
            out += [{"pair": f"attention backward vs SDPA ({sdpa}) backward", "b": b, "h": h, "n": n, "d": 64,
                     "causal": c} for c in (False, True) for n in ns]
    else:
        att_n = g.get("att_n") or sorted(set().union(*g["sdpa_n"].values()))
        out += [{"pair": "attention vs SDPA", "b": b, "h": h, "n": n, "d": 64, "causal": c}
                for c in (False, True) for n in att_n]
        out += [{"pair": "attention backward vs SDPA backward", "b": b, "h": h, "n": n, "d": 64, "causal": c}
                for c in (False, True) for n in g.get("bwd_n", ())]
    config = g.get("config", "base")
    out += [{"pair": f"{config} forward vs nn.Transformer", "b": b_, "n": n,
             "d": getattr(TransformerConfig, config)().d_model, "causal": True} for b_, n in g["model"]]
    out += [{"pair": f"{kind} vs nn.{kind.upper()}", "b": b_, "n": n, "d": d, "causal": True}
            for kind in ("lstm", "gru") for b_, n, d in g["rnn"]]
    out += [{"pair": "conv1d vs nn.Conv1d", "b": b_, "n": n, "d": d, "causal": False} for b_, n, d in g["conv"]]
    out += [{"pair": f"{kind} forward+backward vs nn.{kind.upper()}", "b": b_, "n": n, "d": d, "causal": True}
            for kind in ("lstm", "gru") for b_, n, d in g.get("rnn_train", ())]
    out += [{"pair": f"{preset} training step vs PyTorch eager", "b": b_, "n": n,
             "d": getattr(TransformerConfig, preset)().d_model, "causal": True} for preset, b_, n in g.get("train", ())]
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _attention(case, bk, tp, rng, backend):
    """tfm's fused attention and SDPA (on a GPU: the SDPA backend the pair names)."""
    import tfm
    from tfm import cost

    from ._torch import SDPA_BACKENDS

    torch = tp.torch
    b, h, n, d, causal = case["b"], case["h"], case["n"], case["d"], case["causal"]
    q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
    qd, kd, vd = (bk.asarray(a) for a in (q, k, v))
    tq, tk, tv = (tp.tensor(a) for a in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    which = case["pair"].partition("(")[2].rstrip(")")
    if which:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        choice, arithmetic = SDPA_BACKENDS[which]
        if tp.device != "cuda":  # PyTorch on the host (the CUDA simulator): its CPU kernels
            arithmetic = ARITHMETIC[f"torch {tp.device}"]

        def fb():
            with torch.inference_mode(), sdpa_kernel(getattr(SDPBackend, choice)):
                return sdpa(tq, tk, tv, is_causal=causal)
    else:
        arithmetic = ARITHMETIC[f"torch {tp.device}"]

        def fb():
            with torch.inference_mode():
                return sdpa(tq, tk, tv, is_causal=causal)

    def fa():
        return tfm.attention(qd, kd, vd, causal=causal, backend=backend)

    flops = cost.flops("attention", b=b, h=h, nq=n, nk=n, dk=d, causal=causal)
    return fa, fb, tp.host, flops, arithmetic


def _gemm(case, bk, tp, rng, backend):
    """tfm's linear without bias (x @ w^T) against cuBLAS SGEMM through CuPy or torch.matmul."""
    from tfm import cost
    from tfm.backends.cuda import CudaBackend
    from tfm.bench import Skip

    m, k, n = case["n"], case["d"], case["d_out"]
    impl, peer = case["pair"][len("gemm ("):].split(") vs ")
    ours = bk if impl == "default" else CudaBackend(gemm="numba")
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    xd, wd = ours.asarray(x), ours.asarray(w)
    if peer == "cupy":
        try:
            import cupy
        except ImportError as exc:
            raise Skip(f"CuPy is not installed: {exc}") from None
        xc, wc = cupy.asarray(x), cupy.asarray(w)
        fb = lambda: cupy.matmul(xc, wc.T)  # noqa: E731
        host = cupy.asnumpy
        tp = tp.__class__(tp.torch, "cuda", cupy.cuda.get_current_stream().synchronize)
    else:
        xt, wt = tp.tensor(x), tp.tensor(w)
        fb = lambda: tp.torch.matmul(xt, wt.T)  # noqa: E731
        host = tp.host
    fa = lambda: ours.linear(xd, wd, None)  # noqa: E731
    ours_arith = ARITHMETIC["cupy"] if getattr(ours, "gemm", "") == "cupy" else ARITHMETIC["cuda"]
    return fa, fb, host, cost.flops("linear", tokens=m, d_in=k, d_out=n, bias=False), ARITHMETIC[peer], \
        ours_arith, tp.sync


def _model(case, bk, tp, rng, backend):
    import tfm
    from tfm import cost

    torch = tp.torch
    b, n = case["b"], case["n"]
    c = getattr(tfm.TransformerConfig, case["pair"].split()[0])()
    torch.manual_seed(0)
    peer = torch.nn.Transformer(c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff,
                                dropout=0.0, batch_first=True).eval()
    ours = tfm.from_torch(peer, backend=backend)
    peer.to(tp.device)
    src, tgt = (rng.standard_normal((b, n, c.d_model)).astype(np.float32) for _ in range(2))
    srcd, tgtd = bk.asarray(src), bk.asarray(tgt)
    ts, tt = tp.tensor(src), tp.tensor(tgt)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=tp.device)
    fa = lambda: ours(srcd, tgtd, tgt_is_causal=True)  # noqa: E731  (returns a host array)

    def fb():
        with torch.inference_mode():
            return peer(ts, tt, tgt_mask=mask, tgt_is_causal=True).cpu()  # to the host, as tfm's

    flops = cost.flops("transformer_forward", config=c, b=b, n_src=n, n_tgt=n, output_projection=False)
    return fa, fb, tp.host, flops, ARITHMETIC[f"torch {tp.device}"]


def _conv(case, bk, tp, rng, backend):
    from tfm import cost

    torch = tp.torch
    b, n, d = case["b"], case["n"], case["d"]
    torch.manual_seed(0)
    peer = torch.nn.Conv1d(d, d, 3, padding=1).eval()
    w, bias = (bk.asarray(p.detach().numpy().astype(np.float32)) for p in (peer.weight, peer.bias))
    peer.to(tp.device)
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    xs, tx = bk.asarray(x), tp.tensor(np.ascontiguousarray(x.transpose(0, 2, 1)))
    fa = lambda: bk.conv1d(xs, w, bias, 1, 1, 1)  # noqa: E731

    def fb():
        with torch.inference_mode():
            return peer(tx)

    return fa, fb, lambda t: tp.host(t).transpose(0, 2, 1), cost.flops("conv1d", b=b, n_out=n, c_in=d, c_out=d, k=3), \
        ARITHMETIC[f"torch {tp.device}"]


def _recurrent(case, bk, tp, rng, backend):
    from tfm import cost

    torch = tp.torch
    kind, b, n, d = case["pair"].split()[0], case["b"], case["n"], case["d"]
    torch.manual_seed(0)
    peer = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(d, d, 1, batch_first=True).eval()
    w = [p.detach().numpy().astype(np.float32) for p in (peer.weight_ih_l0, peer.weight_hh_l0,
                                                          peer.bias_ih_l0, peer.bias_hh_l0)]
    peer.to(tp.device)
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    xs, ws, hs = bk.asarray(x), [bk.asarray(a) for a in w], bk.asarray(np.zeros((b, d), np.float32))
    tx = tp.tensor(x)
    if kind == "lstm":
        fa = lambda: bk.lstm_layer(xs, hs, hs, *ws)[0]  # noqa: E731
    else:
        fa = lambda: bk.gru_layer(xs, hs, *ws)[0]  # noqa: E731

    def fb():
        with torch.inference_mode():
            return peer(tx)[0]

    return fa, fb, tp.host, cost.flops(kind, b=b, n=n, d_in=d, d_hidden=d), ARITHMETIC[f"torch {tp.device}"]


def _flat_host(arrays, to_numpy) -> np.ndarray:
    """Several gradients as one host vector (for the relative-error check)."""
    return np.concatenate([np.ravel(np.asarray(to_numpy(a), dtype=np.float64)) for a in arrays])


def _attention_backward(case, bk, tp, rng, backend):
    """tfm's fused attention backward against torch.autograd.grad through SDPA (on a GPU with the
    SDPA backend the pair names); both forwards run once, outside the timing."""
    from contextlib import nullcontext

    from tfm import cost

    from ._torch import SDPA_BACKENDS

    torch = tp.torch
    b, h, n, d, causal = case["b"], case["h"], case["n"], case["d"], case["causal"]
    q, k, v, do = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(4))
    qd, kd, vd, dod = (bk.asarray(a) for a in (q, k, v, do))
    out, lse = bk.attention_train(qd, kd, vd, None, causal, "fused")
    tq, tk, tv = (tp.tensor(a).requires_grad_() for a in (q, k, v))
    tdo = tp.tensor(do)
    which = case["pair"].partition("(")[2].partition(")")[0]
    arithmetic = ARITHMETIC[f"torch {tp.device}"]
    context = nullcontext()
    if which:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        choice, arith = SDPA_BACKENDS[which]
        arithmetic = arith if tp.device == "cuda" else arithmetic
        context = sdpa_kernel(getattr(SDPBackend, choice))
    try:
        with context:
            t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    except RuntimeError as exc:  # e.g. an SDPA backend refusing these inputs or this device
        from tfm.bench import Skip

        raise Skip(f"{type(exc).__name__}: {str(exc)[:300]}", "unavailable") from None

    def fa():
        return bk.attention_backward(qd, kd, vd, out, lse, dod, None, causal, "fused")

    def fb():
        return torch.autograd.grad(t_out, (tq, tk, tv), tdo, retain_graph=True)

    flops = cost.ATTENTION_BACKWARD_FACTOR * cost.flops("attention", b=b, h=h, nq=n, nk=n, dk=d, causal=causal)
    return fa, fb, lambda g: _flat_host(g, tp.host), flops, arithmetic, lambda g: _flat_host(g, bk.to_numpy)


def _recurrent_train(case, bk, tp, rng, backend):
    """One LSTM/GRU layer's forward + backward through time: the backend's *_layer_train and
    *_layer_backward against the nn module + torch.autograd.grad of its output with respect to
    x, h0 (c0) and the four parameters, for the same output cotangent."""
    from tfm import cost

    torch = tp.torch
    kind, b, n, d = case["pair"].split()[0], case["b"], case["n"], case["d"]
    torch.manual_seed(0)
    peer = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(d, d, 1, batch_first=True)
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    w = [getattr(peer, name).detach().numpy().astype(np.float32) for name in names]
    peer.to(tp.device)
    x, dout = (rng.standard_normal((b, n, d)).astype(np.float32) for _ in range(2))
    states = [(0.5 * rng.standard_normal((b, d))).astype(np.float32) for _ in range(2 if kind == "lstm" else 1)]
    xs, douts, ws, ss = bk.asarray(x), bk.asarray(dout), [bk.asarray(a) for a in w], [bk.asarray(s) for s in states]
    train, backward = getattr(bk, f"{kind}_layer_train"), getattr(bk, f"{kind}_layer_backward")
    none = [None] * len(states)

    def fa():
        *_, saved = train(xs, *ss, *ws)
        return backward(saved, douts, *none)  # dx, dh0 (dc0), dW_ih, dW_hh, db_ih, db_hh

    tx = tp.tensor(x).requires_grad_()
    ts = [tp.tensor(s[None]).requires_grad_() for s in states]
    params = [getattr(peer, name) for name in names]
    tdout = tp.tensor(dout)

    def fb():
        out, _ = peer(tx, tuple(ts) if kind == "lstm" else ts[0])
        return torch.autograd.grad(out, [tx] + ts + params, tdout)

    flops = cost.training_flops(kind, b=b, n=n, d_in=d, d_hidden=d)
    return fa, fb, lambda g: _flat_host(g, tp.host), flops, ARITHMETIC[f"torch {tp.device}"], \
        lambda g: _flat_host(g, bk.to_numpy)


def _training_step(case, bk, tp, rng, backend):
    """tfm.Transformer's train_step against PyTorch's eager step of its twin, from the same weights;
    each call takes one step (Adam, constant learning rate) and returns the loss, so the first
    call of each side checks the losses at equal weights."""
    import tfm
    from tfm import cost

    from ._torch_models import TrainStep, twin
    from .training_throughput import LABEL_SMOOTHING, LR

    b, n = case["b"], case["n"]
    c = getattr(TransformerConfig, case["pair"].split()[0])(final_norm=True)
    model = tfm.Transformer(c, seed=0, backend=backend)
    opt = tfm.optim.Adam(model, lr=LR)
    src = rng.integers(3, c.src_vocab, size=(b, n))
    tgt = rng.integers(3, c.tgt_vocab, size=(b, n + 1))  # n positions predicted
    step = TrainStep(twin(model, tp.device), LR, LABEL_SMOOTHING)
    ts, tt = tp.tensor(src), tp.tensor(tgt)
    fa = lambda: model.train_step(opt, src, tgt, label_smoothing=LABEL_SMOOTHING)  # noqa: E731
    fb = lambda: step(ts, tt)  # noqa: E731
    flops = cost.training_flops("transformer_forward", config=c, b=b, n_src=n, n_tgt=n)
    return fa, fb, np.atleast_1d, flops, ARITHMETIC[f"torch {tp.device}"], np.atleast_1d


def measure(case: dict, ctx) -> dict:
    import tfm
    from tfm.bench import Skip
    from tfm.bench.study import ceiling
    from tfm.bench.timing import paired_ratio

    from ._torch import peer as torch_peer

    backend = ctx.options["backend"]
    tp = torch_peer(backend)
    bk = tfm.get_backend(backend)
    rng = np.random.default_rng(0)
    pair = case["pair"]
    ours_arith, sync_b = ARITHMETIC[backend], tp.sync
    ours_host = bk.to_numpy
    if pair.startswith("gemm"):
        fa, fb, peer_host, flops, peer_arith, ours_arith, sync_b = _gemm(case, bk, tp, rng, backend)
    else:
        build_pair = (_attention_backward if pair.startswith("attention backward")
                      else _training_step if "training step" in pair
                      else _recurrent_train if "forward+backward" in pair
                      else _attention if pair.startswith("attention") else _model if "forward vs" in pair
                      else _conv if pair.startswith("conv1d") else _recurrent)
        fa, fb, peer_host, flops, peer_arith, *rest = build_pair(case, bk, tp, rng, backend)
        ours_host = rest[0] if rest else ours_host
    try:
        err = _rel(ours_host(fa()), peer_host(fb()))
    except RuntimeError as exc:  # e.g. torch.OutOfMemoryError, or an SDPA backend refusing the inputs
        if "out of memory" in str(exc).lower():
            raise MemoryError(f"{type(exc).__name__}: {exc}") from None
        raise Skip(f"{type(exc).__name__}: {str(exc)[:300]}", "unavailable") from None
    if not err < MAX_REL_ERR:  # not the same computation: a timing comparison would mean nothing
        raise Skip(f"tfm and the peer's outputs differ (relative error {err:.2e})", "error")
    ta, tb = ctx.time_pair(fa, fb, sync_a=bk.synchronize, sync_b=sync_b)
    med, lo, hi = paired_ratio(ta, tb)
    peer_gflops = flops / tb.median_s / 1e9
    return {"backend": backend, "peer": tp.label if not pair.endswith("cupy") else "cupy",
            "tfm_arithmetic": ours_arith, "peer_arithmetic": peer_arith, "time_s": ta.median_s,
            "tfm_time_s": ta.median_s, "tfm_iqr_s": ta.iqr_s, "torch_time_s": tb.median_s, "torch_iqr_s": tb.iqr_s,
            "repeats": ta.repeats, "ratio": ta.median_s / tb.median_s, "ratio_paired": med, "ratio_ci_low": lo,
            "ratio_ci_high": hi, "flops": flops, "tfm_gflops": flops / ta.median_s / 1e9, "torch_gflops": peer_gflops,
            "torch_frac_sgemm": peer_gflops / ceiling(ctx.ceilings, "sgemm_gflops", ctx.on_device),
            "torch_frac_peak": (peer_gflops / ceiling(ctx.ceilings, "fp32_peak_gflops", True)
                                if ctx.on_device else np.nan), "rel_err": err}


def build(args):
    grid = grid_name(args)
    return make_study(sys.modules[__name__], cases(grid, args.backend), measure, args, grow="n",
                      exponent=lambda c: 2.0 if c["pair"].startswith("attention") else 1.0,
                      budget_s=GRIDS[grid]["budget_s"], max_call_s=5.0)


# ----------------------------------------------------------------------------- derived
def pairs(df) -> pd.DataFrame:
    """The measured pairs as the report and README show them."""
    good = ok(df)
    cols = ["pair", "b", "h", "n", "d", "d_out", "causal", "tfm_time_s", "torch_time_s", "ratio", "ratio_paired",
            "ratio_ci_low", "ratio_ci_high", "tfm_gflops", "torch_gflops", "frac_peak", "torch_frac_peak",
            "frac_sgemm", "torch_frac_sgemm", "rel_err", "tfm_arithmetic", "peer_arithmetic"]
    return good[[c for c in cols if c in good.columns]].reset_index(drop=True)


DERIVED = {"peers_pairs": pairs}


def size(r) -> str:
    """A pair's size as the tables print it (b, h, n, d; m, k, n for a GEMM)."""
    if str(r["pair"]).startswith("gemm"):
        return f"m={int(r['n'])}, k={int(r['d'])}, n={int(r['d_out'])}"
    h = f", h={int(r['h'])}" if "h" in r and np.isfinite(r.get("h", np.nan)) else ""
    causal = ", causal" if str(r["pair"]).startswith("attention") and bool(r["causal"]) else ""
    return f"b={int(r['b'])}{h}, n={int(r['n'])}, d={int(r['d'])}{causal}"


# ----------------------------------------------------------------------------- figures
def plot_ratios(df, on: str):
    import matplotlib.pyplot as plt

    t = pairs(df)
    if t.empty:
        return None
    labels = [f"{r['pair']}\n{size(r)}" for _, r in t.iterrows()]
    ratio = t["ratio_paired"] if "ratio_paired" in t.columns else t["ratio"]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.5))
    y = np.arange(len(labels))
    xerr = None
    if "ratio_ci_low" in t.columns:
        xerr = np.vstack([ratio - t["ratio_ci_low"], t["ratio_ci_high"] - ratio]).clip(min=0)
        xerr = np.where(np.isfinite(xerr), xerr, 0)
    ax.barh(y, ratio, xerr=xerr, color=["tab:green" if r < 1 else "tab:red" for r in ratio], capsize=2)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="tfm time / peer time, median of paired rounds with 95% interval (below 1: tfm faster)",
           title=f"tfm against its peers, measured A B A B ({on})")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return fig


FIGURES = {"peers": plot_ratios}


# ----------------------------------------------------------------------------- report
INTRO = prose(f"""
    Each pair runs on the same inputs and weights, interleaved tfm, peer, tfm, peer, ... in one
    process (on the CPU with the same thread count; on a GPU synchronised before each clock stops,
    TF32 off). **Ratio:** the median over rounds of tfm's time over the peer's in the same round,
    with a bootstrap 95% interval (2000 resamples; tfm.bench.timing.paired_ratio); below 1 tfm is
    faster. **Check:** a pair is timed only if rel_err = ||tfm - peer|| / ||peer|| <
    {MAX_REL_ERR:g}; otherwise its row records the error. On a GPU each row also gives both sides as
    a fraction of the FP32 CUDA-core peak and of the cuBLAS SGEMM ceiling measured in the same run.
    **Training pairs** count FLOPs with tfm.cost (the attention backward alone: 2.5x its forward's;
    a recurrent layer's forward + backward and a training step: training_flops, the backward 2x the
    forward, 2.5x for attention, Adam left out); a training step's check is on the two first losses,
    from the same weights, and each timed call takes one more step on each side.
""")


def _table(t: pd.DataFrame) -> pd.DataFrame:
    """One line per pair: size, times, paired ratio with its interval, GFLOP/s, fractions."""
    from ._report import ci

    out = pd.DataFrame({"pair": t["pair"], "size": [size(r) for _, r in t.iterrows()],
                        "tfm ms": t["tfm_time_s"] * 1e3, "peer ms": t["torch_time_s"] * 1e3})
    if "ratio_paired" in t.columns:
        out["ratio (paired, 95% CI)"] = [f"{m:.3f} {ci(lo, hi)}" for m, lo, hi in
                                         zip(t["ratio_paired"], t["ratio_ci_low"], t["ratio_ci_high"])]
    else:
        out["ratio"] = t["ratio"]
    def both(a_col, b_col, fmt):
        return [" / ".join(fmt.format(v) if np.isfinite(v) else "n/a" for v in pair)
                for pair in zip(t[a_col], t[b_col])]

    out["GFLOP/s tfm / peer"] = both("tfm_gflops", "torch_gflops", "{:.3g}")
    if {"frac_peak", "torch_frac_peak"} <= set(t.columns):
        out["of FP32 peak tfm / peer"] = both("frac_peak", "torch_frac_peak", "{:.1%}")
    if {"frac_sgemm", "torch_frac_sgemm"} <= set(t.columns):
        out["of sgemm tfm / peer"] = both("frac_sgemm", "torch_frac_sgemm", "{:.0%}")
    out["rel_err"] = t["rel_err"]
    return out


def results(rep, rows, suffix: str) -> str:
    from ._report import md_table

    t = pairs(rows)
    s = rep.figure("peers" + suffix, "tfm vs its peers") + md_table(_table(t), "{:.3g}") + "\n"
    if "tfm_arithmetic" in t.columns:
        arith = t[["pair", "tfm_arithmetic", "peer_arithmetic"]].drop_duplicates("pair")
        s += "What each side computes with:\n\n" + md_table(arith) + "\n"
    ratio = t["ratio_paired"] if "ratio_paired" in t.columns else t["ratio"]
    s += (f"tfm is faster in {int((ratio < 1).sum())} of {len(t)} pairs; geometric-mean ratio "
          f"{math.exp(np.log(ratio).mean()):.2f}.\n\n")
    return s


def readme_table(rep) -> str:
    """The README's performance paragraph and table, from the host rows."""
    from ._report import md_table

    df = rep.table(NAME)
    good = ok(df)
    if good.empty:
        return "No `peers` rows: run `make studies`.\n"
    r0 = good.iloc[0]
    torch_v = r0.get("v_torch", "absent")
    s = (f"Measured with the `peers` study of the committed default run (`results/tables/peers.csv`, "
         f"{r0['date_utc']}, commit {r0['git_commit']}, 1-minute load {r0['load_avg_1min']} at the start) on "
         f"{r0['cpu_model']} ({int(r0['cpu_logical_cores'])} logical cores) with a measured "
         f"{int(r0['numba_threads'])}-thread sgemm ceiling of {r0['sgemm_gflops']:.0f} GFLOP/s and copy bandwidth "
         f"of {r0['mem_bw_gbs']:.0f} GB/s. Software: numba {r0['v_numba']}, torch {torch_v}. Both libraries run "
         f"{int(r0['numba_threads'])} threads, on the same inputs and weights, interleaved in one process. ")
    if "ratio_paired" in good.columns:
        s += ("The ratio is the median over rounds of tfm's time over PyTorch's in the same round, with a bootstrap "
              "95% interval; below 1 tfm is faster.\n\n")
    else:  # rows measured before the paired ratio was recorded
        s += "The ratio is tfm's median time over PyTorch's; below 1 tfm is faster.\n\n"
    t = _table(pairs(good)).drop(columns=["rel_err"])
    return s + md_table(t, "{:.2f}")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
