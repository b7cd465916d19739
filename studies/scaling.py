"""Study 1: time, counted FLOPs and peak memory of each Table 1 layer type against n and d.

Each layer of the Table 1 registry (tfm.table1) runs alone (batch 1, float32) on the
chosen backend: the attention core (naive and fused; d/64 heads of width 64), LSTM and
plain RNN layers, a k=3 convolution (contiguous and dilated), restricted self-attention
and the position-wise feed-forward network. n-sweeps run at several d, a d-sweep at fixed n. The log-log
slope of time (fastest repeat) and of counted FLOPs is fitted over the asymptotic range
(tfm.bench.fit) with 95% intervals (``fits``, tables/scaling_fits.csv), beside the
exponents of the paper's complexity. Peak memory: host RSS high-water mark on the CPU,
device memory allocated by the call on a GPU (tfm.bench.memory).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from tfm.table1 import LAYERS as REGISTRY, label

from ._common import TIME, grid_name, make_study, ok, parser, pow2, run_main
from ._report import prose

NAME = "scaling"
TITLE = "Scaling in n and d"
LAYERS = ("self_attention_naive", "self_attention", "recurrent", "rnn", "convolutional", "convolutional_dilated",
          "self_attention_restricted", "ffn")

GRIDS = {  # n-sweep n range and its d values; d-sweep d values and its n
    "default": dict(n=pow2(16, 16384), n_ds=(64, 256, 1024), d=pow2(64, 1024), d_n=512, max_call_s=1.5, budget_s=0.25),
    "quick": dict(n=[16, 64, 256, 1024], n_ds=(64,), d=(64, 128, 256), d_n=128, max_call_s=0.3, budget_s=0.05),
    "smoke": dict(n=[8, 16], n_ds=(8,), d=(8, 16), d_n=8, max_call_s=5.0, budget_s=0.01),
    # An H100/H200: series stop once a call is predicted over 0.3 s (the recurrent layers at
    # a few thousand steps, one launch each); estimated 20-40 s with compilation.
    "gpu": dict(n=pow2(256, 16384), n_ds=(256,), d=pow2(64, 1024), d_n=512, max_call_s=0.3, budget_s=0.02),
}

# Judging a fitted exponent against the paper's:
TOL_EXP = 0.25  # agrees when within this of the paper's exponent,
MAX_CI_WIDTH = 1.0  # or when its 95% interval, if no wider than this, contains it
# Peak memory against n (at the smallest d) confirms the paper's memory argument when:
NAIVE_MIN_EXP, FUSED_MAX_EXP = 1.6, 1.3  # naive grows at least this fast, fused at most this fast


def arg_parser():
    p = parser(NAME, __doc__, GRIDS)
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {','.join(LAYERS)}")
    return p


def sweep_cases(g: dict, layers, **fixed) -> list[dict]:
    """Each layer's n-sweeps (at each of ``g["n_ds"]``) and its d-sweep (at ``g["d_n"]``), each
    case led by the ``fixed`` keys; the training-step study sweeps the same way."""
    out = []
    for layer in layers:
        for d in g["n_ds"]:
            out += [{**fixed, "layer": layer, "sweep": "n", "n": n, "d": d} for n in g["n"]]
        out += [{**fixed, "layer": layer, "sweep": "d", "n": g["d_n"], "d": d} for d in g["d"]]
    return out


def cases(grid: str, layers=LAYERS) -> list[dict]:
    return sweep_cases(GRIDS[grid], layers)


def measure(case: dict, ctx) -> dict:
    from tfm.bench.layers import make_layer

    lay = make_layer(case["layer"], n=case["n"], d=case["d"], backend=ctx.options["backend"])
    t = ctx.time(lay.run, lay.sync)
    mem = ctx.memory(lay.run, lay.sync)
    return {"backend": ctx.options["backend"], "time_s": t.median_s, **t.as_row(), "flops": lay.flops,
            "bytes": lay.bytes, **mem.as_row()}


def build(args):
    grid = grid_name(args)
    layers = tuple(x for x in args.layers.split(",") if x)
    bad = set(layers) - set(LAYERS)
    if bad:
        raise SystemExit(f"unknown layers {sorted(bad)}; choose from {', '.join(LAYERS)}")
    g = GRIDS[grid]
    return make_study(sys.modules[__name__], cases(grid, layers), measure, args, grow=lambda c: c["sweep"],
                      exponent=lambda c: float(REGISTRY[c["layer"]].exponents[0 if c["sweep"] == "n" else 1]),
                      max_call_s=g["max_call_s"], budget_s=g["budget_s"])


# ----------------------------------------------------------------------------- derived tables
def fits(df) -> pd.DataFrame:
    """One row per (layer, sweep, fixed size, quantity): fitted exponent with its 95% interval."""
    from tfm.bench import loglog_slope

    rows = []
    good = ok(df)
    if good.empty:
        return pd.DataFrame(columns=["layer", "sweep", "fixed", "quantity", "exponent", "ci_low", "ci_high",
                                     "points", "range_from", "range_to", "paper_exponent", "paper_complexity"])
    for (layer, sweep), grp in good.groupby(["layer", "sweep"]):
        fixed_col = "d" if sweep == "n" else "n"
        for fixed, sub in grp.groupby(fixed_col):
            for qty in (TIME, "flops"):
                f = loglog_slope(sub[sweep], sub[qty])
                rows.append({"layer": layer, "sweep": sweep, "fixed": f"{fixed_col}={fixed}",
                             "quantity": "time" if qty == TIME else "flops", "exponent": f.slope,
                             "ci_low": f.ci_low, "ci_high": f.ci_high, "points": f.points,
                             "range_from": f.x_from, "range_to": f.x_to,
                             "paper_exponent": REGISTRY[layer].exponents[0 if sweep == "n" else 1],
                             "paper_complexity": REGISTRY[layer].paper_complexity})
    return pd.DataFrame(rows)


DERIVED = {"scaling_fits": fits}


def agrees(slope, lo, hi, paper) -> bool:
    """Within TOL_EXP of the paper, or a 95% interval no wider than MAX_CI_WIDTH containing it."""
    if not np.isfinite(slope):
        return False
    tight = np.isfinite(lo) and np.isfinite(hi) and (hi - lo) <= MAX_CI_WIDTH
    return abs(slope - paper) <= TOL_EXP or (tight and lo <= paper <= hi)


def pick_fit(fits_df: pd.DataFrame, layer: str, sweep: str, qty: str = "time"):
    """The fit quoted for a layer and sweep: the one over the most points (ties: the largest
    fixed size, the most asymptotic); None if none is finite."""
    if fits_df is None or fits_df.empty:
        return None
    f = fits_df[(fits_df["layer"] == layer) & (fits_df["sweep"] == sweep) & (fits_df["quantity"] == qty)].copy()
    f = f[np.isfinite(f["exponent"])]
    if f.empty:
        return None
    f["size"] = f["fixed"].str.split("=").str[1].astype(float)
    return f.sort_values(["points", "size"]).iloc[-1]


def verdicts(fits_df: pd.DataFrame) -> pd.DataFrame:
    """The quoted fit of every (layer, sweep) beside the paper's exponent, with the verdict."""
    from ._report import ci

    rows = []
    for layer in LAYERS:
        for sweep in ("n", "d"):
            f, fl = pick_fit(fits_df, layer, sweep), pick_fit(fits_df, layer, sweep, "flops")
            if f is None:
                continue
            paper = REGISTRY[layer].exponents[0 if sweep == "n" else 1]
            rows.append({"layer": layer, "in": sweep, "at": f["fixed"],
                         "range": f"{f['range_from']:.0f}..{f['range_to']:.0f}", "time exponent": f["exponent"],
                         "95% CI": ci(f["ci_low"], f["ci_high"]),
                         "FLOP exponent": fl["exponent"] if fl is not None else np.nan, "paper": paper,
                         "agrees": "yes" if agrees(f["exponent"], f["ci_low"], f["ci_high"], paper) else "no",
                         "_f": f, "_fl": fl})
    return pd.DataFrame(rows)


