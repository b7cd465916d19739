"""Cost models against brute-force counts: the FLOPs behind every GFLOP/s figure."""

import numpy as np
import pytest

from tfm import TransformerConfig, cost
from tfm.reference.baselines import restricted_window


@pytest.mark.parametrize("nq,nk", [(1, 1), (37, 37), (5, 97), (97, 5), (64, 64)])
def test_causal_pairs_counts_visible_entries(nq, nk):
    visible = np.tril(np.ones((nq, nk), dtype=bool)).sum()
    assert cost.causal_pairs(nq, nk) == visible


@pytest.mark.parametrize("n,window,causal", [(1, 1, False), (37, 5, False), (37, 4, False),
                                             (37, 5, True), (10, 100, False), (10, 100, True)])
def test_restricted_pairs_match_reference_window(n, window, causal):
    assert cost.restricted_pairs(n, window, causal) == restricted_window(n, n, window, causal).sum()


def test_attention_flops_is_two_matmuls_and_halves_for_causal():
    full = cost.flops("attention", b=2, h=3, nq=128, nk=128, dk=64)
    assert full == 4 * 2 * 3 * 128 * 128 * 64
    causal = cost.flops("attention", b=2, h=3, nq=128, nk=128, dk=64, causal=True)
    assert causal / full == pytest.approx(129 / 256)
    # d_v != d_k: Q K^T costs 2 Nq Nk d_k, P V costs 2 Nq Nk d_v
    assert cost.flops("attention", b=1, h=1, nq=3, nk=5, dk=4, dv=6) == 2 * 3 * 5 * (4 + 6)


def test_linear_and_ffn_flops():
    assert cost.flops("linear", tokens=10, d_in=3, d_out=7, bias=False) == 2 * 10 * 3 * 7
    ffn = cost.flops("ffn", tokens=10, d_model=8, d_ff=32)
    assert ffn == 2 * (2 * 10 * 8 * 32) + 10 * 32 + 10 * 8 + 10 * 32


def test_recurrent_flops_scale_with_gates():
    kw = dict(b=4, n=100, d_in=64, d_hidden=64)
    rnn, gru, lstm = (cost.flops(op, **kw) for op in ("rnn", "gru", "lstm"))
    matmul = 2 * 4 * 100 * 128 * 64
    assert rnn == pytest.approx(matmul, rel=0.03)
    assert gru == pytest.approx(3 * matmul, rel=0.03)
    assert lstm == pytest.approx(4 * matmul, rel=0.03)


def test_transformer_forward_is_sum_of_layers():
    c = TransformerConfig.tiny()
    b, ns, nt = 2, 7, 5
    expect = (c.n_encoder_layers * cost.flops("encoder_layer", b=b, n=ns, d_model=c.d_model, h=c.n_heads, d_ff=c.d_ff)
              + c.n_decoder_layers * cost.flops("decoder_layer", b=b, n_tgt=nt, n_src=ns, d_model=c.d_model,
                                                h=c.n_heads, d_ff=c.d_ff)
              + 2 * b * nt * c.d_model * c.tgt_vocab)
    assert cost.flops("transformer_forward", config=c, b=b, n_src=ns, n_tgt=nt) == expect


def test_generation_costs_less_than_recomputing_every_prefix():
    c = TransformerConfig.small()
    cached = cost.flops("transformer_generate", config=c, b=1, n_src=32, n_new=32)
    uncached = sum(cost.flops("transformer_forward", config=c, b=1, n_src=32, n_tgt=t) for t in range(1, 33))
    assert cached < uncached / 4


def test_bytes_and_intensity():
    fused = cost.bytes_moved("attention", b=1, h=1, nq=1024, nk=1024, dk=64)
    naive = cost.bytes_moved("attention", b=1, h=1, nq=1024, nk=1024, dk=64, impl="naive")
    assert fused == 4 * 4 * 1024 * 64
    assert naive > 10 * fused  # the score matrix dominates the naive kernel's traffic
    assert cost.bytes_moved("linear", itemsize=8, tokens=1, d_in=2, d_out=3) == 8 * (2 + 6 + 3 + 3)
    assert cost.arithmetic_intensity("attention", b=1, h=1, nq=1024, nk=1024, dk=64) == pytest.approx(256.0)


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown op 'matmul'"):
        cost.flops("matmul", m=1)
    with pytest.raises(ValueError, match="unknown op"):
        cost.bytes_moved("transformer_forward")


# ----------------------------------------------------------------------------- training
def test_training_flops_backward_factors():
    att = dict(b=1, h=8, nq=256, nk=256, dk=64)
    assert cost.training_flops("attention", **att) == pytest.approx(3.5 * cost.flops("attention", **att))
    for op, dims in (("linear", dict(tokens=10, d_in=3, d_out=7)), ("lstm", dict(b=2, n=9, d_in=8, d_hidden=16)),
                     ("conv1d", dict(b=2, n_out=9, c_in=8, c_out=16, k=3)),
                     ("ffn", dict(tokens=10, d_model=8, d_ff=32))):
        assert cost.training_flops(op, **dims) == pytest.approx(3 * cost.flops(op, **dims)), op
    mha = dict(b=2, nq=9, nk=9, d_model=16, h=4, causal=True)
    core = cost.flops("attention", b=2, h=4, nq=9, nk=9, dk=4, causal=True)
    assert cost.training_flops("mha", **mha) == pytest.approx(3 * cost.flops("mha", **mha) + 0.5 * core)
    with pytest.raises(ValueError, match="inference only"):
        cost.training_flops("transformer_generate", config=TransformerConfig.tiny(), b=1, n_src=4, n_new=4)


