"""Lab: the recurrent step of ``tfm/backends/cpu/recurrent.py``: its product h_{t-1} W_hh^T,
its two schedules, its block size, and the weight permutation.

    python -m dev.cpu.recurrent [--out DIR] [--quick]    (part of python -m dev.cpu.run_all)

Each comparison first checks every variant against float64 (NaN-poisoned outputs), then times
them interleaved (``common.interleave``) and checks the timed outputs again. float32; the
layer kernels are the library's own, called directly on inputs prepared as the layers
prepare them. Writes DIR/recurrent.csv and DIR/recurrent_check.csv.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from tfm.backends.cpu import recurrent as rec
from tfm.backends.cpu._blas import N as _N
from tfm.backends.cpu._blas import gemm
from tfm.backends.cpu._threads import single_threaded_blas
from tfm.reference import baselines as ref

from .common import aligned, check, compare, interleave, main, print_rows, rel_err, torch_threads

# Step-product variants, versions 1..N: acc = h @ W_hh^T[:, block], one unit block at a time
# (as the kernels do), (8, 512) x (512, 2048) per step, one thread.
VARIANTS = {
    "v1 k-b-j loop": "plain loop nest: one load and one store of acc per multiply-add",
    "v2 OpenBLAS sgemm": "one single-threaded ?gemm per unit block (packs W every call)",
    "v3 4 k x 2 rows": "register-blocked: 4 rows of W per pass, 2 batch rows share each load",
    "v4 4 k x 4 rows, no FMA": "the library's loop compiled without FMA contraction",
    "v5 4 k x 4 rows (library)": "recurrent._hidden_block: 4 k x 4 rows, fused multiply-adds",
}
N_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


@njit(cache=True, fastmath={"contract"})
def _step_kbj(h, w_hhT, acc, col0, width):
    batch, hidden = h.shape
    acc[:, :width] = 0.0
    for k in range(hidden):
        wk = w_hhT[k, col0:col0 + width]
        for b in range(batch):
            p, r = h[b, k], acc[b]
            for j in range(width):
                r[j] += p * wk[j]


@njit(cache=True, fastmath={"contract"})
def _step_4k2r(h, w_hhT, acc, col0, width):
    batch, hidden = h.shape
    acc[:, :width] = 0.0
    for k in range(0, hidden - 3, 4):
        # 4 rows of W, each read once per 2 batch rows (row slices: contiguous, so vectorised)
        w0 = w_hhT[k, col0:col0 + width]
        w1 = w_hhT[k + 1, col0:col0 + width]
        w2 = w_hhT[k + 2, col0:col0 + width]
        w3 = w_hhT[k + 3, col0:col0 + width]
        for b in range(0, batch - 1, 2):
            hk = h[b:b + 2, k:k + 4]
            x0, x1, x2, x3 = hk[0, 0], hk[0, 1], hk[0, 2], hk[0, 3]
            y0, y1, y2, y3 = hk[1, 0], hk[1, 1], hk[1, 2], hk[1, 3]
            top, bottom = acc[b], acc[b + 1]
            for j in range(width):
                top[j] = top[j] + x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]
                bottom[j] = bottom[j] + y0 * w0[j] + y1 * w1[j] + y2 * w2[j] + y3 * w3[j]
        if batch % 2:  # the odd row (not timed: the timed batch is even)
            for i in range(4):
                acc[batch - 1, :width] += h[batch - 1, k + i] * w_hhT[k + i, col0:col0 + width]
    for k in range(hidden - hidden % 4, hidden):
        for b in range(batch):
            acc[b, :width] += h[b, k] * w_hhT[k, col0:col0 + width]


@njit(cache=True)
def _step_blas(h, w_hhT, acc, col0, width):
    # row-major acc (B, width) = h (B, H) @ W[:, col0:col0 + width] is, column-major,
    # acc^T = W_block^T h^T: gemm(N, N) with W's row length as its leading dimension
    one = np.ones(1, h.dtype)
    zero = np.zeros(1, h.dtype)
    gemm(_N, _N, width, h.shape[0], h.shape[1], one, w_hhT[0, col0:], w_hhT.shape[1], h,
         h.shape[1], zero, acc, acc.shape[1])


# The library's loop without FMA contraction. Not cached: it has the library function's name
# and code, and Numba's cache key does not include the fastmath flags.
_step_no_fma = njit(cache=False, fastmath=False)(rec._hidden_block.py_func)

_STEP = {"v1 k-b-j loop": _step_kbj, "v2 OpenBLAS sgemm": _step_blas, "v3 4 k x 2 rows": _step_4k2r,
         "v4 4 k x 4 rows, no FMA": _step_no_fma, "v5 4 k x 4 rows (library)": rec._hidden_block}


def _step_product(fn, h, w_hhT, acc, width):
    """One step's product the way the kernels take it: unit block after unit block."""
    for col0 in range(0, w_hhT.shape[1], width):
        fn(h, w_hhT, acc, col0, min(width, w_hhT.shape[1] - col0))


