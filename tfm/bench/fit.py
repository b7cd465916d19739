"""Power-law fits on log-log axes, with 95% confidence intervals.

``loglog_slope(x, y)`` fits ``log y = a + p log x`` by least squares over the
*asymptotic range*: the points whose x lies in the upper half of the measured range on a
log scale (x >= sqrt(x_min * x_max)), widened to the last three points when fewer lie
there. The 95% interval of p is ``p +- t(0.975, m - 2) * stderr`` (Student t, m points);
with two points the slope is exact and its interval undefined (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fit:
    slope: float
    ci_low: float
    ci_high: float
    intercept: float  # natural log of the prefactor
    points: int
    x_from: float  # the asymptotic range used
    x_to: float

    def predict(self, x):
        return np.exp(self.intercept) * np.asarray(x, dtype=np.float64) ** self.slope


NAN_FIT = Fit(*(float("nan"),) * 4, 0, float("nan"), float("nan"))


def loglog_slope(x, y, min_points: int = 3) -> Fit:
    """Slope of log y against log x over the asymptotic range (see module docstring).

    Non-finite or non-positive points are dropped; fewer than two points give NaN.
    """
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    order = np.argsort(x)
    x, y = x[order], y[order]
    if np.unique(x).size < 2:
        return NAN_FIT
    keep = x >= np.sqrt(x[0] * x[-1])
    if keep.sum() < min_points:
        keep = np.zeros_like(keep)
        keep[-min(min_points, x.size):] = True
    lx, ly = np.log(x[keep]), np.log(y[keep])
    if np.unique(lx).size < 2:
        return NAN_FIT
    res = stats.linregress(lx, ly)
    m = lx.size
    if m > 2:
        half = stats.t.ppf(0.975, m - 2) * res.stderr
        lo, hi = res.slope - half, res.slope + half
    else:
        lo = hi = float("nan")
    return Fit(float(res.slope), float(lo), float(hi), float(res.intercept), int(m),
               float(x[keep][0]), float(x[keep][-1]))
