"""The time of a training step (forward + backward) of each Table 1 layer against n and d,
and the sequential operations of the backward pass, counted on the implementation.

Part "time": each layer of the scaling study (tfm.table1's registry, batch 1, float32) runs
its training step, the forward that keeps what the backward needs and the backward from a
random output cotangent (``train_layer``), interleaved with its plain forward
(tfm.bench.layers.make_layer), A B A B; n-sweeps at several d, a d-sweep at one n. Fitted
(tfm.bench.fit, the scaling study's rule): the log-log slope of the training step's time
(fastest repeat) and of its counted FLOPs (tfm.cost.training_flops: backward = 2x the
forward, 2.5x for attention), with 95% intervals, set beside the forward-only slopes on the
same grid and those of the scaling study (tables/scaling_fits.csv). The paired ratio
training / forward time is set beside the counted ratio (3, or 3.5 for attention).

Part "count": one training step of the layer each Table 1 row is counted on (as the
sequential study: self-attention with its projections) runs through a counting wrapper of
the backend, which records the kernel calls of the forward and of the backward apart. For
the recurrent layer the backward is checked on the real kernel to equal n chained one-step
backward calls in reverse, each taking the state gradient the later step returned
(``bptt_structure``): backpropagation through time is n dependent steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from tfm.table1 import LAYERS as REGISTRY, ROWS, label

from ._common import TIME, grid_name, make_study, ok, parser, pow2, run_main
from ._report import prose

NAME = "training_scaling"
TITLE = "Training-step scaling in n and d"
LAYERS = ("self_attention_naive", "self_attention", "recurrent", "rnn", "convolutional", "convolutional_dilated",
          "self_attention_restricted", "ffn")
COUNT_D = 16  # width of the counted layers (the counts do not depend on it)
CHAIN_TOL = 1e-4  # float32: n chained one-step backward calls equal the layer's backward to this relative error

GRIDS = {  # n-sweep n range and its d values; d-sweep d values and its n; counted n
    "default": dict(n=pow2(64, 8192), n_ds=(64, 256), d=pow2(64, 1024), d_n=512, count_n=(64, 256),
                    max_call_s=1.0, budget_s=0.1),
    "quick": dict(n=[32, 128, 512], n_ds=(64,), d=(64, 128, 256), d_n=64, count_n=(16, 64), max_call_s=0.2,
                  budget_s=0.02),
    "smoke": dict(n=[8, 16], n_ds=(8,), d=(8, 16), d_n=8, count_n=(4, 8), max_call_s=5.0, budget_s=0.01),
    # An H100/H200: series stop once a call is predicted over 0.3 s (the recurrent layers'
    # backward at a few thousand steps); estimated 30-60 s with compilation.
    "gpu": dict(n=pow2(256, 8192), n_ds=(256,), d=pow2(64, 1024), d_n=512, count_n=(64, 256), max_call_s=0.3,
                budget_s=0.02),
}
FLOP_RATIO = 3.0  # counted training / forward FLOPs of a layer without attention (tfm.cost)
ATTENTION_FLOP_RATIO = 3.5  # ... of an attention core


# ----------------------------------------------------------------------------- the training step
@dataclass
class TrainCase:
    """One layer's training step on a backend: ``forward()`` -> saved, ``backward(saved)``;
    ``run()`` does both. ``flops``: tfm.cost.training_flops; ``memory``: tfm.cost.training_memory."""

    kind: str
    forward: Callable[[], object]
    backward: Callable[[object], object]
    flops: float
    memory: dict
    sync: Callable[[], None]

    def run(self):
        return self.backward(self.forward())


def train_layer(name: str, *, n: int, d: int, b: int = 1, backend="cpu", dtype="float32", causal: bool = False,
                seed: int = 0) -> TrainCase:
    """The training step of registry layer ``name`` (or ``self_attention_layer``: tfm's
    MultiHeadAttention with its projections), shaped as tfm.bench.layers.make_layer's forward."""
    from tfm import cost
    from tfm.backends import get_backend
    from tfm.bench.layers import heads_for
    from tfm.layers import conv_padding
    from tfm.table1 import layer as registry_layer

    entry = registry_layer(name)
    for what, v in (("n", n), ("d", d), ("b", b)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    p = dict(entry.params)
    bk = get_backend(backend)
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return bk.asarray((rng.standard_normal(shape) * scale).astype(dt), dt)

    kind, item = entry.kernel, dt.itemsize
    if kind in ("attention", "restricted"):
        h = heads_for(d)
        dh = d // h
        q, k, v, dout = arr(b, h, n, dh), arr(b, h, n, dh), arr(b, h, n, dh), arr(b, h, n, dh)
        if kind == "restricted":
            w = p["window"]

            def forward():
                return bk.restricted_attention_train(q, k, v, w, causal)

            def backward(saved):
                return bk.restricted_attention_backward(q, k, v, *saved, dout, w, causal)

            dims = dict(b=b, h=h, n=n, d=dh, window=w, causal=causal)
            return TrainCase(name, forward, backward, cost.training_flops("restricted_attention", **dims),
                             cost.training_memory("restricted_attention", item, **dims), bk.synchronize)
        impl = p["impl"]
        if impl == "naive":
            from tfm.functional import check_naive_attention_memory

            check_naive_attention_memory(bk, b, h, n, n, item)

        def forward():
            return bk.attention_train(q, k, v, None, causal, impl)

        def backward(saved):
            return bk.attention_backward(q, k, v, *saved, dout, None, causal, impl)

        dims = dict(b=b, h=h, nq=n, nk=n, dk=dh, causal=causal)
        return TrainCase(name, forward, backward, cost.training_flops("attention", **dims),
                         cost.training_memory("attention", item, impl=impl, **dims), bk.synchronize)
    if kind == "mha":
        import tfm

        h = heads_for(d)
        mha = tfm.MultiHeadAttention(d, h, seed=seed, backend=bk, dtype=dt.name)
        x, dout = arr(b, n, d), arr(b, n, d)
        dims = dict(b=b, nq=n, nk=n, d_model=d, h=h, causal=causal)
        return TrainCase(name, lambda: mha.forward_train(x, None, causal)[1], lambda s: mha.backward(s, dout),
                         cost.training_flops("mha", **dims), cost.training_memory("mha", item, **dims),
                         bk.synchronize)
    if kind in ("rnn", "lstm", "gru"):
        gates = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
        s = 1.0 / np.sqrt(d)
        x, h0, dout = arr(b, n, d), arr(b, d, scale=0.1), arr(b, n, d)
        w_ih, w_hh = arr(gates * d, d, scale=s), arr(gates * d, d, scale=s)
        b_ih, b_hh = arr(gates * d, scale=0.1), arr(gates * d, scale=0.1)
        if kind == "lstm":
            c0 = arr(b, d, scale=0.1)
            forward = lambda: bk.lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh)[3]  # noqa: E731
            backward = lambda saved: bk.lstm_layer_backward(saved, dout, None, None)  # noqa: E731
        elif kind == "gru":
            forward = lambda: bk.gru_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh)[2]  # noqa: E731
            backward = lambda saved: bk.gru_layer_backward(saved, dout, None)  # noqa: E731
        else:
            forward = lambda: bk.rnn_layer_train(x, h0, w_ih, w_hh, b_ih, b_hh, "tanh")[2]  # noqa: E731
            backward = lambda saved: bk.rnn_layer_backward(saved, dout, None)  # noqa: E731
        dims = dict(b=b, n=n, d_in=d, d_hidden=d)
        return TrainCase(name, forward, backward, cost.training_flops(kind, **dims),
                         cost.training_memory(kind, item, **dims), bk.synchronize)
    if kind == "conv":
        kw, dil = p.get("k", 1), p.get("dilation", 1)
        x, dout = arr(b, n, d), arr(b, n, d)
        w, bias = arr(d, d, kw, scale=1.0 / np.sqrt(d * kw)), arr(d, scale=0.1)
        left, right = conv_padding("causal" if causal else "same", kw, dil)
        dims = dict(b=b, n_out=n, c_in=d, c_out=d, k=kw)
        return TrainCase(name, lambda: bk.conv1d(x, w, bias, dil, left, right),
                         lambda _: bk.conv1d_backward(x, w, dout, dil, left, right, True),
                         cost.training_flops("conv1d", **dims), cost.training_memory("conv1d", item, **dims),
                         bk.synchronize)
    # ffn: linear -> relu -> linear, each with its backward
    x, dout = arr(b, n, d), arr(b, n, d)
    w1, b1 = arr(4 * d, d, scale=1.0 / np.sqrt(d)), arr(4 * d, scale=0.1)
    w2, b2 = arr(d, 4 * d, scale=0.5 / np.sqrt(d)), arr(d, scale=0.1)

    def forward():
        hidden = bk.linear(x, w1, b1)  # (B, n, 4d)
        act = bk.activation(hidden, "relu")
        bk.linear(act, w2, b2)  # (B, n, d)
        return hidden, act

    def backward(saved):
        hidden, act = saved
        dact, dw2, db2 = bk.linear_backward(act, w2, dout)
        dx, dw1, db1 = bk.linear_backward(x, w1, bk.activation_backward(hidden, dact, "relu"))
        return dx, dw1, db1, dw2, db2

    dims = dict(tokens=b * n, d_model=d, d_ff=4 * d)
    return TrainCase(name, forward, backward, cost.training_flops("ffn", **dims),
                     cost.training_memory("ffn", item, **dims), bk.synchronize)


