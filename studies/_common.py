"""Shared command line, plotting and grid helpers for the study scripts."""

from __future__ import annotations

import argparse
import os
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

# PyTorch (CPU wheel) and Numba's "omp" threading layer share the system libgomp. If a Numba
# parallel kernel initialises it before torch is imported, PyTorch's kernels run ~3x slower
# (SDPA, B=1, H=8, n=4096, d=64: 154 ms -> 454-498 ms; tfm's kernels are unaffected), which
# would flatter tfm in every side-by-side table. So torch, when installed, is loaded right
# after tfm (whose import sets the wait policy libgomp reads when torch loads it), before any kernel.
try:
    import torch  # noqa: F401
except ImportError:  # the peer columns then record PyTorch as unavailable
    pass

# Fits and plots use each case's fastest repeat: on a shared machine other processes only ever
# add time, so the minimum is the least disturbed estimate (tables keep the median and IQR too).
TIME = "min_s"

LAYER_LABELS = {
    "attention_naive": "self-attention (naive)",
    "attention_fused": "self-attention (fused)",
    "attention_layer": "self-attention layer (+ projections)",
    "rnn": "recurrent (RNN)",
    "lstm": "recurrent (LSTM)",
    "gru": "recurrent (GRU)",
    "conv": "convolutional (k=3)",
    "conv_dilated": "convolutional (k=3, dilation 4)",
    "restricted": "restricted self-attention (r=16)",
    "ffn": "position-wise FFN",
}


def parser(name: str, doc: str, grids) -> argparse.ArgumentParser:
    """The options every study takes; ``grids`` names its parameter grids (``--grid``)."""
    p = argparse.ArgumentParser(prog=f"python -m studies.{name}", description=doc.strip().splitlines()[0])
    p.add_argument("--grid", choices=tuple(grids), default=None,
                   help="parameter grid (default: quick with --quick, else default)")
    p.add_argument("--out", default="results", help="output directory (tables/, figures/); default results/")
    p.add_argument("--quick", action="store_true", help="a small grid (minutes)")
    p.add_argument("--fresh", action="store_true", help="discard saved rows and measure everything again")
    p.add_argument("--backend", default="cpu", help="tfm backend to measure (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def grid_name(args) -> str:
    """The grid a study runs: ``--grid``, else quick with ``--quick``, else default."""
    return args.grid or ("quick" if args.quick else "default")


def pow2(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


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


def ok(df):
    return df[df["status"] == "ok"] if df is not None and "status" in df.columns else df.iloc[0:0]


def run_main(module, argv=None) -> int:
    """``python -m studies.<name>``: build the study from the options, run it, plot it."""
    from tfm.bench import run_study

    args = module.arg_parser().parse_args(argv)
    study = module.build(args)
    df = run_study(study, args.out, quick=args.quick, fresh=args.fresh, progress=not args.no_progress)
    module.plot(df, args.out)
    counts = df["status"].value_counts().to_dict() if "status" in df.columns else {}
    print(f"{study.name}: {len(df)} rows {counts} -> {Path(args.out) / 'tables' / (study.name + '.csv')}")
    return 0
