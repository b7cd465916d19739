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

from tfm.table1 import K, R, ROWS, max_path_length

from ._common import grid_name, make_study, ok, parser, run_main

NAME = "path_length"
TITLE = "Maximum path length"
D = 4  # channels: dependence needs only a few
GRIDS = {"default": (16, 64, 256, 1024), "quick": (16, 64, 256), "smoke": (16, 37)}
CASES = {  # Table 1 row -> (its path parameter's values, causal options)
    "self_attention": ((0,), (False, True)),
    "recurrent": ((0,), (True,)),
    "convolutional": ((K, 5), (False, True)),
    "convolutional_dilated": ((2, K), (True,)),
    "self_attention_restricted": ((R, 2 * R), (False, True)),
}
# The case each Table 1 row is quoted with: the registry's k and r; the recurrent and dilated
# layers causal (as they are used), the others not.
QUOTED = {"self_attention": (0, False), "recurrent": (0, True), "convolutional": (K, False),
          "convolutional_dilated": (K, True), "self_attention_restricted": (R, False)}


def arg_parser():
    p = parser(NAME, __doc__, GRIDS)
    p.add_argument("--n", default=None, help="comma-separated sequence lengths (overrides the grid)")
    return p


def cases(ns) -> list[dict]:
    return [{"layer": row, "n": n, "param_name": ROWS[row].path_param, "param": v, "causal": c}
            for row, (values, causal) in CASES.items() for v in values for c in causal for n in ns]


def measure(case: dict, ctx) -> dict:
    from tfm.bench import Skip, deps

    layer, n, p, causal = case["layer"], case["n"], case["param"], case["causal"]
    backend = ctx.options["backend"]
    th, formula = max_path_length(layer, n, p, causal)
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
        m = max(1, max_path_length(layer, n, p, causal)[0])
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
    ns = [int(x) for x in args.n.split(",")] if args.n else GRIDS[grid_name(args)]
    return make_study(sys.modules[__name__], cases(ns), measure, args, max_call_s=60.0)


def label(row) -> str:
    s = row["layer"] + (f" {row['param_name']}={row['param']}" if row["param_name"] else "")
    return s + (" (causal)" if row["causal"] and row["layer"] != "recurrent" else "")


def quoted(df, row: str):
    """The largest-n measurement of the case a Table 1 row is quoted with (QUOTED), or None."""
    good = ok(df)
    if good.empty:
        return None
    p, causal = QUOTED[row]
    sub = good[(good["layer"] == row) & (good["param"] == p) & (good["causal"] == causal)]
    return sub.sort_values("n").iloc[-1] if not sub.empty else None


# ----------------------------------------------------------------------------- figures
def plot_paths(df, on: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for _, sub in df.groupby(["layer", "param", "causal"], sort=False):
        sub = sub.sort_values("n")
        line, = ax.loglog(sub["n"], sub["measured"], "o", ms=5, label=label(sub.iloc[0]) + " measured")
        ax.loglog(sub["n"], sub["theory"], "-", color=line.get_color(), lw=1, alpha=0.7)
    ax.set(xlabel="sequence length n (positions)", ylabel="maximum path length (layer applications)",
           title=f"Maximum path length: measured (dots) and closed form (lines)\n({on})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper left")
    return fig


FIGURES = {"path_length": plot_paths}


# ----------------------------------------------------------------------------- report
def section(rep) -> str:
    from ._report import md_table

    good = rep.rows(NAME)
    s = rep.figure("path_length", "path length against n")
    s += ("One-hop dependencies are measured by perturbing each input position of the real kernel (float64) and "
          "recording which outputs move by more than 1e-9 of the output's scale; the graph of a stack of such "
          "layers (for dilated convolutions dilations 1, k, k^2, ... cycling; for the recurrent layer the unrolled "
          "cell steps) is searched breadth-first; the path length is the maximum over all (input i, output j) pairs, "
          "i <= j for causal layers, of the fewest layer applications linking them. **Agreement:** a measured length "
          "agrees when it equals its closed form (`tfm.table1.max_path_length`; the formula column).\n\n")
    if good.empty:
        return s + "Not measured.\n\n" + rep.sources(sys.modules[__name__])
    eq = good["measured"] == good["theory"]
    s += f"**{int(eq.sum())} of {len(good)} measured path lengths equal their closed form.**\n\n"
    cols = ["layer", "n", "param_name", "param", "causal", "measured", "theory", "formula"]
    good = good.assign(param_name=good["param_name"].fillna(""))
    top = good[good["n"] == good["n"].max()][cols].astype({"measured": int, "theory": int})
    s += f"At the largest n ({int(good['n'].max())}); every n is in tables/path_length.csv:\n\n" + md_table(top) + "\n"
    if not eq.all():
        s += "Rows that differ from the closed form:\n\n" + md_table(good[~eq][cols]) + "\n"
    s += ("The path length is a property of the layer's dependency structure, not of the hardware: the GPU run "
          "does not repeat this study.\n\n")
    return s + rep.sources(sys.modules[__name__])


def readme(rep) -> list[str]:
    good = rep.rows(NAME)
    if good.empty:
        return []
    eq = int((good["measured"] == good["theory"]).sum())
    verdict = "all" if eq == len(good) else f"{eq} of"
    quotes = []
    for row in CASES:
        q = quoted(good, row)
        if q is not None:
            pname = f" ({q['param_name']}={int(q['param'])})" if isinstance(q["param_name"], str) and q["param_name"] else ""
            formula = q["formula"].split(" (")[0]
            value = str(int(q["measured"])) if formula == str(int(q["measured"])) else f"{formula} = {int(q['measured'])}"
            quotes.append(f"{ROWS[row].label}{pname} {value}")
    return [f"- **Path length:** {verdict} {len(good)} path lengths, measured by perturbing the real kernels, equal "
            f"their closed forms (n = {int(good['n'].min())}..{int(good['n'].max())}). At n = {int(good['n'].max())}: "
            + "; ".join(quotes) + "."]


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