def bptt_structure(backend, n: int, d: int, seed: int = 0) -> dict:
    """Backpropagation through time on the real LSTM kernels, in float32 (the kernels the
    studies time; float64 would compile a second set for this check alone).

    The backward of a layer over n steps is compared with n one-step backward calls made in
    reverse (t = n-1 .. 0), each on that step's saved forward and taking the state gradients
    (dh, dc) the later step returned; and the last of them is rerun with a perturbed dh to
    show that it needs it. Returns the chain length, the largest relative difference over dx,
    dh0, dc0 and the weight gradients, and whether the step depends on the carried gradient.
    """
    from tfm.backends import get_backend

    bk = get_backend(backend)
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def a(*shape, scale=1.0):
        return bk.asarray((rng.standard_normal(shape) * scale).astype(f32), f32)

    x, dout = a(1, n, d), a(1, n, d)
    h0, c0 = a(1, d, scale=0.5), a(1, d, scale=0.5)
    weights = (a(4 * d, d, scale=d ** -0.5), a(4 * d, d, scale=d ** -0.5), a(4 * d, scale=0.1), a(4 * d, scale=0.1))
    *_, saved = bk.lstm_layer_train(x, h0, c0, *weights)
    full = [np.asarray(bk.to_numpy(g)) for g in bk.lstm_layer_backward(saved, dout, None, None)]
    hs, cs = [h0], [c0]
    for t in range(n):  # the forward's state before every step
        _, h, c = bk.lstm_layer(bk.asarray(bk.to_numpy(x)[:, t:t + 1], f32), hs[-1], cs[-1], *weights)
        hs.append(h)
        cs.append(c)
    xs, douts = bk.to_numpy(x), bk.to_numpy(dout)
    dh, dc = bk.asarray(np.zeros((1, d), f32), f32), bk.asarray(np.zeros((1, d), f32), f32)
    dx = np.zeros((1, n, d))  # float64 accumulators: the sums over steps add no rounding of their own
    dw = [np.zeros(np.shape(bk.to_numpy(w))) for w in weights]
    for t in reversed(range(n)):  # n dependent calls: step t needs the state gradient of step t + 1
        *_, s = bk.lstm_layer_train(bk.asarray(xs[:, t:t + 1], f32), hs[t], cs[t], *weights)
        step_in = (dh, dc)
        g = bk.lstm_layer_backward(s, bk.asarray(douts[:, t:t + 1], f32), dh, dc)
        dx[:, t:t + 1] = bk.to_numpy(g[0])
        dh, dc = g[1], g[2]
        for acc, gw in zip(dw, g[3:]):
            acc += bk.to_numpy(gw)
    chained = [dx, bk.to_numpy(dh), bk.to_numpy(dc), *dw]
    err = max(float(np.linalg.norm(c - f) / max(np.linalg.norm(f), 1e-30)) for c, f in zip(chained, full))
    # the first step (t = 0) again, with the carried dh perturbed: its dx must change
    perturbed = bk.lstm_layer_backward(s, bk.asarray(douts[:, :1], f32),
                                       bk.asarray(bk.to_numpy(step_in[0]) + 1.0, f32), step_in[1])
    needs_carry = bool(np.abs(bk.to_numpy(perturbed[0]) - dx[:, :1]).max() > 1e-3)
    return {"chain_steps": n, "chain_rel_err": err, "step_needs_later_gradient": needs_carry}


