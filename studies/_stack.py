"""Taggers made of one Table 1 layer type, for the gradient-signal and learning studies.

Every layer of a :class:`MixerStack` is a Transformer encoder layer whose self-attention
is replaced by the layer type under study (the *mixer*, the only sublayer that moves
information between positions), each sublayer inside the paper's post-norm residual
``LayerNorm(x + Sublayer(x))``:

    x -> LayerNorm(x + Mixer(x)) -> LayerNorm(. + FFN(.))

so that the stacks differ in nothing but how positions are connected. Every mixer is
causal (the output at t reads inputs 0..t), one name per Table 1 layer of the registry
(``tfm.table1.LAYERS``):

    self_attention              multi-head self-attention (tfm.MultiHeadAttention), causal mask
    self_attention_restricted   the same projections around tfm's restricted-attention kernel,
                                window r (``tfm.table1.R``), causal: keys t - r + 1 .. t
    recurrent, gru, rnn         one LSTM, GRU or tanh RNN layer of width d (tfm.LSTM, ...)
    convolutional               tfm.Conv1d, kernel k (``tfm.table1.K``), left padding
    convolutional_dilated       the same with dilation k^l in layer l (1, k, k^2, ...: ByteNet/WaveNet)

A :class:`Tagger` puts the stack between the Transformer's embedding (x sqrt(d) +
sinusoidal positions, the same input for every mixer) and a linear read-out to the
vocabulary, and trains with token cross-entropy (label smoothing) on the positions that
have a target. ``Tagger.flops`` counts a forward pass, or a training step's forward and
backward, with ``tfm.cost`` (``flops`` and ``training_flops``: the backward twice the
forward, 2.5x for attention cores; the optimizer left out).

The modules run on any tfm backend through its interface (numpy, cpu, cuda) and are
tested against float64 central differences (tests/test_learning_studies.py).
"""

from __future__ import annotations

import numpy as np

from tfm import cost
from tfm._checks import check_int, check_label_smoothing, check_token_ids
from tfm.layers import (GRU, LSTM, RNN, Conv1d, FeedForward, Linear, MultiHeadAttention, ResidualNorm,
                        TransformerEmbedding)
from tfm.layers.module import Module, xavier_uniform, zeros
from tfm.table1 import K, LAYERS, R

MIXERS = ("self_attention", "self_attention_restricted", "recurrent", "gru", "rnn", "convolutional",
          "convolutional_dilated")
"""The mixers a stack can be made of (registry names, ``tfm.table1.LAYERS``)."""

RECURRENT = {"recurrent": LSTM, "gru": GRU, "rnn": RNN}


def check_mixer(kind: str) -> str:
    if kind not in MIXERS:
        raise ValueError(f"unknown mixer {kind!r}; choose one of {', '.join(MIXERS)}")
    return kind


def label(kind: str) -> str:
    """The registry's label, with the stack's own parameters for the dilated convolution."""
    if kind == "convolutional_dilated":
        return f"convolutional (k={K}, dilations 1, {K}, {K * K}, ...)"
    if kind == "self_attention":
        return "self-attention"
    return LAYERS[kind].label


