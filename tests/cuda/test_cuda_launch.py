"""Launch configuration, checked launches and backend options of the CUDA backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SIMULATOR, TOL, randn, rel_err, run
from numba import cuda

from tfm import reference as ref
from tfm.backends.cuda import CudaBackend
from tfm.backends.cuda._launch import (CudaLaunchError, Tuning, check_resources, checked_mode, launch,
                                       set_launch_mode)


@pytest.mark.parametrize("bad,match", [
    ({"gemm_large": (8, 8, 4, 3, 2), "gemm_version": 1}, "BM % TM"),
    ({"gemm_large": (8, 8, 4, 2, 2)}, "multiples of 4"),
    ({"gemm_version": 3}, "choose one of"),
    ({"gemm_small": (64, 64, 8, 1, 1)}, "more than 1024 threads"),
    ({"gemm_large": (128, 128, 64, 8, 8)}, "static shared memory"),
    ({"gemm_small": (64, 64, 16, 4)}, "five positive sizes"),
    ({"attn": (6, 4, 4, 2)}, "BQ % TY"),
    ({"attn": (64, 32, 64, 32)}, "TY\\*TX <= 1024"),
    ({"row_threads": 6}, "power of two"),
    ({"elem_threads": 0}, "elem_threads"),
])
def test_tuning_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        Tuning(**bad)


def test_float64_gemm_tiles_shrink_to_fit_shared_memory():
    from tfm.backends.cuda._launch import SHARED_BYTES_LIMIT, gemm_shared_bytes
    from tfm.backends.cuda.linear import pick_gemm_tiles

    t = Tuning(gemm_large=(128, 128, 16, 8, 8), min_blocks=1)
    assert pick_gemm_tiles(t, 1, 512, 512, 4) == t.gemm_large
    bm, bn, bk, _, _ = pick_gemm_tiles(t, 1, 512, 512, 8)
    assert bk == 8 and gemm_shared_bytes(bm, bn, bk, 8) <= SHARED_BYTES_LIMIT


def test_register_check_refuses_before_the_card_does():
    check_resources("fits", 64, 1024, 1024)
    with pytest.raises(CudaLaunchError, match=r"kernel big: 255 registers per thread x 512 threads"):
        check_resources("big", 255, 1024, 512)
    with pytest.raises(CudaLaunchError, match="at most 256 threads"):
        check_resources("capped", 32, 256, 512)


def test_launch_mode_is_validated():
    with pytest.raises(ValueError, match="unknown launch mode 'fast'"):
        set_launch_mode("fast")


def test_backend_options_are_validated():
    with pytest.raises(ValueError, match="unknown gemm 'blas'"):
        CudaBackend(gemm="blas")
    with pytest.raises(TypeError, match="tuning must be"):
        CudaBackend(tuning=(64, 64))
    if SIMULATOR:  # no cuBLAS there: the default is the Numba GEMM, an explicit "cupy" is refused
        assert CudaBackend().gemm == "numba"
        with pytest.raises(ValueError, match="gemm='cupy' is unavailable: Numba's CUDA simulator"):
            CudaBackend(gemm="cupy")


def test_invalid_launch_configuration_names_the_kernel():
    with pytest.raises(CudaLaunchError, match="my_kernel: invalid launch configuration"):
        launch("my_kernel", None, (1,), 2048)


@cuda.jit
def oob(a):
    a[cuda.grid(1) + 100] = 1.0


@pytest.mark.skipif(not SIMULATOR, reason="out-of-bounds accesses raise only under the simulator")
def test_failing_kernel_is_reported_with_name_and_configuration():
    with pytest.raises(CudaLaunchError, match=r"kernel oob_test \(grid=\(1,\), block=4\) failed: IndexError"):
        launch("oob_test", oob, (1,), 4, cuda.to_device(np.zeros(4)))


def test_checked_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TFM_CUDA_CHECK", "1")
    assert checked_mode()
    monkeypatch.setenv("TFM_CUDA_CHECK", "0")
    assert not checked_mode()
    monkeypatch.delenv("TFM_CUDA_CHECK")
    assert checked_mode() == SIMULATOR


@pytest.mark.parametrize("attn,gemm,version", [((2, 2, 1, 1), (2, 2, 1, 1, 1), 1), ((8, 4, 4, 2), (4, 8, 2, 2, 4), 1),
                                               ((16, 8, 2, 2), (8, 4, 3, 4, 4), 2), ((4, 4, 1, 1), (12, 8, 1, 4, 4), 2),
                                               ((8, 16, 2, 2), (8, 8, 4, 4, 4), 2)])
def test_other_tilings_give_the_same_results(rng, attn, gemm, version):
    bk = CudaBackend(tuning=Tuning(gemm_large=gemm, gemm_small=gemm, attn=attn, row_threads=2, elem_threads=7,
                                   step_threads=3, gemm_version=version, attn_version=version), gemm="numba")
    q, k, v = randn(rng, 1, 2, 9, 5), randn(rng, 1, 2, 10, 5), randn(rng, 1, 2, 10, 3)
    for impl in ("fused", "naive"):
        out = run(bk, lambda *a: bk.attention(*a, causal=True, impl=impl), q, k, v)
        assert rel_err(out, ref.scaled_dot_product_attention(q, k, v, causal=True)) < TOL[np.float32]
    x, w, b = randn(rng, 13, 7), randn(rng, 9, 7), randn(rng, 9)
    assert rel_err(run(bk, bk.linear, x, w, b), ref.linear(x, w, b)) < TOL[np.float32]
    a3, b3 = randn(rng, 2, 5, 11), randn(rng, 2, 11, 6)  # the batched product without transpose
    from tfm.backends.cuda.linear import gemm

    da, db, dc = bk.asarray(a3), bk.asarray(b3), bk.empty((2, 5, 6), np.float32)
    gemm(da, db, dc, bk.tuning, trans_b=False, alpha=0.5)
    assert rel_err(bk.to_numpy(dc), 0.5 * (a3.astype(np.float64) @ b3)) < TOL[np.float32]


@pytest.mark.skipif(not SIMULATOR, reason="guards a workaround for a bug of Numba's CUDA simulator")
def test_simulator_shared_arrays_are_one_per_block_under_thread_switches(monkeypatch):
    """tfm.backends.cuda._simulator's lock: with a thread switch forced inside every
    allocation, all threads of a block must still see one shared array (the unpatched
    simulator hands out several)."""
    import time

    from numba import float32

    empty = np.empty

    def slow_empty(*args, **kwargs):
        time.sleep(1e-3)  # gives every other simulated thread the chance to run
        return empty(*args, **kwargs)

    @cuda.jit
    def block_sum(out):
        buf = cuda.shared.array(32, float32)
        t = cuda.threadIdx.x
        buf[t] = t
        cuda.syncthreads()
        s = float32(0.0)
        for i in range(32):
            s += buf[i]
        out[cuda.blockIdx.x, t] = s

    out = np.zeros((3, 32), np.float32)
    monkeypatch.setattr(np, "empty", slow_empty)
    block_sum[3, 32](out)
    monkeypatch.undo()
    np.testing.assert_array_equal(out, np.full((3, 32), 31 * 32 / 2, np.float32))


def test_the_gpu_default_tilings_run_under_the_simulator(rng):
    """Tuning()'s H100/H200 tiles (256-thread GEMM blocks, 128-thread attention blocks), not
    the simulator's toy tiles, at small ragged sizes: one tile with ragged edges each."""
    bk = CudaBackend(tuning=Tuning(), gemm="numba")
    x, w, b = randn(rng, 37, 45), randn(rng, 29, 45), randn(rng, 29)
    assert rel_err(run(bk, bk.linear, x, w, b), ref.linear(x, w, b)) < TOL[np.float32]
    q, k, v = randn(rng, 1, 2, 67, 16), randn(rng, 1, 2, 35, 16), randn(rng, 1, 2, 35, 8)
    mask = rng.random((1, 1, 67, 35)) > 0.2
    for causal in (False, True):
        out = run(bk, lambda *a: bk.attention(*a, causal=causal), q, k, v, mask)
        assert rel_err(out, ref.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)) < TOL[np.float32]


