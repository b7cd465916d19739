"""Backward-pass benchmarks: tfm cpu beside PyTorch autograd, same inputs, same threads.

Attention: ``attention_backward`` (fused and naive) against ``torch.autograd.grad`` through
``scaled_dot_product_attention`` (PyTorch's CPU flash-attention backward), float32, B=1,
H=8, d=64, n in {256, 1024, 4096}, causal and not; the forward (and, for tfm, its lse) is
computed once outside the timing. FLOPs = 2.5x the forward's (``tfm.cost``; five matrix
products against two). Dense kernels at the base model's sizes (8 x 128 = 1024 tokens,
d_model 512, d_ff 2048; 4096 tokens when timing): the linear layer's backward (dX, dW, db;
FLOPs = 2x the forward's), LayerNorm(x + residual)'s backward, exact GELU's backward, and
cross-entropy with label smoothing (loss and gradient in one call; PyTorch: forward and
backward of ``F.cross_entropy``). Gradients are checked against the float64 reference after
the timing loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from tfm import cost
from tfm import reference as ref
from tfm.backends.cpu import attention as att
from tfm.backends.cpu import linear as lin
from tfm.backends.cpu import norm

from conftest import TOL, large, measure, rel_err, requires_torch, torch

B, H, D = 1, 8, 64
NS = [256, 1024, 4096]
D_MODEL, D_FF, VOCAB = 512, 2048, 8000
TOKENS = [1024, 4096]


# ---------------------------------------------------------------------------- attention
def _attention_inputs(n, causal):
    rng = np.random.default_rng(n + causal)
    q, k, v, do = (rng.standard_normal((B, H, n, D)).astype(np.float32) for _ in range(4))
    return q, k, v, do


def _attention_setup(benchmark, n, causal, tag):
    if n >= 4096:
        large(benchmark)
    benchmark.group = f"attention backward n={n} {'causal' if causal else 'full'}"
    benchmark.extra_info["impl"] = tag
    return 2.5 * cost.flops("attention", b=B, h=H, nq=n, nk=n, dk=D, causal=causal)


def _check_attention(grads, q, k, v, do, causal):
    # the reference on one head keeps the check cheap at n=4096
    h0 = [x[:, :1] for x in (q, k, v, do)]
    out, lse = ref.scaled_dot_product_attention_train(*h0[:3], causal=causal)
    want = ref.scaled_dot_product_attention_backward(*h0[:3], out, lse, h0[3], causal=causal)
    for g, w in zip(grads, want):
        assert rel_err(np.asarray(g)[:, :1], w) < TOL[np.float32]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_tfm_attention_backward(benchmark, impl, n, causal):
    flops = _attention_setup(benchmark, n, causal, f"tfm {impl}")
    q, k, v, do = _attention_inputs(n, causal)
    out, lse = att.attention_train(q, k, v, None, causal, impl)
    grads = measure(benchmark, att.attention_backward, q, k, v, out, lse, do, None, causal, impl,
                    flops=flops)
    _check_attention(grads, q, k, v, do, causal)


@requires_torch
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n", NS)
def test_torch_sdpa_backward(benchmark, n, causal):
    flops = _attention_setup(benchmark, n, causal, "torch sdpa backward")
    q, k, v, do = _attention_inputs(n, causal)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    benchmark.extra_info["grad_fn"] = type(out.grad_fn).__name__
    tdo = torch.from_numpy(do)
    grads = measure(benchmark, torch.autograd.grad, out, (tq, tk, tv), tdo, retain_graph=True,
                    flops=flops)
    _check_attention([g.numpy() for g in grads], q, k, v, do, causal)


# ---------------------------------------------------------------------------- dense kernels
OPS = ["linear", "layer_norm", "gelu", "cross_entropy"]


def _data(tokens):
    rng = np.random.default_rng(tokens)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    targets = rng.integers(0, VOCAB, tokens)
    return {"x": r(tokens, D_MODEL), "res": r(tokens, D_MODEL), "w": r(D_FF, D_MODEL) / 20,
            "dy": r(tokens, D_FF), "g": r(D_MODEL), "b": r(D_MODEL), "dln": r(tokens, D_MODEL),
            "h": r(tokens, D_FF), "logits": 3 * r(tokens, VOCAB), "targets": targets,
            "weights": np.full(tokens, 1.0 / tokens)}


def _cost(op, tokens):
    """(flops, bytes): the linear backward's two products (2x the forward's FLOPs); the row
    kernels' bytes (inputs read once, gradients written once)."""
    if op == "linear":
        flops = 2 * cost.flops("linear", tokens=tokens, d_in=D_MODEL, d_out=D_FF)
        return flops, 4 * (2 * tokens * D_FF + 2 * tokens * D_MODEL + 2 * D_FF * D_MODEL)
    if op == "layer_norm":
        return None, 4 * (4 * tokens * D_MODEL)  # dy, x, residual in; dx out
    if op == "gelu":
        return None, 4 * (3 * tokens * D_FF)
    return None, 4 * (2 * tokens * VOCAB)  # logits in, gradient out


