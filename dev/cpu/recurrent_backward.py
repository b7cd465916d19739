"""Lab: backpropagation through time on the CPU (``tfm/backends/cpu/recurrent.py``: the training
forwards ``*_layer_train`` and the backwards ``*_layer_backward``): tfm's forward + backward
against PyTorch's (nn.LSTM / nn.GRU / nn.RNN with autograd), where the time goes (each phase
as GFLOP/s and as a fraction of the sgemm ceiling), the reverse sweep's schedule and block
width, and the threading of the weight gradients.

    python -m dev.cpu.recurrent_backward [--out DIR] [--quick]

float32, I = H = 512, B = 8 (the recurrent benchmarks' batch) unless a case says otherwise;
Numba's threads (2 here) each calling single-threaded OpenBLAS, PyTorch on as many threads.
Every variant is checked against the float64 reference (``tfm.reference.baselines``) on
awkward sizes first (``run_checks``), timed interleaved (``common.interleave``), and its timed
output checked again. Writes DIR/recurrent_backward.csv and DIR/recurrent_backward_check.csv.

FLOPs: a layer's forward counts ``tfm.cost.flops`` (2 B N (I + H) G for the products, plus the
gates); its backward twice the products (dx and dW_ih for the input side, the sweep's dh and
dW_hh for the recurrent side), so forward + backward = 3x the forward's count.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from tfm import cost
from tfm.backends.cpu import recurrent as rec
from tfm.backends.cpu._threads import single_threaded_blas
from tfm.backends.cpu.linear import linear
from tfm.reference import baselines as ref

from .common import check, compare, interleave, main, print_rows, rel_err, torch_threads

VARIANTS = {
    "sweep by rows": "a thread's batch rows through all n steps (no barrier); "
                     "BPTT_UNITS-unit blocks of the product dgh W_hh (512 = all of H)",
    "sweep by units": "every step's unit blocks (one per thread: _split_units) shared out over the "
                      "threads: a barrier per step, each thread streams its share of W_hh",
    "weight grads, gemm items (library)": "dx, dW_ih, dW_hh as 3 x threads single-threaded "
                                          "gemm items in one prange, bias sums beside dW",
    "weight grads, one thread": "the same three gemms one after another on the calling thread",
    "weight grads, NumPy": "three NumPy products on OpenBLAS's own threads, sums by NumPy",
}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
B, D = 8, 512


def _load() -> dict:
    """The 1-minute load average when a comparison ends: this machine is shared."""
    return {"load_1min": os.getloadavg()[0]}


class Case:
    """One layer's float32 inputs, its training forward (tfm's ``saved``), cotangents of the
    outputs (dout and the final states), and the float64 reference gradients."""

    def __init__(self, rng, kind, b, n, d_in, hidden, reference=True):
        self.kind, self.b, self.n, self.d_in, self.hidden = kind, b, n, d_in, hidden
        g = GATES[kind] * hidden
        bound = hidden ** -0.5
        x = rng.standard_normal((b, n, d_in))
        states = tuple(0.5 * rng.standard_normal((b, hidden)) for _ in range(2 if kind == "lstm" else 1))
        w = tuple(rng.uniform(-bound, bound, s) for s in ((g, d_in), (g, hidden), (g,), (g,)))
        self.args64 = (x,) + states + w
        self.args = [a.astype(np.float32) for a in self.args64]
        self.cot64 = (rng.standard_normal((b, n, hidden)),) + tuple(
            rng.standard_normal((b, hidden)) for _ in states)
        self.cot = [c.astype(np.float32) for c in self.cot64]
        *self.outs, self.saved = self.train(rec)(*self.args)
        self.want = None
        if reference:
            *_, saved64 = self.train(ref)(*self.args64)
            self.want = self.backward(ref)(saved64, *self.cot64)

    def train(self, module):
        if self.kind == "rnn":
            return lambda *a: module.rnn_layer_train(*a, nonlinearity="tanh")
        return getattr(module, f"{self.kind}_layer_train")

    def backward(self, module):
        return getattr(module, f"{self.kind}_layer_backward")

    def flops_forward(self):
        return cost.flops(self.kind, b=self.b, n=self.n, d_in=self.d_in, d_hidden=self.hidden)

    # the backward's pieces, as rec._backward runs them -----------------------------------
    def sweep_args(self):
        """Fresh outputs and carry for one sweep: (dgi, dgh, w_hh, saved tuple, dout, dh_n,
        carry, dh0); NaN-filled so an unwritten element cannot pass."""
        s, b, n, h = self.saved, self.b, self.n, self.hidden
        g = GATES[self.kind] * h
        dgi = np.full((b, n, g), np.nan, np.float32)
        dgh = np.full((b, n, g), np.nan, np.float32) if self.kind == "gru" else dgi
        if self.kind == "rnn":
            kernel_saved, carry = (s.out, s.relu), np.zeros((b, h), np.float32)
        elif self.kind == "lstm":
            kernel_saved, carry = (s.gates, s.cells, s.c0), self.cot[2].copy()
        else:
            kernel_saved, carry = (s.gates, s.hn, s.out, s.h0), np.zeros((b, h), np.float32)
        return (dgi, dgh, s.w_hh, kernel_saved, self.cot[0], self.cot[1], carry,
                np.full((b, h), np.nan, np.float32))

    def sweep(self, schedule, units, groups=1):
        """A callable running the reverse sweep on ``schedule`` ("rows": ``groups`` row
        groups; "units"), returning its sweep_args (the filled arrays)."""
        by_rows = getattr(rec, f"_{self.kind}_bptt_by_rows")
        by_units = getattr(rec, f"_{self.kind}_bptt_by_units")
        starts = np.array([g * self.b // groups for g in range(groups + 1)], np.int64)

        def run():
            a = self.sweep_args()
            if schedule == "rows":
                by_rows(*a, units, starts)
            else:
                by_units(*a, units)
            return a
        return run

    def grads_args(self, swept):
        dgi, dgh, *_ = swept
        s, m = self.saved, self.b * self.n
        h, g = self.hidden, dgi.shape[2]
        h_prev = np.concatenate((s.h0[:, None], s.out[:, :-1]), axis=1).reshape(m, h)
        outs = (np.full((m, self.d_in), np.nan, np.float32), np.full((g, self.d_in), np.nan, np.float32),
                np.full((g, h), np.nan, np.float32), np.full(g, np.nan, np.float32),
                np.full(g, np.nan, np.float32))
        return (s.x.reshape(m, self.d_in), h_prev, s.w_ih, dgi.reshape(m, g), dgh.reshape(m, g)) + outs

    def weight_grads(self, variant, swept):
        """A callable computing (dx, dW_ih, dW_hh, db_ih, db_hh) from a finished sweep."""
        def run():
            a = self.grads_args(swept)
            x, h_prev, w_ih, dgi, dgh = a[:5]
            if variant == "library":
                with single_threaded_blas():
                    rec._weight_grads_parallel(*a, numba.get_num_threads())
                return a[5:]
            if variant == "one thread":
                with single_threaded_blas():
                    rec._weight_grads_serial(*a)
                return a[5:]
            with threadpool_limits(numba.get_num_threads(), user_api="blas"):  # NumPy's own
                return (dgi @ w_ih, dgi.T @ x, dgh.T @ h_prev, dgi.sum(0, dtype=np.float64),
                        dgh.sum(0, dtype=np.float64))
        return run

    def assemble(self, swept, grads):
        """The backward's return tuple from the sweep's and the weight gradients' outputs."""
        dgi, dgh, w_hh, kernel_saved, dout, dh_n, carry, dh0 = swept
        dx, dw_ih, dw_hh, db_ih, db_hh = grads
        head = (dx.reshape(self.b, self.n, self.d_in), dh0) + ((carry,) if self.kind == "lstm" else ())
        return head + (dw_ih, dw_hh, db_ih, db_hh)

    def check(self, label, got, checks, tol=2e-5):
        err = max(rel_err(g, w) for g, w in zip(got, self.want)) if len(got) == len(self.want) else np.inf
        check(f"{self.kind} B={self.b} n={self.n} I={self.d_in} H={self.hidden}: {label}", err, tol, checks)


