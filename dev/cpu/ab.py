"""The CPU kernels of the working tree against the same kernels at a git revision, side by side.

    python -m dev.cpu.ab --rev REV [--new NEW] [--only recurrent,attention,norm,conv,restricted]
                         [--out DIR]

For a change that must not alter what the kernels compute nor slow them down (a refactor):
``tfm/backends/cpu/*.py`` as of REV is loaded next to the working tree's, or next to NEW's
(each revision as the package ``tfm.backends._cpu_at_<hash>``), every workload below runs on
both in one process, interleaved, and

- the outputs must be bitwise identical (the run fails otherwise);
- the time ratio new / REV per round, median with its bootstrap 95% interval, goes to
  DIR/ab.csv (default dev/cpu/results).

Not part of ``run_all``: it answers "did this change cost anything", for one change.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

from . import ROOT
from .common import compare, interleave, print_rows, write_csv

_KERNELS = "tfm/backends/cpu"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def load_revision(rev: str) -> tuple[str, dict]:
    """The cpu kernel modules as of ``rev``: (short hash, {module name: module})."""
    sha = _git("rev-parse", "--short=12", rev).strip()
    # A stable directory per revision: Numba's cache of these copies stays valid between runs.
    where = Path(os.environ["NUMBA_CACHE_DIR"]) / f"ab-{sha}" / "cpu"
    where.mkdir(parents=True, exist_ok=True)
    names = [Path(p).name for p in _git("ls-tree", "--name-only", f"{sha}:{_KERNELS}").split()
             if p.endswith(".py")]
    for name in names:
        target = where / name
        if not target.exists():
            target.write_text(_git("show", f"{sha}:{_KERNELS}/{name}"))
    package = f"tfm.backends._cpu_at_{sha}"
    pkg = types.ModuleType(package)  # its __init__ (the backend class) is not needed
    pkg.__path__ = [str(where)]
    sys.modules[package] = pkg
    modules = {n[:-3]: importlib.import_module(f"{package}.{n[:-3]}") for n in names
               if n != "__init__.py"}
    return sha, modules


def _recurrent(rng):
    """(label, run(modules) -> outputs) per case: each schedule, kind and dtype."""
    def case(kind, batch, hidden, n=64, dtype=np.float32, d_in=512):
        g = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[kind] * hidden
        x = rng.standard_normal((batch, n, d_in)).astype(dtype)
        h0, c0 = (rng.standard_normal((batch, hidden)).astype(dtype) for _ in range(2))
        w = [rng.uniform(-hidden ** -0.5, hidden ** -0.5, s).astype(dtype)
             for s in ((g, d_in), (g, hidden), (g,), (g,))]

        def run(m):
            rec = m["recurrent"]
            if kind == "lstm":
                return rec.lstm_layer(x, h0, c0, *w)
            if kind == "gru":
                return rec.gru_layer(x, h0, *w)
            return rec.rnn_layer(x, h0, *w, kind[4:])

        return f"{kind} B={batch} H={hidden} n={n} {np.dtype(dtype).name}", run

    return [case("lstm", 8, 512), case("lstm", 16, 512), case("gru", 8, 512), case("gru", 16, 512),
            case("rnn_tanh", 8, 1024), case("rnn_relu", 16, 512), case("rnn_tanh", 8, 512),
            case("lstm", 3, 70, n=37, dtype=np.float64, d_in=13)]


def _attention(rng):
    def case(n, causal, impl):
        q, k, v = (rng.standard_normal((1, 8, n, 64)).astype(np.float32) for _ in range(3))
        return (f"attention {impl} n={n}{' causal' if causal else ''}",
                lambda m: m["attention"].attention(q, k, v, causal=causal, impl=impl))

    return [case(1024, False, "fused"), case(1024, True, "fused"), case(512, False, "naive")]


def _norm(rng):
    x = rng.standard_normal((4096, 1024)).astype(np.float32)
    y, r = (rng.standard_normal((1024, 512)).astype(np.float32) for _ in range(2))
    g, b = (rng.standard_normal(512).astype(np.float32) for _ in range(2))
    return [("softmax (4096, 1024)", lambda m: m["norm"].softmax(x)),
            ("log_softmax (4096, 1024)", lambda m: m["norm"].log_softmax(x)),
            ("layer_norm(x + r) (1024, 512)", lambda m: m["norm"].layer_norm(y, g, b, 1e-5, r))]


def _conv(rng):
    x = rng.standard_normal((8, 512, 2048)).astype(np.float32)
    return [("glu (8, 512, 2048)", lambda m: m["conv"].glu(x))]


def _restricted(rng):
    q, k, v = (rng.standard_normal((1, 8, 2048, 64)).astype(np.float32) for _ in range(3))
    return [("restricted window 64 n=2048",
             lambda m: m["restricted"].restricted_attention(q, k, v, 64, False))]


WORKLOADS = {"recurrent": _recurrent, "attention": _attention, "norm": _norm, "conv": _conv,
             "restricted": _restricted}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--rev", required=True, help="the git revision to compare with (e.g. HEAD~2)")
    p.add_argument("--new", default=None, help="a git revision in place of the working tree")
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated kernel families")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per workload")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    sha, old = load_revision(args.rev)
    if args.new is None:
        new_label = "working tree"
        new = {name: importlib.import_module(f"tfm.backends.cpu.{name}") for name in old}
    else:
        new_sha, new = load_revision(args.new)
        new_label = f"at {new_sha}"
    rng = np.random.default_rng(0)
    rows = []
    for family in args.only.split(","):
        for label, run in WORKLOADS[family](rng):
            a, b = _as_tuple(run(new)), _as_tuple(run(old))
            same = len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
            print(f"{label}: outputs {'identical' if same else 'DIFFER'}")
            times = interleave({new_label: lambda: run(new), f"at {sha}": lambda: run(old)},
                               budget_s=args.budget, min_rounds=7)
            got = compare(family, label, times, f"at {sha}",
                          {name: {"identical": same} for name in times})
            print_rows(got[:1])
            rows += got
            if not same:
                write_csv(Path(args.out) / "ab.csv", rows)
                raise SystemExit(f"{label}: the outputs differ from {sha}'s")
    write_csv(Path(args.out) / "ab.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
