"""The float64 NumPy reference: the living definition every fast kernel is tested against.

One function per equation of the paper, written for reading, not for speed.
``transformer`` holds section 3 (attention, FFN, embeddings, positional encoding);
``baselines`` holds the recurrent, convolutional and restricted-attention layers of Table 1;
``training`` holds section 5 (cross-entropy with label smoothing, dropout, Adam).

Training: each forward's backward sits beside it (``linear`` / ``linear_backward``), written
as explicit formulas; a forward whose backward needs more than its inputs and output has a
``*_train`` twin returning it (``layer_norm_train``: mean and rstd;
``scaled_dot_product_attention_train``: the row log-sum-exp).
"""

from . import baselines, training, transformer  # noqa: F401
from .training import (  # noqa: F401
    adam_step,
    cross_entropy,
    cross_entropy_backward,
    dropout,
    dropout_backward,
    dropout_keep,
    dropout_threshold,
    dropout_uniform,
)
from .transformer import (  # noqa: F401
    attention_visibility,
    embed,
    embed_backward,
    gelu,
    gelu_backward,
    layer_norm,
    layer_norm_backward,
    layer_norm_train,
    linear,
    linear_backward,
    log_softmax,
    log_softmax_backward,
    merge_heads,
    merge_heads_backward,
    merge_heads_into,
    multi_head_attention,
    position_wise_ffn,
    position_wise_ffn_backward,
    positional_encoding,
    relu,
    relu_backward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_train,
    softmax,
    softmax_backward,
    split_heads,
    split_heads_backward,
)
