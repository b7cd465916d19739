"""``tfm.from_torch`` for torch.nn.Conv1d: PyTorch's weights on tfm's :class:`tfm.layers.Conv1d`.

The converted object takes PyTorch's channel-first input, (B, C_in, N) or (C_in, N), and
returns (B, C_out, N_out) or (C_out, N_out), as the module does (tfm itself computes on
sequence-major (B, N, C) arrays). Any padding ("same", "valid", an int), any dilation;
stride 1, groups 1 and padding_mode "zeros" only (else a clear error).
"""

from __future__ import annotations

import numpy as np

from ..layers import Conv1d


class TorchConv1d:
    """A tfm Conv1d called on PyTorch-layout (channel-first) NumPy arrays."""

    def __init__(self, layer: Conv1d):
        self.layer = layer

    def __call__(self, x):
        x = np.asarray(x)
        if x.ndim not in (2, 3):
            raise ValueError(f"input must be (C_in, N) or (B, C_in, N), got shape {x.shape}")
        xb = x[None] if x.ndim == 2 else x
        if xb.shape[1] != self.layer.in_channels:  # name PyTorch's layout, not tfm's
            raise ValueError(f"input must have in_channels={self.layer.in_channels} channels in "
                             f"dimension {x.ndim - 2}, got shape {x.shape}")
        y = np.swapaxes(self.layer(np.swapaxes(xb, 1, 2)), 1, 2)  # (B, C_out, N_out)
        return np.ascontiguousarray(y[0] if x.ndim == 2 else y)

    def __repr__(self) -> str:
        return f"TorchConv1d({self.layer!r})"


def convert_conv1d(module, backend: str = "cpu") -> TorchConv1d:
    if tuple(module.stride) != (1,):
        raise ValueError(f"tfm's Conv1d has stride 1 only, got stride={tuple(module.stride)}")
    if module.groups != 1:
        raise ValueError(f"tfm's Conv1d has groups=1 only, got groups={module.groups}")
    if module.padding_mode != "zeros":
        raise ValueError(f"tfm's Conv1d pads with zeros only, got padding_mode={module.padding_mode!r}")
    padding = module.padding if isinstance(module.padding, str) else int(module.padding[0])
    weight = module.weight.detach().cpu().numpy()
    if weight.dtype not in (np.float32, np.float64):
        raise TypeError(f"Conv1d parameters must be float32 or float64, got {weight.dtype}")
    layer = Conv1d(module.in_channels, module.out_channels, module.kernel_size[0],
                   dilation=module.dilation[0], padding=padding, bias=module.bias is not None,
                   backend=backend, dtype=weight.dtype)
    state = {"weight": weight}
    if module.bias is not None:
        state["bias"] = module.bias.detach().cpu().numpy()
    layer.load_state_dict(state)
    return TorchConv1d(layer)
