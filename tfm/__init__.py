"""tfm: Numba kernels, benchmarks and complexity studies for the Transformer of
"Attention Is All You Need" (Vaswani et al., 2017).

Public API (stable):

    tfm.attention(q, k, v, *, mask=None, causal=False, impl="fused", backend="cpu")
    tfm.TransformerConfig(...)          presets: .base() .big() .small() .tiny()
    tfm.Transformer(config, seed=0, backend="cpu")
    tfm.from_torch(module, backend="cpu")   nn.Transformer -> tfm.EncoderDecoder
    tfm.get_backend(name)               "numpy" (float64 reference) | "cpu" | "cuda"

The Transformer's sublayers (tfm.layers), which the models compose:

    tfm.MultiHeadAttention, tfm.FeedForward, tfm.LayerNorm, tfm.ResidualNorm,
    tfm.EncoderLayer, tfm.DecoderLayer, tfm.Encoder, tfm.Decoder,
    tfm.Embedding, tfm.TransformerEmbedding, tfm.Linear

Baselines of Table 1 (tfm.layers, tfm.models.lstm_seq2seq, tfm.models.convs2s):

    tfm.RNN / tfm.LSTM / tfm.GRU(input_size, hidden_size, num_layers=1, ...)
    tfm.Conv1d, tfm.ConvStack(dilated=False|True), tfm.ConvS2SBlock
    tfm.restricted_attention(q, k, v, window, *, causal=False, backend="cpu")
    tfm.LSTMSeq2Seq(LSTMSeq2SeqConfig(...)), tfm.ConvS2S(ConvS2SConfig(...))

Every layer and model is a ``tfm.Module``: parameters by PyTorch's state-dict names
(``.params``), ``.backend`` / ``.to(...)``, ``.save(path)`` / ``Class.load(path)``.

Training (backward passes on the numpy reference and the cpu backend):

    out, pullback = tfm.vjp(f, *args)   f: tfm.attention, tfm.restricted_attention, a layer or a model
    input_grads, param_grads = pullback(cotangent)
    model.loss(src_ids, tgt_ids, label_smoothing=0.1) / model.loss_and_grad(...)
    opt = tfm.optim.Adam(model, lr=tfm.optim.noam(d_model, warmup_steps=4000))
    model.train_step(opt, src_ids, tgt_ids)          returns the loss; model.train() / .eval()

Threading: Numba's parallel kernels run on OpenMP. libgomp's idle threads spin after each
parallel region and take the cores from the next BLAS or PyTorch call in the same process
(measured on 2 cores: a small model's forward pass 124 ms instead of 1.35 ms). Importing tfm
therefore sets ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep) unless you set it yourself;
it takes effect if tfm is imported before the first parallel kernel or ``import torch``.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backends import BACKENDS, get_backend
from .config import ConvS2SConfig, LSTMSeq2SeqConfig, TransformerConfig
from .errors import BackendUnavailable, InsufficientMemoryError
from .functional import attention
from .interop import from_torch
from . import layers
from .layers import *  # noqa: F401,F403  (every public layer: tfm.layers.__all__)
from .models import ConvS2S, EncoderDecoder, LSTMSeq2Seq, Transformer
from .autodiff import vjp
from . import optim

__version__ = "0.1.0"

__all__ = sorted([
    "BACKENDS",
    "BackendUnavailable",
    "ConvS2S",
    "ConvS2SConfig",
    "EncoderDecoder",
    "InsufficientMemoryError",
    "LSTMSeq2Seq",
    "LSTMSeq2SeqConfig",
    "Transformer",
    "TransformerConfig",
    "attention",
    "from_torch",
    "get_backend",
    "optim",
    "vjp",
] + layers.__all__)
