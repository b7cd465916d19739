"""Every study and the report on a tiny grid, the Table 1 registry, the GPU section, the README blocks, the CLI."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from studies import GPU_STUDIES, STUDIES, run_all
from studies.crossover import flops_nstar, time_nstar
from studies.scaling import agrees
from tfm import table1
from tfm.bench import deps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    assert run_all.main(["--grid", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def _table(out, name):
    return pd.read_csv(out / "tables" / f"{name}.csv")


def _module(name):
    return importlib.import_module(f"studies.{name}")


def test_every_study_writes_a_sane_table(smoke):
    for name in STUDIES:
        df = _table(smoke, name)
        assert len(df) > 0, name
        assert {"status", "reason", "case_id", "cpu_model", "git_commit", "sgemm_gflops"} <= set(df.columns), name
        assert set(df["status"]) <= {"ok", "oom", "over_budget", "unavailable"}, (name, df[df["status"] == "error"])
        bad = df[df["status"] != "ok"]
        assert bad["reason"].fillna("").astype(str).str.len().gt(0).all(), name  # every NaN row says why
        good = df[df["status"] == "ok"]
        assert len(good) > 0, name
        if "time_s" in good.columns:
            assert (good["time_s"].dropna() > 0).all(), name
        if "layer" in df.columns:  # one name per layer: the registry's
            assert set(df["layer"]) <= set(table1.LAYERS) | set(table1.ROWS), name
    # machine.json is the measuring run's own fingerprint, the one its rows carry
    machine = json.loads((smoke / "tables" / "machine.json").read_text())
    dates = set().union(*(set(_table(smoke, name)["date_utc"]) for name in STUDIES))
    assert machine["date_utc"] in dates


def test_path_lengths_equal_closed_forms(smoke):
    df = _table(smoke, "path_length")
    good = df[df["status"] == "ok"]
    assert len(good) == len(df)
    assert (good["measured"] == good["theory"]).all(), good[good["measured"] != good["theory"]]
    assert set(good["layer"]) == set(table1.ROWS)


def test_table1_and_report(smoke):
    t1 = _table(smoke, "table1")
    assert t1["layer"].tolist() == list(table1.ROWS)
    assert {"complexity", "sequential_ops", "path_length", "n_exponent", "n_exponent_ci95", "d_exponent",
            "d_exponent_ci95", "measured_sequential_ops", "measured_path_length"} <= set(t1.columns)
    assert np.isfinite(t1["n_exponent"]).all()
    assert (t1["measured_path_length"] != "not measured").all()
    report = (smoke / "REPORT.md").read_text()
    for heading in ("Table 1", "1. Scaling", "2. Sequential", "3. Maximum path length", "4. The n-vs-d crossover",
                    "5. Whole-model throughput", "6. Roofline", "7. tfm against PyTorch", "The GPU run", "Machine"):
        assert heading in report, heading
    for fig in ("scaling_n", "memory_n", "path_length", "crossover", "sequential", "roofline", "throughput", "peers"):
        assert (smoke / "figures" / f"{fig}.png").stat().st_size > 1000, fig
        assert (smoke / "figures" / f"{fig}.svg").exists(), fig
        assert f"figures/{fig}.png" in report, fig


def test_every_report_section_names_its_sources(smoke):
    report = (smoke / "REPORT.md").read_text()
    sections = re.split(r"^## ", report, flags=re.M)[1:]
    assert len(sections) >= len(STUDIES) + 4
    for sec in sections:
        title = sec.splitlines()[0]
        if title.startswith(("Machine", "Cases not measured")):
            assert "tables/" in sec or "columns of every table" in sec, title
            continue
        assert "_Sources:_" in sec, title
    for name in STUDIES:  # each study's section names the function behind each of its figures
        mod = _module(name)
        for fig, fn in mod.FIGURES.items():
            assert f"`{fn.__module__}.{fn.__qualname__}`" in report, (name, fig)


def test_sequential_counts(smoke):
    df = _table(smoke, "sequential")
    c = df[(df["part"] == "count") & (df["status"] == "ok")]
    rec = c[c["layer"] == "recurrent"]
    assert (rec["sequential_ops"] == rec["n"]).all() and len(rec) > 0
    others = c[c["layer"] != "recurrent"]
    assert others.groupby("layer")["sequential_ops"].nunique().eq(1).all()  # constant in n
    assert set(c["paper"]) == {r.sequential_ops for r in table1.ROWS.values()}


def test_rerun_resumes_without_measuring(smoke, monkeypatch):
    before = _table(smoke, "roofline")
    machine = (smoke / "tables" / "machine.json").read_text()
    assert run_all.main(["--grid", "smoke", "--out", str(smoke), "--only", "roofline", "--no-progress",
                         "--no-report"]) == 0
    after = _table(smoke, "roofline")
    pd.testing.assert_frame_equal(before, after)
    # a run that measured nothing leaves the measuring run's machine record alone
    assert (smoke / "tables" / "machine.json").read_text() == machine


def test_report_lists_where_rows_come_from(smoke):
    from studies._report import Report
    from studies.report import provenance

    prov = provenance(Report(smoke))
    assert set(prov["study"]) == set(STUDIES)
    for name in STUDIES:
        assert prov.loc[prov["study"] == name, "rows"].sum() == len(_table(smoke, name)), name
    assert prov["date_utc"].notna().all() and prov["tfm_source"].notna().all()
    report = (smoke / "REPORT.md").read_text()
    assert "Where the rows come from" in report
    assert prov["date_utc"].iloc[0] in report


# ----------------------------------------------------------------------------- the registry
@pytest.mark.parametrize("n", [2, 16, 37, 100])
@pytest.mark.parametrize("row, p, causal", [
    ("convolutional", 3, False), ("convolutional", 3, True), ("convolutional", 5, False),
    ("self_attention_restricted", 8, False), ("self_attention_restricted", 5, True),
])
def test_closed_forms_match_bfs_on_the_reference(n, row, p, causal):
    kw = {"k": p} if row == "convolutional" else {"window": p}
    rel, _ = deps.one_hop(deps.apply_fn(row, d=2, backend="numpy", causal=causal, **kw), n, 2)
    measured = deps.max_path(deps.stack_path_lengths(rel, 4 * n), causal)
    assert measured == table1.max_path_length(row, n, p, causal)[0]


def test_dilated_closed_form_and_bad_input():
    assert table1.max_path_length("convolutional_dilated", 1024, 2, True)[0] == 10
    assert table1.max_path_length("convolutional_dilated", 1025, 2, True)[0] == 11
    assert table1.max_path_length("convolutional_dilated", 81, 3, True)[0] == 4
    assert table1.max_path_length("recurrent", 50)[0] == 50 and table1.max_path_length("self_attention", 50)[0] == 1
    with pytest.raises(ValueError, match="unknown Table 1 row"):
        table1.max_path_length("transformer", 8)
    with pytest.raises(ValueError, match="k must be"):
        table1.max_path_length("convolutional", 8, 1)
    with pytest.raises(ValueError, match="reaches no other position"):
        table1.max_path_length("convolutional", 8, 2, causal=False)
    with pytest.raises(ValueError, match="n must be"):
        table1.max_path_length("recurrent", 1)


def test_registry_is_consistent():
    for lay in table1.LAYERS.values():
        assert lay.row is None or lay.row in table1.ROWS, lay.name
        assert len(lay.exponents) == 2 and lay.paper_complexity.startswith("O(")
    for row in table1.ROWS.values():  # every Table 1 row is measured under its own name
        assert table1.LAYERS[row.name].row == row.name
    assert f"k={table1.K}" in table1.label("convolutional")
    assert f"dilation {table1.DILATION}" in table1.label("convolutional_dilated")
    assert f"r={table1.R}" in table1.label("self_attention_restricted")
    assert table1.LAYERS["convolutional_dilated"].params["dilation"] == table1.DILATION
    assert set(table1.LEGACY_NAMES.values()) <= set(table1.LAYERS)
    with pytest.raises(ValueError, match="unknown layer"):
        table1.layer("attention_fused")


def _code(paths):
    for path in paths:
        yield path, path.read_text()


def test_table1_facts_are_written_once():
    """The paper's complexities, path lengths and the layers' labels and parameters appear, among the
    code that measures and reports, in tfm/table1.py only."""
    facts = {r.complexity for r in table1.ROWS.values()} | {r.path_length for r in table1.ROWS.values()}
    facts = {f for f in facts if f not in ("O(1)", "O(n)")}  # too short to tell apart from prose
    facts |= {lay.label for lay in table1.LAYERS.values()} | {"O(log_k(n))", "O(n/r)", "r=16", "dilation=4"}
    files = [p for p in sorted((ROOT / "studies").glob("*.py")) if p.name != "gpu.py"]
    files += sorted((ROOT / "tfm" / "bench").glob("*.py")) + [ROOT / "tfm" / n for n in ("cli.py", "cost.py")]
    for path, text in _code(files):
        for fact in facts:
            assert fact not in text, f"{path.relative_to(ROOT)} restates {fact!r}: read tfm.table1"


def test_the_list_of_studies_is_written_once():
    files = [ROOT / "tfm" / "cli.py"] + sorted((ROOT / "studies").glob("*.py"))
    listing = re.compile(r"\(\s*\"scaling\",\s*\"sequential\"")
    for path, text in _code(files):
        if path.name != "__init__.py":
            assert not listing.search(text), f"{path.relative_to(ROOT)} lists the studies: use studies.STUDIES"
    assert set(GPU_STUDIES) <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_study_modules_expose_their_parts(name):
    mod = _module(name)
    for attr in ("NAME", "TITLE", "GRIDS", "arg_parser", "build", "measure", "FIGURES"):
        assert hasattr(mod, attr), (name, attr)
    assert hasattr(mod, "section") or (isinstance(mod.INTRO, str) and callable(mod.results)), name
    assert mod.NAME == name and "smoke" in mod.GRIDS
    assert ("gpu" in mod.GRIDS) == (name in GPU_STUDIES), name
    for grid in mod.GRIDS:  # every grid builds on every backend
        for backend in ("cpu", "cuda"):
            study = mod.build(mod.arg_parser().parse_args(["--backend", backend, "--grid", grid]))
            assert study.options == {"backend": backend, "grid": grid} and len(study.cases) > 0, (grid, backend)
    for derive in getattr(mod, "DERIVED", {}).values():
        assert derive(pd.DataFrame({"status": []})).empty  # no rows: an empty table, not an error


def test_study_rejects_unknown_backend():
    with pytest.raises(SystemExit):
        _module("scaling").arg_parser().parse_args(["--backend", "tpu"])


# ----------------------------------------------------------------------------- rules
def test_crossover_helpers():
    assert flops_nstar(512, "recurrent") == pytest.approx(1024, rel=0.01)  # 4 n^2 d = 8 n d^2 -> n* = 2d
    assert math.isnan(flops_nstar(512, "rnn"))  # projections alone outweigh a plain RNN
    att = pd.DataFrame({"n": [16, 32, 64], "min_s": [1.0, 2.0, 8.0]})
    rec = pd.DataFrame({"n": [16, 32, 64], "min_s": [4.0, 4.0, 4.0]})
    n, how = time_nstar(att, rec)
    assert how == "interpolated" and 32 < n < 64
    noisy = pd.DataFrame({"n": [16, 32, 64], "min_s": [5.0, 2.0, 8.0]})  # a load spike at n=16
    n, how = time_nstar(noisy, rec)
    assert how == "interpolated" and 32 < n < 64
    n, how = time_nstar(pd.DataFrame({"n": [16, 32, 64], "min_s": [1.0, 1.0, 2.0]}), rec)
    assert "extrapolated" in how or "no crossing" in how


def test_agreement_rule():
    assert agrees(1.9, 1.8, 2.0, 2) and agrees(2.2, np.nan, np.nan, 2)
    assert not agrees(1.5, 1.4, 1.6, 2) and not agrees(np.nan, 0, 3, 2)
    assert not agrees(0.6, -0.9, 2.1, 2)  # an interval this wide proves nothing


def test_sequential_growth_reads_flat_and_linear():
    from studies.sequential import growth

    n = np.array([16, 32, 64, 128, 256, 512])
    rows = pd.DataFrame({"part": "time", "b": 1, "d": 64, "n": np.tile(n, 2), "status": "ok",
                         "layer": ["self_attention"] * 6 + ["recurrent"] * 6,
                         "min_s": np.r_[[1e-4] * 4, 3e-4, 6e-4, 1e-4 * n / 16]})
    g = growth(rows).set_index("layer")
    assert g.loc["self_attention", "flat_up_to_n"] == 128
    assert g.loc["recurrent", "flat_up_to_n"] == 32 and g.loc["recurrent", "time_exponent"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the GPU section
def _gpu_run(out: Path) -> pd.DataFrame:
    """A results/gpu folder holding the committed GPU run's study rows (measured on a real GPU by
    ``make gpu-check``; tests/cuda/test_gpu_run.py runs that command under the simulator) under a
    test machine description, so the report shows which run it drew."""
    gpu = out / "gpu"
    shutil.rmtree(gpu, ignore_errors=True)
    gpu.mkdir()
    rows = pd.read_csv(ROOT / "results" / "gpu" / "studies.csv")
    rows.to_csv(gpu / "studies.csv", index=False)
    (gpu / "machine.json").write_text(json.dumps({"device_name": "cuda simulator (test)",
                                                  "date_utc": "2030-01-02T03:04:05Z", "git_commit": "abc"}))
    pd.DataFrame({"check": ["attention"], "passed": [True]}).to_csv(gpu / "correctness.csv", index=False)
    return rows


def test_report_renders_gpu_rows(smoke, tmp_path):
    from studies.report import write_report

    out = tmp_path / "results"
    shutil.copytree(smoke, out)
    rows = _gpu_run(out)
    measured = set(rows.loc[rows["status"] == "ok", "study"])
    assert "sequential" in measured  # the committed run has the O(1)-vs-O(n) rows
    report = write_report(out).read_text()
    assert "GPU rows from the `make gpu-check` run of 2030-01-02T03:04:05Z on cuda simulator (test)" in report
    assert (out / "figures" / "sequential_gpu.png").stat().st_size > 1000  # the O(1) figure, drawn at home
    assert "figures/sequential_gpu.png" in report
    gpu_part = report.split("## 2. Sequential operations")[1].split("### On the GPU")[1].split("## 3.")[0]
    assert "flat_up_to_n" in gpu_part and "recurrent" in gpu_part
    scaling = report.split("## 1. Scaling")[1].split("## 2.")[0]
    assert ("No GPU rows" in scaling) == ("scaling" not in measured)  # a study without GPU rows says so
    assert "`gpu/correctness.csv`: 1 rows" in report


def test_report_says_why_there_are_no_gpu_rows(smoke, tmp_path):
    from studies.report import write_report

    out = tmp_path / "results"
    shutil.copytree(smoke, out)
    shutil.rmtree(out / "gpu", ignore_errors=True)
    report = write_report(out, draw=False).read_text()
    assert "No GPU run is committed" in report and "No GPU rows: no GPU run is committed" in report
    (out / "gpu").mkdir()
    (out / "gpu" / "device.csv").write_text("device\nNVIDIA H200\n")
    report = write_report(out, draw=False).read_text()
    assert "older format" in report and "`gpu/device.csv`" in report


# ----------------------------------------------------------------------------- README
def test_committed_readme_blocks_are_generated_from_committed_tables():
    from studies._report import Report
    from studies.overview import readme_blocks
    from studies.report import readme_block_text

    committed = readme_block_text(ROOT / "README.md")
    generated = readme_blocks(Report(ROOT / "results"))
    assert set(committed) == set(generated)
    for name, text in generated.items():
        assert committed[name] == text, f"README block {name!r} differs: run `python -m studies.report`"


def test_update_readme_replaces_only_the_blocks(tmp_path):
    from studies.report import readme_block_text, update_readme

    p = tmp_path / "README.md"
    p.write_text("intro\n<!-- begin generated: results (x) -->\nold\n<!-- end generated: results -->\nrest\n")
    update_readme(p, {"results": "new\n"})
    assert p.read_text() == "intro\n<!-- begin generated: results (x) -->\nnew\n<!-- end generated: results -->\nrest\n"
    assert readme_block_text(p) == {"results": "new\n"}
    with pytest.raises(ValueError, match="performance"):
        update_readme(p, {"performance": "x"})


# ----------------------------------------------------------------------------- CLI
def test_cli(tmp_path, capsys):
    from tfm.cli import main

    assert main(["info"]) == 0
    assert "cpu: available" in capsys.readouterr().out
    assert main(["study", "path_length", "--grid", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "tables" / "path_length.csv").exists()
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "REPORT.md").exists()
    capsys.readouterr()
    assert main(["study"]) == 2
    usage = capsys.readouterr().out
    assert all(name in usage for name in STUDIES)
    with pytest.raises(SystemExit):
        main(["study", "nonexistent"])
