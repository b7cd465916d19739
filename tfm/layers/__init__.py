"""tfm's layers: public, backend-agnostic modules that models compose.

Every class is a :class:`~tfm.layers.module.Module`: it holds its parameters under
PyTorch's state-dict names (``tfm.from_torch`` copies weights as they are), runs on any
backend (``backend=`` "numpy", "cpu" or "cuda"; ``layer.to(...)`` moves it), saves and
loads itself, and offers ``forward`` on backend arrays (what models call) beside a public
call that checks host inputs and returns host arrays, and ``forward_train``/``backward``
for training (``tfm.vjp`` differentiates the public call). Sequences are batch-first
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

A new layer type is a class in its family's module, listed in that module's ``__all__``
(which ``tfm.layers`` and ``tfm`` export), and its tests; a new family module is also
imported here.
"""

from . import attention, conv, embedding, linear, module, norm, recurrent, restricted, transformer
from .attention import *  # noqa: F401,F403  (each family module names its public layers in __all__)
from .conv import *  # noqa: F401,F403
from .embedding import *  # noqa: F401,F403
from .linear import *  # noqa: F401,F403
from .module import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .recurrent import *  # noqa: F401,F403
from .restricted import *  # noqa: F401,F403
from .transformer import *  # noqa: F401,F403

__all__ = sorted(name for family in (attention, conv, embedding, linear, module, norm, recurrent, restricted,
                                     transformer) for name in family.__all__)
