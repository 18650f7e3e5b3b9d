"""Flax ESM (``EsmForMaskedLM``: ESM-2, and ESM-1b's learned positions) with the
MLM head applied only where asked.

Pre-LayerNorm layers, a final LayerNorm (``emb_layer_norm_after``), exact GELU,
and the RoBERTa-style head (dense, GELU, LayerNorm, decoder tied to the word
embeddings, bias). ESM-2 rotates queries and keys (positions 0..L-1) after
scaling the queries by 1/sqrt(head size), in that order, as the original ESM
code does. The rotary frequencies are a parameter, ``rotary_inv_freq``, read
from the checkpoint when it stores them (transformers uses the stored values)
and computed from ``rope_theta`` otherwise.

Token dropout (``token_dropout``): ESM was trained with [MASK] embeddings zeroed;
at inference transformers zeroes them too and scales every embedding by
(1 - 0.15 * 0.8) / (1 - m), m = the row's [MASK] count over its unpadded length.
Embeddings at padded positions are then zeroed.

As in ``bert.py``, only the rows the head reads leave the last layer. Precision:
the residual stream is float32, ``dtype`` is the compute dtype of the matrix
products; LayerNorm statistics, rotation, softmax and logits are float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxjoint.models import rotary
from jaxjoint.models.bert import position_ids
from jaxjoint.models.config import EsmEncoderConfig
from jaxjoint.models.layers import ACTIVATIONS, INIT, Dense, LayerNorm, attend, attention_bias, gather_rows
from jaxjoint.models.precision import MatmulPrecision

Dtype = Any
# The fraction of tokens masked in every ESM training run (15% selected, 80% of those masked).
TRAINING_MASK_RATIO = 0.15 * 0.8
_gelu = ACTIVATIONS["gelu"]


class EsmAttention(nn.Module):
    config: EsmEncoderConfig
    dtype: Dtype
    precision: MatmulPrecision

    @nn.compact
    def __call__(
        self, h: jax.Array, key_valid: jax.Array, positions: jax.Array | None, inv_freq: jax.Array | None
    ) -> jax.Array:
        """h: [B, L, H] (normed rows); key_valid: bool[B, L]; positions: int[B, K] or
        None; inv_freq: float32[D/2] (rotary) or None. Returns [B, Q, H]."""
        c = self.config
        batch, length, _ = h.shape

        def heads(name: str, rows: jax.Array) -> jax.Array:
            return Dense(c.hidden_size, True, self.dtype, self.precision, name=name)(rows).reshape(
                batch, rows.shape[1], c.num_heads, c.head_dim)

        queries = h if positions is None else gather_rows(h, positions)
        q = heads("query", queries) * jnp.asarray(c.head_dim**-0.5, self.dtype)
        k, v = heads("key", h), heads("value", h)
        if inv_freq is not None:
            key_pos = jnp.arange(length)
            q = rotary.rotate(q, key_pos if positions is None else positions, inv_freq)
            k = rotary.rotate(k, key_pos, inv_freq)
        ctx = attend(q, k, v, attention_bias(key_valid), 1.0, self.dtype, self.precision)
        return Dense(c.hidden_size, True, self.dtype, self.precision, name="out")(ctx)


class EsmLayer(nn.Module):
    config: EsmEncoderConfig
    dtype: Dtype
    precision: MatmulPrecision

    @nn.compact
    def __call__(
        self, x: jax.Array, key_valid: jax.Array, inv_freq: jax.Array | None, positions: jax.Array | None = None
    ) -> jax.Array:
        """x: float32[B, L, H]; returns float32[B, L, H], or [B, K, H] at ``positions``
        (keys and values from every row, queries and feed-forward at K rows)."""
        c = self.config
        norm = lambda name: LayerNorm(c.layer_norm_eps, self.dtype, name=name)  # noqa: E731
        residual = x if positions is None else gather_rows(x, positions)
        dense = lambda features, name: Dense(features, True, self.dtype, self.precision, name=name)  # noqa: E731
        x = residual + EsmAttention(c, self.dtype, self.precision, name="attention")(
            norm("attention_norm")(x), key_valid, positions, inv_freq)
        h = _gelu(dense(c.intermediate_size, "mlp_in")(norm("mlp_norm")(x)))
        return x + dense(c.hidden_size, "mlp_out")(h)


class EsmMaskedLM(nn.Module):
    """Encoder plus MLM head. ``__call__`` returns logits only at ``positions``."""

    config: EsmEncoderConfig
    dtype: Dtype = jnp.float32
    precision: MatmulPrecision = MatmulPrecision()

    def setup(self) -> None:
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=INIT)
        if c.rotary:
            frequencies = rotary.inverse_frequencies(c.head_dim, c.rope_theta)
            self.rotary_inv_freq = self.param(
                "rotary_inv_freq", lambda _key, shape: jnp.asarray(frequencies), frequencies.shape)
        else:
            self.position_embeddings = nn.Embed(c.max_positions, c.hidden_size, embedding_init=INIT)
        if c.emb_layer_norm_before:
            self.embeddings_norm = LayerNorm(c.layer_norm_eps, jnp.float32)
        # Flax names these layers_0, layers_1, ...
        self.layers = [EsmLayer(c, self.dtype, self.precision) for _ in range(c.num_layers)]
        self.final_norm = LayerNorm(c.layer_norm_eps, self.dtype)
        self.head_transform = Dense(c.hidden_size, True, self.dtype, self.precision)
        self.head_norm = LayerNorm(c.layer_norm_eps, self.dtype)
        self.head_bias = self.param("head_bias", nn.initializers.zeros, (c.vocab_size,), jnp.float32)
        if not c.tie_word_embeddings:
            self.head_decoder = self.param("head_decoder", INIT, (c.vocab_size, c.hidden_size), jnp.float32)

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """int[B, L], int[B, L] -> float32[B, L, H], the input of layer 0."""
        c = self.config
        x = self.word_embeddings(input_ids)
        if c.token_dropout:
            is_mask = input_ids == c.mask_token_id
            x = jnp.where(is_mask[..., None], 0.0, x)
            observed = is_mask.sum(-1).astype(jnp.float32) / attention_mask.sum(-1).astype(jnp.float32)
            x = x * jnp.float32(1 - TRAINING_MASK_RATIO) / (1 - observed)[:, None, None]
        if not c.rotary:
            x = x + self.position_embeddings(position_ids(c, input_ids, attention_mask))
        if c.emb_layer_norm_before:
            x = self.embeddings_norm(x)
        return x * attention_mask[..., None].astype(x.dtype)

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array | None = None
    ) -> jax.Array:
        """input_ids, attention_mask: int[B, L] -> final hidden states [B, L, H]
        (compute dtype), or [B, K, H] at ``positions`` int[B, K] only."""
        inv_freq = self.rotary_inv_freq if self.config.rotary else None
        x = self.embed(input_ids, attention_mask)
        key_valid = attention_mask > 0
        for layer in self.layers[:-1]:
            x = layer(x, key_valid, inv_freq)
        return self.final_norm(self.layers[-1](x, key_valid, inv_freq, positions))

    def head(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., H] -> float32[..., V] logits."""
        h = self.head_norm(_gelu(self.head_transform(hidden)))
        decoder = self.word_embeddings.embedding if self.config.tie_word_embeddings else self.head_decoder
        logits = self.precision.einsum("...e,ve->...v", h, decoder.astype(self.dtype),
                                       preferred_element_type=jnp.float32)
        return logits + self.head_bias

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array) -> jax.Array:
        """input_ids, attention_mask: int[B, L]; positions: int[B, K] -> float32[B, K, V]."""
        return self.head(self.encode(input_ids, attention_mask, positions))
