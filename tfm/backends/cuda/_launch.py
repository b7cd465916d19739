"""Launch configuration, resource checks and the kernel launch path of the CUDA kernel modules.

* :class:`Tuning` holds every tile size and block size the kernels use, and refuses at
  construction a tiling the card would refuse at launch: more than 1024 threads per block,
  or more than 48 KB of static shared memory (the GEMM's slabs, checked for float32 here and
  for the actual dtype when a kernel is built; the fused attention shrinks its tiles to fit,
  ``attention.fused_tiles``). Registers are known only after compilation: the first launch
  of every compiled kernel checks registers x threads against the 64 K registers of a block
  (:func:`check_resources`), and ``tests/test_cuda_ptx.py`` does the same with ptxas.
  The defaults are chosen for a large GPU (H100/H200); :func:`default_tuning` returns tiny
  tiles under Numba's CUDA simulator (each simulated thread is a Python thread) so that the
  tests still cross several tiles and ragged edges at sizes the simulator can run.
* :func:`launch` runs a kernel and, in *checked* mode, synchronizes and re-raises any failure
  as :class:`CudaLaunchError` naming the kernel and its launch configuration. Checked mode is
  on under the simulator and opt-in on a GPU (``TFM_CUDA_CHECK=1``).
* Kernels that need compile-time constants (shared/local array shapes, dtypes, tile sizes)
  are built by factories cached on those constants (``functools.lru_cache``).

Launch paths (``LAUNCH_MODES``; ``TFM_CUDA_LAUNCH`` or :func:`set_launch_mode` choose one):

* ``dispatch`` — numba's own ``kernel[grid, block](*args)``: per call it types every
  argument (a ``types.Array`` per device array), looks the overload up, builds a launch
  configuration and marshals each argument through ``_prepare_args`` (an ``InOut`` wrapper
  and a strided-memory-view shim per array). The first GPU run measured a base forward pass
  at 188 launches and 85 ms of host time with the device idle behind it
  (dev/cuda/profile_forward.txt): about 0.1-0.2 ms of Python per launch.
* ``overload`` — the compiled overload is cached under a cheap key (dtype, ndim, layout of
  each array; the type of each scalar) and launched with ``_Kernel.launch``: no typing, no
  configuration object, numba's own argument marshalling.
* ``direct`` (default) — the same cache, and the arguments are marshalled here exactly as
  ``_Kernel._prepare_args`` does (meminfo, parent, size, itemsize, pointer, shape, strides
  per array; a ctypes scalar per number), then handed to ``cuda.core.launch`` with a cached
  ``LaunchConfig``. The first launch of each overload compares this marshalling with
  numba's and falls back to ``overload`` (with a warning) if they ever differ.

Host cost: ``python3 -m dev.cuda.lab --out dev/cuda/host --family ptx,launch`` without a
GPU (kernels compiled for sm_90, the driver call stubbed, device memory made up; committed
output in dev/cuda/host/) on the shared 2-core development VM at load average 8.6: per
launch of a 3-argument kernel, dispatch 62 us, overload 64 us, direct 6.0 us; per
base-config forward pass (nn.Transformer, B=8, n=128, Numba GEMM, host side only) dispatch
72 ms, overload 55 ms, direct 24 ms: direct 3.0x faster than dispatch (quieter runs the same
day: 37-47, 26-35 and 12-17 ms, the same ratio). On an NVIDIA H200, with the real
cuLaunchKernel (``python3 -m dev.cuda.lab --out DIR --family launch,forward``;
dev/cuda/gpu/launch.csv, forward.csv): per launch of the same kernel (1024 elements, 200
launches a sample) direct 13.7 us, dispatch 36.1 us, overload 43.2 us, direct 2.63x
dispatch's speed; per base forward pass (B=8, n=128, cuBLAS GEMM, caching pool off) direct
34.9 ms, overload 45.3 ms, dispatch 51.8 ms; direct with the pool (``_memory.py``) 16.1 ms,
eager PyTorch 9.8 ms.
"""

from __future__ import annotations

import ctypes
import math
import os
import warnings
from dataclasses import dataclass, fields, replace

