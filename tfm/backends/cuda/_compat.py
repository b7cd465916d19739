"""Version shims between numba-cuda and NumPy, applied before any kernel compiles.

numba-cuda 0.30.x registers a device overload for ``np.row_stack`` whenever NumPy >= 2.0,
but NumPy 2.5 removed that alias of ``np.vstack``: loading the CUDA target then fails with
``AttributeError: module 'numpy' has no attribute 'row_stack'`` at the first kernel launch
(seen on the first GPU run: numba-cuda 0.30.4, NumPy 2.5.2; NVIDIA/numba-cuda#907, whose
fix upstream will not release since the package is in maintenance mode). Restoring the alias
is what NumPy < 2.5 had; tfm itself never calls it.
"""

from __future__ import annotations

import numpy as np


def install() -> None:
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack
