"""Flax ModernBERT (``ModernBertForMaskedLM``) with the MLM head applied only where asked.

Pre-LayerNorm layers (layer 0 has no norm before its attention: the embedding
norm precedes it), one fused query/key/value projection, rotary positions with a
global and a local base, GeGLU feed-forward blocks, and attention that is global
on every ``global_attn_every_n_layers``-th layer and a sliding window elsewhere:
a query at position i sees the keys j with |i - j| <= ``local_window``. The
window is a mask over the full L x L scores (``jaxjoint.flops`` counts them all).
Position ids are 0..L-1 whatever the padding, as in transformers.

As in ``bert.py``, only the rows the head reads leave the last layer: its keys and
values use every row, its queries (rotated at their own positions, masked with
their own window) and its feed-forward block only those.

Precision: the residual stream is float32; ``dtype`` is the compute dtype of the
matrix products, ``precision`` their arithmetic. LayerNorm statistics, rotary rotation, the attention softmax and
the logits are float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxjoint.models import rotary
from jaxjoint.models.config import ModernBertEncoderConfig
from jaxjoint.models.layers import ACTIVATIONS, INIT, Dense, LayerNorm, attend, attention_bias, gather_rows
from jaxjoint.models.precision import MatmulPrecision

Dtype = Any


class ModernBertAttention(nn.Module):
    config: ModernBertEncoderConfig
    local: bool  # sliding-window layer
    dtype: Dtype
    precision: MatmulPrecision

    @nn.compact
    def __call__(self, h: jax.Array, key_valid: jax.Array, positions: jax.Array | None) -> jax.Array:
        """h: [B, L, H] (normed rows); key_valid: bool[B, L]; positions: int[B, K] or None.
        Returns [B, Q, H], Q = K rows at ``positions`` or all L rows."""
        c = self.config
        hidden, heads, d = c.hidden_size, c.num_heads, c.head_dim
        qkv = Dense(3 * hidden, c.attention_bias, self.dtype, self.precision, name="qkv")
        batch, length, _ = h.shape
        key_pos = jnp.arange(length)
        if positions is None:
            q, k, v = jnp.split(qkv(h), 3, axis=-1)
            query_pos = jnp.broadcast_to(key_pos, (batch, length))
        else:  # queries only at the read rows; keys and values at every row
            q = qkv(gather_rows(h, positions), slice(0, hidden))
            k, v = jnp.split(qkv(h, slice(hidden, 3 * hidden)), 2, axis=-1)
            query_pos = positions
        inv_freq = rotary.inverse_frequencies(d, c.local_rope_theta if self.local else c.global_rope_theta)
        q = rotary.rotate(q.reshape(batch, -1, heads, d), query_pos, inv_freq)
        k = rotary.rotate(k.reshape(batch, length, heads, d), key_pos, inv_freq)
        v = v.reshape(batch, length, heads, d)
        bias = attention_bias(key_valid, query_pos, c.local_window if self.local else None)
        ctx = attend(q, k, v, bias, d**-0.5, self.dtype, self.precision)
        return Dense(hidden, c.attention_bias, self.dtype, self.precision, name="out")(ctx)


class ModernBertLayer(nn.Module):
    config: ModernBertEncoderConfig
    index: int
    dtype: Dtype
    precision: MatmulPrecision

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """x: float32[B, L, H]; key_valid: bool[B, L]; positions: int[B, K] or None.

        Returns float32[B, L, H], or [B, K, H] at ``positions`` only: every row
        still serves as a key and value, but only K rows are queries and go
        through the feed-forward block.
        """
        c = self.config
        norm = lambda name: LayerNorm(c.layer_norm_eps, self.dtype, c.norm_bias, name=name)  # noqa: E731
        h = x.astype(self.dtype) if self.index == 0 else norm("attention_norm")(x)
        residual = x if positions is None else gather_rows(x, positions)
        attention = ModernBertAttention(c, c.local_layers[self.index], self.dtype, self.precision, name="attention")
        x = residual + attention(h, key_valid, positions)
        dense = lambda features, name: Dense(features, c.mlp_bias, self.dtype, self.precision, name=name)  # noqa: E731
        value, gate = jnp.split(dense(2 * c.intermediate_size, "mlp_in")(norm("mlp_norm")(x)), 2, axis=-1)
        return x + dense(c.hidden_size, "mlp_out")(ACTIVATIONS[c.hidden_act](value) * gate)


class ModernBertMaskedLM(nn.Module):
    """Encoder plus MLM head. ``__call__`` returns logits only at ``positions``."""

    config: ModernBertEncoderConfig
    dtype: Dtype = jnp.float32
    precision: MatmulPrecision = MatmulPrecision()

    def setup(self) -> None:
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=INIT)
        # Its output starts the float32 residual stream.
        self.embeddings_norm = LayerNorm(c.layer_norm_eps, jnp.float32, c.norm_bias)
        # Flax names these layers_0, layers_1, ...
        self.layers = [ModernBertLayer(c, i, self.dtype, self.precision) for i in range(c.num_layers)]
        self.final_norm = LayerNorm(c.layer_norm_eps, self.dtype, c.norm_bias)
        self.head_transform = Dense(c.hidden_size, c.head_transform_bias, self.dtype, self.precision)
        self.head_norm = LayerNorm(c.layer_norm_eps, self.dtype, c.norm_bias)
        if c.decoder_bias:
            self.head_bias = self.param("head_bias", nn.initializers.zeros, (c.vocab_size,), jnp.float32)
        if not c.tie_word_embeddings:
            self.head_decoder = self.param("head_decoder", INIT, (c.vocab_size, c.hidden_size), jnp.float32)

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array | None = None
    ) -> jax.Array:
        """input_ids, attention_mask: int[B, L] -> final hidden states [B, L, H]
        (compute dtype), or [B, K, H] at ``positions`` int[B, K] only."""
        x = self.embeddings_norm(self.word_embeddings(input_ids))
        key_valid = attention_mask > 0
        for layer in self.layers[:-1]:
            x = layer(x, key_valid)
        return self.final_norm(self.layers[-1](x, key_valid, positions))

    def head(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., H] -> float32[..., V] logits."""
        c = self.config
        h = self.head_norm(ACTIVATIONS[c.head_act](self.head_transform(hidden)))
        decoder = self.word_embeddings.embedding if c.tie_word_embeddings else self.head_decoder
        logits = self.precision.einsum("...e,ve->...v", h, decoder.astype(self.dtype),
                                       preferred_element_type=jnp.float32)
        return logits + self.head_bias if c.decoder_bias else logits

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array) -> jax.Array:
        """input_ids, attention_mask: int[B, L]; positions: int[B, K] -> float32[B, K, V]."""
        return self.head(self.encode(input_ids, attention_mask, positions))
