"""Table 1 beside its measurement, and the README's results, from the studies' tables.

``table1(rep)`` sets each row of the paper's Table 1 (tfm.table1) beside what the studies
measured for it: the time exponents in n and d (scaling), the dependent steps counted on
the kernels (sequential) and the maximum path length (path_length), each through the
function of the study that owns it. ``readme_blocks(rep)`` writes the README's generated
blocks from the same tables; ``studies/report.py`` puts them between the README's markers
and a test checks that the committed README equals them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tfm.table1 import ROWS

from . import (benchmarks, crossover, gradient_signal, learning_distance, path_length, peers, scaling, sequential,
               table2, training_memory, training_scaling, training_throughput)
from ._report import md_table

TITLE = "Table 1: the paper beside the measurement"


def table1(rep) -> pd.DataFrame:
    """One row per Table 1 row: the paper's claims, then the measured exponents, counts and path length."""
    v = scaling.verdicts(scaling.fits(rep.table("scaling")))
    seq, path = rep.rows("sequential"), rep.rows("path_length")
    rows = []
    for r in ROWS.values():
        row = {"layer": r.name, "complexity": r.complexity, "sequential_ops": r.sequential_ops,
               "path_length": r.path_length}
        for sweep in ("n", "d"):
            f = v[(v["layer"] == r.name) & (v["in"] == sweep)] if not v.empty else v
            col = f"{sweep}_exponent"
            row[col] = f["time exponent"].iloc[0] if not f.empty else np.nan
            row[col + "_ci95"] = f["95% CI"].iloc[0] if not f.empty else "n/a"
            row[col + "_at"] = f"{f['at'].iloc[0]}, {sweep} {f['range'].iloc[0]}" if not f.empty else "not measured"
        c = seq[(seq["part"] == "count") & (seq["layer"] == r.name)] if "part" in seq.columns else seq.iloc[0:0]
        row["measured_sequential_ops"] = (f"{int(c.sort_values('n')['sequential_ops'].iloc[-1])} at "
                                          f"n={int(c['n'].max())}" if not c.empty else "not measured")
        q = path_length.quoted(path, r.name)
        if q is not None:
            p = f", {q['param_name']}={int(q['param'])}" if isinstance(q["param_name"], str) and q["param_name"] else ""
            row["measured_path_length"] = (f"{int(q['measured'])} at n={int(q['n'])}{p} (theory {int(q['theory'])})")
        else:
            row["measured_path_length"] = "not measured"
        rows.append(row)
    return pd.DataFrame(rows)


def section(rep) -> str:
    t1 = table1(rep)
    s = "Paper (Vaswani et al., 2017, Table 1; `tfm.table1.ROWS`):\n\n"
    s += md_table(t1[["layer", "complexity", "sequential_ops", "path_length"]]) + "\n"
    cols = ["layer", "n_exponent", "n_exponent_ci95", "n_exponent_at", "d_exponent", "d_exponent_ci95",
            "d_exponent_at", "measured_sequential_ops", "measured_path_length"]
    s += ("Measured: time exponents from section 1 (the fit quoted there for the row's layer), sequential operations "
          "from section 2 (at the largest n counted), path lengths from section 3 (with the registry's k and r; "
          "recurrent and dilated layers causal).\n\n" + md_table(t1[cols]) + "\n")
    return s + ("_Sources:_ `tables/table1.csv` (`studies.overview.table1`, from `tables/scaling.csv`, "
                "`tables/sequential.csv` and `tables/path_length.csv`); the paper's claims: `tfm.table1`.\n\n")


def readme_blocks(rep) -> dict[str, str]:
    """The README's generated blocks: ``results`` (what the committed run says) and ``performance``."""
    m = rep.machine
    head = ("**What the committed run says** (`results/REPORT.md` has the details and explains each disagreement; "
            f"the newest measuring run: {m.get('date_utc', 'date not recorded')}, commit "
            f"{m.get('git_commit', 'not recorded')}, load {m.get('load_avg_1min', 'not recorded')} when it started):\n\n")
    bullets = scaling.readme(rep) + path_length.readme(rep) + crossover.readme(rep) + sequential.readme(rep)
    bullets += training_scaling.readme(rep) + training_throughput.readme(rep) + training_memory.readme(rep)
    bullets += gradient_signal.readme(rep) + learning_distance.readme(rep) + table2.readme(rep)
    bullets.append(f"- **GPU:** {rep.gpu.describe('results/')}")
    perf = peers.readme_table(rep)
    suite = benchmarks.readme(rep)
    return {"results": head + "\n".join(bullets) + "\n", "performance": perf + ("\n" + suite if suite else "")}
