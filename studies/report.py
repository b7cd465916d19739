"""Write results/REPORT.md (and the README's generated blocks) from the saved tables.

The report only assembles: each study module writes its own section (``Report.section``),
its derived tables and its figures (``studies._common.finish``), for the host rows in
``tables/`` and the GPU run's rows in ``gpu/studies.csv``; ``studies.overview`` sets
Table 1 beside the measurement and writes the README's blocks. Every section names its
sources. ``python -m studies.report [--out results] [--readme README.md]`` rewrites it all
from saved tables; ``make studies`` runs it after measuring, and for the repository's own
results/ also rewrites the README blocks.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import pandas as pd

from . import STUDIES
from . import _common  # noqa: F401 - sets the Agg backend before matplotlib loads
from ._common import finish
from ._report import Report, md_table, prose

ROOT = Path(__file__).resolve().parents[1]
TABLE_CHANGES = prose("""
    Table changes since the Table 1 registry (tfm.table1): every `layer` value is a registry name
    (self_attention for attention_fused, recurrent for lstm, convolutional for conv, ...; tables
    measured before are read with `tfm.table1.LEGACY_NAMES`); the roofline's `kernel` takes the
    same names, with `causal` as its own column; peers rows add `h`, `d_out`, `ratio_paired` with
    `ratio_ci_low`/`ratio_ci_high`, `tfm_arithmetic`/`peer_arithmetic` and `torch_frac_*`; scaling
    rows add `device_bytes`, `device_alloc_bytes` and `memory_note`; new derived tables:
    `sequential_growth`, `throughput_tokens`, `roofline_bounds`, `peers_pairs`. The path-length
    study's windows are r = 16 and 32 (the registry's r and twice it).
