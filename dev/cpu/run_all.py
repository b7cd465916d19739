"""The whole CPU lab in one process: fastmath, recurrent, attention, and the training
kernels (attention_backward, recurrent_backward, training_ops); then a summary.

    python -m dev.cpu.run_all [--out DIR] [--quick]

Writes DIR/machine.json (tfm's fingerprint, the CPU's vector extensions, the sgemm ceilings
measured at the start), DIR/<family>.csv and DIR/<family>_check.csv for each module, and
DIR/SUMMARY.md: every paired ratio with its interval, grouped by comparison. Default DIR:
dev/cpu/results. The module headers in tfm/backends/cpu quote these files.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from . import attention, attention_backward, fastmath, recurrent, recurrent_backward, training_ops
from .common import machine, parse_out, run_family, write_machine

FAMILIES = {"fastmath": fastmath, "recurrent": recurrent, "attention": attention,
            "attention_backward": attention_backward, "recurrent_backward": recurrent_backward,
            "training_ops": training_ops}


def summary(out: Path, info: dict, seconds: float) -> str:
    lines = ["# CPU lab results", "",
             f"`python -m dev.cpu.run_all` at {info['git_commit']}, {info['date_utc']}, "
             f"{seconds / 60:.1f} minutes; {info['cpu_model']} (family {info['cpu_family']}, "
             f"model {info['cpu_model_number']}, LLVM target {info['llvm_cpu']}, {info['isa']}), "
             f"{info['cpu_logical_cores']} cores, {info['numba_threads']} Numba threads; 1-minute "
             f"load {info['load_avg_1min']} at the start. sgemm ceiling (NumPy, 2048^3): "
             f"{info['sgemm_gflops_1_thread']} GFLOP/s on one BLAS thread, "
             f"{info['sgemm_gflops_all_threads']} on all.", "",
             "Ratio: the variant's time over the baseline's in the same round, median over "
             "rounds, with its bootstrap 95% interval.", ""]
    for family in FAMILIES:
        with open(out / f"{family}.csv") as f:
            rows = list(csv.DictReader(f))
        with open(out / f"{family}_check.csv") as f:
            checks = list(csv.DictReader(f))
        worst = max(float(c["rel_err"]) / float(c["tol"]) for c in checks)
        lines += [f"## {family}", "",
                  *(f"- {name}: {what}" for name, what in FAMILIES[family].VARIANTS.items()), "",
                  f"{len(checks)} correctness checks passed (largest error {worst:.2f} of its "
                  f"tolerance; `{family}_check.csv`).", "",
                  "| comparison | variant | median ms | ratio (95% CI) | baseline | rounds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['variant']} | {float(r['median_ms']):.3f} | "
                         f"{float(r['ratio']):.3f} ({float(r['ratio_lo']):.3f}-{float(r['ratio_hi']):.3f}) "
                         f"| {r['baseline']} | {r['rounds']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    out, quick = parse_out(argv, __doc__)
    start = time.perf_counter()
    info = machine()
    write_machine(out, info)
    for family, module in FAMILIES.items():
        run_family(family, module.PARTS, module.run_checks, out, quick)
    seconds = time.perf_counter() - start
    (out / "SUMMARY.md").write_text(summary(out, info, seconds) + "\n")
    print(f"wrote {out / 'SUMMARY.md'} ({seconds / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