# ---------------------------------------------------------------------- mixers
class RestrictedSelfAttention(Module):
    """Multi-head self-attention in which query t sees only the keys of its window
    (``tfm.restricted_attention``), with MultiHeadAttention's projections and names."""

    def __init__(self, d_model: int, n_heads: int, window: int, causal: bool = True, *, seed: int = 0,
                 backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.d_model, self.n_heads = check_int("d_model", d_model), check_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.window, self.causal = check_int("window", window), bool(causal)
        d = self.d_model
        self.param("in_proj_weight", (3 * d, d), xavier_uniform)
        self.param("in_proj_bias", (3 * d,), zeros)
        self.param("out_proj.weight", (d, d), xavier_uniform)
        self.param("out_proj.bias", (d,), zeros)
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"d_model": self.d_model, "n_heads": self.n_heads, "window": self.window, "causal": self.causal,
                "dtype": self.dtype.name}

    def forward_train(self, x):
        bk, w, h, d = self.backend, self.weights, self.n_heads, self.d_model
        qkv = bk.linear(x, w["in_proj_weight"], w["in_proj_bias"])  # (B, N, 3d)
        q, k, v = (bk.split_heads(qkv, h, start, d) for start in (0, d, 2 * d))  # (B, h, N, d_k)
        heads, lse = bk.restricted_attention_train(q, k, v, self.window, self.causal)  # (B, h, N, d_k)
        merged = bk.merge_heads(heads)  # (B, N, d)
        return bk.linear(merged, w["out_proj.weight"], w["out_proj.bias"]), (x, q, k, v, heads, lse, merged)

    def forward(self, x):
        return self.forward_train(x)[0]

    def backward(self, saved, dout):
        bk, w, h, d = self.backend, self.weights, self.n_heads, self.d_model
        x, q, k, v, heads, lse, merged = saved
        dmerged, dw_out, db_out = bk.linear_backward(merged, w["out_proj.weight"], dout)  # (B, N, d)
        dq, dk, dv = bk.restricted_attention_backward(q, k, v, heads, lse, bk.split_heads(dmerged, h),
                                                      self.window, self.causal)  # (B, h, N, d_k) each
        dqkv = bk.empty((x.shape[0], x.shape[1], 3 * d), self.dtype)  # (B, N, 3d)
        for g, start in ((dq, 0), (dk, d), (dv, 2 * d)):
            bk.merge_heads_into(g, dqkv, start)
        dx, dw_in, db_in = bk.linear_backward(x, w["in_proj_weight"], dqkv)  # (B, N, d)
        return (dx,), {"in_proj_weight": dw_in, "in_proj_bias": db_in, "out_proj.weight": dw_out,
                       "out_proj.bias": db_out}


class CausalSelfAttention(Module):
    """tfm.MultiHeadAttention with the causal mask, called like the other mixers: ``(x)``."""

    def __init__(self, d_model: int, n_heads: int, *, dtype="float32"):
        super().__init__(dtype)
        self.attn = self.add(None, MultiHeadAttention(d_model, n_heads, backend=None, dtype=dtype))
        self._build(0, None)

    def forward(self, x):
        return self.attn.forward(x, None, True)

    def forward_train(self, x):
        return self.attn.forward_train(x, None, True)

    def backward(self, saved, dout):
        return self.attn.backward(saved, dout)


class RecurrentMixer(Module):
    """One tfm.LSTM, GRU or RNN layer from zero states, called like the other mixers: ``(x)``."""

    def __init__(self, kind: str, d_model: int, *, dtype="float32"):
        super().__init__(dtype)
        self.rnn = self.add(None, RECURRENT[kind](d_model, d_model, backend=None, dtype=dtype))
        self._build(0, None)

    def forward(self, x):
        return self.rnn.forward(x)[0]

    def forward_train(self, x):
        (y, _), saved = self.rnn.forward_train(x)
        return y, saved

    def backward(self, saved, dout):
        (dx, _), grads = self.rnn.backward(saved, dout)
        return (dx,), grads


def make_mixer(kind: str, d_model: int, n_heads: int, layer: int, dtype) -> Module:
    """The mixer of layer ``layer`` (0-based; it sets the dilation k^layer), unfilled."""
    kind = check_mixer(kind)
    if kind == "self_attention":
        return CausalSelfAttention(d_model, n_heads, dtype=dtype)
    if kind == "self_attention_restricted":
        return RestrictedSelfAttention(d_model, n_heads, R, True, backend=None, dtype=dtype)
    if kind in RECURRENT:
        return RecurrentMixer(kind, d_model, dtype=dtype)
    dilation = K ** layer if kind == "convolutional_dilated" else 1
    return Conv1d(d_model, d_model, K, dilation=dilation, padding="causal", backend=None, dtype=dtype)


