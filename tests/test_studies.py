"""Smoke test of every study and the report on a tiny grid, plus the closed forms and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from studies import STUDIES, path_length, run_all
from studies.crossover import flops_nstar, time_nstar
from studies.report import agrees
from tfm.bench import deps


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    assert run_all.main(["--grid", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def _table(out, name):
    return pd.read_csv(out / "tables" / f"{name}.csv")


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
    # machine.json is the measuring run's own fingerprint, the one its rows carry
    machine = json.loads((smoke / "tables" / "machine.json").read_text())
    dates = set().union(*(set(_table(smoke, name)["date_utc"]) for name in STUDIES))
    assert machine["date_utc"] in dates


def test_path_lengths_equal_closed_forms(smoke):
    df = _table(smoke, "path_length")
    good = df[df["status"] == "ok"]
    assert len(good) == len(df)
    assert (good["measured"] == good["theory"]).all(), good[good["measured"] != good["theory"]]
    assert set(good["layer"]) == {"self_attention", "recurrent", "convolutional", "convolutional_dilated",
                                  "self_attention_restricted"}


def test_table1_and_report(smoke):
    t1 = _table(smoke, "table1")
    assert t1["layer"].tolist() == ["self_attention", "recurrent", "convolutional", "convolutional_dilated",
                                    "self_attention_restricted"]
    assert {"complexity", "sequential_ops", "path_length", "n_exponent", "n_exponent_ci95", "d_exponent",
            "d_exponent_ci95", "measured_sequential_ops", "measured_path_length"} <= set(t1.columns)
    assert np.isfinite(t1["n_exponent"]).all()
    report = (smoke / "REPORT.md").read_text()
    for heading in ("Table 1", "1. Scaling", "2. Sequential", "3. Maximum path length", "4. The n-vs-d crossover",
                    "5. Whole-model throughput", "6. Roofline", "tfm against PyTorch", "GPU", "Machine"):
        assert heading in report, heading
    for fig in ("scaling_n", "memory_n", "path_length", "crossover", "sequential", "roofline", "throughput", "peers"):
        assert (smoke / "figures" / f"{fig}.png").stat().st_size > 1000, fig
        assert (smoke / "figures" / f"{fig}.svg").exists(), fig
        assert f"figures/{fig}.png" in report, fig


def test_sequential_counts(smoke):
    df = _table(smoke, "sequential")
    c = df[(df["part"] == "count") & (df["status"] == "ok")]
    rec = c[c["layer"] == "recurrent"]
    assert (rec["sequential_ops"] == rec["n"]).all() and len(rec) > 0
    others = c[c["layer"] != "recurrent"]
    assert others.groupby("layer")["sequential_ops"].nunique().eq(1).all()  # constant in n


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
    from studies.report import provenance

    prov = provenance(smoke)
    assert set(prov["study"]) == set(STUDIES)
    for name in STUDIES:
        assert prov.loc[prov["study"] == name, "rows"].sum() == len(_table(smoke, name)), name
    assert prov["date_utc"].notna().all() and prov["tfm_source"].notna().all()
    report = (smoke / "REPORT.md").read_text()
    assert "Where the rows come from" in report
    assert prov["date_utc"].iloc[0] in report


@pytest.mark.parametrize("n", [2, 16, 37, 100])
@pytest.mark.parametrize("layer, p, causal", [
    ("convolutional", 3, False), ("convolutional", 3, True), ("convolutional", 5, False),
    ("self_attention_restricted", 8, False), ("self_attention_restricted", 5, True),
])
def test_closed_forms_match_bfs_on_the_reference(n, layer, p, causal):
    kw = {"k": p} if layer == "convolutional" else {"window": p}
    rel, _ = deps.one_hop(deps.apply_fn(layer, d=2, backend="numpy", causal=causal, **kw), n, 2)
    measured = deps.max_path(deps.stack_path_lengths(rel, 4 * n), causal)
    assert measured == path_length.theory(layer, n, p, causal)[0]


def test_dilated_closed_form():
    assert path_length.theory("convolutional_dilated", 1024, 2, True)[0] == 10
    assert path_length.theory("convolutional_dilated", 1025, 2, True)[0] == 11
    assert path_length.theory("convolutional_dilated", 81, 3, True)[0] == 4


def test_crossover_helpers():
    assert flops_nstar(512, "lstm") == pytest.approx(1024, rel=0.01)  # 4 n^2 d = 8 n d^2 -> n* = 2d
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


def test_cli(tmp_path, capsys):
    from tfm.cli import main

    assert main(["info"]) == 0
    assert "cpu: available" in capsys.readouterr().out
    assert main(["study", "path_length", "--grid", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "tables" / "path_length.csv").exists()
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "REPORT.md").exists()
    with pytest.raises(SystemExit):
        main(["study", "nonexistent"])