SCHEDULES = (("rows", 512, 1), ("rows", 256, 1), ("rows", 128, 1), ("units", 128, 1), ("units", 256, 1),
             ("units", 80, 1))


def _schedule_name(schedule, units, groups):
    if schedule == "rows":
        return f"by rows, {groups} group{'s' if groups > 1 else ''}, {units} units"
    return f"by units, {units}-unit blocks"


def run_checks(rng) -> list[dict]:
    """Every sweep schedule and block width (remainder blocks: H = 150, 70) with every
    weight-gradient variant, against the float64 reference, for each kind; then the library's
    backward itself."""
    checks: list[dict] = []
    for kind in GATES:
        for b, n, d_in, hidden in ((3, 37, 13, 150), (1, 5, 70, 70)):
            case = Case(rng, kind, b, n, d_in, hidden)
            for schedule, units, groups in SCHEDULES + (("rows", 16, 2),):
                swept = case.sweep(schedule, units, groups)()
                for variant in ("library", "one thread", "NumPy"):
                    got = case.assemble(swept, case.weight_grads(variant, swept)())
                    case.check(f"sweep {_schedule_name(schedule, units, groups)}, weight grads {variant}",
                               got, checks)
            case.check("library backward", case.backward(rec)(case.saved, *case.cot), checks)
    return checks