def memory_slopes(df) -> dict:
    """Per attention kernel at the smallest d: (fit of peak memory against n, the largest-n row, column)."""
    from tfm.bench import loglog_slope

    good = ok(df)
    col = "device_alloc_bytes" if "device_alloc_bytes" in good.columns and good["device_alloc_bytes"].notna().any() \
        else "rss_bytes"
    if good.empty or col not in good.columns:
        return {}
    nsw = good[good["sweep"] == "n"]
    d0 = nsw["d"].min()
    out = {}
    for layer in ("self_attention_naive", "self_attention"):
        sub = nsw[(nsw["layer"] == layer) & (nsw["d"] == d0) & (nsw[col] > 0)]
        if len(sub) >= 2:
            out[layer] = (loglog_slope(sub["n"], sub[col]), sub.sort_values("n").iloc[-1], col)
    return out


# ----------------------------------------------------------------------------- figures
def _slope_lines(ax, rows, x: str, y: str, scale: float) -> None:
    """One log-log line per layer of ``y`` against ``x``, labelled with its fitted slope."""
    from tfm.bench import loglog_slope

    for layer in LAYERS:
        sub = rows[(rows["layer"] == layer) & (rows[y] > 0)].sort_values(x)
        if sub.empty:
            continue
        fit = loglog_slope(sub[x], sub[y])
        lab = f"{label(layer)}: slope {fit.slope:.2f}" if np.isfinite(fit.slope) else label(layer)
        ax.loglog(sub[x], sub[y] * scale, "o-", ms=3, label=lab)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_n(df, on: str):
    import matplotlib.pyplot as plt

    nsw = df[df["sweep"] == "n"]
    if nsw.empty:
        return None
    ds = sorted(nsw["d"].unique())
    fig, axes = plt.subplots(1, len(ds), figsize=(5.2 * len(ds), 4.6), squeeze=False)
    for ax, d in zip(axes[0], ds):
        _slope_lines(ax, nsw[nsw["d"] == d], "n", TIME, 1e3)
        ax.set(xlabel="sequence length n (tokens)", ylabel="time per layer call, fastest repeat (ms)", title=f"d = {d}")
    fig.suptitle(f"Time against n (batch 1, float32; {on}); legend: fitted log-log slope over the upper half of n")
    return fig


