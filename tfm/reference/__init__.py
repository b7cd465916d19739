"""The float64 NumPy reference: the living definition every fast kernel is tested against.

One function per equation of the paper, written for reading, not for speed.
``transformer`` holds section 3 (attention, FFN, embeddings, positional encoding);
``baselines`` holds the recurrent, convolutional and restricted-attention layers of Table 1.
"""

from . import baselines, transformer  # noqa: F401
from .transformer import (  # noqa: F401
    embed,
    gelu,
    layer_norm,
    linear,
    log_softmax,
    merge_heads,
    multi_head_attention,
    position_wise_ffn,
    positional_encoding,
    relu,
    scaled_dot_product_attention,
    softmax,
    split_heads,
)
