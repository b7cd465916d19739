"""Lab: the float32 elementwise math of ``tfm/backends/cpu/fastmath.py`` against libm and the
forms it replaced, in ns per element.

    python -m dev.cpu.fastmath [--out DIR] [--quick]     (part of python -m dev.cpu.run_all)

Rows of 1024 float32 scores (a fused-attention key tile) or a flat array of gate
pre-activations; each variant first checked against float64 NumPy, then timed interleaved
with the others of its group. Writes DIR/fastmath.csv and DIR/fastmath_check.csv.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tfm.backends.cpu import fastmath, norm

from .common import aligned, check, compare, interleave, main, print_rows

# name -> what it is; the verdicts quoted in the library come from this module's CSV.
VARIANTS = {
    # exp of a score row, shifted by its max, and the row's float64 sum (softmax, attention)
    "exp libm": "np.exp (libm expf, one element per call), then the float64 sum",
    "exp one loop": "fastmath.exp_le0 and the float64 sum in the same loop",
    "exp then sum": "fastmath.exp_le0 loop, then the float64 sum loop (norm.exp_shift_sum)",
    "exp2 then sum": "fastmath.exp2_le0 on log2-unit scores, then the sum (norm.exp2_shift_sum)",
    # gate nonlinearities (recurrent layers, GLU)
    "tanh libm": "np.tanh (libm tanhf)",
    "tanh rational, python errors": "fastmath's rational tanh compiled with Numba's default "
                                    "error model (a zero-divisor check per division)",
    "tanh rational": "fastmath.tanh (error_model='numpy')",
    "sigmoid libm": "1 / (1 + np.exp(-x))",
    "sigmoid via tanh": "fastmath.sigmoid: (1 + tanh(x / 2)) / 2 through the rational tanh",
    # row max (softmax, attention)
    "max scalar": "a compare-and-select loop",
    "max maxnum": "norm.row_max: llvm.maxnum, a reduction LLVM vectorises",
}

N_KEYS = 1024  # elements per score row: one key tile of the fused attention kernel
_LOG2E = 1.4426950408889634


@njit(cache=True, fastmath=fastmath.REDUCE)
def _exp_libm(row, n, m):
    for j in range(n):
        row[j] = np.exp(row[j] - m)
    s = 0.0
    for j in range(n):
        s += row[j]
    return s


@njit(cache=True, fastmath=fastmath.REDUCE)
def _exp_one_loop(row, n, m):
    s = 0.0
    for j in range(n):
        e = fastmath.exp_le0(row[j] - m)
        row[j] = e
        s += e
    return s


@njit(cache=True)
def _exp_rows(src, shift, out, variant):
    """out[i] = exp-variant(src[i] - shift[i]) row by row (each row copied into place first,
    as a score tile is fresh from its gemm); returns the sum of the row sums."""
    n = src.shape[1]
    total = 0.0
    for i in range(src.shape[0]):
        row = out[i]
        row[:] = src[i]
        if variant == 0:
            total += _exp_libm(row, n, shift[i])
        elif variant == 1:
            total += _exp_one_loop(row, n, shift[i])
        elif variant == 2:
            total += norm.exp_shift_sum(row, n, shift[i])
        else:
            total += norm.exp2_shift_sum(row, n, shift[i])
    return total


@njit(cache=True, fastmath=False, error_model="numpy")
def _gates(x, out, variant):
    """out = the variant's gate function of x; the branch stays outside the loops, so that
    each loop is vectorised (or not) on its own merits."""
    if variant == 0:
        for i in range(x.shape[0]):
            out[i] = np.tanh(x[i])
    elif variant == 1:
        for i in range(x.shape[0]):
            out[i] = fastmath.tanh(x[i])
    elif variant == 2:
        for i in range(x.shape[0]):
            out[i] = np.float32(1.0) / (np.float32(1.0) + np.exp(-x[i]))
    else:
        for i in range(x.shape[0]):
            out[i] = fastmath.sigmoid(x[i])


# The library's rational tanh as it would compile under Numba's default error model. Not
# cached: it has the library function's name and code, and Numba's cache key does not include
# the error model, so a cached copy could stand in for the library's (or the reverse).
_tanh_python_errors = njit(cache=False, fastmath=False)(fastmath._tanh_f32.py_func)


@njit(cache=False, fastmath=False)
def _tanh_rows_python_errors(x, out):
    for i in range(x.shape[0]):
        out[i] = _tanh_python_errors(x[i])


@njit(cache=True, fastmath=fastmath.REDUCE)
def _max_scalar(row, n):
    m = row.dtype.type(-np.inf)
    for j in range(n):
        m = row[j] if row[j] > m else m
    return m


@njit(cache=True)
def _max_rows(src, out, variant):
    for i in range(src.shape[0]):
        out[i] = _max_scalar(src[i], src.shape[1]) if variant == 0 else norm.row_max(src[i], src.shape[1])


def _inputs(rng, rows):
    # scores as attention sees them: spread of a few units, one max per row
    scores = (3.0 * rng.standard_normal((rows, N_KEYS))).astype(np.float32)
    gates = (4.0 * rng.standard_normal(rows * N_KEYS)).astype(np.float32)
    return scores, gates


def run_checks(rng) -> list[dict]:
    rows: list[dict] = []
    scores, gates = _inputs(rng, 37)
    scores[3, 5:40] = -np.inf  # masked keys give exactly 0
    shift = scores.max(axis=1)
    for v, name in enumerate(("exp libm", "exp one loop", "exp then sum", "exp2 then sum")):
        src, m = (scores * np.float32(_LOG2E), shift * np.float32(_LOG2E)) if v == 3 else (scores, shift)
        # the reference takes the kernels' float32 difference x - m: only the function's error
        d = (src - m[:, None]).astype(np.float64)
        want = np.exp2(d) if v == 3 else np.exp(d)
        out = np.full_like(src, np.nan)
        total = _exp_rows(src, m, out, v)
        check(f"fastmath {name}", rel_err_max(out, want), 2.5e-7, rows)
        check(f"fastmath {name}: sum", abs(total - want.sum()) / want.sum(), 1e-6, rows)
    x64 = gates.astype(np.float64)
    for v, (name, ref) in enumerate((("tanh libm", np.tanh(x64)), ("tanh rational", np.tanh(x64)),
                                     ("sigmoid libm", 1 / (1 + np.exp(-x64))),
                                     ("sigmoid via tanh", 1 / (1 + np.exp(-x64))))):
        out = np.full_like(gates, np.nan)
        _gates(gates, out, v)
        check(f"fastmath {name} (max abs error)", float(np.max(np.abs(out - ref))), 4e-7, rows)
    out = np.full_like(gates, np.nan)
    _tanh_rows_python_errors(gates, out)
    check("fastmath tanh rational, python errors (max abs error)",
          float(np.max(np.abs(out - np.tanh(x64)))), 4e-7, rows)
    for v, name in enumerate(("max scalar", "max maxnum")):
        out = np.full(scores.shape[0], np.nan, np.float32)
        _max_rows(scores, out, v)
        check(f"fastmath {name}", float(np.max(np.abs(out - shift))), 1e-30, rows)
    return rows


def rel_err_max(out, want) -> float:
    """Largest elementwise relative error (exact zeros must stay zeros); inf on NaN."""
    out = np.asarray(out, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    zero = want == 0
    if np.any(out[zero] != 0):
        return float("inf")
    return float(np.max(np.abs(out[~zero] - want[~zero]) / want[~zero]))


def timings(rng, quick: bool, checks: list) -> list[dict]:
    n_rows = 256
    # every operand 64-byte aligned (``common.aligned``): alignment alone moves these loops
    scores, gates, scores2, out, out_g = (aligned(shape) for shape in
                                          ((n_rows, N_KEYS), (n_rows * N_KEYS,), (n_rows, N_KEYS),
                                           (n_rows, N_KEYS), (n_rows * N_KEYS,)))
    scores[:], gates[:] = _inputs(rng, n_rows)
    shift = scores.max(axis=1)
    scores2[:], shift2 = scores * np.float32(_LOG2E), shift * np.float32(_LOG2E)
    out_m = np.empty(n_rows, np.float32)
    budget = 0.3 if quick else 2.0
    elements = scores.size
    groups = {
        "exp of a score row": ({
            "exp libm": lambda: _exp_rows(scores, shift, out, 0),
            "exp one loop": lambda: _exp_rows(scores, shift, out, 1),
            "exp then sum": lambda: _exp_rows(scores, shift, out, 2),
            "exp2 then sum": lambda: _exp_rows(scores2, shift2, out, 3),
        }, "exp then sum"),
        "tanh": ({
            "tanh libm": lambda: _gates(gates, out_g, 0),
            "tanh rational, python errors": lambda: _tanh_rows_python_errors(gates, out_g),
            "tanh rational": lambda: _gates(gates, out_g, 1),
        }, "tanh rational"),
        "sigmoid": ({
            "sigmoid libm": lambda: _gates(gates, out_g, 2),
            "sigmoid via tanh": lambda: _gates(gates, out_g, 3),
        }, "sigmoid via tanh"),
        "row max": ({
            "max scalar": lambda: _max_rows(scores, out_m, 0),
            "max maxnum": lambda: _max_rows(scores, out_m, 1),
        }, "max maxnum"),
    }
    rows = []
    for group, (fns, baseline) in groups.items():
        times = interleave(fns, budget_s=budget, min_rounds=20, max_rounds=2000)
        extra = {name: {"ns_per_element": 1e9 * float(np.median(t)) / elements}
                 for name, t in times.items()}
        got = compare("fastmath", f"{group}, {elements} float32", times, baseline, extra)
        print_rows(got)
        rows += got
    return rows


PARTS = (timings,)

if __name__ == "__main__":
    raise SystemExit(main("fastmath", PARTS, run_checks, __doc__))
