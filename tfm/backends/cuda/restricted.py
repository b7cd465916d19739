"""Restricted (windowed) self-attention on the GPU (paper section 4, Table 1's last row).

Variant (``VARIANTS``): ``banded_fused`` — the fused attention kernel of ``attention.py``
with a key window [i - wl, i + wr] per query (centred: wl = (r-1)//2, wr = r//2; causal:
wl = r-1, wr = 0). Key tiles outside the window of a whole query tile are never loaded, so
the work is O((r + BQ + BK) * n * d) instead of O(n^2 * d), and no (n, n) band mask exists
anywhere. Verdict: correct under the simulator and on the H200 (B=4, H=8, n=1000, r=16;
``python3 -m studies.gpu``, results/gpu/correctness.csv). The sequential study
(results/gpu/studies.csv, study=sequential; r=16, one head of d=64): 0.084-0.157 ms for
n = 16..16384 at batch 1; at batch 64 2.51 ms at n=16384, where full fused attention took
199.0 ms.
Training: ``restricted_attention_train`` is the same launch writing each query's lse, and the
backward is the fused attention backward (``attention.fused_backward``) with the same band:
its key-block kernel visits only the query tiles inside a key block's window, its dQ pass
only the key tiles inside a query tile's, so both stay O(r * n * d). Verdict: correct under
the simulator and in the H200 smoke run (results/gpu/smoke.csv); not timed on a GPU.
"""

from __future__ import annotations

from numba import cuda

from .attention import fused_backward, run_fused

VARIANTS = {"banded_fused": "fused attention kernel skipping key tiles outside the window"}


def window_bounds(window: int, causal: bool) -> tuple:
    """(wl, wr): query i sees keys i - wl .. i + wr (``tfm.reference.baselines.restricted_window``)."""
    if causal:
        return window - 1, 0
    return (window - 1) // 2, window // 2


def restricted_attention(q, k, v, window, causal, tuning, save_lse: bool = False):
    """(B, H, N, Dv); with ``save_lse`` -> (out, lse (B, H, N))."""
    b, h, n, _ = q.shape
    out = cuda.device_array((b, h, n, v.shape[3]), dtype=q.dtype)
    lse = cuda.device_array((b, h, n), dtype=q.dtype) if save_lse else None
    run_fused(q, k, v, out, tuning, window=window_bounds(window, causal), lse=lse)
    return (out, lse) if save_lse else out


def restricted_attention_backward(q, k, v, out, lse, dout, window, causal, tuning):
    """(dq, dk, dv) of :func:`restricted_attention`, at O(window * N * D) cost."""
    return fused_backward(q, k, v, out, lse, dout, tuning, window=window_bounds(window, causal))