def _torch_run(case, outs):
    """(tfm, torch) callables for forward + backward of ``case`` on the same weights; each
    stores its gradients in ``outs``."""
    import torch

    kind = case.kind
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    net = cls(case.d_in, case.hidden, batch_first=True)
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    n_state = 2 if kind == "lstm" else 1
    with torch.no_grad():
        for name, w in zip(names, case.args[1 + n_state:]):
            getattr(net, name).copy_(torch.from_numpy(w))
    tx = torch.from_numpy(case.args[0]).requires_grad_()
    states = [torch.from_numpy(s[None]).requires_grad_() for s in case.args[1:1 + n_state]]
    params = [getattr(net, name) for name in names]
    tcot = [torch.from_numpy(case.cot[0])] + [torch.from_numpy(c[None]) for c in case.cot[1:]]
    train, backward = case.train(rec), case.backward(rec)

    def tfm_run():
        *fwd, saved = train(*case.args)
        outs["tfm"] = backward(saved, *case.cot)

    def torch_run():
        out, state = net(tx, tuple(states) if kind == "lstm" else states[0])
        state = state if kind == "lstm" else (state,)
        grads = torch.autograd.grad((out,) + tuple(state), [tx] + states + params, tcot)
        outs["torch"] = tuple(g.numpy().reshape(w.shape) for g, w in zip(grads, case.want))

    return tfm_run, torch_run


