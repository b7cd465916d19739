"""The backend registry and the numpy (float64 reference) backend."""

import numpy as np
import pytest

import tfm
from tfm.backends import get_backend
from tfm.backends.base import Backend


@pytest.mark.parametrize("name", ["gpu", "CPU", "", None, 3])
def test_unknown_backend_is_named(name):
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend(name)


def test_backends_are_cached_and_instances_pass_through():
    bk = get_backend("numpy")
    assert get_backend("numpy") is bk
    assert get_backend(bk) is bk
    assert isinstance(bk, Backend)


def test_numpy_backend_computes_in_float64(rng):
    bk = get_backend("numpy")
    x = bk.asarray(rng.standard_normal((2, 3, 4)).astype(np.float32))
    assert x.dtype == np.float64
    w = rng.standard_normal((5, 4)).astype(np.float32)
    y = bk.linear(x, w, None)
    assert y.dtype == np.float64 and y.shape == (2, 3, 5)
    np.testing.assert_allclose(y, x @ w.astype(np.float64).T, rtol=1e-12)


def test_cpu_backend_name_and_repr():
    bk = get_backend("cpu")
    assert bk.name == "cpu" and "cpu" in repr(bk)


def test_backend_unavailable_is_one_class():
    """It lives in tfm.errors and stays importable from tfm.backends and tfm."""
    from tfm import errors
    from tfm.backends import BackendUnavailable

    assert tfm.BackendUnavailable is BackendUnavailable is errors.BackendUnavailable
    assert issubclass(BackendUnavailable, RuntimeError)


def test_registry_names_every_backend():
    assert tfm.BACKENDS == ("numpy", "cpu", "cuda")
    assert {get_backend(name).name for name in ("numpy", "cpu")} == {"numpy", "cpu"}


def test_public_api_names():
    for name in ("attention", "TransformerConfig", "from_torch", "get_backend", "BackendUnavailable",
                 "InsufficientMemoryError", "MultiHeadAttention", "FeedForward", "ResidualNorm", "EncoderLayer",
                 "DecoderLayer", "Encoder", "Decoder", "Module"):
        assert hasattr(tfm, name), name
    assert set(tfm.layers.__all__) <= set(tfm.__all__)
