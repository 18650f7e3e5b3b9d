"""Counted floating-point operations of the MLM forward pass (matrix products only).

A multiply-add counts as 2 FLOPs. Elementwise work (softmax, GELU, LayerNorm) is
left out, as in the usual MFU accounting: it is under 1% for BERT shapes.
"""

from __future__ import annotations

from jaxjoint.models.config import EncoderConfig


def layer_flops(config: EncoderConfig, length: int) -> int:
    """One encoder layer on one sequence of ``length`` tokens."""
    h, i, n = config.hidden_size, config.intermediate_size, length
    projections = 2 * n * h * (3 * h)  # query, key, value
    attention = 2 * (2 * n * n * h)  # scores and the probability-weighted values
    output = 2 * n * h * h
    mlp = 2 * (2 * n * h * i)
    return projections + attention + output + mlp


def encoder_flops(config: EncoderConfig, length: int) -> int:
    """All layers, plus ELECTRA's embedding projection, for one sequence."""
    project = 2 * length * config.embedding_size * config.hidden_size if (
        config.embedding_size != config.hidden_size) else 0
    return project + config.num_layers * layer_flops(config, length)


def head_flops(config: EncoderConfig, positions: int = 1) -> int:
    """The MLM head (transform + V x E decoder) at ``positions`` positions."""
    e = config.embedding_size
    return positions * (2 * config.hidden_size * e + 2 * e * config.vocab_size)


def pair_flops(config: EncoderConfig, length: int) -> int:
    """The tables stage for one pair: 2·V passes with the head at one position,
    one pass with the head at two. ``length`` is the length actually run (the bucket)."""
    v = config.vocab_size
    return 2 * v * (encoder_flops(config, length) + head_flops(config, 1)) + (
        encoder_flops(config, length) + head_flops(config, 2))
