"""Study 5: throughput of whole models, tfm's backends beside PyTorch's CPU implementation.

Models: the Transformer at the paper's base config and at the small preset, and the
baselines (LSTM seq2seq, ConvS2S) at the small preset's width and depth. Modes: the
teacher-forced forward pass (source n tokens, target n tokens) and greedy generation with
the cache (source n tokens, n new tokens). Throughput is (source + target) tokens per
second: b * 2n / time. PyTorch peers run the same architecture with random weights: the
Transformer as nn.Embedding + sinusoidal PE + nn.Transformer + a linear generator, its
greedy loop re-running the decoder over the prefix (nn.Transformer has no KV cache); the
LSTM seq2seq as nn.LSTM encoder/decoder stacks with dot-product (Luong) attention.
ConvS2S has no PyTorch implementation here (NaN rows say so).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from ._common import grid_name, ok, parser, run_main, savefig

NAME = "throughput"
MODELS = ("transformer_base", "transformer_small", "lstm_seq2seq", "convs2s")
GRIDS = {  # n: forward lengths; gen_n: generation lengths (greedy decoding is the slow mode)
    "default": dict(b=(1, 8), n=(16, 64), gen_n=(16,), models=MODELS, budget_s=0.5),
    "quick": dict(b=(1, 4), n=(16,), gen_n=(16,), models=("transformer_small", "lstm_seq2seq", "convs2s"),
                  budget_s=0.05),
    "smoke": dict(b=(2,), n=(8,), gen_n=(8,), models=("transformer_small", "lstm_seq2seq", "convs2s"), budget_s=0.01),
}
IMPLS = ("tfm", "torch")
SMOKE_SMALL = dict(d_model=32, n_heads=4, d_ff=64, src_vocab=101, tgt_vocab=103)


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

    def __init__(self, c):
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.torch, self.c = torch, c
        self.src_emb, self.tgt_emb = nn.Embedding(c.src_vocab, c.d_model), nn.Embedding(c.tgt_vocab, c.d_model)
        self.core = nn.Transformer(c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff,
                                   dropout=0.0, batch_first=True).eval()
        self.gen = nn.Linear(c.d_model, c.tgt_vocab, bias=False)
        pos = torch.arange(c.max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, c.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / c.d_model))
        self.pe = torch.zeros(c.max_len, c.d_model)
        self.pe[:, 0::2], self.pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.scale = math.sqrt(c.d_model)

    def _embed(self, emb, ids):
        return emb(ids) * self.scale + self.pe[: ids.shape[1]]

    def forward(self, src, tgt):
        with self.torch.inference_mode():
            n = tgt.shape[1]
            mask = self.core.generate_square_subsequent_mask(n)
            y = self.core(self._embed(self.src_emb, src), self._embed(self.tgt_emb, tgt), tgt_mask=mask,
                          tgt_is_causal=True)
            return self.gen(y)

    def generate(self, src, n_new):
        t = self.torch
        with t.inference_mode():
            memory = self.core.encoder(self._embed(self.src_emb, src))
            out = t.ones((src.shape[0], 1), dtype=t.long)
            for _ in range(n_new):
                mask = self.core.generate_square_subsequent_mask(out.shape[1])
                y = self.core.decoder(self._embed(self.tgt_emb, out), memory, tgt_mask=mask, tgt_is_causal=True)
                out = t.cat([out, self.gen(y[:, -1:]).argmax(-1)], dim=1)
            return out


class TorchLSTMSeq2Seq:
    """nn.LSTM encoder/decoder stacks with Luong (dot) attention and a generator."""

    def __init__(self, c):
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.torch = torch
        self.src_emb, self.tgt_emb = nn.Embedding(c.src_vocab, c.d_model), nn.Embedding(c.tgt_vocab, c.d_model)
        self.enc = nn.LSTM(c.d_model, c.d_model, c.n_encoder_layers, batch_first=True)
        self.dec = nn.LSTM(c.d_model, c.d_model, c.n_decoder_layers, batch_first=True)
        self.comb = nn.Linear(2 * c.d_model, c.d_model)
        self.gen = nn.Linear(c.d_model, c.tgt_vocab)

    def _step(self, y, memory):
        t = self.torch
        att = t.softmax(y @ memory.transpose(1, 2), dim=-1) @ memory
        return self.gen(t.tanh(self.comb(t.cat([y, att], dim=-1))))

    def forward(self, src, tgt):
        with self.torch.inference_mode():
            memory, state = self.enc(self.src_emb(src))
            y, _ = self.dec(self.tgt_emb(tgt), state)
            return self._step(y, memory)

    def generate(self, src, n_new):
        t = self.torch
        with t.inference_mode():
            memory, state = self.enc(self.src_emb(src))
            tok = t.ones((src.shape[0], 1), dtype=t.long)
            out = [tok]
            for _ in range(n_new):
                y, state = self.dec(self.tgt_emb(tok), state)
                tok = self._step(y, memory).argmax(-1)
                out.append(tok)
            return t.cat(out, dim=1)


def measure(case: dict, ctx) -> dict:
    from tfm.bench import Skip

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
        label = f"tfm {backend}"
    else:
        try:
            import torch
        except ImportError as exc:
            raise Skip(f"PyTorch is not installed: {exc}") from None
        if model == "convs2s":
            raise Skip("no PyTorch implementation of ConvS2S in this project (torch has no such module)")
        import numba

        torch.set_num_threads(numba.get_num_threads())
        peer = TorchTransformer(config) if model.startswith("transformer") else TorchLSTMSeq2Seq(config)
        s, t = torch.from_numpy(src), torch.from_numpy(tgt)
        run = (lambda: peer.forward(s, t)) if mode == "forward" else (lambda: peer.generate(s, n))
        label = f"torch {torch.__version__} cpu"
    timing = ctx.time(run)
    return {"backend": label, "d_model": config.d_model, "time_s": timing.median_s, **timing.as_row(),
            "tokens_per_s": b * 2 * n / timing.median_s}


def build(args):
    from tfm.bench import Study

    grid = grid_name(args)
    g = GRIDS[grid]
    return Study(NAME, "Whole-model throughput", cases(grid), measure, budget_s=g["budget_s"],
                 options={"backend": args.backend, "grid": grid})


def plot(df, out):
    import matplotlib.pyplot as plt

    good = ok(df)
    if good.empty:
        return
    modes = ("forward", "generate")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, mode in zip(axes, modes):
        sub = good[good["mode"] == mode].copy()
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
        ax.set(ylabel="source + target tokens per second", title=f"{mode} ({'teacher-forced' if mode == 'forward' else 'greedy, cached'})")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend()
    savefig(fig, out, "throughput")


def main(argv=None):
    return run_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
