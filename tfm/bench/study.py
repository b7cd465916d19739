"""Studies as data: a parameter grid, a measurement function, a tidy table out.

A :class:`Study` is an ordered list of cases (dicts of parameters) and a function
``measure(case, ctx) -> dict`` returning that case's measurements (``ctx`` offers
``time``, ``time_pair`` and ``memory`` with the study's budget, and the run-wide
``options``, e.g. the backend). :func:`run_study` turns
it into one table row per case, with the machine fingerprint and ceilings as columns,
written to ``<out>/tables/<name>.csv`` atomically after every row, so that:

* an interrupted run (Ctrl-C) resumes where it stopped: rows with status ``ok``,
  ``oom`` or ``over_budget`` measured under the same tfm sources (``tfm_source``, a hash
  of tfm's code) are not measured again; after any change to tfm every row is measured
  again (``fresh=True`` starts over regardless);
  ``unavailable`` and ``error`` rows are retried, since code may have landed or been fixed;
* nothing expected crashes a run: an unavailable backend or missing kernel
  (``BackendUnavailable``, ``ImportError``, ``NotImplementedError``) becomes an
  ``unavailable`` row, an out-of-memory case (``MemoryError``,
  ``InsufficientMemoryError``) an ``oom`` row, a case whose predicted time is over the
  budget an ``over_budget`` row; anything else an ``error`` row with the exception text.
  Every such row has NaN measurements and a ``reason``.

Time budget: in a *series* (cases equal but for the growing parameter, e.g. n), the time
(fastest repeat, else median) of the last measured case predicts the next one as ``t * (g / g_prev) ** p`` with the
study's expected exponent p; a case predicted over ``max_call_s`` per call is skipped, and
so are the larger cases of that series.

Rows with ``flops`` get ``gflops`` and ``frac_sgemm`` (of the measured sgemm ceiling);
rows with ``bytes`` get ``gbs`` and ``frac_bw``; both computed from ``time_s``. A run on the
``cuda`` backend (``options["backend"]``) is compared with the device's ceilings measured
in the same run (cuBLAS SGEMM, device copy bandwidth), and its rows also get ``frac_peak``,
the fraction of the FP32 CUDA-core peak; ``ctx.memory`` then measures device memory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..backends import BackendUnavailable
from ..errors import InsufficientMemoryError
from .machine import fingerprint, measure_ceilings
from .memory import MemoryPeak, device_memory, peak_memory
from .timing import Timing, time_call, time_once, time_pair

DONE_STATUSES = ("ok", "oom", "over_budget")
STATUSES = DONE_STATUSES + ("unavailable", "error")


class Skip(Exception):
    """Raised by a measurement to record a NaN row: ``Skip(reason, status="unavailable")``."""

    def __init__(self, reason: str, status: str = "unavailable"):
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class Study:
    name: str
    title: str
    cases: list[dict]
    measure: Callable[[dict, "Context"], dict]
    grow: str | Callable[[dict], str] | None = None  # the growing parameter of a series (e.g. "n")
    exponent: Callable[[dict], float] | float = 1.0  # expected time ~ grow ** exponent
    max_call_s: float = 3.0
    budget_s: float = 0.4  # timing budget per case (repeats until reached)
    min_repeats: int = 3
    options: dict = field(default_factory=dict)  # run-wide settings handed to measure as ctx.options
    single_call: bool = False  # time one call, compilation included: for runs whose times mean nothing

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"study name must be an identifier, got {self.name!r}")
        for case in self.cases:
            if not isinstance(case, dict):
                raise TypeError(f"study {self.name}: every case must be a dict, got {type(case).__name__}")


@dataclass
class Context:
    """What a measurement function gets besides its case: timing and memory helpers."""

    study: Study
    quick: bool
    ceilings: dict

    @property
    def options(self) -> dict:
        return self.study.options

    def time(self, fn: Callable[[], object], sync: Callable[[], None] | None = None) -> Timing:
        if self.study.single_call:
            return time_once(fn, sync)
        return time_call(fn, budget_s=self.study.budget_s, min_repeats=self.study.min_repeats, sync=sync)

    def time_pair(self, fn_a, fn_b, sync_a=None, sync_b=None) -> tuple[Timing, Timing]:
        if self.study.single_call:
            return time_once(fn_a, sync_a), time_once(fn_b, sync_b)
        return time_pair(fn_a, fn_b, budget_s=2 * self.study.budget_s, min_repeats=self.study.min_repeats,
                         sync_a=sync_a, sync_b=sync_b)

    @property
    def on_device(self) -> bool:
        """True when the study measures the cuda backend (device ceilings, device memory)."""
        return self.options.get("backend") == "cuda"

    def memory(self, fn: Callable[[], object], sync: Callable[[], None] | None = None) -> MemoryPeak:
        """Peak host memory of one call, or on the cuda backend the device memory it allocates."""
        if self.on_device:
            return device_memory(fn, sync or (lambda: None))
        return peak_memory(fn)


def case_id(case: dict) -> str:
    return json.dumps(case, sort_keys=True, default=str)


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of an exception raised by a measurement."""
    if isinstance(exc, Skip):
        return exc.status, exc.reason
    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, (MemoryError, InsufficientMemoryError)):
        return "oom", text
    if isinstance(exc, (BackendUnavailable, ImportError, NotImplementedError)):
        return "unavailable", text
    return "error", text


