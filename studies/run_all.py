"""Run every study, then write the report: ``python -m studies.run_all [--quick] [--only a,b] [--out DIR] [--fresh]``.

``make studies`` runs the default grid (4-6 minutes on a 2-core machine, compiling included) into results/;
``make studies-quick`` a small grid in a few minutes. Each study resumes where it stopped
unless ``--fresh``; an interrupted run is continued by running the same command again.
For the repository's own results/ the report step also rewrites the README's generated blocks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from . import STUDIES
from . import _common  # noqa: F401 - sets NUMBA_CACHE_DIR, the Agg backend and OMP_WAIT_POLICY first


def arg_parser():
    p = argparse.ArgumentParser(prog="python -m studies.run_all", description="Run every study and write REPORT.md")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--quick", action="store_true", help="small grids (a few minutes)")
    p.add_argument("--fresh", action="store_true", help="discard saved rows and measure everything again")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STUDIES)}")
    p.add_argument("--backend", default="cpu", choices=_common.BACKENDS, help="tfm backend to measure (default cpu)")
    p.add_argument("--grid", choices=("default", "quick", "smoke"), default=None,
                   help="grid size for every study (smoke: seconds, for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="skip writing REPORT.md")
    return p


def main(argv=None) -> int:
    from tfm.bench import run_study

    from .report import default_readme, write_report

    args = arg_parser().parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    bad = set(only) - set(STUDIES)
    if bad:
        raise SystemExit(f"unknown studies {sorted(bad)}; choose from {', '.join(STUDIES)}")
    names = [s for s in STUDIES if not only or s in only]
    common = ["--out", args.out, "--backend", args.backend] + (["--quick"] if args.quick else []) \
        + (["--grid", args.grid] if args.grid else [])
    t_all = time.perf_counter()
    for i, name in enumerate(names, 1):
        mod = importlib.import_module(f"studies.{name}")
        study = mod.build(mod.arg_parser().parse_args(common))
        print(f"[{i}/{len(names)}] {name} ({study.title}): {len(study.cases)} cases", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        df = run_study(study, args.out, quick=args.quick or args.grid == "smoke", fresh=args.fresh,
                       progress=not args.no_progress)
        if args.no_report:  # else the report step derives and draws every study
            _common.finish(mod, df, args.out)
        counts = df["status"].value_counts().to_dict() if "status" in df.columns else {}
        print(f"[{i}/{len(names)}] {name}: {counts} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    if not args.no_report:
        path = write_report(args.out, run_seconds=total if not only else None, readme=default_readme(args.out))
        print(f"report: {path}", file=sys.stderr)
    print(f"studies done in {total / 60:.1f} min -> {Path(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
