"""Recurrent training at d = 512: forward + backward through time, tfm against PyTorch, float32.

Each group (``--benchmark-group-by=group``) holds one layer kind at one length n, B = 8 and
I = H = 512 as the forward benchmarks (test_bench_baselines.py):

    tfm     ``*_layer_train`` then ``*_layer_backward`` (cpu kernels): dx, dh0 (dc0) and the
            four parameter gradients
    torch   nn.RNN / nn.LSTM / nn.GRU called with h0 (c0), then ``torch.autograd.grad`` of
            the output with respect to x, h0 (c0) and the four parameters

Both get the same cotangent for the output (none for the final states) and run on the same
number of threads. n = 128 runs in CI (once, benchmarking disabled); 512 and 1024 only when
timing (``make bench``). FLOPs in ``extra_info``: 3x the forward's ``tfm.cost.flops`` (the
backward repeats each product twice: dx and dW_ih, the sweep's dh and dW_hh). Each tfm result
is checked against PyTorch's after the timing loop (relative error < 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

from tfm import cost
from tfm.backends.cpu import recurrent as cpu_rec

from conftest import large, measure, rel_err, requires_torch, torch

pytestmark = requires_torch

D = 512
BATCH = 8
LENGTHS = [128, 512, 1024]
NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def _case(kind, n):
    """The module, float32 inputs (x, states) and the output cotangent."""
    torch.manual_seed(0)
    m = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](D, D, batch_first=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, n, D)).astype(np.float32)
    states = [0.5 * rng.standard_normal((BATCH, D)).astype(np.float32)
              for _ in range(2 if kind == "lstm" else 1)]
    dout = rng.standard_normal((BATCH, n, D)).astype(np.float32)
    return m, x, states, dout


def _tfm(kind, m, x, states, dout):
    w = [getattr(m, name).detach().numpy() for name in NAMES]
    if kind == "rnn":
        train, backward = (lambda *a: cpu_rec.rnn_layer_train(*a, "tanh")), cpu_rec.rnn_layer_backward
    else:
        train, backward = getattr(cpu_rec, f"{kind}_layer_train"), getattr(cpu_rec, f"{kind}_layer_backward")
    none = [None] * len(states)

    def run():
        *_, saved = train(x, *states, *w)
        return backward(saved, dout, *none)
    return run


def _torch(kind, m, x, states, dout):
    tx = torch.from_numpy(x).requires_grad_()
    ts = [torch.from_numpy(s[None]).requires_grad_() for s in states]
    params = [getattr(m, name) for name in NAMES]
    tdout = torch.from_numpy(dout)

    def run():
        out, _ = m(tx, tuple(ts) if kind == "lstm" else ts[0])
        return torch.autograd.grad(out, [tx] + ts + params, tdout)
    return run


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("impl", ["tfm", "torch"])
def test_recurrent_forward_backward(benchmark, impl, kind, n):
    if n > 128:
        large(benchmark)
    benchmark.group = f"{kind}-train-d{D}-n{n}"
    m, x, states, dout = _case(kind, n)
    flops = 3 * cost.flops(kind, b=BATCH, n=n, d_in=D, d_hidden=D)
    if impl == "torch":
        measure(benchmark, _torch(kind, m, x, states, dout), flops=flops)
        return
    got = measure(benchmark, _tfm(kind, m, x, states, dout), flops=flops)
    want = _torch(kind, m, x, states, dout)()
    for g, w in zip(got, want):
        assert rel_err(g, w.numpy().reshape(g.shape)) < 1e-4
