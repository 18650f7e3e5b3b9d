"""Rotary position embeddings as ModernBERT and ESM-2 apply them.

The "rotate half" form: a head vector x of even size D is split into halves
(x1, x2); position p with frequencies f (D/2 of them) turns it into
``x * cos(p f, p f) + (-x2, x1) * sin(p f, p f)``. The rotation is computed in
float32 and the result cast back to the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """float32[head_dim / 2]: ``1 / theta^(2i / head_dim)``, computed in float32
    as the PyTorch models compute it."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def rotate(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, N, heads, D] at positions int[B, N] (or int[N]); inv_freq: float32[D/2].
    Returns x rotated, same shape and dtype."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, N, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [B, N, 1, D]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    turned = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + turned * jnp.sin(angles)).astype(x.dtype)
