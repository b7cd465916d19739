"""Learning at a distance: accuracy against the dependency distance, per layer type, for one budget.

Section 4 of the paper argues that the shorter the paths between two positions, the easier
a dependency between them is to learn. This study trains each layer type on synthetic
tasks whose dependency distance delta is controlled (``tfm.tasks``) and measures held-out
accuracy against delta:

    delayed_recall      a Tagger (studies._stack: embedding, 2 layers of one Table 1 mixer
                        with FFNs, read-out) emits the token seen delta positions earlier;
                        one run per delta (sequences of 64, 16 targets each)
    associative_recall  the same taggers on multi-query associative recall (8 pairs, 8
                        queries): one run on the mixture of distances, accuracy per delta
    copy                the Transformer, the LSTM seq2seq (with attention) and ConvS2S copy a
                        sequence of delta symbols; one run per delta

Every run follows one recipe (studies._learning: the paper's Adam, warm-up schedule and label
smoothing at width 32) for one budget in counted training FLOPs: ``ref_steps`` steps of the
self-attention model (the Transformer for copy) on the task's batches; every other model
gets the same FLOPs, so cheaper models take more steps. Seeds set the weights, the training
batches and the held-out set. Rows: one per (task, model, delta, seed).
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np
import pandas as pd

from tfm.table1 import K, R, ROWS, max_path_length

from ._common import grid_name, make_study, ok, parser, run_main
from ._report import md_table, prose

NAME = "learning_distance"
TITLE = "Learning at a distance"
TAGGERS = ("self_attention", "self_attention_restricted", "recurrent", "convolutional", "convolutional_dilated")
# Associative recall measures every distance 2..23; its checks take these: both ends and each side of the
# two convolutions' reach (4 and 8 positions for 2 layers).
CHECKED = (2, 4, 5, 8, 9, 16, 23)
GRIDS = {
    "default": {"delayed_recall": dict(models=TAGGERS, deltas=(2, 8, 24, 48), seeds=(0, 1, 2), ref_steps=300),
                "associative_recall": dict(models=TAGGERS, seeds=(0, 1, 2), ref_steps=1000, checked=CHECKED),
                "copy": dict(models=("transformer", "lstm_seq2seq", "convs2s"), deltas=(8, 16, 32), seeds=(0, 1, 2),
                             ref_steps=300)},
    "quick": {"delayed_recall": dict(models=TAGGERS, deltas=(2, 24), seeds=(0, 1), ref_steps=100),
              "associative_recall": dict(models=TAGGERS, seeds=(0, 1), ref_steps=100, checked=CHECKED),
              "copy": dict(models=("transformer", "lstm_seq2seq", "convs2s"), deltas=(8, 16), seeds=(0, 1),
                           ref_steps=100)},
    "smoke": {"delayed_recall": dict(models=("self_attention", "recurrent"), deltas=(2, 5), seeds=(0,), ref_steps=3),
              "associative_recall": dict(models=("convolutional",), seeds=(0,), ref_steps=3,
                                         task_params=dict(n_pairs=2, n_queries=2, n_keys=3, n_values=2)),
              "copy": dict(models=("lstm_seq2seq",), deltas=(3,), seeds=(0,), ref_steps=3)},
    "full": {"delayed_recall": dict(models=TAGGERS + ("gru", "rnn"), deltas=(2, 4, 8, 16, 24, 32, 48),
                                    seeds=(0, 1, 2, 3, 4), ref_steps=1200),
             "associative_recall": dict(models=TAGGERS + ("gru", "rnn"), seeds=(0, 1, 2, 3, 4), ref_steps=3000,
                                        checked=CHECKED),
             "copy": dict(models=("transformer", "lstm_seq2seq", "convs2s"), deltas=(8, 16, 32, 64),
                          seeds=(0, 1, 2, 3, 4), ref_steps=1200)},
}
TRAINED_FOR_GRADIENTS = ("delayed_recall", 24)  # the runs the gradient-signal study repeats its measurement on
MARGIN = 0.05  # accuracy within this of chance counts as chance; a change larger than it as a change
_EVALS: dict = {}  # run key -> its evaluation (associative recall: one run, many delta rows)


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    out = []
    for task, g in GRIDS[grid].items():
        deltas = g.get("deltas") or _task(task, g, None).deltas
        out += [{"task": task, "model": m, "delta": int(d), "seed": s, "ref_steps": g["ref_steps"]}
                for m in g["models"] for d in deltas for s in g["seeds"]]
    return out


def _task(task: str, g: dict, delta):
    from tfm.tasks import make_task

    params = dict(g.get("task_params", {}))
    if task == "delayed_recall":
        params["delta"] = delta
    elif task == "copy":
        params["length"] = delta
    return make_task(task, **params)


def run_for(task: str, model: str, delta: int, seed: int, grid: str, ref_steps: int):
    """The training run (studies._learning.Run) behind a row, and its task."""
    from ._learning import Run, budget_for

    g = GRIDS[grid][task]
    t = _task(task, g, delta if task != "associative_recall" else None)
    params = {k: v for k, v in vars(t).items() if not k.startswith("_")}
    return Run.of(task, model, seed, budget_for(t, ref_steps), task_params=params), t


def measure(case: dict, ctx, out="results") -> dict:
    """One row; ``out``: the results folder, whose checkpoints/ the training runs share."""
    from tfm.bench import Skip

    from ._learning import EVAL_SEQUENCES, evaluate, trained

    if ctx.options["backend"] != "cpu":
        raise Skip("the learning studies train on the cpu backend only", "unavailable")
    grid = ctx.options["grid"]
    run, task = run_for(case["task"], case["model"], case["delta"], case["seed"], grid, case["ref_steps"])
    model, stats, reused = trained(run, out)
    key = run.key()
    if key not in _EVALS:
        _EVALS[key] = evaluate(model, task, run.seed, EVAL_SEQUENCES[run.task])
    ev = _EVALS[key]
    right, total = ev["by_distance"].get(case["delta"], (0, 0))
    if total == 0:
        raise Skip(f"no held-out target at distance {case['delta']}", "error")
    return {"accuracy": right / total, "correct": right, "n_targets": total, "chance": task.chance,
            "accuracy_all": ev["accuracy"], "steps": stats["steps"], "train_flops": stats["train_flops"],
            "budget_flops": run.budget_flops,
            "train_s": stats["train_s"], "first_loss": stats["first_loss"], "final_loss": stats["final_loss"],
            "n_params": stats["n_params"], "reused_checkpoint": reused, "run_key": key}


def build(args):
    return make_study(sys.modules[__name__], cases(grid_name(args)), partial(measure, out=args.out), args,
                      max_call_s=float("inf"))


# ----------------------------------------------------------------------------- derived tables
def label(model: str) -> str:
    from ._learning import SEQ2SEQ_LABELS
    from ._stack import label as mixer_label

    return SEQ2SEQ_LABELS.get(model) or mixer_label(model)


def path_length(model: str, delta: int) -> float:
    """Layer applications on the shortest path linking positions delta apart in a causal
    stack of this mixer (tfm.table1's closed forms at n = delta + 1); NaN for the
    encoder-decoders (every one of them attends to the source)."""
    row = {"self_attention": "self_attention", "self_attention_restricted": "self_attention_restricted",
           "recurrent": "recurrent", "gru": "recurrent", "rnn": "recurrent", "convolutional": "convolutional",
           "convolutional_dilated": "convolutional_dilated"}.get(model)
    if row is None or delta < 1:
        return float("nan")
    p = {"k": K, "r": R}.get(ROWS[row].path_param, 0)
    return float(max_path_length(row, delta + 1, p, causal=True)[0])


def reachable(model: str, delta: int, n_layers: int) -> bool:
    """Whether a causal stack of ``n_layers`` such layers connects positions ``delta`` apart at all:
    always for self-attention, recurrent layers and the encoder-decoders; for convolutions and
    restricted attention where the path length is at most the depth."""
    if model in ("self_attention", "recurrent", "gru", "rnn") or model not in TAGGERS:
        return True
    return path_length(model, delta) <= n_layers


def summary(df) -> pd.DataFrame:
    """Per (task, model, delta): mean accuracy over seeds with its 95% t-interval, the path
    length at that distance, chance, and the budget in steps and seconds."""
    from ._learning import N_LAYERS, t_interval

    cols = ["task", "model", "delta", "seeds", "accuracy", "ci_low", "ci_high", "min", "max", "chance",
            "path_length", "reachable", "steps", "train_s", "budget_flops"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (task, model, delta), g in df.groupby(["task", "model", "delta"], sort=False):
        m, lo, hi = t_interval(g["accuracy"])
        pl = path_length(model, int(delta))
        rows.append({"task": task, "model": model, "delta": int(delta), "seeds": len(g), "accuracy": m,
                     "ci_low": max(0.0, lo) if np.isfinite(lo) else lo,
                     "ci_high": min(1.0, hi) if np.isfinite(hi) else hi,
                     "min": g["accuracy"].min(), "max": g["accuracy"].max(), "chance": g["chance"].iloc[0],
                     "path_length": pl, "reachable": reachable(model, int(delta), N_LAYERS),
                     "steps": g["steps"].mean(), "train_s": g["train_s"].mean(),
                     "budget_flops": g["budget_flops"].iloc[0]})
    return pd.DataFrame(rows, columns=cols)


REFERENCE = {"delayed_recall": "self_attention", "associative_recall": "self_attention", "copy": "transformer"}


def paired(df) -> pd.DataFrame:
    """Per (task, model, delta): the reference model's accuracy (self-attention, or the
    Transformer) minus this model's, paired by seed (same data), mean and 95% t-interval;
    ``verdict``: "reference better" / "model better" where the interval excludes 0, else "tie"."""
    from ._learning import t_interval

    cols = ["task", "reference", "model", "delta", "seeds", "difference", "ci_low", "ci_high", "verdict"]
    if df is None or df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for task, g in df.groupby("task", sort=False):
        ref = REFERENCE[task]
        base = g[g["model"] == ref].set_index(["delta", "seed"])["accuracy"]
        for (model, delta), h in g[g["model"] != ref].groupby(["model", "delta"], sort=False):
            other = h.set_index(["delta", "seed"])["accuracy"]
            both = base.index.intersection(other.index)
            if len(both) == 0:
                continue
            diff = (base.loc[both] - other.loc[both]).to_numpy()
            m, lo, hi = t_interval(diff)
            if len(diff) >= 2 and np.isfinite(lo) and (lo > 0 or hi < 0):
                verdict = "reference better" if lo > 0 else "model better"
            elif np.all(diff == 0):
                verdict = "tie"
            else:
                verdict = "tie" if len(diff) >= 2 else "one seed"
            rows.append({"task": task, "reference": ref, "model": model, "delta": int(delta), "seeds": len(diff),
                         "difference": m, "ci_low": lo, "ci_high": hi, "verdict": verdict})
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- figure
def plot_accuracy(df, on: str):
    import matplotlib.pyplot as plt

    s = summary(df)
    tasks = [t for t in GRIDS["default"] if t in set(s["task"])]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = s[s["task"] == task]
        for model, g in sub.groupby("model", sort=False):
            g = g.sort_values("delta")
            line, = ax.plot(g["delta"], g["accuracy"], "o-", ms=4, label=label(model))
            if g["seeds"].max() > 1:
                ax.fill_between(g["delta"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.15)
            raw = df[(df["task"] == task) & (df["model"] == model)]
            ax.plot(raw["delta"], raw["accuracy"], ".", color=line.get_color(), ms=3, alpha=0.6)
        ax.axhline(sub["chance"].iloc[0], color="grey", ls=":", lw=1, label="chance")
        ax.set(xlabel="dependency distance delta (positions)", ylabel="held-out accuracy (fraction)",
               ylim=(-0.02, 1.02), title=task.replace("_", " "))
        deltas = sorted(set(sub["delta"]))
        ax.set_xticks(deltas if len(deltas) <= 8 else deltas[::max(1, len(deltas) // 8)])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    budget = ", ".join(f"{t.replace('_', ' ')} {int(s[s['task'] == t]['steps'].min())}-"
                       f"{int(s[s['task'] == t]['steps'].max())} steps" for t in tasks)
    fig.suptitle(f"Accuracy against distance at one FLOP budget per task (mean over seeds, 95% t-interval; dots: "
                 f"seeds)\n{budget}; {on}", fontsize=9)
    fig.tight_layout()
    return fig


FIGURES = {"learning_distance": plot_accuracy}


# ----------------------------------------------------------------------------- report
def _fmt(m, lo, hi) -> str:
    return f"{m:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "")


RECURRENT = ("recurrent", "gru", "rnn")


def _checked(df, task: str):
    """The distances a task's checks take (its grid's ``checked``; None: all), found by the
    rows' budget in the grids."""
    steps = set(df.loc[df["task"] == task, "ref_steps"]) if "ref_steps" in df.columns else set()
    for grid in GRIDS.values():
        g = grid.get(task, {})
        if g.get("ref_steps") in steps and "checked" in g:
            return g["checked"]
    return None