# ----------------------------------------------------------------------------- the study
def arg_parser():
    p = parser(NAME, __doc__, GRIDS)
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {','.join(LAYERS)}")
    return p


def cases(grid: str, layers=LAYERS) -> list[dict]:
    from .scaling import sweep_cases

    g = GRIDS[grid]
    return sweep_cases(g, layers, part="time") + [{"part": "count", "layer": row, "sweep": "", "n": n, "d": COUNT_D}
                                                    for row in ROWS for n in g["count_n"]]


def _count(case: dict, backend: str) -> dict:
    from tfm.backends import get_backend
    from tfm.bench import Skip

    from .sequential import COUNTED, counting_backend

    row, n, d = case["layer"], case["n"], case["d"]
    bk, calls = counting_backend(get_backend(backend))
    step = train_layer(COUNTED[row], n=n, d=d, backend=bk)
    saved = step.forward()
    forward_calls = list(calls)
    calls.clear()
    step.backward(saved)
    out = {"backend": backend, "counted_on": COUNTED[row], "forward_calls": len(forward_calls),
           "backward_calls": len(calls), "backward_kernels": " ".join(calls), "paper": ROWS[row].sequential_ops}
    if row == "recurrent":
        s = bptt_structure(backend, n, d)
        if not (s["step_needs_later_gradient"] and s["chain_rel_err"] < CHAIN_TOL):
            raise Skip(f"the LSTM backward is not n chained steps: {s}", "error")
        out.update(sequential_ops=s["chain_steps"], chain_rel_err=s["chain_rel_err"],
                   how=(f"{len(calls)} call; equals {n} one-step backward calls in reverse (rel. err "
                        f"{s['chain_rel_err']:.1e}), each needing the state gradient of the step after it"))
    else:
        out.update(sequential_ops=len(calls), how="backward kernel calls (each over all n positions at once): "
                   + " -> ".join(calls))
    return out


