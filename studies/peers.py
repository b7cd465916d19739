"""Peers: tfm against PyTorch on the same inputs and weights, timed A B A B in one process.

Pairs: fused attention (tfm.attention, backend cpu) against
torch.nn.functional.scaled_dot_product_attention; the base-config encoder-decoder stack
(tfm.from_torch(nn.Transformer) -> tfm.EncoderDecoder) against nn.Transformer itself; one
LSTM and one GRU layer (the backend's kernels fed nn.LSTM / nn.GRU's weights) against
nn.LSTM / nn.GRU; a k=3 'same' convolution against nn.Conv1d (each side in its own layout:
tfm (B, N, C), PyTorch (B, C, N)). Each pair is interleaved (tfm, torch, tfm, torch, ...) so both see the
same machine load; PyTorch uses as many threads as Numba. ``ratio`` is tfm's median time
over PyTorch's (below 1: tfm faster); ``rel_err`` checks both computed the same thing.
"""

from __future__ import annotations

import sys

import numpy as np

from ._common import grid_name, ok, parser, run_main, savefig

NAME = "peers"
GRIDS = {
    "default": dict(att_n=(256, 1024, 4096), att_b=1, model=[(1, 64), (8, 128)], rnn=[(16, 128, 256), (8, 128, 512)],
                    conv=[(8, 512, 512)], budget_s=1.0),
    "quick": dict(att_n=(256, 1024), att_b=1, model=[(1, 32)], rnn=[(8, 64, 256)], conv=[(8, 128, 256)], budget_s=0.2),
    "smoke": dict(att_n=(37,), att_b=1, model=[(2, 8)], rnn=[(2, 9, 16)], conv=[(2, 9, 16)], budget_s=0.01),
}


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    g = GRIDS[grid]
    out = [{"pair": "attention vs SDPA", "b": g["att_b"], "n": n, "d": 64, "causal": c}
           for c in (False, True) for n in g["att_n"]]
    out += [{"pair": "base forward vs nn.Transformer", "b": b, "n": n, "d": 512, "causal": True}
            for b, n in g["model"]]
    out += [{"pair": f"{kind} vs nn.{kind.upper()}", "b": b, "n": n, "d": d, "causal": True}
            for kind in ("lstm", "gru") for b, n, d in g["rnn"]]
    out += [{"pair": "conv1d vs nn.Conv1d", "b": b, "n": n, "d": d, "causal": False} for b, n, d in g["conv"]]
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure(case: dict, ctx) -> dict:
    import numba

    import tfm
    from tfm import cost
    from tfm.bench import Skip

    try:
        import torch
    except ImportError as exc:
        raise Skip(f"PyTorch is not installed: {exc}") from None
    torch.set_num_threads(numba.get_num_threads())
    backend = ctx.options["backend"]
    bk = tfm.get_backend(backend)
    rng = np.random.default_rng(0)
    b, n, d, causal = case["b"], case["n"], case["d"], case["causal"]
    pair = case["pair"]
    peer_out = lambda t: t.numpy()  # noqa: E731  (PyTorch's output in tfm's layout, for the check)
    if pair.startswith("attention"):
        h = 8
        q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fa = lambda: tfm.attention(q, k, v, causal=causal, backend=backend)  # noqa: E731

        def fb():
            with torch.inference_mode():
                return sdpa(tq, tk, tv, is_causal=causal)

        flops = cost.flops("attention", b=b, h=h, nq=n, nk=n, dk=d, causal=causal)
    elif pair.startswith("base"):
        c = tfm.TransformerConfig.base()
        torch.manual_seed(0)
        peer = torch.nn.Transformer(c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff,
                                    dropout=0.0, batch_first=True).eval()
        ours = tfm.from_torch(peer, backend=backend)
        src, tgt = (rng.standard_normal((b, n, c.d_model)).astype(np.float32) for _ in range(2))
        ts, tt = torch.from_numpy(src), torch.from_numpy(tgt)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n)
        fa = lambda: ours(src, tgt, tgt_is_causal=True)  # noqa: E731

        def fb():
            with torch.inference_mode():
                return peer(ts, tt, tgt_mask=mask, tgt_is_causal=True)

        flops = cost.flops("transformer_forward", config=c, b=b, n_src=n, n_tgt=n, output_projection=False)
    elif pair.startswith("conv1d"):
        torch.manual_seed(0)
        peer = torch.nn.Conv1d(d, d, 3, padding=1).eval()
        w, bias = (bk.asarray(p.detach().numpy().astype(np.float32)) for p in (peer.weight, peer.bias))
        x = rng.standard_normal((b, n, d)).astype(np.float32)
        xs, tx = bk.asarray(x), torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))
        fa = lambda: bk.to_numpy(bk.conv1d(xs, w, bias, 1, 1, 1))  # noqa: E731
        peer_out = lambda t: t.numpy().transpose(0, 2, 1)  # noqa: E731

        def fb():
            with torch.inference_mode():
                return peer(tx)

        flops = cost.flops("conv1d", b=b, n_out=n, c_in=d, c_out=d, k=3)
    else:
        kind = pair.split()[0]
        torch.manual_seed(0)
        peer = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(d, d, 1, batch_first=True).eval()
        w = [p.detach().numpy().astype(np.float32) for p in (peer.weight_ih_l0, peer.weight_hh_l0,
                                                              peer.bias_ih_l0, peer.bias_hh_l0)]
        x = rng.standard_normal((b, n, d)).astype(np.float32)
        h0 = np.zeros((b, d), np.float32)
        xs, ws, hs = bk.asarray(x), [bk.asarray(a) for a in w], bk.asarray(h0)
        tx = torch.from_numpy(x)
        if kind == "lstm":
            fa = lambda: bk.to_numpy(bk.lstm_layer(xs, hs, hs, *ws)[0])  # noqa: E731
        else:
            fa = lambda: bk.to_numpy(bk.gru_layer(xs, hs, *ws)[0])  # noqa: E731

        def fb():
            with torch.inference_mode():
                return peer(tx)[0]

        flops = cost.flops(kind, b=b, n=n, d_in=d, d_hidden=d)
    err = _rel(fa(), peer_out(fb()))
    if not err < 1e-3:  # not the same computation: a timing comparison would mean nothing
        raise Skip(f"tfm and PyTorch outputs differ (relative error {err:.2e})", "error")
    ta, tb = ctx.time_pair(fa, fb, sync_a=bk.synchronize)
    return {"backend": backend, "peer": f"torch {torch.__version__}", "time_s": ta.median_s,
            "tfm_time_s": ta.median_s, "tfm_iqr_s": ta.iqr_s, "torch_time_s": tb.median_s, "torch_iqr_s": tb.iqr_s,
            "repeats": ta.repeats, "ratio": ta.median_s / tb.median_s, "flops": flops,
            "tfm_gflops": flops / ta.median_s / 1e9, "torch_gflops": flops / tb.median_s / 1e9, "rel_err": err}


def build(args):
    from tfm.bench import Study

    grid = grid_name(args)
    return Study(NAME, "tfm against PyTorch", cases(grid), measure, grow="n",
                 exponent=lambda c: 2.0 if c["pair"].startswith("attention") else 1.0,
                 budget_s=GRIDS[grid]["budget_s"], max_call_s=5.0, options={"backend": args.backend})


def plot(df, out):
    import matplotlib.pyplot as plt

    good = ok(df)
    if good.empty:
        return
    labels = [f"{r['pair']}\nb={r['b']} n={r['n']} d={r['d']}" + (" causal" if r["pair"].startswith("attention")
              and r["causal"] else "") for _, r in good.iterrows()]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.5))
    y = np.arange(len(labels))
    ax.barh(y, good["ratio"], color=["tab:green" if r < 1 else "tab:red" for r in good["ratio"]])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="tfm time / PyTorch time (below 1: tfm faster)", title="tfm against PyTorch, measured A B A B")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    savefig(fig, out, "peers")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