def versus_torch(rng, quick, checks) -> list[dict]:
    """tfm forward + backward (``*_layer_train`` then ``*_layer_backward``) against PyTorch's
    module call then ``torch.autograd.grad`` of the output and final states with respect to
    x, the initial states and the four parameters; the same threads, interleaved."""
    rows = []
    with torch_threads(numba.get_num_threads()) as torch:
        if torch is None:
            return []
        for kind in ("lstm", "gru", "rnn"):
            for n in (32,) if quick else (128, 512):
                case = Case(rng, kind, B, n, D, D)
                outs: dict = {}
                tfm_run, torch_run = _torch_run(case, outs)
                times = interleave({"tfm": tfm_run, "torch": torch_run},
                                   budget_s=1.0 if quick else (30.0 if n > 128 else 15.0),
                                   min_rounds=3 if quick else 7)
                for name in ("tfm", "torch"):
                    case.check(f"{name} forward + backward, after timing", outs[name], checks,
                               tol=2e-5 if name == "tfm" else 1e-4)
                flops = 3 * case.flops_forward()
                extra = {name: {"gflops": flops / float(np.median(t)) / 1e9,
                                "torch_threads": torch.get_num_threads(), **_load()}
                         for name, t in times.items()}
                got = compare("recurrent_backward", f"{kind} forward + backward vs PyTorch, B={B} "
                              f"I=H={D} n={n}", times, "torch", extra)
                print_rows(got)
                rows += got
    return rows


def where_time_goes(rng, quick, checks) -> list[dict]:
    """The phases of forward + backward, timed interleaved, each as GFLOP/s of its products
    and as a fraction of the sgemm ceiling: a float32 2048^3 product through the dense
    kernels' ``linear`` (OpenBLAS sgemm blocks, one per Numba thread: tfm's thread policy;
    NumPy's own threaded sgemm ran slower than that under load), timed in the same rounds
    (this machine's load moves it by 2-3x within minutes).
    Phases: the training forward (input projection of all steps; the recurrence) and the
    backward (reverse sweep; weight gradients). Ratios against the whole training forward."""
    rows = []
    n = 32 if quick else 128
    side = 1024 if quick else 2048
    sa, sb = (rng.standard_normal((side, side)).astype(np.float32) for _ in range(2))
    for kind in ("lstm", "gru"):
        case = Case(rng, kind, B, n, D, D)
        g, m = GATES[kind] * D, B * n
        a = case.args
        n_state = 2 if kind == "lstm" else 1
        w_ih, w_hh, b_ih, b_hh = a[1 + n_state:]
        bias = b_ih + b_hh
        if kind == "gru":
            bias[2 * D:] = b_ih[2 * D:]
        xw, w_hhT = rec._prepare(a[0], a[1], w_ih, w_hh, bias, GATES[kind])
        gates = np.empty((B, n, g), np.float32)
        second = np.empty((B, n, D), np.float32)
        out = np.empty((B, n, D), np.float32)
        state = ((np.empty((B, D), np.float32), gates, second) if kind == "lstm"
                 else (b_hh[2 * D:].copy(), gates, second))
        # each direction's schedule as the library picks it
        schedule = "units" if rec._row_schedule(B, D, rec.UNITS, GATES[kind]) is None else "rows"
        split = rec._split_units(D)
        bptt = "units" if rec._row_schedule(B, D, split, GATES[kind]) is None else "rows"
        sweep = case.sweep(bptt, split if bptt == "units" else rec.BPTT_UNITS)
        swept = sweep()
        outs = {}

        def recurrence():
            if kind == "lstm":
                np.copyto(state[0], a[2])
            if schedule == "units":
                getattr(rec, f"_{kind}_train_by_units")(xw, a[1], w_hhT, state, out, rec.UNITS)
            else:
                getattr(rec, f"_{kind}_train_by_rows")(xw, a[1], w_hhT, state, out, rec.UNITS,
                                                       rec._row_starts(B))

        def backward():
            outs["backward"] = case.backward(rec)(case.saved, *case.cot)

        def sweep_and_keep():
            outs["sweep"] = sweep()

        grads = case.weight_grads("library", swept)
        ceiling_name = f"sgemm {side}^3 (linear, Numba threads)"
        fns = {"training forward": lambda: case.train(rec)(*a),
               "  input projection": lambda: rec._prepare(a[0], a[1], w_ih, w_hh, bias, GATES[kind]),
               "  recurrence": recurrence,
               "backward": backward,
               "  reverse sweep": sweep_and_keep,
               "  weight gradients": lambda: outs.__setitem__("grads", grads()),
               ceiling_name: lambda: linear(sa, sb)}
        times = interleave(fns, budget_s=1.0 if quick else 20.0, min_rounds=3 if quick else 7)
        case.check("library backward, after timing", outs["backward"], checks)
        case.check("sweep + weight gradients, after timing",
                   case.assemble(outs["sweep"], case.weight_grads("library", outs["sweep"])()), checks)
        product = 2 * m * g  # one (B*N) x G product per unit of inner dimension
        flops = {"training forward": product * (D + D), "  input projection": product * D,
                 "  recurrence": product * D, "backward": product * (3 * D),
                 "  reverse sweep": product * D, "  weight gradients": product * 3 * D,
                 ceiling_name: 2 * side ** 3}
        ceiling = flops[ceiling_name] / float(np.median(times[ceiling_name])) / 1e9
        extra = {}
        for name, t in times.items():
            gflops = flops[name] / float(np.median(t)) / 1e9
            extra[name] = {"gflops": gflops, "sgemm_ceiling_gflops": ceiling,
                           "fraction_of_ceiling": gflops / ceiling,
                           "schedules": f"forward by {schedule}, sweep by {bptt}", **_load()}
        got = compare("recurrent_backward", f"where the time goes, {kind} B={B} I=H={D} n={n}",
                      times, "training forward", extra)
        for r in got:
            print(f"  {r['variant']:<36} {r['median_ms']:8.2f} ms  {r['gflops']:6.1f} GFLOP/s  "
                  f"{r['fraction_of_ceiling']:.2f} of sgemm")
        rows += got
    return rows


