"""1-D convolution, GLU, conv stacks and the ConvS2S block: cpu kernels and tfm.layers against the
float64 reference and PyTorch; awkward sizes, k = 1, dilations beyond N, causality, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfm import layers
from tfm.backends.cpu import conv as cpu_conv
from tfm.reference import baselines as ref

from conftest import TOL, randn, rel_err, requires_torch

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,n,c_in,c_out,k,dil,pl,pr", [
    (1, 1, 1, 1, 1, 1, 0, 0),        # smallest
    (2, 37, 5, 7, 3, 1, 1, 1),       # centred
    (3, 97, 13, 6, 5, 2, 8, 0),      # causal, dilated
    (2, 10, 3, 4, 3, 8, 16, 0),      # dilation beyond N: most taps read padding
    (2, 10, 3, 4, 3, 8, 3, 5),       # uneven padding, short output
    (1, 20, 4, 9, 4, 3, 0, 0),       # valid, even kernel
    (2, 37, 6, 6, 1, 1, 2, 3),       # k = 1 with padding: zero rows plus bias
])
def test_conv1d_kernel_matches_reference(rng, dtype, batch, n, c_in, c_out, k, dil, pl, pr):
    x = randn(rng, batch, n, c_in, dtype=dtype)
    w = randn(rng, c_out, c_in, k, dtype=dtype)
    b = randn(rng, c_out, dtype=dtype)
    got = cpu_conv.conv1d(x, w, b, dil, pl, pr)
    want = ref.conv1d(x, w, b, dil, pl, pr)
    assert got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype]
    assert rel_err(cpu_conv.conv1d(x, w, None, dil, pl, pr), ref.conv1d(x, w, None, dil, pl, pr)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 37, 14), (2, 5, 7, 66)])
def test_glu_matches_reference(rng, dtype, shape):
    x = randn(rng, *shape, dtype=dtype) * 4
    got = cpu_conv.glu(x)
    assert got.shape == shape[:-1] + (shape[-1] // 2,) and got.dtype == dtype
    assert rel_err(got, ref.glu(x)) < TOL[dtype]


@requires_torch
@pytest.mark.parametrize("padding,dilation,k", [("same", 1, 3), ("same", 4, 4), ("valid", 2, 3),
                                                 (3, 1, 5), (0, 1, 1), ("same", 50, 3)])
def test_conv1d_layer_matches_pytorch(rng, padding, dilation, k):
    import torch

    torch.manual_seed(int(rng.integers(1 << 30)))
    tm = torch.nn.Conv1d(6, 11, k, dilation=dilation, padding=padding)
    m = layers.Conv1d(6, 11, k, dilation=dilation, padding=padding)
    m.load_state_dict({n: p.detach().numpy() for n, p in tm.state_dict().items()})
    x = randn(rng, 3, 41, 6)
    with torch.no_grad():
        want = tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))).numpy().transpose(0, 2, 1)
    assert rel_err(m(x), want) < 1e-5


@requires_torch
def test_glu_matches_pytorch(rng):
    import torch

    x = randn(rng, 4, 9, 22)
    assert rel_err(cpu_conv.glu(x), torch.nn.functional.glu(torch.from_numpy(x), dim=-1).numpy()) < 1e-6


@pytest.mark.parametrize("padding,k,dil,n", [("causal", 3, 1, 20), ("causal", 2, 7, 20), ("same", 4, 2, 9)])
def test_padding_modes_output_length(rng, padding, k, dil, n):
    m = layers.Conv1d(3, 5, k, dilation=dil, padding=padding)
    y = m(randn(rng, 2, n, 3))
    assert y.shape == (2, n, 5)


@pytest.mark.parametrize("dilated", [False, True])
def test_causal_stack_never_reads_the_future(rng, dilated):
    stack = layers.ConvStack(8, 3, 3, dilated=dilated, causal=True, seed=2)
    x = randn(rng, 2, 80, 8)
    base = stack(x)
    x2 = x.copy()
    x2[:, 25] += 1.0
    moved = stack(x2)
    np.testing.assert_array_equal(moved[:, :25], base[:, :25])
    assert np.abs(moved[:, 25:] - base[:, 25:]).max() > 1e-4
    # and no output further than the receptive field moves either
    reach = stack.receptive_field - 1
    np.testing.assert_array_equal(moved[:, 25 + reach + 1:], base[:, 25 + reach + 1:])


def test_dilated_stack_dilations_and_receptive_field():
    stack = layers.ConvStack(4, 3, 4, dilated=True)
    assert stack.dilations == [1, 3, 9, 27]
    assert stack.receptive_field == 3 ** 4
    assert layers.ConvStack(4, 3, 4).receptive_field == 9


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dilated,causal", [(False, False), (True, True)])
def test_stack_cpu_matches_numpy_backend(rng, dtype, dilated, causal):
    stack = layers.ConvStack(6, 2, 3, dilated=dilated, causal=causal, dtype=dtype, seed=5)
    x = randn(rng, 3, 37, 6, dtype=dtype)
    got = stack(x)
    stack.backend = "numpy"
    assert rel_err(got, stack(x)) < TOL[dtype]


@pytest.mark.parametrize("input_scale", [1.0, 0.3])
@pytest.mark.parametrize("causal", [False, True])
def test_convs2s_block_matches_reference(rng, causal, input_scale):
    """The same block whatever scale its backend arrays carry (folded into the weights)."""
    blk = layers.ConvS2SBlock(5, 3, causal=causal, seed=4, dtype="float64", input_scale=input_scale)
    blk.load_state_dict({k: rng.uniform(-0.5, 0.5, v.shape) for k, v in blk.params.items()})
    x = randn(rng, 2, 13, 5, dtype=np.float64)
    pl, pr = layers.conv_padding("causal" if causal else "same", 3, 1)
    want = math.sqrt(0.5) * (x + ref.glu(ref.conv1d(x, blk.params["weight"], blk.params["bias"], 1, pl, pr)))
    assert rel_err(blk(x), want) < TOL[np.float64]
    blk.backend = "numpy"
    assert rel_err(blk(x), want) < TOL[np.float64]


def test_bad_inputs(rng):
    m = layers.Conv1d(3, 4, 5, dilation=3, padding="valid")
    with pytest.raises(ValueError, match="larger than the padded input"):
        m(randn(rng, 2, 12, 3))  # span 13 > 12
    assert m(randn(rng, 2, 13, 3)).shape == (2, 1, 4)
    with pytest.raises(ValueError, match="in_channels=3 features"):
        m(randn(rng, 2, 20, 4))
    with pytest.raises(ValueError, match="3 dimensions"):
        m(randn(rng, 20, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        m(np.zeros((2, 20, 3), np.int32))
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        layers.Conv1d(3, 4, 3, dilation=0)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        layers.Conv1d(3, 4, 0)
    with pytest.raises(ValueError, match="padding must be one of"):
        layers.Conv1d(3, 4, 3, padding="full")
    with pytest.raises(ValueError, match="padding must be >= 0"):
        layers.Conv1d(3, 4, 3, padding=-1)
    with pytest.raises(ValueError, match="channels=6 features"):
        layers.ConvS2SBlock(6, 3)(randn(rng, 1, 5, 4))
    with pytest.raises(ValueError, match="kernel_size >= 2"):
        layers.ConvStack(4, 1, 2, dilated=True)


@pytest.mark.parametrize("dil,pl,pr", [(1, 1, 1), (8, 16, 0), (3, 0, 0)])
def test_shifted_sum_writes_every_output(rng, dil, pl, pr):
    """conv1d's njit pass fills a NaN-poisoned output buffer, rows fed by padding included."""
    x, w, b = randn(rng, 2, 10, 3), randn(rng, 4, 3, 3), randn(rng, 4)
    n_out = 10 + pl + pr - dil * 2
    shifts = np.array([j * dil - pl for j in range(3)], dtype=np.int64)
    y = (x.reshape(20, 3) @ w.transpose(1, 2, 0).reshape(3, 12)).reshape(2, 10, 3, 4)
    out = np.full((2, n_out, 4), np.nan, np.float32)
    cpu_conv._shifted_sum(y, shifts, b, out)
    assert rel_err(out, ref.conv1d(x, w, b, dil, pl, pr)) < TOL[np.float32]


def test_glu_kernel_writes_every_output(rng):
    x = randn(rng, 7, 10)
    out = np.full((7, 5), np.nan, np.float32)
    cpu_conv._glu(x, out)
    assert rel_err(out, ref.glu(x)) < TOL[np.float32]
