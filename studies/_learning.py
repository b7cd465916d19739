"""Training runs of the learning studies: one recipe, a counted-FLOP budget, cached checkpoints.

A :class:`Run` names one training run: a task of ``tfm.tasks`` with its parameters, a model
(a :class:`studies._stack.Tagger` of one Table 1 mixer for tagging tasks; the Transformer,
the LSTM seq2seq or ConvS2S for sequence-to-sequence tasks), a seed and a budget. Every run
follows the same recipe, the paper's (section 5.3, 5.4) at a tiny size:

    width d_model = 32, 2 layers (2 + 2 for the encoder-decoders), 2 heads, d_ff = 64, float32
    Adam(beta1 0.9, beta2 0.98, eps 1e-9), lrate = d^-0.5 min(step^-0.5, step warmup^-1.5),
    warmup 100 steps; label smoothing 0.1; dropout off (every batch is freshly generated, so
    there is nothing to overfit); batches of 32 sequences drawn from ``Run.seed``
    budget: counted training FLOPs (``tfm.cost.training_flops`` of the batch shapes): a run
    takes steps while the FLOPs spent stay within ``budget_flops``, so cheaper models take
    more steps; optionally it stops at the first evaluation that reaches ``target_accuracy``

The model's initial weights come from ``seed``, its training batches from (seed, 1) and the
held-out evaluation set from (seed, 2), the same for every model. Seconds count the training
steps only (not evaluations or batch generation).

``trained(run, out)`` returns the trained model and its statistics, from a checkpoint under
``<out>/checkpoints/`` when one was saved by the same code (tfm's sources and this file's and
_stack.py's), so that the gradient-signal study and the learning study share their runs. The
folder ignores itself in git (its own .gitignore): weights are regenerated, not committed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import tfm
from tfm import cost
from tfm.tasks import PAD, make_task

from ._stack import Tagger

D_MODEL, N_LAYERS, N_HEADS, D_FF = 32, 2, 2, 64
BATCH = 32
WARMUP = 100
LABEL_SMOOTHING = 0.1
EVAL_SEQUENCES = {"delayed_recall": 256, "associative_recall": 1024, "copy": 256, "translation": 512}
SEQ2SEQ = ("transformer", "lstm_seq2seq", "convs2s")
SEQ2SEQ_LABELS = {"transformer": "Transformer", "lstm_seq2seq": "LSTM seq2seq (+ attention)",
                  "convs2s": "ConvS2S"}
COST_OP = {"transformer": "transformer_forward", "lstm_seq2seq": "lstm_seq2seq_forward",
           "convs2s": "convs2s_forward"}


@dataclass(frozen=True)
class Run:
    """One training run (see the module docstring). ``task_params`` as sorted (name, value) pairs."""

    task: str
    task_params: tuple
    model: str
    seed: int
    budget_flops: float
    target_accuracy: float | None = None  # stop at the first evaluation reaching it
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    max_steps: int = 100_000
    recipe: dict = field(default_factory=lambda: dict(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS,
                                                      d_ff=D_FF, batch=BATCH, warmup=WARMUP,
                                                      label_smoothing=LABEL_SMOOTHING))

    @classmethod
    def of(cls, task: str, model: str, seed: int, budget_flops: float, **kw) -> "Run":
        params = kw.pop("task_params", {})
        return cls(task, tuple(sorted(params.items())), model, seed, float(budget_flops), **kw)

    def make_task(self):
        return make_task(self.task, **dict(self.task_params))

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_model(run: Run, task):
    r = run.recipe
    d, layers, heads, ff = r["d_model"], r["n_layers"], r["n_heads"], r["d_ff"]
    if task.kind == "tagging":
        return Tagger(run.model, task.vocab, d, layers, heads, ff, max_len=task.length, seed=run.seed)
    common = dict(d_model=d, src_vocab=task.src_vocab, tgt_vocab=task.tgt_vocab, max_len=task.max_len)
    if run.model == "transformer":
        return tfm.Transformer(tfm.TransformerConfig(n_heads=heads, d_ff=ff, n_encoder_layers=layers,
                                                     n_decoder_layers=layers, **common), seed=run.seed)
    if run.model == "lstm_seq2seq":
        return tfm.LSTMSeq2Seq(tfm.LSTMSeq2SeqConfig(n_layers=layers, **common), seed=run.seed)
    if run.model == "convs2s":
        return tfm.ConvS2S(tfm.ConvS2SConfig(n_layers=layers, kernel_size=3, **common), seed=run.seed)
    raise ValueError(f"unknown sequence-to-sequence model {run.model!r}; choose one of {', '.join(SEQ2SEQ)}")


REFERENCE = {"tagging": "self_attention", "seq2seq": "transformer"}


def budget_for(task, ref_steps: int, recipe: dict | None = None) -> float:
    """``ref_steps`` training steps of the reference model (the self-attention tagger, or the
    Transformer) on full-length batches of ``task``, in counted FLOPs: the budget every model
    of a comparison gets."""
    r = recipe or Run("", (), "", 0, 0.0).recipe
    run = Run("", (), REFERENCE[task.kind], 0, 0.0, recipe=r)
    if task.kind == "tagging":
        model = Tagger(run.model, task.vocab, r["d_model"], r["n_layers"], r["n_heads"], r["d_ff"],
                       max_len=task.length, backend=None)
        return ref_steps * model.flops(r["batch"], task.length, training=True)
    config = tfm.TransformerConfig(d_model=r["d_model"], n_heads=r["n_heads"], d_ff=r["d_ff"],
                                   n_encoder_layers=r["n_layers"], n_decoder_layers=r["n_layers"],
                                   src_vocab=task.src_vocab, tgt_vocab=task.tgt_vocab, max_len=task.max_len)
    n = task.max_len - 1
    return ref_steps * cost.training_flops("transformer_forward", config=config, b=r["batch"], n_src=n, n_tgt=n)


def step_flops(model, batch) -> float:
    """Counted training FLOPs (forward + backward) of one step on ``batch``."""
    if isinstance(model, Tagger):
        b, n = batch.tokens.shape
        return model.flops(b, n, training=True)
    name = {tfm.Transformer: "transformer", tfm.LSTMSeq2Seq: "lstm_seq2seq", tfm.ConvS2S: "convs2s"}[type(model)]
    b, ns = batch.src.shape
    return cost.training_flops(COST_OP[name], config=model.config, b=b, n_src=ns, n_tgt=batch.tgt.shape[1] - 1)


def train_step(model, opt, batch, label_smoothing: float) -> float:
    if isinstance(model, Tagger):
        return model.train_step(opt, batch.tokens, batch.targets, label_smoothing=label_smoothing)
    return model.train_step(opt, batch.src, batch.tgt, label_smoothing=label_smoothing,
                            src_pad_mask=batch.src_pad, tgt_pad_mask=batch.tgt_pad)


def predictions(model, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted ids, target ids, distance of each target; -1 where not known) at every
    position that has a target, flattened; sequence-to-sequence under teacher forcing."""
    if isinstance(model, Tagger):
        pred = model.predict(batch.tokens)
        m = batch.mask
        return pred[m], batch.targets[m], batch.distance[m]
    tgt_in = np.ascontiguousarray(batch.tgt[:, :-1])
    tgt_pad = None if batch.tgt_pad is None else np.ascontiguousarray(batch.tgt_pad[:, :-1])
    logits, _ = model.forward_train(batch.src, tgt_in, batch.src_pad, tgt_pad)
    pred = np.argmax(model._host(logits), axis=-1)  # (B, Nt - 1)
    gold = batch.tgt[:, 1:]
    m = gold != PAD
    return pred[m], gold[m], np.full(int(m.sum()), -1)


