"""Study 1: time, counted FLOPs and peak memory of each Table 1 layer type against n and d.

Each layer runs alone (batch 1, float32) on the chosen backend: the attention core (naive
and fused; d/64 heads of width 64), LSTM and plain RNN layers, a k=3 convolution
(contiguous and dilated), restricted self-attention (r=16) and the position-wise FFN.
n-sweeps run at several d, a d-sweep at fixed n. The log-log slope of time (fastest repeat) and of counted
FLOPs is fitted over the asymptotic range (tfm.bench.fit) with 95% intervals and written
to tables/scaling_fits.csv, beside the paper's exponents (n^2*d, n*d^2, k*n*d^2, r*n*d).
"""

from __future__ import annotations

import sys

from ._common import LAYER_LABELS, TIME, grid_name, ok, parser, pow2, run_main, savefig

NAME = "scaling"
LAYERS = ("attention_naive", "attention_fused", "lstm", "rnn", "conv", "conv_dilated", "restricted", "ffn")
# The paper's per-layer complexity as exponents of n and d (Table 1).
PAPER = {
    "attention_naive": (2, 1, "O(n^2 * d)"), "attention_fused": (2, 1, "O(n^2 * d)"),
    "lstm": (1, 2, "O(n * d^2)"), "rnn": (1, 2, "O(n * d^2)"),
    "conv": (1, 2, "O(k * n * d^2)"), "conv_dilated": (1, 2, "O(k * n * d^2)"),
    "restricted": (1, 1, "O(r * n * d)"), "ffn": (1, 2, "O(n * d^2) (not in Table 1)"),
}
WINDOW, KERNEL, DILATION = 16, 3, 4

GRIDS = {  # n-sweep n range and its d values; d-sweep d values and its n
    "default": dict(n=pow2(16, 16384), n_ds=(64, 256, 1024), d=pow2(64, 1024), d_n=512, max_call_s=1.5, budget_s=0.25),
    "quick": dict(n=[16, 64, 256, 1024], n_ds=(64,), d=(64, 128, 256), d_n=128, max_call_s=0.3, budget_s=0.05),
    "smoke": dict(n=[16, 32, 64], n_ds=(32,), d=(32, 64), d_n=32, max_call_s=5.0, budget_s=0.01),
}


def arg_parser():
    p = parser(NAME, __doc__, GRIDS)
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {','.join(LAYERS)}")
    return p


def cases(grid: str, layers=LAYERS) -> list[dict]:
    g = GRIDS[grid]
    out = []
    for layer in layers:
        for d in g["n_ds"]:
            out += [{"layer": layer, "sweep": "n", "n": n, "d": d} for n in g["n"]]
        out += [{"layer": layer, "sweep": "d", "n": g["d_n"], "d": d} for d in g["d"]]
    return out


def measure(case: dict, ctx) -> dict:
    from tfm.bench.layers import make_layer

    layer = case["layer"]
    kind = "conv" if layer.startswith("conv") else layer
    lay = make_layer(kind, n=case["n"], d=case["d"], backend=ctx.options["backend"], k=KERNEL,
                     dilation=DILATION if layer == "conv_dilated" else 1, window=WINDOW)
    t = ctx.time(lay.run, lay.sync)
    mem = ctx.memory(lay.run)
    return {"backend": ctx.options["backend"], "time_s": t.median_s, **t.as_row(), "flops": lay.flops,
            "bytes": lay.bytes, "rss_bytes": mem.rss_bytes, "traced_bytes": mem.traced_bytes}


def build(args):
    from tfm.bench import Study

    grid = grid_name(args)
    layers = tuple(x for x in args.layers.split(",") if x)
    bad = set(layers) - set(LAYERS)
    if bad:
        raise SystemExit(f"unknown layers {sorted(bad)}; choose from {', '.join(LAYERS)}")
    g = GRIDS[grid]

    def exponent(case):
        quad = case["layer"].startswith("attention")
        return (2.0 if quad else 1.0) if case["sweep"] == "n" else (1.0 if quad or case["layer"] == "restricted" else 2.0)

    return Study(NAME, "Scaling of each layer type in n and d", cases(grid, layers), measure,
                 grow=lambda c: c["sweep"], exponent=exponent, max_call_s=g["max_call_s"], budget_s=g["budget_s"],
                 options={"backend": args.backend})


