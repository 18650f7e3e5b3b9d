"""The O(V) stage: the MLM's conditional tables for one pair of positions.

Filled in below: ``PairTables`` (the container every later stage reads).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairTables:
    """Unary conditionals of an MLM at positions A and B of one sentence.

    Indexing follows DESIGN.md: ``[a, b]``, a the token at A, b the token at B.
    ``V`` is the vocabulary size; ``Vp >= V`` is V padded to a multiple of the
    mesh size (``Vp == V`` without a mesh or when the mesh size divides V). Rows
    ``a >= V`` are padding: their raw logits are ``-inf`` and every log-probability
    view is ``-inf`` there, i.e. such an ``a`` has probability zero.

    Fields:
      logits_a: float32[Vp, V]; ``[a, b]`` = logit of a at A with A masked, B = b.
      logits_b: float32[Vp, V]; ``[a, b]`` = logit of b at B with B masked, A = a.
      both_masked_a: float32[Vp]; logits at A with A and B both masked.
      both_masked_b: float32[V]; logits at B with A and B both masked.
      vocab_size: V (static).
    On a mesh, ``logits_a``, ``logits_b`` and ``both_masked_a`` are sharded by rows.
    """

    logits_a: jax.Array
    logits_b: jax.Array
    both_masked_a: jax.Array
    both_masked_b: jax.Array
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def padded_vocab_size(self) -> int:
        return self.logits_a.shape[0]

    @property
    def row_valid(self) -> jax.Array:
        """bool[Vp]: True for real tokens a < V."""
        return jnp.arange(self.padded_vocab_size) < self.vocab_size

    @property
    def log_q_a(self) -> jax.Array:
        """float32[Vp, V]: ``log qA(a|b)``, log-softmax of ``logits_a`` over a (axis 0)."""
        return jax.nn.log_softmax(self.logits_a, axis=0)

    @property
    def log_q_b(self) -> jax.Array:
        """float32[Vp, V]: ``log qB(b|a)``, log-softmax of ``logits_b`` over b (axis 1)."""
        valid = self.row_valid[:, None]
        safe = jnp.where(valid, self.logits_b, 0.0)
        return jnp.where(valid, jax.nn.log_softmax(safe, axis=1), -jnp.inf)

    @property
    def log_m_a(self) -> jax.Array:
        """float32[Vp]: ``mA(a)``, log-softmax at A with both positions masked."""
        return jax.nn.log_softmax(self.both_masked_a)

    @property
    def log_m_b(self) -> jax.Array:
        """float32[V]: ``mB(b)``, log-softmax at B with both positions masked."""
        return jax.nn.log_softmax(self.both_masked_b)


def tables_from_logits(
    logits_a, logits_b, both_masked_a, both_masked_b, *, padded_vocab_size: int | None = None
) -> PairTables:
    """Wrap unpadded float[V, V], float[V, V], float[V], float[V] logits as ``PairTables``.

    Pads rows to ``padded_vocab_size`` with ``-inf``. For tests and for callers that
    computed the logits some other way; the model path is ``pair_tables``.
    """
    logits_a = jnp.asarray(logits_a, jnp.float32)
    v = logits_a.shape[1]
    vp = v if padded_vocab_size is None else padded_vocab_size
    pad = ((0, vp - v), (0, 0))
    return PairTables(
        logits_a=jnp.pad(logits_a, pad, constant_values=-jnp.inf),
        logits_b=jnp.pad(jnp.asarray(logits_b, jnp.float32), pad, constant_values=-jnp.inf),
        both_masked_a=jnp.pad(
            jnp.asarray(both_masked_a, jnp.float32), (0, vp - v), constant_values=-jnp.inf
        ),
        both_masked_b=jnp.asarray(both_masked_b, jnp.float32),
        vocab_size=v,
    )