def plot_d(df, on: str):
    import matplotlib.pyplot as plt

    dsw = df[df["sweep"] == "d"]
    if dsw.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    _slope_lines(ax, dsw, "d", TIME, 1e3)
    ax.set(xlabel="model width d", ylabel="time per layer call, fastest repeat (ms)",
           title=f"Time against d at n = {int(dsw['n'].iloc[0])}\n({on})")
    return fig


def plot_memory(df, on: str):
    import matplotlib.pyplot as plt

    device = "device_alloc_bytes" in df.columns and df["device_alloc_bytes"].notna().any()
    col = "device_alloc_bytes" if device else "rss_bytes"
    nsw = df[df["sweep"] == "n"]
    if nsw.empty or col not in nsw.columns:
        return None
    d0 = nsw["d"].min()
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    _slope_lines(ax, nsw[nsw["d"] == d0], "n", col, 2.0 ** -20)
    what = "device memory allocated by one call" if device else "peak extra resident memory of one call"
    ax.set(xlabel="sequence length n (tokens)", ylabel=f"{what} (MiB)",
           title=f"Memory of one call against n (d = {d0})\n({on})")
    return fig


FIGURES = {"scaling_n": plot_n, "scaling_d": plot_d, "memory_n": plot_memory}


# ----------------------------------------------------------------------------- report
INTRO = prose(f"""
    Each layer runs alone at batch 1 in float32; n-sweeps at several widths d, a d-sweep at one n.
    Fitted: the log-log slope of time (each case's fastest repeat: on a shared machine other load
    only adds time) and of counted FLOPs (tfm.cost), over the asymptotic range: the upper half of
    the measured sizes on a log scale, at least 3 points (tfm.bench.fit); 95% intervals from the t
    distribution. **Fit quoted** for each layer and sweep: the one over the most points, ties broken
    by the largest fixed size. **Agreement:** a slope agrees with the paper when it lies within
    {TOL_EXP} of the paper's exponent, or its 95% interval, if no wider than {MAX_CI_WIDTH:g},
    contains it. The attention rows are the attention core (Table 1's n^2*d); the FFN is not in
    Table 1 but is the other half of a Transformer layer. **Memory verdict:** the naive kernel's
    memory must grow at least as n^{NAIVE_MIN_EXP} and the fused kernel's at most as
    n^{FUSED_MAX_EXP} (paper: n^2 score matrices against O(n*d)).
""")


def _why(v, df) -> str:
    """Why a fitted exponent misses the paper's: what the FLOPs and the achieved rate say."""
    f, fl = v["_f"], v["_fl"]
    paper = v["paper"]
    why = []
    if fl is not None and agrees(fl["exponent"], np.nan, np.nan, paper):
        why.append(f"the counted FLOPs do scale as the paper says (exponent {fl['exponent']:.2f}), so the gap is in "
                   "the time per FLOP")
    sub = ok(df)
    col, val = f["fixed"].split("=")
    sub = sub[(sub["layer"] == v["layer"]) & (sub["sweep"] == v["in"]) & (sub[col] == float(val))]
    a, b = sub[sub[v["in"]] == f["range_from"]], sub[sub[v["in"]] == f["range_to"]]
    if "gflops" in sub.columns and not a.empty and not b.empty:
        why.append(f"the achieved rate goes from {a['gflops'].iloc[0]:.3g} GFLOP/s at {v['in']}={f['range_from']:.0f} "
                   f"to {b['gflops'].iloc[0]:.3g} GFLOP/s at {v['in']}={f['range_to']:.0f}")
    if f["exponent"] < paper:
        why.append("time grows slower than the work: at these sizes fixed costs (call overhead, memory-bound passes, "
                   "weight reads that do not grow with the swept size) still weigh, i.e. the measured range is not "
                   "yet asymptotic, or larger sizes run at a higher GFLOP/s")
    else:
        why.append("time grows faster than the work: larger sizes fall out of cache and run at a lower GFLOP/s")
    return f"- **{v['layer']} in {v['in']}** (measured {f['exponent']:.2f}, paper {paper}): " + "; ".join(why) + "."


