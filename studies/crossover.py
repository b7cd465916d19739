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

from ._common import TIME, grid_name, ok, parser, pow2, run_main, savefig

NAME = "crossover"
RECURRENT = ("lstm", "rnn")
GRIDS = {
    "default": dict(d=pow2(64, 1024), n=pow2(16, 8192), max_call_s=1.0, budget_s=0.2),
    "quick": dict(d=(64, 256), n=pow2(16, 1024), max_call_s=0.6, budget_s=0.05),
    "smoke": dict(d=(16, 32), n=(8, 16, 32, 64), max_call_s=5.0, budget_s=0.01),
}


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    g = GRIDS[grid]
    return [{"layer": layer, "d": d, "n": n} for d in g["d"] for layer in ("attention_layer",) + RECURRENT
            for n in g["n"]]


def measure(case: dict, ctx) -> dict:
    from tfm.bench.layers import make_layer

    lay = make_layer(case["layer"], n=case["n"], d=case["d"], backend=ctx.options["backend"])
    t = ctx.time(lay.run, lay.sync)
    return {"backend": ctx.options["backend"], "time_s": t.median_s, **t.as_row(), "flops": lay.flops, "bytes": lay.bytes}


def build(args):
    from tfm.bench import Study

    grid = grid_name(args)
    g = GRIDS[grid]
    return Study(NAME, "n-vs-d crossover", cases(grid), measure, grow="n",
                 exponent=lambda c: 1.5 if c["layer"] == "attention_layer" else 1.0,
                 max_call_s=g["max_call_s"], budget_s=g["budget_s"], options={"backend": args.backend})


def flops_nstar(d: int, recurrent: str) -> float:
    """Smallest n with flops(attention layer) > flops(recurrent layer); NaN if already at n = 1."""
    from tfm import cost
    from tfm.bench.layers import heads_for

    def diff(n):
        return (cost.flops("mha", b=1, nq=n, nk=n, d_model=d, h=heads_for(d))
                - cost.flops(recurrent, b=1, n=n, d_in=d, d_hidden=d))

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


def summary(df):
    import pandas as pd

    rows = []
    good = ok(df)
    if good.empty:
        return pd.DataFrame(columns=["d", "recurrent", "nstar_flops", "nstar_time", "time_method"])
    for d in sorted(good["d"].unique()):
        att = good[(good["d"] == d) & (good["layer"] == "attention_layer")][["n", TIME]]
        for rec in RECURRENT:
            r = good[(good["d"] == d) & (good["layer"] == rec)][["n", TIME]]
            nt, how = time_nstar(att, r)
            rows.append({"d": int(d), "recurrent": rec, "nstar_flops": flops_nstar(int(d), rec),
                         "nstar_time": nt, "time_method": how, "nstar_paper": int(d)})
    return pd.DataFrame(rows)


def plot(df, out):
    import matplotlib.pyplot as plt

    from tfm.bench import write_atomic
    from tfm.bench.study import table_path

    s = summary(df)
    write_atomic(s, table_path(out, "crossover_nstar"))
    if s.empty:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ds = sorted(s["d"].unique())
    ax.loglog(ds, ds, "k--", lw=1, label="paper: n* = d")
    for rec, marker, color in zip(RECURRENT, "os", ("tab:blue", "tab:red")):
        sub = s[s["recurrent"] == rec].sort_values("d")
        ax.loglog(sub["d"], sub["nstar_flops"], marker + "-", color=color, label=f"vs {rec.upper()}: counted FLOPs")
        interp = sub[sub["time_method"] == "interpolated"]
        other = sub[sub["time_method"] != "interpolated"]
        ax.loglog(interp["d"], interp["nstar_time"], marker, color=color, ms=9, mfc="none", mew=2,
                  label=f"vs {rec.upper()}: measured time")
        if not other.empty:
            ax.loglog(other["d"], other["nstar_time"], marker, color=color, ms=9, mfc="none", mew=1, ls="none",
                      alpha=0.5, label=f"vs {rec.upper()}: time, extrapolated or bound")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.minorticks_off()
    ax.set(xlabel="model width d", ylabel="crossover length n* (tokens)",
           title="Where a self-attention layer (with projections)\nbecomes costlier than a recurrent layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    savefig(fig, out, "crossover")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
