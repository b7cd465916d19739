"""tfm.bench.conformance: every backend method against the float64 reference, and the
checker itself catches wrong, NaN and failing kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfm import get_backend
from tfm import reference as ref
from tfm.backends.cpu import CpuBackend
from tfm.bench.conformance import CASES, attention_rows_reference, check_backend, rel_err


def test_every_method_of_the_interface_is_covered():
    from tfm.backends.base import Backend

    skip = {"asarray", "to_numpy", "empty", "zeros", "synchronize"}  # data movement
    methods = {m for m in dir(Backend) if not m.startswith("_") and callable(getattr(Backend, m))} - skip
    assert methods <= {c.method for c in CASES} | {m for c in CASES for m in c.also}


@pytest.mark.parametrize("size", ["tiny", "ragged"])
def test_cpu_backend_passes_in_both_precisions(size):
    rows = check_backend(get_backend("cpu"), size, dtypes=(np.float32, np.float64))
    bad = [r for r in rows if not r["passed"]]
    assert not bad, bad
    assert len(rows) == 2 * len(CASES)
    assert all(r["seconds"] > 0 for r in rows)


class _Broken(CpuBackend):
    """One kernel off by a little, one returning NaN, one raising, one argmax off by one."""

    def softmax(self, x):
        out = super().softmax(x)
        out[..., 0] += 1e-3
        return out

    def gru_layer(self, *args):
        out, h = super().gru_layer(*args)
        out[0, -1, -1] = np.nan
        return out, h

    def glu(self, x):
        raise RuntimeError("kernel exploded")

    def argmax(self, x):
        return super().argmax(x) + 1


def test_the_checker_catches_wrong_nan_and_failing_kernels():
    rows = {r["op"]: r for r in check_backend(_Broken(), "tiny")}
    assert not rows["softmax"]["passed"] and rows["softmax"]["rel_err"] > 1e-4
    assert not rows["gru"]["passed"] and rows["gru"]["rel_err"] == math.inf
    assert rows["glu"]["status"] == "error" and "kernel exploded" in rows["glu"]["reason"]
    assert not rows["argmax"]["passed"]
    assert rows["log_softmax"]["passed"] and rows["lstm"]["passed"]


def test_rel_err_refuses_a_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        rel_err(np.zeros(3), np.zeros(4))


def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        check_backend(get_backend("cpu"), "huge")


def test_rows_reference_matches_the_full_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 11, 4)) for _ in range(3))
    keep = rng.random((2, 11)) > 0.3
    keep[1] = False  # a fully padded sequence: rows of zeros
    rows = np.array([0, 4, 10])
    for causal in (False, True):
        full = ref.scaled_dot_product_attention(q, k, v, mask=keep[:, None, None, :], causal=causal)
        np.testing.assert_allclose(attention_rows_reference(q, k, v, rows, keep, causal), full[:, :, rows],
                                   rtol=1e-12, atol=1e-12)
