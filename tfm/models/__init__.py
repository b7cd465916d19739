"""Models built from tfm.layers: ``Model`` and ``Seq2Seq`` (shared plumbing), the Transformer
and the two sequence-to-sequence baselines of Table 1."""

from .base import Model, Seq2Seq
from .convs2s import ConvS2S
from .lstm_seq2seq import LSTMSeq2Seq
from .transformer import EncoderDecoder, Transformer

__all__ = ["ConvS2S", "EncoderDecoder", "LSTMSeq2Seq", "Model", "Seq2Seq", "Transformer"]
