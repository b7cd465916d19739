"""Study 4: the n at which a self-attention layer becomes costlier than a recurrent layer.

Section 4 says self-attention is faster than a recurrent layer when n < d. For each d,
one self-attention layer *with its projections* (Q, K, V, output: 8 n d^2 FLOPs, plus
4 n^2 d for the core) and one recurrent layer (LSTM: 16 n d^2; plain RNN: 4 n d^2) are
timed over n at batch 1. The crossover n* is where the attention/recurrent ratio crosses
1 for good (attention slower at every larger measured n): in counted FLOPs exactly
(tfm.cost), in time by log-log interpolation between the bracketing measurements, or,
when the measured range never crosses, by extrapolating power-law fits of both curves
(flagged). tables/crossover_nstar.csv holds n* per d.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from tfm.table1 import LAYERS, label

from ._common import TIME, grid_name, make_study, ok, parser, pow2, run_main
from ._report import prose

NAME = "crossover"
TITLE = "The n-vs-d crossover"
ATTENTION = "self_attention_layer"
RECURRENT = ("recurrent", "rnn")  # LSTM and plain RNN
GRIDS = {
    "default": dict(d=pow2(64, 1024), n=pow2(16, 8192), max_call_s=1.0, budget_s=0.2),
    "quick": dict(d=(64, 256), n=pow2(16, 1024), max_call_s=0.6, budget_s=0.05),
    "smoke": dict(d=(8, 16), n=(4, 8, 16), max_call_s=5.0, budget_s=0.01),
    # An H100/H200: recurrent series stop at 0.3 s per call (a few thousand launched steps).
    # Estimated 15-25 s with compilation.
    "gpu": dict(d=(64, 256, 1024), n=pow2(16, 8192), max_call_s=0.3, budget_s=0.02),
}


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    g = GRIDS[grid]
    return [{"layer": layer, "d": d, "n": n} for d in g["d"] for layer in (ATTENTION,) + RECURRENT
            for n in g["n"]]


def measure(case: dict, ctx) -> dict:
    from tfm.bench.layers import make_layer

    lay = make_layer(case["layer"], n=case["n"], d=case["d"], backend=ctx.options["backend"])
    t = ctx.time(lay.run, lay.sync)
    return {"backend": ctx.options["backend"], "time_s": t.median_s, **t.as_row(), "flops": lay.flops, "bytes": lay.bytes}


def build(args):
    grid = grid_name(args)
    g = GRIDS[grid]
    return make_study(sys.modules[__name__], cases(grid), measure, args, grow="n",
                      exponent=lambda c: 1.5 if c["layer"] == ATTENTION else 1.0,
                      max_call_s=g["max_call_s"], budget_s=g["budget_s"])


def flops_nstar(d: int, recurrent: str) -> float:
    """Smallest n with flops(attention layer) > flops(recurrent layer); NaN if already at n = 1."""
    from tfm import cost
    from tfm.bench.layers import heads_for

    def diff(n):
        return (cost.flops("mha", b=1, nq=n, nk=n, d_model=d, h=heads_for(d))
                - cost.flops(LAYERS[recurrent].kernel, b=1, n=n, d_in=d, d_hidden=d))

    if diff(1) > 0:
        return float("nan")  # attention costs more at every n
    lo, hi = 1, 2
    while diff(hi) <= 0:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if diff(mid) <= 0 else (lo, mid)
    return float(hi)


def time_nstar(att, rec) -> tuple[float, str]:
    """n* from two (n, fastest-repeat time) series: interpolated where the ratio crosses 1, else extrapolated."""
    from tfm.bench import loglog_slope

    m = att.merge(rec, on="n", suffixes=("_a", "_r")).sort_values("n")
    if m.empty:
        return float("nan"), "no common measurements"
    lr = np.log(m[TIME + "_a"].to_numpy() / m[TIME + "_r"].to_numpy())
    ln = np.log(m["n"].to_numpy(dtype=float))
    if lr[-1] > 0:  # n* is where attention becomes, and stays, slower: the last upward crossing
        slower = np.flatnonzero(lr <= 0)
        if slower.size == 0:
            return float(m["n"].iloc[0]), f"attention already slower at the smallest n={int(m['n'].iloc[0])} (upper bound)"
        i = slower[-1] + 1
        return float(np.exp(ln[i - 1] + (0 - lr[i - 1]) * (ln[i] - ln[i - 1]) / (lr[i] - lr[i - 1]))), "interpolated"
    fa, fr = loglog_slope(att["n"], att[TIME]), loglog_slope(rec["n"], rec[TIME])
    if np.isfinite(fa.slope) and np.isfinite(fr.slope) and fa.slope > fr.slope:
        n = np.exp((fr.intercept - fa.intercept) / (fa.slope - fr.slope))
        if n > m["n"].max():
            return float(n), f"extrapolated beyond n={int(m['n'].max())} (fits: attention ~n^{fa.slope:.2f}, recurrent ~n^{fr.slope:.2f})"
    return float("nan"), f"no crossing up to n={int(m['n'].max())}"


def summary(df) -> pd.DataFrame:
    """n* per d and recurrent layer: in counted FLOPs, in measured time (and how), the paper's d."""
    rows = []
    good = ok(df)
    if good.empty:
        return pd.DataFrame(columns=["d", "recurrent", "nstar_flops", "nstar_time", "time_method", "nstar_paper"])
    for d in sorted(good["d"].unique()):
        att = good[(good["d"] == d) & (good["layer"] == ATTENTION)][["n", TIME]]
        for rec in RECURRENT:
            r = good[(good["d"] == d) & (good["layer"] == rec)][["n", TIME]]
            nt, how = time_nstar(att, r)
            rows.append({"d": int(d), "recurrent": rec, "nstar_flops": flops_nstar(int(d), rec),
                         "nstar_time": nt, "time_method": how, "nstar_paper": int(d)})
    return pd.DataFrame(rows)


