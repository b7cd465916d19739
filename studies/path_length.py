"""Study 3: maximum path length between input and output positions, measured on the kernels.

For each layer type the one-hop dependency structure is measured by perturbing inputs of
the real kernel (float64; tfm.bench.deps), the stack's dependency graph is built from it
(identical layers; dilated convolutions with dilations 1, k, k^2, ... as in WaveNet/ByteNet;
the recurrence unrolled into cell steps), and breadth-first search gives the fewest layer
applications linking input i to output j. The maximum over all pairs (i <= j for causal
layers) is the path length, written beside its closed form in tables/path_length.csv.
"""

from __future__ import annotations

import sys

from ._common import grid_name, ok, parser, run_main, savefig

NAME = "path_length"
D = 4  # channels: dependence needs only a few
GRIDS = {"default": (16, 64, 256, 1024), "quick": (16, 64, 256), "smoke": (16, 37)}
LAYERS = [  # (layer, parameter name, values, causal options)
    ("self_attention", "", (0,), (False, True)),
    ("recurrent", "", (0,), (True,)),
    ("convolutional", "k", (3, 5), (False, True)),
    ("convolutional_dilated", "k", (2, 3), (True,)),
    ("self_attention_restricted", "r", (8, 32), (False, True)),
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ceil_log(n: int, k: int) -> int:
    """Smallest L with k**L >= n (integer arithmetic)."""
    L, v = 0, 1
    while v < n:
        v *= k
        L += 1
    return L


def theory(layer: str, n: int, p: int, causal: bool) -> tuple[int, str]:
    """Closed-form maximum path length and the formula it uses (n >= 2)."""
    if layer == "self_attention":
        return 1, "1"
    if layer == "recurrent":
        return n, "n (x_i -> h_i -> ... -> h_j, one hop per cell step)"
    if layer == "convolutional":
        if causal:
            return _ceil_div(n - 1, p - 1), "ceil((n-1)/(k-1))"
        return _ceil_div(n - 1, (p - 1) // 2), "ceil((n-1)/floor((k-1)/2))"
    if layer == "convolutional_dilated":
        return _ceil_log(n, p), "ceil(log_k(n)) (causal, dilations 1, k, k^2, ...)"
    if causal:
        return _ceil_div(n - 1, p - 1), "ceil((n-1)/(r-1))"
    return _ceil_div(n - 1, (p - 1) // 2), "ceil((n-1)/floor((r-1)/2))"


def arg_parser():
    p = parser(NAME, __doc__, GRIDS)
    p.add_argument("--n", default=None, help="comma-separated sequence lengths (overrides the grid)")
    return p


def cases(ns) -> list[dict]:
    return [{"layer": layer, "n": n, "param_name": pname, "param": v, "causal": c}
            for layer, pname, values, causal in LAYERS for v in values for c in causal for n in ns]


def measure(case: dict, ctx) -> dict:
    from tfm.bench import Skip, deps

    layer, n, p, causal = case["layer"], case["n"], case["param"], case["causal"]
    backend = ctx.options["backend"]
    th, formula = theory(layer, n, p, causal)
    row = {"backend": backend, "theory": th, "formula": formula}
    if layer == "recurrent":
        s = deps.recurrent_structure(deps.apply_fn("recurrent", d=D, backend=backend), n, D)
        if not (s["cell_depends_on_x"] and s["cell_depends_on_h"] and s["input_reaches_later_outputs"]
                and s["chain_rel_err"] < 1e-9):
            raise Skip(f"recurrent structure not as modelled: {s}", "error")
        dist = deps.unrolled_path_lengths(n)
        how = (f"cell (n=1) output depends on x_t and h_(t-1); layer == {n} chained one-step calls "
               f"(rel. err {s['chain_rel_err']:.1e}); x_i reaches exactly outputs j >= i ({s['how']})")
    elif layer == "convolutional_dilated":
        m = max(1, _ceil_log(n, p))
        rels = {}
        for level in range(m):
            dil = p ** level
            rels[level], how1 = deps.one_hop(deps.apply_fn(layer, d=D, backend=backend, k=p, dilation=dil,
                                                           causal=causal), n, D, margin=max(48, dil * (p - 1) + 8))
        dist = deps.stack_path_lengths(lambda l: rels[l % m], 4 * m + 4)
        how = f"{m} dilations 1..{p ** (m - 1)} measured, {how1}; stack cycles through them"
    else:
        kw = {"k": p} if layer == "convolutional" else {"window": p} if p else {}
        rel, how = deps.one_hop(deps.apply_fn(layer, d=D, backend=backend, causal=causal, **kw), n, D)
        dist = deps.stack_path_lengths(rel, 2 * n + 2)
    measured = deps.max_path(dist, causal)
    return {**row, "measured": measured, "how": how}


def build(args):
    from tfm.bench import Study

    ns = [int(x) for x in args.n.split(",")] if args.n else GRIDS[grid_name(args)]
    return Study(NAME, "Maximum path length, measured", cases(ns), measure, max_call_s=60.0,
                 options={"backend": args.backend})


def label(row) -> str:
    s = row["layer"] + (f" {row['param_name']}={row['param']}" if row["param_name"] else "")
    return s + (" (causal)" if row["causal"] and row["layer"] != "recurrent" else "")


def plot(df, out):
    import matplotlib.pyplot as plt

    good = ok(df)
    if good.empty:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key, sub in good.groupby(["layer", "param", "causal"], sort=False):
        sub = sub.sort_values("n")
        line, = ax.loglog(sub["n"], sub["measured"], "o", ms=5, label=label(sub.iloc[0]) + " measured")
        ax.loglog(sub["n"], sub["theory"], "-", color=line.get_color(), lw=1, alpha=0.7)
    ax.set(xlabel="sequence length n (positions)", ylabel="maximum path length (layer applications)",
           title="Maximum path length: measured (dots) and closed form (lines)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper left")
    savefig(fig, out, "path_length")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
