"""``tfm.from_torch``: run PyTorch modules' weights on tfm's kernels.

Converters live one module per family and are imported on demand, so tfm never needs
PyTorch unless this function is called:

    transformer.py  torch.nn.Transformer  -> tfm.EncoderDecoder (embedded inputs -> outputs)
    recurrent.py    torch.nn.RNN / LSTM / GRU -> recurrent stacks
    conv.py         torch.nn.Conv1d -> Conv1d layer
"""

from __future__ import annotations

import importlib

# torch class name -> (converter module, function)
_CONVERTERS = {
    "Transformer": ("transformer", "convert_transformer"),
    "RNN": ("recurrent", "convert_recurrent"),
    "LSTM": ("recurrent", "convert_recurrent"),
    "GRU": ("recurrent", "convert_recurrent"),
    "Conv1d": ("conv", "convert_conv1d"),
}


def from_torch(module, backend: str = "cpu"):
    """Convert a supported ``torch.nn`` module into a tfm object running on ``backend``.

    Supported: nn.Transformer (batch_first; post- or pre-norm; relu or gelu), nn.RNN,
    nn.LSTM, nn.GRU and nn.Conv1d. The result is called like the module, on NumPy arrays.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("tfm.from_torch needs PyTorch: pip install 'tfm[torch]'") from None
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    kind = type(module).__name__
    if kind not in _CONVERTERS or type(module).__module__.split(".")[:2] != ["torch", "nn"]:
        raise TypeError(
            f"from_torch does not support {type(module).__module__}.{kind}; supported: "
            + ", ".join(f"torch.nn.{k}" for k in _CONVERTERS)
        )
    mod_name, fn_name = _CONVERTERS[kind]
    convert = getattr(importlib.import_module(f"{__name__}.{mod_name}"), fn_name)
    return convert(module, backend=backend)


__all__ = ["from_torch"]
