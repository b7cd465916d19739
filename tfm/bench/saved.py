"""Saved pytest-benchmark runs (``make bench`` -> ``.benchmarks/``) as tidy tables.

Every benchmark group of ``tests/benchmarks`` holds one operation at one size: tfm's
variants and their PyTorch peer. ``peer_table`` sets each tfm row beside the group's PyTorch
row (median time ratio, GFLOP/s from the FLOPs the suite attaches in ``extra_info``), so the
results report can show the regression suite's own side-by-side numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def newest_run(root: Path | str = ".benchmarks") -> Path | None:
    """The most recently written saved run under ``root`` (pytest-benchmark's storage), or None."""
    runs = sorted(Path(root).glob("*/*.json"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def _is_peer(bench: dict) -> bool:
    """PyTorch's side of a group: a test_torch_* benchmark or an impl parameter naming torch."""
    impl = str((bench.get("params") or {}).get("impl", ""))
    return bench["name"].startswith("test_torch") or impl.startswith("torch")


def load_run(path: Path | str) -> pd.DataFrame:
    """One row per timed benchmark of a saved run (disabled or skipped ones are not saved)."""
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}) or {}
    commit = data.get("commit_info", {}) or {}
    rows = []
    for b in data.get("benchmarks", []):
        stats, extra = b["stats"], b.get("extra_info", {}) or {}
        rows.append({
            "group": b.get("group") or b["name"],
            "name": b["name"].split("[")[0],
            "param": b.get("param") or "",
            "side": "torch" if _is_peer(b) else "tfm",
            "median_s": stats["median"],
            "min_s": stats["min"],
            "iqr_s": stats["iqr"],
            "rounds": stats["rounds"],
            "flops": extra.get("flops", np.nan),
            "threads": extra.get("threads", np.nan),
            "run": Path(path).name,
            "run_date": data.get("datetime", ""),
            "cpu_model": cpu.get("brand_raw", machine.get("processor", "")),
            "node": machine.get("node", ""),
            "git_commit": (commit.get("id", "") or "")[:12] + ("+dirty" if commit.get("dirty") else ""),
        })
    return pd.DataFrame(rows)


def peer_table(run: pd.DataFrame) -> pd.DataFrame:
    """Each tfm benchmark beside its group's PyTorch peer: ratio = tfm median / torch median.

    Groups without a PyTorch row (e.g. cached generation) keep NaN in the peer columns.
    """
    if run.empty:
        return run
    out = []
    for group, g in run.groupby("group", sort=True):
        peers = g[g.side == "torch"]
        peer = peers.iloc[0] if len(peers) == 1 else None
        for _, r in g[g.side == "tfm"].iterrows():
            torch_s = peer.median_s if peer is not None else np.nan
            out.append({
                "group": group,
                "tfm_case": f"{r['name']}[{r['param']}]" if r["param"] else r["name"],
                "tfm_median_s": r.median_s,
                "tfm_iqr_s": r.iqr_s,
                "torch_case": (f"{peer['name']}[{peer['param']}]" if peer is not None else ""),
                "torch_median_s": torch_s,
                "ratio": r.median_s / torch_s if peer is not None else np.nan,
                "tfm_gflops": r.flops / r.median_s / 1e9,
                "torch_gflops": (peer.flops / torch_s / 1e9) if peer is not None else np.nan,
                "threads": r.threads,
                **{k: r[k] for k in ("run", "run_date", "cpu_model", "node", "git_commit")},
            })
    return pd.DataFrame(out)