import numpy as np
from numba import cuda

# Static shared memory per block that every CUDA GPU since Kepler grants without opt-in.
SHARED_BYTES_LIMIT = 48 * 1024
# Registers of one block (and of one SM) on every GPU since Kepler (compute capability 3.x-9.x).
REGISTERS_PER_BLOCK = 64 * 1024
MAX_THREADS_PER_BLOCK = 1024

LAUNCH_MODES = ("dispatch", "overload", "direct")
# Versions of the GEMM and fused attention kernels (linear.GEMM_VERSIONS, attention.ATTN_VERSIONS).
KERNEL_VERSIONS = (1, 2)
# How the fused attention backward sums dQ over key blocks (attention.BWD_DQ says more).
BWD_DQ_MODES = ("atomic", "pass")


class CudaLaunchError(RuntimeError):
    """A kernel launch failed (or its execution raised): names the kernel and configuration."""


_SIMULATOR = []  # numba fixes its mode when it is imported: look it up once


def simulator_enabled() -> bool:
    if not _SIMULATOR:
        from numba import config

        _SIMULATOR.append(bool(config.ENABLE_CUDASIM))
    return _SIMULATOR[0]


def checked_mode() -> bool:
    """Synchronize and check after each launch? Env ``TFM_CUDA_CHECK`` (0/1) overrides."""
    env = os.environ.get("TFM_CUDA_CHECK")
    if env:
        env = env.strip()
        if env:
            return env not in ("0", "false", "False", "no")
    return simulator_enabled()


def gemm_shared_bytes(bm: int, bn: int, bk: int, itemsize: int) -> int:
    """Static shared memory of the GEMM kernels at most: two k-major slabs, BK x (BM+4) and
    BK x (BN+4) (v2 pads rows by 4 to keep them 16-byte aligned, v1 by 1), double-buffered
    in v2 (``linear.GEMM_VERSIONS``)."""
    return 2 * itemsize * bk * ((bm + 4) + (bn + 4))


