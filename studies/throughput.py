"""Study 5: throughput of whole models, tfm beside PyTorch on the same device.

Models: the Transformer at the paper's base config and at the small preset, and the
baselines (LSTM seq2seq, ConvS2S) at the small preset's width and depth. Modes: the
teacher-forced forward pass (source n tokens, target n tokens) and greedy generation with
the cache (source n tokens, n new tokens). Throughput is (source + target) tokens per
second: b * 2n / time. PyTorch peers run the same architecture with random weights: the
Transformer as nn.Embedding + sinusoidal PE + nn.Transformer + a linear generator, its
greedy loop re-running the decoder over the prefix (nn.Transformer has no KV cache); the
LSTM seq2seq as nn.LSTM encoder/decoder stacks with dot-product (Luong) attention.
ConvS2S has no PyTorch implementation here (NaN rows say so). Both sides return their
output to the host (tfm's models always do), and on a GPU both are synchronised before the
clock stops; PyTorch runs in float32 with TF32 off.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pandas as pd

from ._common import grid_name, make_study, ok, parser, run_main
from ._report import prose

NAME = "throughput"
TITLE = "Whole-model throughput"
MODELS = ("transformer_base", "transformer_small", "lstm_seq2seq", "convs2s")
GRIDS = {  # n: forward lengths; gen_n: generation lengths (greedy decoding is the slow mode)
    "default": dict(b=(1, 8), n=(16, 64), gen_n=(16,), models=MODELS, budget_s=0.5),
    "quick": dict(b=(1, 4), n=(16,), gen_n=(16,), models=("transformer_small", "lstm_seq2seq", "convs2s"),
                  budget_s=0.05),
    "smoke": dict(b=(2,), n=(4,), gen_n=(2,), models=("transformer_small", "lstm_seq2seq", "convs2s"), budget_s=0.01),
    # An H100/H200: one batch size; greedy decoding launches every step's kernels from Python.
    # Estimated 15-25 s with compilation.
    "gpu": dict(b=(8,), n=(64,), gen_n=(16,), models=MODELS, budget_s=0.05),
}
IMPLS = ("tfm", "torch")
SMOKE_SMALL = dict(d_model=16, n_heads=2, d_ff=32, src_vocab=31, tgt_vocab=37, n_encoder_layers=1,
                   n_decoder_layers=1)


def arg_parser():
    return parser(NAME, __doc__, GRIDS)


def cases(grid: str) -> list[dict]:
    g = GRIDS[grid]
    return [{"model": m, "impl": impl, "mode": mode, "b": b, "n": n}
            for m in g["models"] for mode in ("forward", "generate") for b in g["b"]
            for n in (g["n"] if mode == "forward" else g["gen_n"]) for impl in IMPLS]


def _small(grid):
    from tfm import TransformerConfig

    return TransformerConfig.small(**(SMOKE_SMALL if grid == "smoke" else {}))


def transformer_config(model: str, grid: str):
    from tfm import TransformerConfig

    return TransformerConfig.base() if model == "transformer_base" else _small(grid)


def baseline_model(model: str, grid: str, backend: str):
    """An LSTMSeq2Seq / ConvS2S at the small Transformer's width, depth and vocabularies."""
    import tfm

    cls = getattr(tfm, "LSTMSeq2Seq" if model == "lstm_seq2seq" else "ConvS2S", None)
    if cls is None:
        raise ImportError(f"tfm.{'LSTMSeq2Seq' if model == 'lstm_seq2seq' else 'ConvS2S'} is not available yet")
    ref = _small(grid)
    want = {"d_model": ref.d_model, "src_vocab": ref.src_vocab, "tgt_vocab": ref.tgt_vocab, "max_len": ref.max_len,
            "n_layers": ref.n_encoder_layers, "n_encoder_layers": ref.n_encoder_layers,
            "n_decoder_layers": ref.n_decoder_layers, "num_layers": ref.n_encoder_layers, "dtype": "float32"}
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    config = cls.config_class(**{k: v for k, v in want.items() if k in names})
    return cls(config, seed=0, backend=backend), config


