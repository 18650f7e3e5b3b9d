"""The chunk a run takes when none is given: the policy, beside the planner.

The tables stage (``jaxjoint.tables``) runs the chunk it is given; this module
chooses one, for ``MaskedLM.planned_chunk`` and ``FunctionMLM.planned_chunk``
(``pair_tables`` and ``iter_pair_tables`` with ``chunk_size=None``) and the run
layer:

- on devices that report their memory (GPU, TPU), the largest chunk whose compiled
  tables programs fit beside the queued pairs' tables (``fit.run_chunk``), so the
  V x V tables are budgeted, not only the activations;
- elsewhere (CPU), a fixed activation budget (``DEFAULT_CPU_BUDGET_BYTES``) for a
  checkpoint, ``OWN_MODEL_CPU_CHUNK`` sequences for your own model; nothing compiled.
"""

from __future__ import annotations

import functools

from jax.sharding import Mesh

from jaxjoint.errors import UserError
from jaxjoint.models.config import EncoderConfig
from jaxjoint.models.protocol import MLMProtocol
from jaxjoint.plan.fit import run_chunk
from jaxjoint.plan.models import OwnModel, PlannedModel, own_model
from jaxjoint.sharding import mesh_memory_limit, mesh_size
from jaxjoint.tables import CHUNK_STEP, MAX_CHUNK, PREFETCH

# On CPU hosts, where the device reports no memory limit, activations get this much:
# chunks that stay near the 32 MiB L3 cache run 1.4-1.8x faster than 1 GiB ones
# (bert-base and the default model on the 2-core EPYC, benchmarks/RESULTS.md).
DEFAULT_CPU_BUDGET_BYTES = 1 << 26
# Your own model on CPU: no formula for its activations, and nothing is compiled to
# plan a CPU run.
OWN_MODEL_CPU_CHUNK = 64


def activation_bytes_per_sequence(config: EncoderConfig, length: int, dtype: str) -> int:
    """Peak bytes one sequence of the substitution batch needs inside one layer.

    Hidden states and the Q/K/V/context copies (6 x L x H), the feed-forward
    activation (2 x L x I; GeGLU's 2I input and I output for ModernBERT), float32
    attention scores and probabilities (2 x heads x L^2 x 4 bytes), and the float32
    logits row at the masked position.
    """
    width = 2 if dtype == "bfloat16" else 4
    mlp = config.intermediate_size * (3 if config.family == "modernbert" else 2)
    per_layer = width * length * (6 * config.hidden_size + mlp)
    attention = 2 * 4 * config.num_heads * length * length
    return per_layer + attention + 4 * config.vocab_size


def default_chunk_size(config: EncoderConfig, length: int, dtype: str, budget_bytes: int) -> int:
    """Sequences per device per step that fit ``budget_bytes`` of activations (a
    multiple of ``CHUNK_STEP``, at most ``MAX_CHUNK``): the chunk on devices that
    report no memory limit, with ``DEFAULT_CPU_BUDGET_BYTES``."""
    fit = budget_bytes // activation_bytes_per_sequence(config, length, dtype)
    return int(max(CHUNK_STEP, min(MAX_CHUNK, fit // CHUNK_STEP * CHUNK_STEP)))


def planned_chunk_size(mesh: Mesh, config: EncoderConfig | MLMProtocol, length: int, dtype: str, *,
                       prefetch: int = PREFETCH, matmul_precision: str = "float32") -> int:
    """``chunk_size=None``'s choice for sentences padded to ``length`` on ``mesh``.

    On devices that report their memory (GPU, TPU): the largest chunk whose
    compiled tables programs fit what the device may hold beside ``prefetch`` pairs'
    tables (``fit.run_chunk``; compiled once per device kind, mesh
    size, model, bucket and dtype, and cached on disk), so the V x V tables are
    budgeted, not only the activations. Raises ``UserError`` when not even 8
    sequences fit. Elsewhere (CPU): ``default_chunk_size`` for
    ``DEFAULT_CPU_BUDGET_BYTES`` of activations, nothing compiled.
    ``config``: a checkpoint's config, or your own model (an ``MLMProtocol``: its
    own function's programs are compiled; on CPU ``OWN_MODEL_CPU_CHUNK``).
    """
    # (On a mesh over several processes, pass chunk_size so that all compile the same program.)
    limit = mesh_memory_limit(mesh)
    if not isinstance(config, EncoderConfig):
        if limit is None:
            return OWN_MODEL_CPU_CHUNK
        return _fitted_chunk_size(mesh, own_model(config), length, dtype, matmul_precision, prefetch, limit)
    if limit is None:
        return default_chunk_size(config, length, dtype, DEFAULT_CPU_BUDGET_BYTES)
    return _compiled_chunk_size(mesh, config, length, dtype, matmul_precision, prefetch, limit)


@functools.cache
def _compiled_chunk_size(mesh: Mesh, config: EncoderConfig, length: int, dtype: str, matmul_precision: str,
                         prefetch: int, limit: int) -> int:
    return _fitted_chunk_size(mesh, config, length, dtype, matmul_precision, prefetch, limit)


def _fitted_chunk_size(mesh: Mesh, config: PlannedModel, length: int, dtype: str, matmul_precision: str,
                       prefetch: int, limit: int) -> int:
    choice = run_chunk(mesh, config, length, dtype, usable_bytes=limit, prefetch=prefetch,
                       matmul_precision=matmul_precision)
    if choice is None:
        ask = (f"jaxjoint.plan.make_plan('local', model, lengths=[{length}])" if isinstance(config, OwnModel)
               else f"`jaxjoint plan --target local --length {length}`")
        raise UserError(
            f"a pair's tables at {length} tokens do not fit the {limit / 2**30:.2f} GiB of each of "
            f"{mesh_size(mesh)} x {mesh.devices.flat[0].device_kind} beside {prefetch} queued pair(s), not even "
            f"{CHUNK_STEP} sequences a step; {ask} says what would fit")
    return choice.chunk_size