@dataclass(frozen=True)
class Tuning:
    """Tile and block sizes. ``gemm_*`` = (BM, BN, BK, TM, TN); ``attn`` = (BQ, BK, TY, TX).

    GEMM: a block computes a BM x BN tile of C with (BM/TM)*(BN/TN) threads, each owning a
    TM x TN register tile; K advances in steps of BK through shared memory.
    ``gemm_large`` is used when it yields at least ``min_blocks`` blocks, else ``gemm_small``.
    Attention: a block owns BQ queries with TY*TX threads; each thread holds BQ/TY query
    rows x BK/TX scores of a key tile and BQ/TY rows x ceil(Dv/TX) output columns.
    Attention backward (``attn_bwd`` = (BQ, BKV, TY, TX), ``attention.BWD_TILINGS``): a block
    of the key-block kernel owns BKV keys and walks the queries BQ at a time; each thread
    accumulates BKV/TY keys x ceil(D/(4*TX))*4 columns of dK and dV. ``attn_bwd_dq`` picks how
    dQ is summed over the key blocks (``attention.BWD_DQ``): "atomic" (float32 atomics from
    the key-block kernel) or "pass" (a second, query-block kernel, no atomics).
    """

    gemm_large: tuple = (128, 128, 16, 8, 8)
    gemm_small: tuple = (64, 64, 16, 4, 4)
    min_blocks: int = 264  # 2 x the 132 SMs of an H100 SXM
    attn: tuple = (64, 32, 16, 8)
    gemm_version: int = 2  # which Numba GEMM kernel (linear.GEMM_VERSIONS)
    attn_version: int = 2  # which fused attention kernel (attention.ATTN_VERSIONS)
    attn_bwd: tuple = (32, 32, 8, 16)
    attn_bwd_dq: str = "atomic"
    row_threads: int = 128  # block size of one-row-per-block reductions (power of two)
    elem_threads: int = 256  # block size of elementwise kernels
    step_threads: int = 128  # block size of the recurrent step kernels

    def __post_init__(self):
        for name in ("gemm_large", "gemm_small"):
            tiles = getattr(self, name)
            if len(tiles) != 5 or min(tiles) < 1:
                raise ValueError(f"Tuning.{name}={tiles}: need five positive sizes (BM, BN, BK, TM, TN)")
            bm, bn, bk, tm, tn = tiles
            if bm % tm or bn % tn:
                raise ValueError(f"Tuning.{name}={tiles}: need BM % TM == 0 and BN % TN == 0")
            if (bm // tm) * (bn // tn) > MAX_THREADS_PER_BLOCK:
                raise ValueError(f"Tuning.{name}={tiles} needs more than 1024 threads per block")
            if self.gemm_version == 2 and (tm % 4 or tn % 4):
                raise ValueError(f"Tuning.{name}={tiles}: gemm_version=2 needs TM and TN multiples of 4 "
                                 f"(its 4 x 4 register blocks); use gemm_version=1 for other tiles")
            smem = gemm_shared_bytes(bm, bn, bk, 4)
            if smem > SHARED_BYTES_LIMIT:
                raise ValueError(f"Tuning.{name}={tiles} needs {smem} bytes of static shared memory "
                                 f"for float32, over the {SHARED_BYTES_LIMIT}-byte limit; lower BK")
        if len(self.attn) != 4 or min(self.attn) < 1:
            raise ValueError(f"Tuning.attn={self.attn}: need four positive sizes (BQ, BK, TY, TX)")
        bq, bk, ty, tx = self.attn
        if bq % ty or bk % tx or ty * tx > MAX_THREADS_PER_BLOCK:
            raise ValueError(f"Tuning.attn={self.attn}: need BQ % TY == 0, BK % TX == 0, TY*TX <= 1024")
        if self.attn_version == 2 and (bq % (4 * ty) or bk % (4 * tx)):
            raise ValueError(f"Tuning.attn={self.attn}: attn_version=2 needs BQ % (4*TY) == 0 and "
                             f"BK % (4*TX) == 0 (its 4-wide register blocks); or use attn_version=1")
        if len(self.attn_bwd) != 4 or min(self.attn_bwd) < 1:
            raise ValueError(f"Tuning.attn_bwd={self.attn_bwd}: need four positive sizes (BQ, BKV, TY, TX)")
        bq, bkv, ty, tx = self.attn_bwd
        if bkv % (4 * ty) or bkv % tx or bq % tx or bq % ty or ty * tx > MAX_THREADS_PER_BLOCK:
            raise ValueError(f"Tuning.attn_bwd={self.attn_bwd}: need BKV % (4*TY) == 0 (4-key register "
                             f"blocks), BKV % TX == 0, BQ % TX == 0, BQ % TY == 0 and TY*TX <= 1024")
        if self.attn_bwd_dq not in BWD_DQ_MODES:
            raise ValueError(f"Tuning.attn_bwd_dq={self.attn_bwd_dq!r}: choose one of {', '.join(BWD_DQ_MODES)}")
        for name, known in (("gemm_version", KERNEL_VERSIONS), ("attn_version", KERNEL_VERSIONS)):
            if getattr(self, name) not in known:
                raise ValueError(f"Tuning.{name}={getattr(self, name)}: choose one of {sorted(known)}")
        for name in ("row_threads", "elem_threads", "step_threads"):
            v = getattr(self, name)
            if not 1 <= v <= MAX_THREADS_PER_BLOCK:
                raise ValueError(f"Tuning.{name}={v} must lie in [1, 1024]")
        if self.row_threads & (self.row_threads - 1):
            raise ValueError(f"Tuning.row_threads={self.row_threads} must be a power of two")

    def replace(self, **changes) -> "Tuning":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Under the simulator: tiles of a few elements, so tiny inputs still span several tiles.
SIM_TUNING = Tuning(gemm_large=(8, 8, 4, 4, 4), gemm_small=(4, 8, 2, 4, 4), min_blocks=6,
                    attn=(8, 8, 2, 2), attn_bwd=(8, 8, 2, 2), row_threads=4, elem_threads=32, step_threads=8)


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


_CHECKED = set()  # (grid, block) pairs already validated: shapes repeat from one pass to the next


def _check_config(name, grid, block):
    if (grid, block) in _CHECKED:
        return
    g = grid if isinstance(grid, tuple) else (grid,)
    b = block if isinstance(block, tuple) else (block,)
    if len(g) > 3 or len(b) > 3 or min(g) < 1 or min(b) < 1 or math.prod(b) > MAX_THREADS_PER_BLOCK:
        raise CudaLaunchError(f"{name}: invalid launch configuration grid={g} block={b}")
    if len(g) > 1 and max(g[1:]) > 65535:
        raise CudaLaunchError(f"{name}: grid={g} exceeds 65535 blocks in y or z")
    _CHECKED.add((grid, block))


def check_resources(name: str, regs_per_thread: int, max_threads: int, threads: int) -> None:
    """Refuse a launch the card would refuse for lack of registers, with the reason."""
    if regs_per_thread * threads > REGISTERS_PER_BLOCK or threads > max_threads:
        raise CudaLaunchError(
            f"kernel {name}: {regs_per_thread} registers per thread x {threads} threads per block "
            f"needs {regs_per_thread * threads} registers, over the {REGISTERS_PER_BLOCK} of a block "
            f"(the driver allows at most {max_threads} threads for this kernel); choose a Tuning "
            f"with fewer threads per block or smaller per-thread tiles")


# ---------------------------------------------------------------------- launch paths
_mode = None  # resolved from TFM_CUDA_LAUNCH on first use


def launch_mode() -> str:
    global _mode
    if _mode is None:
        _mode = os.environ.get("TFM_CUDA_LAUNCH", "direct").strip() or "direct"
        if _mode not in LAUNCH_MODES:
            raise ValueError(f"TFM_CUDA_LAUNCH={_mode!r}: choose one of {', '.join(LAUNCH_MODES)}")
    return _mode


def set_launch_mode(mode: str) -> None:
    """Switch the launch path for every later launch (the lab times them side by side)."""
    global _mode
    if mode not in LAUNCH_MODES:
        raise ValueError(f"unknown launch mode {mode!r}; choose one of {', '.join(LAUNCH_MODES)}")
    _mode = mode


_SCALARS = frozenset((int, float, bool, np.int64, np.int32, np.uint64, np.float32, np.float64, np.bool_))


def _arg_key(a):
    """What decides numba's overload for one argument (for an array: dtype, ndim and the
    layout letter of ``DeviceNDArrayBase._numba_type_``), or None where the fast path must not
    go (host arrays, which numba copies to the device and back)."""
    d = getattr(a, "_dummy", None)
    if d is not None:
        if a.size == 0 or 0 not in a.strides:  # broadcast arrays are always 'A'
            if d.is_c_contig:
                return (a.dtype, d.ndim, "C")
            if d.is_f_contig:
                return (a.dtype, d.ndim, "F")
        return (a.dtype, d.ndim, "A")
    t = type(a)
    return t if t in _SCALARS else None


def _array_words(a):
    # The flattened numba array model: meminfo, parent, nitems, itemsize, data, shape, strides.
    return (0, 0, a.size, a.dtype.itemsize, a.gpu_data.device_ctypes_pointer.value) + a.shape + a.strides


def _scalar_converter(ty):
    from numba.core import types

    if isinstance(ty, types.Integer):
        return getattr(ctypes, f"c_{ty}")
    if ty == types.float32:
        return ctypes.c_float
    if ty == types.float64:
        return ctypes.c_double
    if ty == types.boolean:
        return None  # passed through as the Python value, as numba does
    raise NotImplementedError(ty)


class _Overload:
    """One compiled kernel for one argument-type key, launched without numba's dispatch."""

    def __init__(self, name, dispatcher, args):
        from numba.core import types

        self.name = name
        sig = tuple(dispatcher.typeof_pyval(a) for a in args)
        self.kernel = dispatcher.compile(sig)
        self.mode = "direct"
        self.verified = False
        self.threads_checked = set()
        self.converters = []
        for ty in self.kernel.argument_types:
            if isinstance(ty, types.Array):
                self.converters.append(_array_words)
            else:
                conv = _scalar_converter(ty)
                self.converters.append((lambda v: (v,)) if conv is None else
                                       (lambda v, conv=conv: (conv(v),)))
        if self.kernel.extensions or self.kernel.debug or self.kernel.cooperative:
            self.mode = "overload"  # features the direct path does not reproduce
        self.cufunc = None

    def marshal(self, args) -> list:
        words = []
        extend = words.extend
        for conv, a in zip(self.converters, args):
            extend(conv(a))
        return words

    def verify(self, args, words) -> bool:
        """Our marshalling equals numba's ``_prepare_args`` for these arguments."""
        ref = []
        for ty, a in zip(self.kernel.argument_types, args):
            self.kernel._prepare_args(ty, a, 0, [], ref)
        return _same_words(words, ref)


def _same_words(ours, theirs) -> bool:
    if len(ours) != len(theirs):
        return False
    for a, b in zip(ours, theirs):
        if type(a) is not type(b):
            return False
        if isinstance(a, ctypes._SimpleCData):
            if a.value != b.value:
                return False
        elif a != b:
            return False
    return True


_OVERLOADS: dict = {}
_CONFIGS: dict = {}
_STREAM = []


def _launch_config(grid, block):
    cfg = _CONFIGS.get((grid, block))
    if cfg is None:
        from numba.cuda._compat import CUDA_CORE_GE_1_0
        from numba.cuda.dispatcher import LaunchConfig
        from numba.cuda.errors import normalize_kernel_dimensions

        g, b = normalize_kernel_dimensions(grid, block)
        if CUDA_CORE_GE_1_0:
            cfg = LaunchConfig(grid=g, block=b, shmem_size=0, is_cooperative=False)
        else:
            cfg = LaunchConfig(grid=g, block=b, shmem_size=0, cooperative_launch=False)
        _CONFIGS[(grid, block)] = cfg
    return cfg


def _default_stream():
    if not _STREAM:
        from numba.cuda.cudadrv import driver

        _STREAM.append(driver._to_core_stream(0))
    return _STREAM[0]


def _fast_launch(name, kernel, grid, block, args, mode) -> None:
    keys = tuple([_arg_key(a) for a in args])
    if None in keys:
        kernel[grid, block](*args)
        return
    entry = _OVERLOADS.get((kernel, keys))
    if entry is None:
        entry = _OVERLOADS[(kernel, keys)] = _Overload(name, kernel, args)
    threads = math.prod(block) if isinstance(block, tuple) else block
    if threads not in entry.threads_checked:
        k = entry.kernel
        check_resources(name, k.regs_per_thread, k.max_threads_per_block, threads)
        entry.threads_checked.add(threads)
    if mode == "overload" or entry.mode == "overload":
        from numba.cuda.errors import normalize_kernel_dimensions

        g, b = normalize_kernel_dimensions(grid, block)
        entry.kernel.launch(args, g, b, _default_stream(), 0)
        return
    words = entry.marshal(args)
    if not entry.verified:
        if not entry.verify(args, words):
            warnings.warn(f"kernel {name}: tfm's argument marshalling differs from this numba-cuda's; "
                          f"launching it through numba's _Kernel.launch instead", RuntimeWarning)
            entry.mode = "overload"
            _fast_launch(name, kernel, grid, block, args, "overload")
            return
        entry.verified = True
    if entry.cufunc is None:
        entry.cufunc = entry.kernel._codelibrary.get_cufunc().kernel
    from numba.cuda import dispatcher  # its ``launch`` is cuda.core's (looked up per call: stubbable)

    dispatcher.launch(_default_stream(), _launch_config(grid, block), entry.cufunc, *words)


# Kernel launches and cuBLAS calls so far in this process (the lab counts them per forward pass).
COUNTS = {"launches": 0, "cublas": 0}


def launch(name: str, kernel, grid, block, *args) -> None:
    """``kernel[grid, block](*args)`` through the launch path of :func:`launch_mode`; in checked
    mode, synchronize and name any failure."""
    _check_config(name, grid, block)
    COUNTS["launches"] += 1
    try:
        mode = launch_mode()
        if mode == "dispatch" or simulator_enabled():
            kernel[grid, block](*args)
        else:
            _fast_launch(name, kernel, grid, block, args, mode)
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
