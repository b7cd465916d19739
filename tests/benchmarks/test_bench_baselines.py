"""Table 1's baseline layers at d = 512 against their PyTorch peers, float32, side by side.

Each group (``--benchmark-group-by=group``) holds one layer at one length n:

    rnn / lstm / gru      tfm cpu kernel (B = 8, I = H = 512) vs nn.RNN / nn.LSTM / nn.GRU
    conv1d-dil1 / -dil9   tfm cpu conv1d (B = 8, C = 512, k = 3, "same" padding) vs nn.Conv1d
    restricted-r64        tfm restricted attention (B = 2, 8 heads of 64, window 64, centred)
                          vs PyTorch SDPA with the band mask (dense O(n^2) work)

n = 128 runs in CI (once, benchmarking disabled); n = 512, 1024, 4096 only when timing
(``make bench``). FLOPs come from ``tfm.cost`` (the restricted op counts only the window
pairs, so the SDPA peer's GFLOP/s understates the dense work it does). Each tfm result is
checked against its peer after the timing loop (relative error < 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

from tfm import cost
from tfm.backends.cpu import conv as cpu_conv
from tfm.backends.cpu import recurrent as cpu_rec
from tfm.backends.cpu import restricted as cpu_restricted
from tfm.reference.baselines import restricted_window

from conftest import large, measure, rel_err, requires_torch, torch

pytestmark = requires_torch

D = 512
LENGTHS = [128, 512, 1024, 4096]
RNN_BATCH, CONV_BATCH, ATTN_BATCH, HEADS, WINDOW = 8, 8, 2, 8, 64


def _maybe_large(benchmark, n):
    if n > 128:
        large(benchmark)


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------ recurrent
def _torch_recurrent(kind):
    torch.manual_seed(0)
    return {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](
        D, D, batch_first=True).eval()


def _tfm_recurrent(kind, m):
    w = [p.detach().numpy() for p in (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0)]
    h0 = np.zeros((RNN_BATCH, D), np.float32)
    if kind == "lstm":
        return lambda x: cpu_rec.lstm_layer(x, h0, h0, *w)[0]
    if kind == "gru":
        return lambda x: cpu_rec.gru_layer(x, h0, *w)[0]
    return lambda x: cpu_rec.rnn_layer(x, h0, *w, "tanh")[0]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("impl", ["tfm", "torch"])
def test_recurrent(benchmark, impl, kind, n):
    _maybe_large(benchmark, n)
    benchmark.group = f"{kind}-d{D}-n{n}"
    m = _torch_recurrent(kind)
    x = _x((RNN_BATCH, n, D))
    flops = cost.flops(kind, b=RNN_BATCH, n=n, d_in=D, d_hidden=D)
    nbytes = cost.bytes_moved(kind, b=RNN_BATCH, n=n, d_in=D, d_hidden=D)
    with torch.inference_mode():
        tx = torch.from_numpy(x)
        if impl == "torch":
            measure(benchmark, lambda: m(tx)[0], flops=flops, nbytes=nbytes)
            return
        out = measure(benchmark, _tfm_recurrent(kind, m), x, flops=flops, nbytes=nbytes)
        assert rel_err(out, m(tx)[0].numpy()) < 1e-4


# ------------------------------------------------------------------------------ conv
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dilation", [1, 9])
@pytest.mark.parametrize("impl", ["tfm", "torch"])
def test_conv1d(benchmark, impl, dilation, n):
    _maybe_large(benchmark, n)
    benchmark.group = f"conv1d-dil{dilation}-d{D}-n{n}"
    k = 3
    torch.manual_seed(0)
    m = torch.nn.Conv1d(D, D, k, dilation=dilation, padding="same").eval()
    x = _x((CONV_BATCH, n, D))  # tfm: sequence-major (B, N, C); torch: (B, C, N)
    flops = cost.flops("conv1d", b=CONV_BATCH, n_out=n, c_in=D, c_out=D, k=k)
    nbytes = cost.bytes_moved("conv1d", b=CONV_BATCH, n_out=n, c_in=D, c_out=D, k=k)
    total = dilation * (k - 1)
    with torch.inference_mode():
        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))
        if impl == "torch":
            measure(benchmark, m, tx, flops=flops, nbytes=nbytes)
            return
        w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
        out = measure(benchmark, cpu_conv.conv1d, x, w, b, dilation, total // 2, total - total // 2,
                      flops=flops, nbytes=nbytes)
        assert rel_err(out, m(tx).numpy().transpose(0, 2, 1)) < 1e-4


# ------------------------------------------------------------------------------ restricted
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("impl", ["tfm", "torch-sdpa-band-mask"])
def test_restricted_attention(benchmark, impl, n):
    _maybe_large(benchmark, n)
    benchmark.group = f"restricted-r{WINDOW}-d{D}-n{n}"
    dh = D // HEADS
    q, k, v = (_x((ATTN_BATCH, HEADS, n, dh), seed) for seed in range(3))
    flops = cost.flops("restricted_attention", b=ATTN_BATCH, h=HEADS, n=n, d=dh, window=WINDOW)
    nbytes = cost.bytes_moved("restricted_attention", b=ATTN_BATCH, h=HEADS, n=n, d=dh, window=WINDOW)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    mask = torch.from_numpy(restricted_window(n, n, WINDOW, False))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        if impl != "tfm":
            measure(benchmark, sdpa, tq, tk, tv, attn_mask=mask, flops=flops, nbytes=nbytes)
            return
        out = measure(benchmark, cpu_restricted.restricted_attention, q, k, v, WINDOW, False,
                      flops=flops, nbytes=nbytes)
        assert rel_err(out, sdpa(tq, tk, tv, attn_mask=mask).numpy()) < 1e-4
