"""The O(V) stage: the MLM's conditional tables for one pair of positions.

For a sentence and positions A, B this runs the 2·V + 1 forward passes of
DESIGN.md §1: every token at B with A masked, every token at A with B masked,
and both masked. The substituted sentences are built on the device from the one
sentence, in chunks of the size its caller gives (by default the model's
``planned_chunk``; the policy is the planner's, ``jaxjoint.plan.chunks``), with the
substitution axis sharded over a 1-D device mesh (``sharding.VOCAB_AXIS``);
parameters are replicated and the V x V tables stay sharded by rows.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxjoint import ids
from jaxjoint.errors import UserError
from jaxjoint.models.protocol import ApplyFn, MLMProtocol
from jaxjoint.sharding import VOCAB_AXIS, local_mesh, mesh_size, padded_size, replicated, row_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairTables:
    """Unary conditionals of an MLM at positions A and B of one sentence.

    Indexing follows DESIGN.md: ``[a, b]``, a the token at A, b the token at B.
    ``V`` is the vocabulary size; ``Vp >= V`` is V padded to a multiple of 8 rows per
    device of the mesh (``sharding.padded_size``; ``Vp == V`` for tables built with
    ``tables_from_logits`` and no padding asked). Rows ``a >= V`` are padding: their
    raw logits are ``-inf`` and every log-probability view is ``-inf`` there, i.e.
    such an ``a`` has probability zero.

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


# --- computing the tables from a model ---------------------------------------------

# (longest length, step): lengths are padded up to a multiple of the step of the
# first range that holds them. Below 128 tokens a sentence is padded by fewer than
# 8 tokens, while a corpus of sentences up to 128 tokens compiles at most 16
# programs; longer ones are rarer and their passes dearer, so coarser steps there
# keep the count of programs small at a few % of padding.
BUCKET_STEPS = ((128, 8), (256, 32), (512, 64))
LONG_BUCKET_STEP = 128
# Pairs a stream of tables keeps queued on the devices behind the one being scored.
PREFETCH = 1
# Chunks are multiples of 8 sequences: the batch of a chunk times the sentence
# length is the row count of every matrix product, and 8 is the sublane tile of TPU
# vector registers and a factor of every tensor-core tile; a finer choice would buy
# at most 7 sequences. At most 4096 a step, wherever the chunk is chosen.
CHUNK_STEP = 8
MAX_CHUNK = 4096


