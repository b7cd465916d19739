"""The GPU run (``make gpu-check``, studies/gpu.py) end to end under the simulator, as CI runs it:
on a copy of the checkout without a virtual environment, through the Makefile, with
GPU_PYTHON set, writing every file; and its budget and mode checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import SIMULATOR

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not SIMULATOR, reason="the GPU run's --smoke mode runs only under the simulator")


def _clean_copy(dst: Path) -> Path:
    """The files a fresh clone would have (tracked, plus new files git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def test_make_gpu_check_smoke_on_a_clone_without_venv(tmp_path):
    clone = _clean_copy(tmp_path / "clone")
    out = tmp_path / "gpu-out"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_PYTHON={sys.executable}",
                           f"GPU_OUT={out}", "GPU_ARGS=--smoke --budget-s 1200"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (clone / ".venv").exists()  # GPU_PYTHON: nothing created, nothing installed
    assert "] studies: ok in" in proc.stdout and "] done" in proc.stdout  # progress with elapsed time
    names = sorted(os.listdir(out))
    assert names == sorted(["SUMMARY.md", "correctness.csv", "machine.json", "smoke.csv", "studies.csv"])
    assert len(names) <= 7  # the GPU machine keeps at most 8 files, one of them the caller's log

    machine = json.loads((out / "machine.json").read_text())
    assert machine["device_name"] == "cuda simulator" and machine["tfm_source"]
    assert machine["command"].startswith("python -m studies.gpu") and "--smoke" in machine["command"]
    smoke = pd.read_csv(out / "smoke.csv")
    from tfm.bench.conformance import CASES

    assert list(smoke["op"]) == [c.name for c in CASES]
    failed = smoke[~smoke["passed"].astype(bool)]  # the cuda backend has every op, forward and backward
    assert failed.empty and (smoke["status"] != "unavailable").all(), failed[["op", "status", "reason"]]
    correct = pd.read_csv(out / "correctness.csv")
    usable = correct["status"] == "ok"
    assert correct.loc[usable, "passed"].all()
    assert set(correct.loc[~usable, "check"]) <= {"linear_cupy", "linear_backward_cupy"}  # the simulator: no cuBLAS
    assert {"attention_fused", "attention_naive", "linear_numba", "lstm", "gru", "conv1d_dilated_causal",
            "restricted_attention", "encoder_decoder_forward"} <= set(correct["check"])
    studies = pd.read_csv(out / "studies.csv")
    from studies.gpu import GPU_STUDIES

    assert list(dict.fromkeys(studies["study"])) == list(GPU_STUDIES)
    assert (studies["status"] != "error").all(), studies.loc[studies["status"] == "error", ["study", "reason"]]
    good = studies[studies["status"] == "ok"]
    assert set(good["study"]) == set(GPU_STUDIES)  # every study measured something
    ours = good[~good["backend"].str.startswith("torch")]  # throughput's rows name each side: "tfm cuda", "torch ..."
    assert ours["backend"].isin(["cuda", "tfm cuda"]).all() and good["tfm_source"].eq(machine["tfm_source"]).all()
    seq = studies[studies["study"] == "sequential"]
    assert (seq["status"] == "ok").all() and (seq["repeats"].dropna() == 1).all()  # timed once: a simulator
    assert (good["device_name"] == "cuda simulator").all()
    peers = studies[studies["study"] == "peers"]  # PyTorch on the host under the simulator: tfm's device side checked
    ok = peers[peers["status"] == "ok"]
    assert ok["pair"].str.startswith(("attention vs SDPA (math)", "attention backward vs SDPA (math)", "gemm",
                                      "tiny forward", "tiny training step", "lstm", "gru", "conv1d")).all() \
        and len(ok) >= 8 and ok["pair"].str.contains("training step").any()
    assert (ok["rel_err"] < 1e-3).all() and ok["tfm_arithmetic"].str.contains("CUDA").all()
    assert (peers.loc[peers["status"] != "ok", "reason"].str.len() > 0).all()
    summary = (out / "SUMMARY.md").read_text()
    assert "## Smoke" in summary and "## Correctness at real sizes" in summary and "- peers:" in summary


def test_budget_turns_sections_into_reasoned_rows(tmp_path):
    from studies import gpu

    assert gpu.main(["--out", str(tmp_path), "--smoke", "--budget-s", "10", "--studies", "peers,scaling"]) == 0
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| smoke | over_budget |" in summary and "| correctness | over_budget |" in summary
    studies = pd.read_csv(tmp_path / "studies.csv")
    assert list(studies["study"]) == ["peers", "scaling"] and (studies["status"] == "over_budget").all()
    assert studies["reason"].str.contains("budget").all()


def test_stale_files_of_an_earlier_run_are_removed(tmp_path):
    from studies import gpu

    (tmp_path / "smoke.csv").write_text("op\nfrom an earlier run\n")
    gpu.main(["--out", str(tmp_path), "--smoke", "--budget-s", "10", "--studies", ""])
    assert not (tmp_path / "smoke.csv").exists()  # the section did not run: no old file passes for its output


def test_modes_must_match_the_simulator(tmp_path, capsys):
    from studies import gpu

    assert gpu.main(["--out", str(tmp_path)]) == 2  # real sizes refused under the simulator
    assert "--smoke runs only under NUMBA_ENABLE_CUDASIM=1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown studies"):
        gpu.main(["--out", str(tmp_path), "--smoke", "--studies", "nope"])
