"""Lab: the CPU backend's dense training kernels against PyTorch, and the variants kept out.

    python -m dev.cpu.training_ops [--out DIR] [--quick]

Each tfm kernel (``linear_backward``, ``layer_norm_backward``, ``activation_backward`` (GELU),
``cross_entropy``, ``embedding_backward``, ``adam_step``, ``dropout``, ``conv1d_backward``,
``glu_backward``, ``restricted_attention_backward``) is timed interleaved
against its PyTorch peer on the same threads (autograd through the forward recorded once,
outside the timing; Adam: ``torch.optim.Adam.step``; dropout: ``F.dropout``, a different
random stream but the same work), at the base model's sizes (8 x 128 = 1024 tokens, d_model
512, d_ff 2048, vocabulary 32000 for the embedding, 8000 for the cross-entropy; conv1d:
(8, 128, 512) through 512 x 512 x 3 "same"; restricted attention: B=2, H=8, n=1024, d=64,
window 64, against SDPA's backward with the band as a dense mask, as the forward's header
compares). The GELU
backward's float32 erf is also timed against libm's (the form it replaced). Every output is
checked against the float64 reference before timing and after. Writes DIR/training_ops.csv
and DIR/training_ops_check.csv.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from tfm import reference as ref
from tfm.backends.cpu import embedding as emb
from tfm.backends.cpu import linear as lin
from tfm.backends.cpu import conv, norm, restricted, training
from tfm.backends.cpu._threads import SMALL_ELEMENTS

from .common import check, compare, interleave, main, print_rows, rel_err, torch_threads

VARIANTS = {
    "tfm": "the library's kernel",
    "torch": "PyTorch autograd (or its optimizer / dropout) on as many threads",
    "gelu libm erf": "the GELU backward with libm's erf and exp per element (scalar calls)",
}
TOKENS, D_MODEL, D_FF, VOCAB, CE_VOCAB = 1024, 512, 2048, 32000, 8000


@njit(cache=True, parallel=True)
def _gelu_backward_libm(x, dy, dx):
    """The replaced float32 form: math.erf and math.exp, scalar libm calls, per element."""
    for c in prange((x.shape[0] + 16383) // 16384):
        xs, gs, out = x[c * 16384:(c + 1) * 16384], dy[c * 16384:(c + 1) * 16384], dx[c * 16384:(c + 1) * 16384]
        for i in range(xs.shape[0]):
            v = xs[i]
            cdf = np.float32(0.5) * (np.float32(1.0) + math.erf(v * np.float32(1.0 / math.sqrt(2.0))))
            pdf = np.float32(1.0 / math.sqrt(2.0 * math.pi)) * math.exp(np.float32(-0.5) * v * v)
            out[i] = gs[i] * (cdf + v * pdf)


def _data(rng, tokens=TOKENS):
    def r(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {"x": r(tokens, D_MODEL), "res": r(tokens, D_MODEL), "w": r(D_FF, D_MODEL, scale=0.05),
            "dy": r(tokens, D_FF), "g": r(D_MODEL), "b": r(D_MODEL), "dln": r(tokens, D_MODEL),
            "h": r(tokens, D_FF, scale=2.0), "logits": r(tokens, CE_VOCAB, scale=3.0),
            "targets": rng.integers(0, CE_VOCAB, tokens), "weights": np.full(tokens, 1.0 / tokens),
            "ids": rng.integers(0, VOCAB, (8, tokens // 8)), "demb": r(8, tokens // 8, D_MODEL),
            "p": r(D_FF * D_MODEL), "pg": r(D_FF * D_MODEL),
            "cx": r(8, tokens // 8, D_MODEL), "cw": r(D_MODEL, D_MODEL, 3, scale=0.03),
            "cdy": r(8, tokens // 8, D_MODEL), "gx": r(8, tokens // 8, 2 * D_MODEL, scale=2.0),
            "gdy": r(8, tokens // 8, D_MODEL),
            "rq": r(2, 8, tokens, 64), "rk": r(2, 8, tokens, 64), "rv": r(2, 8, tokens, 64),
            "rdo": r(2, 8, tokens, 64)}


def _tfm(op, d):
    """A call of tfm's kernel -> its outputs (a tuple)."""
    if op == "linear backward":
        return lambda: lin.linear_backward(d["x"], d["w"], d["dy"], True)
    if op == "layer_norm backward":
        _, mean, rstd = norm.layer_norm_train(d["x"], d["g"], d["b"], 1e-5, d["res"])
        return lambda: norm.layer_norm_backward(d["dln"], d["x"], d["g"], mean, rstd, d["res"])
    if op == "gelu backward":
        return lambda: (lin.activation_backward(d["h"], d["dy"], "gelu"),)
    if op == "cross_entropy":
        return lambda: norm.cross_entropy(d["logits"], d["targets"], d["weights"], 0.1)
    if op == "embedding backward":
        return lambda: (emb.embedding_backward(d["ids"], d["demb"], VOCAB, math.sqrt(D_MODEL)),)
    if op == "adam step":
        p, m, v = d["p"].copy(), np.zeros_like(d["p"]), np.zeros_like(d["p"])
        return lambda: (training.adam_step(p, d["pg"], m, v, 1, 1e-3, 0.9, 0.98, 1e-9), p)[1:]
    if op == "conv1d backward":
        return lambda: conv.conv1d_backward(d["cx"], d["cw"], d["cdy"], 1, 1, 1, True)
    if op == "glu backward":
        return lambda: (conv.glu_backward(d["gx"], d["gdy"]),)
    if op == "restricted attention backward":
        out, lse = restricted.restricted_attention_train(d["rq"], d["rk"], d["rv"], WINDOW)
        return lambda: restricted.restricted_attention_backward(d["rq"], d["rk"], d["rv"], out, lse,
                                                                d["rdo"], WINDOW)
    return lambda: (training.dropout(d["h"], 0.1, 7),)


