"""Counted floating-point operations of the MLM forward pass (matrix products only).

A multiply-add counts as 2 FLOPs. Elementwise work (softmax, GELU, LayerNorm,
rotary rotation, ESM's token-dropout scaling) is left out, as in the usual MFU
accounting: it is under 1% for BERT shapes. The counts are of the work jaxjoint
runs: the last layer computes queries and the feed-forward block only at the
positions the head reads (every family's module does this).

Family differences: ModernBERT's GeGLU input projection is twice as wide
(2 x intermediate_size: the value and the gate halves); its fused Wqkv costs what
separate Q, K, V projections cost. ModernBERT's sliding-window layers compute
the full L x L attention scores and mask those outside the window, so they are
counted like global layers: this is what runs, not the band a windowed kernel
would compute. ESM's layers cost what BERT's do.
"""

from __future__ import annotations

from jaxjoint.models.config import EncoderConfig


def layer_flops(config: EncoderConfig, length: int, queries: int | None = None) -> int:
    """One encoder layer on one sequence of ``length`` tokens, of which ``queries``
    (default all) attend and go through the feed-forward block."""
    h, i, n = config.hidden_size, config.intermediate_size, length
    q = n if queries is None else queries
    projections = 2 * q * h * h + 2 * n * h * (2 * h)  # query; key, value
    attention = 2 * (2 * q * n * h)  # scores and the probability-weighted values, all L keys
    output = 2 * q * h * h
    mlp_in = 2 * i if config.family == "modernbert" else i  # GeGLU: value and gate
    mlp = 2 * q * h * mlp_in + 2 * q * i * h
    return projections + attention + output + mlp


def encoder_flops(config: EncoderConfig, length: int, queries: int | None = None) -> int:
    """All layers, plus ELECTRA's embedding projection, for one sequence; the last
    layer at ``queries`` rows (default all ``length``)."""
    project = 2 * length * config.embedding_size * config.hidden_size if (
        config.embedding_size != config.hidden_size) else 0
    return (project + (config.num_layers - 1) * layer_flops(config, length)
            + layer_flops(config, length, queries))


def head_flops(config: EncoderConfig, positions: int = 1) -> int:
    """The MLM head (transform + V x E decoder) at ``positions`` positions."""
    e = config.embedding_size
    return positions * (2 * config.hidden_size * e + 2 * e * config.vocab_size)


def sequence_flops(config: EncoderConfig, length: int, positions: int = 1) -> int:
    """One forward pass of ``length`` tokens with logits at ``positions`` positions."""
    return encoder_flops(config, length, positions) + head_flops(config, positions)


def pair_flops(config: EncoderConfig, length: int) -> int:
    """The tables stage for one pair: 2·V passes with logits at one position, one
    pass with logits at two. ``length`` is the length actually run (the bucket)."""
    return 2 * config.vocab_size * sequence_flops(config, length) + sequence_flops(config, length, 2)