def sweep_schedules(rng, quick, checks) -> list[dict]:
    """The reverse sweep alone on each schedule and block width, against the library's choice
    (``_row_schedule``, the forward's rule): B=8 (one row group; LSTM and GRU steps are over
    MIN_SPLIT_STEP_FLOPS, so by units) and B=16 (two row groups)."""
    rows = []
    n = 32 if quick else 128
    cases = [("lstm", 8), ("gru", 8), ("rnn", 8), ("lstm", 16), ("gru", 16)]
    for kind, b in cases[:2] if quick else cases:
        case = Case(rng, kind, b, n, D, D)
        split = rec._split_units(D)
        starts = rec._row_schedule(b, D, split, GATES[kind])
        groups = len(rec._row_starts(b)) - 1
        variants = [("rows", u, groups) for u in (512, 256, 128)] + [("units", u, 1) for u in (128, 256)]
        library = ("units", split, 1) if starts is None else ("rows", rec.BPTT_UNITS, groups)
        outs = {}
        fns = {}
        for v in variants:
            name = _schedule_name(*v) + (" (library)" if v == library else "")
            run = case.sweep(*v)
            fns[name] = (lambda run=run, name=name: outs.__setitem__(name, run()))
        times = interleave(fns, budget_s=1.0 if quick else 12.0, min_rounds=3 if quick else 7)
        for name, swept in outs.items():
            got = case.assemble(swept, case.weight_grads("library", swept)())
            case.check(f"sweep {name}, after timing", got, checks)
        flops = 2 * b * n * GATES[kind] * D * D
        extra = {name: {"gflops": flops / float(np.median(t)) / 1e9,
                        "us_per_step": 1e6 * float(np.median(t)) / n, **_load()} for name, t in times.items()}
        baseline = [name for name in fns if name.endswith("(library)")][0]
        got = compare("recurrent_backward", f"reverse sweep, {kind} B={b} H={D} n={n}", times,
                      baseline, extra)
        print_rows(got)
        rows += got
    return rows