def _expected(op, d):
    if op == "linear backward":
        return ref.linear_backward(d["x"], d["w"], d["dy"])
    if op == "layer_norm backward":
        _, mean, rstd = ref.layer_norm_train(d["x"], d["g"], d["b"], 1e-5, d["res"])
        return ref.layer_norm_backward(d["dln"], d["x"], d["g"], mean, rstd, d["res"])
    if op == "gelu backward":
        return (ref.gelu_backward(d["h"], d["dy"]),)
    if op == "cross_entropy":
        return (ref.cross_entropy(d["logits"], d["targets"], 0.1),
                ref.cross_entropy_backward(d["logits"], d["targets"], d["weights"], 0.1))
    if op == "embedding backward":
        return (ref.embed_backward(d["ids"], d["demb"], VOCAB, math.sqrt(D_MODEL)),)
    if op == "adam step":  # the first step from m = v = 0, timed repeatedly: checked once
        return (ref.adam_step(d["p"], d["pg"], np.zeros_like(d["p"]), np.zeros_like(d["p"]), 1,
                              1e-3, 0.9, 0.98, 1e-9)[0],)
    if op == "conv1d backward":
        return ref.baselines.conv1d_backward(d["cx"], d["cw"], d["cdy"], 1, 1, 1, True)
    if op == "glu backward":
        return (ref.baselines.glu_backward(d["gx"], d["gdy"]),)
    if op == "restricted attention backward":
        rq, rk, rv, rdo = (d[k][:, :1] for k in ("rq", "rk", "rv", "rdo"))  # head 0: O(n^2) reference
        out, lse = ref.baselines.restricted_attention_train(rq, rk, rv, WINDOW)
        return ref.baselines.restricted_attention_backward(rq, rk, rv, out, lse, rdo, WINDOW)
    return (ref.dropout(d["h"], 0.1, 7),)


def _torch(op, d):
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in d.items()}
    if op == "linear backward":
        x, w = (t[k].clone().requires_grad_() for k in ("x", "w"))
        b = torch.zeros(D_FF, requires_grad=True)
        y = F.linear(x, w, b)
        return lambda: torch.autograd.grad(y, (x, w, b), t["dy"], retain_graph=True)
    if op == "layer_norm backward":
        x, g, b = (t[k].clone().requires_grad_() for k in ("x", "g", "b"))
        y = F.layer_norm(x + t["res"], (D_MODEL,), g, b, 1e-5)
        return lambda: torch.autograd.grad(y, (x, g, b), t["dln"], retain_graph=True)
    if op == "gelu backward":
        h = t["h"].clone().requires_grad_()
        y = F.gelu(h)
        return lambda: torch.autograd.grad(y, (h,), t["dy"], retain_graph=True)
    if op == "cross_entropy":
        z = t["logits"].clone().requires_grad_()
        w = t["weights"].float()

        def fwd_bwd():
            losses = F.cross_entropy(z, t["targets"], reduction="none", label_smoothing=0.1)
            return losses.detach(), torch.autograd.grad((losses * w).sum(), (z,))[0]

        return fwd_bwd
    if op == "embedding backward":
        table = torch.zeros(VOCAB, D_MODEL, requires_grad=True)
        y = F.embedding(t["ids"], table) * math.sqrt(D_MODEL)
        return lambda: torch.autograd.grad(y, (table,), t["demb"], retain_graph=True)
    if op == "adam step":
        p = torch.nn.Parameter(t["p"].clone())
        p.grad = t["pg"].clone()
        opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
        return lambda: (opt.step(), p.detach())[1:]
    if op == "conv1d backward":
        x, w = (t[k].clone().requires_grad_() for k in ("cx", "cw"))
        b = torch.zeros(D_MODEL, requires_grad=True)
        y = F.conv1d(x.transpose(1, 2), w, b, padding=1).transpose(1, 2)
        return lambda: torch.autograd.grad(y, (x, w, b), t["cdy"], retain_graph=True)
    if op == "glu backward":
        x = t["gx"].clone().requires_grad_()
        y = F.glu(x, dim=-1)
        return lambda: torch.autograd.grad(y, (x,), t["gdy"], retain_graph=True)
    if op == "restricted attention backward":
        q, k, v = (t[n].clone().requires_grad_() for n in ("rq", "rk", "rv"))
        n = q.shape[2]
        band = torch.from_numpy(ref.baselines.restricted_window(n, n, WINDOW, False))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        return lambda: torch.autograd.grad(y, (q, k, v), t["rdo"], retain_graph=True)
    return lambda: (F.dropout(t["h"], 0.1, training=True),)


