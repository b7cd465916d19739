"""Whole-model training throughput: target tokens per second of a full training step (forward,
backward, Adam), tfm beside PyTorch's eager step of the same model, interleaved.

Models: the Transformer at the small preset and at the paper's base config, and the
baselines (LSTM seq2seq, ConvS2S) matched to the small Transformer twice: at its d_model and
depth ("equal width": n_layers = its N, the vocabularies and max_len its own), and at its
parameter count ("equal params": the same depth, d_model the multiple of 8 whose parameter
count, tfm.cost.parameters, comes closest). The Transformers are built with final_norm=True
(as nn.Transformer, so that PyTorch's twin is the same model). Every step: b sequences of n
source tokens and n + 1 target tokens (n predicted), label smoothing 0.1, Adam with the
paper's betas and eps at a constant learning rate of 1e-4, float32, dropout off.

PyTorch's twin (studies._torch_models: nn.Transformer between the same embeddings and
projection; nn.LSTM stacks with the same attention) gets tfm's initial weights and is
checked to give the same first loss; then the two training steps run A B A B in one
process on the same threads (both sides keep training; each side's loss returns to the
host). ConvS2S has no PyTorch twin: its rows time tfm alone and say so. Counted FLOPs:
tfm.cost.training_flops of the teacher-forced forward (backward 2x, attention 2.5x; Adam
left out), hence GFLOP/s and the fraction of the measured sgemm ceiling.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd

from ._common import grid_name, make_study, ok, parser, run_main
from ._report import prose

NAME = "training_throughput"
TITLE = "Whole-model training throughput"
MODELS = ("transformer_small", "transformer_base", "lstm_seq2seq", "convs2s")
MATCHES = ("equal_width", "equal_params")  # how a baseline is sized against the small Transformer
GRIDS = {  # b: batch; n: lengths; base_n: the base Transformer's lengths (its step is ~40x the small one's)
    "default": dict(b=8, n=(64, 256), base_n=(64,), models=MODELS, budget_s=0.6),
    "quick": dict(b=4, n=(32,), base_n=(), models=MODELS, budget_s=0.05),
    "smoke": dict(b=2, n=(4,), base_n=(), models=MODELS, budget_s=0.01),
    # An H100/H200: one size; estimated 30-60 s with compilation once the CUDA backward lands.
    "gpu": dict(b=32, n=(128,), base_n=(128,), models=MODELS, budget_s=0.05),
}
LR = 1e-4  # constant: every timed round takes a step, and neither side may diverge
LABEL_SMOOTHING = 0.1
MAX_LOSS_REL_ERR = 1e-4  # the first losses of tfm and its twin must agree this well before timing
SMOKE_SMALL = dict(d_model=16, n_heads=2, d_ff=32, src_vocab=31, tgt_vocab=37, n_encoder_layers=1,
                   n_decoder_layers=1, max_len=64)
COST_OP = {"transformer": "transformer_forward", "lstm_seq2seq": "lstm_seq2seq_forward", "convs2s": "convs2s_forward"}


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    g = GRIDS[grid]
    out = []
    for model in g["models"]:
        if model == "transformer_base":
            out += [{"model": model, "match": "paper base", "b": g["b"], "n": n} for n in g["base_n"]]
        elif model == "transformer_small":
            out += [{"model": model, "match": "reference", "b": g["b"], "n": n} for n in g["n"]]
        else:
            out += [{"model": model, "match": m, "b": g["b"], "n": n} for m in MATCHES for n in g["n"]]
    return out


def small_config(grid: str):
    from tfm import TransformerConfig

    return TransformerConfig.small(final_norm=True, **(SMOKE_SMALL if grid == "smoke" else {}))


def baseline_config(model: str, ref, d_model: int):
    """An LSTMSeq2Seq / ConvS2S config at the reference Transformer's depth and vocabularies."""
    from tfm import ConvS2SConfig, LSTMSeq2SeqConfig

    cls = LSTMSeq2SeqConfig if model == "lstm_seq2seq" else ConvS2SConfig
    return cls(d_model=d_model, n_layers=ref.n_encoder_layers, src_vocab=ref.src_vocab, tgt_vocab=ref.tgt_vocab,
               max_len=ref.max_len)


def equal_params_width(model: str, ref) -> int:
    """The multiple of 8 whose baseline has the parameter count closest to ``ref``'s (tfm.cost.parameters)."""
    from tfm import cost

    target = cost.parameters("transformer_forward", ref)
    widths = range(8, 8 * ref.d_model + 1, 8)
    return min(widths, key=lambda d: abs(cost.parameters(COST_OP[model], baseline_config(model, ref, d)) - target))