class TorchTransformer:
    """nn.Embedding + sinusoidal PE + nn.Transformer + generator, same shapes as tfm.Transformer."""

    def __init__(self, c, device: str = "cpu"):
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.torch, self.c, self.device = torch, c, device
        self.src_emb, self.tgt_emb = nn.Embedding(c.src_vocab, c.d_model), nn.Embedding(c.tgt_vocab, c.d_model)
        self.core = nn.Transformer(c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff,
                                   dropout=0.0, batch_first=True).eval()
        self.gen = nn.Linear(c.d_model, c.tgt_vocab, bias=False)
        for m in (self.src_emb, self.tgt_emb, self.core, self.gen):
            m.to(device)
        pos = torch.arange(c.max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, c.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / c.d_model))
        pe = torch.zeros(c.max_len, c.d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.pe = pe.to(device)
        self.scale = math.sqrt(c.d_model)

    def _embed(self, emb, ids):
        return emb(ids) * self.scale + self.pe[: ids.shape[1]]

    def _mask(self, n):
        return self.core.generate_square_subsequent_mask(n, device=self.device)

    def forward(self, src, tgt):
        with self.torch.inference_mode():
            y = self.core(self._embed(self.src_emb, src), self._embed(self.tgt_emb, tgt), tgt_mask=self._mask(tgt.shape[1]),
                          tgt_is_causal=True)
            return self.gen(y).cpu()

    def generate(self, src, n_new):
        t = self.torch
        with t.inference_mode():
            memory = self.core.encoder(self._embed(self.src_emb, src))
            out = t.ones((src.shape[0], 1), dtype=t.long, device=self.device)
            for _ in range(n_new):
                y = self.core.decoder(self._embed(self.tgt_emb, out), memory, tgt_mask=self._mask(out.shape[1]),
                                      tgt_is_causal=True)
                out = t.cat([out, self.gen(y[:, -1:]).argmax(-1)], dim=1)
            return out.cpu()


class TorchLSTMSeq2Seq:
    """nn.LSTM encoder/decoder stacks with Luong (dot) attention and a generator."""

    def __init__(self, c, device: str = "cpu"):
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.torch, self.device = torch, device
        self.src_emb, self.tgt_emb = nn.Embedding(c.src_vocab, c.d_model), nn.Embedding(c.tgt_vocab, c.d_model)
        self.enc = nn.LSTM(c.d_model, c.d_model, c.n_encoder_layers, batch_first=True)
        self.dec = nn.LSTM(c.d_model, c.d_model, c.n_decoder_layers, batch_first=True)
        self.comb = nn.Linear(2 * c.d_model, c.d_model)
        self.gen = nn.Linear(c.d_model, c.tgt_vocab)
        for m in (self.src_emb, self.tgt_emb, self.enc, self.dec, self.comb, self.gen):
            m.to(device)

    def _step(self, y, memory):
        t = self.torch
        att = t.softmax(y @ memory.transpose(1, 2), dim=-1) @ memory
        return self.gen(t.tanh(self.comb(t.cat([y, att], dim=-1))))

    def forward(self, src, tgt):
        with self.torch.inference_mode():
            memory, state = self.enc(self.src_emb(src))
            y, _ = self.dec(self.tgt_emb(tgt), state)
            return self._step(y, memory).cpu()

    def generate(self, src, n_new):
        t = self.torch
        with t.inference_mode():
            memory, state = self.enc(self.src_emb(src))
            tok = t.ones((src.shape[0], 1), dtype=t.long, device=self.device)
            out = [tok]
            for _ in range(n_new):
                y, state = self.dec(self.tgt_emb(tok), state)
                tok = self._step(y, memory).argmax(-1)
                out.append(tok)
            return t.cat(out, dim=1).cpu()


def measure(case: dict, ctx) -> dict:
    from tfm.backends import get_backend
    from tfm.bench import Skip

    from ._torch import peer as torch_peer

    model, impl, mode, b, n = case["model"], case["impl"], case["mode"], case["b"], case["n"]
    grid, backend = ctx.options["grid"], ctx.options["backend"]
    if model.startswith("transformer"):
        config = transformer_config(model, grid)
    elif impl == "tfm":
        tfm_model, config = baseline_model(model, grid, backend)
    else:
        config = _small(grid)
    rng = np.random.default_rng(0)
    src = rng.integers(3, config.src_vocab, size=(b, n))
    tgt = rng.integers(3, config.tgt_vocab, size=(b, n))
    if impl == "tfm":
        if model.startswith("transformer"):
            import tfm

            tfm_model = tfm.Transformer(config, seed=0, backend=backend)
        if mode == "forward":
            run = lambda: tfm_model.forward(src, tgt)  # noqa: E731
        else:
            run = lambda: tfm_model.generate(src, max_new_tokens=n, bos_id=1)  # noqa: E731
        label, sync = f"tfm {backend}", get_backend(backend).synchronize
    else:
        tp = torch_peer(backend)
        if model == "convs2s":
            raise Skip("no PyTorch implementation of ConvS2S in this project (torch has no such module)")
        net = (TorchTransformer if model.startswith("transformer") else TorchLSTMSeq2Seq)(config, tp.device)
        s, t = tp.tensor(src), tp.tensor(tgt)
        run = (lambda: net.forward(s, t)) if mode == "forward" else (lambda: net.generate(s, n))
        label, sync = tp.label, tp.sync
    timing = ctx.time(run, sync)
    return {"backend": label, "d_model": config.d_model, "time_s": timing.median_s, **timing.as_row(),
            "tokens_per_s": b * 2 * n / timing.median_s}


def build(args):
    grid = grid_name(args)
    return make_study(sys.modules[__name__], cases(grid), measure, args, budget_s=GRIDS[grid]["budget_s"])


# ----------------------------------------------------------------------------- derived
def tokens(df) -> pd.DataFrame:
    """tokens/s of tfm and PyTorch side by side per (model, mode, b, n), with their ratio."""
    good = ok(df)
    if good.empty:
        return pd.DataFrame(columns=["model", "mode", "b", "n", "d_model", "tfm", "torch", "tfm/torch"])
    t = good.pivot_table(index=["model", "mode", "b", "n", "d_model"], columns="impl",
                         values="tokens_per_s").reset_index()
    t.columns.name = None
    for impl in IMPLS:
        if impl not in t.columns:
            t[impl] = np.nan
    t["tfm/torch"] = t["tfm"] / t["torch"]
    return t


DERIVED = {"throughput_tokens": tokens}


# ----------------------------------------------------------------------------- figures
def plot_tokens(df, on: str):
    import matplotlib.pyplot as plt

    modes = ("forward", "generate")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, mode in zip(axes, modes):
        sub = df[df["mode"] == mode].copy()
        if sub.empty:
            ax.set_visible(False)
            continue
        sub["label"] = sub.apply(lambda r: f"{r['model']}\nb={r['b']} n={r['n']}", axis=1)
        labels = list(dict.fromkeys(sub["label"]))
        x = np.arange(len(labels))
        for i, impl in enumerate(IMPLS):
            vals = [sub[(sub["label"] == lab) & (sub["impl"] == impl)]["tokens_per_s"] for lab in labels]
            ax.bar(x + (i - 0.5) * 0.4, [v.iloc[0] if len(v) else np.nan for v in vals], 0.4, label=impl)
        ax.set_xticks(x, labels, rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set(ylabel="source + target tokens per second",
               title=f"{mode} ({'teacher-forced' if mode == 'forward' else 'greedy, cached'})")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Whole-model throughput, float32 ({on})")
    return fig


FIGURES = {"throughput": plot_tokens}


# ----------------------------------------------------------------------------- report
INTRO = prose("""
    Source + target tokens per second (b * 2n / median time), float32, batch b, n source tokens and
    n target tokens (teacher-forced) or n generated tokens (greedy with the cache; PyTorch's
    nn.Transformer has no cache, so its greedy loop re-runs the decoder over the prefix). Both sides
    return their output to the host; PyTorch runs on the same device (TF32 off on a GPU). The
    geometric mean is over the cases with both sides measured.
""")


def results(rep, rows, suffix: str) -> str:
    from ._report import md_table

    t = tokens(rows)
    s = rep.figure("throughput" + suffix, "throughput") + md_table(t) + "\n"
    lines = []
    for mode, sub in t.groupby("mode"):
        top = sub[(sub["b"] == sub["b"].max()) & (sub["n"] == sub["n"].max())].dropna(subset=["tfm"])
        if not top.empty:
            best = top.sort_values("tfm").iloc[-1]
            lines.append(f"- {mode}, b={int(best['b'])}, n={int(best['n'])}: the fastest tfm model is {best['model']} "
                         f"({best['tfm']:.3g} tokens/s)")
        r = sub["tfm/torch"].dropna()
        if not r.empty:
            lines.append(f"- {mode}: tfm tokens/s over PyTorch's, geometric mean {math.exp(np.log(r).mean()):.2f} "
                         f"over {len(r)} cases (range {r.min():.2f}..{r.max():.2f})")
    return s + ("\n".join(lines) + "\n\n" if lines else "")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
