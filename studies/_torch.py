"""PyTorch as the studies' peer, on the device the study measures (``--backend cpu|cuda``).

On the CPU PyTorch runs as many threads as Numba. On a GPU TF32 is switched off for
matrix products and cuDNN, so every PyTorch product computes in FP32 unless a row says
otherwise (SDPA's memory-efficient backend, see ``SDPA_BACKENDS``). Under Numba's CUDA
simulator there is no device for PyTorch: it runs on the host, so that such a run still
checks tfm's side of every pair against PyTorch's output (its times mean nothing anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Peer:
    torch: object
    device: str  # "cpu" or "cuda"
    sync: Callable[[], None] | None  # waits for queued device work (None on the CPU)

    @property
    def label(self) -> str:
        return f"torch {self.torch.__version__} {self.device}"

    def tensor(self, a):
        """A host array as a tensor on the peer's device (a copy on the GPU, shared memory on the CPU)."""
        t = self.torch.from_numpy(a)
        return t.to(self.device) if self.device != "cpu" else t

    def host(self, t):
        return t.detach().cpu().numpy()


# SDPA's backends on a GPU, with the arithmetic each uses on float32 inputs.
SDPA_BACKENDS = {
    "math": ("MATH", "cuBLAS batched FP32 products on CUDA cores (TF32 off) plus a softmax kernel"),
    "mem_efficient": ("EFFICIENT_ATTENTION", "3xTF32 on tensor cores: float32 split into TF32 parts, even with "
                                             "TF32 off (PyTorch mem_eff_attention/gemm_kernel_utils.h, sm_80+)"),
}


def peer(backend: str) -> Peer:
    """PyTorch on the device of ``backend``; raises ``Skip`` (unavailable) with the reason if it cannot run there."""
    from tfm.bench import Skip

    try:
        import torch
    except ImportError as exc:
        raise Skip(f"PyTorch is not installed: {exc}") from None
    if backend == "cuda":
        from ._common import SIMULATOR

        if not torch.cuda.is_available() and not SIMULATOR:
            raise Skip(f"PyTorch {torch.__version__} has no usable CUDA device") from None
        if not torch.cuda.is_available():  # the simulator: PyTorch on the host (module docstring)
            return Peer(torch, "cpu", None)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return Peer(torch, "cuda", torch.cuda.synchronize)
    import numba

    torch.set_num_threads(numba.get_num_threads())
    return Peer(torch, "cpu", None)
