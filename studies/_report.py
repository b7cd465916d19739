"""What a study's report section reads: its tables, the GPU run's rows, figures, sources.

A study module writes its own section (``INTRO`` and ``results(rep, rows, suffix)``, or a
whole ``section(rep)``; ``Report.section`` calls them) from a :class:`Report`, which
hands it the saved host table (``rep.table(name)``), the GPU run's rows for the study
(``rep.gpu.rows(name)``: ``results/gpu/studies.csv`` filtered by its ``study`` column) and
the helpers below; every section ends with ``rep.sources(module)``, the line naming the
tables and the functions behind each of its figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tfm.table1 import canonical

from ._common import ok


def md_table(df: pd.DataFrame | None, floatfmt: str = "{:.3g}") -> str:
    if df is None or df.empty:
        return "_(no rows)_\n"

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "NaN" if not np.isfinite(v) else floatfmt.format(v)
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    return head + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def prose(text: str) -> str:
    """A paragraph written as an indented triple-quoted block, as one line and a blank line."""
    return " ".join(text.split()) + "\n\n"


def ci(lo, hi) -> str:
    """A 95% interval as [lo, hi], or n/a where it is undefined."""
    return f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "n/a"


def qualname(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Layer names of tables measured before the Table 1 registry, in its names
    (``tfm.table1.LEGACY_NAMES``; the roofline's ``<kernel>_causal`` as ``causal``)."""
    df = df.copy()
    if "kernel" in df.columns and "causal" not in df.columns:
        kernel = df["kernel"].astype(str)
        df["causal"] = kernel.str.endswith("_causal")
        df["kernel"] = kernel.str.removesuffix("_causal")
    for col in ("layer", "kernel", "recurrent"):
        if col in df.columns:
            df[col] = df[col].map(lambda v: canonical(v) if isinstance(v, str) else v)
    return df


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class GpuRun:
    """The committed GPU run (``make gpu-check``), as the report reads it: ``<out>/gpu/``.

    ``studies.csv`` holds every study's rows with a ``study`` column, ``machine.json`` the
    run's fingerprint and ceilings. A folder without ``studies.csv`` is an older run's format.
    """

    def __init__(self, folder: Path, host_machine: dict):
        self.folder = folder
        self.files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        self.machine = _read_json(folder / "machine.json")
        path = folder / "studies.csv"
        self.studies = normalise(pd.read_csv(path, low_memory=False)) if path.exists() else None
        self.host_reason = host_machine.get("device_reason") or ""

    def describe(self, prefix: str = "") -> str:
        """One sentence: which GPU run the GPU rows come from, or why there are none
        (``prefix``: the results folder as the reader's document sees it)."""
        g = f"{prefix}gpu/"
        if self.studies is not None:
            m = self.machine
            return (f"GPU rows from the `make gpu-check` run of {m.get('date_utc', 'an unrecorded date')} on "
                    f"{m.get('device_name', 'an unrecorded device')} (commit {m.get('git_commit', 'unrecorded')}; "
                    f"`{g}machine.json`).")
        if self.files:
            return (f"`{g}` holds a GPU run in an older format (" + ", ".join(f"`{f}`" for f in self.files)
                    + f") without `studies.csv`, made before the studies ran on the GPU, so no study has GPU rows "
                    f"yet; `{g}SUMMARY.md` has that run's own numbers. The next `make gpu-check` writes them.")
        why = f" (this machine: {self.host_reason})" if self.host_reason else ""
        return ("No GPU run is committed: `results/gpu/` is empty" + why + ". On a machine with a CUDA GPU, "
                "`make gpu-check GPU_PYTHON=python3 GPU_OUT=<dir>` measures the studies there; its folder, "
                "committed as `results/gpu/`, fills these sections.")

    def rows(self, name: str) -> tuple[pd.DataFrame | None, str]:
        """(the study's measured GPU rows, "") or (None, the sentence saying why there are none)."""
        if self.studies is None:
            why = ("the committed GPU run is in an older format without `studies.csv`" if self.files else
                   "no GPU run is committed" + (f" ({self.host_reason})" if self.host_reason else ""))
            return None, f"No GPU rows: {why}; see *The GPU run* below."
        df = self.studies[self.studies["study"] == name]
        if df.empty:
            return None, f"No GPU rows: the GPU run has no rows for `{name}`."
        good = ok(df)
        if good.empty:
            reasons = "; ".join(sorted(set(df["reason"].fillna("").astype(str).str.slice(0, 160))))
            return None, f"No GPU rows: the GPU run's {len(df)} rows for `{name}` have no measurement: {reasons}."
        return good, ""


class Report:
    """The saved results under ``out`` as the sections read them."""

    def __init__(self, out: Path | str):
        self.out = Path(out)
        self.machine = _read_json(self.out / "tables" / "machine.json")
        self.gpu = GpuRun(self.out / "gpu", self.machine)

    def table(self, name: str) -> pd.DataFrame | None:
        p = self.out / "tables" / f"{name}.csv"
        return normalise(pd.read_csv(p)) if p.exists() else None

    def rows(self, name: str) -> pd.DataFrame:
        """The measured (status ok) rows of a study's host table; empty if none."""
        return ok(self.table(name))

    def figure(self, name: str, alt: str) -> str:
        if (self.out / "figures" / f"{name}.png").exists():
            return f"![{alt}](figures/{name}.png)\n\n"
        return f"_(figure {name} not drawn: no rows)_\n\n"

    def gpu_part(self, module, render) -> str:
        """``### On the GPU``: ``render(rows)`` for the study's GPU rows, or why there are none."""
        s = "### On the GPU\n\n"
        rows, why = self.gpu.rows(module.NAME)
        if rows is None:
            return s + why + "\n\n"
        return s + self.gpu.describe() + "\n\n" + render(rows)

    def section(self, module) -> str:
        """A study's section: its own ``section(rep)``, or else its ``INTRO`` (method, thresholds),
        then ``results(rep, rows, figure_suffix)`` for the host rows (``### On the CPU``) and for
        the GPU rows, then the sources line."""
        if hasattr(module, "section"):
            return module.section(self)
        good = self.rows(module.NAME)
        s = module.INTRO + "### On the CPU\n\n"
        s += module.results(self, good, "") if not good.empty else "Not measured.\n\n"
        return s + self.gpu_part(module, lambda rows: module.results(self, rows, "_gpu")) + self.sources(module)

    def sources(self, module) -> str:
        """The closing line of a section: every table and the function behind each figure."""
        name = module.NAME
        items = [f"rows `tables/{name}.csv` (`{qualname(module.measure)}`, `python -m studies.{name}`)"]
        items += [f"`tables/{t}.csv` (`{qualname(fn)}`)" for t, fn in getattr(module, "DERIVED", {}).items()]
        if self.gpu.studies is not None and "gpu" in module.GRIDS:
            items.append(f"GPU rows `gpu/studies.csv` where `study == \"{name}\"` (`make gpu-check`)")
        for fig, fn in module.FIGURES.items():
            for suffix in ("", "_gpu"):
                if (self.out / "figures" / f"{fig}{suffix}.png").exists():
                    items.append(f"`figures/{fig}{suffix}.png` (`{qualname(fn)}`)")
        return "_Sources:_ " + "; ".join(items) + ".\n\n"