def results(rep, df, figure_suffix: str) -> str:
    from ._report import md_table

    v = verdicts(fits(df))
    s = rep.figure("scaling_n" + figure_suffix, "time against n") + rep.figure("scaling_d" + figure_suffix,
                                                                                 "time against d")
    if v.empty:
        return s + "No fitted exponents.\n\n"
    s += md_table(v.drop(columns=["_f", "_fl"])) + "\n"
    s += f"{int((v['agrees'] == 'yes').sum())} of {len(v)} fitted exponents agree with the paper.\n\n"
    bad = v[v["agrees"] == "no"]
    if not bad.empty:
        s += "Disagreements:\n\n" + "\n".join(_why(r, df) for _, r in bad.iterrows()) + "\n\n"
    s += "#### Memory\n\n" + rep.figure("memory_n" + figure_suffix, "memory against n")
    slopes = memory_slopes(df)
    if slopes:
        from ._report import ci

        col = next(iter(slopes.values()))[2]
        what = ("device memory allocated by one call (numba device arrays, frees deferred; tfm.bench.memory)"
                if col == "device_alloc_bytes" else
                "peak extra resident memory of one call (Linux VmHWM after clear_refs, free heap returned to the OS "
                "first, so allocations inside Numba kernels count too; tfm.bench.memory)")
        d0 = int(next(iter(slopes.values()))[1]["d"])
        s += f"Memory is the {what}. At d={d0}:\n\n"
        for layer, (f, top, col) in slopes.items():
            s += (f"- {layer}: grows as n^{f.slope:.2f} (95% CI {ci(f.ci_low, f.ci_high)}), "
                  f"{top[col] / 2 ** 20:.1f} MiB at n={int(top['n'])}\n")
        if len(slopes) == 2:
            na, fu = slopes["self_attention_naive"][0].slope, slopes["self_attention"][0].slope
            confirmed = na >= NAIVE_MIN_EXP and fu <= FUSED_MAX_EXP
            s += (f"\nNaive n^{na:.2f}, fused n^{fu:.2f}: "
                  + ("the naive kernel's quadratic memory and the fused kernel's at most linear memory are confirmed."
                     if confirmed else
                     "not the expected n^2 against n^1; at these sizes the score matrix is small next to fixed "
                     "allocations (inputs, output, thread buffers), so the asymptotic slopes are not reached."))
        s += "\n\n"
    return s


def readme(rep) -> list[str]:
    """The README's bullets on time exponents and memory, from the host rows."""
    df = rep.table(NAME)
    if ok(df).empty:
        return []
    v = verdicts(fits(df))
    out = []
    att = v[(v["layer"] == "self_attention") & (v["in"] == "n")]
    if not att.empty:
        a = att.iloc[0]
        others = v[v["layer"].isin(["recurrent", "rnn", "convolutional", "convolutional_dilated",
                                    "self_attention_restricted"]) & (v["in"] == "n")]["time exponent"]
        line = (f"- **Time exponents:** self-attention time grows as n^{a['time exponent']:.2f} "
                f"(95% CI {a['95% CI']}) at {a['at']}.")
        if not others.empty:
            line += (f" The recurrent, convolutional and restricted-attention layers grow as "
                     f"n^{others.min():.2f}–{others.max():.2f}.")
        line += f" {int((v['agrees'] == 'yes').sum())} of {len(v)} fitted exponents (in n and in d) agree with the paper"
        bad = v[v["agrees"] == "no"]
        if bad.empty:
            line += "."
        else:
            line += "; not: " + ", ".join(f"{r['layer']} in {r['in']} ({r['in']}^{r['time exponent']:.2f}, "
                                          f"95% CI {r['95% CI']}, from {r['_f']['points']} sizes; paper "
                                          f"{r['paper']}, counted FLOPs {r['FLOP exponent']:.2f})"
                                          for _, r in bad.iterrows()) + "."
        out.append(line)
    slopes = memory_slopes(df)
    if len(slopes) == 2:
        (fn, tn, col), (ff, tf, _) = slopes["self_attention_naive"], slopes["self_attention"]
        out.append(f"- **Memory:** naive attention's peak memory grows as n^{fn.slope:.2f} "
                   f"({tn[col] / 2 ** 20:.0f} MiB at n = {int(tn['n'])}); the fused kernel's as n^{ff.slope:.2f} "
                   f"({tf[col] / 2 ** 20:.1f} MiB at n = {int(tf['n'])}).")
    return out


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