def measure(case: dict, ctx) -> dict:
    from tfm.bench.layers import make_layer
    from tfm.bench.timing import paired_ratio

    backend = ctx.options["backend"]
    if case["part"] == "count":
        return _count(case, backend)
    step = train_layer(case["layer"], n=case["n"], d=case["d"], backend=backend)
    fwd = make_layer(case["layer"], n=case["n"], d=case["d"], backend=backend)
    t_train, t_fwd = ctx.time_pair(step.run, fwd.run, sync_a=step.sync, sync_b=fwd.sync)
    med, lo, hi = paired_ratio(t_train, t_fwd)
    return {"backend": backend, "time_s": t_train.median_s, **t_train.as_row(), **t_fwd.as_row("forward_"),
            "flops": step.flops, "forward_flops": fwd.flops, "flop_ratio": step.flops / fwd.flops,
            "time_ratio": med, "time_ratio_ci_low": lo, "time_ratio_ci_high": hi}


def build(args):
    grid = grid_name(args)
    layers = tuple(x for x in args.layers.split(",") if x)
    bad = set(layers) - set(LAYERS)
    if bad:
        raise SystemExit(f"unknown layers {sorted(bad)}; choose from {', '.join(LAYERS)}")
    g = GRIDS[grid]
    return make_study(sys.modules[__name__], cases(grid, layers), measure, args,
                      grow=lambda c: c["sweep"] or None,
                      exponent=lambda c: float(REGISTRY[c["layer"]].exponents[0 if c["sweep"] == "n" else 1])
                      if c["part"] == "time" else 1.0,
                      max_call_s=g["max_call_s"], budget_s=g["budget_s"])


# ----------------------------------------------------------------------------- derived tables
def fits(df) -> pd.DataFrame:
    """One row per (layer, sweep, fixed size): the fitted exponents of the training step's time,
    of the forward's time on the same grid and of the counted training FLOPs, with 95% intervals."""
    from tfm.bench import loglog_slope

    cols = ["layer", "sweep", "fixed", "exponent", "ci_low", "ci_high", "points", "range_from", "range_to",
            "forward_exponent", "forward_ci_low", "forward_ci_high", "flop_exponent", "paper_exponent"]
    good = ok(df)
    t = good[good["part"] == "time"] if "part" in good.columns else good.iloc[0:0]
    rows = []
    for (layer, sweep), grp in (t.groupby(["layer", "sweep"]) if not t.empty else ()):
        fixed_col = "d" if sweep == "n" else "n"
        for fixed, sub in grp.groupby(fixed_col):
            f, ff, fl = (loglog_slope(sub[sweep], sub[c]) for c in (TIME, "forward_" + TIME, "flops"))
            rows.append({"layer": layer, "sweep": sweep, "fixed": f"{fixed_col}={int(fixed)}", "exponent": f.slope,
                         "ci_low": f.ci_low, "ci_high": f.ci_high, "points": f.points, "range_from": f.x_from,
                         "range_to": f.x_to, "forward_exponent": ff.slope, "forward_ci_low": ff.ci_low,
                         "forward_ci_high": ff.ci_high, "flop_exponent": fl.slope,
                         "paper_exponent": REGISTRY[layer].exponents[0 if sweep == "n" else 1]})
    return pd.DataFrame(rows, columns=cols)


