"""Analytic cost models: floating-point operations and the fewest bytes each op must move.

Every timing in the benchmarks and studies is turned into GFLOP/s (and GB/s) with these
counts, and so into a fraction of the machine's measured ceilings (llm.c, nanoGPT's
``estimate_mfu`` and flash-attention's benchmarks count the same way).

Conventions
-----------
* A multiply-add counts as 2 FLOPs; matrix products dominate, so elementwise work
  (bias, activation, softmax, gates) is counted with small per-element constants, stated
  beside each formula.
* Attention counts the two matrix products only: ``4 * B * H * Nq * Nk * d`` for d_k = d_v = d
  (flash-attention's convention). Causal attention counts only the visible (query, key) pairs,
  which is (n + 1) / (2n) of the full matrix for Nq = Nk = n: "halved for causal".
* ``bytes_moved`` is the compulsory traffic: every input read once and every output written
  once (``itemsize`` bytes per element); naive attention also writes and reads its
  (Nq, Nk) score matrix. Real kernels move at least this much.
* Training (``training_flops``): forward + backward, the backward counted as 2x the forward
  for every matrix product with weights (dX and dW are each a product as large as the
  forward's) and for the elementwise work, and 2.5x for attention (five matrix products
  against the forward's two: the backward recomputes the scores). The optimizer's few FLOPs
  per parameter are left out.
* ``training_memory`` is the analytic activation memory of a training step: the bytes the
  forward keeps for the backward (``saved``, its outputs included), the gradients the backward
  returns (``gradients``: of the inputs and of the parameters) and the backward's largest
  transient (``workspace``); ``total`` is their sum, what a step allocates beyond its inputs,
  weights and cotangent. ``parameters`` counts a model's parameters from its config.

Usage::

    flops("attention", b=1, h=8, nq=4096, nk=4096, dk=64, causal=True)
    flops("transformer_forward", config=TransformerConfig.base(), b=8, n_src=128, n_tgt=128)
    bytes_moved("ffn", tokens=1024, d_model=512, d_ff=2048)
    training_flops("transformer_forward", config=TransformerConfig.small(), b=8, n_src=64, n_tgt=64)
    training_memory("attention", b=1, h=1, nq=4096, nk=4096, dk=64, impl="naive")["total"]
"""

from __future__ import annotations

from typing import Callable

# Per-element constants for the non-matmul work (documented, deliberately simple).
SOFTMAX_FLOPS_PER_ELEMENT = 5  # max, subtract, exp, sum, divide
LAYER_NORM_FLOPS_PER_ELEMENT = 8  # residual add, mean, centre, square, sum, scale, gamma, beta
ACTIVATION_FLOPS_PER_ELEMENT = 1  # relu: max (GELU costs more, but is a small term)
LSTM_GATE_FLOPS_PER_UNIT = 12  # bias adds, 3 sigmoids, 2 tanh, c = f*c + i*g, h = o*tanh(c)
GRU_GATE_FLOPS_PER_UNIT = 12  # bias adds, 2 sigmoids, tanh, r*hn, h = (1-z)*n + z*h
RNN_FLOPS_PER_UNIT = 3  # 2 bias adds, tanh


def causal_pairs(nq: int, nk: int) -> int:
    """Number of visible (query, key) pairs under a top-left-aligned causal mask."""
    m = min(nq, nk)
    return m * (m + 1) // 2 + max(nq - nk, 0) * nk