DERIVED = {"crossover_nstar": summary}


def plot_nstar(df, on: str):
    import matplotlib.pyplot as plt

    s = summary(df)
    if s.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ds = sorted(s["d"].unique())
    ax.loglog(ds, ds, "k--", lw=1, label="paper: n* = d")
    for rec, marker, color in zip(RECURRENT, "os", ("tab:blue", "tab:red")):
        sub = s[s["recurrent"] == rec].sort_values("d")
        name = label(rec)
        ax.loglog(sub["d"], sub["nstar_flops"], marker + "-", color=color, label=f"vs {name}: counted FLOPs")
        interp = sub[sub["time_method"] == "interpolated"]
        other = sub[sub["time_method"] != "interpolated"]
        ax.loglog(interp["d"], interp["nstar_time"], marker, color=color, ms=9, mfc="none", mew=2,
                  label=f"vs {name}: measured time")
        if not other.empty:
            ax.loglog(other["d"], other["nstar_time"], marker, color=color, ms=9, mfc="none", mew=1, ls="none",
                      alpha=0.5, label=f"vs {name}: time, extrapolated or bound")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.minorticks_off()
    ax.set(xlabel="model width d", ylabel="crossover length n* (tokens)",
           title=f"Where a self-attention layer (with projections)\nbecomes costlier than a recurrent layer ({on})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


FIGURES = {"crossover": plot_nstar}


# ----------------------------------------------------------------------------- report
INTRO = prose("""
    n* is the length at which one self-attention layer, *with* its four d x d projections, costs
    more than one recurrent layer of width d (batch 1). Counted FLOPs (tfm.cost): attention 8nd^2 +
    4n^2d against LSTM 16nd^2 (four gates, input and recurrent weights) and plain RNN 4nd^2. **Rules
    for n* in time:** n* is where the attention/recurrent time ratio crosses 1 for good (attention
    slower at every larger measured n), interpolated on log-log axes between the bracketing sizes;
    when the measured range never crosses, power-law fits of both curves (upper half of n) are
    extrapolated, only if attention's exponent is the larger ('extrapolated'); when attention is
    already slower at the smallest n, that n is an upper bound. The figure and the medians use
    interpolated values only.
""")


def results(rep, rows, suffix: str) -> str:
    from ._report import md_table

    t = summary(rows)
    s = rep.figure("crossover" + suffix, "crossover n* against d")
    if t.empty:
        return s + "No crossover measured.\n\n"
    t["n*/d (FLOPs)"] = t["nstar_flops"] / t["d"]
    t["n*/d (time)"] = t["nstar_time"] / t["d"]
    s += md_table(t[["d", "recurrent", "nstar_flops", "n*/d (FLOPs)", "nstar_time", "n*/d (time)", "time_method"]]) + "\n"
    lstm = t[t["recurrent"] == "recurrent"]
    if not lstm.empty and np.isfinite(lstm["n*/d (FLOPs)"]).any():
        s += (f"In FLOPs the crossover against an LSTM is at n* = {np.nanmedian(lstm['n*/d (FLOPs)']):.2f} d "
              "(4n^2d = 8nd^2 gives n* = 2d): the paper's n < d is the core comparison n^2 d vs n d^2 without "
              "constant factors; the LSTM's four gates double the recurrent side and the projections add to "
              "the attention side. ")
    rnn = t[t["recurrent"] == "rnn"]
    if not rnn.empty and rnn["nstar_flops"].isna().all():
        s += ("Against a plain RNN (4nd^2) the attention layer costs more FLOPs at every n: its projections "
              "alone (8nd^2) are twice the RNN's work. ")
    tm = lstm[lstm["time_method"] == "interpolated"]
    if not tm.empty:
        med, flop = float(np.median(tm["n*/d (time)"])), float(np.nanmedian(lstm["n*/d (FLOPs)"]))
        s += (f"In measured time the LSTM crossover lies at n*/d between {tm['n*/d (time)'].min():.2f} and "
              f"{tm['n*/d (time)'].max():.2f} (median {med:.2f}; {len(tm)} of {len(lstm)} widths bracketed by "
              f"measurements), {'above' if med > 1 else 'below'} the paper's n* = d and "
              f"{'above' if med > flop else 'below'} the FLOP crossover. ")
        if med > flop:
            s += ("Time favours attention beyond its FLOP count: the recurrent layer's n dependent "
                  "matrix-vector steps (batch 1) run below the GEMM rate the attention layer's projections reach. ")
        else:
            s += ("Time favours the recurrent layer beyond its FLOP count: per FLOP, the attention layer's "
                  "several kernel calls and memory-bound softmax cost more here than the recurrent layer's steps. ")
    return s + "\n\n"


def readme(rep) -> list[str]:
    good = rep.rows(NAME)
    t = summary(good)
    lstm = t[t["recurrent"] == "recurrent"] if not t.empty else t
    if lstm.empty:
        return []
    line = (f"- **Crossover:** in counted FLOPs, an attention layer with its projections becomes costlier than an "
            f"LSTM at n* ≈ {np.nanmedian(lstm['nstar_flops'] / lstm['d']):.0f}d.")
    tm = lstm[lstm["time_method"] == "interpolated"]
    if not tm.empty:
        r = tm["nstar_time"] / tm["d"]
        line += (f" In measured time on this CPU the crossover comes at n* ≈ {r.min():.1f}–{r.max():.1f}d "
                 f"(median {r.median():.1f}d; {len(tm)} of {len(lstm)} widths bracketed, d = "
                 f"{int(lstm['d'].min())}..{int(lstm['d'].max())}).")
    return [line]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