def counts(df) -> pd.DataFrame:
    """The count part: per Table 1 row and n, the kernel calls of the forward and the backward
    and the backward's dependent steps."""
    cols = ["layer", "counted_on", "n", "forward_calls", "backward_calls", "sequential_ops", "paper", "how"]
    good = ok(df)
    c = good[good["part"] == "count"] if "part" in good.columns else good.iloc[0:0]
    if c.empty:
        return pd.DataFrame(columns=cols)
    c = c[cols].copy()
    for col in ("n", "forward_calls", "backward_calls", "sequential_ops"):
        c[col] = c[col].astype(int)
    return c.reset_index(drop=True)


DERIVED = {"training_scaling_fits": fits, "training_scaling_counts": counts}


def _quoted(f: pd.DataFrame, layer: str, sweep: str):
    """The fit quoted for a layer and sweep: over the most points, ties to the largest fixed size."""
    f = f[(f["layer"] == layer) & (f["sweep"] == sweep) & np.isfinite(f["exponent"])].copy()
    if f.empty:
        return None
    f["size"] = f["fixed"].str.split("=").str[1].astype(float)
    return f.sort_values(["points", "size"]).iloc[-1]


def verdicts(df, scaling_df=None) -> pd.DataFrame:
    """Per (layer, sweep): the quoted training exponent beside the forward's (same grid, and the
    scaling study's quoted fit from ``scaling_df``) and the paper's, with the scaling study's
    agreement rule (studies.scaling.agrees)."""
    from . import scaling
    from ._report import ci

    fit_rows = fits(df)
    sc = scaling.fits(scaling_df) if scaling_df is not None else None
    rows = []
    for layer in LAYERS:
        for sweep in ("n", "d"):
            f = _quoted(fit_rows, layer, sweep)
            if f is None:
                continue
            paper = REGISTRY[layer].exponents[0 if sweep == "n" else 1]
            s = scaling.pick_fit(sc, layer, sweep) if sc is not None else None
            rows.append({"layer": layer, "in": sweep, "at": f["fixed"],
                         "range": f"{f['range_from']:.0f}..{f['range_to']:.0f}", "training exponent": f["exponent"],
                         "95% CI": ci(f["ci_low"], f["ci_high"]), "forward, same grid": f["forward_exponent"],
                         "forward, scaling study": (f"{s['exponent']:.2f} {ci(s['ci_low'], s['ci_high'])} at "
                                                    f"{s['fixed']}" if s is not None else "not measured"),
                         "FLOP exponent": f["flop_exponent"], "paper": paper,
                         "agrees": "yes" if scaling.agrees(f["exponent"], f["ci_low"], f["ci_high"], paper) else "no",
                         "points": int(f["points"]), "_lo": f["ci_low"], "_hi": f["ci_high"]})
    return pd.DataFrame(rows)


