"""Study 6: every kernel's achieved GFLOP/s and GB/s against the machine's measured ceilings.

Each kernel runs once at a representative size (float32, batch as stated). Its counted
FLOPs and compulsory bytes (tfm.cost) over the median time give the achieved rates; the
arithmetic intensity (FLOPs per compulsory byte) places it on the roofline
min(sgemm ceiling, bandwidth x intensity) drawn from the ceilings measured at the start of
the run (tables/machine.json).
"""

from __future__ import annotations

import sys

import numpy as np

from ._common import grid_name, ok, parser, run_main, savefig

NAME = "roofline"
SIZES = {  # kernel -> dims for the default / quick / smoke grids (scaled by a factor)
    "default": 1.0, "quick": 0.5, "smoke": 1 / 16,
}
KERNELS = ("linear", "ffn", "layer_norm", "softmax", "attention_naive", "attention_fused", "attention_fused_causal",
           "restricted", "rnn", "lstm", "gru", "conv")


def arg_parser():
    return parser(NAME, __doc__, SIZES)


def _dims(kernel: str, s: float) -> dict:
    def sc(v, lo=1):
        return max(lo, int(v * s))

    base = {
        "linear": dict(tokens=sc(2048), d_in=512, d_out=2048),
        "ffn": dict(tokens=sc(1024), d=512),
        "layer_norm": dict(tokens=sc(8192), d=512),
        "softmax": dict(rows=sc(8192), cols=1024),
        "restricted": dict(b=1, n=sc(4096, 64), d=512, window=64),
        "rnn": dict(b=32, n=sc(128, 8), d=512), "lstm": dict(b=32, n=sc(128, 8), d=512),
        "gru": dict(b=32, n=sc(128, 8), d=512),
        "conv": dict(b=1, n=sc(2048, 16), d=512, k=3),
    }
    if kernel.startswith("attention"):
        return dict(b=1, n=sc(2048, 64), d=512)
    return base[kernel]


def measure(case: dict, ctx) -> dict:
    from tfm import cost
    from tfm.backends import get_backend
    from tfm.bench.layers import make_layer

    backend = ctx.options["backend"]
    kernel, dims = case["kernel"], _dims(case["kernel"], SIZES[ctx.options["grid"]])
    if kernel in ("linear", "layer_norm", "softmax"):
        bk = get_backend(backend)
        rng = np.random.default_rng(0)

        def arr(*shape):
            return bk.asarray(rng.standard_normal(shape).astype(np.float32))

        if kernel == "linear":
            x, w, b = arr(dims["tokens"], dims["d_in"]), arr(dims["d_out"], dims["d_in"]), arr(dims["d_out"])
            run = lambda: bk.linear(x, w, b)  # noqa: E731
        elif kernel == "layer_norm":
            x, r, g, b = arr(dims["tokens"], dims["d"]), arr(dims["tokens"], dims["d"]), arr(dims["d"]), arr(dims["d"])
            run = lambda: bk.layer_norm(x, g, b, 1e-5, r)  # noqa: E731
        else:
            x = arr(dims["rows"], dims["cols"])
            run = lambda: bk.softmax(x)  # noqa: E731
        fl, by, sync = cost.flops(kernel, **dims), cost.bytes_moved(kernel, 4, **dims), bk.synchronize
    else:
        kind = "attention_fused" if kernel == "attention_fused_causal" else kernel
        if kind == "ffn":
            lay = make_layer("ffn", n=dims["tokens"], d=dims["d"], backend=backend)
        else:
            extra = {k: v for k, v in dims.items() if k in ("k", "window")}
            lay = make_layer(kind, n=dims["n"], d=dims["d"], b=dims["b"], backend=backend,
                             causal=kernel.endswith("causal"), **extra)
        run, fl, by, sync = lay.run, lay.flops, lay.bytes, lay.sync
    t = ctx.time(run, sync)
    return {"backend": backend, "dims": " ".join(f"{k}={v}" for k, v in dims.items()), "time_s": t.median_s,
            **t.as_row(), "flops": fl, "bytes": by, "intensity": fl / by}


def build(args):
    from tfm.bench import Study

    grid = grid_name(args)
    return Study(NAME, "Roofline", [{"kernel": k} for k in KERNELS], measure,
                 budget_s=0.5 if grid == "default" else 0.05, options={"backend": args.backend, "grid": grid})


def plot(df, out):
    import matplotlib.pyplot as plt

    good = ok(df)
    if good.empty:
        return
    peak, bw = float(good["sgemm_gflops"].iloc[0]), float(good["mem_bw_gbs"].iloc[0])
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    xs = np.logspace(-1.5, 3, 200)
    ax.loglog(xs, np.minimum(peak, bw * xs), "k-", lw=1.5,
              label=f"roofline: sgemm {peak:.0f} GFLOP/s, copy {bw:.1f} GB/s")
    for _, r in good.iterrows():
        ax.loglog(r["intensity"], r["gflops"], "o", ms=6)
        ax.annotate(r["kernel"], (r["intensity"], r["gflops"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="arithmetic intensity (FLOPs per compulsory byte)", ylabel="achieved GFLOP/s",
           title="Roofline: each kernel against the measured ceilings (float32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    savefig(fig, out, "roofline")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