def run_checks(rng) -> list[dict]:
    """Every step-product variant on a column block inside a wider W_hh^T, with remainders
    in the batch (B % 4, B % 2) and in k (H % 4), into a NaN-poisoned accumulator."""
    checks: list[dict] = []
    for batch, hidden, width in ((5, 37, 44), (1, 6, 24), (3, 64, 32)):
        h = rng.standard_normal((batch, hidden)).astype(np.float32)
        w = rng.standard_normal((hidden, 3 * width + 5)).astype(np.float32)
        want = h.astype(np.float64) @ w[:, 2:2 + width].astype(np.float64)
        for name, fn in _STEP.items():
            acc = np.full((batch, width + 3), np.nan, np.float32)
            with single_threaded_blas():
                fn(h, w, acc, 2, width)
            ok = np.all(np.isnan(acc[:, width:]))  # columns past the block untouched
            check(f"step product {name}, B={batch} H={hidden} width={width}",
                  rel_err(acc[:, :width], want) if ok else np.inf, 1e-5, checks)
    # The kernels' own buffers (W_hh^T, acc, h_buf) come from Numba's allocator, which aligns
    # arrays to 32 bytes: on a cache line or half-way into one (step_product times both).
    w_hhT = rec._permuted_transpose(rng.standard_normal((4 * 37, 37)).astype(np.float32),
                                    rec._block_permutation(4, 37))
    check("Numba-allocated W_hh^T: bytes past a 32-byte boundary", float(w_hhT.ctypes.data % 32),
          0.5, checks)
    return checks


def step_product(rng, quick, checks) -> list[dict]:
    """The versions on 64-byte-aligned operands, and the library's loop with its operands 32
    bytes past a cache line, where Numba's allocator may put the kernels' own buffers (it
    promises 32-byte alignment): how far alignment alone moves the step."""
    batch, hidden, block = 8, 512, 4 * rec.UNITS
    h, w, w_off = aligned((batch, hidden)), aligned((hidden, 4 * hidden)), aligned((hidden, 4 * hidden), offset=32)
    h[:] = rng.standard_normal((batch, hidden))
    w[:] = rng.uniform(-hidden ** -0.5, hidden ** -0.5, (hidden, 4 * hidden))
    w_off[:] = w
    accs = {name: aligned((batch, block)) for name in _STEP}
    fns = {name: (lambda fn=fn, acc=accs[name]: _step_product(fn, h, w, acc, block))
           for name, fn in _STEP.items()}
    off = "v5, W and acc 32 bytes off a cache line"
    accs[off] = aligned((batch, block), offset=32)
    fns[off] = lambda: _step_product(rec._hidden_block, h, w_off, accs[off], block)
    with torch_threads(1) as torch, single_threaded_blas():
        if torch is not None:
            th, tw = torch.from_numpy(h), torch.from_numpy(w)
            fns["torch.mm, 1 thread"] = lambda: torch.mm(th, tw)
        times = interleave(fns, budget_s=0.5 if quick else 3.0, min_rounds=20, max_rounds=3000)
    want = h.astype(np.float64) @ w[:, -block:].astype(np.float64)  # the last block computed
    for name, acc in accs.items():
        check(f"step product {name}, after timing", rel_err(acc, want), 1e-5, checks)
    w_bytes = w.nbytes
    extra = {name: {"us_per_step": 1e6 * float(np.median(t)),
                    "gflops": 2 * batch * hidden * 4 * hidden / float(np.median(t)) / 1e9,
                    "w_gb_per_s": w_bytes / float(np.median(t)) / 1e9} for name, t in times.items()}
    rows = compare("recurrent", f"step product ({batch},{hidden})x({hidden},{4 * hidden})", times,
                   "v5 4 k x 4 rows (library)", extra)
    print_rows(rows)
    return rows