def mixer_ops(kind: str, b: int, n: int, d: int, n_heads: int) -> list[tuple[str, dict]]:
    """The ``tfm.cost`` ops of one mixer over (b, n, d), as (op, dims) pairs."""
    if kind == "self_attention":
        return [("mha", dict(b=b, nq=n, nk=n, d_model=d, h=n_heads, causal=True))]
    if kind == "self_attention_restricted":
        return [("linear", dict(tokens=b * n, d_in=d, d_out=d))] * 4 + [
            ("restricted_attention", dict(b=b, h=n_heads, n=n, d=d // n_heads, window=R, causal=True))]
    if kind in RECURRENT:
        return [({"recurrent": "lstm", "gru": "gru", "rnn": "rnn"}[kind], dict(b=b, n=n, d_in=d, d_hidden=d))]
    return [("conv1d", dict(b=b, n_out=n, c_in=d, c_out=d, k=K))]


def count(ops: list[tuple[str, dict]], training: bool) -> float:
    """Forward FLOPs of ``ops`` (``tfm.cost.flops``), or with ``training`` forward plus backward
    (``tfm.cost.training_flops``: the backward 2x the forward, 2.5x for attention cores)."""
    fn = cost.training_flops if training else cost.flops
    return float(sum(fn(op, **dims) for op, dims in ops))


# ---------------------------------------------------------------------- stack and tagger
class MixerLayer(Module):
    """LayerNorm(x + Mixer(x)), then LayerNorm(. + FFN(.)). Parameters ``mix.*``, ``norm1.*``,
    ``linear1.*``, ``linear2.*``, ``norm2.*``."""

    def __init__(self, kind: str, d_model: int, n_heads: int, d_ff: int, layer: int, *, dtype="float32"):
        super().__init__(dtype)
        kw = {"backend": None, "dtype": dtype}
        self.mix = self.add("mix", make_mixer(kind, d_model, n_heads, layer, dtype))
        self.norm1 = self.add("norm1", ResidualNorm(d_model, **kw))
        self.ff = self.add(None, FeedForward(d_model, d_ff, **kw))
        self.norm2 = self.add("norm2", ResidualNorm(d_model, **kw))
        self._build(0, None)

    def forward(self, x):
        return self.norm2.forward(self.norm1.forward(x, self.mix), self.ff)

    def forward_train(self, x):
        h, saved1 = self.norm1.forward_train(x, self.mix)  # (B, N, d)
        y, saved2 = self.norm2.forward_train(h, self.ff)  # (B, N, d)
        return y, (saved1, saved2)

    def backward(self, saved, dy):
        saved1, saved2 = saved
        (dh,), g_norm2, g_ff = self.norm2.backward(saved2, dy)
        (dx,), g_norm1, g_mix = self.norm1.backward(saved1, dh)
        grads = self._merge({}, "norm1", g_norm1)
        self._merge(grads, "norm2", g_norm2)
        self._merge(grads, "mix", g_mix)
        return (dx,), self._merge(grads, None, g_ff)


class MixerStack(Module):
    """``n_layers`` :class:`MixerLayer` s of one mixer type (``layers.{i}``), (B, N, d) -> (B, N, d)."""

    def __init__(self, kind: str, n_layers: int, d_model: int, n_heads: int, d_ff: int, *, seed: int = 0,
                 backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.kind, self.n_layers = check_mixer(kind), check_int("n_layers", n_layers)
        self.d_model, self.n_heads, self.d_ff = d_model, n_heads, d_ff
        self.layers = [self.add(f"layers.{i}", MixerLayer(kind, d_model, n_heads, d_ff, i, dtype=dtype))
                       for i in range(self.n_layers)]
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"kind": self.kind, "n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads,
                "d_ff": self.d_ff, "dtype": self.dtype.name}

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def forward_train(self, x):
        saved = []
        for layer in self.layers:
            x, s = layer.forward_train(x)
            saved.append(s)
        return x, saved

    def backward(self, saved, dy):
        grads = {}
        for i in reversed(range(self.n_layers)):
            (dy,), g = self.layers[i].backward(saved[i], dy)
            self._merge(grads, f"layers.{i}", g)
        return (dy,), grads

    def ops(self, b: int, n: int) -> list[tuple[str, dict]]:
        """The ``tfm.cost`` ops of a pass over (b, n, d): each layer's mixer, FFN and two layer norms."""
        d, t = self.d_model, b * n
        per = [("ffn", dict(tokens=t, d_model=d, d_ff=self.d_ff))] + [("layer_norm", dict(tokens=t, d=d))] * 2
        return (mixer_ops(self.kind, b, n, d, self.n_heads) + per) * self.n_layers


class Tagger(Module):
    """Embedding -> :class:`MixerStack` -> linear read-out: one prediction per position.

    ``Tagger(kind, vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=128, seed=0,
    backend="cpu", dtype="float32")``; parameters ``embed.weight``, ``stack.layers.{i}.*``,
    ``out.weight``, ``out.bias``. Input and output share the vocabulary size.
    """

    def __init__(self, kind: str, vocab: int, d_model: int = 32, n_layers: int = 2, n_heads: int = 4,
                 d_ff: int = 64, max_len: int = 128, *, seed: int = 0, backend="cpu", dtype="float32"):
        super().__init__(dtype)
        self.kind, self.vocab = check_mixer(kind), check_int("vocab", vocab, 2)
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.d_ff, self.max_len = d_ff, check_int("max_len", max_len)
        kw = {"backend": None, "dtype": dtype}
        self.embed = self.add("embed", TransformerEmbedding(vocab, d_model, max_len, **kw))
        self.stack = self.add("stack", MixerStack(kind, n_layers, d_model, n_heads, d_ff, **kw))
        self.out = self.add("out", Linear(d_model, vocab, **kw))
        self._build(seed, backend)

    def _config(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab, "d_model": self.d_model, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "d_ff": self.d_ff, "max_len": self.max_len, "dtype": self.dtype.name}

    def _ids(self, tokens) -> np.ndarray:
        return check_token_ids("tokens", tokens, self.vocab, self.max_len)

    def forward_train(self, ids):
        x, e_saved = self.embed.forward_train(ids)  # (B, N, d)
        y, s_saved = self.stack.forward_train(x)  # (B, N, d)
        logits, o_saved = self.out.forward_train(y)  # (B, N, V)
        return logits, (e_saved, s_saved, o_saved)

    def backward(self, saved, dlogits):
        e_saved, s_saved, o_saved = saved
        (dy,), g_out = self.out.backward(o_saved, dlogits)
        (dx,), g_stack = self.stack.backward(s_saved, dy)
        _, g_embed = self.embed.backward(e_saved, dx)
        grads = self._merge({}, "embed", g_embed)
        self._merge(grads, "stack", g_stack)
        return (), self._merge(grads, "out", g_out)

    def logits(self, tokens) -> np.ndarray:
        """(B, N, vocab) host logits of token ids (B, N)."""
        return self._host(self.out.forward(self.stack.forward(self.embed.forward(self._ids(tokens)))))

    def predict(self, tokens) -> np.ndarray:
        """(B, N) int64 argmax predictions."""
        return np.argmax(self.logits(tokens), axis=-1)

    def _loss(self, tokens, targets, label_smoothing):
        from tfm.tasks import IGNORE

        ids = self._ids(tokens)
        targets = np.asarray(targets)
        if targets.shape != ids.shape:
            raise ValueError(f"targets must have the shape of tokens {ids.shape}, got {targets.shape}")
        keep = targets != IGNORE
        if not keep.any():
            raise ValueError("targets has no position to predict (all IGNORE)")
        if ((targets[keep] < 0) | (targets[keep] >= self.vocab)).any():
            raise ValueError(f"targets must be IGNORE or ids in [0, {self.vocab})")
        eps = check_label_smoothing(label_smoothing)
        logits, saved = self.forward_train(ids)
        b, n, v = logits.shape
        labels = np.where(keep, targets, 0).reshape(-1).astype(np.int64)
        weights = keep.reshape(-1).astype(np.float64) / keep.sum()
        losses, dlogits = self.backend.cross_entropy(logits.reshape(b * n, v), labels, weights, eps)
        return float(np.dot(weights, losses)), dlogits.reshape(b, n, v), saved

    def loss(self, tokens, targets, *, label_smoothing: float = 0.0) -> float:
        """Mean cross-entropy over the positions whose target is not IGNORE."""
        return self._loss(tokens, targets, label_smoothing)[0]

    def loss_and_grad(self, tokens, targets, *, label_smoothing: float = 0.0):
        """-> (loss, gradients of every parameter, host arrays by name)."""
        loss, dlogits, saved = self._loss(tokens, targets, label_smoothing)
        return loss, self.param_grads(self.backward(saved, dlogits)[1])

    def train_step(self, optimizer, tokens, targets, *, label_smoothing: float = 0.0) -> float:
        """One update by ``optimizer`` (a tfm.optim.Adam of this tagger); returns the loss before it."""
        if getattr(optimizer, "module", None) is not self:
            raise TypeError("optimizer must be a tfm.optim.Adam built for this tagger")
        loss, dlogits, saved = self._loss(tokens, targets, label_smoothing)
        if not np.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {optimizer.steps + 1}; the step was not taken")
        optimizer._apply(self.backward(saved, dlogits)[1])
        return loss

    def flops(self, b: int, n: int, training: bool = False) -> float:
        """Counted FLOPs of a (b, n) batch: the stack and the read-out (lookups count 0); with
        ``training``, forward and backward (:func:`count`)."""
        return count(self.stack.ops(b, n) + [("linear", dict(tokens=b * n, d_in=self.d_model, d_out=self.vocab))],
                     training)


# ---------------------------------------------------------------------- Jacobian blocks
def jacobian_profile(stack: MixerStack, x: np.ndarray, j: int | None = None) -> np.ndarray:
    """||d y_j / d x_i||_F for every input position i, for the stack's output y at position
    ``j`` (default the last), averaged in square over the batch of inputs ``x`` (B, N, d).

    One backward pass with d one-hot cotangents per input sequence: the row of
    (B * d, N, d) input gradients for cotangent e_(j, c) is row c of every block
    d y_j / d x_i, so the squared Frobenius norm of block i is the sum over c of
    ||dx[c, i, :]||^2. Returns (N,) float64; entries after j are 0 for causal stacks.
    """
    bk = stack.backend
    x = np.asarray(x)
    b, n, d = x.shape
    j = n - 1 if j is None else j
    xs = np.repeat(x, d, axis=0).astype(stack.dtype)  # (B * d, N, d): d copies of each sequence
    _, saved = stack.forward_train(bk.asarray(xs, stack.dtype))
    cot = np.zeros_like(xs)
    rows = np.arange(b * d)
    cot[rows, j, rows % d] = 1.0  # cotangent e_(j, c) for copy c of each sequence
    (dx,), _ = stack.backward(saved, bk.asarray(cot, stack.dtype))
    dx = np.asarray(bk.to_numpy(dx), dtype=np.float64)  # (B * d, N, d)
    sq = (dx ** 2).sum(axis=2).reshape(b, d, n).sum(axis=1)  # (B, N): squared block norms
    return np.sqrt(sq.mean(axis=0))


def as_float64(model: Module, backend="cpu") -> Module:
    """A float64 copy of a Tagger or MixerStack with the same weights (for Jacobians far
    below float32's range)."""
    cfg = {**model._config(), "dtype": "float64"}
    copy = type(model)(**cfg, backend=None)
    copy.load_state_dict({k: np.asarray(v, np.float64) for k, v in model.params.items()})
    copy.backend = backend
    copy.eval()
    return copy

