"""1-D convolution over sequences and the gated linear unit on the CPU.

conv1d: stride 1, zero padding, any dilation, PyTorch's cross-correlation with weights
(C_out, C_in, k) and sequence-major activations (B, N, C). It runs as k shifted GEMMs, one
per kernel tap: output rows t take input rows t + j*dilation - pad_left, so tap j is one
(B, L_j, C_in) x (C_in, C_out) product over the rows where that input lies inside the
sequence. Padding is never materialised and taps that fall wholly in the padding cost
nothing (dilations larger than N are cheap). The products go to OpenBLAS (multi-threaded):
at C = 512 each is ~1 GFLOP, far past the point where Numba loops could compete with sgemm.

    taps   (kept)  k BLAS products accumulated into the output; see the benchmarks for the
                   ratio against nn.Conv1d (oneDNN) at C = 512, k = 3.

glu: a * sigmoid(b) over the last axis split in halves, one parallel Numba pass (float32
sigmoid through the vectorised rational tanh of recurrent.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .recurrent import _sigmoid


def conv1d(x, weight, bias=None, dilation: int = 1, pad_left: int = 0, pad_right: int = 0):
    """x (B, N, C_in), weight (C_out, C_in, k) -> (B, N + pad_left + pad_right - dilation*(k-1), C_out)."""
    x = np.ascontiguousarray(x)
    dtype = x.dtype
    batch, n, _ = x.shape
    c_out, _, k = weight.shape
    n_out = n + pad_left + pad_right - dilation * (k - 1)
    taps = np.ascontiguousarray(np.asarray(weight, dtype).transpose(2, 1, 0))  # (k, C_in, C_out)
    out = np.empty((batch, n_out, c_out), dtype)
    out[...] = 0.0 if bias is None else np.asarray(bias, dtype)
    for j in range(k):
        shift = j * dilation - pad_left  # output row t reads input row t + shift
        t0, t1 = max(0, -shift), min(n_out, n - shift)
        if t1 > t0:
            out[:, t0:t1] += x[:, t0 + shift:t1 + shift] @ taps[j]
    return out


@njit(cache=True, fastmath=False, parallel=True)
def _glu(x2, out):
    rows, half = out.shape
    for r in prange(rows):
        a, g, o = x2[r, :half], x2[r, half:], out[r]
        for j in range(half):
            o[j] = a[j] * _sigmoid(g[j])


def glu(x):
    """GLU(a, b) = a * sigmoid(b) for x = [a, b] on the last axis (Dauphin et al., 2017)."""
    x = np.ascontiguousarray(x)
    half = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], half), x.dtype)
    _glu(x2, out)
    return out.reshape(x.shape[:-1] + (half,))
