"""Study 2: sequential operations per layer, counted on the implementation, and time against n.

Part "count": one layer application runs through a counting wrapper of the backend, which
records every kernel call; the calls of the attention, convolutional and restricted layers
each compute all n positions from the layer's inputs alone, so their dependent steps are
the (n-independent) calls. The recurrent layer is one call too, but its kernel loops over
time: on the real kernel the layer's output equals n chained one-step calls, each needing
the previous hidden state (tfm.bench.deps.recurrent_structure), so it needs n dependent
steps. Part "time": time of one layer against n at batch 1 and at a large batch (batch
parallelism is the parallel hardware a CPU offers every layer, recurrent ones included).
"""

from __future__ import annotations

import sys

from ._common import LAYER_LABELS, TIME, grid_name, ok, parser, pow2, run_main, savefig

NAME = "sequential"
COUNT_LAYERS = {  # Table 1 row -> (make_layer kind, options)
    "self_attention": ("attention_layer", {}), "recurrent": ("lstm", {}), "convolutional": ("conv", {}),
    "convolutional_dilated": ("conv", {"dilation": 4}), "self_attention_restricted": ("restricted", {}),
}
TIME_LAYERS = ("attention_fused", "lstm", "conv", "restricted")
PAPER = {"self_attention": "O(1)", "recurrent": "O(n)", "convolutional": "O(1)", "convolutional_dilated": "O(1)",
         "self_attention_restricted": "O(1)"}
GRIDS = {
    "default": dict(count_n=(64, 256, 1024), n=pow2(16, 2048), b=(1, 32), d=64, max_call_s=1.0, budget_s=0.2),
    "quick": dict(count_n=(64, 256), n=pow2(16, 512), b=(1, 16), d=64, max_call_s=0.3, budget_s=0.05),
    "smoke": dict(count_n=(16, 32), n=(16, 32), b=(1, 4), d=16, max_call_s=5.0, budget_s=0.01),
}


def counting_backend(inner):
    """A Backend that forwards to ``inner`` and records the name of every compute call."""
    from tfm.backends.base import Backend

    calls: list[str] = []
    data_moves = {"asarray", "to_numpy", "empty", "synchronize"}

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
    out = [{"part": "count", "layer": layer, "b": 1, "n": n, "d": 16} for layer in COUNT_LAYERS for n in g["count_n"]]
    out += [{"part": "time", "layer": layer, "b": b, "n": n, "d": g["d"]}
            for layer in TIME_LAYERS for b in g["b"] for n in g["n"]]
    return out


def measure(case: dict, ctx) -> dict:
    from tfm.backends import get_backend
    from tfm.bench import Skip, deps
    from tfm.bench.layers import make_layer

    backend = ctx.options["backend"]
    if case["part"] == "count":
        layer, n, d = case["layer"], case["n"], case["d"]
        bk, calls = counting_backend(get_backend(backend))
        kind, opts = COUNT_LAYERS[layer]
        lay = make_layer(kind, n=n, d=d, backend=bk, **opts)
        lay.run()
        row = {"backend": backend, "kernel_calls": len(calls), "calls": " ".join(calls), "paper": PAPER[layer]}
        if layer == "recurrent":
            s = deps.recurrent_structure(deps.apply_fn("recurrent", d=d, backend=backend), n, d)
            if not (s["cell_depends_on_h"] and s["chain_rel_err"] < 1e-9):
                raise Skip(f"recurrent layer is not n chained steps: {s}", "error")
            row.update(sequential_ops=n, how=f"one call; equals {n} chained one-step calls (rel. err "
                                             f"{s['chain_rel_err']:.1e}), each needing h_(t-1)")
        else:
            # The K and V branches (linear + split_heads each) run beside Q's: the critical path is
            # linear -> split_heads -> attention -> merge_heads -> linear.
            dependent = len(calls) - 4 if layer == "self_attention" else len(calls)
            row.update(sequential_ops=dependent, how="kernel calls on the critical path: " + " -> ".join(
                dict.fromkeys(calls)) + " (each computes all n positions at once)")
        return row
    lay = make_layer(case["layer"], n=case["n"], d=case["d"], b=case["b"], backend=backend)
    t = ctx.time(lay.run, lay.sync)
    return {"backend": backend, "time_s": t.median_s, **t.as_row(), "flops": lay.flops, "bytes": lay.bytes}


def build(args):
    from tfm.bench import Study

    grid = grid_name(args)
    g = GRIDS[grid]
    return Study(NAME, "Sequential operations", cases(grid), measure,
                 grow=lambda c: "n" if c["part"] == "time" else None,
                 exponent=lambda c: 2.0 if c["layer"].startswith("attention") else 1.0,
                 max_call_s=g["max_call_s"], budget_s=g["budget_s"], options={"backend": args.backend})


def plot(df, out):
    import matplotlib.pyplot as plt

    good = ok(df)
    t = good[good["part"] == "time"] if "part" in good.columns else good.iloc[0:0]
    if t.empty:
        return
    bs = sorted(t["b"].unique())
    fig, axes = plt.subplots(1, len(bs), figsize=(5.5 * len(bs), 4.5), squeeze=False)
    for ax, b in zip(axes[0], bs):
        for layer in TIME_LAYERS:
            sub = t[(t["layer"] == layer) & (t["b"] == b)].sort_values("n")
            if sub.empty:
                continue
            ax.loglog(sub["n"], sub[TIME] / sub[TIME].iloc[0], "o-", ms=3, label=LAYER_LABELS[layer])
        ns = sorted(t["n"].unique())
        ax.loglog(ns, [x / ns[0] for x in ns], "k:", lw=1, label="proportional to n")
        ax.set(xlabel="sequence length n (tokens)", ylabel=f"time / time at n={ns[0]}", title=f"batch {b}, d = {int(t['d'].iloc[0])}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Growth of layer time with n (relative to the smallest n)")
    savefig(fig, out, "sequential")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