""")
README_BLOCK = re.compile(r"(<!-- begin generated: (\w+) .*?-->\n)(.*?)(<!-- end generated: \2 -->)", re.S)


def _machine(rep) -> str:
    m = rep.machine
    s = "## Machine and run\n\n"
    if m:
        s += md_table(pd.DataFrame([{"key": k, "value": v} for k, v in m.items()]), "{:.4g}") + "\n"
        s += "Above: the machine as recorded by the newest run that measured anything (`tables/machine.json`).\n\n"
    prov = provenance(rep)
    if not prov.empty:
        s += ("Where the rows come from (each measuring run's fingerprint, with the 1-minute load average when it "
              "started; ok = rows with a measurement; rows reused from an earlier run keep its fingerprint; from the "
              "fingerprint columns of every table in `tables/`):\n\n" + md_table(prov, "{:.3g}") + "\n")
        # runs that only re-tried unavailable cases (no timing) do not make the numbers suspect
        loads = prov.loc[prov["ok"] > 0, "load_avg_1min"].dropna()
        load, cores = (float(loads.max()) if len(loads) else m.get("load_avg_1min")), m.get("cpu_logical_cores")
        if load is not None and cores and load > 0.5 * cores:
            s += (f"**Warning: the machine was busy when a measuring run started (1-minute load average up to {load} "
                  f"on {cores} logical cores).** Other processes competed for the cores, so times include their "
                  "interference (fits use each case's fastest repeat to limit it); parallel kernels suffer most, "
                  "since a thread that loses its core stalls the others at every synchronisation. Rerun on an idle "
                  "machine for numbers to cite.\n\n")
    s += ("Regenerate: `make studies` (default grid, into results/), `make studies-quick` (small grid), one study: "
          "`python -m studies.<name> --help` or `tfm study <name>`; this report alone: `python -m studies.report` "
          "or `tfm report`. Runs resume where they stopped; `--fresh` starts over.\n\n" + TABLE_CHANGES)
    return s


def provenance(rep) -> pd.DataFrame:
    """Per study and measuring run (rows carry the run's fingerprint): commit, tfm sources,
    start time and load. Rows are reused across ``make studies`` runs while tfm's sources
    are unchanged, so one report can combine several runs."""
    keys = ["git_commit", "tfm_source", "date_utc", "load_avg_1min"]
    rows = []
    for name in STUDIES:
        df = rep.table(name)
        if df is None or df.empty or not set(keys) <= set(df.columns):
            continue
        for vals, g in df.groupby(keys, dropna=False, sort=True):
            timed = int((g["status"] == "ok").sum()) if "status" in g.columns else len(g)
            rows.append({"study": name, "rows": len(g), "ok": timed, **dict(zip(keys, vals))})
    return pd.DataFrame(rows, columns=["study", "rows", "ok", *keys])


def _gpu(rep) -> str:
    g = rep.gpu
    s = "## The GPU run\n\n" + g.describe() + "\n\n"
    if g.machine:
        s += md_table(pd.DataFrame([{"key": k, "value": v} for k, v in g.machine.items()]), "{:.4g}") + "\n"
    for name in ("smoke", "correctness"):
        p = rep.out / "gpu" / f"{name}.csv"
        if p.exists():
            t = pd.read_csv(p)
            flag = next((c for c in ("passed", "status") if c in t.columns), None)
            counts = t[flag].astype(str).value_counts().to_dict() if flag else {}
            s += f"- `gpu/{name}.csv`: {len(t)} rows" + (f", {flag}: {counts}" if counts else "") + "\n"
    return s + ("\nEach study's section shows its GPU rows beside the CPU ones. _Sources:_ "
                + (", ".join(f"`gpu/{f}`" for f in g.files) if g.files else "none") + " (`make gpu-check`, "
                "`studies/gpu.py`).\n\n")


def _not_measured(rep) -> str:
    lines = []
    tables = [(f"`{name}`", rep.table(name)) for name in STUDIES]
    if rep.gpu.studies is not None:
        tables += [(f"`{name}` (GPU)", grp) for name, grp in rep.gpu.studies.groupby("study", sort=False)]
    for name, df in tables:
        if df is None or "status" not in df.columns:
            continue
        bad = df[df["status"] != "ok"]
        for (status, reason), grp in bad.groupby(["status", bad["reason"].fillna("").astype(str).str.slice(0, 140)]):
            lines.append(f"- {name}: {len(grp)} {status} row(s): {reason}")
    return ("## Cases not measured\n\nRows recorded with NaN and a reason (unavailable backend or kernel, out of "
            "memory, over the time budget), from the `status` and `reason` columns of every table:\n\n"
            + ("\n".join(lines) + "\n\n" if lines else "Every case of every study was measured.\n\n"))


def update_readme(path: Path, blocks: dict[str, str]) -> None:
    """Replace each ``<!-- begin generated: NAME ... -->`` block of the README with ``blocks[NAME]``."""
    text = path.read_text()
    found = {m.group(2) for m in README_BLOCK.finditer(text)}
    missing = set(blocks) - found
    if missing:
        raise ValueError(f"{path}: no generated block markers for {sorted(missing)} "
                         "(<!-- begin generated: NAME ... --> ... <!-- end generated: NAME -->)")
    path.write_text(README_BLOCK.sub(lambda m: m.group(1) + blocks.get(m.group(2), m.group(3)) + m.group(4), text))


def readme_block_text(path: Path) -> dict[str, str]:
    """The README's current generated blocks, by name."""
    return {m.group(2): m.group(3) for m in README_BLOCK.finditer(path.read_text())}


def write_report(out: Path | str = "results", run_seconds: float | None = None, readme: Path | None = None,
                 draw: bool = True) -> Path:
    """REPORT.md from the saved tables (drawing every study's figures and derived tables first
    when ``draw``), and the README's blocks when ``readme`` is given."""
    from tfm.bench import write_atomic
    from tfm.bench.study import table_path

    from . import benchmarks, overview

    rep = Report(out)
    modules = [importlib.import_module(f"studies.{name}") for name in STUDIES]
    if draw:
        for mod in modules:
            finish(mod, rep.table(mod.NAME), rep.out)
            gpu_rows, _ = rep.gpu.rows(mod.NAME)
            if gpu_rows is not None:
                finish(mod, gpu_rows, rep.out, suffix="_gpu")
    write_atomic(overview.table1(rep), table_path(rep.out, "table1"))
    parts = ["# tfm: measuring Table 1 and section 4 of \"Attention Is All You Need\"\n\n",
             "_Generated by `studies/report.py` from the tables in `tables/` and `gpu/`; do not edit by hand._\n\n",
             _machine(rep)]
    if run_seconds is not None:
        parts.append(f"The `make studies` that wrote this report took {run_seconds / 60:.1f} minutes.\n\n")
    parts.append(f"## {overview.TITLE}\n\n" + overview.section(rep))
    parts += [f"## {i}. {mod.TITLE}\n\n{rep.section(mod)}" for i, mod in enumerate(modules, 1)]
    parts += [f"## {benchmarks.TITLE}\n\n" + benchmarks.section(rep), _gpu(rep), _not_measured(rep)]
    path = rep.out / "REPORT.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("".join(parts))
    tmp.replace(path)
    if readme is not None:
        update_readme(Path(readme), overview.readme_blocks(rep))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.report", description="Write REPORT.md from saved tables")
    p.add_argument("--out", default="results")
    p.add_argument("--readme", default=None, help="also rewrite this README's generated blocks (default: the "
                                                  "repository's README.md when --out is its results/)")
    args = p.parse_args(argv)
    print(write_report(args.out, readme=args.readme or default_readme(args.out)))
    return 0


def default_readme(out) -> Path | None:
    """The repository's README.md when ``out`` is the repository's own results/, else None."""
    return ROOT / "README.md" if Path(out).resolve() == ROOT / "results" else None


if __name__ == "__main__":
    sys.exit(main())
