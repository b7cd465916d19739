"""The measurement harness (tfm.bench): timing, memory, fits, study runner, dependency probing."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from tfm.bench import Skip, Study, loglog_slope, peak_memory, run_study, time_call, time_pair
from tfm.bench import deps
from tfm.bench.layers import KINDS, make_layer
from tfm.bench.machine import fingerprint, measure_bandwidth_gbs, measure_sgemm_gflops
from tfm.bench.memory import rss_supported
from tfm.bench.study import load_table, write_atomic


# ----------------------------------------------------------------------------- timing
def test_time_call_separates_first_call_and_repeats_to_min():
    calls = []
    t = time_call(lambda: calls.append(1), budget_s=0.0, min_repeats=5)
    assert t.repeats == 5 and len(calls) == 6  # first (compile) call + 5 timed
    assert 0 <= t.min_s <= t.q25_s <= t.median_s <= t.q75_s and t.iqr_s >= 0 and t.compile_s >= 0


def test_time_call_stops_after_one_call_longer_than_budget():
    t = time_call(lambda: time.sleep(0.03), budget_s=0.01, min_repeats=5)
    assert t.repeats == 1 and t.median_s >= 0.03


def test_time_call_sync_is_called_for_every_call():
    synced = []
    time_call(lambda: None, budget_s=0.0, min_repeats=3, sync=lambda: synced.append(1))
    assert len(synced) >= 4


@pytest.mark.parametrize("kw", [dict(min_repeats=0), dict(max_repeats=1, min_repeats=3), dict(budget_s=-1.0)])
def test_time_call_rejects_bad_counts(kw):
    with pytest.raises(ValueError):
        time_call(lambda: None, **kw)


def test_time_pair_interleaves():
    order = []
    a, b = time_pair(lambda: order.append("a"), lambda: order.append("b"), budget_s=0.0, min_repeats=4)
    assert order == ["a", "b"] * 5 and a.repeats == b.repeats == 4
    assert len(a.samples) == 4 and "samples" not in a.as_row()


def test_paired_ratio_is_the_median_round_ratio_with_an_interval():
    from tfm.bench.timing import Timing, paired_ratio

    def timing(samples):
        return Timing.from_samples(samples, 0.0)

    rng = np.random.default_rng(0)
    drift = np.exp(rng.normal(0, 0.3, 40))  # machine speed per round, shared by both sides
    a, b = timing(0.8 * drift * np.exp(rng.normal(0, 0.01, 40))), timing(drift)
    med, lo, hi = paired_ratio(a, b)
    assert lo <= med <= hi and 0.78 < lo and hi < 0.82 and med == pytest.approx(0.8, abs=0.01)
    assert paired_ratio(a, b) == (med, lo, hi)  # fixed seed: the same interval every time
    assert np.isnan(paired_ratio(timing([1.0, 2.0]), timing([1.0, 1.0]))[1])
    with pytest.raises(ValueError, match="rounds"):
        paired_ratio(timing([1.0, 2.0]), timing([1.0]))


def test_time_once_makes_one_call():
    from tfm.bench.timing import time_once

    calls, synced = [], []
    t = time_once(lambda: calls.append(1), sync=lambda: synced.append(1))
    assert calls == [1] and len(synced) == 2 and t.repeats == 1 and t.median_s == t.compile_s


# ----------------------------------------------------------------------------- memory
def test_peak_memory_sees_numpy_allocation():
    m = peak_memory(lambda: np.ones(8 * 2 ** 20))  # 64 MiB, touched
    assert m.traced_bytes >= 64 * 2 ** 20
    if rss_supported():
        assert m.rss_bytes >= 48 * 2 ** 20


@pytest.mark.skipif(not rss_supported(), reason="RSS high-water reset needs Linux /proc/self/clear_refs")
def test_peak_memory_rss_sees_numba_allocation():
    from numba import njit

    @njit(cache=False)
    def alloc(n):
        a = np.ones(n)
        return a.sum()

    alloc(10)
    m = peak_memory(lambda: alloc(8 * 2 ** 20))
    assert m.rss_bytes >= 48 * 2 ** 20
    small = peak_memory(lambda: alloc(1000))
    assert small.rss_bytes < 8 * 2 ** 20


# ----------------------------------------------------------------------------- fits
def test_loglog_slope_recovers_exponent_with_interval(rng):
    x = 2.0 ** np.arange(4, 15)
    y = 3e-9 * x ** 2 * np.exp(rng.normal(0, 0.03, x.size))
    f = loglog_slope(x, y)
    assert abs(f.slope - 2) < 0.1 and f.ci_low < 2 < f.ci_high
    assert f.x_from == 2.0 ** 9 and f.x_to == 2.0 ** 14  # upper half on a log scale: x >= sqrt(16 * 16384)


def test_loglog_slope_uses_asymptotic_range():
    x = 2.0 ** np.arange(0, 13)
    f = loglog_slope(x, 1000.0 + x ** 2)  # constant dominates small x
    assert 1.7 < f.slope < 2.05
    assert loglog_slope(x, 1000.0 + x ** 2, min_points=13).slope < 1.7  # the full range is not asymptotic


def test_loglog_slope_degenerate_inputs():
    assert np.isnan(loglog_slope([1.0], [2.0]).slope)
    assert np.isnan(loglog_slope([1.0, 2.0], [0.0, np.nan]).slope)
    f = loglog_slope([1.0, 2.0], [1.0, 4.0])
    assert f.slope == pytest.approx(2.0) and np.isnan(f.ci_low)


# ----------------------------------------------------------------------------- machine
def test_fingerprint_and_ceilings():
    fp = fingerprint()
    for key in ("cpu_model", "numba_threads", "git_commit", "date_utc", "v_numpy", "v_numba"):
        assert key in fp and fp[key] not in (None, "")
    assert measure_sgemm_gflops(128, 1) > 0.01
    assert measure_bandwidth_gbs(2 ** 22, 1) > 0.01


# ----------------------------------------------------------------------------- study runner
def _study(name, measure, cases, **kw):
    return Study(name, name, cases, measure, **kw)


def test_run_study_rows_resume_and_fresh(tmp_path):
    seen = []

    def measure(case, ctx):
        seen.append(case["n"])
        return {"time_s": 0.5 * case["n"], "flops": 1e9 * case["n"], "bytes": 1e9}

    st = _study("toy", measure, [{"n": n} for n in (1, 2, 3)])
    df = run_study(st, tmp_path, quick=True, progress=False)
    assert list(df["status"]) == ["ok"] * 3 and seen == [1, 2, 3]
    assert np.allclose(df["gflops"], 2.0) and np.allclose(df["gbs"], df["bytes"] / df["time_s"] / 1e9)
    assert {"cpu_model", "git_commit", "sgemm_gflops", "mem_bw_gbs"} <= set(df.columns)
    assert np.allclose(df["frac_sgemm"], 2.0 / df["sgemm_gflops"])
    run_study(st, tmp_path, quick=True, progress=False)
    assert seen == [1, 2, 3]  # resumed: nothing measured again
    run_study(st, tmp_path, quick=True, fresh=True, progress=False)
    assert seen == [1, 2, 3, 1, 2, 3]
    assert len(load_table(tmp_path, "toy")) == 3
    assert json.loads((tmp_path / "tables" / "machine.json").read_text())["sgemm_gflops"] > 0


def test_run_study_measures_rows_of_other_code_again(tmp_path, monkeypatch):
    """Saved rows are reused only if measured under the current tfm sources."""
    import tfm.bench.machine as machine

    seen = []

    def measure(case, ctx):
        seen.append(case["n"])
        return {"time_s": 0.1}

    st = _study("toy", measure, [{"n": n} for n in (1, 2)])
    df = run_study(st, tmp_path, quick=True, progress=False)
    assert set(df["tfm_source"]) == {machine.fingerprint()["tfm_source"]}  # the hash when the process started
    monkeypatch.setattr(machine, "source_hash", lambda: "edited-code")
    machine.fingerprint.cache_clear()  # cached per process (the code cannot change in one)
    try:
        df = run_study(st, tmp_path, quick=True, progress=False)
        assert seen == [1, 2, 1, 2] and set(df["tfm_source"]) == {"edited-code"}
    finally:
        monkeypatch.undo()
        machine.fingerprint.cache_clear()
    table = load_table(tmp_path, "toy")
    table.drop(columns="tfm_source").to_csv(tmp_path / "tables" / "toy.csv", index=False)
    run_study(st, tmp_path, quick=True, progress=False)  # rows from before the column: again
    assert seen == [1, 2, 1, 2, 1, 2]


def test_source_hash_matches_the_makefile():
    """studies key the Numba cache and saved rows on the hash the Makefile computes."""
    import subprocess

    from tfm._source import ROOT, source_hash

    make = subprocess.run(["make", "-s", "--no-print-directory", "-f", "-", "h"], cwd=ROOT,
                          input="include Makefile\nh:\n\t@echo $(SRC_HASH)\n", text=True,
                          capture_output=True, check=True).stdout.split()[-1]
    assert make == source_hash()


@pytest.mark.parametrize("exc, status", [
    (ImportError("kernel module missing"), "unavailable"),
    (NotImplementedError("no kernel"), "unavailable"),
    (MemoryError("too big"), "oom"),
    (Skip("predicted too slow", "over_budget"), "over_budget"),
    (RuntimeError("a bug"), "error"),
])
def test_run_study_failures_become_nan_rows_with_reasons(tmp_path, exc, status):
    def measure(case, ctx):
        if case["n"] == 2:
            raise exc
        return {"time_s": 1e-3}

    df = run_study(_study("fail", measure, [{"n": n} for n in (1, 2)]), tmp_path, quick=True, progress=False)
    bad = df[df["n"] == 2].iloc[0]
    assert bad["status"] == status and str(exc) in bad["reason"] and np.isnan(bad["time_s"])


def test_run_study_retries_unavailable_rows(tmp_path):
    ready = {"flag": False}

    def measure(case, ctx):
        if not ready["flag"]:
            raise ImportError("not yet")
        return {"time_s": 1e-3}

    st = _study("retry", measure, [{"n": 1}])
    assert run_study(st, tmp_path, quick=True, progress=False)["status"].tolist() == ["unavailable"]
    ready["flag"] = True
    assert run_study(st, tmp_path, quick=True, progress=False)["status"].tolist() == ["ok"]


def test_run_study_skips_cases_predicted_over_budget(tmp_path):
    seen = []

    def measure(case, ctx):
        seen.append(case["n"])
        return {"time_s": 0.1 * case["n"]}

    cases = [{"d": d, "n": n} for d in (1, 2) for n in (1, 2, 4, 8)]
    df = run_study(_study("budget", measure, cases, grow="n", exponent=1.0, max_call_s=0.25), tmp_path,
                   quick=True, progress=False)
    assert seen == [1, 2, 1, 2]
    skipped = df[df["status"] == "over_budget"]
    assert sorted(skipped["n"]) == [4, 4, 8, 8]
    assert skipped["reason"].str.contains("budget|skipped").all()


def test_run_study_interrupt_keeps_rows_and_resumes(tmp_path):
    seen = []

    def measure(case, ctx):
        if case["n"] == 3 and not seen.count("resumed"):
            raise KeyboardInterrupt
        seen.append(case["n"])
        return {"time_s": 1e-3}

    st = _study("intr", measure, [{"n": n} for n in (1, 2, 3, 4)])
    with pytest.raises(KeyboardInterrupt):
        run_study(st, tmp_path, quick=True, progress=False)
    assert load_table(tmp_path, "intr")["n"].tolist() == [1, 2]
    seen.append("resumed")
    df = run_study(st, tmp_path, quick=True, progress=False)
    assert seen == [1, 2, "resumed", 3, 4] and df["n"].tolist() == [1, 2, 3, 4]


def test_device_rows_are_compared_with_the_device_ceilings():
    from tfm.bench.study import _derived

    ceilings = {"sgemm_gflops": 100.0, "mem_bw_gbs": 10.0, "device_sgemm_gflops": 40000.0,
                "device_mem_bw_gbs": 4000.0, "device_fp32_peak_gflops": 64000.0}
    host, device = {"time_s": 1.0, "flops": 8e12, "bytes": 2e12}, {"time_s": 1.0, "flops": 8e12, "bytes": 2e12}
    _derived(host, ceilings)
    _derived(device, ceilings, on_device=True)
    assert host["frac_sgemm"] == 80.0 and host["frac_bw"] == 200.0 and "frac_peak" not in host
    assert device["frac_sgemm"] == 0.2 and device["frac_bw"] == 0.5 and device["frac_peak"] == 0.125
    missing = {"time_s": 1.0, "flops": 1e9}
    _derived(missing, {"sgemm_gflops": 1.0, "device_sgemm_gflops": float("nan")}, on_device=True)
    assert np.isnan(missing["frac_sgemm"]) and np.isnan(missing["frac_peak"])  # not measured: NaN, no crash


def test_study_validation():
    with pytest.raises(ValueError, match="identifier"):
        Study("bad name", "", [], lambda c, x: {})
    with pytest.raises(TypeError, match="dict"):
        Study("ok", "", [1], lambda c, x: {})
    with pytest.raises(ValueError, match="status"):
        Skip("x", "weird")


def test_write_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "t" / "a.csv"
    write_atomic(pd.DataFrame({"x": [1, 2]}), p)
    write_atomic(pd.DataFrame({"x": [3]}), p)
    assert pd.read_csv(p)["x"].tolist() == [3] and len(list(p.parent.iterdir())) == 1


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("kind", KINDS)
def test_make_layer_runs_with_positive_cost(kind):  # every registry layer
    lay = make_layer(kind, n=37, d=64, b=2, backend="numpy")
    out = lay.run()
    first = out[0] if isinstance(out, tuple) else out
    assert np.all(np.isfinite(first)) and lay.flops > 0 and lay.bytes > 0


def test_make_layer_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown layer"):
        make_layer("transformer", n=4, d=4)
    with pytest.raises(ValueError, match="n must be"):
        make_layer("recurrent", n=0, d=4)
    with pytest.raises(ValueError, match="window must be"):
        make_layer("self_attention_restricted", n=4, d=4, window=0)
    with pytest.raises(ValueError, match="make_layer takes k, dilation and window"):
        make_layer("convolutional", n=4, d=4, kernel_size=3)


def test_make_layer_reads_its_parameters_from_the_registry():
    from tfm import cost
    from tfm.table1 import K, R

    conv = make_layer("convolutional_dilated", n=40, d=8, backend="numpy")
    assert conv.flops == cost.flops("conv1d", b=1, n_out=40, c_in=8, c_out=8, k=K)
    wide = make_layer("convolutional", n=40, d=8, backend="numpy", k=5)
    assert wide.flops == cost.flops("conv1d", b=1, n_out=40, c_in=8, c_out=8, k=5)
    att = make_layer("self_attention_restricted", n=40, d=8, backend="numpy")
    assert att.flops == cost.flops("restricted_attention", b=1, h=1, n=40, d=8, window=R)


# ----------------------------------------------------------------------------- dependencies
def _conv(k, dilation=1, causal=False):
    return deps.apply_fn("convolutional", d=3, backend="numpy", k=k, dilation=dilation, causal=causal)


@pytest.mark.parametrize("k, causal", [(3, False), (5, True), (4, False)])
def test_one_hop_conv_matches_its_band(k, causal):
    n = 23
    rel, how = deps.one_hop(_conv(k, causal=causal), n, 3)
    left = k - 1 if causal else (k - 1) // 2
    i, j = np.indices((n, n))
    # input i feeds output j when i = j - left + tap for a tap in 0..k-1
    expect = (i >= j - left) & (i <= j - left + k - 1)
    assert np.array_equal(rel, expect) and how.startswith("all")


def test_one_hop_sampled_equals_exhaustive():
    f = _conv(5, dilation=2)
    full, _ = deps.one_hop(f, 300, 3)
    sampled, how = deps.one_hop(f, 300, 3, exhaustive_max=100)
    assert np.array_equal(full, sampled) and "translation invariance verified" in how
    att = deps.apply_fn("self_attention", d=3, backend="numpy", causal=True)
    rel, how = deps.one_hop(att, 200, 3, exhaustive_max=50)
    assert np.array_equal(rel, np.triu(np.ones((200, 200), dtype=bool))) and "j >= i" in how


def test_one_hop_rejects_position_dependent_layers():
    def mixer(x):  # output j sums inputs j and 2j mod n: not a band
        n = x.shape[1]
        return x + x[:, (2 * np.arange(n)) % n]

    with pytest.raises(ValueError, match="translation invariant|pattern"):
        deps.one_hop(mixer, 300, 2, exhaustive_max=100)


def test_stack_path_lengths_chain_and_dense():
    n = 9
    chain = np.eye(n, dtype=bool) | np.eye(n, k=1, dtype=bool)  # i -> i, i + 1
    dist = deps.stack_path_lengths(chain, 100)
    assert dist[0, 8] == 8 and dist[3, 3] == 1 and np.isinf(dist[5, 2])
    assert deps.max_path(dist, causal=True) == 8
    assert deps.max_path(deps.stack_path_lengths(np.ones((n, n), dtype=bool), 5), causal=False) == 1
    # a per-layer relation function (e.g. dilations): the same chain, layer by layer
    assert deps.max_path(deps.stack_path_lengths(lambda l: chain, 100), causal=True) == 8


def test_recurrent_structure_and_unrolled_paths():
    s = deps.recurrent_structure(deps.apply_fn("recurrent", d=3, backend="numpy"), 40, 3)
    assert s["cell_depends_on_x"] and s["cell_depends_on_h"] and s["input_reaches_later_outputs"]
    assert s["chain_rel_err"] < 1e-12
    dist = deps.unrolled_path_lengths(40)
    assert dist[0, 39] == 40 and dist[5, 5] == 1 and np.isinf(dist[6, 5])


def test_make_layer_naive_attention_out_of_memory_is_an_error(monkeypatch):
    import tfm.functional
    from tfm.errors import InsufficientMemoryError

    monkeypatch.setattr(tfm.functional, "available_memory_bytes", lambda: 1000)
    with pytest.raises(InsufficientMemoryError, match="score"):
        make_layer("self_attention_naive", n=64, d=64, backend="numpy")
    make_layer("self_attention", n=64, d=64, backend="numpy")  # the fused kernel needs no score matrix


def test_naive_attention_guard_counts_what_each_kernel_holds(monkeypatch):
    import numba

    from tfm.functional import check_naive_attention_memory, naive_attention_bytes
    from tfm.errors import InsufficientMemoryError

    b, h, n = 4, 16, 16384
    assert naive_attention_bytes(b, h, n, n, 4, "cuda") == b * h * n * n * 4  # one array, softmax in place
    assert naive_attention_bytes(b, h, n, n, 8, "numpy") == 3 * b * h * n * n * 8
    assert naive_attention_bytes(b, h, n, n, 4, "cpu") == min(b * h, numba.get_num_threads()) * n * n * 4

    class Device:  # a device with 141 GB free: B=4, H=16, n=16384 fits (64 GiB of scores)
        name = "cuda"

        def __init__(self, free):
            self.free = free

        def free_memory_bytes(self):
            return self.free

    check_naive_attention_memory(Device(141e9), b, h, n, n, 4)
    with pytest.raises(InsufficientMemoryError, match="impl='fused'"):
        check_naive_attention_memory(Device(60e9), b, h, n, n, 4)
