"""The regression suite's side-by-side table: a saved pytest-benchmark run -> results/tables/benchmarks.csv.

``make bench`` times ``tests/benchmarks`` (pytest-benchmark saves the run under
``.benchmarks/``) and then runs this script on the newest saved run; the results report
includes the table when it exists. Each row is one tfm benchmark beside its group's PyTorch
peer (same thread count, same inputs): ratio = tfm median / PyTorch median.

    python -m studies.benchmarks [--run .benchmarks/<machine>/<NNNN>_<name>.json] [--out results]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

TITLE = "The regression suite (pytest-benchmark): tfm against PyTorch"


def main(argv=None) -> int:
    from tfm.bench import write_atomic
    from tfm.bench.saved import load_run, newest_run, peer_table
    from tfm.bench.study import table_path

    p = argparse.ArgumentParser(prog="python -m studies.benchmarks", description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", default=None, help="a saved run's JSON (default: the newest under .benchmarks/)")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    args = p.parse_args(argv)
    run = Path(args.run) if args.run else newest_run()
    if run is None or not run.exists():
        print("no saved pytest-benchmark run: run `make bench` first", file=sys.stderr)
        return 1
    table = peer_table(load_run(run))
    if table.empty:
        print(f"{run}: no timed benchmarks in this run (saved with --benchmark-disable?)", file=sys.stderr)
        return 1
    path = table_path(args.out, "benchmarks")
    write_atomic(table, path)
    paired = table.dropna(subset=["ratio"])
    print(f"{run} -> {path}: {len(table)} tfm benchmarks, {len(paired)} with a PyTorch peer, "
          f"tfm faster in {int((paired.ratio < 1).sum())}")
    return 0


def section(rep) -> str:
    """The report's section: the saved run's tfm-vs-PyTorch table (``make bench`` writes it)."""
    import numpy as np

    from ._report import md_table

    df = rep.table("benchmarks")
    sources = "_Sources:_ `tables/benchmarks.csv` (`tfm.bench.saved.peer_table`, `python -m studies.benchmarks`).\n\n"
    if df is None or df.empty:
        return ("No saved benchmark run summarised yet: `make bench` times `tests/benchmarks` and writes "
                "`tables/benchmarks.csv`, which this section then shows.\n\n" + sources)
    first = df.iloc[0]
    s = (f"From the saved run `{first['run']}` ({first['run_date']}, {first['cpu_model']}, commit "
         f"{first['git_commit']}), timed by pytest-benchmark one benchmark after another (not interleaved, unlike "
         "the peers study), with PyTorch on the same thread count. ratio = tfm median / PyTorch median (below 1: "
         "tfm faster). Use it to catch regressions in tfm's own times; read tfm-vs-PyTorch ratios from the "
         "interleaved peers study, since on a shared machine whose speed drifts between minutes these sequential "
         "ratios move with the drift.\n\n")
    t = df[["group", "tfm_case", "tfm_median_s", "torch_median_s", "ratio", "tfm_gflops", "torch_gflops"]]
    s += md_table(t) + "\n"
    paired = t.dropna(subset=["ratio"])
    if not paired.empty:
        s += (f"tfm is faster in {int((paired['ratio'] < 1).sum())} of {len(paired)} paired benchmarks; "
              f"geometric-mean ratio {math.exp(np.log(paired['ratio']).mean()):.2f}.\n\n")
    return s + sources


def families(df):
    """The paired benchmarks grouped by what they time (sizes dropped from the group name;
    attention split by kernel), with the range of their tfm/PyTorch ratios."""
    import re

    import pandas as pd

    paired = df.dropna(subset=["ratio"])
    if paired.empty:
        return pd.DataFrame(columns=["family", "benchmarks", "ratio_min", "ratio_max"])
    impl = paired["tfm_case"].str.extract(r"\[(fused|naive)", expand=False).fillna("")
    fam = [(re.sub(r"[-\s]*(?:n=|d|n|tokens=|dil|r)\d+", "", g) + (f" ({i})" if i else "")).strip()
           for g, i in zip(paired["group"], impl)]
    out = paired.assign(family=fam).groupby("family", sort=True)["ratio"].agg(["size", "min", "max"]).reset_index()
    return out.rename(columns={"size": "benchmarks", "min": "ratio_min", "max": "ratio_max"})


def readme(rep) -> str:
    """The README's lines on the regression suite: tfm/PyTorch ratio ranges per family."""
    df = rep.table("benchmarks")
    if df is None or df.empty:
        return ""
    f = families(df)
    first = df.iloc[0]
    return (f"The pytest-benchmark suite (`make bench`; `results/tables/benchmarks.csv`, run `{first['run']}` at "
            f"commit {first['git_commit']}) times the same kinds of pairs over more sizes, one benchmark after "
            "another; tfm time / PyTorch time per family: "
            + "; ".join(f"{r['family']} {r['ratio_min']:.2f}–{r['ratio_max']:.2f} ({int(r['benchmarks'])})"
                        for _, r in f.iterrows()) + ".\n")


if __name__ == "__main__":
    sys.exit(main())
