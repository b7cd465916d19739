"""Launch configuration and error checking shared by the CUDA kernel modules.

* :class:`Tuning` holds every tile size and block size the kernels use. The defaults are
  chosen for a large GPU (H100/H200); :func:`default_tuning` returns tiny tiles under
  Numba's CUDA simulator (each simulated thread is a Python thread) so that the tests still
  cross several tiles and ragged edges at sizes the simulator can run. Pass your own
  ``Tuning`` to ``CudaBackend(tuning=...)`` to tune.
* :func:`launch` runs a kernel and, in *checked* mode, synchronizes and re-raises any
  failure as :class:`CudaLaunchError` naming the kernel and its launch configuration.
  Checked mode is on under the simulator and opt-in on a GPU (``TFM_CUDA_CHECK=1``),
  because a synchronize after every launch costs throughput.
* Kernels that need compile-time constants (shared/local array shapes, dtypes, tile sizes)
  are built by factories cached on those constants (``functools.lru_cache``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

import numpy as np
from numba import cuda

# Static shared memory per block that every CUDA GPU since Kepler grants without opt-in.
SHARED_BYTES_LIMIT = 48 * 1024


class CudaLaunchError(RuntimeError):
    """A kernel launch failed (or its execution raised): names the kernel and configuration."""


def simulator_enabled() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def checked_mode() -> bool:
    """Synchronize and check after each launch? Env ``TFM_CUDA_CHECK`` (0/1) overrides."""
    env = os.environ.get("TFM_CUDA_CHECK")
    if env is not None and env.strip() != "":
        return env.strip() not in ("0", "false", "False", "no")
    return simulator_enabled()


@dataclass(frozen=True)
class Tuning:
    """Tile and block sizes. ``gemm_*`` = (BM, BN, BK, TM, TN); ``attn`` = (BQ, BK, TY, TX).

    GEMM: a block computes a BM x BN tile of C with (BM/TM)*(BN/TN) threads, each owning a
    TM x TN register tile; K advances in steps of BK through shared memory.
    ``gemm_large`` is used when it yields at least ``min_blocks`` blocks, else ``gemm_small``.
    Attention: a block owns BQ queries with TY*TX threads; each thread holds BQ/TY query
    rows x BK/TX scores of a key tile and BQ/TY rows x ceil(Dv/TX) output columns.
    """

    gemm_large: tuple = (128, 128, 16, 8, 8)
    gemm_small: tuple = (64, 64, 16, 4, 4)
    min_blocks: int = 264  # 2 x the 132 SMs of an H100 SXM
    attn: tuple = (64, 32, 16, 8)
    row_threads: int = 128  # block size of one-row-per-block reductions (power of two)
    elem_threads: int = 256  # block size of elementwise kernels
    step_threads: int = 128  # block size of the recurrent step kernels

    def __post_init__(self):
        for name in ("gemm_large", "gemm_small"):
            bm, bn, bk, tm, tn = getattr(self, name)
            if min(bm, bn, bk, tm, tn) < 1 or bm % tm or bn % tn:
                raise ValueError(f"Tuning.{name}={getattr(self, name)}: need BM % TM == 0 and BN % TN == 0")
            if (bm // tm) * (bn // tn) > 1024:
                raise ValueError(f"Tuning.{name}={getattr(self, name)} needs more than 1024 threads per block")
        bq, bk, ty, tx = self.attn
        if min(self.attn) < 1 or bq % ty or bk % tx or ty * tx > 1024:
            raise ValueError(f"Tuning.attn={self.attn}: need BQ % TY == 0, BK % TX == 0, TY*TX <= 1024")
        for name in ("row_threads", "elem_threads", "step_threads"):
            v = getattr(self, name)
            if not 1 <= v <= 1024:
                raise ValueError(f"Tuning.{name}={v} must lie in [1, 1024]")
        if self.row_threads & (self.row_threads - 1):
            raise ValueError(f"Tuning.row_threads={self.row_threads} must be a power of two")

    def replace(self, **changes) -> "Tuning":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Under the simulator: tiles of a few elements, so tiny inputs still span several tiles.
SIM_TUNING = Tuning(gemm_large=(8, 8, 4, 2, 2), gemm_small=(4, 4, 2, 2, 2), min_blocks=6,
                    attn=(4, 4, 2, 2), row_threads=4, elem_threads=32, step_threads=8)


def default_tuning() -> Tuning:
    if simulator_enabled():
        return SIM_TUNING
    try:
        sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    except Exception:  # no device: the backend refuses to start anyway
        return Tuning()
    return Tuning(min_blocks=2 * int(sms))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_1d(n: int, threads: int) -> tuple:
    return (max(1, cdiv(n, threads)),)


def _check_config(name, grid, block):
    g = grid if isinstance(grid, tuple) else (grid,)
    b = block if isinstance(block, tuple) else (block,)
    if any(int(x) < 1 for x in g + b) or math.prod(b) > 1024 or len(g) > 3 or len(b) > 3:
        raise CudaLaunchError(f"{name}: invalid launch configuration grid={g} block={b}")
    if len(g) > 1 and any(int(x) > 65535 for x in g[1:]):
        raise CudaLaunchError(f"{name}: grid={g} exceeds 65535 blocks in y or z")


def launch(name: str, kernel, grid, block, *args) -> None:
    """``kernel[grid, block](*args)``; in checked mode, synchronize and name any failure."""
    _check_config(name, grid, block)
    try:
        kernel[grid, block](*args)
        if checked_mode():
            cuda.synchronize()
    except CudaLaunchError:
        raise
    except Exception as exc:
        raise CudaLaunchError(f"kernel {name} (grid={grid}, block={block}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc


def numba_dtype(dtype):
    """numpy dtype -> numba scalar type (used as a compile-time constant in kernel factories)."""
    from numba.np import numpy_support

    return numpy_support.from_dtype(np.dtype(dtype))