def config_for(case: dict, grid: str):
    """(the case's model config, the cost-model op of its forward)."""
    from tfm import TransformerConfig

    ref = small_config(grid)
    model = case["model"]
    if model == "transformer_small":
        return ref, COST_OP["transformer"]
    if model == "transformer_base":
        return TransformerConfig.base(final_norm=True), COST_OP["transformer"]
    d = ref.d_model if case["match"] == "equal_width" else equal_params_width(model, ref)
    return baseline_config(model, ref, d), COST_OP[model]


def measure(case: dict, ctx) -> dict:
    import tfm
    from tfm import cost
    from tfm.bench import Skip
    from tfm.bench.study import ceiling
    from tfm.bench.timing import paired_ratio

    from ._torch import peer as torch_peer
    from ._torch_models import TrainStep, teacher_forcing_loss, twin

    backend, grid = ctx.options["backend"], ctx.options["grid"]
    b, n = case["b"], case["n"]
    config, op = config_for(case, grid)
    cls = {"transformer_forward": tfm.Transformer, "lstm_seq2seq_forward": tfm.LSTMSeq2Seq,
           "convs2s_forward": tfm.ConvS2S}[op]
    model = cls(config, seed=0, backend=backend)
    rng = np.random.default_rng(0)
    src = rng.integers(3, config.src_vocab, size=(b, n))
    tgt = rng.integers(3, config.tgt_vocab, size=(b, n + 1))
    opt = tfm.optim.Adam(model, lr=LR)
    sync = model.backend.synchronize
    flops = cost.training_flops(op, config=config, b=b, n_src=n, n_tgt=n)
    row = {"backend": backend, "d_model": config.d_model, "n_params": model.n_params,
           "reference_params": cost.parameters("transformer_forward", small_config(grid)), "flops": flops,
           "flops_per_token": flops / (b * n)}
    try:
        tp = torch_peer(backend)
        net = twin(model, tp.device)
        t_src, t_tgt = tp.tensor(src), tp.tensor(tgt)
        first = teacher_forcing_loss(net, t_src, t_tgt, LABEL_SMOOTHING).item()
    except Skip as exc:
        net, why = None, exc.reason
    tfm_first = model.loss(src, tgt, label_smoothing=LABEL_SMOOTHING)  # NotImplementedError where no backward
    tfm_step = lambda: model.train_step(opt, src, tgt, label_smoothing=LABEL_SMOOTHING)  # noqa: E731
    if net is None:
        t = ctx.time(tfm_step, sync)
        return {**row, "time_s": t.median_s, **t.as_row(), "tokens_per_s": b * n / t.median_s,
                "torch_reason": why}
    err = abs(tfm_first - first) / max(abs(first), 1e-30)
    if not err < MAX_LOSS_REL_ERR:
        raise Skip(f"tfm's first loss {tfm_first:.6g} and PyTorch's {first:.6g} differ (relative {err:.1e})", "error")
    step = TrainStep(net, LR, LABEL_SMOOTHING)
    ta, tb = ctx.time_pair(tfm_step, lambda: step(t_src, t_tgt), sync_a=sync, sync_b=tp.sync)
    med, lo, hi = paired_ratio(ta, tb)
    torch_gflops = flops / tb.median_s / 1e9
    return {**row, "time_s": ta.median_s, **ta.as_row(), "tokens_per_s": b * n / ta.median_s, "peer": tp.label,
            "torch_time_s": tb.median_s, "torch_min_s": tb.min_s, "torch_iqr_s": tb.iqr_s,
            "torch_tokens_per_s": b * n / tb.median_s, "torch_gflops": torch_gflops,
            "torch_frac_sgemm": torch_gflops / ceiling(ctx.ceilings, "sgemm_gflops", ctx.on_device),
            "ratio_paired": med, "ratio_ci_low": lo, "ratio_ci_high": hi, "loss_rel_err": err, "torch_reason": ""}


def build(args):
    grid = grid_name(args)
    return make_study(sys.modules[__name__], cases(grid), measure, args, budget_s=GRIDS[grid]["budget_s"],
                      max_call_s=10.0)


# ----------------------------------------------------------------------------- derived
def tokens(df) -> pd.DataFrame:
    """One line per model and size: tfm's and PyTorch's target tokens/s, their paired ratio,
    counted GFLOP per token, achieved GFLOP/s and fraction of the sgemm ceiling."""
    cols = ["model", "match", "b", "n", "d_model", "n_params", "tfm tokens/s", "torch tokens/s", "tfm/torch speed",
            "speed 95% CI", "GFLOP/token", "tfm GFLOP/s", "tfm of sgemm", "torch GFLOP/s", "torch of sgemm"]
    good = ok(df)
    if good.empty:
        return pd.DataFrame(columns=cols)
    g = good.copy()
    for c in ("torch_tokens_per_s", "ratio_paired", "ratio_ci_low", "ratio_ci_high", "torch_gflops",
              "torch_frac_sgemm", "gflops", "frac_sgemm"):
        if c not in g.columns:
            g[c] = np.nan
    out = pd.DataFrame({
        "model": g["model"], "match": g["match"], "b": g["b"].astype(int), "n": g["n"].astype(int),
        "d_model": g["d_model"].astype(int), "n_params": g["n_params"].astype(int),
        "tfm tokens/s": g["tokens_per_s"], "torch tokens/s": g["torch_tokens_per_s"],
        "tfm/torch speed": 1.0 / g["ratio_paired"],  # PyTorch's time over tfm's: above 1 tfm is faster
        "speed 95% CI": [f"[{1 / hi:.2f}, {1 / lo:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "n/a"
                         for lo, hi in zip(g["ratio_ci_low"], g["ratio_ci_high"])],
        "GFLOP/token": g["flops_per_token"] / 1e9, "tfm GFLOP/s": g["gflops"], "tfm of sgemm": g["frac_sgemm"],
        "torch GFLOP/s": g["torch_gflops"], "torch of sgemm": g["torch_frac_sgemm"]})
    return out.reset_index(drop=True)


DERIVED = {"training_throughput_tokens": tokens}


# ----------------------------------------------------------------------------- figures
def _label(r) -> str:
    return f"{r['model']}\n{r['match']}, d={int(r['d_model'])}\n{r['n_params'] / 1e6:.2f}M params"