@pytest.mark.skipif(not SIMULATOR, reason="the lab's --smoke mode runs only under the simulator")
def test_lab_smoke_writes_every_family(tmp_path):
    """dev/cuda/lab.py at toy sizes: every family writes its CSV, every tfm variant passes its
    float64 check and gets a time, and peers missing here are rows with a reason."""
    import csv
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-m", "dev.cuda.lab", "--out", str(tmp_path), "--smoke",
                          "--budget-s", "240"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["SUMMARY.md", "attention.csv", "backward.csv", "forward.csv", "gemm.csv",
                                            "launch.csv"]
    for family in ("gemm", "attention", "forward", "backward"):
        with open(tmp_path / f"{family}.csv") as fh:
            rows = list(csv.DictReader(fh))
        ours = [r for r in rows if not r["variant"].startswith(("torch", "sdpa", "tfm_cublas", "cupy"))]
        assert ours and all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in ours), rows
        assert all(r["reason"] for r in rows if r["status"] != "ok")
        if family == "forward":  # toy nn.Transformer, 1 + 1 layers: 7 + 12 kernels and 2 final norms;
            (numba,) = [r for r in rows if r["variant"] == "tfm_numba_direct"]  # split/merge free
            assert int(numba["launches"]) <= 21 and int(numba["allocations"]) <= 21, numba
