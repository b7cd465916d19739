"""Study 2: sequential operations per layer, counted on the implementation, and time against n.

Part "count": one layer application runs through a counting wrapper of the backend, which
records every kernel call; the calls of the attention, convolutional and restricted layers
each compute all n positions from the layer's inputs alone, so their dependent steps are
the (n-independent) calls. The recurrent layer is one call too, but its kernel loops over
time: on the real kernel the layer's output equals n chained one-step calls, each needing
the previous hidden state (tfm.bench.deps.recurrent_structure), so it needs n dependent
steps. Part "time": time of one layer against n at batch 1 and at a large batch. On a
GPU, which has far more parallel units than one small layer fills, this is the paper's
"O(1) sequential operations" made visible: a layer that computes all positions at once
keeps nearly the same time as n grows until the device fills, while the recurrent layer's
time grows step by step.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from tfm.table1 import ROWS, label

from ._common import TIME, grid_name, make_study, ok, parser, pow2, run_main

NAME = "sequential"
TITLE = "Sequential operations"
# The layer each Table 1 row is counted on: self-attention with its projections (the
# dependent chain is projection -> attention -> output projection), the others as they are.
COUNTED = {row: ("self_attention_layer" if row == "self_attention" else row) for row in ROWS}
TIME_LAYERS = ("self_attention", "recurrent", "convolutional", "self_attention_restricted")
COUNT_D = 16  # width of the counted layers (the count does not depend on it)
GRIDS = {
    "default": dict(count_n=(64, 256, 1024), n=pow2(16, 2048), b=(1, 32), d=64, max_call_s=1.0, budget_s=0.2),
    "quick": dict(count_n=(64, 256), n=pow2(16, 512), b=(1, 16), d=64, max_call_s=0.3, budget_s=0.05),
    "smoke": dict(count_n=(4, 8), n=(8, 16), b=(1, 2), d=8, max_call_s=5.0, budget_s=0.01),
    # An H100/H200: n up to 16384 (one head of width 64: n / 64 blocks of the fused kernel, far
    # below the device's fill until n is large); recurrent series stop at 0.3 s per call.
    # Estimated 15-25 s with compilation.
    "gpu": dict(count_n=(64, 256), n=pow2(16, 16384), b=(1, 64), d=64, max_call_s=0.3, budget_s=0.02),
}
# Reading the time part:
LINEAR_MIN_EXP = 0.75  # a recurrent time exponent at least this is "consistent with n dependent steps"
FLAT_FACTOR = 2.0  # a layer is "nearly flat" up to the largest n whose time is within this factor of the smallest n's


def counting_backend(inner):
    """A Backend that forwards to ``inner`` and records the name of every compute call."""
    from tfm.backends.base import Backend

    calls: list[str] = []
    data_moves = {"asarray", "to_numpy", "empty", "synchronize", "free_memory_bytes"}

    def wrap(name):
        def method(self, *args, **kwargs):
            if name not in data_moves:
                calls.append(name)
            return getattr(inner, name)(*args, **kwargs)
        return method

    names = [m for m in dir(Backend) if not m.startswith("_") and callable(getattr(Backend, m))]
    cls = type(f"Counting{type(inner).__name__}", (Backend,), {**{m: wrap(m) for m in names}, "name": inner.name})
    return cls(), calls


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    g = GRIDS[grid]
    out = [{"part": "count", "layer": row, "b": 1, "n": n, "d": COUNT_D} for row in ROWS for n in g["count_n"]]
    out += [{"part": "time", "layer": layer, "b": b, "n": n, "d": g["d"]}
            for layer in TIME_LAYERS for b in g["b"] for n in g["n"]]
    return out


def measure(case: dict, ctx) -> dict:
    from tfm.backends import get_backend
    from tfm.bench import Skip, deps
    from tfm.bench.layers import make_layer

    backend = ctx.options["backend"]
    if case["part"] == "count":
        row, n, d = case["layer"], case["n"], case["d"]
        bk, calls = counting_backend(get_backend(backend))
        lay = make_layer(COUNTED[row], n=n, d=d, backend=bk)
        lay.run()
        out = {"backend": backend, "kernel_calls": len(calls), "calls": " ".join(calls),
               "paper": ROWS[row].sequential_ops}
        if row == "recurrent":
            s = deps.recurrent_structure(deps.apply_fn("recurrent", d=d, backend=backend), n, d)
            if not (s["cell_depends_on_h"] and s["chain_rel_err"] < 1e-9):
                raise Skip(f"recurrent layer is not n chained steps: {s}", "error")
            out.update(sequential_ops=n, how=f"one call; equals {n} chained one-step calls (rel. err "
                                             f"{s['chain_rel_err']:.1e}), each needing h_(t-1)")
        else:
            # The K and V branches (linear + split_heads each) run beside Q's: the critical path is
            # linear -> split_heads -> attention -> merge_heads -> linear.
            dependent = len(calls) - 4 if row == "self_attention" else len(calls)
            out.update(sequential_ops=dependent, how="kernel calls on the critical path: " + " -> ".join(
                dict.fromkeys(calls)) + " (each computes all n positions at once)")
        return out
    lay = make_layer(case["layer"], n=case["n"], d=case["d"], b=case["b"], backend=backend)
    t = ctx.time(lay.run, lay.sync)
    return {"backend": backend, "time_s": t.median_s, **t.as_row(), "flops": lay.flops, "bytes": lay.bytes}


def build(args):
    g = GRIDS[grid_name(args)]
    return make_study(sys.modules[__name__], cases(grid_name(args)), measure, args,
                      grow=lambda c: "n" if c["part"] == "time" else None,
                      exponent=lambda c: 2.0 if c["layer"] == "self_attention" else 1.0,
                      max_call_s=g["max_call_s"], budget_s=g["budget_s"])


# ----------------------------------------------------------------------------- derived tables
def growth(df) -> pd.DataFrame:
    """Per (layer, batch) of the time part: the time exponent in n (upper half of n, 95% CI)
    and how far in n the time stays nearly flat (within FLAT_FACTOR of the smallest n's)."""
    from tfm.bench import loglog_slope

    good = ok(df)
    t = good[good["part"] == "time"] if "part" in good.columns else good.iloc[0:0]
    rows = []
    for (layer, b), sub in (t.groupby(["layer", "b"]) if not t.empty else ()):
        sub = sub.sort_values("n")
        f = loglog_slope(sub["n"], sub[TIME])
        over = np.flatnonzero(sub[TIME].to_numpy() > FLAT_FACTOR * sub[TIME].iloc[0])
        flat = sub["n"].iloc[over[0] - 1] if over.size else sub["n"].iloc[-1]
        rows.append({"layer": layer, "batch": int(b), "n_from": int(sub["n"].min()), "n_to": int(sub["n"].max()),
                     "time_exponent": f.slope, "ci_low": f.ci_low, "ci_high": f.ci_high,
                     "flat_up_to_n": int(flat), "time_ratio": float(sub[TIME].iloc[-1] / sub[TIME].iloc[0])})
    return pd.DataFrame(rows, columns=["layer", "batch", "n_from", "n_to", "time_exponent", "ci_low", "ci_high",
                                       "flat_up_to_n", "time_ratio"])


DERIVED = {"sequential_growth": growth}


# ----------------------------------------------------------------------------- figures
def plot_growth(df, on: str):
    """Time relative to the smallest n, per batch: flat lines are O(1) sequential operations
    on hardware with idle parallel units; the recurrent layer follows the n line."""
    import matplotlib.pyplot as plt

    t = df[df["part"] == "time"] if "part" in df.columns else df.iloc[0:0]
    if t.empty:
        return None
    bs = sorted(t["b"].unique())
    fig, axes = plt.subplots(1, len(bs), figsize=(5.5 * len(bs), 4.5), squeeze=False)
    for ax, b in zip(axes[0], bs):
        for layer in TIME_LAYERS:
            sub = t[(t["layer"] == layer) & (t["b"] == b)].sort_values("n")
            if sub.empty:
                continue
            ax.loglog(sub["n"], sub[TIME] / sub[TIME].iloc[0], "o-", ms=3,
                      label=f"{label(layer)} ({sub[TIME].iloc[0] * 1e3:.3g} ms at n={int(sub['n'].iloc[0])})")
        ns = sorted(int(x) for x in t["n"].unique())
        ax.loglog(ns, [x / ns[0] for x in ns], "k:", lw=1, label="proportional to n")
        ax.set(xlabel="sequence length n (tokens)", ylabel=f"time / time at n={ns[0]}",
               title=f"batch {int(b)}, d = {int(t['d'].iloc[0])}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Growth of one layer's time with n, relative to the smallest n ({on})")
    return fig


FIGURES = {"sequential": plot_growth}


# ----------------------------------------------------------------------------- report
def _counts(good) -> str:
    from ._report import md_table

    c = good[good["part"] == "count"] if "part" in good.columns else good.iloc[0:0]
    if c.empty:
        return ""
    t = c[["layer", "n", "kernel_calls", "sequential_ops", "paper", "how"]].copy()
    t["kernel_calls"] = t["kernel_calls"].astype(int)
    t["sequential_ops"] = t["sequential_ops"].astype(int)
    grow = []
    for layer, sub in c.groupby("layer", sort=False):
        v = sub.sort_values("n")["sequential_ops"].to_numpy()
        grow.append(f"{layer}: {'grows with n' if v[-1] > v[0] else 'constant in n'} ({int(v[0])} -> {int(v[-1])})")
    return md_table(t) + "\nOver the measured n: " + "; ".join(grow) + ".\n\n"


def _time(rep, good, suffix: str, gpu: bool) -> str:
    from ._report import ci, md_table

    g = growth(good)
    if g.empty:
        return ""
    s = rep.figure("sequential" + suffix, "time growth against n")
    tab = g.assign(**{"95% CI": [ci(lo, hi) for lo, hi in zip(g["ci_low"], g["ci_high"])]})
    s += md_table(tab[["layer", "batch", "n_from", "n_to", "time_exponent", "95% CI", "flat_up_to_n",
                       "time_ratio"]]) + "\n"
    rec = g[g["layer"] == "recurrent"]
    if not rec.empty:
        big = rec.sort_values("batch").iloc[-1]
        s += (f"The LSTM's time exponent at batch {big['batch']} is {big['time_exponent']:.2f}: "
              + ("consistent with n dependent steps" if big["time_exponent"] >= LINEAR_MIN_EXP else
                 f"below {LINEAR_MIN_EXP}: in this range fixed per-call costs still outweigh the n steps") + ". ")
    flat = g[(g["layer"] != "recurrent") & (g["batch"] == g["batch"].min())]
    if not flat.empty:
        s += (f"At batch {int(g['batch'].min())} the other layers stay within {FLAT_FACTOR:g}x of their time at "
              f"the smallest n up to n = " + ", ".join(f"{int(r['flat_up_to_n'])} ({r['layer']})"
                                                       for _, r in flat.iterrows()) + ".")
        if gpu and not rec.empty:
            r1 = rec.sort_values("batch").iloc[0]
            s += (f" The recurrent layer stays within {FLAT_FACTOR:g}x only up to n = {int(r1['flat_up_to_n'])}"
                  f" and grows {r1['time_ratio']:.3g}x from n = {int(r1['n_from'])} to {int(r1['n_to'])}.")
    return s + "\n\n"


def section(rep) -> str:
    s = ("**Counted on the implementation:** every kernel call of one layer application is recorded by a counting "
         "wrapper of the backend; the recurrent layer's single call is checked to equal n chained one-step calls, "
         "each needing the previous hidden state. Self-attention is counted with its projections; its K and V "
         "branches run beside Q's, so its critical path is the calls less those four.\n\n")
    good = rep.rows(NAME)
    s += _counts(good) if not good.empty else "Not measured.\n\n"
    s += ("**Time against n** at batch 1 and at a large batch (fits over the upper half of n; "
          f"'flat up to n' is the largest n whose time is within {FLAT_FACTOR:g}x of the smallest n's; the LSTM is "
          f"read as n dependent steps when its exponent is at least {LINEAR_MIN_EXP}). Expected: a recurrent layer's "
          "time grows at least linearly in n however many sequences run in parallel; the other layers compute all "
          "positions at once, so on hardware with idle parallel units their time stays flat until the units fill. "
          f"On this {rep.machine.get('cpu_logical_cores', '?')}-core CPU they fill early and time follows the "
          "work; a GPU shows the flat part (below).\n\n### On the CPU\n\n")
    s += _time(rep, good, "", gpu=False) if not good.empty else "Not measured.\n\n"
    s += rep.gpu_part(sys.modules[__name__], lambda rows: _counts(rows) + _time(rep, rows, "_gpu", gpu=True))
    return s + rep.sources(sys.modules[__name__])


def readme(rep) -> list[str]:
    """The README's bullet on sequential operations, from the GPU rows when there are any."""
    rows, _ = rep.gpu.rows(NAME)
    if rows is None:
        return []
    g = growth(rows)
    att, rec = g[(g["layer"] == "self_attention") & (g["batch"] == g["batch"].min())], \
        g[(g["layer"] == "recurrent") & (g["batch"] == g["batch"].min())]
    if att.empty or rec.empty:
        return []
    a, r = att.iloc[0], rec.iloc[0]
    return [f"- **Sequential operations on the GPU** ({rep.gpu.machine.get('device_name', 'GPU')}): one "
            f"self-attention layer's time stays within {FLAT_FACTOR:g}x of its n = {int(a['n_from'])} time up to "
            f"n = {int(a['flat_up_to_n'])}, while the LSTM's grows as n^{r['time_exponent']:.2f} "
            f"({r['time_ratio']:.3g}x from n = {int(r['n_from'])} to {int(r['n_to'])})."]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