def evaluate(model, task, seed: int, n_sequences: int) -> dict:
    """Accuracy on a held-out set drawn from (seed, 2): overall, per distance, and (for
    sequence-to-sequence) the fraction of sentences with every token right."""
    model.eval()
    rng = np.random.default_rng((seed, 2))
    pred, gold, dist, sentences = [], [], [], []
    left = n_sequences
    while left > 0:
        batch = task.sample(rng, min(256, left))
        p, g, d = predictions(model, batch)
        if task.kind == "seq2seq" and hasattr(task, "delta"):  # Copy: every target is that far
            d = np.full(p.size, task.delta)
        pred.append(p), gold.append(g), dist.append(d)
        if task.kind == "seq2seq":
            rows = (batch.tgt[:, 1:] != PAD).sum(axis=1)
            right = np.split(p == g, np.cumsum(rows)[:-1])
            sentences += [bool(r.all()) for r in right]
        left -= batch.src.shape[0] if task.kind == "seq2seq" else batch.tokens.shape[0]
    model.train()
    ok, dist = np.concatenate(pred) == np.concatenate(gold), np.concatenate(dist)
    by = {int(v): (int(ok[dist == v].sum()), int((dist == v).sum())) for v in np.unique(dist) if v >= 0}
    return {"accuracy": float(ok.mean()), "n_targets": int(ok.size), "by_distance": by,
            "sentence_accuracy": float(np.mean(sentences)) if sentences else float("nan")}