def fits(df):
    """One row per (layer, sweep, fixed size, quantity): fitted exponent with its 95% interval."""
    import pandas as pd

    from tfm.bench import loglog_slope

    rows = []
    good = ok(df)
    for (layer, sweep), grp in good.groupby(["layer", "sweep"]):
        fixed_col = "d" if sweep == "n" else "n"
        for fixed, sub in grp.groupby(fixed_col):
            for qty in (TIME, "flops"):
                f = loglog_slope(sub[sweep], sub[qty])
                paper = PAPER[layer][0 if sweep == "n" else 1]
                rows.append({"layer": layer, "sweep": sweep, "fixed": f"{fixed_col}={fixed}",
                             "quantity": "time" if qty == TIME else "flops", "exponent": f.slope,
                             "ci_low": f.ci_low, "ci_high": f.ci_high, "points": f.points,
                             "range_from": f.x_from, "range_to": f.x_to, "paper_exponent": paper,
                             "paper_complexity": PAPER[layer][2]})
    return pd.DataFrame(rows)


def plot(df, out):
    import matplotlib.pyplot as plt
    import numpy as np

    from tfm.bench import loglog_slope, write_atomic
    from tfm.bench.study import table_path

    f = fits(df)
    write_atomic(f, table_path(out, "scaling_fits"))
    good = ok(df)
    if good.empty:
        return
    nsw = good[good["sweep"] == "n"]
    ds = sorted(nsw["d"].unique())
    fig, axes = plt.subplots(1, max(1, len(ds)), figsize=(5.2 * max(1, len(ds)), 4.6), squeeze=False)
    for ax, d in zip(axes[0], ds):
        for layer in LAYERS:
            sub = nsw[(nsw["layer"] == layer) & (nsw["d"] == d)].sort_values("n")
            if sub.empty:
                continue
            fit = loglog_slope(sub["n"], sub[TIME])
            lab = f"{LAYER_LABELS[layer]}: slope {fit.slope:.2f}" if np.isfinite(fit.slope) else LAYER_LABELS[layer]
            ax.loglog(sub["n"], sub[TIME] * 1e3, "o-", ms=3, label=lab)
        ax.set(xlabel="sequence length n (tokens)", ylabel="time per layer call, fastest repeat (ms)", title=f"d = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Time against n (batch 1, float32); legend: fitted log-log slope over the upper half of n")
    savefig(fig, out, "scaling_n")

    dsw = good[good["sweep"] == "d"]
    if not dsw.empty:
        fig, ax = plt.subplots(figsize=(6.5, 4.6))
        for layer in LAYERS:
            sub = dsw[dsw["layer"] == layer].sort_values("d")
            if sub.empty:
                continue
            fit = loglog_slope(sub["d"], sub[TIME])
            ax.loglog(sub["d"], sub[TIME] * 1e3, "o-", ms=3,
                      label=f"{LAYER_LABELS[layer]}: slope {fit.slope:.2f}")
        ax.set(xlabel="model width d", ylabel="time per layer call, fastest repeat (ms)",
               title=f"Time against d at n = {int(dsw['n'].iloc[0])}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        savefig(fig, out, "scaling_d")

    if "rss_bytes" in nsw.columns:
        d0 = ds[0]
        fig, ax = plt.subplots(figsize=(6.5, 4.6))
        for layer in LAYERS:
            sub = nsw[(nsw["layer"] == layer) & (nsw["d"] == d0)].sort_values("n")
            sub = sub[sub["rss_bytes"] > 0]
            if sub.empty:
                continue
            fit = loglog_slope(sub["n"], sub["rss_bytes"])
            ax.loglog(sub["n"], sub["rss_bytes"] / 2 ** 20, "o-", ms=3,
                      label=f"{LAYER_LABELS[layer]}: slope {fit.slope:.2f}")
        ax.set(xlabel="sequence length n (tokens)", ylabel="peak extra resident memory (MiB)",
               title=f"Peak memory of one call against n (d = {d0}; RSS high-water)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        savefig(fig, out, "memory_n")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