def _setup(benchmark, op, tokens, tag):
    if tokens >= 4096:
        large(benchmark)
    benchmark.group = f"{op} backward tokens={tokens}"
    benchmark.extra_info["impl"] = tag


def _tfm_call(op, d):
    if op == "linear":
        return lin.linear_backward, (d["x"], d["w"], d["dy"], True)
    if op == "layer_norm":
        _, mean, rstd = norm.layer_norm_train(d["x"], d["g"], d["b"], 1e-5, d["res"])
        return norm.layer_norm_backward, (d["dln"], d["x"], d["g"], mean, rstd, d["res"])
    if op == "gelu":
        return lin.activation_backward, (d["h"], d["dy"], "gelu")
    return norm.cross_entropy, (d["logits"], d["targets"], d["weights"], 0.1)


def _reference(op, d):
    """The gradients (and losses) every call must give, as a list of arrays."""
    if op == "linear":
        return list(ref.linear_backward(d["x"], d["w"], d["dy"]))
    if op == "layer_norm":
        _, mean, rstd = ref.layer_norm_train(d["x"], d["g"], d["b"], 1e-5, d["res"])
        return list(ref.layer_norm_backward(d["dln"], d["x"], d["g"], mean, rstd, d["res"]))
    if op == "gelu":
        return [ref.gelu_backward(d["h"], d["dy"])]
    return [ref.cross_entropy(d["logits"], d["targets"], 0.1),
            ref.cross_entropy_backward(d["logits"], d["targets"], d["weights"], 0.1)]


def _torch_call(op, d):
    t = {k: torch.from_numpy(v) for k, v in d.items()}
    F = torch.nn.functional
    if op == "linear":
        x, w = (t[k].clone().requires_grad_() for k in ("x", "w"))
        b = torch.zeros(D_FF, requires_grad=True)  # db = sum(dy) whatever b is
        y = F.linear(x, w, b)
        return (lambda: torch.autograd.grad(y, (x, w, b), t["dy"], retain_graph=True)), None
    if op == "layer_norm":
        x, g, b = (t[k].clone().requires_grad_() for k in ("x", "g", "b"))
        y = F.layer_norm(x + t["res"], (D_MODEL,), g, b, 1e-5)
        return (lambda: torch.autograd.grad(y, (x, g, b), t["dln"], retain_graph=True)), None
    if op == "gelu":
        h = t["h"].clone().requires_grad_()
        y = F.gelu(h)
        return (lambda: torch.autograd.grad(y, (h,), t["dy"], retain_graph=True)), None
    z = t["logits"].clone().requires_grad_()

    def fwd_bwd():
        losses = F.cross_entropy(z, t["targets"], reduction="none", label_smoothing=0.1)
        (grad,) = torch.autograd.grad((losses * t["weights"].float()).sum(), (z,))
        return losses.detach(), grad

    return fwd_bwd, None


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("op", OPS)
def test_tfm_backward_kernel(benchmark, op, tokens):
    _setup(benchmark, op, tokens, "tfm cpu")
    d = _data(tokens)
    fn, args = _tfm_call(op, d)
    flops, nbytes = _cost(op, tokens)
    got = measure(benchmark, fn, *args, flops=flops, nbytes=nbytes)
    got = [got] if isinstance(got, np.ndarray) else list(got)
    for g, w in zip(got, _reference(op, d)):
        assert rel_err(g, w) < (1e-4 if op == "layer_norm" else TOL[np.float32])


@requires_torch
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("op", OPS)
def test_torch_backward_kernel(benchmark, op, tokens):
    _setup(benchmark, op, tokens, "torch autograd")
    d = _data(tokens)
    fn, _ = _torch_call(op, d)
    flops, nbytes = _cost(op, tokens)
    got = measure(benchmark, fn, flops=flops, nbytes=nbytes)
    for g, w in zip(got, _reference(op, d)):
        assert rel_err(g.numpy(), w) < 1e-4