def train(run: Run):
    """-> (trained model, statistics): see the module docstring."""
    task = run.make_task()
    r = run.recipe
    model = build_model(run, task)
    opt = tfm.optim.Adam(model, lr=tfm.optim.noam(r["d_model"], r["warmup"]))
    rng = np.random.default_rng((run.seed, 1))
    spent = seconds = 0.0
    steps, losses, reached = 0, [], None
    curve = []  # (step, flops, seconds, accuracy) at each evaluation
    n_eval = EVAL_SEQUENCES[run.task]
    while steps < run.max_steps:
        batch = task.sample(rng, r["batch"])
        f = step_flops(model, batch)
        if spent + f > run.budget_flops:
            break
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, batch, r["label_smoothing"]))
        seconds += time.perf_counter() - t0
        spent += f
        steps += 1
        if run.eval_every and steps % run.eval_every == 0:
            acc = evaluate(model, task, run.seed, n_eval)["accuracy"]
            curve.append((steps, spent, seconds, acc))
            if run.target_accuracy is not None and acc >= run.target_accuracy:
                reached = (steps, spent, seconds, acc)
                break
    if steps == 0:
        raise ValueError(f"budget of {run.budget_flops:.3g} FLOPs is below one training step")
    stats = {"steps": steps, "train_flops": spent, "train_s": seconds, "n_params": model.n_params,
             "final_loss": float(np.mean(losses[-10:])), "first_loss": float(losses[0]),
             "curve": curve, "reached": reached}
    return model, stats


# ---------------------------------------------------------------------- checkpoints
def _code_hash() -> str:
    from tfm._source import source_hash

    here = Path(__file__).resolve().parent
    own = b"".join((here / f).read_bytes() for f in ("_learning.py", "_stack.py"))
    return source_hash() + "-" + hashlib.sha1(own).hexdigest()[:8]


def _model_class(run: Run):
    if run.model in SEQ2SEQ:
        return {"transformer": tfm.Transformer, "lstm_seq2seq": tfm.LSTMSeq2Seq, "convs2s": tfm.ConvS2S}[run.model]
    return Tagger


def trained(run: Run, out: Path | str):
    """(model, stats, reused): the run's checkpoint under ``<out>/checkpoints/`` if it was saved by
    the same code, else a fresh training (then saved)."""
    folder = Path(out) / "checkpoints"
    path, meta = folder / f"{run.key()}.npz", folder / f"{run.key()}.json"
    code = _code_hash()
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("code") == code and info.get("run") == json.loads(json.dumps(asdict(run), default=str)):
            return _model_class(run).load(path), info["stats"], True
    model, stats = train(run)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("# model weights of the learning studies' runs: regenerated, not committed\n*\n")
    tmp = folder / f".{run.key()}.tmp.npz"
    model.save(tmp)
    tmp.replace(path)
    meta.write_text(json.dumps({"run": asdict(run), "code": code, "stats": stats}, indent=1, default=str))
    return model, stats, False


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` with its 95% Student-t interval (NaN bounds
    for a single value)."""
    from scipy import stats as st

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(st.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half
