"""The ``tfm`` command: run the studies, write the report, describe the machine.

    tfm studies [--quick] [--only a,b] [--out DIR] [--fresh]   every study, then REPORT.md
    tfm study <name> [options]                                  one study (tfm study <name> --help)
    tfm report [--out DIR]                                      REPORT.md from saved tables
    tfm info [--ceilings]                                       backends available, machine fingerprint

The studies live in the repository's ``studies/`` package, so ``studies``, ``study`` and
``report`` run from a checkout (the repository root on ``sys.path``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

def _studies(module: str = ""):
    name = "studies" + (f".{module}" if module else "")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in ("studies", name):
            raise
        root = Path(__file__).resolve().parents[1]
        if (root / "studies").is_dir() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            return importlib.import_module(name)
        raise SystemExit("tfm: the studies/ package was not found; run from a checkout of the tfm repository") from None


def info(ceilings: bool) -> int:
    from . import BACKENDS, BackendUnavailable, get_backend
    from .bench import fingerprint, measure_ceilings

    print("backends:")
    for name in BACKENDS:
        try:
            get_backend(name)
            print(f"  {name}: available")
        except (BackendUnavailable, ImportError) as exc:
            print(f"  {name}: unavailable ({exc})")
    fp = fingerprint()
    if ceilings:
        fp = {**fp, **measure_ceilings(quick=True)}
    print(json.dumps(fp, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="tfm", description="tfm: Transformer kernels, benchmarks and complexity studies")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("studies", help="run every study and write the report", add_help=False)
    st = sub.add_parser("study", help="run one study", add_help=False)
    st.add_argument("name", nargs="?")
    sub.add_parser("report", help="write REPORT.md from saved tables", add_help=False)
    inf = sub.add_parser("info", help="available backends and the machine fingerprint")
    inf.add_argument("--ceilings", action="store_true", help="also measure sgemm GFLOP/s and memory bandwidth")
    args, rest = p.parse_known_args(argv)
    if args.command == "info":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return info(args.ceilings)
    if args.command == "studies":
        return _studies("run_all").main(rest)
    if args.command == "report":
        return _studies("report").main(rest)
    names = _studies().STUDIES
    if args.name in (None, "-h", "--help"):
        print(f"usage: tfm study <name> [options]; names: {', '.join(names)}")
        return 0 if args.name else 2
    if args.name not in names:
        p.error(f"unknown study {args.name!r}; choose one of {', '.join(names)}")
    return _studies(args.name).main(rest)


if __name__ == "__main__":
    sys.exit(main())