def plot_tokens(df, on: str):
    import matplotlib.pyplot as plt

    t = tokens(df)
    if t.empty:
        return None
    ns = sorted(t["n"].unique())
    fig, axes = plt.subplots(2, len(ns), figsize=(max(6.0, 1.1 * len(t) / len(ns) + 3) * len(ns) / 1.4, 8.5),
                             squeeze=False)
    for j, n in enumerate(ns):
        sub = t[t["n"] == n].reset_index(drop=True)
        x = np.arange(len(sub))
        ax = axes[0, j]
        ax.bar(x - 0.2, sub["tfm tokens/s"], 0.4, label="tfm")
        ax.bar(x + 0.2, sub["torch tokens/s"], 0.4, label="PyTorch eager (no bar: no twin)")
        ax.set_yscale("log")
        ax.set_xticks(x, [_label(r) for _, r in sub.iterrows()], fontsize=6)
        ax.set(ylabel="target tokens per second (training step)", title=f"b = {int(sub['b'].iloc[0])}, n = {n}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1, j]
        ax.bar(x - 0.2, 100 * sub["tfm of sgemm"], 0.4, label="tfm")
        ax.bar(x + 0.2, 100 * sub["torch of sgemm"], 0.4, label="PyTorch eager")
        ax.set_xticks(x, [_label(r) for _, r in sub.iterrows()], fontsize=6)
        ax.set(ylabel="achieved GFLOP/s, % of the sgemm ceiling", title="counted FLOPs (tfm.cost) per second")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Training step (forward, backward, Adam), float32 ({on})")
    fig.tight_layout()
    return fig


FIGURES = {"training_throughput": plot_tokens}


# ----------------------------------------------------------------------------- report
INTRO = prose(f"""
    Target tokens per second of a full training step (forward, backward, Adam; b sequences of n
    predicted tokens, b * n / median time), float32, label smoothing {LABEL_SMOOTHING}, constant
    learning rate {LR:g}. Baselines at the small Transformer's width and depth ("equal_width") and at its
    parameter count ("equal_params", tfm.cost.parameters). **tfm against PyTorch:** the two eager
    steps of the same model and weights run interleaved on the same threads (first losses checked
    to agree within a relative {MAX_LOSS_REL_ERR:g}); "tfm/torch speed" is the median over rounds of
    PyTorch's time over tfm's, with a bootstrap 95% interval (above 1 tfm is faster). **Between models**
    (not interleaved): one model trains faster than another when its time's interquartile range lies
    entirely below the other's. **FLOPs:** tfm.cost.training_flops (backward 2x the forward, 2.5x for
    attention; Adam left out) over the median time, as a fraction of the sgemm ceiling measured at the
    start of the run. The paper (sections 1, 4 and Table 2) expects the Transformer to train faster than
    recurrent and convolutional models of comparable size, because its layers compute every position at
    once.
""")


def _time_iqr(rows, model: str, match: str, n: int):
    r = rows[(rows["model"] == model) & (rows["match"] == match) & (rows["n"] == n)]
    return None if r.empty else r.iloc[0]


def comparisons(rows) -> pd.DataFrame:
    """Per n and match: the small Transformer's training speed over each baseline's (tokens/s ratio)
    and whether their interquartile ranges of time separate."""
    out = []
    good = ok(rows)
    for n in sorted(good["n"].unique()) if not good.empty else ():
        ref = _time_iqr(good, "transformer_small", "reference", n)
        if ref is None:
            continue
        for model in ("lstm_seq2seq", "convs2s"):
            for match in MATCHES:
                r = _time_iqr(good, model, match, n)
                if r is None:
                    continue
                faster = ref["q75_s"] < r["q25_s"]
                slower = r["q75_s"] < ref["q25_s"]
                out.append({"n": int(n), "baseline": model, "match": match, "baseline d_model": int(r["d_model"]),
                            "params ratio": r["n_params"] / ref["n_params"],
                            "Transformer / baseline tokens/s": ref["tokens_per_s"] / r["tokens_per_s"],
                            "FLOP/token ratio": ref["flops_per_token"] / r["flops_per_token"],
                            "verdict": ("Transformer faster" if faster else "baseline faster" if slower
                                        else "indistinguishable")})
    return pd.DataFrame(out)


def results(rep, rows, suffix: str) -> str:
    from ._report import md_table

    t = tokens(rows)
    s = rep.figure("training_throughput" + suffix, "training throughput") + md_table(t) + "\n"
    good = ok(rows)
    if "torch_reason" in good.columns:
        why = good.loc[good["torch_reason"].fillna("").astype(str).str.len() > 0, ["model", "torch_reason"]]
        for model, reason in why.drop_duplicates("model").itertuples(index=False):
            s += f"- {model}: no PyTorch column ({reason}).\n"
        s += "\n"
    c = comparisons(rows)
    if not c.empty:
        s += ("The small Transformer against each baseline (a ratio above 1: the Transformer processes more target "
              "tokens per second):\n\n" + md_table(c) + "\n")
        agree = c[c["verdict"] == "Transformer faster"]
        s += (f"The Transformer trains faster (interquartile ranges of time apart) in {len(agree)} of {len(c)} "
              f"comparisons; the paper expects it to in all.")
        other = c[c["verdict"] != "Transformer faster"]
        if not other.empty:
            s += (" Not in: " + "; ".join(f"{r['baseline']} {r['match']} at n={r['n']} ({r['verdict']}, tokens/s "
                                          f"ratio {r['Transformer / baseline tokens/s']:.2f}, counted FLOP/token ratio "
                                          f"{r['FLOP/token ratio']:.2f})" for _, r in other.iterrows())
                  + ". A tokens/s ratio below the counted FLOP/token ratio's inverse means the Transformer runs its "
                    "FLOPs at a lower rate than the baseline.")
        s += "\n\n"
    r = t["tfm/torch speed"].dropna()
    if not r.empty:
        s += (f"tfm's training step against PyTorch's eager step: {int((r > 1).sum())} of {len(r)} faster; "
              f"geometric-mean speed {math.exp(np.log(r).mean()):.2f} (range {r.min():.2f}–{r.max():.2f}).")
        frac = t["tfm of sgemm"].dropna()
        if not frac.empty:
            s += f" tfm reaches {frac.min():.0%}–{frac.max():.0%} of the sgemm ceiling in counted FLOPs."
        s += "\n\n"
    return s


def readme(rep) -> list[str]:
    """The README's bullet on training throughput, from the host rows."""
    rows = rep.rows(NAME)
    if rows.empty:
        return []
    t = tokens(rows)
    n = int(t["n"].max())
    top = t[t["n"] == n]

    def name(r) -> str:
        return r["model"] if r["match"] in ("reference", "paper base") else f"{r['model']} ({r['match'].replace('_', ' ')})"

    line = (f"- **Training throughput** (target tokens/s of a full training step, forward, backward and Adam, "
            f"b = {int(top['b'].iloc[0])}, n = {n}): " + ", ".join(f"{name(r)} {r['tfm tokens/s']:.3g}"
                                                                   for _, r in top.iterrows()) + ".")
    c = comparisons(rows)
    if not c.empty:
        line += (f" The small Transformer trains faster than the baseline in {int((c['verdict'] == 'Transformer faster').sum())} "
                 f"of {len(c)} comparisons (interquartile ranges apart).")
    sp = t.dropna(subset=["tfm/torch speed"])
    if not sp.empty:
        line += (" tfm's step against PyTorch's eager step of the same model (above 1: tfm faster): "
                 + ", ".join(f"{name(r)} at n = {int(r['n'])} {r['tfm/torch speed']:.2f}x (95% CI {r['speed 95% CI']})"
                             for _, r in sp.iterrows()) + ".")
    return [line]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