def checks(df) -> pd.DataFrame:
    """The path-length argument's predictions, each checked against the summary and paired
    tables: one row per (task, check, model, delta) with what it expects, what was measured and
    the verdict ("agrees", "disagrees", or "tie" for a seed-paired comparison that resolves
    neither way). Thresholds: ``MARGIN`` accuracy for "declines", "flat" and "at chance"."""
    cols = ["task", "check", "model", "delta", "expected", "measured", "verdict"]
    s, p = summary(df), paired(df)
    rows = []
    for task in [t for t in GRIDS["default"] if t in set(s["task"])]:
        st = s[s["task"] == task]
        checked = _checked(df, task)
        if checked is not None:
            st = st[st["delta"].isin(checked)]
            p = p[(p["task"] != task) | p["delta"].isin(checked)]
        lo_d, hi_d = int(st["delta"].min()), int(st["delta"].max())
        for model, g in st.groupby("model", sort=False):
            g = g.set_index("delta")
            if lo_d not in g.index or hi_d not in g.index or lo_d == hi_d:
                continue
            a, b = g.loc[lo_d, "accuracy"], g.loc[hi_d, "accuracy"]
            measured = f"{a:.2f} at delta = {lo_d}, {b:.2f} at delta = {hi_d}"
            if model == REFERENCE[task] or (task == "copy"):
                why = "one attention hop" if task == "copy" else "a path of one layer at any distance"
                rows.append({"task": task, "check": "flat", "model": model, "delta": hi_d,
                             "expected": f"no decline beyond {MARGIN} ({why})", "measured": measured,
                             "verdict": "agrees" if a - b <= MARGIN else "disagrees"})
            elif model in RECURRENT and g.loc[lo_d, "reachable"]:
                rows.append({"task": task, "check": "declines", "model": model, "delta": hi_d,
                             "expected": f"a decline beyond {MARGIN} (a path of delta + 1 cell steps)",
                             "measured": measured, "verdict": "agrees" if a - b > MARGIN else "disagrees"})
        for r in st[~st["reachable"]].itertuples():
            rows.append({"task": task, "check": "chance", "model": r.model, "delta": r.delta,
                         "expected": f"chance ({r.chance:.3g}) within {MARGIN}: no path of 2 layers",
                         "measured": f"{r.accuracy:.3f}",
                         "verdict": "agrees" if abs(r.accuracy - r.chance) <= MARGIN else "disagrees"})
        ref_path = {int(d): path_length(REFERENCE[task], int(d)) for d in st["delta"]}
        for r in p[p["task"] == task].itertuples():
            longer = path_length(r.model, r.delta) > ref_path[r.delta] or task == "copy"
            if not longer:
                continue
            rows.append({"task": task, "check": "reference at least as good", "model": r.model, "delta": r.delta,
                         "expected": f"{label(r.reference)} not worse (its path is shorter)" if task != "copy" else
                         f"{label(r.reference)} not worse",
                         "measured": f"difference {_fmt(r.difference, r.ci_low, r.ci_high)}",
                         "verdict": {"reference better": "agrees", "model better": "disagrees"}.get(r.verdict, "tie")})
    return pd.DataFrame(rows, columns=cols)


