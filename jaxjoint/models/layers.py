"""Building blocks shared by the encoder families: LayerNorm, a dense layer whose
output columns can be computed in part, activations, and masked attention.

Precision: LayerNorm statistics and the attention softmax are float32 whatever
the compute dtype; parameters are float32 and cast to the compute dtype for the
matrix products, each computed in the arithmetic a ``MatmulPrecision`` names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxjoint.models.precision import MatmulPrecision

Dtype = Any
INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer range
# Added to the scores of masked keys. Finite, like the PyTorch models' additive
# masks, so a row whose keys are all masked stays finite (it attends uniformly).
MASKED = float(np.finfo(np.float32).min)

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class LayerNorm(nn.Module):
    """LayerNorm whose statistics are float32 whatever the compute dtype; the
    output is cast to ``dtype``. ``use_bias=False``: gain only (ModernBERT)."""

    eps: float
    dtype: Dtype
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return y.astype(self.dtype)


class Dense(nn.Module):
    """``x @ kernel + bias`` with float32 parameters and the product in ``dtype``,
    in ``precision``'s arithmetic.

    ``columns`` computes only that slice of the output features, so a fused
    projection (ModernBERT's Wqkv) can produce its queries for a few rows and its
    keys and values for all of them from one parameter.
    """

    features: int
    use_bias: bool
    dtype: Dtype
    precision: MatmulPrecision

    @nn.compact
    def __call__(self, x: jax.Array, columns: slice = slice(None)) -> jax.Array:
        """x: [..., D] -> [..., F], or [..., |columns|]."""
        kernel = self.param("kernel", INIT, (x.shape[-1], self.features), jnp.float32)
        y = self.precision.dot(x.astype(self.dtype), kernel[:, columns].astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias[columns].astype(self.dtype)
        return y


def attention_bias(
    key_valid: jax.Array, query_pos: jax.Array | None = None, window: int | None = None
) -> jax.Array:
    """Additive float32 mask of the attention scores.

    key_valid: bool[B, L], False at padding. Without ``window``: float32[B, 1, 1, L].
    With ``window``: also masks keys j farther than ``window`` from the query's
    position i (|i - j| > window); ``query_pos`` int[B, Q] (default: every row,
    Q = L) gives those positions, and the result is float32[B, 1, Q, L].
    """
    if window is None:
        return jnp.where(key_valid[:, None, None, :], 0.0, MASKED)
    length = key_valid.shape[1]
    keys = jnp.arange(length)
    if query_pos is None:
        query_pos = jnp.broadcast_to(keys, key_valid.shape)
    near = jnp.abs(query_pos[:, :, None] - keys[None, None, :]) <= window
    return jnp.where(key_valid[:, None, :] & near, 0.0, MASKED)[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float, dtype: Dtype,
           precision: MatmulPrecision) -> jax.Array:
    """Softmax attention. q: [B, Q, heads, D]; k, v: [B, L, heads, D]; bias:
    float32 broadcastable to [B, heads, Q, L]. Scores are ``scale * q.k + bias``
    in float32; returns the context [B, Q, heads * D] in ``dtype``. Both products
    in ``precision``'s arithmetic."""
    scores = precision.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * scale + bias, axis=-1).astype(dtype)
    ctx = precision.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype))
    return ctx.reshape(*q.shape[:2], -1)


def gather_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [B, L, ...], positions: int[B, K] -> [B, K, ...]."""
    index = positions.reshape(*positions.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)