class Layer:
    """A layer's kernel inputs, prepared as ``recurrent.*_layer`` prepares them, and its
    float64 reference output."""

    def __init__(self, rng, kind, batch, hidden, n, units=rec.UNITS, d_in=16):
        self.kind, self.units = kind, units
        g = N_GATES[kind] * hidden
        bound = hidden ** -0.5
        x = rng.standard_normal((batch, n, d_in)).astype(np.float32)
        self.h0 = rng.standard_normal((batch, hidden)).astype(np.float32)
        self.c0 = rng.standard_normal((batch, hidden)).astype(np.float32)
        w_ih, w_hh = (rng.uniform(-bound, bound, (g, d)).astype(np.float32) for d in (d_in, hidden))
        b_ih, b_hh = (rng.uniform(-bound, bound, g).astype(np.float32) for _ in range(2))
        bias = b_ih + b_hh
        if kind == "gru":  # b_hn stays inside r * (W_hn h + b_hn)
            bias[2 * hidden:] = b_ih[2 * hidden:]
            self.state = np.ascontiguousarray(b_hh[2 * hidden:])
        elif kind == "lstm":
            self.state = self.c0.copy()
        else:
            self.state = False  # tanh
        self.xw, self.w_hhT = rec._prepare(x, self.h0, w_ih, w_hh, bias, N_GATES[kind], units)
        args = (x, self.h0, self.c0) if kind == "lstm" else (x, self.h0)
        extra = ("tanh",) if kind == "rnn" else ()
        self.want = getattr(ref, f"{kind}_layer")(*args, w_ih, w_hh, b_ih, b_hh, *extra)[0]
        self.out = np.full((batch, n, hidden), np.nan, np.float32)
        self.step_flops = 2 * batch * hidden * g

    def by_rows(self, groups, units=None):
        starts = np.array([g * self.h0.shape[0] // groups for g in range(groups + 1)], np.int64)
        kernel = getattr(rec, f"_{self.kind}_by_rows")
        return lambda: kernel(self.xw, self.h0, self.w_hhT, self._state(), self.out,
                              units or self.units, starts)

    def by_units(self, units=None):
        kernel = getattr(rec, f"_{self.kind}_by_units")
        return lambda: kernel(self.xw, self.h0, self.w_hhT, self._state(), self.out,
                              units or self.units)

    def _state(self):
        if self.kind == "lstm":  # every call starts from c0
            np.copyto(self.state, self.c0)
        return self.state

    def check(self, label, fn, checks):
        self.out[:] = np.nan
        fn()
        check(label, rel_err(self.out, self.want), 2e-5, checks)


def _timed(layers_fns: dict, layer: Layer, case: str, baseline: str, budget: float, checks) -> list:
    for name, fn in layers_fns.items():
        layer.check(f"{case}: {name}", fn, checks)
    times = interleave(layers_fns, budget_s=budget, min_rounds=7)
    for name, fn in layers_fns.items():  # again after the timing loop
        layer.check(f"{case}: {name}, after timing", fn, checks)
    n = layer.xw.shape[1]
    extra = {name: {"us_per_step": 1e6 * float(np.median(t)) / n, "step_mflop": layer.step_flops / 1e6}
             for name, t in times.items()}
    rows = compare("recurrent", case, times, baseline, extra)
    print_rows(rows)
    return rows


def schedules(rng, quick, checks) -> list[dict]:
    """By units against by rows where the library chooses between them, and the thresholds."""
    n = 32 if quick else 128
    budget = 0.5 if quick else 2.5
    rows = []
    threads = numba.get_num_threads()
    # rows vs units around MIN_SPLIT_STEP_FLOPS (step MFLOP: 0.5, 2.1, 3.1, 4.2, 8.4, 8.4, 12.6,
    # 16.8), then B=16 (a row group per thread) and B=8 split into two row groups
    cases = [("lstm", 1, 256), ("rnn", 1, 1024), ("gru", 1, 512), ("rnn", 8, 512), ("lstm", 4, 512),
             ("lstm", 1, 1024), ("gru", 2, 1024), ("lstm", 8, 512), ("gru", 8, 512)]
    if quick:
        cases = cases[-2:]
    for kind, batch, hidden in cases:
        layer = Layer(rng, kind, batch, hidden, n)
        # the RNN shares its single gate in blocks of RNN_UNITS / threads (as rnn_layer does)
        split = max(rec.UNITS, rec.RNN_UNITS // threads) if kind == "rnn" else rec.UNITS
        own = rec.RNN_UNITS if kind == "rnn" else rec.UNITS
        rows += _timed({"by rows, one group": layer.by_rows(1, own), "by units": layer.by_units(split)},
                       layer, f"{kind} B={batch} H={hidden} n={n}", "by rows, one group", budget, checks)
    for kind in ("lstm", "gru", "rnn")[:1 if quick else 3]:
        layer = Layer(rng, kind, 16, 512, n)
        own = rec.RNN_UNITS if kind == "rnn" else rec.UNITS
        split = max(rec.UNITS, rec.RNN_UNITS // threads) if kind == "rnn" else rec.UNITS
        rows += _timed({"by rows, two groups": layer.by_rows(2, own), "by units": layer.by_units(split)},
                       layer, f"{kind} B=16 H=512 n={n}", "by rows, two groups", budget, checks)
    layer = Layer(rng, "lstm", 8, 512, n)
    rows += _timed({"by rows, one group of 8": layer.by_rows(1), "by rows, two groups of 4": layer.by_rows(2)},
                   layer, f"lstm B=8 H=512 n={n}, row groups", "by rows, one group of 8", budget, checks)
    return rows


def block_size(rng, quick, checks) -> list[dict]:
    """Hidden units per block (UNITS, RNN_UNITS): one row group, so one thread."""
    n = 16 if quick else 64
    budget = 0.5 if quick else 2.5
    rows = []
    fns, layers = {}, {}
    for units in (16, 32, 64, 128, 512):  # _prepare permutes W for each block size
        layers[units] = Layer(np.random.default_rng(1), "lstm", 8, 512, n, units=units)
    for units, layer in layers.items():
        layer.check(f"lstm B=8 H=512: {units} units", layer.by_rows(1), checks)
        fns[f"{units} units"] = layer.by_rows(1)
    times = interleave(fns, budget_s=budget, min_rounds=7)
    extra = {name: {"us_per_step": 1e6 * float(np.median(t)) / n} for name, t in times.items()}
    got = compare("recurrent", f"lstm B=8 H=512 n={n}, one thread, units per block", times,
                  f"{rec.UNITS} units", extra)
    print_rows(got)
    rows += got
    for batch in (8, 64):
        layer = Layer(rng, "rnn", batch, 512, n)
        rows += _timed({f"{rec.RNN_UNITS} units": layer.by_rows(1, rec.RNN_UNITS),
                        f"{rec.UNITS} units": layer.by_rows(1, rec.UNITS)},
                       layer, f"rnn B={batch} H=512 n={n}, one thread, units per block",
                       f"{rec.RNN_UNITS} units", budget, checks)
    return rows


def permutation(rng, quick, checks) -> list[dict]:
    """W_hh -> per-block W_hh^T, once per layer call: tiled Numba loop against NumPy."""
    hidden = 512
    w = rng.standard_normal((4 * hidden, hidden)).astype(np.float32)
    perm = rec._block_permutation(4, hidden)
    fns = {"16 x 16 tiles (library)": lambda: rec._permuted_transpose(w, perm),
           "NumPy w[perm].T": lambda: np.ascontiguousarray(w[perm].T)}
    want = w[perm].T
    for name, fn in fns.items():
        check(f"permuted transpose {name}", 0.0 if np.array_equal(fn(), want) else np.inf, 1e-30, checks)
    times = interleave(fns, budget_s=0.3 if quick else 2.0, min_rounds=10)
    rows = compare("recurrent", f"W_hh ({4 * hidden},{hidden}) permuted transpose", times,
                   "16 x 16 tiles (library)")
    print_rows(rows)
    return rows


PARTS = (step_product, schedules, block_size, permutation)

if __name__ == "__main__":
    raise SystemExit(main("recurrent", PARTS, run_checks, __doc__))