def write_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV so that readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def table_path(out: Path | str, name: str) -> Path:
    return Path(out) / "tables" / f"{name}.csv"


def load_table(out: Path | str, name: str) -> pd.DataFrame | None:
    path = table_path(out, name)
    return pd.read_csv(path) if path.exists() else None


def _grow(study: Study, case: dict) -> str | None:
    return study.grow(case) if callable(study.grow) else study.grow


def _series_key(case: dict, grow: str | None) -> str:
    return case_id({k: v for k, v in case.items() if k != grow})


def _base_time(row: dict) -> float:
    """The time a prediction starts from: the fastest repeat where recorded (robust to load spikes)."""
    t = row.get("min_s")
    return float(t) if t is not None and np.isfinite(t) else float(row["time_s"])


def ceiling(ceilings: dict, key: str, on_device: bool) -> float:
    """A ceiling of the run: ``key`` (sgemm_gflops, mem_bw_gbs, fp32_peak_gflops) of the host,
    or of the device (``device_<key>``) for rows measured on it; NaN when not measured."""
    v = ceilings.get(f"device_{key}" if on_device else key)
    return float(v) if v is not None and np.isfinite(v) and v > 0 else float("nan")


def _derived(row: dict, ceilings: dict, on_device: bool = False) -> None:
    t = row.get("time_s")
    if t is None or not (isinstance(t, float) and t > 0):
        return
    if row.get("flops") is not None and np.isfinite(row["flops"]):
        row["gflops"] = row["flops"] / t / 1e9
        row["frac_sgemm"] = row["gflops"] / ceiling(ceilings, "sgemm_gflops", on_device)
        if on_device:
            row["frac_peak"] = row["gflops"] / ceiling(ceilings, "fp32_peak_gflops", on_device)
    if row.get("bytes") is not None and np.isfinite(row["bytes"]):
        row["gbs"] = row["bytes"] / t / 1e9
        row["frac_bw"] = row["gbs"] / ceiling(ceilings, "mem_bw_gbs", on_device)


