"""The training studies (training_scaling, training_throughput, training_memory) and the PyTorch twins."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from studies import _torch_models, run_all, training_memory, training_scaling, training_throughput
from tfm import TransformerConfig, cost, table1
from tfm.backends import get_backend
from tfm.backends.cpu import CpuBackend

torch = pytest.importorskip("torch")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _host(x):
    if isinstance(x, (tuple, list)):
        return [_host(v) for v in x if v is not None and not isinstance(v, (bool, str))]
    return np.asarray(get_backend("cpu").to_numpy(x), np.float64) if hasattr(x, "shape") else x


def _flat(grads) -> list:
    out = []
    for g in grads:
        if isinstance(g, list):
            out += _flat(g)
        elif hasattr(g, "shape"):
            out.append(np.asarray(g, np.float64))
    return out


# ----------------------------------------------------------------------------- training_scaling
@pytest.mark.parametrize("name", training_scaling.LAYERS)
def test_train_layer_matches_the_float64_reference(name):
    """The study's training step computes the gradients the float64 reference does from the same inputs."""
    kw = dict(n=37, d=64, seed=3)
    got = _flat(_host(training_scaling.train_layer(name, backend="cpu", **kw).run()))
    want = _flat(_host(training_scaling.train_layer(name, backend="numpy", dtype="float64", **kw).run()))
    assert len(got) == len(want) >= 3, name
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.isfinite(g).all()
        assert _rel(g, w) < 1e-4, name


@pytest.mark.parametrize("name", training_scaling.LAYERS)
def test_train_layer_counts_the_training_flops(name):
    from tfm.bench.layers import make_layer

    step = training_scaling.train_layer(name, n=64, d=128)
    fwd = make_layer(name, n=64, d=128)
    attention = table1.LAYERS[name].kernel in ("attention", "restricted")
    want = training_scaling.ATTENTION_FLOP_RATIO if attention else training_scaling.FLOP_RATIO
    assert step.flops / fwd.flops == pytest.approx(want)
    assert step.memory["total"] == pytest.approx(step.memory["saved"] + step.memory["gradients"]
                                                 + step.memory["workspace"])


def test_train_layer_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown layer"):
        training_scaling.train_layer("transformer", n=8, d=8)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        training_scaling.train_layer("recurrent", n=0, d=8)


def test_bptt_is_n_chained_steps():
    s = training_scaling.bptt_structure("cpu", 13, 16)
    assert s["chain_steps"] == 13 and s["chain_rel_err"] < training_scaling.CHAIN_TOL
    assert s["step_needs_later_gradient"]


class _NoCarry(CpuBackend):
    """A broken backward that ignores the state gradients coming from later steps."""

    def lstm_layer_backward(self, saved, dout, dh_n, dc_n):
        return super().lstm_layer_backward(saved, dout, None, None)


def test_bptt_check_catches_a_backward_that_drops_the_carry():
    s = training_scaling.bptt_structure(_NoCarry(), 9, 16)
    assert not s["step_needs_later_gradient"]
    assert s["chain_rel_err"] > training_scaling.CHAIN_TOL


def test_backward_counts():
    c = pd.DataFrame([{**case, **training_scaling._count(case, "cpu"), "status": "ok"}
                      for case in training_scaling.cases("smoke") if case["part"] == "count"])
    t = training_scaling.counts(c)
    rec = t[t["layer"] == "recurrent"]
    assert (rec["sequential_ops"] == rec["n"]).all() and (rec["backward_calls"] == 1).all()
    att = t[t["layer"] == "self_attention"]
    assert att["backward_calls"].nunique() == 1 and "attention_backward" in att["how"].iloc[0]
    assert set(t["layer"]) == set(table1.ROWS)


def test_fits_recover_known_slopes():
    n = np.array([64, 128, 256, 512, 1024])
    rows = pd.DataFrame({"part": "time", "layer": "self_attention", "sweep": "n", "d": 64, "n": n, "status": "ok",
                         "min_s": 1e-9 * n ** 2, "forward_min_s": 3e-10 * n ** 2, "flops": 10.0 * n ** 2})
    f = training_scaling.fits(rows)
    assert f["exponent"].iloc[0] == pytest.approx(2.0) and f["forward_exponent"].iloc[0] == pytest.approx(2.0)
    v = training_scaling.verdicts(rows)
    assert v["agrees"].iloc[0] == "yes" and v["forward, scaling study"].iloc[0] == "not measured"
    rows["min_s"] = 1e-9 * n ** 1.2
    assert training_scaling.verdicts(rows)["agrees"].iloc[0] == "no"


# ----------------------------------------------------------------------------- twins and throughput
@pytest.mark.parametrize("which", ["transformer", "lstm"])
def test_torch_twin_trains_like_tfm(which):
    """Same first loss, and three Adam steps later still the same loss, from the same weights."""
    import tfm

    model = (tfm.Transformer(TransformerConfig.tiny(final_norm=True), seed=1) if which == "transformer"
             else tfm.LSTMSeq2Seq(tfm.LSTMSeq2SeqConfig.tiny(), seed=1))
    c = model.config
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(3, c.src_vocab, (3, 9)), rng.integers(3, c.tgt_vocab, (3, 8))
    step = _torch_models.TrainStep(_torch_models.twin(model), lr=1e-3, label_smoothing=0.1)
    opt = tfm.optim.Adam(model, lr=1e-3)
    ts, tt = torch.from_numpy(src), torch.from_numpy(tgt)
    for _ in range(4):
        a, b = model.train_step(opt, src, tgt, label_smoothing=0.1), step(ts, tt)
        assert abs(a - b) < 1e-4 * abs(b), (a, b)


