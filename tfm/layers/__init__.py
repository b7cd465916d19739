"""tfm's layers: public, backend-agnostic modules that models compose.

Every class is a :class:`~tfm.layers.module.Module`: it holds its parameters under
PyTorch's state-dict names (``tfm.from_torch`` copies weights as they are), runs on any
backend (``backend=`` "numpy", "cpu" or "cuda"; ``layer.to(...)`` moves it), saves and
loads itself, and offers ``forward`` on backend arrays (what models call) beside a public
call that checks host inputs and returns host arrays. Sequences are batch-first
(B, N, features). One module per family, as in the backends:

    linear.py       Linear, FeedForward (eq. 2)
    norm.py         LayerNorm, ResidualNorm (the residual connection with its LayerNorm,
                    post-norm as the paper or pre-norm)
    embedding.py    Embedding, TransformerEmbedding (x sqrt(d_model) + sinusoidal positions)
    attention.py    MultiHeadAttention (self, causal, cross; KVCache for greedy decoding)
    transformer.py  EncoderLayer, DecoderLayer, Encoder, Decoder
    recurrent.py    RNN, LSTM, GRU (multi-layer, unidirectional)
    conv.py         Conv1d, ConvStack (contiguous or dilated), ConvS2SBlock
    restricted.py   restricted_attention (attention to the r nearest keys)
    module.py       Module (the shared plumbing) and the initialisers
"""

from .attention import KVCache, MultiHeadAttention
from .conv import Conv1d, ConvS2SBlock, ConvStack, conv_padding
from .embedding import Embedding, TransformerEmbedding
from .linear import FeedForward, Linear
from .module import Module
from .norm import LayerNorm, ResidualNorm
from .recurrent import GRU, LSTM, RNN
from .restricted import restricted_attention
from .transformer import Decoder, DecoderLayer, Encoder, EncoderLayer

__all__ = ["Conv1d", "ConvS2SBlock", "ConvStack", "Decoder", "DecoderLayer", "Embedding", "Encoder",
           "EncoderLayer", "FeedForward", "GRU", "KVCache", "LSTM", "LayerNorm", "Linear", "Module",
           "MultiHeadAttention", "RNN", "ResidualNorm", "TransformerEmbedding", "conv_padding",
           "restricted_attention"]
