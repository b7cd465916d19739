"""Shared command line, plotting and grid helpers for the study scripts."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _source_hash() -> str:
    """``tfm._source.source_hash()``, loaded by path: importing tfm would import Numba before
    NUMBA_CACHE_DIR is set."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tfm" / "_source.py"
    spec = importlib.util.spec_from_file_location("_tfm_source", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash()


os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".venv" / "numba-cache" / _source_hash()))
os.environ.setdefault("MPLBACKEND", "Agg")
import tfm  # noqa: E402,F401  (sets OMP_WAIT_POLICY=PASSIVE unless set; see tfm/__init__.py)
from tfm.backends import BACKENDS  # noqa: E402

# PyTorch (CPU wheel) and Numba's "omp" threading layer share the system libgomp. If a Numba
# parallel kernel initialises it before torch is imported, PyTorch's kernels run slower (SDPA,
# B=1, H=8, n=4096, d=64: 1.94x its time alone; python -m dev.cpu.omp_order), which
# would flatter tfm in every side-by-side table. So torch, when installed, is loaded right
# after tfm (whose import sets the wait policy libgomp reads when torch loads it), before any kernel.
try:
    import torch  # noqa: F401
except ImportError:  # the peer columns then record PyTorch as unavailable
    pass

# Under Numba's CUDA simulator every simulated thread is a Python thread; switching between
# them more often than the default 5 ms makes barrier-heavy kernels several times faster.
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")
if SIMULATOR:
    sys.setswitchinterval(5e-4)

# Fits and plots use each case's fastest repeat: on a shared machine other processes only ever
# add time, so the minimum is the least disturbed estimate (tables keep the median and IQR too).
TIME = "min_s"


def parser(name: str, doc: str, grids) -> argparse.ArgumentParser:
    """The options every study takes; ``grids`` names its parameter grids (``--grid``)."""
    p = argparse.ArgumentParser(prog=f"python -m studies.{name}", description=doc.strip().splitlines()[0])
    p.add_argument("--grid", choices=tuple(grids), default=None,
                   help="parameter grid (default: quick with --quick, else default)")
    p.add_argument("--out", default="results", help="output directory (tables/, figures/); default results/")
    p.add_argument("--quick", action="store_true", help="a small grid (minutes)")
    p.add_argument("--fresh", action="store_true", help="discard saved rows and measure everything again")
    p.add_argument("--backend", default="cpu", choices=BACKENDS, help="tfm backend to measure (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def grid_name(args) -> str:
    """The grid a study runs: ``--grid``, else quick with ``--quick``, else default."""
    return args.grid or ("quick" if args.quick else "default")


def make_study(module, cases: list[dict], measure, args, *, max_call_s: float = 3.0, budget_s: float = 0.4, **kw):
    """The module's :class:`tfm.bench.Study`, with the backend and grid as run-wide options.

    Under Numba's CUDA simulator (``--backend cuda`` with NUMBA_ENABLE_CUDASIM=1) times mean
    nothing and a kernel launch takes a tenth of a second or more, so each case makes one
    timed call (``single_call``) and none is skipped as over the time budget: the run checks
    that the study works, not how fast.
    """
    from tfm.bench import Study

    options = {"backend": args.backend, "grid": grid_name(args)}
    if SIMULATOR and args.backend == "cuda":
        kw.update(single_call=True)
        budget_s, max_call_s = 0.0, float("inf")
    return Study(module.NAME, module.TITLE, cases, measure, max_call_s=max_call_s, budget_s=budget_s,
                 options=options, **kw)


def pow2(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


def ok(df):
    """The rows with a measurement (status ok); an empty frame for None or a table without status."""
    import pandas as pd

    if df is None:
        return pd.DataFrame()
    return df[df["status"] == "ok"] if "status" in df.columns else df.iloc[0:0]


def where(df) -> str:
    """What the rows ran on, for figure titles: the GPU's name, or the CPU with its threads."""
    if df is None or df.empty:
        return ""
    r = df.iloc[0]
    if "cuda" in str(r.get("backend", "")):
        return f"GPU: {r.get('device_name', 'unknown')}"
    return f"CPU: {r.get('cpu_model', 'unknown')}, {r.get('numba_threads', '?')} threads"


def savefig(fig, out: Path | str, name: str) -> list[Path]:
    """Save ``fig`` as PNG and SVG under <out>/figures/; return the paths."""
    import matplotlib.pyplot as plt

    d = Path(out) / "figures"
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"{name}.png", d / f"{name}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return paths


def finish(module, df, out: Path | str, suffix: str = "") -> list[str]:
    """A study's derived tables (``module.DERIVED``, written to tables/ for the host rows) and
    figures (``module.FIGURES``, saved as <name><suffix>); returns the figure names drawn."""
    from tfm.bench import write_atomic
    from tfm.bench.study import table_path

    good = ok(df)
    if not suffix:
        for name, derive in getattr(module, "DERIVED", {}).items():
            write_atomic(derive(good), table_path(out, name))
    drawn = []
    if good.empty:
        return drawn
    for name, plot in module.FIGURES.items():
        fig = plot(good, where(good))
        if fig is not None:
            savefig(fig, out, name + suffix)
            drawn.append(name + suffix)
    return drawn


def run_main(module, argv=None) -> int:
    """``python -m studies.<name>``: build the study from the options, run it, derive and plot."""
    from tfm.bench import run_study

    args = module.arg_parser().parse_args(argv)
    study = module.build(args)
    df = run_study(study, args.out, quick=args.quick, fresh=args.fresh, progress=not args.no_progress)
    if args.backend == "cuda":  # device rows are drawn beside the host ones by the report step
        finish(module, df, args.out, suffix="_gpu")
    else:
        finish(module, df, args.out)
    counts = df["status"].value_counts().to_dict() if "status" in df.columns else {}
    print(f"{study.name}: {len(df)} rows {counts} -> {Path(args.out) / 'tables' / (study.name + '.csv')}")
    return 0