def findings(df) -> list[str]:
    """One sentence per task, each number from the summary table or the checks."""
    s, c = summary(df), checks(df)
    out = []
    for task in [t for t in GRIDS["default"] if t in set(s["task"])]:
        st, ct = s[s["task"] == task], c[c["task"] == task]
        ref = REFERENCE[task]
        lo_d, hi_d = int(st["delta"].min()), int(st["delta"].max())
        parts = []
        for model, g in st.groupby("model", sort=False):
            g = g.set_index("delta")
            if model in (ref,) + RECURRENT and lo_d in g.index and hi_d in g.index:
                a, b = g.loc[lo_d], g.loc[hi_d]
                parts.append(f"{label(model)} {_fmt(a['accuracy'], a['ci_low'], a['ci_high'])} at delta = {lo_d}, "
                             f"{_fmt(b['accuracy'], b['ci_low'], b['ci_high'])} at delta = {hi_d}")
        counts = ct["verdict"].value_counts()
        verdict = (f"{int(counts.get('agrees', 0))} of {len(ct)} checks of the path-length argument agree, "
                   f"{int(counts.get('disagrees', 0))} disagree, {int(counts.get('tie', 0))} are ties")
        bad = ct[ct["verdict"] == "disagrees"]
        if not bad.empty:
            verdict += " (disagreeing: " + "; ".join(
                f"{label(r.model)} {r.check} at delta = {r.delta}: {r.measured}" for r in bad.head(4).itertuples()) + (
                f"; {len(bad) - 4} more" if len(bad) > 4 else "") + ")"
        steps = f"{int(st['steps'].min())}-{int(st['steps'].max())} steps"
        out.append(f"- **{task.replace('_', ' ')}** ({steps}, chance {st['chance'].iloc[0]:.3g}): " + "; ".join(parts)
                   + ("; " if parts else "") + verdict + ".")
    return out


