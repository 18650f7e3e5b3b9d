"""What the tables stage needs of a masked LM (``MLMProtocol``), and ``FunctionMLM``:
any JAX masked LM given as a function, its parameters and a few token ids.

``MaskedLM`` (a checkpoint read by ``load_mlm``) and ``FunctionMLM`` both satisfy
the protocol; ``pair_tables``, ``iter_pair_tables`` and ``explain_pair`` take
either, through one code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, Sharding

from jaxjoint.errors import UserError
from jaxjoint.sharding import mesh_memory_limit

# (params, input_ids int32[B, L], attention_mask int32[B, L], positions int32[B, K])
#   -> float32[B, K, V]: the logits at ``positions`` of each row.
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@runtime_checkable
class MLMProtocol(Protocol):
    """A masked LM as the tables stage reads it.

    ``apply_for(mesh)``: the function the tables stage runs on ``mesh``'s devices,
    ``(params, input_ids int32[B, L], attention_mask int32[B, L], positions
    int32[B, K]) -> float[B, K, V]``, the logits at ``positions``; traceable, and
    hashable (it is a static argument of the compiled programs: the same object,
    or an equal one, reuses them). Padded positions have attention mask 0 and must
    not change the logits elsewhere. (A checkpoint's products depend on the
    platform: ``MaskedLM.matmul_precision``.)
    ``vocab_size``: V, the rows of the logits' last axis; ``mask_token_id``,
    ``pad_token_id``: ids in [0, V); ``special_token_ids``: ids never chosen as a
    pair's position ([CLS], [SEP], ...); ``max_positions``: the longest sentence
    (None: any); ``tokenizer``: a ``transformers`` tokenizer or None (only for
    naming tokens); ``dtype``: the compute dtype's name; ``params``: the parameter
    pytree (``jaxjoint.plan`` reads its shapes and dtypes only).
    """

    @property
    def vocab_size(self) -> int: ...
    @property
    def mask_token_id(self) -> int: ...
    @property
    def pad_token_id(self) -> int: ...
    @property
    def special_token_ids(self) -> frozenset[int]: ...
    @property
    def max_positions(self) -> int | None: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def dtype(self) -> str: ...
    @property
    def params(self) -> Any: ...

    def apply_for(self, mesh: Mesh) -> ApplyFn:
        """The model's function for ``mesh``'s devices (above)."""

    def params_on(self, sharding: Sharding) -> Any:
        """The parameters placed with ``sharding`` (replicated over the mesh)."""

    def with_dtype(self, dtype: str) -> MLMProtocol:
        """The same model computing in ``dtype`` (``"float32"`` or ``"bfloat16"``)."""

    def planned_chunk(self, mesh: Mesh, length: int, prefetch: int) -> int:
        """Sequences per device per step when the caller chose none, for sentences
        padded to ``length`` with ``prefetch`` pairs queued."""


@dataclasses.dataclass(eq=False)
class FunctionMLM:
    """Your own JAX masked LM, for ``pair_tables`` and everything after it.

    apply_fn: ``(params, input_ids int32[B, L], attention_mask int32[B, L],
      positions int32[B, K]) -> float[B, K, V]``: the logits at ``positions``
      (read as float32). A Flax model's ``lambda p, i, m, k: model.apply({"params":
      p}, i, m, k)`` defined once, an Equinox model's call, plain jnp. Keep the
      same function object across calls: it keys the compiled programs.
    params: its parameter pytree (placed on the devices by the tables stage); for a
      model you only plan (``jaxjoint.plan.make_plan``), ``jax.ShapeDtypeStruct``
      leaves will do (``jax.eval_shape`` of its initialiser): no weights needed.
    vocab_size: V; mask_token_id: the [MASK] id.
    pad_token_id: the id sentences are padded with to their length bucket (with
      attention mask 0); default 0.
    special_token_ids: ids that are never a pair's position ([CLS], [SEP]):
      ``pair_tables`` refuses a position holding one; default none.
    max_positions: the longest sentence the model reads; None (default): any.
    chunk_size: sequences per device per step when ``pair_tables`` is given no
      ``chunk_size``; None (default): on devices that report their memory (GPU,
      TPU), the largest chunk whose compiled tables programs fit beside the queued
      pairs, as for a checkpoint (``jaxjoint.plan.chunks``); on CPU, 64.
    tokenizer: optional, only for naming tokens in messages.
    dtype: the name of the dtype ``apply_fn`` computes in (it is not changed).
    """

    apply_fn: ApplyFn
    params: Any
    vocab_size: int
    mask_token_id: int
    pad_token_id: int = 0
    special_token_ids: frozenset[int] = frozenset()
    max_positions: int | None = None
    chunk_size: int | None = None
    tokenizer: Any = None
    dtype: str = "float32"
    _placed: dict = dataclasses.field(default_factory=dict, repr=False)
    _chunks: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.apply_fn):
            raise UserError("FunctionMLM: apply_fn must be a function (params, ids, mask, positions) -> logits")
        if int(self.vocab_size) < 1:
            raise UserError(f"FunctionMLM: vocab_size must be >= 1; got {self.vocab_size}")
        self.vocab_size = int(self.vocab_size)
        for name in ("mask_token_id", "pad_token_id"):
            value = int(getattr(self, name))
            if not 0 <= value < self.vocab_size:
                raise UserError(f"FunctionMLM: {name} {value} is outside the vocabulary [0, {self.vocab_size})")
            setattr(self, name, value)
        self.special_token_ids = frozenset(int(i) for i in self.special_token_ids)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UserError(f"FunctionMLM: chunk_size must be >= 1; got {self.chunk_size}")
        if self.max_positions is not None and self.max_positions < 1:
            raise UserError(f"FunctionMLM: max_positions must be >= 1 or None; got {self.max_positions}")

    def apply_for(self, mesh: Mesh) -> ApplyFn:
        """``apply_fn``, whatever the mesh."""
        return self.apply_fn

    def params_on(self, sharding: Sharding) -> Any:
        """The parameters placed with ``sharding`` (copied once per sharding, then cached)."""
        if sharding not in self._placed:
            self._placed[sharding] = jax.device_put(jax.tree.map(jnp.asarray, self.params), sharding)
        return self._placed[sharding]

    def with_dtype(self, dtype: str) -> FunctionMLM:
        """This model if it computes in ``dtype``; a function's dtype is its own."""
        if dtype != self.dtype:
            raise UserError(f"this FunctionMLM computes in {self.dtype}; for {dtype}, give a function that "
                            f"computes in it (and dtype={dtype!r})")
        return self

    def planned_chunk(self, mesh: Mesh, length: int, prefetch: int) -> int:
        """``chunk_size`` if given, else the planner's choice (``chunk_size`` above),
        kept per mesh, length, prefetch and memory limit."""
        if self.chunk_size is not None:
            return self.chunk_size
        key = (mesh, length, prefetch, mesh_memory_limit(mesh))
        if key not in self._chunks:
            # The policy compiles this model's tables programs: imported when asked.
            from jaxjoint.plan.chunks import planned_chunk_size

            self._chunks[key] = planned_chunk_size(mesh, self, length, self.dtype, prefetch=prefetch)
        return self._chunks[key]