def test_transformer_training_flops_count_every_attention_core():
    c = TransformerConfig.tiny()
    b, ns, nt = 2, 7, 5
    dk = c.d_model // c.n_heads
    cores = (c.n_encoder_layers * cost.flops("attention", b=b, h=c.n_heads, nq=ns, nk=ns, dk=dk)
             + c.n_decoder_layers * (cost.flops("attention", b=b, h=c.n_heads, nq=nt, nk=nt, dk=dk, causal=True)
                                     + cost.flops("attention", b=b, h=c.n_heads, nq=nt, nk=ns, dk=dk)))
    fwd = cost.flops("transformer_forward", config=c, b=b, n_src=ns, n_tgt=nt)
    assert cost.training_flops("transformer_forward", config=c, b=b, n_src=ns, n_tgt=nt) == \
        pytest.approx(3 * fwd + 0.5 * cores)


def test_baseline_model_flops_are_their_layers():
    from tfm import ConvS2SConfig, LSTMSeq2SeqConfig

    b, ns, nt = 3, 11, 6
    lc = LSTMSeq2SeqConfig.tiny(n_layers=3)
    d = lc.d_model
    lstms = 3 * (cost.flops("lstm", b=b, n=ns, d_in=d, d_hidden=d) + cost.flops("lstm", b=b, n=nt, d_in=d, d_hidden=d))
    got = cost.flops("lstm_seq2seq_forward", config=lc, b=b, n_src=ns, n_tgt=nt)
    head = (2 * b * nt * d * lc.tgt_vocab + 3 * 2 * b * nt * d * d + cost.flops("attention", b=b, h=1, nq=nt, nk=ns, dk=d))
    assert got - lstms == pytest.approx(head, rel=0.05)  # + biases and the activation
    cc = ConvS2SConfig.tiny()
    convs = cc.n_layers * (cost.flops("conv1d", b=b, n_out=ns, c_in=d, c_out=2 * d, k=cc.kernel_size)
                           + cost.flops("conv1d", b=b, n_out=nt, c_in=d, c_out=2 * d, k=cc.kernel_size))
    assert cost.flops("convs2s_forward", config=cc, b=b, n_src=ns, n_tgt=nt) > convs
    # training: 3x the forward, attention 3.5x
    att = cost.flops("attention", b=b, h=1, nq=nt, nk=ns, dk=d)
    assert cost.training_flops("lstm_seq2seq_forward", config=lc, b=b, n_src=ns, n_tgt=nt) == \
        pytest.approx(3 * got + 0.5 * att)


@pytest.mark.parametrize("config", ["transformer", "transformer_tied", "lstm", "convs2s"])
def test_parameters_equal_the_models(config):
    import tfm

    op, cfg, cls = {
        "transformer": ("transformer_forward", TransformerConfig.tiny(), tfm.Transformer),
        "transformer_tied": ("transformer_forward", TransformerConfig.tiny(final_norm=True, tie_embeddings=True),
                             tfm.Transformer),
        "lstm": ("lstm_seq2seq_forward", tfm.LSTMSeq2SeqConfig.tiny(n_layers=3), tfm.LSTMSeq2Seq),
        "convs2s": ("convs2s_forward", tfm.ConvS2SConfig.tiny(kernel_size=5), tfm.ConvS2S),
    }[config]
    assert cost.parameters(op, cfg) == cls(cfg, backend="numpy").n_params
    with pytest.raises(ValueError, match="unknown model"):
        cost.parameters("lstm", cfg)


def test_training_memory_naive_quadratic_fused_linear():
    def total(n, impl):
        return cost.training_memory("attention", b=1, h=1, nq=n, nk=n, dk=64, impl=impl)["total"]

    assert total(8192, "naive") / total(4096, "naive") == pytest.approx(4, rel=0.05)
    assert total(8192, "fused") / total(4096, "fused") == pytest.approx(2, rel=1e-9)
    m = cost.training_memory("attention", itemsize=8, b=2, h=3, nq=5, nk=7, dk=4, dv=6, impl="naive")
    assert m["saved"] == 8 * 2 * 3 * 5 * (6 + 1)
    assert m["gradients"] == 8 * 2 * 3 * (5 * 4 + 7 * 4 + 7 * 6)
    assert m["workspace"] == 8 * 2 * 2 * 3 * 5 * 7
    assert m["total"] == m["saved"] + m["gradients"] + m["workspace"]


def test_training_memory_of_layers_and_models_grows_linearly():
    from tfm import ConvS2SConfig, LSTMSeq2SeqConfig

    lstm = [cost.training_memory("lstm", b=2, n=n, d_in=8, d_hidden=8) for n in (100, 200)]
    assert lstm[0]["saved"] == 4 * (2 * 100 * 8 * 6 + 2 * 2 * 8)  # h, 4 gates, c per step; final h, c
    assert lstm[1]["workspace"] == 2 * lstm[0]["workspace"]
    c = TransformerConfig.small()
    for op, cfg in (("transformer_forward", c), ("lstm_seq2seq_forward", LSTMSeq2SeqConfig.tiny()),
                    ("convs2s_forward", ConvS2SConfig.tiny())):
        a, b = (cost.training_memory(op, config=cfg, b=4, n_src=n, n_tgt=n)["saved"] for n in (64, 128))
        assert b == pytest.approx(2 * a), op  # no (n, n) term: every attention is the fused kernel
        assert cost.training_memory(op, config=cfg, b=4, n_src=8, n_tgt=8, n_params=10)["gradients"] == 40
    with pytest.raises(ValueError, match="unknown op 'softmax' for training_memory"):
        cost.training_memory("softmax", rows=2, cols=3)
