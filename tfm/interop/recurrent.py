"""``tfm.from_torch`` for torch.nn.RNN / LSTM / GRU: PyTorch's weights on tfm's recurrent layers.

The converted object is called like the module, on NumPy arrays: ``m(x, hx=None)`` with x
(N, B, I), or (B, N, I) for ``batch_first`` modules, or unbatched (N, I); it returns
``(output, h_n)`` (RNN, GRU) or ``(output, (h_n, c_n))`` (LSTM), shaped as PyTorch's.
Parameter names and gate layouts are PyTorch's, so weights are copied as they are.
Unsupported: bidirectional modules and LSTM projections (proj_size > 0), with a clear error.
"""

from __future__ import annotations

import numpy as np

from ..layers import GRU, LSTM, RNN

_CLASSES = {"RNN": RNN, "LSTM": LSTM, "GRU": GRU}


class TorchRecurrent:
    """A tfm RNN/LSTM/GRU stack that takes and returns PyTorch-shaped NumPy arrays."""

    def __init__(self, layer, batch_first: bool, kind: str):
        self.layer, self.batch_first, self.kind = layer, batch_first, kind

    def _check_state(self, name, s, unbatched):
        if s is None:
            return None
        s = np.asarray(s)
        if unbatched:
            if s.ndim != 2:
                raise ValueError(f"{name} for an unbatched input must be (num_layers, H), got {s.shape}")
            return s[:, None]
        return s

    def __call__(self, x, hx=None):
        x = np.asarray(x)
        if x.ndim not in (2, 3):
            raise ValueError(f"input must be (N, I) or a batch of sequences (3-D), got shape {x.shape}")
        unbatched = x.ndim == 2
        xb = x[None] if unbatched else (x if self.batch_first else np.swapaxes(x, 0, 1))
        if self.kind == "LSTM":
            h0, c0 = (None, None) if hx is None else hx
            out, h_n, c_n = self.layer(xb, self._check_state("h0", h0, unbatched),
                                       self._check_state("c0", c0, unbatched))
        else:
            out, h_n = self.layer(xb, self._check_state("hx", hx, unbatched))
        if unbatched:
            out, h_n = out[0], h_n[:, 0]
        elif not self.batch_first:
            out = np.ascontiguousarray(np.swapaxes(out, 0, 1))
        if self.kind == "LSTM":
            return out, (h_n, c_n[:, 0] if unbatched else c_n)
        return out, h_n

    def __repr__(self) -> str:
        return f"TorchRecurrent({self.layer!r}, batch_first={self.batch_first})"


def convert_recurrent(module, backend: str = "cpu") -> TorchRecurrent:
    kind = type(module).__name__
    if module.bidirectional:
        raise ValueError(f"tfm does not implement bidirectional recurrent layers: got "
                         f"torch.nn.{kind}(bidirectional=True)")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"tfm's LSTM has no projection: got proj_size={module.proj_size}")
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    dtype = next(iter(state.values())).dtype
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{kind} parameters must be float32 or float64, got {dtype}")
    kwargs = dict(bias=module.bias, backend=backend, dtype=dtype)
    if kind == "RNN":
        kwargs["nonlinearity"] = module.nonlinearity
    layer = _CLASSES[kind](module.input_size, module.hidden_size, module.num_layers, **kwargs)
    layer.load_state_dict(state)
    return TorchRecurrent(layer, bool(module.batch_first), kind)
