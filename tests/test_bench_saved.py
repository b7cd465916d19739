"""Saved pytest-benchmark runs -> the tfm-vs-PyTorch table of ``make bench`` and the report.

The run here is real: a tiny benchmark file timed by pytest-benchmark in a subprocess and
saved with its own JSON schema, so a change in that schema fails this test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from studies import benchmarks as bench_study
from studies._report import Report
from tfm.bench.saved import load_run, newest_run, peer_table

BENCH_FILE = textwrap.dedent('''
    import time
    import pytest

    def _work(seconds):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass

    @pytest.mark.parametrize("impl", ["tfm", "torch"])
    def test_layer(benchmark, impl):
        benchmark.group = "layer n=8"
        benchmark.extra_info["flops"] = 2e6
        benchmark(_work, 0.002 if impl == "tfm" else 0.001)

    def test_tfm_alone(benchmark):
        benchmark.group = "generate (no peer)"
        benchmark(_work, 0.001)

    def test_torch_op(benchmark):
        benchmark.group = "op"
        benchmark.extra_info["flops"] = 1e6
        benchmark(_work, 0.001)

    def test_tfm_op(benchmark):
        benchmark.group = "op"
        benchmark.extra_info["flops"] = 1e6
        benchmark(_work, 0.0005)
''')


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "test_tiny_bench.py").write_text(BENCH_FILE)
    storage = d / ".benchmarks"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(d / "test_tiny_bench.py"),
         "--benchmark-only", f"--benchmark-storage=file://{storage}", "--benchmark-save=tiny",
         "--benchmark-min-rounds=5", "--benchmark-max-time=0.05", "--benchmark-warmup=off"],
        cwd=d, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = newest_run(storage)
    assert path is not None and path.name.endswith("_tiny.json")
    return path


def test_load_run_reads_every_timed_benchmark(saved_run):
    run = load_run(saved_run)
    assert len(run) == 5
    assert sorted(run.side) == ["tfm", "tfm", "tfm", "torch", "torch"]
    assert (run.median_s > 0).all() and (run.min_s <= run.median_s).all()
    assert run.loc[run.name == "test_torch_op", "side"].item() == "torch"
    assert run.loc[run.param == "torch", "side"].item() == "torch"


def test_peer_table_pairs_each_tfm_benchmark_with_its_groups_peer(saved_run):
    run = load_run(saved_run)
    t = peer_table(run).set_index("group")
    assert set(t.index) == {"layer n=8", "generate (no peer)", "op"}
    layer = t.loc["layer n=8"]
    tfm_s = run[(run.group == "layer n=8") & (run.side == "tfm")].median_s.item()
    torch_s = run[(run.group == "layer n=8") & (run.side == "torch")].median_s.item()
    assert layer.ratio == pytest.approx(tfm_s / torch_s)
    assert layer.tfm_gflops == pytest.approx(2e6 / tfm_s / 1e9)
    assert np.isnan(t.loc["generate (no peer)", "ratio"]) and t.loc["generate (no peer)", "torch_case"] == ""


def test_script_writes_the_table_and_the_report_shows_it(saved_run, tmp_path, capsys):
    assert "No saved benchmark run" in bench_study.section(Report(tmp_path))
    assert bench_study.main(["--run", str(saved_run), "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "tables" / "benchmarks.csv")
    assert len(table) == 3
    section = bench_study.section(Report(tmp_path))
    assert saved_run.name in section and "layer n=8" in section and "generate (no peer)" in section
    faster = int((table.ratio.dropna() < 1).sum())
    assert f"tfm is faster in {faster} of 2 paired benchmarks" in section and "_Sources:_" in section
    fam = bench_study.families(table)  # the README's per-family ranges: sizes dropped from the group
    assert fam["family"].tolist() == ["layer", "op"] and fam["benchmarks"].tolist() == [1, 1]
    assert "layer " in bench_study.readme(Report(tmp_path))


def test_script_without_a_run_says_what_to_do(tmp_path, capsys):
    assert bench_study.main(["--run", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 1
    assert "make bench" in capsys.readouterr().err
