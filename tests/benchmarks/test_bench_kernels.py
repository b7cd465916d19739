"""Kernel benchmarks at model sizes: linear, FFN, LayerNorm(+residual), softmax; tfm cpu vs torch.

Tokens = batch 8 x n 128 = 1024 (the base-config forward pass), d_model 512, d_ff 2048,
float32; each operation is one benchmark group with its PyTorch peer. The 4096-token size
runs only when timing; CI runs 256 and 1024 tokens once.
"""

from __future__ import annotations

import numpy as np
import pytest

from tfm import cost
from tfm import reference as ref
from tfm.backends.cpu import linear as lin
from tfm.backends.cpu import norm

from conftest import TOL, large, measure, rel_err, requires_torch, torch

D_MODEL, D_FF = 512, 2048
TOKENS = [256, 1024, 4096]
OPS = ["linear", "ffn", "layer_norm", "softmax"]


def _data(tokens):
    rng = np.random.default_rng(tokens)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "x": r(tokens, D_MODEL), "res": r(tokens, D_MODEL),
        "w1": r(D_FF, D_MODEL) / 20, "b1": r(D_FF), "w2": r(D_MODEL, D_FF) / 40, "b2": r(D_MODEL),
        "g": r(D_MODEL), "b": r(D_MODEL), "scores": r(tokens, 1024),
    }


def _cost(op, tokens):
    if op == "linear":
        return (cost.flops("linear", tokens=tokens, d_in=D_MODEL, d_out=D_FF),
                cost.bytes_moved("linear", tokens=tokens, d_in=D_MODEL, d_out=D_FF))
    if op == "ffn":
        return (cost.flops("ffn", tokens=tokens, d_model=D_MODEL, d_ff=D_FF),
                cost.bytes_moved("ffn", tokens=tokens, d_model=D_MODEL, d_ff=D_FF))
    if op == "layer_norm":
        return (cost.flops("layer_norm", tokens=tokens, d=D_MODEL),
                cost.bytes_moved("layer_norm", tokens=tokens, d=D_MODEL))
    return cost.flops("softmax", rows=tokens, cols=1024), cost.bytes_moved("softmax", rows=tokens, cols=1024)


def _tfm_call(op, d):
    if op == "linear":
        return lin.linear, (d["x"], d["w1"], d["b1"])
    if op == "ffn":
        return lin.feed_forward, (d["x"], d["w1"], d["b1"], d["w2"], d["b2"], "relu")
    if op == "layer_norm":
        return norm.layer_norm, (d["x"], d["g"], d["b"], 1e-5, d["res"])
    return norm.softmax, (d["scores"],)


def _reference(op, d):
    if op == "linear":
        return ref.linear(d["x"], d["w1"], d["b1"])
    if op == "ffn":
        return ref.position_wise_ffn(d["x"], d["w1"], d["b1"], d["w2"], d["b2"])
    if op == "layer_norm":
        return ref.layer_norm(d["x"], d["g"], d["b"], 1e-5, d["res"])
    return ref.softmax(d["scores"])


def _torch_call(op, d):
    t = {k: torch.from_numpy(v) for k, v in d.items()}
    F = torch.nn.functional
    if op == "linear":
        return F.linear, (t["x"], t["w1"], t["b1"])
    if op == "ffn":
        return (lambda x, w1, b1, w2, b2: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2),
                (t["x"], t["w1"], t["b1"], t["w2"], t["b2"]))
    if op == "layer_norm":
        return (lambda x, r, g, b: F.layer_norm(x + r, (D_MODEL,), g, b, 1e-5),
                (t["x"], t["res"], t["g"], t["b"]))
    return (lambda s: torch.softmax(s, -1)), (t["scores"],)


def _setup(benchmark, op, tokens, tag):
    if tokens >= 4096:
        large(benchmark)
    benchmark.group = f"{op} tokens={tokens}"
    benchmark.extra_info["impl"] = tag


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("op", OPS)
def test_tfm_kernel(benchmark, op, tokens):
    _setup(benchmark, op, tokens, "tfm cpu")
    d = _data(tokens)
    fn, args = _tfm_call(op, d)
    flops, nbytes = _cost(op, tokens)
    out = measure(benchmark, fn, *args, flops=flops, nbytes=nbytes)
    assert rel_err(out, _reference(op, d)) < TOL[np.float32]


@requires_torch
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("op", OPS)
def test_torch_kernel(benchmark, op, tokens):
    _setup(benchmark, op, tokens, "torch")
    d = _data(tokens)
    fn, args = _torch_call(op, d)
    flops, nbytes = _cost(op, tokens)
    with torch.inference_mode():
        out = measure(benchmark, fn, *args, flops=flops, nbytes=nbytes)
    assert rel_err(out.numpy(), _reference(op, d)) < 1e-4