def weight_gradients(rng, quick, checks) -> list[dict]:
    """dx, dW_ih, dW_hh and the bias sums from a finished sweep: the library's gemm items on
    Numba's threads, the same gemms on one thread, NumPy on OpenBLAS's threads."""
    rows = []
    n = 32 if quick else 128
    for kind in ("lstm",) if quick else ("lstm", "gru"):
        case = Case(rng, kind, B, n, D, D)
        swept = case.sweep("rows", 512)()
        outs = {}
        fns = {}
        for variant in ("library", "one thread", "NumPy"):
            run = case.weight_grads(variant, swept)
            fns[variant] = (lambda run=run, v=variant: outs.__setitem__(v, run()))
        times = interleave(fns, budget_s=1.0 if quick else 10.0, min_rounds=3 if quick else 7)
        for variant, got in outs.items():
            case.check(f"weight grads {variant}, after timing", case.assemble(swept, got), checks)
        g = GATES[kind] * D
        flops = 2 * B * n * g * 3 * D
        extra = {name: {"gflops": flops / float(np.median(t)) / 1e9, **_load()} for name, t in times.items()}
        got = compare("recurrent_backward", f"weight gradients, {kind} B={B} I=H={D} n={n}", times,
                      "library", extra)
        print_rows(got)
        rows += got
    return rows


def _offset(shape, offset_bytes, rng):
    """A float32 array of random normals that starts ``offset_bytes`` past a cache line."""
    size = int(np.prod(shape))
    buf = np.empty(size + 64, np.float32)
    start = ((-buf.ctypes.data) % 64 + offset_bytes) // 4
    a = buf[start:start + size].reshape(shape)
    assert a.ctypes.data % 64 == offset_bytes
    a[...] = rng.standard_normal(shape)
    return a


@numba.njit(cache=True)
def _sweep_products(dgh, w, acc, width):
    """The reverse sweep's products alone: every step's dgh_{t+1} W_hh in ``width``-unit blocks."""
    for t in range(dgh.shape[1]):
        for u0 in range(0, w.shape[1], width):
            rec._hidden_block(dgh[:, t], w, acc, u0, width)


def alignment(rng, quick, checks) -> list[dict]:
    """The step product ``_hidden_block`` as the by-units sweep runs it (B=8, G=2048 deep,
    256-unit blocks of H=512, n steps, one thread) with W_hh and acc 0, 16 or 32 bytes past
    a cache line: NumPy's big arrays start 16 or 48 bytes in, Numba's 0 or 32; the library
    now allocates both on a line (``_aligned_empty``)."""
    n = 32 if quick else 128
    g, h, width = 4 * D, D, 256
    dgh = rng.standard_normal((B, n, g)).astype(np.float32)
    ws = {off: _offset((g, h), off, rng) for off in (0, 16, 32)}
    for w in list(ws.values())[1:]:  # the same values at each offset
        w[...] = ws[0]
    accs = {off: _offset((B, width), off, rng) for off in (0, 32)}
    fns = {f"W +{wo} B, acc +{ao} B": (lambda w=ws[wo], acc=accs[ao]: _sweep_products(dgh, w, acc, width))
           for wo in ws for ao in accs}
    times = interleave(fns, budget_s=1.0 if quick else 15.0, min_rounds=3 if quick else 9)
    want = dgh[:, -1].astype(np.float64) @ ws[0][:, h - width:].astype(np.float64)  # the last block
    for (wo, ao), name in zip([(wo, ao) for wo in ws for ao in accs], fns):
        check(f"step product {name}, after timing", rel_err(accs[ao][:, :width], want), 1e-5, checks)
    flops = 2 * B * n * g * h
    extra = {name: {"gflops": flops / float(np.median(t)) / 1e9, **_load()} for name, t in times.items()}
    got = compare("recurrent_backward", f"sweep step products, B={B} G={g} H={h}, {width}-unit "
                  f"blocks, n={n}, alignment", times, "W +0 B, acc +0 B", extra)
    print_rows(got)
    return got


PARTS = (versus_torch, where_time_goes, sweep_schedules, weight_gradients, alignment)

if __name__ == "__main__":
    raise SystemExit(main("recurrent_backward", PARTS, run_checks, __doc__))
