"""Study 6: every kernel's achieved GFLOP/s and GB/s against the machine's measured ceilings.

Each kernel runs once at a representative size (float32, batch as stated). Its counted
FLOPs and compulsory bytes (tfm.cost) over the median time give the achieved rates; the
arithmetic intensity (FLOPs per compulsory byte) places it on the roofline
min(sgemm ceiling, bandwidth x intensity) drawn from the ceilings measured at the start of
the run (tables/machine.json): the host's for the CPU, the device's (cuBLAS SGEMM, device
copy) for a GPU, where the FP32 CUDA-core peak is drawn too.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from ._common import grid_name, make_study, ok, parser, run_main
from ._report import prose

NAME = "roofline"
TITLE = "Roofline"
GRIDS = {  # per grid: the factor the default lengths are scaled by, the model width, the recurrent batch
    "default": dict(scale=1.0, d=512, batch=32), "quick": dict(scale=0.5, d=512, batch=32),
    "smoke": dict(scale=1 / 128, d=16, batch=4),
    "gpu": dict(scale=4.0, d=512, batch=32),  # an H100/H200: a few ms per kernel; estimated 5-10 s with compilation
}
OPS = ("linear", "layer_norm", "softmax")  # backend operations timed directly
LAYER_KERNELS = ("ffn", "self_attention_naive", "self_attention", "self_attention_restricted", "rnn", "recurrent",
                 "gru", "convolutional")  # tfm.table1 layers, through tfm.bench.layers.make_layer
RESTRICTED_WINDOW = 64  # wider than the scaling study's r: a window a kernel can reach its rate on
MEMORY_BOUND_AT = 1.0  # a kernel is "memory" bound when bandwidth x intensity < the compute ceiling


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases() -> list[dict]:
    out = [{"kernel": k, "causal": False} for k in OPS + LAYER_KERNELS]
    out.insert(out.index({"kernel": "self_attention", "causal": False}) + 1, {"kernel": "self_attention", "causal": True})
    return out


def _dims(kernel: str, scale: float, d: int, batch: int) -> dict:
    """The kernel's size: the default lengths scaled by ``scale``, at model width ``d``."""
    s = scale

    def sc(v, lo=1):
        return max(lo, int(v * s))

    if kernel.startswith("self_attention") and kernel != "self_attention_restricted":
        return dict(b=1, n=sc(2048, 16), d=d)
    rec = dict(b=batch, n=sc(128, 4), d=d)
    return {
        "linear": dict(tokens=sc(2048, 4), d_in=d, d_out=4 * d),
        "ffn": dict(tokens=sc(1024, 4), d=d),
        "layer_norm": dict(tokens=sc(8192, 4), d=d),
        "softmax": dict(rows=sc(8192, 4), cols=2 * d),
        "self_attention_restricted": dict(b=1, n=sc(4096, 16), d=d, window=min(RESTRICTED_WINDOW, sc(4096, 16))),
        "rnn": rec, "recurrent": rec, "gru": rec,
        "convolutional": dict(b=1, n=sc(2048, 16), d=d),
    }[kernel]


def measure(case: dict, ctx) -> dict:
    from tfm import cost
    from tfm.backends import get_backend
    from tfm.bench.layers import make_layer

    backend = ctx.options["backend"]
    kernel, dims = case["kernel"], _dims(case["kernel"], **GRIDS[ctx.options["grid"]])
    if kernel in OPS:
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
        if kernel == "ffn":
            lay = make_layer("ffn", n=dims["tokens"], d=dims["d"], backend=backend)
        else:
            extra = {k: v for k, v in dims.items() if k == "window"}
            lay = make_layer(kernel, n=dims["n"], d=dims["d"], b=dims["b"], backend=backend, causal=case["causal"],
                             **extra)
        run, fl, by, sync = lay.run, lay.flops, lay.bytes, lay.sync
    t = ctx.time(run, sync)
    return {"backend": backend, "dims": " ".join(f"{k}={v}" for k, v in dims.items()), "time_s": t.median_s,
            **t.as_row(), "flops": fl, "bytes": by, "intensity": fl / by}


def build(args):
    grid = grid_name(args)
    return make_study(sys.modules[__name__], cases(), measure, args, budget_s=0.5 if grid == "default" else 0.05)


# ----------------------------------------------------------------------------- derived
def _on_device(rows) -> bool:
    return "cuda" in str(rows["backend"].iloc[0])


