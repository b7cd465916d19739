"""Attention benchmarks: tfm naive and fused (cpu) beside PyTorch's scaled_dot_product_attention.

float32, B=1, H=8, d=64, n in {256, 1024, 4096}, causal and not; each (n, causal) is one
benchmark group, so ``--benchmark-group-by=group`` prints tfm and SDPA side by side. FLOPs
(``tfm.cost``: 4*B*H*n^2*d, halved for causal) go into extra_info with GFLOP/s. n=4096 runs
only when timing; CI runs the smaller sizes once. Outputs are checked after the timing loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from tfm import cost
from tfm.backends.cpu import attention as att
from tfm.reference import scaled_dot_product_attention

from conftest import TOL, large, measure, rel_err, requires_torch, torch

B, H, D = 1, 8, 64
NS = [256, 1024, 4096]


def _inputs(n):
    rng = np.random.default_rng(n)
    return [rng.standard_normal((B, H, n, D)).astype(np.float32) for _ in range(3)]


def _setup(benchmark, n, causal, tag):
    if n >= 4096:
        large(benchmark)
    benchmark.group = f"attention n={n} {'causal' if causal else 'full'}"
    benchmark.extra_info["impl"] = tag
    return cost.flops("attention", b=B, h=H, nq=n, nk=n, dk=D, causal=causal)


def _check(out, q, k, v, causal):
    # the reference on two heads keeps the check cheap at n=4096
    expected = scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2], causal=causal)
    assert rel_err(np.asarray(out)[:, :2], expected) < TOL[np.float32]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_tfm_attention(benchmark, impl, n, causal):
    flops = _setup(benchmark, n, causal, f"tfm {impl}")
    q, k, v = _inputs(n)
    nbytes = cost.bytes_moved("attention", b=B, h=H, nq=n, nk=n, dk=D, causal=causal, impl=impl)
    out = measure(benchmark, att.attention, q, k, v, None, causal, impl, flops=flops, nbytes=nbytes)
    _check(out, q, k, v, causal)


@requires_torch
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n", NS)
def test_torch_sdpa(benchmark, n, causal):
    flops = _setup(benchmark, n, causal, "torch sdpa")
    q, k, v = _inputs(n)
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        out = measure(benchmark, sdpa, tq, tk, tv, is_causal=causal, flops=flops)
    _check(out.numpy(), q, k, v, causal)
