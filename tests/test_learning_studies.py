"""The learning studies' machinery (studies/_stack.py, studies/_learning.py) and the helpers of
studies gradient_signal, learning_distance and table2: taggers' gradients against central
differences and the cpu backend against the reference, Jacobian profiles against brute force,
reach against the closed forms, FLOP counts, budgets, checkpoints and a run that learns."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import studies._common  # noqa: F401  (NUMBA_CACHE_DIR before numba loads)
from studies import gradient_signal, learning_distance, table2
from studies._learning import Run, budget_for, evaluate, step_flops, t_interval, train, trained
from studies._stack import MIXERS, MixerStack, Tagger, as_float64, jacobian_profile
from tfm import cost
from tfm.table1 import K, R
from tfm.tasks import DelayedRecall

from conftest import rel_err
from gradtools import randomise, sampled_error

N = R + 4  # longer than the restricted window, so that its cut-off is exercised


def _tagger(kind, backend="numpy", dtype="float64", seed=1):
    return Tagger(kind, 9, d_model=8, n_layers=2, n_heads=2, d_ff=12, max_len=32, seed=seed, backend=backend,
                  dtype=dtype)


def _batch(rng, b=2):
    return DelayedRecall(3, length=N, n_targets=6, n_symbols=5).sample(rng, b)


@pytest.mark.parametrize("kind", MIXERS)
def test_tagger_gradients_central_differences(rng, kind):
    model = randomise(_tagger(kind), rng)
    batch = _batch(rng)
    loss, grads = model.loss_and_grad(batch.tokens, batch.targets, label_smoothing=0.1)
    assert set(grads) == set(model.params)
    params = {k: v.copy() for k, v in model.params.items()}
    errors = {}
    for name in params:
        def f(value, name=name):
            model.load_state_dict({**params, name: value})
            return np.array(model.loss(batch.tokens, batch.targets, label_smoothing=0.1))
        errors[name] = sampled_error(f, [params[name]], 0, np.array(1.0), grads[name], rng, entries=3)
    assert max(errors.values()) < 1e-6, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("kind", MIXERS)
def test_cpu_tagger_matches_the_reference(rng, kind):
    ref = randomise(_tagger(kind), rng)
    fast = _tagger(kind, backend="cpu", dtype="float32")
    fast.load_state_dict(ref.params)
    batch = _batch(rng, 3)
    loss_ref, g_ref = ref.loss_and_grad(batch.tokens, batch.targets, label_smoothing=0.1)
    loss, g = fast.loss_and_grad(batch.tokens, batch.targets, label_smoothing=0.1)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    worst = max((rel_err(g[k], g_ref[k]), k) for k in g_ref if np.linalg.norm(g_ref[k]) > 1e-6)
    assert worst[0] < 1e-4, worst


@pytest.mark.parametrize("kind", ["self_attention_restricted", "recurrent", "convolutional_dilated"])
def test_jacobian_profile_equals_brute_force(rng, kind):
    """Block norms from d one-hot cotangents equal those of the Jacobian built by central differences."""
    stack = randomise(MixerStack(kind, 2, 4, 2, 6, backend="numpy", dtype="float64"), rng)
    x = rng.standard_normal((2, N, 4))
    prof = jacobian_profile(stack, x)
    bk = stack.backend
    h = 1e-6
    sq = np.zeros(N)
    for b in range(2):
        for i in range(N):
            for c in range(4):
                xp, xm = x[b:b + 1].copy(), x[b:b + 1].copy()
                xp[0, i, c] += h
                xm[0, i, c] -= h
                col = (bk.to_numpy(stack.forward(bk.asarray(xp))) - bk.to_numpy(stack.forward(bk.asarray(xm))))
                sq[i] += np.sum((col[0, -1] / (2 * h)) ** 2) / 2  # d y_{N-1} / d x_{i,c}
    assert rel_err(prof, np.sqrt(sq)) < 1e-6


@pytest.mark.parametrize("kind, depth, reach", [
    ("convolutional", 1, K - 1), ("convolutional", 3, 3 * (K - 1)), ("convolutional_dilated", 2, K ** 2 - 1),
    ("self_attention_restricted", 1, R - 1), ("self_attention_restricted", 2, 2 * (R - 1)),
])
def test_profile_is_zero_exactly_beyond_the_closed_form_reach(rng, kind, depth, reach):
    n = 40
    assert gradient_signal.theory_reach(kind, depth, n) == reach
    stack = randomise(MixerStack(kind, depth, 4, 2, 6, backend="numpy", dtype="float64"), rng)
    prof = jacobian_profile(stack, rng.standard_normal((1, n, 4)))[::-1]  # index = distance
    assert (prof[:reach + 1] > 0).all() and (prof[reach + 1:] == 0).all()
    s = gradient_signal.summarise(prof, kind, depth)
    assert s["reach"] == s["theory_reach"] == reach


def test_reach_of_global_layers():
    for kind in ("self_attention", "recurrent", "gru", "rnn"):
        assert gradient_signal.theory_reach(kind, 1, 64) == 63


def test_summary_of_a_synthetic_profile():
    decaying = 10.0 ** (-0.25 * np.arange(30))
    s = gradient_signal.summarise(decaying, "recurrent", 1)
    assert s["slope"] == pytest.approx(-0.25) and s["reach"] == 29 and s["peak_delta"] == 1
    assert s["far_near"] == pytest.approx(10.0 ** (-0.25 * 28))


def test_float64_copy_keeps_the_weights(rng):
    model = _tagger("gru", backend="cpu", dtype="float32")
    copy = as_float64(model, "numpy")
    assert copy.dtype == np.float64 and copy.backend.name == "numpy"
    for k, v in model.params.items():
        assert np.array_equal(copy.params[k], v.astype(np.float64))


def test_tagger_flops_are_tfm_cost_counts():
    model = Tagger("convolutional", 20, 32, 2, 2, 64, max_len=64, backend=None)
    b, n, d = 8, 64, 32
    layer = (cost.flops("conv1d", b=b, n_out=n, c_in=d, c_out=d, k=K) + cost.flops("ffn", tokens=b * n, d_model=d,
                                                                                      d_ff=64)
             + 2 * cost.flops("layer_norm", tokens=b * n, d=d))
    fwd = 2 * layer + cost.flops("linear", tokens=b * n, d_in=d, d_out=20)
    assert model.flops(b, n) == pytest.approx(fwd)
    assert model.flops(b, n, training=True) == pytest.approx(3 * fwd)  # no attention: 3x
    att = Tagger("self_attention", 20, 32, 2, 2, 64, max_len=64, backend=None)
    core = cost.flops("attention", b=b, h=2, nq=n, nk=n, dk=16, causal=True)
    assert att.flops(b, n, training=True) == pytest.approx(3 * att.flops(b, n) + 2 * 0.5 * core)


def test_bad_tagger_input():
    model = _tagger("convolutional")
    tokens = np.full((1, 5), 4)
    with pytest.raises(ValueError, match="shape"):
        model.loss(tokens, np.full((1, 4), 4))
    with pytest.raises(ValueError, match="no position"):
        model.loss(tokens, np.full((1, 5), -1))
    with pytest.raises(ValueError, match="ids in"):
        model.loss(tokens, np.full((1, 5), 9))
    with pytest.raises(ValueError, match="unknown mixer"):
        Tagger("lstm", 9)


# ----------------------------------------------------------------------------- training runs
def _run(**kw):
    task = DelayedRecall(2, length=12, n_targets=8, n_symbols=4)
    params = {k: getattr(task, k) for k in ("delta", "length", "n_targets", "n_symbols")}
    return Run.of("delayed_recall", kw.pop("model", "self_attention"), 0, budget_for(task, kw.pop("steps", 120)),
                  task_params=params, **kw), task


def test_a_run_spends_its_budget_and_learns():
    run, task = _run()
    model, stats = train(run)
    batch = task.sample(np.random.default_rng(0), run.recipe["batch"])
    per_step = step_flops(model, batch)
    assert stats["steps"] == 120 and stats["train_flops"] == pytest.approx(120 * per_step)
    assert stats["final_loss"] < stats["first_loss"]
    ev = evaluate(model, task, 0, 64)
    assert ev["accuracy"] > 0.6 > 2 * task.chance, ev  # chance 1/4: the attention tagger learns delta = 2
    assert set(ev["by_distance"]) == {2}


def test_cheaper_models_take_more_steps_for_the_same_budget():
    run, _ = _run(model="convolutional", steps=10)
    _, stats = train(run)
    assert stats["steps"] > 10 and stats["train_flops"] <= run.budget_flops


def test_checkpoints_are_reused_only_for_the_same_run(tmp_path):
    run, _ = _run(steps=3)
    m1, s1, reused1 = trained(run, tmp_path)
    m2, s2, reused2 = trained(run, tmp_path)
    assert (reused1, reused2) == (False, True) and s1 == json.loads(json.dumps(s2))
    for k, v in m1.params.items():
        assert np.array_equal(m2.params[k], v)
    other, _ = _run(steps=4)
    assert trained(other, tmp_path)[2] is False and other.key() != run.key()


def test_a_run_can_stop_at_its_target(tmp_path):
    run = Run.of("translation", "convs2s", 0, 5e9, task_params={"seed": 0}, target_accuracy=0.0, eval_every=2)
    model, stats = train(run)
    assert stats["steps"] == 2 and stats["reached"][0] == 2 and len(stats["curve"]) == 1


def test_t_interval():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 4.302653 / np.sqrt(3), rel=1e-5) and hi == pytest.approx(4 - lo)
    assert np.isnan(t_interval([1.0])[1]) and np.isnan(t_interval([])[0])


# ----------------------------------------------------------------------------- the studies' helpers
def test_learning_distance_path_lengths_and_reach():
    assert learning_distance.path_length("self_attention", 48) == 1
    assert learning_distance.path_length("recurrent", 48) == 49
    assert learning_distance.path_length("convolutional", 8) == 4
    assert np.isnan(learning_distance.path_length("transformer", 8))
    assert learning_distance.reachable("convolutional", 4, 2) and not learning_distance.reachable("convolutional", 5, 2)
    assert learning_distance.reachable("convolutional_dilated", 8, 2)
    assert not learning_distance.reachable("self_attention_restricted", 31, 2)
    assert learning_distance.reachable("recurrent", 48, 2) and learning_distance.reachable("lstm_seq2seq", 64, 2)


def _rows(acc: dict) -> pd.DataFrame:
    return pd.DataFrame([{"task": "delayed_recall", "model": m, "delta": d, "seed": s, "accuracy": a, "chance": 0.1,
                          "steps": 10, "train_s": 1.0, "budget_flops": 1e9}
                         for (m, d), accs in acc.items() for s, a in enumerate(accs)])


def test_paired_verdicts():
    df = _rows({("self_attention", 8): [0.9, 0.95, 0.92], ("recurrent", 8): [0.2, 0.3, 0.25],
                ("convolutional", 8): [0.9, 0.96, 0.91], ("self_attention_restricted", 8): [1.0, 1.0, 1.0]})
    p = learning_distance.paired(df).set_index("model")
    assert p.loc["recurrent", "verdict"] == "reference better"
    assert p.loc["convolutional", "verdict"] == "tie"
    assert p.loc["self_attention_restricted", "verdict"] == "model better"
    s = learning_distance.summary(df).set_index("model")
    assert s.loc["convolutional", "reachable"] == bool(False) and s.loc["recurrent", "path_length"] == 9


def test_table2_paper_estimate_and_costs():
    p = table2.paper()
    base = p[p["model"] == "transformer_base"].iloc[0]
    assert base["estimate_flops"] == pytest.approx(12 * 3600 * 8 * 9.5e12)
    assert base["estimate_flops"] == pytest.approx(3.3e18, rel=0.01)  # Table 2's number, recovered
    assert 0 < base["utilisation"] < 1
    df = pd.DataFrame([{"model": m, "seed": s, "flops": f * (s + 1), "seconds": f * (s + 1) / 1e9, "steps": 10,
                        "target": 0.9, "gflops_achieved": 1.0, "utilisation": 0.1, "n_params": 100}
                       for m, f in (("transformer", 1e9), ("convs2s", 2e9)) for s in range(3)])
    c = table2.costs(df).set_index("model")
    assert c.loc["convs2s", "flops_ratio"] == pytest.approx(2.0) and c.loc["transformer", "flops_ratio"] == 1.0


def test_checks_of_the_path_length_argument():
    agree = _rows({("self_attention", 2): [1.0, 1.0], ("self_attention", 24): [0.99, 1.0],
                   ("recurrent", 2): [1.0, 0.98], ("recurrent", 24): [0.1, 0.2],
                   ("convolutional", 2): [1.0, 1.0], ("convolutional", 24): [0.1, 0.12]})
    c = learning_distance.checks(agree)
    assert set(c["check"]) == {"flat", "declines", "chance", "reference at least as good"}
    assert (c["verdict"] != "disagrees").all(), c
    assert c.loc[c["check"] == "chance", "delta"].tolist() == [24]  # delta 2 is within two conv layers' reach
    contradict = _rows({("self_attention", 2): [1.0, 1.0], ("self_attention", 24): [0.5, 0.5],
                        ("recurrent", 2): [0.9, 0.9], ("recurrent", 24): [0.9, 0.9],
                        ("convolutional", 2): [1.0, 1.0], ("convolutional", 24): [0.6, 0.7]})
    c = learning_distance.checks(contradict).set_index(["check", "model"])
    assert c.loc[("flat", "self_attention"), "verdict"] == "disagrees"
    assert c.loc[("declines", "recurrent"), "verdict"] == "disagrees"
    assert c.loc[("chance", "convolutional"), "verdict"] == "disagrees"
    assert c.loc[("reference at least as good", "recurrent"), "verdict"].tolist() == ["agrees", "disagrees"]
    assert "disagree" in learning_distance.findings(contradict)[0]
