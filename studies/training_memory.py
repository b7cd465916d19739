"""Peak memory of a training step against n, measured, beside tfm.cost's analytic activation memory.

Part "layer": the training step of one layer (studies.training_scaling.train_layer: the
forward keeping what the backward needs, then the backward; batch 1, width d, float32) for
naive and fused self-attention, the LSTM, the k=3 convolution, restricted self-attention and
the FFN. Part "model": one ``train_step`` (forward, loss, backward, Adam) of the small
Transformer and of the LSTM seq2seq and ConvS2S at its width and depth (the training
throughput study's "equal width" configs), b sequences of n source and n + 1 target tokens.

Measured (tfm.bench.memory, after one warm-up step): on the CPU the peak extra resident
memory of one step (Linux VmHWM after clear_refs, free heap returned to the OS first, so
buffers Numba's kernels allocate count too); on a GPU the device arrays the step allocates.
Inputs, weights, the cotangent and Adam's moments exist before the step and are not
counted. Predicted: tfm.cost.training_memory, the activations the forward saves, the
gradients and the backward's workspace; naive attention's backward holds two (n, n)
matrices per head, the fused one O(n) per head.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from tfm.table1 import label

from ._common import grid_name, make_study, ok, parser, pow2, run_main
from ._report import prose

NAME = "training_memory"
TITLE = "Training memory"
LAYERS = ("self_attention_naive", "self_attention", "recurrent", "convolutional", "self_attention_restricted", "ffn")
MODELS = ("transformer_small", "lstm_seq2seq", "convs2s")
GRIDS = {  # layer n values at width d; model n values at batch b
    "default": dict(n=pow2(256, 8192), d=64, model_n=(32, 64, 128, 256), b=8, max_call_s=1.5),
    "quick": dict(n=pow2(128, 1024), d=64, model_n=(16, 64), b=4, max_call_s=0.5),
    "smoke": dict(n=(8, 16), d=8, model_n=(4, 8), b=2, max_call_s=5.0),
}
MIB = 2.0 ** 20
# Verdicts:
FORMULA_FACTOR = 2.0  # measured agrees with the formula when within this factor of it at the largest n
MIN_PREDICTED_MIB = 1.0  # ... and only where the formula predicts at least this much (below, allocator
#                          granularity and fixed per-thread buffers dominate)


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    g = GRIDS[grid]
    # "subject": a registry layer or a model (one column, so that "layer" keeps the registry's names only)
    out = [{"part": "layer", "subject": layer, "b": 1, "n": n, "d": g["d"]} for layer in LAYERS for n in g["n"]]
    out += [{"part": "model", "subject": model, "b": g["b"], "n": n, "d": 0} for model in MODELS for n in g["model_n"]]
    return out


def _model_step(case: dict, grid: str, backend: str):
    """(one training step of the case's model, its config, the cost-model op, n_params)."""
    import tfm

    from .training_throughput import LABEL_SMOOTHING, LR, config_for

    config, op = config_for({"model": case["subject"], "match": "equal_width"}, grid)
    cls = {"transformer_forward": tfm.Transformer, "lstm_seq2seq_forward": tfm.LSTMSeq2Seq,
           "convs2s_forward": tfm.ConvS2S}[op]
    model = cls(config, seed=0, backend=backend)
    opt = tfm.optim.Adam(model, lr=LR)
    rng = np.random.default_rng(0)
    b, n = case["b"], case["n"]
    src = rng.integers(3, config.src_vocab, size=(b, n))
    tgt = rng.integers(3, config.tgt_vocab, size=(b, n + 1))
    return (lambda: model.train_step(opt, src, tgt, label_smoothing=LABEL_SMOOTHING)), config, op, model


def measure(case: dict, ctx) -> dict:
    from tfm import cost

    from .training_scaling import train_layer

    backend, grid = ctx.options["backend"], ctx.options["grid"]
    if case["part"] == "layer":
        step = train_layer(case["subject"], n=case["n"], d=case["d"], backend=backend)
        run, sync, predicted = step.run, step.sync, step.memory
        extra = {}
    else:
        run, config, op, model = _model_step(case, grid, backend)
        sync = model.backend.synchronize
        predicted = cost.training_memory(op, config=config, b=case["b"], n_src=case["n"], n_tgt=case["n"],
                                         n_params=model.n_params)
        extra = {"d": config.d_model, "n_params": model.n_params}
    run()  # warm-up: compiles (its memory is not the step's)
    sync()
    took = []

    def timed():  # the measured step; the series' time budget reads its time
        t0 = time.perf_counter()
        out = run()
        sync()
        took.append(time.perf_counter() - t0)
        return out

    mem = ctx.memory(timed, sync)
    t = took[0]
    measured = mem.device_alloc_bytes if ctx.on_device else mem.rss_bytes
    return {"backend": backend, **extra, "time_s": t, "min_s": t, **mem.as_row(),
            "measured_bytes": measured, **{f"predicted_{k}": v for k, v in predicted.items()},
            "measured_over_predicted": (measured / predicted["total"]
                                        if measured is not None and predicted["total"] > 0 else np.nan)}


def build(args):
    grid = grid_name(args)
    return make_study(sys.modules[__name__], cases(grid), measure, args, grow="n",
                      exponent=lambda c: 2.0 if c["subject"].startswith("self_attention") and c["part"] == "layer"
                      else 1.0, max_call_s=GRIDS[grid]["max_call_s"], budget_s=0.0)


# ----------------------------------------------------------------------------- derived
def summary(df) -> pd.DataFrame:
    """Per layer or model: the log-log slopes of the measured and of the predicted peak against n
    (upper half of n, 95% interval), both at the largest n with their ratio, and the excess
    (measured - predicted) there with its growth exponent between the two largest n."""
    from tfm.bench import loglog_slope

    cols = ["part", "subject", "d", "b", "n_from", "n_to", "measured_exponent", "ci_low", "ci_high",
            "predicted_exponent", "measured_mib", "predicted_mib", "measured_over_predicted", "excess_mib",
            "excess_exponent"]
    good = ok(df)
    rows = []
    for (part, subject), sub in (good.groupby(["part", "subject"], sort=False) if not good.empty else ()):
        sub = sub.sort_values("n")
        f = loglog_slope(sub["n"], sub["measured_bytes"])
        p = loglog_slope(sub["n"], sub["predicted_total"])
        top = sub.iloc[-1]
        excess = (sub["measured_bytes"] - sub["predicted_total"]).to_numpy(dtype=float)
        grow = (np.log(excess[-1] / excess[-2]) / np.log(sub["n"].iloc[-1] / sub["n"].iloc[-2])
                if len(sub) >= 2 and excess[-1] > 0 and excess[-2] > 0 else np.nan)
        rows.append({"part": part, "subject": subject, "d": int(top["d"]), "b": int(top["b"]), "n_from": int(sub["n"].min()),
                     "n_to": int(top["n"]), "measured_exponent": f.slope, "ci_low": f.ci_low, "ci_high": f.ci_high,
                     "predicted_exponent": p.slope, "measured_mib": top["measured_bytes"] / MIB,
                     "predicted_mib": top["predicted_total"] / MIB,
                     "measured_over_predicted": top["measured_bytes"] / top["predicted_total"],
                     "excess_mib": excess[-1] / MIB, "excess_exponent": grow})
    return pd.DataFrame(rows, columns=cols)


DERIVED = {"training_memory_summary": summary}


def _name(part: str, subject: str) -> str:
    return label(subject) if part == "layer" else f"{subject} (model)"


# ----------------------------------------------------------------------------- figures
def plot_memory(df, on: str):
    import matplotlib.pyplot as plt

    device = "device_alloc_bytes" in df.columns and df["device_alloc_bytes"].notna().any()
    parts = [p for p in ("layer", "model") if (df["part"] == p).any()]
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(6.6 * len(parts), 4.8), squeeze=False)
    for ax, part in zip(axes[0], parts):
        sub = df[df["part"] == part]
        for i, (subject, grp) in enumerate(sub.groupby("subject", sort=False)):
            grp = grp.sort_values("n")
            color = f"C{i}"
            ax.loglog(grp["n"], grp["measured_bytes"] / MIB, "o-", ms=3, color=color,
                      label=f"{_name(part, subject)}: measured")
            ax.loglog(grp["n"], grp["predicted_total"] / MIB, "--", color=color, lw=1, label="  tfm.cost formula")
        from .training_scaling import _log_ticks

        _log_ticks(ax, sub["n"])
        what = "device memory allocated by one step" if device else "peak extra resident memory of one step"
        r = sub.iloc[0]
        ax.set(xlabel="sequence length n (tokens)", ylabel=f"{what} (MiB)",
               title=(f"one layer's training step, batch 1, d = {int(r['d'])}" if part == "layer" else
                      f"one model train_step (forward, backward, Adam), b = {int(r['b'])}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Training memory against n: measured (solid) and predicted (dashed), float32 ({on})")
    return fig


FIGURES = {"training_memory": plot_memory}


# ----------------------------------------------------------------------------- report
def _intro() -> str:
    from .scaling import FUSED_MAX_EXP, NAIVE_MIN_EXP

    return prose(f"""
        Peak memory of one training step against n, measured after a warm-up step (on the CPU the peak
        extra resident memory, Linux VmHWM after clear_refs with free heap returned to the OS first, so
        Numba's own buffers count; tfm.bench.memory), beside the analytic activation memory of
        tfm.cost.training_memory: what the forward saves for the backward, the gradients and the
        backward's workspace (naive attention: P and dP, two (n, n) matrices per head; fused: O(n) per
        head). Slopes are fitted over the upper half of n (tfm.bench.fit, 95% intervals). **Verdicts:**
        naive attention's measured memory must grow at least as n^{NAIVE_MIN_EXP} and the fused kernel's
        at most as n^{FUSED_MAX_EXP} (the scaling study's thresholds); a layer or model agrees with the
        formula when the measured peak at the largest n lies within a factor {FORMULA_FACTOR:g} of the
        prediction, judged only where the prediction is at least {MIN_PREDICTED_MIB:g} MiB (below that,
        page granularity and fixed per-thread buffers dominate). An excess over the formula that grows
        slower than n^{FIXED_EXCESS_EXP} between the two largest n is read as buffers that do not grow with
        n.
    """)


def _verdict(r) -> str:
    if r["predicted_mib"] < MIN_PREDICTED_MIB:
        return f"not judged (formula under {MIN_PREDICTED_MIB:g} MiB)"
    q = r["measured_over_predicted"]
    return "agrees" if 1 / FORMULA_FACTOR <= q <= FORMULA_FACTOR else ("more than predicted" if q > 1 else
                                                                        "less than predicted")


FIXED_EXCESS_EXP = 0.25  # an excess growing slower than n^this between the two largest n is "fixed"


def _why(r) -> str:
    """What the excess over the formula is, read from how it grows with n."""
    q, e, x = r["measured_over_predicted"], r["excess_exponent"], r["excess_mib"]
    head = f"{r['subject']} ({q:.2f}x"
    if q < 1:
        return head + ": the implementation frees, or never makes, tensors the formula counts at the peak)"
    if not np.isfinite(e):
        return head + ")"
    if e < FIXED_EXCESS_EXP:
        return (head + f"; {x:.1f} MiB more, growing as n^{e:.2f} between the two largest n: buffers that do not "
                       "grow with n, such as per-thread tiles, which the formula leaves out)")
    return (head + f"; {x:.1f} MiB more, growing as n^{e:.2f} between the two largest n: tensors the formula does "
                   "not count, or buffers still growing towards a fixed size)")


def results(rep, rows, suffix: str) -> str:
    from ._report import ci, md_table
    from .scaling import FUSED_MAX_EXP, NAIVE_MIN_EXP

    s = rep.figure("training_memory" + suffix, "training memory against n")
    t = summary(rows)
    if t.empty:
        return s + "No rows.\n\n"
    t["verdict"] = [_verdict(r) for _, r in t.iterrows()]
    show = t.assign(**{"95% CI": [ci(lo, hi) for lo, hi in zip(t["ci_low"], t["ci_high"])]})
    s += md_table(show[["part", "subject", "d", "b", "n_from", "n_to", "measured_exponent", "95% CI",
                        "predicted_exponent", "measured_mib", "predicted_mib", "measured_over_predicted",
                        "verdict"]]) + "\n"
    att = t.set_index("subject")
    if {"self_attention_naive", "self_attention"} <= set(att.index) and \
            np.isfinite(att.loc[["self_attention_naive", "self_attention"], "measured_exponent"]).all():
        na, fu = att.loc["self_attention_naive"], att.loc["self_attention"]
        confirmed = na["measured_exponent"] >= NAIVE_MIN_EXP and fu["measured_exponent"] <= FUSED_MAX_EXP
        s += (f"Naive attention's training step grows as n^{na['measured_exponent']:.2f} "
              f"({na['measured_mib']:.1f} MiB at n = {int(na['n_to'])}), the fused one's as "
              f"n^{fu['measured_exponent']:.2f} ({fu['measured_mib']:.1f} MiB at n = {int(fu['n_to'])}): "
              + ("the naive backward's quadratic memory and the fused backward's at most linear memory are confirmed."
                 if confirmed else "not the expected quadratic against at most linear growth at these sizes.")
              + "\n\n")
    judged = t[~t["verdict"].str.startswith("not judged")]
    if not judged.empty:
        good = judged[judged["verdict"] == "agrees"]
        s += (f"{len(good)} of {len(judged)} judged layers and models peak within {FORMULA_FACTOR:g}x of the formula "
              f"at the largest n (measured / predicted {judged['measured_over_predicted'].min():.2f}–"
              f"{judged['measured_over_predicted'].max():.2f}).")
        off = judged[judged["verdict"] != "agrees"]
        if not off.empty:
            s += " Not: " + "; ".join(_why(r) for _, r in off.iterrows()) + "."
        s += "\n\n"
    return s


def section(rep) -> str:
    s = _intro() + "### On the CPU\n\n"
    good = rep.rows(NAME)
    s += results(rep, good, "") if not good.empty else "Not measured.\n\n"
    return s + rep.sources(sys.modules[__name__])


def readme(rep) -> list[str]:
    """The README's bullet on training memory, from the host rows."""
    t = summary(rep.rows(NAME))
    if t.empty:
        return []
    att = t.set_index("subject")
    line = "- **Training memory:**"
    if {"self_attention_naive", "self_attention"} <= set(att.index) and \
            np.isfinite(att.loc[["self_attention_naive", "self_attention"], "measured_exponent"]).all():
        na, fu = att.loc["self_attention_naive"], att.loc["self_attention"]
        line += (f" a training step of naive attention peaks at {na['measured_mib']:.0f} MiB at n = {int(na['n_to'])} "
                 f"(grows as n^{na['measured_exponent']:.2f}), the fused one at {fu['measured_mib']:.1f} MiB at "
                 f"n = {int(fu['n_to'])} (n^{fu['measured_exponent']:.2f}).")
    judged = t[t["predicted_mib"] >= MIN_PREDICTED_MIB]
    if not judged.empty:
        q = judged["measured_over_predicted"]
        line += (f" Measured peaks are {q.min():.2f}–{q.max():.2f}x tfm.cost's activation-memory formula "
                 f"({int(((q >= 1 / FORMULA_FACTOR) & (q <= FORMULA_FACTOR)).sum())} of {len(q)} within "
                 f"{FORMULA_FACTOR:g}x).")
    return [line]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