def bucket_length(length: int, max_positions: int) -> int:
    """The padded sequence length used for a sequence of ``length`` tokens: the one
    place that decides (the tables stage and ``train-mlm`` both pad to it).

    A multiple of 8 up to 128 tokens (less than 8 tokens of padding), of 32 up to
    256, of 64 up to 512, of 128 beyond (``BUCKET_STEPS``); never more than
    ``max_positions``. Raises ``UserError`` past the model's position table.
    """
    if length > max_positions:
        raise UserError(f"sentence of {length} tokens exceeds the model's {max_positions} positions")
    step = next((step for longest, step in BUCKET_STEPS if length <= longest), LONG_BUCKET_STEP)
    return min(-(-max(length, 1) // step) * step, max_positions)


def chunking(rows: int, max_chunk: int) -> tuple[int, int]:
    """(number of chunks, chunk size) covering ``rows`` rows per device with chunks
    of at most ``max_chunk`` (``chunk_size``), as even as possible so that the last
    chunk, which overlaps the one before it, recomputes few rows, and a multiple of
    ``CHUNK_STEP`` where ``max_chunk`` and ``rows`` allow. The one rule for the
    split: ``substitution_table`` runs it, ``jaxjoint.plan`` compiles it."""
    n_chunks = math.ceil(rows / max_chunk)
    even = math.ceil(rows / n_chunks)
    return n_chunks, min(max_chunk, rows, math.ceil(even / CHUNK_STEP) * CHUNK_STEP)


@functools.partial(jax.jit, static_argnames=("apply_fn", "vocab", "mesh", "n_chunks", "chunk", "rows"))
def substitution_table(
    apply_fn: ApplyFn,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    read_pos: jax.Array,
    sub_pos: jax.Array,
    mask_id: jax.Array,
    *,
    vocab: int,
    mesh: Mesh,
    n_chunks: int,
    chunk: int,
    rows: int,
) -> jax.Array:
    """float32[rows, V]: row t is the logits at ``read_pos`` with ``read_pos`` = [MASK]
    and ``sub_pos`` = token t. Rows ``t >= V`` (padding) are ``-inf``.

    ``apply_fn``: the model (``MLMProtocol.apply_for``), V = ``vocab``. ``rows`` is V
    padded for the mesh (``padded_size``); each device computes its own
    block of rows in ``n_chunks`` chunks of ``chunk`` sequences (``chunking``) built on
    the device from the one sentence ``input_ids`` int[L], writing each chunk in
    place. No communication: parameters are replicated.
    """
    local_rows = rows // mesh_size(mesh)

    def local_block(params, input_ids, attention_mask, read_pos, sub_pos, mask_id):
        first = jax.lax.axis_index(VOCAB_AXIS) * local_rows
        offsets = jnp.arange(chunk, dtype=jnp.int32)
        base = input_ids.at[read_pos].set(mask_id)

        def one_chunk(values):
            ids = jnp.tile(base[None], (chunk, 1))
            ids = ids.at[:, sub_pos].set(jnp.where(values < vocab, values, 0))
            mask = jnp.tile(attention_mask[None], (chunk, 1))
            positions = jnp.full((chunk, 1), read_pos, jnp.int32)
            logits = model_logits(apply_fn, params, ids, mask, positions, vocab)[:, 0]
            return jnp.where((values < vocab)[:, None], logits, -jnp.inf)

        def write_chunk(k, table):
            # The last chunk ends at the last row, overlapping the one before when
            # the chunks do not tile the rows exactly: every chunk is written in place
            # into the table, and no padded block (and copy of it) is formed.
            start = jnp.minimum(k * chunk, local_rows - chunk)
            return jax.lax.dynamic_update_slice_in_dim(table, one_chunk(first + start + offsets), start, axis=0)

        return jax.lax.fori_loop(0, n_chunks, write_chunk, jnp.zeros((local_rows, vocab), jnp.float32))

    return jax.shard_map(
        local_block,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(), P()),
        out_specs=P(VOCAB_AXIS),
        check_vma=False,
    )(params, input_ids, attention_mask, read_pos, sub_pos, mask_id)


def model_logits(apply_fn: ApplyFn, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                 positions: jax.Array, vocab: int) -> jax.Array:
    """float32[B, K, V]: ``apply_fn``'s logits, its shape checked while tracing (a
    model whose V is not the one it declared would fill the tables wrongly)."""
    logits = apply_fn(params, input_ids, attention_mask, positions)
    expected = (*positions.shape, vocab)
    if tuple(logits.shape) != expected:
        raise UserError(f"the model's function returned logits of shape {tuple(logits.shape)} for "
                        f"positions of shape {tuple(positions.shape)}; expected {expected} (its vocab_size is {vocab})")
    return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "vocab"))
def masked_logits(apply_fn: ApplyFn, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                  positions: jax.Array, *, vocab: int) -> jax.Array:
    """The pass with both positions masked: int[B, L], int[B, L], int[B, K] ->
    float32[B, K, V] (``model_logits`` jitted)."""
    return model_logits(apply_fn, params, input_ids, attention_mask, positions, vocab)


@functools.partial(jax.jit, static_argnames=("mesh", "vocab"), donate_argnames=("rows_b", "logits_b"))
def assemble_tables(rows_b: jax.Array, logits_b: jax.Array, both_a: jax.Array, both_b: jax.Array,
                    *, mesh: Mesh, vocab: int) -> PairTables:
    """The last step of the tables stage: ``PairTables`` from the two substitution
    tables float32[Vp, V] (row-sharded) and the both-masked logits float32[V] at A, B.

    Turns the [b, a]-indexed ``rows_b`` into ``logits_a[a, b]`` (one all-to-all on a
    mesh) and pads the both-masked logits at A like the rows. Both tables are
    donated: ``logits_b`` is passed through in place and ``rows_b`` is freed once
    transposed (a transpose needs a buffer of its own), so three tables, not four,
    are live at the peak.
    """
    rows = rows_b.shape[0]
    logits_a = jnp.pad(rows_b[:vocab].T, ((0, rows - vocab), (0, 0)), constant_values=-jnp.inf)
    shard = row_sharding(mesh)
    return PairTables(
        logits_a=jax.lax.with_sharding_constraint(logits_a, shard),
        logits_b=logits_b,
        both_masked_a=jax.lax.with_sharding_constraint(
            jnp.pad(both_a, (0, rows - vocab), constant_values=-jnp.inf), shard),
        both_masked_b=both_b,
        vocab_size=vocab,
    )


