"""Synthetic sequence tasks with a controlled dependency distance, generated in-process.

A task is a frozen dataclass: its parameters are validated when it is made, and
``task.sample(rng, batch)`` draws a batch of int64 token arrays from a
``np.random.Generator`` (the same generator state gives the same batch). Nothing is read
from disk. Every token id below ``FIRST_SYMBOL`` is a special token:

    PAD = 0   padding (sequence-to-sequence batches with sentences of several lengths)
    BOS = 1   the decoder's first input
    EOS = 2   the end of a target sentence (Translation)
    QUERY = 3 "now recall" (AssociativeRecall)

Tagging tasks: one output per input position, read causally (the output at t may use the
inputs 0..t); ``targets`` holds ``IGNORE`` where there is nothing to predict.

    DelayedRecall(delta, length=64, n_targets=16, n_symbols=16)
        random symbols x_0 .. x_{n-1}; at each of the last ``n_targets`` positions t the
        target is x_{t - delta}. Every target lies exactly ``delta`` positions back.
    AssociativeRecall(n_pairs=8, n_queries=8, n_keys=16, n_values=8)
        k_0 v_0 k_1 v_1 ... k_{P-1} v_{P-1} QUERY q_0 .. q_{Q-1} (P distinct keys; the Q
        queries are distinct keys among them, in random order): the target at each query
        is the value that followed its key (multi-query associative recall, as in Arora et
        al. 2023, "Zoology"). Query i asking for pair p sits delta = 2 (P - p) + i positions
        after that pair's value, so one sequence holds targets at many distances, from 2 to
        3P - 1 (``deltas``): train on the mixture and measure accuracy per distance. (With
        one fixed distance the answer would always sit at the same position and no lookup
        would be needed.) The length is 2P + 1 + Q.

Sequence-to-sequence tasks: an encoder reads ``src``, a decoder reads ``tgt[:, :-1]``
(starting with BOS) and predicts ``tgt[:, 1:]``.

    Copy(length, n_symbols=16, reverse=False)
        tgt = BOS + src (reversed with ``reverse``). The distance is the source length:
        a model without attention carries each token through ``length`` steps (encoder
        and decoder together); attention can fetch it in one.
    Translation(seed=0, ...)
        a miniature language pair with a seeded lexicon: sentences "NP V NP" or
        "NP V NP and NP V NP", NP = determiner, 0-2 adjectives, noun. The target
        (:meth:`Translation.translate`) maps every word through the lexicon, puts
        adjectives after their noun in mirrored order (local reordering), moves each verb
        to the end of its clause (reordering across the object), drops one determiner
        (deletion), writes some nouns as two tokens (fertility) and ends with EOS.

``chance`` is the accuracy of guessing uniformly among the symbols a target can take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._checks import check_int

__all__ = ["AssociativeRecall", "BOS", "Copy", "DelayedRecall", "EOS", "FIRST_SYMBOL", "IGNORE", "PAD", "QUERY",
           "Seq2SeqBatch", "TaggingBatch", "Translation", "make_task", "TASKS"]

PAD, BOS, EOS, QUERY = 0, 1, 2, 3
FIRST_SYMBOL = 4
IGNORE = -1  # a target position with nothing to predict


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


@dataclass(frozen=True)
class TaggingBatch:
    """``tokens`` (B, N) int64 inputs; ``targets`` (B, N) int64, ``IGNORE`` where there is no
    target; ``distance`` (B, N) int64: how far back the input a target copies lies (-1 where
    there is no target)."""

    tokens: np.ndarray
    targets: np.ndarray
    distance: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """(B, N) bool: the positions with a target."""
        return self.targets != IGNORE


@dataclass(frozen=True)
class Seq2SeqBatch:
    """``src`` (B, Ns) and ``tgt`` (B, Nt) int64 (``tgt[:, 0]`` is BOS); the padding masks
    (True = padding, right-aligned) or None when every sentence has the full length."""

    src: np.ndarray
    tgt: np.ndarray
    src_pad: np.ndarray | None = None
    tgt_pad: np.ndarray | None = None


# ---------------------------------------------------------------------- tagging
@dataclass(frozen=True)
class DelayedRecall:
    """Emit the token seen ``delta`` positions earlier (see the module docstring)."""

    delta: int
    length: int = 64
    n_targets: int = 16
    n_symbols: int = 16

    kind = "tagging"

    def __post_init__(self):
        check_int("delta", self.delta)
        check_int("n_targets", self.n_targets)
        check_int("n_symbols", self.n_symbols, 2)
        check_int("length", self.length, 2)
        if self.delta + self.n_targets > self.length:
            raise ValueError(f"DelayedRecall: delta ({self.delta}) + n_targets ({self.n_targets}) must not exceed "
                             f"length ({self.length}): the first target reads position length - n_targets - delta")

    @property
    def vocab(self) -> int:
        """Input and output vocabulary size (specials included)."""
        return FIRST_SYMBOL + self.n_symbols

    @property
    def chance(self) -> float:
        return 1.0 / self.n_symbols

    def sample(self, rng, batch: int) -> TaggingBatch:
        rng, batch = _check_rng(rng), check_int("batch", batch)
        n, d = self.length, self.delta
        tokens = rng.integers(FIRST_SYMBOL, self.vocab, size=(batch, n), dtype=np.int64)  # (B, n)
        targets = np.full((batch, n), IGNORE, dtype=np.int64)
        distance = np.full((batch, n), -1, dtype=np.int64)
        t = np.arange(n - self.n_targets, n)
        targets[:, t] = tokens[:, t - d]
        distance[:, t] = d
        return TaggingBatch(tokens, targets, distance)


@dataclass(frozen=True)
class AssociativeRecall:
    """Recall the value stored with each queried key (see the module docstring)."""

    n_pairs: int = 8
    n_queries: int = 8
    n_keys: int = 16
    n_values: int = 8

    kind = "tagging"

    def __post_init__(self):
        check_int("n_pairs", self.n_pairs)
        check_int("n_values", self.n_values, 2)
        if check_int("n_keys", self.n_keys) < self.n_pairs:
            raise ValueError(f"AssociativeRecall: n_keys ({self.n_keys}) must be >= n_pairs ({self.n_pairs}): "
                             f"the keys of a sequence are distinct")
        if check_int("n_queries", self.n_queries) > self.n_pairs:
            raise ValueError(f"AssociativeRecall: n_queries ({self.n_queries}) must be <= n_pairs "
                             f"({self.n_pairs}): the queried keys are distinct")

    @property
    def length(self) -> int:
        return 2 * self.n_pairs + 1 + self.n_queries

    @property
    def deltas(self) -> tuple[int, ...]:
        """Every distance a target can have: 2 .. 2 * n_pairs + n_queries - 1."""
        return tuple(range(2, 2 * self.n_pairs + self.n_queries))

    @property
    def vocab(self) -> int:
        """Keys are ids FIRST_SYMBOL .. + n_keys, values the n_values ids after them."""
        return FIRST_SYMBOL + self.n_keys + self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def sample(self, rng, batch: int) -> TaggingBatch:
        rng, batch = _check_rng(rng), check_int("batch", batch)
        p, nq, n = self.n_pairs, self.n_queries, self.length
        keys = np.argsort(rng.random((batch, self.n_keys)), axis=1)[:, :p] + FIRST_SYMBOL  # (B, P) distinct
        values = rng.integers(0, self.n_values, size=(batch, p)) + FIRST_SYMBOL + self.n_keys  # (B, P)
        asked = np.argsort(rng.random((batch, p)), axis=1)[:, :nq]  # (B, Q) distinct pair indices
        rows = np.arange(batch)[:, None]
        tokens = np.empty((batch, n), dtype=np.int64)
        tokens[:, 0:2 * p:2], tokens[:, 1:2 * p:2] = keys, values
        tokens[:, 2 * p] = QUERY
        at = np.arange(2 * p + 1, n)  # the query positions
        tokens[:, at] = keys[rows, asked]
        targets = np.full((batch, n), IGNORE, dtype=np.int64)
        distance = np.full((batch, n), -1, dtype=np.int64)
        targets[:, at] = values[rows, asked]
        distance[:, at] = at[None, :] - (2 * asked + 1)  # from the value to the query
        return TaggingBatch(tokens, targets, distance)


# ---------------------------------------------------------------------- sequence to sequence
@dataclass(frozen=True)
class Copy:
    """Copy (or reverse) a random sequence of ``length`` symbols (see the module docstring)."""

    length: int
    n_symbols: int = 16
    reverse: bool = False

    kind = "seq2seq"

    def __post_init__(self):
        check_int("length", self.length)
        check_int("n_symbols", self.n_symbols, 2)
        if not isinstance(self.reverse, (bool, np.bool_)):
            raise TypeError(f"reverse must be a bool, got {type(self.reverse).__name__}")

    @property
    def delta(self) -> int:
        return self.length

    @property
    def src_vocab(self) -> int:
        return FIRST_SYMBOL + self.n_symbols

    tgt_vocab = src_vocab

    @property
    def max_len(self) -> int:
        return self.length + 1

    @property
    def chance(self) -> float:
        return 1.0 / self.n_symbols

    def sample(self, rng, batch: int) -> Seq2SeqBatch:
        rng, batch = _check_rng(rng), check_int("batch", batch)
        src = rng.integers(FIRST_SYMBOL, self.src_vocab, size=(batch, self.length), dtype=np.int64)
        out = src[:, ::-1] if self.reverse else src
        return Seq2SeqBatch(src, np.concatenate([np.full((batch, 1), BOS, np.int64), out], axis=1))


@dataclass(frozen=True)
class Translation:
    """A miniature language pair (see the module docstring); ``seed`` fixes the lexicon.

    Source word classes (ids in this order after the specials): ``n_det`` determiners,
    ``n_adj`` adjectives, ``n_noun`` nouns, ``n_verb`` verbs, one conjunction. Target: the
    same classes (each source word's translation drawn by a seeded permutation within its
    class), then one second token for each of the first ``n_fertile`` nouns.
    ``p_conj``: probability of a second clause; adjectives per NP: 0, 1 or 2 (uniform).
    """

    seed: int = 0
    n_det: int = 3
    n_adj: int = 6
    n_noun: int = 10
    n_verb: int = 6
    n_fertile: int = 3
    p_conj: float = 0.5
    _lexicon: dict = field(init=False, repr=False, compare=False)

    kind = "seq2seq"
    MAX_ADJ = 2

    def __post_init__(self):
        check_int("seed", self.seed, 0)
        for name in ("n_det", "n_adj", "n_noun", "n_verb"):
            check_int(name, getattr(self, name), 2)
        if not 0 <= check_int("n_fertile", self.n_fertile, 0) <= self.n_noun:
            raise ValueError(f"n_fertile must be at most n_noun ({self.n_noun}), got {self.n_fertile}")
        if isinstance(self.p_conj, bool) or not isinstance(self.p_conj, (int, float)) or not 0 <= self.p_conj <= 1:
            raise ValueError(f"p_conj must be a probability in [0, 1], got {self.p_conj!r}")
        rng = np.random.default_rng(self.seed)
        src, tgt, lex = self._src_ranges(), self._tgt_ranges(), {}
        for cls in ("det", "adj", "noun", "verb", "conj"):
            s0, s1 = src[cls]
            t0, t1 = tgt[cls]
            for s, t in zip(range(s0, s1), rng.permutation(np.arange(t0, t1))):
                lex[s] = [int(t)]
        f0 = tgt["fertile"][0]
        for i, s in enumerate(range(*src["noun"])):
            if i < self.n_fertile:
                lex[s].append(f0 + i)
        lex[src["det"][0]] = []  # the first determiner has no translation (deletion)
        object.__setattr__(self, "_lexicon", lex)

    # ids ------------------------------------------------------------------------------
    def _src_ranges(self) -> dict:
        out, start = {}, FIRST_SYMBOL
        for cls, size in (("det", self.n_det), ("adj", self.n_adj), ("noun", self.n_noun), ("verb", self.n_verb),
                          ("conj", 1)):
            out[cls] = (start, start + size)
            start += size
        return out

    def _tgt_ranges(self) -> dict:
        out, start = {}, FIRST_SYMBOL
        for cls, size in (("det", self.n_det), ("adj", self.n_adj), ("noun", self.n_noun), ("verb", self.n_verb),
                          ("conj", 1), ("fertile", self.n_fertile)):
            out[cls] = (start, start + size)
            start += size
        return out

    @property
    def src_vocab(self) -> int:
        return self._src_ranges()["conj"][1]

    @property
    def tgt_vocab(self) -> int:
        return self._tgt_ranges()["fertile"][1]

    @property
    def max_src_len(self) -> int:
        """Two clauses of NP V NP with full NPs, and the conjunction."""
        return 2 * (2 * (2 + self.MAX_ADJ) + 1) + 1

    @property
    def max_len(self) -> int:
        """Longest source or target (BOS, two fertile nouns per clause and EOS included)."""
        return max(self.max_src_len, 1 + 2 * (2 * (3 + self.MAX_ADJ) + 1) + 1 + 1)

    @property
    def chance(self) -> float:
        return 1.0 / (self.tgt_vocab - FIRST_SYMBOL)

    # the language ---------------------------------------------------------------------
    def _word_class(self, token: int) -> str:
        for cls, (a, b) in self._src_ranges().items():
            if a <= token < b:
                return cls
        raise ValueError(f"token {token} is not a source word of this Translation (ids {FIRST_SYMBOL}.."
                         f"{self.src_vocab - 1})")

    def _parse_np(self, words: list, i: int) -> tuple[list, int]:
        if i >= len(words) or self._word_class(words[i]) != "det":
            raise ValueError(f"expected a determiner at position {i} of {words}")
        j = i + 1
        while j < len(words) and self._word_class(words[j]) == "adj":
            j += 1
        if j >= len(words) or self._word_class(words[j]) != "noun":
            raise ValueError(f"expected a noun after the adjectives at position {j} of {words}")
        return words[i:j + 1], j + 1

    def _np(self, phrase: list) -> list:
        det, adjs, noun = phrase[0], phrase[1:-1], phrase[-1]
        lex = self._lexicon
        out = list(lex[det]) + list(lex[noun])
        for a in reversed(adjs):  # adjectives after the noun, mirrored
            out += lex[a]
        return out

    def translate(self, src) -> list[int]:
        """The target of one source sentence (a sequence of source ids, no padding), EOS last,
        without BOS. Raises ValueError for a sentence outside the grammar."""
        words = [int(t) for t in src]
        out, i = [], 0
        while True:
            subject, i = self._parse_np(words, i)
            if i >= len(words) or self._word_class(words[i]) != "verb":
                raise ValueError(f"expected a verb at position {i} of {words}")
            verb, i = words[i], i + 1
            obj, i = self._parse_np(words, i)
            out += self._np(subject) + self._np(obj) + self._lexicon[verb]  # verb-final
            if i == len(words):
                return out + [EOS]
            if self._word_class(words[i]) != "conj" or i + 1 == len(words):
                raise ValueError(f"expected the conjunction and a second clause at position {i} of {words}")
            out += self._lexicon[words[i]]
            i += 1

    def _sample_sentence(self, rng) -> list[int]:
        r = self._src_ranges()

        def np_():
            return ([int(rng.integers(*r["det"]))] + [int(rng.integers(*r["adj"]))
                                                      for _ in range(int(rng.integers(0, self.MAX_ADJ + 1)))]
                    + [int(rng.integers(*r["noun"]))])

        def clause():
            return np_() + [int(rng.integers(*r["verb"]))] + np_()

        words = clause()
        if rng.random() < self.p_conj:
            words += [r["conj"][0]] + clause()
        return words

    def sample(self, rng, batch: int) -> Seq2SeqBatch:
        """Sentences of several lengths, right-padded with PAD; tgt = BOS + translation."""
        rng, batch = _check_rng(rng), check_int("batch", batch)
        srcs = [self._sample_sentence(rng) for _ in range(batch)]
        tgts = [[BOS] + self.translate(s) for s in srcs]
        ns, nt = max(map(len, srcs)), max(map(len, tgts))
        src = np.full((batch, ns), PAD, dtype=np.int64)
        tgt = np.full((batch, nt), PAD, dtype=np.int64)
        for b, (s, t) in enumerate(zip(srcs, tgts)):
            src[b, :len(s)], tgt[b, :len(t)] = s, t
        return Seq2SeqBatch(src, tgt, src == PAD, tgt == PAD)


TASKS = {"delayed_recall": DelayedRecall, "associative_recall": AssociativeRecall, "copy": Copy,
         "translation": Translation}


def make_task(name: str, **params):
    """A task by name (``TASKS``) with its parameters, e.g. ``make_task("delayed_recall", delta=8)``."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
    return cls(**params)