def ceilings(rows) -> dict:
    """The run's compute ceiling, bandwidth and (on a GPU) FP32 peak, as its rows carry them."""
    from tfm.bench.study import ceiling

    r, dev = rows.iloc[0].to_dict(), _on_device(rows)
    return {"sgemm": ceiling(r, "sgemm_gflops", dev), "bw": ceiling(r, "mem_bw_gbs", dev),
            "peak": ceiling(r, "fp32_peak_gflops", dev) if dev else float("nan")}


def bounds(df) -> pd.DataFrame:
    """Per kernel: achieved rates, intensity, which roof bounds it and the fraction of that roof reached."""
    good = ok(df)
    cols = ["kernel", "causal", "dims", "time_s", "gflops", "gbs", "intensity", "bound", "fraction of roof"]
    if good.empty:
        return pd.DataFrame(columns=cols)
    c = ceilings(good)
    t = good.copy()
    if "causal" not in t.columns:
        t["causal"] = False
    roof = np.minimum(c["sgemm"], c["bw"] * t["intensity"])
    known = np.isfinite(c["sgemm"]) and np.isfinite(c["bw"])
    t["bound"] = (np.where(c["bw"] * t["intensity"] < MEMORY_BOUND_AT * c["sgemm"], "memory", "compute") if known
                  else "no ceilings measured")
    t["fraction of roof"] = t["gflops"] / roof
    if "frac_peak" in t.columns:
        cols.append("frac_peak")
    return t[cols]


DERIVED = {"roofline_bounds": bounds}


# ----------------------------------------------------------------------------- figures
def plot_roofline(df, on: str):
    import matplotlib.pyplot as plt

    c = ceilings(df)
    if not np.isfinite(c["sgemm"]) or not np.isfinite(c["bw"]):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    xs = np.logspace(-1.5, 3, 200)
    ax.loglog(xs, np.minimum(c["sgemm"], c["bw"] * xs), "k-", lw=1.5,
              label=f"roofline: sgemm {c['sgemm']:.0f} GFLOP/s, copy {c['bw']:.1f} GB/s")
    if np.isfinite(c["peak"]):
        ax.axhline(c["peak"], color="k", ls="--", lw=1, label=f"FP32 CUDA-core peak {c['peak']:.0f} GFLOP/s")
    for _, r in df.iterrows():
        name = r["kernel"] + (" (causal)" if bool(r.get("causal", False)) else "")
        ax.loglog(r["intensity"], r["gflops"], "o", ms=6)
        ax.annotate(name, (r["intensity"], r["gflops"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="arithmetic intensity (FLOPs per compulsory byte)", ylabel="achieved GFLOP/s",
           title=f"Roofline: each kernel against the measured ceilings (float32)\n({on})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


FIGURES = {"roofline": plot_roofline}


# ----------------------------------------------------------------------------- report
INTRO = prose("""
    Intensity uses compulsory bytes (inputs read once, outputs written once; tfm.cost), so a
    memory-bound kernel above the bandwidth roof reuses data from cache. **Bound:** memory when
    bandwidth x intensity lies below the sgemm ceiling, else compute; the fraction of roof is the
    achieved GFLOP/s over min(sgemm, bandwidth x intensity).
""")


def results(rep, rows, suffix: str) -> str:
    from ._report import md_table

    c = ceilings(rows)
    t = bounds(rows)
    s = rep.figure("roofline" + suffix, "roofline")
    if not (np.isfinite(c["sgemm"]) and np.isfinite(c["bw"])):
        reason = (rep.gpu.machine if suffix else rep.machine).get("device_reason") or ""
        return s + (f"No ceilings were measured in this run{f' ({reason})' if reason else ''}, so there is no "
                    "roof to compare with; the achieved rates:\n\n" + md_table(t.drop(columns="fraction of roof"))
                    + "\n")
    s += (f"Ceilings measured at the start of the run: sgemm {c['sgemm']:.0f} GFLOP/s, copy bandwidth "
          f"{c['bw']:.1f} GB/s (ridge at {c['sgemm'] / c['bw']:.1f} FLOPs/byte)"
          + (f"; FP32 CUDA-core peak {c['peak']:.0f} GFLOP/s (frac_peak)" if np.isfinite(c["peak"]) else "")
          + ".\n\n" + md_table(t) + "\n")
    best, worst = t.sort_values("fraction of roof").iloc[-1], t.sort_values("fraction of roof").iloc[0]
    return s + (f"Closest to its roof: {best['kernel']} ({best['fraction of roof']:.0%}); furthest: "
                f"{worst['kernel']} ({worst['fraction of roof']:.0%}).\n\n")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
