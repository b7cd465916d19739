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