DERIVED = {"learning_distance_summary": summary, "learning_distance_paired": paired,
           "learning_distance_checks": checks}


def section(rep) -> str:
    good = rep.rows(NAME)
    s = rep.figure("learning_distance", "held-out accuracy against dependency distance")
    s += prose(f"""
        Method: every model is trained from scratch on freshly generated batches (`tfm.tasks`) with the paper's
        recipe at width 32 (Adam beta1 0.9, beta2 0.98, eps 1e-9; the warm-up schedule with 100 warm-up steps;
        label smoothing 0.1; dropout off; `studies/_learning.py`) for one budget in counted training FLOPs per
        task: the FLOPs of `ref_steps` steps of the self-attention model on that task (the Transformer for copy),
        so models with cheaper steps take more of them. Taggers (delayed and associative recall) are 2 layers of
        one Table 1 mixer, each followed by an FFN, every sublayer in the paper's post-norm residual; all mixers
        are causal (convolutions k = {K}, dilations 1, {K}; restricted attention r = {R}). Accuracy is measured on
        a held-out set per seed; intervals are 95% Student-t intervals over seeds. The path-length argument
        (section 4) predicts that accuracy falls as the path between the two positions grows: not at all for
        self-attention (one layer, any distance), with the distance for the recurrent layer, and to chance
        wherever two layers of a convolution or restricted window cannot connect the positions. Self-attention is
        compared with each other model by the seed-paired difference of accuracies ("better" where its 95%
        interval excludes 0, tie otherwise). As Tang et al. (2018) found for subject-verb agreement, the outcome
        need not favour self-attention.
    """)
    if good.empty:
        return s + "Not measured.\n\n" + rep.sources(sys.modules[__name__])
    s += (f"**What the runs say** (mean over seeds with its 95% interval; thresholds: {MARGIN} accuracy for "
          f"'flat', 'declines' and 'at chance'; every check is a row of `tables/learning_distance_checks.csv`):\n\n")
    s += "\n".join(findings(good)) + "\n\n"
    c = checks(good)
    if not c.empty:
        s += ("The checks that do not agree (a tie: the seed-paired interval includes 0):\n\n"
              + md_table(c[c["verdict"] != "agrees"]) + "\n")
    sm = summary(good)
    budgets = sm.groupby("task").agg(budget_flops=("budget_flops", "first"), steps_min=("steps", "min"),
                                     steps_max=("steps", "max"), seconds_max=("train_s", "max")).reset_index()
    s += "Budgets (training FLOPs per run and the steps they bought; seconds of the slowest model):\n\n"
    s += md_table(budgets) + "\n"
    show = sm[sm["task"] != "associative_recall"]
    ar = sm[sm["task"] == "associative_recall"]
    if not ar.empty:  # every distance is in the table; the section shows a few
        keep = sorted(set(ar["delta"]))
        keep = [d for d in keep if d in (keep[0], keep[len(keep) // 3], keep[2 * len(keep) // 3], keep[-1])]
        show = pd.concat([show, ar[ar["delta"].isin(keep)]])
    cols = ["task", "model", "delta", "seeds", "accuracy", "ci_low", "ci_high", "chance", "path_length", "steps"]
    s += "Mean accuracy per distance (associative recall: four of its distances; all in the summary table):\n\n"
    s += md_table(show[cols], "{:.3g}") + "\n"
    return s + rep.sources(sys.modules[__name__])


def readme(rep) -> list[str]:
    good = rep.rows(NAME)
    if good.empty:
        return []
    return ["- **Learning at a distance** (one counted-FLOP budget per task):"] + ["  " + f for f in findings(good)]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
