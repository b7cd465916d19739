"""tfm.tasks: every target is where and what the task says, distances are exact, the translation
follows its rules, generation is seeded, and bad parameters raise clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from tfm.tasks import (BOS, EOS, FIRST_SYMBOL, IGNORE, PAD, QUERY, AssociativeRecall, Copy, DelayedRecall,
                       Translation, make_task)


def test_delayed_recall_targets_lie_delta_back(rng):
    task = DelayedRecall(7, length=30, n_targets=9, n_symbols=5)
    b = task.sample(rng, 13)
    assert b.tokens.shape == b.targets.shape == b.distance.shape == (13, 30)
    assert b.tokens.min() >= FIRST_SYMBOL and b.tokens.max() < task.vocab
    t = np.arange(30)
    has = t >= 30 - 9
    assert (b.mask == has[None, :]).all()
    assert (b.targets[:, has] == b.tokens[:, t[has] - 7]).all()
    assert (b.targets[:, ~has] == IGNORE).all()
    assert (b.distance[:, has] == 7).all() and (b.distance[:, ~has] == -1).all()
    assert task.chance == pytest.approx(1 / 5)


def test_sampling_is_seeded():
    for task in (DelayedRecall(3), AssociativeRecall(), Copy(9, reverse=True), Translation()):
        a, b = (task.sample(np.random.default_rng(4), 6) for _ in range(2))
        c = task.sample(np.random.default_rng(5), 6)
        fields = ("tokens", "targets") if task.kind == "tagging" else ("src", "tgt")
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)
        assert not all(np.array_equal(getattr(a, f), getattr(c, f)) for f in fields)


def test_associative_recall_answers_every_query(rng):
    task = AssociativeRecall(n_pairs=6, n_queries=4, n_keys=9, n_values=5)
    b = task.sample(rng, 200)
    assert b.tokens.shape == (200, task.length) == (200, 2 * 6 + 1 + 4)
    seen = set()
    for row, tgt, dist in zip(b.tokens, b.targets, b.distance):
        keys, values = list(row[0:12:2]), list(row[1:12:2])
        assert len(set(keys)) == 6 and all(FIRST_SYMBOL <= k < FIRST_SYMBOL + 9 for k in keys)
        assert all(FIRST_SYMBOL + 9 <= v < task.vocab for v in values)
        assert row[12] == QUERY
        queries = list(row[13:])
        assert len(set(queries)) == 4 and set(queries) <= set(keys)
        for pos in range(13, task.length):
            pair = keys.index(row[pos])
            assert tgt[pos] == values[pair]
            assert dist[pos] == pos - (2 * pair + 1)
            assert row[pos - dist[pos]] == tgt[pos]  # the answer lies exactly dist back
            seen.add(int(dist[pos]))
        assert (tgt[:13] == IGNORE).all() and (dist[:13] == -1).all()
    assert seen == set(task.deltas)  # every distance occurs
    assert task.chance == pytest.approx(1 / 5)


def test_copy_and_reverse(rng):
    src_copy = Copy(11).sample(np.random.default_rng(1), 3)
    src_rev = Copy(11, reverse=True).sample(np.random.default_rng(1), 3)
    assert np.array_equal(src_copy.src, src_rev.src)
    assert (src_copy.tgt[:, 0] == BOS).all() and np.array_equal(src_copy.tgt[:, 1:], src_copy.src)
    assert np.array_equal(src_rev.tgt[:, 1:], src_rev.src[:, ::-1])
    assert Copy(11).delta == 11 and Copy(11).max_len == 12 and Copy(11, n_symbols=7).src_vocab == FIRST_SYMBOL + 7


def _classes(task):
    return {cls: range(*r) for cls, r in task._src_ranges().items()}


def test_translation_rules():
    task = Translation(seed=3)
    c = _classes(task)
    lex = task._lexicon
    det_dropped, det = c["det"][0], c["det"][1]
    adj1, adj2 = c["adj"][0], c["adj"][1]
    fertile, plain = c["noun"][0], c["noun"][task.n_fertile]
    verb, conj = c["verb"][0], c["conj"][0]
    # "det adj1 adj2 noun verb det_dropped plain": subject NP reorders, object loses its determiner,
    # the verb goes last
    src = [det, adj1, adj2, fertile, verb, det_dropped, plain]
    want = lex[det] + lex[fertile] + lex[adj2] + lex[adj1] + lex[plain] + lex[verb] + [EOS]
    assert task.translate(src) == want
    assert lex[det_dropped] == [] and len(lex[fertile]) == 2 and len(lex[plain]) == 1
    two = task.translate(src + [conj] + src)
    assert two == want[:-1] + lex[conj] + want
    for bad in ([verb], [det, plain], [det, plain, verb, det], [det, plain, verb, det, plain, conj],
                [det, plain, verb, det, plain, verb], [PAD]):
        with pytest.raises(ValueError):
            task.translate(bad)


def test_translation_lexicon_is_seeded_and_one_to_one():
    a, b, c = Translation(seed=0), Translation(seed=0), Translation(seed=1)
    assert a._lexicon == b._lexicon and a._lexicon != c._lexicon
    firsts = [v[0] for v in a._lexicon.values() if v]
    assert len(firsts) == len(set(firsts))  # distinct source words have distinct translations
    assert all(FIRST_SYMBOL <= t < a.tgt_vocab for v in a._lexicon.values() for t in v)


def test_translation_batches(rng):
    task = Translation()
    b = task.sample(rng, 300)
    assert (b.src_pad == (b.src == PAD)).all() and (b.tgt_pad == (b.tgt == PAD)).all()
    assert b.src.shape[1] <= task.max_src_len and b.tgt.shape[1] <= task.max_len
    assert (b.tgt[:, 0] == BOS).all()
    for s, t in zip(b.src, b.tgt):
        s, t = s[s != PAD], t[t != PAD]
        assert list(t[1:]) == task.translate(s)
        assert (s < task.src_vocab).all() and (t < task.tgt_vocab).all()
    lengths = (~b.src_pad).sum(axis=1)
    assert len(set(lengths)) > 3  # sentences of several lengths, one clause or two


@pytest.mark.parametrize("make, match", [
    (lambda: DelayedRecall(0), "delta"),
    (lambda: DelayedRecall(50, length=64, n_targets=16), "must not exceed"),
    (lambda: DelayedRecall(2, n_symbols=1), "n_symbols"),
    (lambda: AssociativeRecall(n_pairs=8, n_keys=7), "distinct"),
    (lambda: AssociativeRecall(n_pairs=4, n_queries=5), "n_queries"),
    (lambda: Copy(0), "length"),
    (lambda: Translation(n_fertile=11), "n_fertile"),
    (lambda: Translation(p_conj=1.5), "p_conj"),
    (lambda: make_task("sorting"), "unknown task"),
])
def test_bad_parameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_sampling_arguments():
    with pytest.raises(TypeError, match="Generator"):
        DelayedRecall(2).sample(0, 4)
    with pytest.raises(ValueError, match="batch"):
        DelayedRecall(2).sample(np.random.default_rng(0), 0)
    with pytest.raises(TypeError, match="reverse"):
        Copy(3, reverse="yes")


def test_make_task():
    assert make_task("delayed_recall", delta=4) == DelayedRecall(4)
    assert make_task("translation").src_vocab == Translation().src_vocab
