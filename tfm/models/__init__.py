"""Models built on the backend interface: ``Model`` (shared plumbing), the Transformer."""

from .base import Model
from .transformer import EncoderDecoder, Transformer

__all__ = ["EncoderDecoder", "Model", "Transformer"]