def test_no_twin_says_why():
    import tfm
    from tfm.bench import Skip

    with pytest.raises(Skip, match="no PyTorch twin of ConvS2S"):
        _torch_models.twin(tfm.ConvS2S(tfm.ConvS2SConfig.tiny()))
    with pytest.raises(Skip, match="final_norm=True"):
        _torch_models.twin(tfm.Transformer(TransformerConfig.tiny()))


@pytest.mark.parametrize("model", ["lstm_seq2seq", "convs2s"])
def test_equal_params_width(model):
    ref = training_throughput.small_config("default")
    d = training_throughput.equal_params_width(model, ref)
    target = cost.parameters("transformer_forward", ref)
    got = cost.parameters(training_throughput.COST_OP[model], training_throughput.baseline_config(model, ref, d))
    step = abs(cost.parameters(training_throughput.COST_OP[model],
                               training_throughput.baseline_config(model, ref, d + 8)) - got)
    assert d % 8 == 0 and abs(got - target) <= step  # the closest multiple of 8
    config, op = training_throughput.config_for({"model": model, "match": "equal_width"}, "default")
    assert config.d_model == ref.d_model and config.n_layers == ref.n_encoder_layers


def test_throughput_comparisons_read_interquartile_ranges():
    rows = pd.DataFrame([
        {"model": "transformer_small", "match": "reference", "n": 64, "q25_s": 1.0, "q75_s": 1.1, "tokens_per_s": 100.,
         "n_params": 10, "flops_per_token": 5.0, "d_model": 8, "status": "ok"},
        {"model": "lstm_seq2seq", "match": "equal_width", "n": 64, "q25_s": 1.2, "q75_s": 1.3, "tokens_per_s": 80.,
         "n_params": 9, "flops_per_token": 4.0, "d_model": 8, "status": "ok"},
        {"model": "convs2s", "match": "equal_width", "n": 64, "q25_s": 1.05, "q75_s": 1.3, "tokens_per_s": 90.,
         "n_params": 11, "flops_per_token": 3.0, "d_model": 8, "status": "ok"}])
    c = training_throughput.comparisons(rows).set_index("baseline")
    assert c.loc["lstm_seq2seq", "verdict"] == "Transformer faster"
    assert c.loc["convs2s", "verdict"] == "indistinguishable"


# ----------------------------------------------------------------------------- training_memory
def test_memory_summary_and_verdicts():
    n = np.array([256, 512, 1024, 2048])
    mib = training_memory.MIB
    rows = pd.DataFrame({"part": "layer", "subject": "self_attention_naive", "b": 1, "d": 64, "n": n, "status": "ok",
                         "measured_bytes": 8.0 * n ** 2, "predicted_total": 8.0 * n ** 2 / 3})
    t = training_memory.summary(rows)
    assert t["measured_exponent"].iloc[0] == pytest.approx(2.0)
    assert t["measured_over_predicted"].iloc[0] == pytest.approx(3.0)
    assert training_memory._verdict(t.iloc[0]) == "more than predicted"
    assert training_memory._verdict({"predicted_mib": 4.0, "measured_over_predicted": 1.5}) == "agrees"
    assert training_memory._verdict({"predicted_mib": 0.1, "measured_over_predicted": 9.0}).startswith("not judged")
    assert 8.0 * 2048 ** 2 / mib == pytest.approx(t["measured_mib"].iloc[0])


# ----------------------------------------------------------------------------- the studies end to end
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("training")
    assert run_all.main(["--grid", "smoke", "--out", str(out), "--no-progress",
                         "--only", "training_scaling,training_throughput,training_memory"]) == 0
    return out


def test_smoke_tables_sections_and_readme(smoke):
    from studies._report import Report

    for name in ("training_scaling", "training_throughput", "training_memory"):
        df = pd.read_csv(smoke / "tables" / f"{name}.csv")
        assert (df["status"] == "ok").all(), df[df["status"] != "ok"]["reason"].tolist()
        assert {"cpu_model", "sgemm_gflops", "tfm_source"} <= set(df.columns)
    tt = pd.read_csv(smoke / "tables" / "training_throughput.csv")
    twin = tt[tt["model"].isin(["transformer_small", "lstm_seq2seq"])]
    assert (twin["loss_rel_err"] < training_throughput.MAX_LOSS_REL_ERR).all()
    assert (tt.loc[tt["model"] == "convs2s", "torch_reason"].str.contains("no PyTorch twin")).all()
    tm = pd.read_csv(smoke / "tables" / "training_memory.csv")
    assert (tm["predicted_total"] > 0).all() and tm["measured_bytes"].notna().all()
    report = (smoke / "REPORT.md").read_text()
    for heading in ("Training-step scaling in n and d", "Whole-model training throughput", "Training memory",
                    "Sequential operations of the backward", "What the backward costs"):
        assert heading in report, heading
    for fig in ("training_scaling_n", "training_scaling_d", "training_scaling_ratio", "training_throughput",
                "training_memory"):
        assert (smoke / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    rep = Report(smoke)
    assert training_scaling.readme(rep)[0].startswith("- **Training step:**")
    assert "tokens/s" in training_throughput.readme(rep)[0]
    assert training_memory.readme(rep)[0].startswith("- **Training memory:**")