OPS = ("linear backward", "layer_norm backward", "gelu backward", "cross_entropy",
       "embedding backward", "adam step", "dropout", "conv1d backward", "glu backward",
       "restricted attention backward")
WINDOW = 64


def _head0(op, got):
    """The outputs compared with the reference: head 0 for restricted attention."""
    if op == "restricted attention backward":
        return [np.asarray(g)[:, :1] for g in got]
    return got


def run_checks(rng) -> list[dict]:
    """Each tfm kernel at the timed sizes and at awkward small ones, and the libm GELU form."""
    rows: list[dict] = []
    for tokens in (TOKENS, 37):
        d = _data(rng, tokens)
        for op in OPS:
            for i, (got, want) in enumerate(zip(_head0(op, _tfm(op, d)()), _expected(op, d))):
                tol = 1e-4 if op == "layer_norm backward" else 2e-5
                check(f"{op} output {i}, {tokens} tokens", rel_err(got, want), tol, rows)
        h, dy = d["h"].reshape(-1), d["dy"].reshape(-1)
        out = np.full_like(h, np.nan)
        _gelu_backward_libm(h, dy, out)
        check(f"gelu backward (libm erf), {tokens} tokens", rel_err(out, ref.gelu_backward(h, dy)), 2e-5, rows)
    return rows


def versus_torch(rng, quick, checks) -> list[dict]:
    """tfm against PyTorch per op, interleaved, same threads; outputs checked after timing."""
    rows = []
    with torch_threads(numba.get_num_threads()) as torch:
        if torch is None:
            return []
        d = _data(rng)
        for op in OPS:
            outs = {}
            tfm_fn, torch_fn = _tfm(op, d), _torch(op, d)
            fns = {"tfm": lambda: outs.__setitem__("tfm", tfm_fn()),
                   "torch": lambda: outs.__setitem__("torch", torch_fn())}
            times = interleave(fns, budget_s=1.0 if quick else 4.0, min_rounds=5 if quick else 15)
            if op not in ("adam step", "dropout"):  # Adam has moved on; dropout's stream differs
                for name in ("tfm", "torch"):
                    got_all = [g.numpy() if hasattr(g, "numpy") else g for g in outs[name]]
                    for i, (got, want) in enumerate(zip(_head0(op, got_all), _expected(op, d))):
                        check(f"{op} {name} output {i}, after timing", rel_err(got, want),
                              1e-4, checks)
            got = compare("training_ops", f"vs PyTorch, {op}", times, "torch",
                          {name: {"torch_threads": torch.get_num_threads()} for name in times})
            print_rows(got)
            rows += got
    return rows


def gelu_forms(rng, quick, checks) -> list[dict]:
    """The GELU backward: the library's float32 erf (A&S 7.1.26, vectorised) against libm's."""
    h = (2 * rng.standard_normal(TOKENS * D_FF)).astype(np.float32)
    dy = rng.standard_normal(h.size).astype(np.float32)
    outs = {"library": np.empty_like(h), "gelu libm erf": np.empty_like(h)}
    assert h.size >= SMALL_ELEMENTS  # both run parallel
    fns = {"library": lambda: lin._activation_backward_parallel(h, dy, outs["library"], 1, 1 << 14),
           "gelu libm erf": lambda: _gelu_backward_libm(h, dy, outs["gelu libm erf"])}
    times = interleave(fns, budget_s=1.0 if quick else 3.0, min_rounds=5 if quick else 15)
    for name, out in outs.items():
        check(f"gelu backward {name}, after timing", rel_err(out, ref.gelu_backward(h, dy)), 2e-5, checks)
    extra = {name: {"ns_per_element": 1e9 * float(np.median(t)) / h.size} for name, t in times.items()}
    rows = compare("training_ops", f"gelu backward forms, {h.size} elements", times, "gelu libm erf", extra)
    print_rows(rows)
    return rows


PARTS = (versus_torch, gelu_forms)

if __name__ == "__main__":
    raise SystemExit(main("training_ops", PARTS, run_checks, __doc__))
