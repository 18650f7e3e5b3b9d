"""FLOP counting against a hand count and against XLA's own count of the compiled forward."""

import jax
import jax.numpy as jnp
import pytest

from jaxjoint.flops import encoder_flops, head_flops, layer_flops, pair_flops, sequence_flops
from jaxjoint.models.bert import MaskedLMModule
from jaxjoint.models.config import EncoderConfig
from jaxjoint.models.mlm import random_params

BERT_BASE = EncoderConfig(
    family="bert", vocab_size=28996, hidden_size=768, embedding_size=768, num_layers=12,
    num_heads=12, intermediate_size=3072, max_positions=512, type_vocab_size=2,
    layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)


def test_one_bert_base_layer_by_hand():
    # L = 32, H = 768, I = 3072:
    #   Q, K, V      2 * 32 * 768 * 2304 = 113,246,208
    #   QK^T, PV     2 * (2 * 32 * 32 * 768) = 3,145,728
    #   output       2 * 32 * 768 * 768 = 37,748,736
    #   MLP          2 * (2 * 32 * 768 * 3072) = 301,989,888
    assert layer_flops(BERT_BASE, 32) == 113_246_208 + 3_145_728 + 37_748_736 + 301_989_888


def test_last_layer_at_one_query_by_hand():
    # L = 32, one query row (the masked position):
    #   Q            2 * 1 * 768 * 768 = 1,179,648
    #   K, V         2 * 32 * 768 * 1536 = 75,497,472
    #   QK^T, PV     2 * (2 * 1 * 32 * 768) = 98,304
    #   output       2 * 1 * 768 * 768 = 1,179,648
    #   MLP          2 * (2 * 1 * 768 * 3072) = 9,437,184
    assert layer_flops(BERT_BASE, 32, queries=1) == (
        1_179_648 + 75_497_472 + 98_304 + 1_179_648 + 9_437_184)


def test_head_by_hand():
    # transform 2 * 768 * 768 = 1,179,648; decoder 2 * 768 * 28996 = 44,537,856
    assert head_flops(BERT_BASE) == 1_179_648 + 44_537_856
    assert head_flops(BERT_BASE, 3) == 3 * (1_179_648 + 44_537_856)


def test_bert_base_sequence_matches_design_estimate():
    # DESIGN.md: about 5.5 GFLOP a sequence at 32 tokens (every layer at every
    # row), 0.32 PFLOP a pair. jaxjoint's last layer runs one query row, not 32:
    # 11 full layers of 456,130,560, the last of 87,392,256, the head 45,717,504.
    assert encoder_flops(BERT_BASE, 32) == pytest.approx(5.5e9, rel=0.01)
    assert 2 * 28996 * encoder_flops(BERT_BASE, 32) == pytest.approx(0.32e15, rel=0.02)
    per_pass = 11 * 456_130_560 + 87_392_256 + 45_717_504
    assert sequence_flops(BERT_BASE, 32) == per_pass
    assert pair_flops(BERT_BASE, 32) == 2 * 28996 * per_pass + sequence_flops(BERT_BASE, 32, 2)
    assert pair_flops(BERT_BASE, 32) == pytest.approx(0.299e15, rel=0.005)


@pytest.mark.parametrize("embedding, positions", [(256, 1), (128, 2)])
def test_count_matches_xla_cost_analysis(embedding, positions):
    """XLA's count includes elementwise work (GELU, softmax, LayerNorm), so it may
    exceed ours by a few percent at this width, never fall short."""
    config = EncoderConfig(
        family="electra" if embedding != 256 else "bert", vocab_size=1000, hidden_size=256,
        embedding_size=embedding, num_layers=2, num_heads=4, intermediate_size=1024,
        max_positions=64, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
    module = MaskedLMModule(config)
    params = random_params(config)
    b, length = 4, 32
    ids = jnp.ones((b, length), jnp.int32)
    at = jnp.tile(jnp.arange(positions) * 5, (b, 1))
    forward = jax.jit(lambda p, i: module.apply({"params": p}, i, jnp.ones_like(i), at))
    cost = forward.lower(params, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = b * sequence_flops(config, length, positions)
    assert ours <= cost["flops"] <= 1.06 * ours, (ours, cost["flops"])
