"""Every CUDA kernel the GPU run launches compiles for a real GPU (sm_90 PTX through NVVM), and
the launch path marshals arguments as numba does, all without a GPU.

The simulator runs kernels as Python, so it cannot catch what only the CUDA compiler sees:
typing errors, non-constant shared/local array shapes, float64 promotion, register pressure.
Here each kernel factory is compiled with ``numba.cuda.compile_ptx`` for compute capability
9.0 (H100/H200) at the tilings the GPU run uses (``Tuning()``'s defaults and the ``TILINGS``
the lab times); ptxas (when present) must report at most 48 KB of static shared memory,
registers x threads within a block's 64 K, and no register spills in the hot kernels (GEMM,
fused attention). Needs a CUDA toolkit's libNVVM and libdevice (``CUDA_HOME`` or
/usr/local/cuda*); skipped otherwise. Runs in the normal (non-simulator) test process.
"""

from __future__ import annotations

import ctypes
import warnings

import numpy as np
import pytest

from tfm.backends.cuda import _offline
from tfm.backends.cuda._launch import REGISTERS_PER_BLOCK, SHARED_BYTES_LIMIT, simulator_enabled

pytestmark = [
    pytest.mark.skipif(simulator_enabled(), reason="numba runs in simulator mode in this process"),
    pytest.mark.skipif(_offline.toolkit()[0] is None, reason="no CUDA toolkit with libNVVM and libdevice "
                                                             "found (set CUDA_HOME)"),
]


@pytest.fixture(scope="module")
def offline():
    try:
        with _offline.offline():
            yield
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"this numba-cuda's internals differ from the ones patched here: {exc}")