def ratios(df) -> pd.DataFrame:
    """Per layer, the paired training / forward time ratio at the largest n of the n-sweep at the
    largest d measured there, beside the counted FLOP ratio."""
    from ._report import ci

    good = ok(df)
    t = good[(good["part"] == "time") & (good["sweep"] == "n")] if "part" in good.columns else good.iloc[0:0]
    rows = []
    for layer in LAYERS:
        sub = t[t["layer"] == layer]
        if sub.empty:
            continue
        sub = sub[sub["d"] == sub["d"].max()].sort_values("n")
        r = sub.iloc[-1]
        rows.append({"layer": layer, "n": int(r["n"]), "d": int(r["d"]), "training ms": r["time_s"] * 1e3,
                     "forward ms": r["forward_median_s"] * 1e3,
                     "time ratio (paired, 95% CI)": f"{r['time_ratio']:.2f} {ci(r['time_ratio_ci_low'], r['time_ratio_ci_high'])}",
                     "counted FLOP ratio": r["flop_ratio"],
                     "forward GFLOP/s": r["forward_flops"] / r["forward_median_s"] / 1e9,
                     "backward GFLOP/s": ((r["flops"] - r["forward_flops"]) / (r["time_s"] - r["forward_median_s"]) / 1e9
                                          if r["time_s"] > r["forward_median_s"] else np.nan),
                     "_ratio": r["time_ratio"]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures
def _log_ticks(ax, values, axis: str = "x") -> None:
    """Label a log axis at the measured sizes only (no crowded minor labels)."""
    from matplotlib.ticker import NullFormatter

    values = sorted({int(v) for v in values})
    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_minor_formatter(NullFormatter())
    (ax.set_xticks if axis == "x" else ax.set_yticks)(values, [str(v) for v in values])


def _lines(ax, rows, x: str, y: str, scale: float) -> None:
    from tfm.bench import loglog_slope

    for layer in LAYERS:
        sub = rows[(rows["layer"] == layer) & (rows[y] > 0)].sort_values(x)
        if sub.empty:
            continue
        fit = loglog_slope(sub[x], sub[y])
        lab = f"{label(layer)}: slope {fit.slope:.2f}" if np.isfinite(fit.slope) else label(layer)
        ax.loglog(sub[x], sub[y] * scale, "o-", ms=3, label=lab)
    _log_ticks(ax, rows[x])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _time_rows(df):
    return df[df["part"] == "time"] if "part" in df.columns else df.iloc[0:0]


def plot_n(df, on: str):
    import matplotlib.pyplot as plt

    nsw = _time_rows(df)
    nsw = nsw[nsw["sweep"] == "n"]
    if nsw.empty:
        return None
    ds = sorted(nsw["d"].unique())
    fig, axes = plt.subplots(1, len(ds), figsize=(5.2 * len(ds), 4.6), squeeze=False)
    for ax, d in zip(axes[0], ds):
        _lines(ax, nsw[nsw["d"] == d], "n", TIME, 1e3)
        ax.set(xlabel="sequence length n (tokens)", ylabel="forward + backward time, fastest repeat (ms)",
               title=f"d = {int(d)}")
    fig.suptitle(f"Training step of one layer against n (batch 1, float32; {on})\nlegend: fitted log-log slope "
                 "over the upper half of n")
    return fig


def plot_d(df, on: str):
    import matplotlib.pyplot as plt

    dsw = _time_rows(df)
    dsw = dsw[dsw["sweep"] == "d"]
    if dsw.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    _lines(ax, dsw, "d", TIME, 1e3)
    ax.set(xlabel="model width d", ylabel="forward + backward time, fastest repeat (ms)",
           title=f"Training step of one layer against d at n = {int(dsw['n'].iloc[0])}\n({on})")
    return fig


def plot_ratio(df, on: str):
    """Training / forward time (paired rounds) against n, beside the counted FLOP ratios."""
    import matplotlib.pyplot as plt

    nsw = _time_rows(df)
    nsw = nsw[nsw["sweep"] == "n"]
    if nsw.empty or "time_ratio" not in nsw.columns:
        return None
    d = nsw["d"].max()
    nsw = nsw[nsw["d"] == d]
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for layer in LAYERS:
        sub = nsw[nsw["layer"] == layer].sort_values("n")
        if sub.empty:
            continue
        err = np.vstack([sub["time_ratio"] - sub["time_ratio_ci_low"], sub["time_ratio_ci_high"] - sub["time_ratio"]])
        ax.errorbar(sub["n"], sub["time_ratio"], yerr=np.where(np.isfinite(err), err.clip(min=0), 0), fmt="o-", ms=3,
                    capsize=2, label=label(layer))
    for r, what in ((FLOP_RATIO, "counted FLOPs, no attention"), (ATTENTION_FLOP_RATIO, "counted FLOPs, attention")):
        ax.axhline(r, color="k", ls=":" if r == FLOP_RATIO else "--", lw=1, label=f"{what}: {r:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax, nsw["n"])
    ax.set_yticks([1, 2, 3, 5, 10, 20], ["1", "2", "3", "5", "10", "20"])
    ax.set(xlabel="sequence length n (tokens)", ylabel="training step time / forward time (median of paired rounds)",
           title=f"What the backward costs, at d = {int(d)}\n({on})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


FIGURES = {"training_scaling_n": plot_n, "training_scaling_d": plot_d, "training_scaling_ratio": plot_ratio}


# ----------------------------------------------------------------------------- report
def _intro() -> str:
    from .scaling import MAX_CI_WIDTH, TOL_EXP

    return prose(f"""
        Each layer runs alone at batch 1 in float32: its training step (the forward that keeps what the
        backward needs, then the backward from a random output cotangent: input and parameter gradients)
        interleaved with its plain forward (A B A B, same inputs); n-sweeps at several widths d, a d-sweep
        at one n. Fitted as in the scaling study: the log-log slope of the fastest repeat over the upper
        half of the measured sizes (at least 3 points), 95% intervals from the t distribution; the quoted
        fit is over the most points, ties to the largest fixed size. **Agreement** (the scaling study's
        rule): within {TOL_EXP} of the paper's exponent, or a 95% interval no wider than
        {MAX_CI_WIDTH:g} containing it; the paper's per-layer complexity holds for the training step too,
        since the backward is a constant multiple of the forward. **Backward cost:** the median over
        rounds of training time / forward time, with a bootstrap 95% interval, beside the counted FLOP
        ratio (tfm.cost.training_flops: backward 2x the forward, 2.5x for attention, so {FLOP_RATIO:g}
        and {ATTENTION_FLOP_RATIO:g}); it agrees when the median lies within {RATIO_TOL:.0%} of it, or
        the interval, if no wider than {RATIO_CI_WIDTH:.0%} of it, contains it. **Sequential operations of the backward:** counted as in the
        sequential study (a counting wrapper of the backend), forward and backward calls apart; the
        recurrent layer's one backward call is checked to equal n chained one-step backward calls in
        reverse (float32, relative difference below {CHAIN_TOL:g}), each needing the state gradient of
        the step after it.
    """)


RATIO_TOL = 0.25  # a time ratio within this fraction of the counted FLOP ratio agrees,
RATIO_CI_WIDTH = 0.5  # or its 95% interval, if no wider than this fraction of it, contains it


def _ratio_agrees(r) -> bool:
    lo, hi, med, want = r["time_ratio_ci_low"], r["time_ratio_ci_high"], r["time_ratio"], r["flop_ratio"]
    tight = np.isfinite(lo) and np.isfinite(hi) and hi - lo <= RATIO_CI_WIDTH * want
    return bool((tight and lo <= want <= hi) or abs(med - want) <= RATIO_TOL * want)


def _counts_text(rows) -> str:
    from ._report import md_table

    c = counts(rows)
    if c.empty:
        return "No counts.\n\n"
    s = md_table(c) + "\n"
    grow = []
    for layer, sub in c.groupby("layer", sort=False):
        v = sub.sort_values("n")
        a, b = v.iloc[0], v.iloc[-1]
        grow.append(f"{layer}: {'grows with n' if b['sequential_ops'] > a['sequential_ops'] else 'constant in n'} "
                    f"({int(a['sequential_ops'])} at n={int(a['n'])} -> {int(b['sequential_ops'])} at n={int(b['n'])})")
    return s + "Dependent steps of the backward over the counted n: " + "; ".join(grow) + ".\n\n"


def _why(r) -> str:
    """A disagreement read against the forward on the same grid and the counted FLOPs."""
    from .scaling import TOL_EXP

    head = (f"- **{r['layer']} in {r['in']}** ({r['training exponent']:.2f}, 95% CI {r['95% CI']}, from {r['points']} "
            f"sizes; paper {r['paper']}; counted FLOPs {r['FLOP exponent']:.2f}; forward on the same grid "
            f"{r['forward, same grid']:.2f}): ")
    if abs(r["training exponent"] - r["forward, same grid"]) <= TOL_EXP:
        return head + (f"the forward alone grows alike (within {TOL_EXP}), so the backward is not the cause: over this "
                       "range the time is not yet proportional to the counted work (fixed costs, or a rate in "
                       "GFLOP/s that changes with size).")
    if np.isfinite(r["_lo"]) and r["_lo"] <= r["forward, same grid"] <= r["_hi"]:
        return head + ("the forward's exponent lies inside the training step's 95% interval: at these few, noisy sizes "
                       "the data do not separate the two, nor reach the paper's exponent.")
    return head + (f"the training step grows {'faster' if r['training exponent'] > r['forward, same grid'] else 'slower'} "
                   f"than the forward on the same grid (more than {TOL_EXP} apart): the backward's rate in GFLOP/s "
                   "changes with size differently from the forward's.")


def results_text(rep, rows, suffix: str, scaling_df) -> str:
    from ._report import md_table

    s = rep.figure("training_scaling_n" + suffix, "training step time against n")
    s += rep.figure("training_scaling_d" + suffix, "training step time against d")
    v = verdicts(rows, scaling_df)
    if v.empty:
        s += "No fitted exponents.\n\n"
    else:
        s += md_table(v.drop(columns=["_lo", "_hi"])) + "\n"
        s += f"{int((v['agrees'] == 'yes').sum())} of {len(v)} fitted training-step exponents agree with the paper"
        bad = v[v["agrees"] == "no"]
        s += (". Not:\n\n" + "\n".join(_why(r) for _, r in bad.iterrows()) + "\n\n" if not bad.empty else ".\n\n")
    s += "#### What the backward costs\n\n" + rep.figure("training_scaling_ratio" + suffix, "training / forward time")
    r = ratios(rows)
    if not r.empty:
        good = ok(rows)
        t = good[(good["part"] == "time") & (good["sweep"] == "n")]
        t = t[t["d"] == t["d"].max()]
        top = pd.DataFrame([t[t["layer"] == lay].sort_values("n").iloc[-1] for lay in r["layer"]])
        agree = [_ratio_agrees(x) for _, x in top.iterrows()]
        r["agrees"] = ["yes" if a else "no" for a in agree]
        s += md_table(r.drop(columns=["_ratio"])) + "\n"
        s += (f"At the largest n, {sum(agree)} of {len(agree)} layers' training steps cost the counted FLOP ratio "
              f"times their forward (the rule above); measured ratios {r['_ratio'].min():.2f}–{r['_ratio'].max():.2f}.")
        far = r[[not a for a in agree]]
        if not far.empty:
            s += (" Not: " + "; ".join(
                f"{x['layer']} {x['_ratio']:.2f} against {x['counted FLOP ratio']:.2g} (backward, as training minus "
                f"forward time, at {x['backward GFLOP/s']:.3g} GFLOP/s against the forward's "
                f"{x['forward GFLOP/s']:.3g})" for _, x in far.iterrows())
                  + ": a ratio below the count means the backward runs its FLOPs faster than the forward, above it "
                    "slower.")
        s += "\n\n"
    s += "#### Sequential operations of the backward\n\n" + _counts_text(rows)
    return s


def section(rep) -> str:
    s = _intro() + "### On the CPU\n\n"
    good = rep.rows(NAME)
    s += results_text(rep, good, "", rep.table("scaling")) if not good.empty else "Not measured.\n\n"
    s += rep.gpu_part(sys.modules[__name__], lambda rows: results_text(rep, rows, "_gpu", None))
    return s + rep.sources(sys.modules[__name__])


def readme(rep) -> list[str]:
    """The README's bullet on the training step's scaling, from the host rows."""
    good = rep.rows(NAME)
    if good.empty:
        return []
    v = verdicts(good)
    att = v[(v["layer"] == "self_attention") & (v["in"] == "n")]
    if att.empty:
        return []
    a = att.iloc[0]
    line = (f"- **Training step:** forward + backward of self-attention grows as n^{a['training exponent']:.2f} "
            f"(95% CI {a['95% CI']}) at {a['at']}; {int((v['agrees'] == 'yes').sum())} of {len(v)} fitted "
            f"training-step exponents agree with the paper.")
    r = ratios(good)
    if not r.empty:
        line += (f" A training step costs {r['_ratio'].min():.2f}–{r['_ratio'].max():.2f}x its forward at the "
                 f"largest n (counted FLOPs: {FLOP_RATIO:g}x, {ATTENTION_FLOP_RATIO:g}x with attention).")
    c = counts(good)
    rec, att_c = c[c["layer"] == "recurrent"], c[c["layer"] == "self_attention"]
    if not rec.empty and not att_c.empty:
        r1, a1 = rec.sort_values("n").iloc[-1], att_c.sort_values("n")
        line += (f" Backpropagation through time is {int(r1['sequential_ops'])} dependent steps at n = {int(r1['n'])}; "
                 f"self-attention's backward is {int(a1['backward_calls'].iloc[0])} kernel calls at every n counted "
                 f"({int(a1['n'].min())}..{int(a1['n'].max())}).")
    return [line]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