def restricted_pairs(n: int, window: int, causal: bool = False) -> int:
    """Number of (query, key) pairs inside the restricted-attention windows (exact, with borders)."""
    total = 0
    lo_off, hi_off = (window - 1, 0) if causal else ((window - 1) // 2, window // 2)
    for i in range(n):
        lo, hi = max(0, i - lo_off), min(n - 1, i + hi_off)
        total += hi - lo + 1
    return total


# ---------------------------------------------------------------------------- FLOPs
def _linear(tokens, d_in, d_out, bias=True):
    return 2 * tokens * d_in * d_out + (tokens * d_out if bias else 0)


def _ffn(tokens, d_model, d_ff):
    return (_linear(tokens, d_model, d_ff) + ACTIVATION_FLOPS_PER_ELEMENT * tokens * d_ff
            + _linear(tokens, d_ff, d_model))


def _layer_norm(tokens, d):
    return LAYER_NORM_FLOPS_PER_ELEMENT * tokens * d


def _softmax(rows, cols):
    return SOFTMAX_FLOPS_PER_ELEMENT * rows * cols


def _attention(b, h, nq, nk, dk, dv=None, causal=False):
    dv = dk if dv is None else dv
    pairs = causal_pairs(nq, nk) if causal else nq * nk
    return 2 * b * h * pairs * (dk + dv)


def _restricted_attention(b, h, n, d, window, causal=False):
    return 4 * b * h * restricted_pairs(n, window, causal) * d


def _mha(b, nq, nk, d_model, h, causal=False):
    """Projections (Q from nq tokens; K, V from nk tokens; output) plus attention."""
    d_head = d_model // h
    proj = (_linear(b * nq, d_model, d_model) + 2 * _linear(b * nk, d_model, d_model)
            + _linear(b * nq, d_model, d_model))
    return proj + _attention(b, h, nq, nk, d_head, causal=causal)


def _rnn(b, n, d_in, d_hidden):
    return 2 * b * n * (d_in + d_hidden) * d_hidden + RNN_FLOPS_PER_UNIT * b * n * d_hidden


def _lstm(b, n, d_in, d_hidden):
    return 2 * b * n * (d_in + d_hidden) * 4 * d_hidden + LSTM_GATE_FLOPS_PER_UNIT * b * n * d_hidden


def _gru(b, n, d_in, d_hidden):
    return 2 * b * n * (d_in + d_hidden) * 3 * d_hidden + GRU_GATE_FLOPS_PER_UNIT * b * n * d_hidden


def _conv1d(b, n_out, c_in, c_out, k):
    return 2 * b * n_out * c_in * c_out * k + b * n_out * c_out


def _encoder_layer(b, n, d_model, h, d_ff):
    return _mha(b, n, n, d_model, h) + _ffn(b * n, d_model, d_ff) + 2 * _layer_norm(b * n, d_model)


def _decoder_layer(b, n_tgt, n_src, d_model, h, d_ff):
    return (_mha(b, n_tgt, n_tgt, d_model, h, causal=True) + _mha(b, n_tgt, n_src, d_model, h)
            + _ffn(b * n_tgt, d_model, d_ff) + 3 * _layer_norm(b * n_tgt, d_model))


def _transformer_forward(config, b, n_src, n_tgt, output_projection=True):
    """Encoder over n_src tokens, decoder over n_tgt tokens, output projection (+ log-softmax)."""
    c = config
    total = c.n_encoder_layers * _encoder_layer(b, n_src, c.d_model, c.n_heads, c.d_ff)
    total += c.n_decoder_layers * _decoder_layer(b, n_tgt, n_src, c.d_model, c.n_heads, c.d_ff)
    if output_projection:
        total += _linear(b * n_tgt, c.d_model, c.tgt_vocab, bias=False)
    return total


def _transformer_generate(config, b, n_src, n_new):
    """Greedy decoding with a KV cache: the encoder once, then one token per step.

    Step t (1-based) projects one query, attends over t cached keys (self) and n_src keys
    (cross; their K/V are projected once), and projects to the vocabulary.
    """
    c = config
    d, h = c.d_model, c.n_heads
    total = c.n_encoder_layers * _encoder_layer(b, n_src, d, h, c.d_ff)
    total += c.n_decoder_layers * 2 * _linear(b * n_src, d, d)  # cross-attention K, V once
    for t in range(1, n_new + 1):
        per_layer = (4 * _linear(b, d, d) + _attention(b, h, 1, t, d // h)  # self: q,k,v,o
                     + 2 * _linear(b, d, d) + _attention(b, h, 1, n_src, d // h)  # cross: q,o
                     + _ffn(b, d, c.d_ff) + 3 * _layer_norm(b, d))
        total += c.n_decoder_layers * per_layer + _linear(b, d, c.tgt_vocab, bias=False)
    return total


def _glu(tokens, d):
    return 4 * tokens * d  # sigmoid (~3) and the product, per output element


def _lstm_seq2seq_forward(config, b, n_src, n_tgt):
    """tfm.LSTMSeq2Seq: two LSTM stacks, Luong attention (query projection, one head of width
    d, the combine layer over [context; state]) and the output projection."""
    c = config
    d, t = c.d_model, b * n_tgt
    total = c.n_layers * (_lstm(b, n_src, d, d) + _lstm(b, n_tgt, d, d))
    total += _linear(t, d, d, bias=False) + _attention(b, 1, n_tgt, n_src, d)
    total += _linear(t, d, d, bias=False) + _linear(t, d, d) + ACTIVATION_FLOPS_PER_ELEMENT * t * d
    return total + _linear(t, d, c.tgt_vocab)


def _convs2s_forward(config, b, n_src, n_tgt):
    """tfm.ConvS2S: per encoder block a conv d -> 2d and GLU; per decoder layer a causal conv
    and GLU, the query projection, one head of width d over the source, the output projection."""
    c = config
    d, k, t = c.d_model, c.kernel_size, b * n_tgt
    enc = _conv1d(b, n_src, d, 2 * d, k) + _glu(b * n_src, d)
    dec = (_conv1d(b, n_tgt, d, 2 * d, k) + _glu(t, d) + 2 * _linear(t, d, d)
           + _attention(b, 1, n_tgt, n_src, d))
    return c.n_layers * (enc + dec) + _linear(t, d, c.tgt_vocab)


_FLOPS: dict[str, Callable[..., float]] = {
    "linear": _linear,
    "ffn": _ffn,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "attention": _attention,
    "restricted_attention": _restricted_attention,
    "mha": _mha,
    "rnn": _rnn,
    "lstm": _lstm,
    "gru": _gru,
    "conv1d": _conv1d,
    "encoder_layer": _encoder_layer,
    "decoder_layer": _decoder_layer,
    "transformer_forward": _transformer_forward,
    "transformer_generate": _transformer_generate,
    "glu": _glu,
    "lstm_seq2seq_forward": _lstm_seq2seq_forward,
    "convs2s_forward": _convs2s_forward,
}

OPS = tuple(_FLOPS)


def flops(op: str, **dims) -> float:
    """Floating-point operations of ``op`` at the given sizes (see the module docstring)."""
    if op not in _FLOPS:
        raise ValueError(f"unknown op {op!r} for flops(); known: {', '.join(OPS)}")
    return float(_FLOPS[op](**dims))


# ---------------------------------------------------------------------------- training FLOPs
BACKWARD_FACTOR = 2.0  # backward / forward FLOPs of matrix products with weights and elementwise work
ATTENTION_BACKWARD_FACTOR = 2.5  # five matrix products against the forward's two


def _attention_part(op, **dims) -> float:
    """The FLOPs of ``op``'s forward spent in attention cores (0 for ops without one)."""
    if op in ("attention", "restricted_attention"):
        return flops(op, **dims)
    if op == "mha":
        return _attention(dims["b"], dims["h"], dims["nq"], dims["nk"], dims["d_model"] // dims["h"],
                          causal=dims.get("causal", False))
    if op == "encoder_layer":
        d_head = dims["d_model"] // dims["h"]
        return _attention(dims["b"], dims["h"], dims["n"], dims["n"], d_head)
    if op == "decoder_layer":
        b, h, nt, ns = dims["b"], dims["h"], dims["n_tgt"], dims["n_src"]
        d_head = dims["d_model"] // h
        return _attention(b, h, nt, nt, d_head, causal=True) + _attention(b, h, nt, ns, d_head)
    if op == "transformer_forward":
        c, b, ns, nt = dims["config"], dims["b"], dims["n_src"], dims["n_tgt"]
        return (c.n_encoder_layers * _attention_part("encoder_layer", b=b, n=ns, d_model=c.d_model, h=c.n_heads)
                + c.n_decoder_layers * _attention_part("decoder_layer", b=b, n_tgt=nt, n_src=ns, d_model=c.d_model,
                                                       h=c.n_heads))
    if op == "lstm_seq2seq_forward":
        return _attention(dims["b"], 1, dims["n_tgt"], dims["n_src"], dims["config"].d_model)
    if op == "convs2s_forward":
        c = dims["config"]
        return c.n_layers * _attention(dims["b"], 1, dims["n_tgt"], dims["n_src"], c.d_model)
    return 0.0


_NOT_TRAINED = ("transformer_generate",)


def training_flops(op: str, **dims) -> float:
    """Forward + backward FLOPs of ``op`` (a training step less the optimizer): three times
    the forward, plus half of its attention FLOPs again (module docstring). Takes ``flops``'s
    arguments; ``transformer_forward`` with ``output_projection`` as there."""
    if op in _NOT_TRAINED:
        raise ValueError(f"{op!r} is inference only (greedy decoding); training_flops takes the teacher-forced "
                         f"forward, e.g. 'transformer_forward'")
    attention_dims = {k: v for k, v in dims.items() if k != "output_projection"}
    forward = flops(op, **dims)
    att = _attention_part(op, **attention_dims)
    return float((1 + BACKWARD_FACTOR) * (forward - att) + (1 + ATTENTION_BACKWARD_FACTOR) * att)


# ---------------------------------------------------------------------------- parameters
def _transformer_params(config):
    c = config
    d, f = c.d_model, c.d_ff
    mha, ffn, norm = 4 * d * d + 4 * d, 2 * d * f + f + d, 2 * d
    total = c.src_vocab * d + c.tgt_vocab * d
    total += c.n_encoder_layers * (mha + ffn + 2 * norm) + c.n_decoder_layers * (2 * mha + ffn + 3 * norm)
    total += 2 * norm if c.final_norm else 0
    return total + (0 if c.tie_embeddings else c.tgt_vocab * d)


def _lstm_seq2seq_params(config):
    c = config
    d = c.d_model
    lstm = 4 * d * (2 * d + 2)  # W_ih, W_hh and two biases per layer (input size d)
    return (c.src_vocab + c.tgt_vocab) * d + 2 * c.n_layers * lstm + 3 * d * d + d + c.tgt_vocab * (d + 1)


def _convs2s_params(config):
    c = config
    d, k = c.d_model, c.kernel_size
    conv = 2 * d * d * k + 2 * d
    return ((c.src_vocab + c.tgt_vocab + 2 * c.max_len) * d + c.n_layers * conv
            + c.n_layers * (conv + 2 * (d * d + d)) + c.tgt_vocab * (d + 1))


_PARAMS: dict[str, Callable] = {
    "transformer_forward": _transformer_params,
    "lstm_seq2seq_forward": _lstm_seq2seq_params,
    "convs2s_forward": _convs2s_params,
}


def parameters(op: str, config) -> int:
    """Number of parameters of the model whose forward is ``op`` (``transformer_forward``,
    ``lstm_seq2seq_forward``, ``convs2s_forward``), from its config: equals ``model.n_params``."""
    if op not in _PARAMS:
        raise ValueError(f"unknown model {op!r} for parameters(); known: {', '.join(_PARAMS)}")
    return int(_PARAMS[op](config))


# ---------------------------------------------------------------------------- training memory
# Elements (not bytes) of each term, per op; training_memory multiplies by the itemsize. Each
# formula follows the algorithm tfm implements (the docstrings say which tensors), not the
# allocation pattern of one backend; inputs, weights and the output cotangent are not counted.
def _mem_attention(b, h, nq, nk, dk, dv=None, causal=False, impl="fused"):
    """Saved: O and the per-row log-sum-exp. Gradients: dQ, dK, dV. Workspace: "naive" holds
    the probabilities P and dP, two (Nq, Nk) matrices per head; "fused" recomputes score tiles
    from the log-sum-exp and holds only D = rowsum(dO * O) and the lse rows, 2 Nq per head."""
    dv = dk if dv is None else dv
    saved = b * h * nq * (dv + 1)
    grads = b * h * (nq * dk + nk * dk + nk * dv)
    work = 2 * b * h * nq * nk if impl == "naive" else 2 * b * h * nq
    return saved, grads, work


def _mem_restricted_attention(b, h, n, d, window, causal=False):
    """As fused attention: O and the lse saved; each row's window of scores recomputed."""
    return b * h * n * (d + 1), 3 * b * h * n * d, 2 * b * h * n


def _mem_recurrent(gates, per_step, states):
    def f(b, n, d_in, d_hidden):
        """Saved: ``per_step`` x H values of every step (the output h_t, and for the LSTM its
        four gates and the cell state, for the GRU its three gates and W_hn h + b_hn) and the
        final states. Gradients: dX, the initial states', the weights and biases. Workspace:
        one (B, N, gates x H) array: the input projections in the forward, the gates'
        gradients in the backward."""
        hid = d_hidden
        saved = b * n * hid * per_step + states * b * hid
        grads = b * n * d_in + states * b * hid + gates * hid * (d_in + hid + 2)
        return saved, grads, b * n * gates * hid
    return f


def _mem_conv1d(b, n_out, c_in, c_out, k, n_in=None):
    """Saved: the output (the input is the step's own). Gradients: dX, dW, db. No workspace."""
    n_in = n_out if n_in is None else n_in
    return b * n_out * c_out, b * n_in * c_in + c_out * c_in * k + c_out, 0


def _mem_ffn(tokens, d_model, d_ff):
    """Saved: the hidden layer before and after the activation, the output. Gradients: dX and
    both layers' weights and biases. Workspace: the hidden layer's gradient."""
    return tokens * (2 * d_ff + d_model), tokens * d_model + 2 * d_model * d_ff + d_ff + d_model, tokens * d_ff


def _mem_mha(b, nq, nk, d_model, h, causal=False):
    """Self-attention with its projections (nq = nk, one input x): saved Q, K, V, the
    attention's O and lse, the merged heads and the output; gradients dX and the four
    projections; workspace as fused attention, plus dQ, dK, dV merged back into (B, N, 3d)."""
    d = d_model
    a_saved, a_grads, a_work = _mem_attention(b, h, nq, nk, d // h, causal=causal)
    saved = 3 * b * nq * d + a_saved + 2 * b * nq * d
    grads = b * nq * d + 4 * (d * d + d)
    return saved, grads, a_grads + a_work + 3 * b * nq * d


def _mem_transformer(config, b, n_src, n_tgt, n_params=None):
    """Per encoder layer (t = B n tokens): Q, K, V, O (+ lse), the merged heads, the projected
    output and LayerNorm's output and statistics (7 t d + 2 t + B h n), the FFN's two hidden
    layers, its output and the second LayerNorm (2 t d_ff + 2 t d + 2 t). Per decoder layer the
    same with a second attention whose K and V come from the source. Plus the embeddings, the
    logits and their gradient (2 B n_tgt V). Gradients: every parameter (``n_params``, default
    :func:`parameters`). Workspace: the largest backward transient of one layer, its FFN's
    hidden gradient (t d_ff) and the attention's dQ, dK, dV (3 t d)."""
    c = config
    d, f, h, v = c.d_model, c.d_ff, c.n_heads, c.tgt_vocab
    ts, tt = b * n_src, b * n_tgt
    enc = 7 * ts * d + 2 * ts + b * h * n_src + 2 * ts * f + 2 * ts * d + 2 * ts
    dec_self = 7 * tt * d + 2 * tt + b * h * n_tgt
    dec_cross = tt * d + 2 * ts * d + 4 * tt * d + 2 * tt + b * h * n_tgt  # Q; K, V of the source; O ...
    dec = dec_self + dec_cross + 2 * tt * f + 2 * tt * d + 2 * tt
    saved = (ts + tt) * d + c.n_encoder_layers * enc + c.n_decoder_layers * dec + 2 * tt * v
    grads = parameters("transformer_forward", c) if n_params is None else n_params
    work = max(ts, tt) * f + 3 * max(ts, tt) * d
    return saved, grads, work


def _mem_lstm_seq2seq(config, b, n_src, n_tgt, n_params=None):
    """Per LSTM layer its outputs, gates and cells (6 B n d); the embeddings; the attention's
    query, O (+ lse), context, pre-activation and output (5 B n_tgt d); the logits and their
    gradient. Workspace: one LSTM layer's gate gradients (4 B n d, the longer side)."""
    c = config
    d, v = c.d_model, c.tgt_vocab
    ts, tt = b * n_src, b * n_tgt
    saved = (ts + tt) * d + c.n_layers * 6 * (ts + tt) * d + 5 * tt * d + tt + 2 * tt * v
    grads = parameters("lstm_seq2seq_forward", c) if n_params is None else n_params
    return saved, grads, 4 * max(ts, tt) * d


def _mem_convs2s(config, b, n_src, n_tgt, n_params=None):
    """Per encoder block the conv output (2d) and the block output (d); per decoder layer the
    conv output, GLU, query, O (+ lse), merged heads and output (7 d per target token); the
    embeddings with positions; the logits and their gradient. Workspace: one conv's output
    gradient (2 B n d, the longer side)."""
    c = config
    d, v = c.d_model, c.tgt_vocab
    ts, tt = b * n_src, b * n_tgt
    saved = 2 * (ts + tt) * d + c.n_layers * (3 * ts * d + 7 * tt * d + tt) + 2 * tt * v
    grads = parameters("convs2s_forward", c) if n_params is None else n_params
    return saved, grads, 2 * max(ts, tt) * d


_MEMORY: dict[str, Callable] = {
    "attention": _mem_attention,
    "restricted_attention": _mem_restricted_attention,
    "rnn": _mem_recurrent(1, 1, 1),
    "lstm": _mem_recurrent(4, 6, 2),
    "gru": _mem_recurrent(3, 5, 1),
    "conv1d": _mem_conv1d,
    "ffn": _mem_ffn,
    "mha": _mem_mha,
    "transformer_forward": _mem_transformer,
    "lstm_seq2seq_forward": _mem_lstm_seq2seq,
    "convs2s_forward": _mem_convs2s,
}


def training_memory(op: str, itemsize: int = 4, **dims) -> dict[str, float]:
    """Analytic activation memory of one training step of ``op``, in bytes: ``saved``,
    ``gradients``, ``workspace`` and their ``total`` (module docstring; each formula's
    docstring names its tensors). Takes ``flops``'s arguments, ``impl`` for attention and
    ``n_params`` (default: :func:`parameters`) for the models."""
    if op not in _MEMORY:
        raise ValueError(f"unknown op {op!r} for training_memory(); known: {', '.join(_MEMORY)}")
    saved, grads, work = (float(x) * itemsize for x in _MEMORY[op](**dims))
    return {"saved": saved, "gradients": grads, "workspace": work, "total": saved + grads + work}


# ---------------------------------------------------------------------------- bytes
def _bytes_linear(tokens, d_in, d_out, bias=True):
    return tokens * d_in + d_in * d_out + (d_out if bias else 0) + tokens * d_out


def _bytes_ffn(tokens, d_model, d_ff):
    # x in, W1, b1, hidden out (written once, read once), W2, b2, y out
    return tokens * d_model + 2 * d_model * d_ff + d_ff + d_model + 2 * tokens * d_ff + tokens * d_model


def _bytes_attention(b, h, nq, nk, dk, dv=None, causal=False, impl="fused"):
    dv = dk if dv is None else dv
    io = b * h * (nq * dk + nk * dk + nk * dv + nq * dv)
    if impl == "naive":  # scores written, read, probabilities written, read
        pairs = causal_pairs(nq, nk) if causal else nq * nk
        io += 4 * b * h * pairs
    return io


def _bytes_restricted_attention(b, h, n, d, window, causal=False):
    return b * h * 4 * n * d


def _bytes_recurrent(gates):
    def f(b, n, d_in, d_hidden):
        weights = gates * d_hidden * (d_in + d_hidden + 2)
        return b * n * d_in + weights + b * n * d_hidden + 2 * b * d_hidden
    return f


def _bytes_conv1d(b, n_out, c_in, c_out, k):
    return b * n_out * c_in + c_out * c_in * k + c_out + b * n_out * c_out


_BYTES: dict[str, Callable[..., float]] = {
    "linear": _bytes_linear,
    "ffn": _bytes_ffn,
    "layer_norm": lambda tokens, d: 3 * tokens * d + 2 * d,  # x, residual in; y out
    "softmax": lambda rows, cols: 2 * rows * cols,
    "attention": _bytes_attention,
    "restricted_attention": _bytes_restricted_attention,
    "rnn": _bytes_recurrent(1),
    "lstm": _bytes_recurrent(4),
    "gru": _bytes_recurrent(3),
    "conv1d": _bytes_conv1d,
}


def bytes_moved(op: str, itemsize: int = 4, **dims) -> float:
    """Compulsory bytes of ``op``: inputs read once, outputs written once (``itemsize`` each)."""
    if op not in _BYTES:
        raise ValueError(f"unknown op {op!r} for bytes_moved(); known: {', '.join(_BYTES)}")
    return float(_BYTES[op](**dims) * itemsize)


def arithmetic_intensity(op: str, itemsize: int = 4, **dims) -> float:
    """FLOPs per compulsory byte: the x coordinate of a roofline plot."""
    return flops(op, **{k: v for k, v in dims.items() if k != "impl"}) / bytes_moved(op, itemsize, **dims)
