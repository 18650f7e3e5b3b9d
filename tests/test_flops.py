"""FLOP counting against a hand count and against XLA's own count of the compiled forward."""

import functools

import jax
import jax.numpy as jnp
import pytest

from jaxjoint.flops import encoder_flops, head_flops, layer_flops, pair_flops, sequence_flops
from jaxjoint.models.config import EncoderConfig, encoder_config_from_hf
from jaxjoint.models.families import init_params, masked_lm_module


def ours_and_xla(config: EncoderConfig, positions: int, batch: int = 4, length: int = 32) -> tuple[int, float]:
    """Our count and XLA's cost analysis of the compiled forward pass of ``batch``
    sequences of ``length`` tokens with logits at ``positions`` rows each."""
    module = masked_lm_module(config)
    ids = jnp.ones((batch, length), jnp.int32)
    at = jnp.tile(jnp.arange(positions) * 5, (batch, 1))
    forward = jax.jit(lambda p, i: module.apply({"params": p}, i, jnp.ones_like(i), at))
    # Lowering needs only the parameters' shapes: random values would cost an eager
    # initialisation (seconds, op by op) and change no count.
    params = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
    cost = forward.lower(params, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return batch * sequence_flops(config, length, positions), cost["flops"]


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


@pytest.mark.parametrize("embedding, positions", [pytest.param(256, 1, marks=pytest.mark.slow), (128, 2)])
def test_count_matches_xla_cost_analysis(embedding, positions):
    """XLA's count includes elementwise work (GELU, softmax, LayerNorm), so it may
    exceed ours by a few percent at this width, never fall short."""
    config = EncoderConfig(
        family="electra" if embedding != 256 else "bert", vocab_size=1000, hidden_size=256,
        embedding_size=embedding, num_layers=2, num_heads=4, intermediate_size=1024,
        max_positions=64, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
    ours, xla = ours_and_xla(config, positions)
    assert ours <= xla <= 1.06 * ours, (ours, xla)


# --- ModernBERT and ESM ----------------------------------------------------------------

MODERNBERT_BASE = encoder_config_from_hf(dict(
    model_type="modernbert", vocab_size=50368, hidden_size=768, intermediate_size=1152,
    num_hidden_layers=22, num_attention_heads=12, global_attn_every_n_layers=3, local_attention=128))
ESM2_650M = encoder_config_from_hf(dict(
    model_type="esm", vocab_size=33, hidden_size=1280, intermediate_size=5120, num_hidden_layers=33,
    num_attention_heads=20, position_embedding_type="rotary", token_dropout=True, mask_token_id=32))


def test_one_modernbert_base_layer_by_hand():
    # L = 32, H = 768, I = 1152; GeGLU's Wi is 768 -> 2 x 1152:
    #   Wqkv         2 * 32 * 768 * 2304 = 113,246,208
    #   QK^T, PV     2 * (2 * 32 * 32 * 768) = 3,145,728 (local layers too: masked, not skipped)
    #   Wo           2 * 32 * 768 * 768 = 37,748,736
    #   Wi           2 * 32 * 768 * 2304 = 113,246,208
    #   mlp Wo       2 * 32 * 1152 * 768 = 56,623,104
    assert layer_flops(MODERNBERT_BASE, 32) == (
        113_246_208 + 3_145_728 + 37_748_736 + 113_246_208 + 56_623_104)
    # The last layer at one query row:
    #   Q 2 * 768 * 768 = 1,179,648; K, V 2 * 32 * 768 * 1536 = 75,497,472;
    #   QK^T, PV 2 * (2 * 32 * 768) = 98,304; Wo 1,179,648;
    #   Wi 2 * 768 * 2304 = 3,538,944; mlp Wo 2 * 1152 * 768 = 1,769,472
    assert layer_flops(MODERNBERT_BASE, 32, queries=1) == (
        1_179_648 + 75_497_472 + 98_304 + 1_179_648 + 3_538_944 + 1_769_472)
    # head: dense 2 * 768 * 768 = 1,179,648; decoder 2 * 768 * 50368 = 77,365,248
    assert head_flops(MODERNBERT_BASE) == 1_179_648 + 77_365_248


def test_esm2_650m_by_hand():
    # H = 1280, I = 5120, L = 16, one query row in the last of 33 layers:
    #   full layer: QKV 2*16*1280*3840 = 157,286,400; QK^T, PV 2*(2*16*16*1280) = 1,310,720;
    #               out 2*16*1280*1280 = 52,428,800; MLP 2*(2*16*1280*5120) = 419,430,400
    #   last layer: Q 3,276,800; K, V 2*16*1280*2560 = 104,857,600; QK^T, PV 81,920;
    #               out 3,276,800; MLP 26,214,400
    #   head: 2*1280*1280 + 2*1280*33 = 3,276,800 + 84,480
    full = 157_286_400 + 1_310_720 + 52_428_800 + 419_430_400
    last = 3_276_800 + 104_857_600 + 81_920 + 3_276_800 + 26_214_400
    assert sequence_flops(ESM2_650M, 16) == 32 * full + last + 3_276_800 + 84_480
    assert pair_flops(ESM2_650M, 16) == 66 * sequence_flops(ESM2_650M, 16) + sequence_flops(ESM2_650M, 16, 2)


def test_full_pass_is_two_flops_per_parameter_and_token_plus_attention():
    """Without attention scores, every weight matrix is used once per token (one
    multiply-add): 2 x (non-embedding matrix parameters) x L, a count independent
    of layer_flops' per-matrix terms."""
    for config in (MODERNBERT_BASE, ESM2_650M):
        params = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
        matrices = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                       if path[0].key.startswith("layers_") and path[-1].key == "kernel")
        length, h = 32, config.hidden_size
        attention = config.num_layers * 2 * (2 * length * length * h)
        assert encoder_flops(config, length) == 2 * matrices * length + attention


@pytest.mark.slow
@pytest.mark.parametrize("family, positions", [("modernbert", 1), ("esm", 2)])
def test_modern_count_matches_xla_cost_analysis(family, positions):
    """As for BERT: XLA also counts the elementwise work (rotary, GELU, softmax,
    LayerNorm, masks), so it may exceed our count by a few percent, never fall short.
    ModernBERT: a global layer, then a local one (the trimmed last layer) whose window
    of 4 is shorter than the 32 tokens: the masked scores are computed and counted."""
    sizes = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4)
    hf = (dict(model_type="modernbert", intermediate_size=384, local_attention=8, global_attn_every_n_layers=2,
               pad_token_id=0, **sizes) if family == "modernbert" else
          dict(model_type="esm", intermediate_size=1024, position_embedding_type="rotary", token_dropout=True,
               mask_token_id=4, pad_token_id=1, **sizes))
    config = encoder_config_from_hf(hf)
    ours, xla = ours_and_xla(config, positions)
    assert ours <= xla <= 1.06 * ours, (ours, xla, xla / ours)
