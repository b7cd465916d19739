"""Elementwise float32 math that LLVM vectorises, for the CPU kernels: exp, 2**x, tanh,
sigmoid and a NaN-ignoring max.

libm's expf and tanhf are opaque scalar calls, so a loop over them runs one element at a
time; the polynomial and rational forms here are plain arithmetic, which LLVM turns into
vector code. float64 keeps libm everywhere (the float64 paths are the precise ones).

    maxnum      llvm.maxnum: a max that LLVM vectorises as a reduction (``norm.row_max``)
    exp_le0     exp(x), x <= 0: Cephes expf (x = k ln2 + r, degree-7 polynomial in r, 2**k
                from the exponent bits); exactly 0 below -87
    exp2_le0    2**x, x <= 0: x = k + r, a degree-5 polynomial in r (fitted for this
                module, c0 = 1), 2**k from the exponent bits; exactly 0 below -126. No
                Cody-Waite reduction and a shorter polynomial than exp_le0 (fused
                attention keeps its scores in log2 units for it)
    tanh        float32: Eigen's odd rational 13/6 approximation on [-7.905, 7.905];
                float64: libm
    sigmoid     float32: (1 + tanh(x / 2)) / 2 through the rational tanh; float64: libm exp

Accuracy (tests/test_cpu_kernels.py, against float64): exp_le0 and exp2_le0 within 2.5e-7
relative, tanh and sigmoid within 4e-7 absolute.

Against libm and the forms they replaced, float32, one thread, 64-byte-aligned operands,
time / the kept form's time (paired interleaved rounds, median, bootstrap 95% interval;
``python -m dev.cpu.run_all``, dev/cpu/fastmath.py -> dev/cpu/results/fastmath.csv, on the
2-core AMD EPYC VM (Zen 4, AVX-512) that machine.json there describes):

    exp of 1024-score rows, then their float64 sum (0.62 ns per element, the row copy included):
        libm expf                      4.37 (4.36-4.37)
        exp_le0 and the sum in one loop 1.05 (1.05-1.05): LLVM vectorises that loop here too
        exp2_le0 on log2-unit scores   0.89 (0.89-0.89)
    tanh (0.38 ns per element): libm tanhf 123 (121-132); the rational form compiled under
        Numba's default error model 10.7 (10.4-10.9)
    sigmoid (0.38 ns per element): 1 / (1 + libm expf(-x)) 6.18 (6.18-6.19)
    row max (0.07 ns per element): a compare-and-select loop 7.15 (7.14-7.15)

The rational tanh compiles with ``error_model="numpy"``: under Numba's default ("python")
every float division checks for a zero divisor to raise ZeroDivisionError, and that branch
keeps LLVM from vectorising it (the 10.7x above; its denominator is >= 4.9e-3, so the check
never fires). ``exp_le0``/``exp2_le0`` are inlined into their callers' loops, which compile
with ``REDUCE``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# Reassociation (and FMA contraction) lets LLVM vectorise reductions; no finite-math
# assumptions, so NaN and inf keep their IEEE meaning (masked scores are -inf).
REDUCE = {"reassoc", "nsz", "contract"}


@intrinsic
def maxnum(typingctx, a, b):
    """llvm.maxnum (a NaN operand yields the other): a max LLVM vectorises as a reduction."""
    if a != b or not isinstance(a, types.Float):
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _int32_as_float32(typingctx, x):
    """Reinterpret the bits of an int32 as a float32 (builds 2**k for the exps below)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=REDUCE)
def exp_le0(x):
    """exp(x) for float32 x <= 0, Cephes expf: x = k ln2 + r, |r| <= ln2/2, e^r by a degree-7
    polynomial, 2**k from the exponent bits. x < -87 (incl. -inf: masked keys) gives exactly 0;
    NaN stays NaN.
    """
    xc = np.float32(-87.0) if x < np.float32(-87.0) else x
    ki = np.int32(xc * np.float32(1.4426950408889634) - np.float32(0.5))  # round(x/ln2), x <= 0
    kf = np.float32(ki)
    r = xc - kf * np.float32(0.693359375) + kf * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = (p * r * r + r + np.float32(1.0)) * _int32_as_float32((ki + np.int32(127)) << 23)
    return np.float32(0.0) if x < np.float32(-87.0) else p


@njit(inline="always", fastmath=REDUCE)
def exp2_le0(x):
    """2**x for float32 x <= 0: x = k + r, |r| <= 1/2, 2**r by a degree-5 polynomial (fitted
    here with c0 = 1, max relative error 1.9e-7 in float32), 2**k from the exponent bits.
    x < -126 (incl. -inf: masked keys) gives exactly 0; NaN stays NaN.
    """
    xc = np.float32(-126.0) if x < np.float32(-126.0) else x
    ki = np.int32(xc - np.float32(0.5))  # round(x): truncation toward zero, x <= 0
    r = xc - np.float32(ki)  # exact
    p = np.float32(1.326472731307149e-3)
    p = p * r + np.float32(9.671512991189957e-3)
    p = p * r + np.float32(5.550733581185341e-2)
    p = p * r + np.float32(2.4022242426872253e-1)
    p = p * r + np.float32(6.931470036506653e-1)
    p = (p * r + np.float32(1.0)) * _int32_as_float32((ki + np.int32(127)) << 23)
    return np.float32(0.0) if x < np.float32(-126.0) else p


# Eigen's generic_fast_tanh_float: odd rational 13/6 approximation on [-7.905, 7.905].
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_TINY = np.float32(0.0004)
_A1, _A3, _A5, _A7 = (np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04),
                      np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08))
_A9, _A11, _A13 = (np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13),
                   np.float32(-2.76076847742355e-16))
_B0, _B2, _B4, _B6 = (np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03),
                      np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06))
_HALF32 = np.float32(0.5)


def tanh(x):
    """tanh; inside kernels float32 takes the vectorisable rational form (overload below)."""
    return np.tanh(x)


def sigmoid(x):
    """Logistic sigmoid; inside kernels float32 goes through the rational tanh."""
    return 1.0 / (1.0 + np.exp(-x))


@njit(cache=True, fastmath=False, error_model="numpy")
def _tanh_f32(x):
    y = min(max(x, -_TANH_CLAMP), _TANH_CLAMP)
    y2 = y * y
    p = _A13
    p = p * y2 + _A11
    p = p * y2 + _A9
    p = p * y2 + _A7
    p = p * y2 + _A5
    p = p * y2 + _A3
    p = p * y2 + _A1
    q = _B6
    q = q * y2 + _B4
    q = q * y2 + _B2
    q = q * y2 + _B0
    r = y * p / q
    return x if abs(x) < _TANH_TINY else r


@overload(tanh)
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    return lambda x: np.tanh(x)


@overload(sigmoid)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _HALF32 * _tanh_f32(_HALF32 * x) + _HALF32
    return lambda x: 1.0 / (1.0 + np.exp(-x))