def _kernels():
    """(name, kernel, signature, threads per block, must not spill) for every launched kernel."""
    from numba import types as T

    from tfm.backends.cuda import attention as A
    from tfm.backends.cuda import conv as C
    from tfm.backends.cuda import embedding as E
    from tfm.backends.cuda import linear as L
    from tfm.backends.cuda import norm as N
    from tfm.backends.cuda import recurrent as R
    from tfm.backends.cuda import training as TR
    from tfm.backends.cuda._launch import Tuning

    t, i64, f32, f64 = Tuning(), T.int64, T.float32, T.float64

    def a(dt, nd, layout="C"):
        return T.Array(dt, nd, layout)

    f1, f2, f3, f4 = (a(f32, n) for n in (1, 2, 3, 4))
    s4 = a(f32, 4, "A")  # split heads and head-merged outputs are strided views
    mask = a(T.boolean, 4, "A")
    s32, s64 = np.dtype(np.float32), np.dtype(np.float64)
    gemm_sig = (f3, f3, f1, f3, i64, i64, i64, f32)
    for v in L.GEMM_VERSIONS:
        for tiles in sorted(set(L.TILINGS) | {t.gemm_large, t.gemm_small}):
            threads = (tiles[0] // tiles[3]) * (tiles[1] // tiles[4])
            yield (f"gemm_v{v}{tiles}_nt_gelu_bias", L.gemm_kernel(s32, *tiles, True, 2, True, v), gemm_sig,
                   threads, True)
            yield f"gemm_v{v}{tiles}_nn", L.gemm_kernel(s32, *tiles, False, 0, False, v), gemm_sig, threads, True
    f64_tiles = L.pick_gemm_tiles(t, 1, 1, 1, 8)
    yield "gemm_f64", L.gemm_kernel(s64, *f64_tiles, True, 1, True, t.gemm_version), \
        (a(f64, 3), a(f64, 3), a(f64, 1), a(f64, 3), i64, i64, i64, f64), \
        (f64_tiles[0] // f64_tiles[3]) * (f64_tiles[1] // f64_tiles[4]), True
    fused_tail = (mask, i64, i64, i64, i64, f32, i64, i64)
    for v in A.ATTN_VERSIONS:
        for attn in A.TILINGS[v]:
            tiles = A.fused_tiles(t.replace(attn=attn), 64, 64, 4, v)
            threads = tiles[2] * tiles[3]
            for masked, band in ((False, False), (True, False), (False, True), (True, True)):
                # attention_train's twin (writing lse) at the default tiling; one store more
                for lse in (False, True) if (v, attn) == (t.attn_version, t.attn) else (False,):
                    # the model's operands: split-head views in, head-merged view out
                    yield (f"fused_v{v}{attn}_m{masked:d}_b{band:d}_lse{lse:d}",
                           A.fused_kernel(s32, 64, 64, *tiles, masked, band, v, lse), (s4, s4, s4, s4, f3) + fused_tail,
                           threads, True)
    version, tiles = A.fused_plan(t, 64, 64, 4)
    yield "fused_contiguous", A.fused_kernel(s32, 64, 64, *tiles, False, False, version), \
        (f4, f4, f4, s4, f3) + fused_tail, tiles[2] * tiles[3], True
    version, f64_attn = A.fused_plan(t, 128, 128, 8)
    yield "fused_f64_d128", A.fused_kernel(s64, 128, 128, *f64_attn, True, False, version, True), \
        (a(f64, 4),) * 3 + (a(f64, 4, "A"), a(f64, 3), mask, i64, i64, i64, i64, f64, i64, i64), \
        f64_attn[2] * f64_attn[3], False
    # the fused backward (atomic dQ, and the dQ pass), each tiling the lab times, at d = 64
    bwd_tail = (mask, i64, i64, i64, i64, f32, i64, i64)
    for tiling in A.BWD_TILINGS:
        (bq, bkv, ty, tx), single = A.fused_bwd_plan(t.replace(attn_bwd=tiling), 64, 64, 4)
        # every mask/band form at the default tiling; the others without and with both
        combos = ((False, False), (True, False), (False, True), (True, True)) if tiling == t.attn_bwd else \
            ((False, False), (True, True))
        for masked, band in combos:
            for atomic in (True, False):
                yield (f"attn_bwd_kv{tiling}_m{masked:d}_b{band:d}_atomic{atomic:d}",
                       A.bwd_kv_kernel(s32, 64, 64, bq, bkv, ty, tx, masked, band, atomic, single),
                       (s4, s4, s4, s4, f3, f3, s4, s4, s4) + bwd_tail, ty * tx, True)
            yield (f"attn_bwd_dq{tiling}_m{masked:d}_b{band:d}",
                   A.bwd_dq_kernel(s32, 64, 64, bq, bkv, ty, tx, masked, band),
                   (s4, s4, s4, s4, f3, f3, s4) + bwd_tail, ty * tx, True)
    (bq, bkv, ty, tx), single = A.fused_bwd_plan(t, 128, 128, 8)  # float64, d = 128: a fallback tiling
    yield ("attn_bwd_kv_f64_d128", A.bwd_kv_kernel(s64, 128, 128, bq, bkv, ty, tx, True, True, True, single),
           (a(f64, 4, "A"),) * 4 + (a(f64, 3),) * 2 + (a(f64, 4, "A"),) * 3 + (mask, i64, i64, i64, i64, f64, i64, i64),
           ty * tx, False)
    yield "attn_bwd_pre", A._bwd_pre_kernel(s32, t.elem_threads, True), (s4, s4, f3, s4), t.elem_threads, False
    yield "attn_naive_ds", A._naive_ds_kernel(s32, True, True), (f2, f2, f1, f1, mask) + (i64,) * 6, \
        t.elem_threads, False
    yield "merge_heads_into", A._merge_into_kernel(), (s4, f3, i64), t.elem_threads, False
    rt, et = t.row_threads, t.elem_threads
    soft_sig = (f2, f2, mask) + (i64,) * 6 + (f1,)
    for log in (False, True):
        for masked in (False, True):
            for causal in (False, True):
                yield (f"softmax_log{log:d}_m{masked:d}_c{causal:d}", N.softmax_kernel(s32, rt, log, masked, causal),
                       soft_sig, rt, False)
    yield "softmax_lse", N.softmax_kernel(s32, rt, False, True, True, True), soft_sig, rt, False
    for res in (False, True):
        for stats in (False, True):
            yield (f"layer_norm_res{res:d}_stats{stats:d}", N._layer_norm_kernel(s32, rt, res, stats),
                   (f2, f2, f1, f1, f32, f2, f1, f1), rt, False)
        yield (f"layer_norm_backward_res{res:d}", N._layer_norm_backward_kernel(s32, rt, res),
               (f2, f2, f2, f1, f1, f1, f2), rt, False)
        yield (f"layer_norm_param_grads_res{res:d}", N._layer_norm_param_grads_kernel(s32, et, res),
               (f2, f2, f2, f1, f1, f1, f1), et, False)
    for log in (False, True):
        yield f"softmax_backward_log{log:d}", N._softmax_backward_kernel(s32, rt, log), (f2, f2, f2), rt, False
    yield "cross_entropy", N._cross_entropy_kernel(s32, rt), (f2, a(i64, 1), f1, f32, f1, f2), rt, False
    yield "argmax", N._argmax_kernel(s32, rt), (f2, a(i64, 1)), rt, False
    yield "add", L._add_kernel(), (f1, f1, f1), et, False
    yield "gelu", L._unary_kernel(s32, 2), (f1, f1), et, False
    for act in (0, 1, 2):
        yield f"bias_act{act}", L._bias_act_kernel(s32, act, True), (f2, f1), et, False
    yield "act_no_bias", L._bias_act_kernel(s32, 1, False), (f2, f1), et, False
    yield "cast", L._cast_kernel(), (a(f64, 1), f1), et, False
    yield "copy3", L._copy_kernel(3), (a(f32, 3, "A"), f3), et, False
    yield "copy4", L._copy_kernel(4), (s4, f4), et, False
    yield "embedding", E._embedding_kernel(), (a(i64, 1), f2, f32, f2), et, False
    yield "add_pe", E._add_pe_kernel(), (f3, f2, i64, f3), et, False
    yield "merge_heads", A._merge_kernel(), (s4, f3), et, False
    yield "write_rows", A._write_rows_kernel(), (f4, s4, i64), et, False
    yield "transpose", R._transpose_kernel(), (f2, f2), et, False
    for kind in range(4):
        for save in (False, True):
            yield (f"recurrent_step_{kind}_save{save:d}", R._step_kernel(s32, kind, save),
                   (f3, i64, f2, f2, f2, f1, f3, f2, f2, f3, f3), t.step_threads, False)
        yield (f"recurrent_bptt_step_{kind}", R._bptt_step_kernel(s32, kind),
               (i64, f3, f2, f2, f2, f3, f3, f3, f2, f2, f2, f3, f3), t.step_threads, False)
        yield f"recurrent_bptt_dh0_{kind}", R._bptt_dh0_kernel(s32, kind), (f2, f3, f2, f3, f2), t.step_threads, False
    yield "previous_states", R._previous_states_kernel(), (f2, f3, f3), et, False
    yield "im2col", C._im2col_kernel(s32), (f3, f2, i64, i64, i64, i64), et, False
    yield "col2im", C._col2im_kernel(s32), (f2, f3, i64, i64, i64, i64), et, False
    yield "glu", C._glu_kernel(s32), (f2, f2), et, False
    yield "glu_backward", C._glu_backward_kernel(s32), (f2, f2, f2), et, False
    # training: gradients, the optimiser, dropout
    yield "gemm_tn", L.gemm_kernel(s32, *t.gemm_small, False, 0, False, t.gemm_version, True), gemm_sig, \
        (t.gemm_small[0] // t.gemm_small[3]) * (t.gemm_small[1] // t.gemm_small[4]), True
    yield "gemm_tn_large", L.gemm_kernel(s32, *t.gemm_large, False, 0, False, t.gemm_version, True), gemm_sig, \
        (t.gemm_large[0] // t.gemm_large[3]) * (t.gemm_large[1] // t.gemm_large[4]), True
    yield "gemm_tn_v1", L.gemm_kernel(s32, *t.gemm_small, False, 0, False, 1, True), gemm_sig, \
        (t.gemm_small[0] // t.gemm_small[3]) * (t.gemm_small[1] // t.gemm_small[4]), True
    yield "column_sums", L._column_sums_kernel(s32, et), (f2, f1), et, False
    yield "sum_parts", L._sum_parts_kernel(), (f2, f1), et, False
    for act in (1, 2):
        yield f"activation_backward{act}", L._activation_backward_kernel(s32, act), (f1, f1, f1), et, False
    yield "embedding_backward", E._segment_sum_kernel(), (a(i64, 1), i64, i64, f2, f32, f2), et, False
    yield "fill", TR._fill_kernel(s32), (f1, f32), et, False
    yield "axpy", TR._axpy_kernel(s32), (f1, f1, f32), et, False
    for wd in (False, True):
        yield f"adam_wd{wd:d}", TR._adam_kernel(s32, wd), (f1,) * 4 + (f32,) * 7, et, False
    yield "dropout_f64", TR._dropout_kernel(s32), (f1, f1, T.uint64, T.uint64, T.uint64, f64), et, False


def test_every_kernel_compiles_for_sm90_within_its_resources(offline):
    failures = []
    for name, kernel, sig, threads, hot in _kernels():
        try:
            ptx = _offline.compile_ptx(kernel, sig)
            report = _offline.ptxas_report(ptx)
        except Exception as exc:  # collect them all, then fail once with every message
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        assert ".entry" in ptx
        # float32 kernels must not silently compute in float64 (a Python float literal would);
        # dropout divides in float64 on purpose (the CPU backend's rounding, training.py)
        if "f64" not in name and "cast" not in name:
            assert ".f64" not in ptx.split(".entry")[1], f"{name} computes in float64"
        if report is None:
            continue
        if report["smem"] > SHARED_BYTES_LIMIT:
            failures.append(f"{name}: {report['smem']} bytes of static shared memory")
        if report["registers"] * threads > REGISTERS_PER_BLOCK:
            failures.append(f"{name}: {report['registers']} registers x {threads} threads")
        if hot and (report["spill_stores"] or report["spill_loads"]):
            failures.append(f"{name} spills registers:\n{report['report']}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------- launch paths
@pytest.fixture
def stubbed(monkeypatch):
    """Kernels compile for sm_90 and "launch" into a recorder instead of the driver."""
    from numba.cuda import dispatcher

    from tfm.backends.cuda import _launch

    try:
        ctx = _offline.offline(stub_launch=True)
        ctx.__enter__()
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"this numba-cuda's internals differ from the ones patched here: {exc}")
    calls = []
    stub = dispatcher.launch
    dispatcher.launch = lambda stream, config, kernel, *words: calls.append(words)
    for name, fresh in (("_OVERLOADS", {}), ("_CONFIGS", {}), ("_STREAM", []), ("_mode", None)):
        monkeypatch.setattr(_launch, name, fresh)  # nothing compiled offline outlives the test
    try:
        yield calls
    finally:
        dispatcher.launch = stub
        ctx.__exit__(None, None, None)


def _words(words):
    return [(type(w), w.value) if isinstance(w, ctypes._SimpleCData) else (type(w), w) for w in words]


def _launch_args():
    from tfm.backends.cuda import attention as A
    from tfm.backends.cuda import norm as N
    from tfm.backends.cuda import training as TR
    from tfm.backends.cuda._launch import Tuning

    fake = _offline.fake_device_array
    t = Tuning()
    base = fake((2, 9, 3 * 16), np.float32, ptr=1 << 24)
    heads = A.split_heads(base, 2, t, start=16, width=16)  # a strided view
    merged = fake((2, 9, 16), np.float32, ptr=1 << 25)
    out = A.strided_view(merged, (2, 2, 9, 8), A.merged_layout(2, 2, 9, 8, 4))
    mask = fake((2, 1, 1, 9), np.bool_, ptr=1 << 26)
    version, tiles = A.fused_plan(t, 8, 8, 4)
    lse = fake((2, 2, 9), np.float32, ptr=1 << 28)
    yield ("attention_fused", A.fused_kernel(np.dtype(np.float32), 8, 8, *tiles, True, True, version, True), (1, 4),
           128, (heads, heads, heads, out, lse, mask, 1, 0, 0, 1, np.float32(0.35), 5, 0))
    rows = fake((6, 33), np.float64, ptr=1 << 27)
    yield ("softmax", N.softmax_kernel(np.dtype(np.float64), 32, False, False, True), 6, 32,
           (rows, rows, mask, 0, 0, 0, 0, 3, 2, fake((1,), np.float64, ptr=1 << 29)))
    (bq, bkv, ty, tx), single = A.fused_bwd_plan(t, 8, 8, 4)
    yield ("attention_backward_kv", A.bwd_kv_kernel(np.dtype(np.float32), 8, 8, bq, bkv, ty, tx, True, True, True,
                                                     single), (1, 4), ty * tx,
           (heads, heads, heads, out, lse, lse, out, out, out, mask, 1, 0, 0, 1, np.float32(0.35), 5, 0))
    flat = fake((64,), np.float32, ptr=1 << 30)
    yield ("dropout", TR._dropout_kernel(np.dtype(np.float32)), 1, 64,
           (flat, flat, np.uint64(2**63 + 5), np.uint64(7), np.uint64(1677722), np.float64(0.9)))


def test_direct_launch_marshals_exactly_as_numba(stubbed):
    """The ``direct`` path hands the driver the same words as numba's own launch, for C and
    strided arrays, bool masks, int64, float32 and float64 scalars; the ``overload`` path too."""
    from tfm.backends.cuda import _launch

    for name, kernel, grid, block, args in _launch_args():
        got = {}
        for mode in ("dispatch", "overload", "direct"):
            _launch.set_launch_mode(mode)
            stubbed.clear()
            _launch.launch(name, kernel, grid, block, *args)
            _launch.launch(name, kernel, grid, block, *args)  # the second call hits the cache
            assert len(stubbed) == 2 and _words(stubbed[0]) == _words(stubbed[1])
            got[mode] = _words(stubbed[0])
        assert got["direct"] == got["dispatch"] and got["overload"] == got["dispatch"], name
    entries = list(_launch._OVERLOADS.values())
    assert entries and all(e.verified and e.mode == "direct" for e in entries)


def test_direct_launch_falls_back_when_marshalling_differs(stubbed, monkeypatch):
    from tfm.backends.cuda import _launch

    monkeypatch.setattr(_launch, "_array_words", lambda a: (0,))  # a numba with another array model
    name, kernel, grid, block, args = next(_launch_args())
    _launch.set_launch_mode("direct")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _launch.launch(name, kernel, grid, block, *args)
    assert any("marshalling differs" in str(w.message) for w in caught)
    (entry,) = _launch._OVERLOADS.values()
    assert entry.mode == "overload" and len(stubbed) == 1 and len(stubbed[0]) > 1


def test_registers_are_checked_on_the_first_launch(stubbed, monkeypatch):
    from tfm.backends.cuda import _launch

    name, kernel, grid, block, args = next(_launch_args())
    monkeypatch.setattr(_offline._FakeCufunc.attrs, "regs", 600)
    _launch.set_launch_mode("direct")
    with pytest.raises(_launch.CudaLaunchError, match="600 registers per thread x 128 threads"):
        _launch.launch(name, kernel, grid, block, *args)
    assert not stubbed


def test_a_whole_forward_pass_launches_through_the_direct_path(monkeypatch):
    """Host side of a toy nn.Transformer forward on made-up device memory: every kernel the
    model launches (21 for 1 + 1 layers) goes through the cached direct path, with its
    marshalling verified against numba's on the first launch, in each launch mode."""
    torch = pytest.importorskip("torch")

    import tfm
    from tfm.backends.cuda import CudaBackend, _launch

    for name, fresh in (("_OVERLOADS", {}), ("_CONFIGS", {}), ("_STREAM", []), ("_mode", None)):
        monkeypatch.setattr(_launch, name, fresh)
    with _offline.offline(stub_launch=True, fake_memory=True):
        torch.manual_seed(0)
        module = torch.nn.Transformer(16, 2, 1, 1, 24, dropout=0.0, batch_first=True).eval()
        model = tfm.from_torch(module, backend=CudaBackend(gemm="numba"))
        x = _offline.fake_device_array((2, 5, 16), np.float32, ptr=1 << 30)
        for mode in ("direct", "overload", "dispatch"):
            _launch.set_launch_mode(mode)
            before = _launch.COUNTS["launches"]
            out = model(x, x, tgt_is_causal=True)
            assert out.shape == (2, 5, 16) and _launch.COUNTS["launches"] - before == 21
    entries = list(_launch._OVERLOADS.values())
    assert len(entries) >= 6 and all(e.verified and e.mode == "direct" for e in entries)


def test_a_whole_training_step_launches_through_the_direct_path(monkeypatch):
    """Host side of a toy Transformer's training step (dropout, label smoothing, Adam) on made-up
    device memory: every kernel of the forward, the backward and the update goes through the
    cached direct path, with its marshalling (uint64 dropout keys, float64 scalars, strided
    head views) verified against numba's on the first launch; the only download is the loss."""
    import tfm
    from tfm.backends.cuda import CudaBackend, _launch

    for name, fresh in (("_OVERLOADS", {}), ("_CONFIGS", {}), ("_STREAM", []), ("_mode", None)):
        monkeypatch.setattr(_launch, name, fresh)
    cfg = tfm.TransformerConfig(d_model=16, n_heads=2, d_ff=24, n_encoder_layers=1, n_decoder_layers=1,
                                src_vocab=11, tgt_vocab=13, max_len=16, dropout=0.1)
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(0, 11, (2, 5)), rng.integers(0, 13, (2, 6))
    pad = np.zeros((2, 5), bool)
    pad[1, 3:] = True
    with _offline.offline(stub_launch=True, fake_memory=True):
        model = tfm.Transformer(cfg, seed=0, backend=CudaBackend(gemm="numba"))
        opt = tfm.optim.Adam(model, lr=1e-3)
        _launch.set_launch_mode("direct")
        before = _launch.COUNTS["launches"]
        loss = model.train_step(opt, src, tgt, label_smoothing=0.1, src_pad_mask=pad)
        launches = _launch.COUNTS["launches"] - before
    assert loss == 0.0  # the made-up memory downloads zeros
    assert launches > 100  # forward, backward and one Adam launch per parameter (146 here)
    entries = list(_launch._OVERLOADS.values())
    assert all(e.verified and e.mode == "direct" for e in entries)
    assert {"dropout", "adam", "cross_entropy", "embedding_backward", "attention_backward_kv", "attention_backward_pre",
            "layer_norm_backward", "layer_norm_param_grads", "merge_heads_into", "column_sums",
            "activation_backward[relu]", "fill", "axpy"} <= {e.name for e in entries}
