"""The regression suite's side-by-side table: a saved pytest-benchmark run -> results/tables/benchmarks.csv.

``make bench`` times ``tests/benchmarks`` (pytest-benchmark saves the run under
``.benchmarks/``) and then runs this script on the newest saved run; the results report
includes the table when it exists. Each row is one tfm benchmark beside its group's PyTorch
peer (same thread count, same inputs): ratio = tfm median / PyTorch median.

    python -m studies.benchmarks [--run .benchmarks/<machine>/<NNNN>_<name>.json] [--out results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


if __name__ == "__main__":
    sys.exit(main())