def pair_tables(
    mlm: MLMProtocol,
    input_ids: Any,
    a: int,
    b: int,
    *,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
    dtype: str | None = None,
) -> PairTables:
    """The MLM's conditional tables at positions ``a`` and ``b`` of one sentence.

    mlm: a ``MaskedLM`` (``load_mlm``) or any ``MLMProtocol``, e.g. your own JAX
      model as a ``FunctionMLM``.
    input_ids: int[L], the sentence with special tokens and gold tokens in place.
    a, b: distinct positions in ``[0, L)``, neither holding a special token
      ([CLS], [SEP]: ``mlm.special_token_ids``), as ``jaxjoint pair`` requires.
    mesh: a 1-D mesh over ``VOCAB_AXIS`` (``sharding.make_mesh()``); default one device
      (``sharding.local_mesh(1)``).
    chunk_size: sequences per device per step; default ``mlm.planned_chunk``: for a
      checkpoint on a GPU or TPU the largest whose compiled programs fit the device's
      memory beside one more pair's tables, the same a run takes.
    dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; default ``mlm.dtype``.

    Runs 2·V + 1 forward passes (each with the head only at the masked position)
    and returns ``PairTables`` with rows padded to a multiple of 8 per device
    (``sharding.padded_size``) and sharded over the mesh. Raises ``UserError`` for
    bad positions or ids (Python, NumPy or JAX values), or when a pair's tables
    cannot fit the devices.
    """
    return _dispatch(mlm, _pad_to_bucket(mlm, input_ids, a, b), mesh=mesh, chunk_size=chunk_size, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class _Padded:
    """One sentence padded to its bucket, as host arrays ready to send."""

    input_ids: np.ndarray  # int32[Lb]
    attention_mask: np.ndarray  # int32[Lb]
    a: int
    b: int


def _pad_to_bucket(mlm: MLMProtocol, input_ids: Any, a: Any, b: Any) -> _Padded:
    if ids.is_traced((input_ids, a, b)):
        raise UserError("pair_tables runs its own compiled programs: give it concrete ids and positions, "
                        "not values traced by jax.jit or vmap")
    ids.check_range(input_ids, mlm.vocab_size, "input_ids")
    tokens = np.asarray(input_ids, dtype=np.int32)
    if tokens.ndim != 1:
        raise ValueError(f"input_ids must be one sentence, int[L]; got shape {tokens.shape}")
    length = tokens.shape[0]
    for position in (a, b):
        ids.bounds(position, "positions")
        if np.ndim(position) != 0:
            raise UserError(f"positions must be two ints; got an array of shape {np.shape(position)}")
    a, b = int(a), int(b)
    if a == b or not (0 <= a < length and 0 <= b < length):
        raise UserError(f"positions must be two distinct indices in [0, {length}); got {a} and {b}")
    for position in (a, b):
        if int(tokens[position]) in mlm.special_token_ids:
            raise UserError(f"position {position} is the special token {_token_name(mlm, tokens[position])}; "
                            "choose a word position")
    bucket = bucket_length(length, mlm.max_positions if mlm.max_positions is not None else sys.maxsize)
    padded = np.full(bucket, mlm.pad_token_id, np.int32)
    padded[:length] = tokens
    mask = (np.arange(bucket) < length).astype(np.int32)
    return _Padded(padded, mask, a, b)


def _token_name(mlm: MLMProtocol, token: int) -> str:
    """``[CLS] (id 2)``, or ``id 2`` without a tokenizer."""
    tokenizer = getattr(mlm, "tokenizer", None)
    if tokenizer is None:
        return f"id {int(token)}"
    return f"{tokenizer.convert_ids_to_tokens(int(token))} (id {int(token)})"


def _dispatch(mlm: MLMProtocol, prep: _Padded, *, mesh: Mesh | None, chunk_size: int | None,
              dtype: str | None, prefetch: int = PREFETCH) -> PairTables:
    """Queue the device work for one prepared sentence; returns without waiting.
    ``prefetch``: pairs held on the devices meanwhile (for the chunk's budget)."""
    mesh = local_mesh(1) if mesh is None else mesh
    model = mlm if dtype is None else mlm.with_dtype(dtype)
    vocab = model.vocab_size
    rows = padded_size(vocab, mesh)
    if chunk_size is None:
        chunk_size = model.planned_chunk(mesh, prep.input_ids.shape[0], prefetch)
    n_chunks, chunk = chunking(rows // mesh_size(mesh), chunk_size)

    apply_fn = model.apply_for(mesh)
    params = model.params_on(replicated(mesh))
    input_ids = jnp.asarray(prep.input_ids)
    mask = jnp.asarray(prep.attention_mask)
    mask_id = jnp.int32(model.mask_token_id)
    a, b = jnp.int32(prep.a), jnp.int32(prep.b)
    run = functools.partial(
        substitution_table, apply_fn, params, input_ids, mask,
        vocab=vocab, mesh=mesh, n_chunks=n_chunks, chunk=chunk, rows=rows)
    rows_b = run(a, b, mask_id)  # [b_val, a_val]: A masked, B substituted, read at A
    logits_b = run(b, a, mask_id)  # [a_val, b_val]: B masked, A substituted, read at B
    both = masked_logits(
        apply_fn, params,
        input_ids.at[prep.a].set(mask_id).at[prep.b].set(mask_id)[None], mask[None],
        jnp.array([[prep.a, prep.b]], jnp.int32), vocab=vocab)[0]
    return assemble_tables(rows_b, logits_b, both[0], both[1], mesh=mesh, vocab=vocab)


def iter_pair_tables(
    mlm: MLMProtocol,
    pairs: Iterable[tuple[Any, int, int]],
    *,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
    dtype: str | None = None,
    prefetch: int = PREFETCH,
) -> Iterator[PairTables]:
    """``pair_tables`` for a stream of ``(input_ids int[L], a, b)``, in order.

    Keeps ``prefetch`` pairs queued on the devices ahead of the one handed out, so
    the next pair's forward passes run while the caller derives joints and metrics
    from this one (each queued pair holds its two V x V tables in device memory).
    Sentences share one compiled program per length bucket; ``chunk_size=None``
    budgets each bucket's chunk beside ``prefetch`` pairs (``mlm.planned_chunk``).

    Each ``PairTables`` handed out is valid until the next one is asked for (or
    the end of the stream is): its device buffers are then deleted, before the next pair is queued, so that no more
    than ``prefetch`` pairs are held while one is computed (a caller's loop
    variable would otherwise keep the last one alive). Keep what you need from it
    (metrics, ``jax.device_get``) before asking for the next; using it afterwards
    (or a ``Joint`` derived from it) raises ``UserError`` naming this rule. An
    invalid pair raises ``UserError`` when its turn comes, after the pairs before
    it are handed out.
    """
    queue: collections.deque[PairTables] = collections.deque()
    handed: PairTables | None = None
    error: UserError | None = None

    def hand_out() -> PairTables:
        nonlocal handed
        handed = queue.popleft()
        return handed

    for index, (input_ids, a, b) in enumerate(pairs):
        try:
            prep = _pad_to_bucket(mlm, input_ids, a, b)
        except UserError as err:
            error = UserError(f"pair {index} of the stream: {err}")
            break
        if handed is not None:
            _free(handed)
            handed = None
        queue.append(_dispatch(mlm, prep, mesh=mesh, chunk_size=chunk_size, dtype=dtype, prefetch=prefetch))
        if len(queue) > prefetch:
            yield hand_out()
    while queue:
        if handed is not None:
            _free(handed)
        yield hand_out()
    if handed is not None:
        _free(handed)
    if error is not None:
        raise error


FREED = ("these PairTables were freed: iter_pair_tables frees each pair's tables (and what joints read "
         "from them) when the next pair is asked for; keep what you need from a pair (metrics, "
         "jax.device_get) before asking for the next, or use pair_tables")


class _Freed:
    """Stands in for a field of ``PairTables`` that ``iter_pair_tables`` freed: any
    use (an attribute, an index, a conversion, a jitted call that reads it) is one
    ``UserError`` naming the rule, not JAX's "Array has been deleted"."""

    __slots__ = ()

    def is_deleted(self) -> bool:
        return True

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise UserError(FREED)

    def __getattr__(self, name: str) -> Any:
        raise UserError(FREED)

    def __repr__(self) -> str:
        return "<freed by iter_pair_tables>"

    __array__ = __jax_array__ = __getitem__ = __iter__ = __len__ = __float__ = __int__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __neg__ = _refuse


# A pytree without leaves: a jitted function given freed tables traces, and refuses
# when it reads them, instead of failing on a leaf that is not an array.
jax.tree_util.register_pytree_node(_Freed, lambda _: ((), None), lambda _aux, _children: _Freed())


def _free(tables: PairTables) -> None:
    """Free ``tables``' device buffers now; the caller may still hold the object,
    whose fields then refuse any use (``_Freed``)."""
    for field in dataclasses.fields(tables):
        leaf = getattr(tables, field.name)
        if isinstance(leaf, jax.Array):
            leaf.delete()
            object.__setattr__(tables, field.name, _Freed())
