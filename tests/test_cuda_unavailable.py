"""Without a GPU (and without the simulator) backend="cuda" fails with a clear reason."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import tfm
from tfm.backends.cuda import cuda_unavailable_reason

pytestmark = pytest.mark.skipif(cuda_unavailable_reason() is None,
                                reason="a CUDA GPU (or the simulator) is available here")


def test_reason_names_the_missing_gpu_and_the_simulator_switch():
    reason = cuda_unavailable_reason()
    assert "no CUDA GPU detected" in reason and "NUMBA_ENABLE_CUDASIM" in reason


def test_get_backend_raises_backend_unavailable_with_the_reason():
    with pytest.raises(tfm.BackendUnavailable, match="backend 'cuda' is unavailable: no CUDA GPU"):
        tfm.get_backend("cuda")


def test_cuda_backend_constructor_and_public_api_refuse():
    from tfm.backends.cuda import CudaBackend

    with pytest.raises(tfm.BackendUnavailable, match="no CUDA GPU"):
        CudaBackend()
    x = np.ones((1, 1, 2, 4), np.float32)
    with pytest.raises(tfm.BackendUnavailable, match="NUMBA_ENABLE_CUDASIM"):
        tfm.attention(x, x, x, backend="cuda")


def test_simulator_variable_set_too_late_is_explained(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert "imported before it was set" in cuda_unavailable_reason()


@pytest.mark.parametrize("module", ["linear", "norm", "embedding", "attention", "restricted",
                                    "recurrent", "conv", "_launch", "_memory", "_cublas",
                                    "_views", "_offline"])
def test_kernel_modules_import_without_a_gpu(module):
    importlib.import_module(f"tfm.backends.cuda.{module}")

