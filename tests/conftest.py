"""Shared test helpers: relative error against the float64 reference, fresh random inputs."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import tfm  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads its OpenMP runtime)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf (never passes)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


# Relative-error bounds against the float64 reference.
TOL = {np.float32: 2e-5, np.float64: 1e-12, "float32": 2e-5, "float64": 1e-12}


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh data per test, reproducible per run."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


try:  # PyTorch is the optional peer; `make test` installs it.
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:  # pragma: no cover - exercised only without torch
    HAVE_TORCH = False

requires_torch = pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed (pip install 'tfm[torch]')")
