"""Gradient signal over distance: ||d y_j / d x_i|| through stacks of each Table 1 layer type.

Section 4 speaks of "the length of the paths forward and backward signals have to traverse".
For a causal stack of L layers of one mixer (studies._stack: each layer the mixer and an FFN,
each in the paper's post-norm residual) this study measures how strongly the output at the
last position j depends on the input at each earlier position i: the Frobenius norm of the
Jacobian block d y_j / d x_i (d x d), as a function of the distance j - i. One backward pass
with d one-hot cotangents at position j gives every block (``studies._stack.jacobian_profile``),
in float64 (the cpu backend's kernels; the numpy reference for the smoke grid), averaged in
square over a few input sequences (the embedded tokens of the delayed-recall task). Cases:

    init      each mixer at depth L (1, 2, 4), several seeds, at initialisation
    trained   the same taggers (L = 2) after the learning study's delayed-recall training at
              delta = 24 (its runs, shared through the checkpoints; studies.learning_distance)

Per profile the table keeps every norm (``norms``, JSON) and its summary: ``reach`` (the
largest distance with a non-zero block), the closed-form reach of L layers (the largest
distance whose path length in tfm.table1 is at most L), the slope of log10 ||J|| against the
distance over 1..reach (decades per position), the far/near ratio and the peak distance.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import numpy as np
import pandas as pd

from tfm.table1 import K, R, ROWS, max_path_length

from ._common import grid_name, make_study, ok, parser, run_main
from ._report import md_table, prose

NAME = "gradient_signal"
TITLE = "Gradient signal over distance"
ALL = ("self_attention", "self_attention_restricted", "recurrent", "gru", "rnn", "convolutional",
       "convolutional_dilated")
GRIDS = {
    "default": dict(layers=ALL, depths=(1, 2, 4), seeds=(0, 1, 2), n=64, sequences=4, jacobian_backend="cpu"),
    "quick": dict(layers=ALL, depths=(1, 2), seeds=(0, 1), n=64, sequences=4, jacobian_backend="cpu"),
    # the reference backend: no float64 kernels to compile for a smoke test
    "smoke": dict(layers=("self_attention", "recurrent", "convolutional"), depths=(1, 2), seeds=(0,), n=64,
                  sequences=1, jacobian_backend="numpy"),
    "full": dict(layers=ALL, depths=(1, 2, 4, 6), seeds=(0, 1, 2, 3, 4), n=64, sequences=8, jacobian_backend="cpu"),
}
TRAINED_DELTA = {"default": 24, "quick": 24, "full": 24, "smoke": 5}  # delayed recall's delta of the trained runs
ROW = {"self_attention": "self_attention", "self_attention_restricted": "self_attention_restricted",
       "recurrent": "recurrent", "gru": "recurrent", "rnn": "recurrent", "convolutional": "convolutional",
       "convolutional_dilated": "convolutional_dilated"}
FLAT = 1.0  # self-attention counts as flat when the far/near ratio is within one decade
TINY = 1e-300  # norms below this count as zero in the log-space fits


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    from . import learning_distance as ld

    g = GRIDS[grid]
    out = [{"state": "init", "layer": kind, "n_layers": L, "seed": s, "n": g["n"]}
           for kind in g["layers"] for L in g["depths"] for s in g["seeds"]]
    lg = ld.GRIDS[grid]["delayed_recall"]
    out += [{"state": "trained", "layer": kind, "n_layers": 2, "seed": s, "n": g["n"],
             "task_delta": TRAINED_DELTA[grid], "ref_steps": lg["ref_steps"]}
            for kind in lg["models"] if kind in g["layers"] for s in lg["seeds"]]
    return out


def theory_reach(layer: str, n_layers: int, n: int) -> int:
    """The largest distance (< n) whose closed-form path length (tfm.table1, causal) is at most
    ``n_layers``: how far L layers reach. Recurrent layers and self-attention reach n - 1."""
    row = ROWS[ROW[layer]]
    if row.name in ("recurrent", "self_attention"):
        return n - 1
    p = {"k": K, "r": R}[row.path_param]
    reach = 0
    for delta in range(1, n):
        if max_path_length(row.name, delta + 1, p, causal=True)[0] <= n_layers:
            reach = delta
    return reach


def _model(case: dict, grid: str, out, backend: str, sequences: int):
    """(float64 tagger, the token ids the Jacobian is taken at)."""
    from . import learning_distance as ld
    from ._learning import Run, build_model, trained
    from ._stack import as_float64
    from tfm.tasks import DelayedRecall

    delta = TRAINED_DELTA[grid]
    if case["state"] == "trained":
        run, task = ld.run_for("delayed_recall", case["layer"], case["task_delta"], case["seed"], grid,
                               case["ref_steps"])
        model, _, _ = trained(run, out)
    else:
        task = DelayedRecall(delta, length=case["n"])
        run = Run.of("delayed_recall", case["layer"], case["seed"], 0.0)
        run = Run(run.task, run.task_params, run.model, run.seed, 0.0,
                  recipe={**run.recipe, "n_layers": case["n_layers"]})
        model = build_model(run, task)
    if task.length != case["n"]:
        raise ValueError(f"the trained runs use sequences of {task.length}, the case asks for n = {case['n']}")
    ids = task.sample(np.random.default_rng((case["seed"], 2)), sequences).tokens
    return as_float64(model, backend), ids


def summarise(norms: np.ndarray, layer: str, n_layers: int) -> dict:
    """reach, theory_reach, slope (log10 per position over 1..reach), far_near, peak_delta."""
    n = norms.size
    nonzero = np.flatnonzero(norms[1:] > 0) + 1
    reach = int(nonzero.max()) if nonzero.size else 0
    d = np.arange(1, reach + 1)
    v = norms[1:reach + 1]
    keep = v > TINY
    slope = float(np.polyfit(d[keep], np.log10(v[keep]), 1)[0]) if keep.sum() >= 2 else float("nan")
    far_near = float(norms[reach] / norms[1]) if reach >= 1 and norms[1] > 0 else float("nan")
    return {"norm_0": float(norms[0]), "norm_1": float(norms[1]), "norm_far": float(norms[reach]) if reach else 0.0,
            "reach": reach, "theory_reach": theory_reach(layer, n_layers, n), "slope": slope,
            "far_near": far_near, "peak_delta": int(np.argmax(norms[1:]) + 1) if n > 1 else 0}


def measure(case: dict, ctx, out="results") -> dict:
    """One row; ``out``: the results folder, whose checkpoints/ the training runs share."""
    from tfm.bench import Skip

    from ._stack import jacobian_profile

    if ctx.options["backend"] != "cpu":
        raise Skip("the gradient-signal study runs on the cpu backend only (float64 Jacobians)", "unavailable")
    g = GRIDS[ctx.options["grid"]]
    model, ids = _model(case, ctx.options["grid"], out, g["jacobian_backend"], g["sequences"])
    x = model._host(model.embed.forward(ids))  # (B, n, d): the stack's input
    norms = jacobian_profile(model.stack, x)  # (n,), distance j - i = n - 1 - i
    norms = norms[::-1].copy()  # index = distance
    if not np.all(np.isfinite(norms)):
        raise Skip("non-finite Jacobian norms", "error")
    return {**summarise(norms, case["layer"], case["n_layers"]), "jacobian_backend": g["jacobian_backend"],
            "dtype": "float64", "n_sequences": g["sequences"], "norms": json.dumps([float(f"{v:.5g}") for v in norms])}


def build(args):
    return make_study(sys.modules[__name__], cases(grid_name(args)), partial(measure, out=args.out), args,
                      max_call_s=float("inf"))


# ----------------------------------------------------------------------------- derived tables
def profile(df) -> pd.DataFrame:
    """One row per (state, layer, n_layers, delta): the geometric mean over seeds of ||J||
    relative to the distance-0 block, with the seeds' min and max (zeros kept as 0)."""
    cols = ["state", "layer", "n_layers", "delta", "seeds", "relative", "rel_min", "rel_max", "norm"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (state, layer, L), g in df.groupby(["state", "layer", "n_layers"], sort=False):
        norms = np.array([json.loads(v) for v in g["norms"]])  # (seeds, n)
        rel = norms / norms[:, :1]
        with np.errstate(divide="ignore"):
            geo = np.where((rel > 0).all(axis=0), np.exp(np.log(np.where(rel > 0, rel, 1)).mean(axis=0)), 0.0)
        for delta in range(norms.shape[1]):
            rows.append({"state": state, "layer": layer, "n_layers": int(L), "delta": delta, "seeds": len(g),
                         "relative": geo[delta], "rel_min": rel[:, delta].min(), "rel_max": rel[:, delta].max(),
                         "norm": float(np.exp(np.log(np.maximum(norms[:, delta], TINY)).mean()))
                         if (norms[:, delta] > 0).all() else 0.0})
    return pd.DataFrame(rows, columns=cols)


def fits(df) -> pd.DataFrame:
    """Per (state, layer, n_layers): the slope of log10 ||J|| per position (mean over seeds with
    its 95% t-interval), the measured reach against the closed form, the far/near ratio and the
    peak distance, and the verdict of the path-length argument for that layer type."""
    from ._learning import t_interval

    cols = ["state", "layer", "n_layers", "seeds", "slope", "slope_low", "slope_high", "half_distance", "reach_min",
            "reach_max", "theory_reach", "far_near", "peak_delta", "expected", "verdict"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (state, layer, L), g in df.groupby(["state", "layer", "n_layers"], sort=False):
        m, lo, hi = t_interval(g["slope"])
        row = {"state": state, "layer": layer, "n_layers": int(L), "seeds": len(g), "slope": m, "slope_low": lo,
               "slope_high": hi, "half_distance": float(np.log10(2) / -m) if m < 0 else float("inf"),
               "reach_min": int(g["reach"].min()), "reach_max": int(g["reach"].max()),
               "theory_reach": int(g["theory_reach"].iloc[0]),
               "far_near": float(np.exp(np.log(g["far_near"].clip(lower=TINY)).mean())),
               "peak_delta": int(g["peak_delta"].mode().iloc[0])}
        row.update(_verdict(row))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _verdict(r: dict) -> dict:
    """What the path-length argument expects of this layer type's profile, and whether it holds."""
    row = ROW[r["layer"]]
    if row == "self_attention":
        flat = abs(np.log10(r["far_near"])) <= FLAT if r["far_near"] > 0 else False
        return {"expected": f"flat: far/near within {10 ** FLAT:g}x (one layer links any pair)",
                "verdict": "agrees" if flat and r["reach_min"] == r["theory_reach"] else "disagrees"}
    if row == "recurrent":
        decays = np.isfinite(r["slope_high"]) and r["slope_high"] < 0 if r["seeds"] > 1 else r["slope"] < 0
        return {"expected": "decays with the distance (one cell step per position)",
                "verdict": "agrees" if decays and r["reach_min"] == r["theory_reach"] else "disagrees"}
    same = r["reach_min"] == r["reach_max"] == r["theory_reach"]
    return {"expected": f"zero beyond the reach of {r['n_layers']} layers ({r['theory_reach']} positions)",
            "verdict": "agrees" if same else "disagrees"}


DERIVED = {"gradient_signal_profile": profile, "gradient_signal_fits": fits}


# ----------------------------------------------------------------------------- figures
def _label(layer: str) -> str:
    from ._stack import label

    return label(layer)


def plot_profiles(df, on: str):
    import matplotlib.pyplot as plt

    p = profile(df[df["state"] == "init"])
    if p.empty:
        return None
    depths = sorted(set(p["n_layers"]))
    fig, axes = plt.subplots(1, len(depths), figsize=(4.8 * len(depths), 4.4), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], depths):
        for layer, g in p[p["n_layers"] == L].groupby("layer", sort=False):
            g = g[(g["delta"] >= 1) & (g["relative"] > 0)]
            line, = ax.plot(g["delta"], g["relative"], "-", lw=1.3, label=_label(layer))
            ax.fill_between(g["delta"], g["rel_min"].clip(lower=1e-300), g["rel_max"], color=line.get_color(),
                            alpha=0.12)
        ax.set(yscale="log", xlabel="distance j - i (positions)", title=f"{L} layer{'s' if L > 1 else ''}")
        ax.set_ylim(bottom=1e-12)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("||dy_j/dx_i||_F / ||dy_j/dx_j||_F (ratio)")
    axes[0][-1].legend(fontsize=6.5, loc="lower left")
    fig.suptitle(f"Gradient signal over distance at initialisation (geometric mean over seeds; band: seeds' range; "
                 f"zero blocks not drawn)\n{on}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_trained(df, on: str):
    import matplotlib.pyplot as plt

    trained = df[df["state"] == "trained"]
    if trained.empty:
        return None
    L = int(trained["n_layers"].iloc[0])
    p = profile(df[df["n_layers"] == L])
    layers = [lay for lay in dict.fromkeys(trained["layer"])]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.8), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        for state, style in (("init", ":"), ("trained", "-")):
            g = p[(p["layer"] == layer) & (p["state"] == state) & (p["delta"] >= 1) & (p["relative"] > 0)]
            ax.plot(g["delta"], g["relative"], style, lw=1.4, label=state)
        ax.axvline(float(trained["task_delta"].iloc[0]), color="grey", lw=0.8, ls="--", label="task's delta")
        ax.set(yscale="log", xlabel="distance j - i (positions)", title=_label(layer))
        ax.set_ylim(bottom=1e-12)
        ax.title.set_fontsize(8)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("||dy_j/dx_i||_F / ||dy_j/dx_j||_F (ratio)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"What training on delayed recall does to the gradient signal ({L} layers; geometric mean over "
                 f"seeds)\n{on}", fontsize=9)
    fig.tight_layout()
    return fig


FIGURES = {"gradient_signal": plot_profiles, "gradient_signal_trained": plot_trained}


# ----------------------------------------------------------------------------- report
def path_lengths(rep, n: int) -> dict:
    """The path_length study's measured maximum path length at n for each row's causal case
    (its quoted k and r), by Table 1 row; empty where not measured."""
    pl = rep.rows("path_length")
    out = {}
    if pl.empty:
        return out
    for row in ROWS.values():
        p = {"k": K, "r": R}.get(row.path_param, 0)
        sub = pl[(pl["layer"] == row.name) & (pl["n"] == n) & (pl["causal"].astype(str) == "True")
                 & (pl["param"] == p)]
        if not sub.empty:
            out[row.name] = int(sub["measured"].iloc[0])
    return out


def _task_delta(df):
    """The delayed-recall distance the trained rows were trained at (None without trained rows)."""
    d = df["task_delta"].dropna() if "task_delta" in df.columns else pd.Series(dtype=float)
    return float(d.iloc[0]) if len(d) else None


def findings(fit: pd.DataFrame, task_delta=None) -> list[str]:
    out = []
    init = fit[fit["state"] == "init"]
    if not init.empty:
        agree = int((init["verdict"] == "agrees").sum())
        out.append(f"{agree} of {len(init)} (layer, depth) profiles at initialisation behave as the path-length "
                   f"argument expects")
        rec = init[init["layer"].isin(["recurrent", "gru", "rnn"])]
        if not rec.empty:
            out.append("recurrent layers lose " + ", ".join(
                f"{_label(r.layer).split('(')[-1].rstrip(')')} {-r.slope:.3g} decades per position at L = {r.n_layers}"
                for r in rec.itertuples() if r.n_layers == rec["n_layers"].min()))
        sa = init[init["layer"] == "self_attention"]
        if not sa.empty:
            out.append("self-attention's far/near ratio is " + ", ".join(
                f"{r.far_near:.2g} at L = {r.n_layers}" for r in sa.itertuples()))
        cut = init[init["layer"].isin(["convolutional", "convolutional_dilated", "self_attention_restricted"])]
        if not cut.empty:
            same = cut[(cut["reach_min"] == cut["theory_reach"]) & (cut["reach_max"] == cut["theory_reach"])]
            out.append(f"convolutions and restricted attention cut off exactly at the closed-form reach in "
                       f"{len(same)} of {len(cut)} (layer, depth) cases")
    tr = fit[fit["state"] == "trained"]
    if not tr.empty:
        before = init.set_index(["layer", "n_layers"]) if not init.empty else None
        parts = []
        for r in tr.itertuples():
            s = f"{_label(r.layer)} peaks at distance {r.peak_delta}"
            if before is not None and (r.layer, r.n_layers) in before.index:
                b = before.loc[(r.layer, r.n_layers)]
                s += f" (at initialisation {int(b['peak_delta'])}; slope {b['slope']:.3g} -> {r.slope:.3g} per position)"
            parts.append(s)
        at = f" at delta = {int(task_delta)}" if task_delta is not None and np.isfinite(task_delta) else ""
        out.append(f"after training on delayed recall{at}: " + ", ".join(parts))
    return out


def section(rep) -> str:
    good = rep.rows(NAME)
    s = rep.figure("gradient_signal", "Jacobian block norms against distance at initialisation")
    s += rep.figure("gradient_signal_trained", "Jacobian block norms before and after training")
    s += prose(f"""
        Method: a causal stack of L layers of one mixer (each layer the mixer and an FFN, each in the paper's
        post-norm residual; convolutions k = {K}, dilations 1, {K}, {K * K}, ...; restricted attention r = {R};
        width 32, 2 heads) is fed the embedded tokens of {GRIDS['default']['sequences']} delayed-recall sequences; the
        Frobenius norm of every Jacobian block ||dy_j/dx_i|| at the last position j comes from one float64 backward
        pass with d one-hot cotangents (`studies._stack.jacobian_profile`). The path-length argument expects
        self-attention's
        profile to be flat (one layer links any pair; threshold: far/near ratio within {10 ** FLAT:g}x), the
        recurrent layers' to decay with the distance (the 95% interval of the fitted slope of log10 ||J|| below 0),
        and convolutions' and restricted attention's to be exactly zero beyond the distance L layers reach (the
        largest distance whose closed-form path length, `tfm.table1.max_path_length`, is at most L).
    """)
    if good.empty:
        return s + "Not measured.\n\n" + rep.sources(sys.modules[__name__])
    fit = fits(good)
    s += "**What the profiles say:** " + "; ".join(findings(fit, _task_delta(good))) + ".\n\n"
    n = int(good["n"].iloc[0])
    measured = path_lengths(rep, n)
    show = fit.copy()
    show["path_length_n"] = [measured.get(ROW[x], np.nan) for x in show["layer"]]
    cols = ["state", "layer", "n_layers", "seeds", "slope", "slope_low", "slope_high", "reach_min", "theory_reach",
            "far_near", "peak_delta", "path_length_n", "verdict"]
    s += (f"Fits per (state, layer, depth): slope in log10 per position with its 95% interval over seeds; reach "
          f"measured (min over seeds) and in closed form; far/near = ||J|| at the reach over ||J|| at distance 1; "
          f"`path_length_n`: the maximum path length at n = {n} measured by the path-length study "
          f"(`tables/path_length.csv`, causal, k = {K}, r = {R}; blank where not measured):\n\n")
    s += md_table(show[cols], "{:.3g}") + "\n"
    return s + rep.sources(sys.modules[__name__])


def readme(rep) -> list[str]:
    good = rep.rows(NAME)
    if good.empty:
        return []
    return ["- **Gradient signal over distance:** " + "; ".join(findings(fits(good), _task_delta(good))) + "."]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