def run_study(study: Study, out: Path | str = "results", *, quick: bool = False, fresh: bool = False,
              progress: bool = True) -> pd.DataFrame:
    """Measure every case not already done; return the whole table (see module docstring)."""
    from tqdm.auto import tqdm

    path = table_path(out, study.name)
    ceilings = measure_ceilings(quick)
    machine = {**fingerprint(), **ceilings}  # taken once, when the run starts
    fp = {k: v for k, v in machine.items() if k != "device_reason"}

    old = None if fresh else load_table(out, study.name)
    rows: list[dict] = []
    done: set[str] = set()
    if old is not None and "case_id" in old.columns:
        same_code = (old["tfm_source"] == fp["tfm_source"] if "tfm_source" in old.columns
                     else pd.Series(False, index=old.index))
        if progress and (~same_code).any():
            print(f"[{study.name}] {int((~same_code).sum())} saved rows were measured with other tfm "
                  f"sources: measuring them again", file=sys.stderr)
        kept = old[same_code & old["status"].isin(DONE_STATUSES)]
        rows = kept.to_dict("records")
        done = set(kept["case_id"])
    # series state: last measured (grow value, time) and whether the series is over budget
    last: dict[str, tuple[float, float]] = {}
    blocked: dict[str, str] = {}
    for r in rows:
        case = json.loads(r["case_id"])
        grow = _grow(study, case)
        key = _series_key(case, grow)
        if r["status"] == "ok" and grow and np.isfinite(r.get("time_s", np.nan)):
            last[key] = (float(r[grow]), _base_time(r))
        elif r["status"] in ("oom", "over_budget") and key not in blocked:
            blocked[key] = f"a smaller {grow} of this series was skipped ({r['reason']})"

    ctx = Context(study, quick, ceilings)
    todo = [c for c in study.cases if case_id(c) not in done]
    machine_written = False  # machine.json: the newest run that measured something (not a reuse)
    bar = tqdm(total=len(study.cases), initial=len(study.cases) - len(todo), desc=study.name,
               unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for case in todo:
            bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in case.items())[:60], refresh=False)
            grow = _grow(study, case)
            key = _series_key(case, grow)
            row = {**case, "case_id": case_id(case)}
            t0 = time.perf_counter()
            try:
                if key in blocked:
                    raise Skip(blocked[key], "over_budget")
                if grow and key in last:
                    g_prev, t_prev = last[key]
                    p = study.exponent(case) if callable(study.exponent) else study.exponent
                    pred = t_prev * (float(case[grow]) / g_prev) ** p
                    if pred > study.max_call_s:
                        raise Skip(f"over time budget: predicted {pred:.3g} s per call > {study.max_call_s:g} s "
                                   f"(from {grow}={g_prev:g} at {t_prev:.3g} s, growth ~{grow}^{p:g})",
                                   "over_budget")
                row.update(study.measure(dict(case), ctx))
                row["status"], row["reason"] = "ok", ""
                if not machine_written:
                    write_machine(out, machine)
                    machine_written = True
                _derived(row, ceilings, ctx.on_device)
                if grow and np.isfinite(row.get("time_s", np.nan)):
                    last[key] = (float(case[grow]), _base_time(row))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a row with its reason
                row["status"], row["reason"] = classify(exc)
                if row["status"] in ("oom", "over_budget") and key not in blocked:
                    blocked[key] = f"a smaller {grow} of this series was skipped ({row['reason']})"
                if row["status"] == "error":
                    bar.write(f"[{study.name}] error at {case}: {row['reason']}")
            row["case_s"] = time.perf_counter() - t0
            row.update(fp)
            rows.append(row)
            write_atomic(pd.DataFrame(rows), path)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(f"\n[{study.name}] interrupted: {len(rows)} rows saved in {path}; run again to resume "
              f"(--fresh starts over)", file=sys.stderr)
        raise
    bar.close()
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["case_id", "status", "reason"])
    write_atomic(df, path)
    return df


def write_machine(out: Path | str, info: dict) -> None:
    """A run's fingerprint and ceilings (``info``, as its rows carry them) as
    ``<out>/tables/machine.json``."""
    path = Path(out) / "tables" / "machine.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in info.items()}
    fd, tmp = tempfile.mkstemp(prefix=".machine.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(clean, f, indent=2)
    os.replace(tmp, path)
