"""The ``make gpu-check`` CLI runs end to end at toy sizes under the simulator."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from conftest import SIMULATOR

from tfm import cuda_check


@pytest.mark.skipif(not SIMULATOR, reason="--sim-smoke runs only under the simulator")
def test_sim_smoke_writes_every_table(tmp_path):
    assert cuda_check.main(["--out", str(tmp_path), "--sim-smoke"]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["SUMMARY.md", "attention.csv", "correctness.csv", "device.csv", "forward.csv", "gemm.csv",
                     "memory.csv"]
    correct = pd.read_csv(tmp_path / "correctness.csv")
    assert correct["passed"].all() and (correct["rel_err"] < correct["tol"]).all()
    assert {"attention_fused", "attention_naive", "encoder_decoder_forward"} <= set(correct["check"])
    attn = pd.read_csv(tmp_path / "attention.csv")
    assert (attn.loc[attn["impl"] == "tfm_fused", "median_ms"] > 0).all()
    assert "tfm_fused(8, 4, 4, 2)" in set(attn["impl"])  # the tiling sweep
    sdpa = attn[attn["impl"] == "torch_sdpa"]
    assert sdpa["median_ms"].isna().all() == sdpa["note"].notna().all()  # NaN rows say why
    gemm = pd.read_csv(tmp_path / "gemm.csv")
    assert gemm["impl"].str.startswith("numba").sum() == 2 and (gemm["median_ms"].dropna() > 0).all()
    mem = pd.read_csv(tmp_path / "memory.csv")
    fused = mem[mem["impl"] == "tfm_fused"]
    naive = mem[mem["impl"] == "tfm_naive"]
    assert (fused["extra_alloc_bytes"] == 0).all()  # O(n*d): nothing beyond the output
    assert (naive["extra_alloc_bytes"].to_numpy() == 4 * naive["B"] * naive["H"] * naive["n"] ** 2).all()
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "python -m tfm.cuda_check --out" in summary and "--sim-smoke" in summary


def test_refuses_toy_sizes_on_a_gpu_and_real_sizes_on_the_simulator(tmp_path, capsys):
    args = ["--out", str(tmp_path)] + ([] if SIMULATOR else ["--sim-smoke"])
    assert cuda_check.main(args) == 2
    assert "--sim-smoke runs only under NUMBA_ENABLE_CUDASIM=1" in capsys.readouterr().err


def test_rows_reference_matches_the_full_reference(rng):
    import numpy as np

    from tfm import reference as ref

    q, k, v = (rng.standard_normal((2, 3, 11, 4)) for _ in range(3))
    keep = rng.random((2, 11)) > 0.3
    keep[1] = False  # a fully padded sequence
    rows = np.array([0, 4, 10])
    for causal in (False, True):
        full = ref.scaled_dot_product_attention(q, k, v, mask=keep[:, None, None, :], causal=causal)
        np.testing.assert_allclose(cuda_check.attention_rows_reference(q, k, v, rows, keep, causal),
                                   full[:, :, rows], rtol=1e-12, atol=1e-12)
