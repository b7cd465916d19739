"""Wall-clock timing of kernels: compile (first) call recorded apart, then repeats to a budget.

``time_call`` runs ``fn`` once (the first call JIT-compiles or loads the Numba cache; its
time is ``compile_s``), then repeats until ``min_repeats`` *and* ``budget_s`` are both
reached (or ``max_repeats``), and reports the median with its spread. A single timed call
longer than the budget ends the loop after that call: large cases cost two calls, not
``min_repeats + 1``. Device work is timed after ``sync()`` (the backend's synchronize), so
queued GPU kernels are counted.

``time_pair`` times two callables interleaved A B A B ... in one process, the only fair
way to compare on a shared, noisy machine. ``paired_ratio`` turns its rounds into the
median of the per-round ratios A_i / B_i with a bootstrap 95% interval: both sides of a
round saw the same machine load, so the per-round ratio cancels most of the drift that
a ratio of two medians keeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    q25_s: float
    q75_s: float
    repeats: int
    compile_s: float  # the first call: compilation (or cache load) plus one run
    samples: tuple = field(default=(), repr=False, compare=False)  # every timed call, in order

    @property
    def iqr_s(self) -> float:
        return self.q75_s - self.q25_s

    def as_row(self, prefix: str = "") -> dict:
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}
        row["iqr_s"] = self.iqr_s
        return {f"{prefix}{k}": v for k, v in row.items()}

    @classmethod
    def from_samples(cls, samples, compile_s: float) -> "Timing":
        s = np.asarray(samples, dtype=np.float64)
        q25, med, q75 = np.percentile(s, [25, 50, 75])
        return cls(float(med), float(s.min()), float(q25), float(q75), int(s.size), float(compile_s),
                   tuple(float(x) for x in s))


def _check_counts(min_repeats: int, max_repeats: int, budget_s: float) -> None:
    if not (isinstance(min_repeats, int) and min_repeats >= 1):
        raise ValueError(f"min_repeats must be an integer >= 1, got {min_repeats!r}")
    if not (isinstance(max_repeats, int) and max_repeats >= min_repeats):
        raise ValueError(f"max_repeats must be an integer >= min_repeats={min_repeats}, got {max_repeats!r}")
    if not budget_s >= 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s!r}")


def _timed(fn: Callable[[], object], sync: Callable[[], None] | None) -> float:
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], *, budget_s: float = 0.5, min_repeats: int = 3,
              max_repeats: int = 100, sync: Callable[[], None] | None = None) -> Timing:
    """Time ``fn()`` (no arguments): first call apart, then repeats to the budget."""
    _check_counts(min_repeats, max_repeats, budget_s)
    if sync is not None:
        sync()
    compile_s = _timed(fn, sync)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats:
        samples.append(_timed(fn, sync))
        spent = time.perf_counter() - start
        if spent >= budget_s and (len(samples) >= min_repeats or 0 < budget_s <= samples[-1]):
            break
    return Timing.from_samples(samples, compile_s)


def time_once(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> Timing:
    """One call, compilation included, as a Timing of one sample: for runs that check that a
    measurement works, not how fast (e.g. under Numba's CUDA simulator)."""
    if sync is not None:
        sync()
    t = _timed(fn, sync)
    return Timing.from_samples([t], t)


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], *, budget_s: float = 1.0,
              min_repeats: int = 3, max_repeats: int = 100,
              sync_a: Callable[[], None] | None = None,
              sync_b: Callable[[], None] | None = None) -> tuple[Timing, Timing]:
    """Time two callables interleaved A B A B ...; ``budget_s`` is for the pair together."""
    _check_counts(min_repeats, max_repeats, budget_s)
    compile_a = _timed(fn_a, sync_a)
    compile_b = _timed(fn_b, sync_b)
    a: list[float] = []
    b: list[float] = []
    start = time.perf_counter()
    while len(a) < max_repeats:
        a.append(_timed(fn_a, sync_a))
        b.append(_timed(fn_b, sync_b))
        spent = time.perf_counter() - start
        if spent >= budget_s and (len(a) >= min_repeats or 0 < budget_s <= a[-1] + b[-1]):
            break
    return Timing.from_samples(a, compile_a), Timing.from_samples(b, compile_b)


def paired_ratio(a: Timing, b: Timing, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(median, 2.5%, 97.5%) of the per-round ratios a_i / b_i of a :func:`time_pair` run.

    The interval is a percentile bootstrap of the median (``resamples`` draws of the rounds
    with replacement, fixed seed: the same samples give the same interval). Fewer than
    three rounds give NaN bounds.
    """
    ra, rb = np.asarray(a.samples, dtype=np.float64), np.asarray(b.samples, dtype=np.float64)
    if ra.size == 0 or ra.size != rb.size:
        raise ValueError(f"paired_ratio needs the rounds of one time_pair run, got {ra.size} and {rb.size} samples")
    ratios = ra / rb
    med = float(np.median(ratios))
    if ratios.size < 3:
        return med, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = np.median(ratios[rng.integers(0, ratios.size, size=(resamples, ratios.size))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return med, float(lo), float(hi)
