"""``torch.nn.Transformer`` -> :class:`tfm.models.EncoderDecoder` (same layers as tfm.Transformer).

Supported: ``batch_first=True``; post-norm or pre-norm (``norm_first``); ReLU or exact GELU
(given as "relu"/"gelu", ``F.relu``/``F.gelu`` or ``nn.ReLU()``/``nn.GELU()``); the final
LayerNorm after each stack (both present, as nn.Transformer builds them, or both absent);
``custom_encoder``/``custom_decoder`` only when they are plain ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` stacks of the standard layers. Everything else raises a
``ValueError``/``TypeError`` naming what is not supported. Weights are copied (float32 or
float64, the module's dtype); the tfm model does not follow later changes to the module.
Dropout is ignored: the converted model computes what the module computes in ``eval()``.
"""

from __future__ import annotations

import numpy as np

from ..config import TransformerConfig
from ..models.transformer import EncoderDecoder

_DTYPES = {"torch.float32": "float32", "torch.float64": "float64"}


def _activation_name(layer) -> str:
    import torch.nn as nn
    import torch.nn.functional as F

    act = layer.activation
    if act is F.relu or type(act) is nn.ReLU:
        return "relu"
    if act is F.gelu or (type(act) is nn.GELU and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"unsupported activation {act!r} in {type(layer).__name__}: tfm supports "
                     f"relu and exact gelu (F.relu, F.gelu, nn.ReLU(), nn.GELU())")


def _check_norm(norm, where: str) -> float:
    import torch.nn as nn

    if type(norm) is not nn.LayerNorm:
        raise TypeError(f"{where} must be a torch.nn.LayerNorm, got {type(norm).__name__}")
    if not norm.elementwise_affine or norm.bias is None:
        raise ValueError(f"{where}: LayerNorm without an affine weight and bias is not supported")
    return float(norm.eps)


def _check_attention(attn, d_model: int, n_heads: int, where: str) -> None:
    if attn.embed_dim != d_model or attn.num_heads != n_heads:
        raise ValueError(f"{where}: embed_dim={attn.embed_dim}, num_heads={attn.num_heads} differ "
                         f"from the model's d_model={d_model}, nhead={n_heads}")
    if not attn._qkv_same_embed_dim:
        raise ValueError(f"{where}: separate kdim/vdim projections are not supported")
    if attn.in_proj_bias is None or attn.out_proj.bias is None:
        raise ValueError(f"{where}: attention without biases (bias=False) is not supported")
    if attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError(f"{where}: add_bias_kv / add_zero_attn are not supported")


def convert_transformer(module, backend: str = "cpu") -> EncoderDecoder:
    """Copy an ``nn.Transformer``'s weights into an :class:`EncoderDecoder` on ``backend``."""
    import torch.nn as nn

    if not module.batch_first:
        raise ValueError("tfm needs nn.Transformer(..., batch_first=True): tfm is batch-first "
                         "(B, N, d_model); rebuild the module with batch_first=True")
    encoder, decoder = module.encoder, module.decoder
    if type(encoder) is not nn.TransformerEncoder or type(decoder) is not nn.TransformerDecoder:
        raise TypeError(
            f"custom_encoder/custom_decoder of type {type(encoder).__name__}/{type(decoder).__name__} "
            "are not supported; only nn.TransformerEncoder and nn.TransformerDecoder stacks")
    d_model, n_heads = int(module.d_model), int(module.nhead)
    layers = [("encoder", i, l, nn.TransformerEncoderLayer) for i, l in enumerate(encoder.layers)]
    layers += [("decoder", i, l, nn.TransformerDecoderLayer) for i, l in enumerate(decoder.layers)]
    if (encoder.norm is None) != (decoder.norm is None):
        raise ValueError("the encoder and decoder must both have a final LayerNorm or both lack one")
    final_norm = encoder.norm is not None
    epsilons = {_check_norm(s.norm, f"{n}.norm") for n, s in (("encoder", encoder), ("decoder", decoder))
                if s.norm is not None}
    activations, norm_first, d_ffs = set(), set(), set()
    for stack, i, layer, cls in layers:
        where = f"{stack}.layers.{i}"
        if type(layer) is not cls:
            raise TypeError(f"{where} is a {type(layer).__name__}; only {cls.__name__} is supported")
        activations.add(_activation_name(layer))
        norm_first.add(bool(layer.norm_first))
        d_ffs.add(layer.linear1.out_features)
        for attn_name in ("self_attn", "multihead_attn") if stack == "decoder" else ("self_attn",):
            _check_attention(getattr(layer, attn_name), d_model, n_heads, f"{where}.{attn_name}")
        for norm_name in ("norm1", "norm2", "norm3") if stack == "decoder" else ("norm1", "norm2"):
            epsilons.add(_check_norm(getattr(layer, norm_name), f"{where}.{norm_name}"))
        if layer.linear1.bias is None or layer.linear2.bias is None:
            raise ValueError(f"{where}: feed-forward without biases (bias=False) is not supported")
    for what, values in (("activation", activations), ("norm_first", norm_first),
                         ("dim_feedforward", d_ffs), ("layer_norm_eps", epsilons)):
        if len(values) > 1:
            raise ValueError(f"all layers must share one {what}, got {sorted(values)}")

    dtypes = {str(p.dtype) for p in module.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise TypeError(f"nn.Transformer parameters must all be float32 or all float64, got {sorted(dtypes)}")
    config = TransformerConfig(
        d_model=d_model, n_heads=n_heads, d_ff=d_ffs.pop() if d_ffs else 4 * d_model,
        n_encoder_layers=len(encoder.layers), n_decoder_layers=len(decoder.layers),
        src_vocab=1, tgt_vocab=1,  # no embeddings in an EncoderDecoder
        activation=activations.pop() if activations else "relu",
        norm="pre" if norm_first and norm_first.pop() else "post", final_norm=final_norm,
        layer_norm_eps=epsilons.pop() if epsilons else 1e-5, dtype=_DTYPES[dtypes.pop()],
    )
    params = {name: t.detach().cpu().numpy() for name, t in module.state_dict().items()}
    return EncoderDecoder.from_params(config, params, backend=backend)


__all__ = ["convert_transformer"]
