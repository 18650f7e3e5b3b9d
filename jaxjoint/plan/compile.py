"""Compile the programs of a run for a mesh of real or compile-only devices, without
running them, and read XLA's memory and cost analyses.

The programs are the run's own: ``tables.substitution_table`` (the 2·V forward
passes, one call per table), ``tables.masked_logits`` (the both-masked pass),
``tables.assemble_tables``, ``joints.derive_joint`` for each method, the per-pair
metrics core and the MLM's unary NLL. Every input is a ``jax.ShapeDtypeStruct`` carrying its sharding, so
nothing is allocated and no weights are needed.

Numbers are per device: after SPMD partitioning each device runs the same program
on its shard. XLA's cost analysis counts a while loop's body once (the ``fori_loop``
over chunks, AG's iterations, the streaming passes' row blocks): callers multiply
by trip counts where they know them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxjoint.joints import Joint, ag, derive_joint
from jaxjoint.joints.streaming import default_block_rows, normalisers
from jaxjoint.metrics import mlm_unary_nll_array, pair_metric_arrays
from jaxjoint.models.config import EncoderConfig
from jaxjoint.models.families import masked_lm_module
from jaxjoint.models.mlm import DTYPES, ModuleApply
from jaxjoint.models.precision import MatmulPrecision, platform_of
from jaxjoint.plan.models import OwnModel, PlannedModel, abstract_params
from jaxjoint.plan.targets import quiet_stderr
from jaxjoint.sharding import mesh_size, padded_size, replicated, row_sharding
from jaxjoint.tables import PairTables, assemble_tables, masked_logits, substitution_table


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """What XLA says about one compiled program, per device.

    peak_bytes: the most memory the program holds at once (its arguments, outputs
    and temporaries); None when the compiler refused it (``refused`` says why,
    e.g. the TPU compiler's RESOURCE_EXHAUSTED over HBM; ``temp_bytes`` then holds
    the temporaries it said it needs, 0 if it did not say). flops and bytes_accessed:
    XLA's HLO cost analysis (loop bodies once); optimal_seconds: the TPU compiler's
    own time estimate (None elsewhere, and where it gave none above zero).
    """

    name: str
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    peak_bytes: int | None = None
    flops: float | None = None
    bytes_accessed: float | None = None
    optimal_seconds: float | None = None
    compile_seconds: float = 0.0
    refused: str | None = None


def hlo_cost_analysis(compiled: jax.stages.Compiled) -> dict[str, float]:
    """XLA's generic HLO cost analysis of a compiled program's optimised module.

    For backends whose ``cost_analysis()`` returns None (the CUDA plugin's compile-only
    devices). Uses private jaxlib entry points, pinned here alone and tested
    (tests/test_plan.py): ``_jax.hlo_module_cost_analysis`` run by the CPU client
    on ``runtime_executable().hlo_modules()[0]``.
    """
    from jax._src.lib import _jax

    cpu_client = jax.local_devices(backend="cpu")[0].client
    module = compiled.runtime_executable().hlo_modules()[0]
    return {k: float(v) for k, v in _jax.hlo_module_cost_analysis(cpu_client, module).items()}


def xla_cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    """``compiled.cost_analysis()``, or where that is None (GPUs) the HLO cost analysis,
    whose "bytes accessed" then gains those of the program's Pallas kernels, which it
    counts as 0 (``kernel_bytes``)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some plugins raise UNIMPLEMENTED instead of returning None
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost:
        return {k: float(v) for k, v in cost.items()}
    cost = hlo_cost_analysis(compiled)
    if "bytes accessed" in cost:
        cost["bytes accessed"] += kernel_bytes(compiled.as_text())
    return cost


# Custom calls that XLA's GPU cost analysis counts as moving nothing: Pallas's
# Triton kernels (jaxjoint.joints.gpu_pass).
_KERNEL_TARGETS = ('custom_call_target="__gpu$xla.gpu.triton"',)
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*?)\)")


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (a shape or a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += _DTYPE_BYTES[dtype] * count
    return total


def kernel_bytes(hlo_text: str) -> int:
    """The bytes of the Pallas kernels in an optimised HLO module's text: each
    kernel's operands and results, read and written once (what a kernel that
    streams its inputs moves; XLA's GPU cost analysis counts its custom call as 0)."""
    shapes, total = {}, 0
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, operands = match.groups()
        shapes[name] = shape
        if op == "custom-call" and any(t in line for t in _KERNEL_TARGETS):
            names = re.findall(r"%([\w.\-]+)", operands)
            total += _shape_bytes(shape) + sum(_shape_bytes(shapes.get(n, "")) for n in names)
    return total


def analyse(name: str, lower: Callable[[], jax.stages.Lowered]) -> ProgramCost:
    """Lower and compile with ``lower()``; the program's memory and cost analyses.

    A compiler that refuses the program for its size (RESOURCE_EXHAUSTED: the TPU
    compiler checks HBM) gives ``refused``; other errors propagate.
    """
    return compile_program(name, lower)[0]


@contextlib.contextmanager
def fully_optimised():
    """Compile as a run compiles, whatever ``JAX_DISABLE_MOST_OPTIMIZATIONS`` says (the
    test suite sets it to compile faster): a plan measures the program that will run."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def compile_program(name: str, lower: Callable[[], jax.stages.Lowered]
                    ) -> tuple[ProgramCost, jax.stages.Compiled | None]:
    """``analyse``, also returning the compiled program (None when refused)."""
    start = time.perf_counter()
    try:
        with quiet_stderr(), fully_optimised():  # compilers log at length about programs over memory
            compiled = lower().compile()
    except Exception as err:  # XlaRuntimeError / JaxRuntimeError
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        line = next((ln.strip() for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln), text.splitlines()[0])
        # The TPU compiler names what the program needs ("... HLO temporaries (60.93G)",
        # in GiB): a lower bound on its peak.
        need = re.search(r"\((\d+(?:\.\d+)?)G\)", line)
        temps = int(float(need.group(1)) * 2**30) if need else 0
        return ProgramCost(name, temp_bytes=temps, refused=line[:300],
                           compile_seconds=time.perf_counter() - start), None
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    arguments, outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
    temps, alias = memory.temp_size_in_bytes, memory.alias_size_in_bytes
    peak = getattr(memory, "peak_memory_in_bytes", 0) or (arguments + outputs + temps - alias)
    cost = xla_cost(compiled)
    optimal = cost.get("optimal_seconds")
    if optimal is not None and optimal <= 0:
        optimal = None  # libtpu 0.0.42 answers negative times for some programs: no estimate
    return ProgramCost(
        name, argument_bytes=arguments, output_bytes=outputs, temp_bytes=temps, alias_bytes=alias,
        peak_bytes=max(peak, arguments + outputs + temps - alias), flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"), optimal_seconds=optimal,
        compile_seconds=seconds), compiled


# --- abstract inputs ----------------------------------------------------------------


def _abstract(shape, dtype, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _placed(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda s: _abstract(s.shape, s.dtype, sharding), tree)


@functools.cache
def _params_shapes(config: EncoderConfig) -> Any:
    return abstract_params(config)


def _model_params(model: PlannedModel) -> Any:
    return model.abstract_params if isinstance(model, OwnModel) else _params_shapes(model)


def params_bytes(model: PlannedModel) -> int:
    """Bytes of the parameters (replicated: each device holds them all); float32 for
    a config, as given for your own model."""
    return sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(_model_params(model)))


def abstract_tables(mesh: Mesh, vocab: int) -> PairTables:
    """``PairTables`` as the tables stage leaves them on ``mesh``: float32[Vp, V] row-sharded."""
    rows = padded_size(vocab, mesh)
    shard, rep = row_sharding(mesh), replicated(mesh)
    return PairTables(
        logits_a=_abstract((rows, vocab), jnp.float32, shard),
        logits_b=_abstract((rows, vocab), jnp.float32, shard),
        both_masked_a=_abstract((rows,), jnp.float32, shard),
        both_masked_b=_abstract((vocab,), jnp.float32, rep),
        vocab_size=vocab)


# --- the run's programs ---------------------------------------------------------------


def model_module(mesh: Mesh, config: EncoderConfig, dtype: str, matmul_precision: str):
    """The module a run on ``mesh`` executes: its products in the arithmetic that
    ``matmul_precision`` asks of ``mesh``'s platform."""
    precision = MatmulPrecision(matmul_precision, platform_of(mesh.devices.flat[0]))
    return masked_lm_module(config, DTYPES[dtype], precision)


def model_function(mesh: Mesh, model: PlannedModel, dtype: str, matmul_precision: str) -> Any:
    """The function a run on ``mesh`` calls for the logits (``MLMProtocol.apply_for``):
    a config's module in ``dtype`` and ``matmul_precision``; your own model's
    function as it is (its dtype and products are its own)."""
    if isinstance(model, OwnModel):
        return model.apply_for(mesh)
    return ModuleApply(model_module(mesh, model, dtype, matmul_precision))


def lower_tables(mesh: Mesh, config: PlannedModel, length: int, dtype: str, *, n_chunks: int,
                 chunk: int, matmul_precision: str = "float32") -> jax.stages.Lowered:
    """``substitution_table`` lowered for ``mesh`` (abstract inputs): one of the pair's
    two tables for sentences padded to ``length``, ``n_chunks`` steps of ``chunk``
    sequences per device. ``config``: a checkpoint's config or your own model."""
    rep = replicated(mesh)
    apply_fn = model_function(mesh, config, dtype, matmul_precision)
    params = _placed(_model_params(config), rep)
    ids = _abstract((length,), jnp.int32, rep)
    scalar = _abstract((), jnp.int32, rep)
    return substitution_table.lower(apply_fn, params, ids, ids, scalar, scalar, scalar, vocab=config.vocab_size,
                                    mesh=mesh, n_chunks=n_chunks, chunk=chunk,
                                    rows=padded_size(config.vocab_size, mesh))


def tables_program(mesh: Mesh, config: PlannedModel, length: int, dtype: str, *, n_chunks: int,
                   chunk: int, matmul_precision: str = "float32") -> ProgramCost:
    """One ``substitution_table`` call (``lower_tables``), analysed."""
    return analyse(f"tables (chunk {chunk} x {n_chunks})", lambda: lower_tables(
        mesh, config, length, dtype, n_chunks=n_chunks, chunk=chunk, matmul_precision=matmul_precision))


def both_masked_program(mesh: Mesh, config: PlannedModel, length: int, dtype: str, *,
                        matmul_precision: str = "float32") -> ProgramCost:
    """The one pass with both positions masked (logits at two positions)."""
    rep = replicated(mesh)
    apply_fn = model_function(mesh, config, dtype, matmul_precision)
    params = _placed(_model_params(config), rep)
    ids = _abstract((1, length), jnp.int32, rep)
    positions = _abstract((1, 2), jnp.int32, rep)
    return analyse("both masked", lambda: masked_logits.lower(
        apply_fn, params, ids, ids, positions, vocab=config.vocab_size))


def assemble_program(mesh: Mesh, vocab: int) -> ProgramCost:
    """The transpose of the first table into ``logits_a`` (an all-to-all on a mesh)."""
    tables = abstract_tables(mesh, vocab)
    rep = replicated(mesh)
    vector = _abstract((vocab,), jnp.float32, rep)
    return analyse("assemble", lambda: assemble_tables.lower(
        tables.logits_b, tables.logits_b, vector, vector, mesh=mesh, vocab=vocab))


def _derived(joint: Joint):
    """What a derived joint adds to its tables (the tables are not outputs)."""
    return joint.norm_a, joint.norm_b, joint.row, joint.col, joint.log_z, joint.info_arrays


def derive_program(mesh: Mesh, vocab: int, method: str, options: dict[str, Any]) -> tuple[ProgramCost, Joint]:
    """``derive_joint(tables, method, **options)`` on abstract tables; also returns the
    abstract ``Joint`` (leaves carrying the shardings the program gives them)."""
    tables = abstract_tables(mesh, vocab)
    derive = jax.jit(lambda t: _derived(derive_joint(t, method, mesh=mesh, **options)))
    cost, compiled = compile_program(f"joint {method}", lambda: derive.lower(tables))
    shapes = jax.eval_shape(derive, tables)
    if compiled is not None:
        shardings = compiled.output_shardings
    else:
        shardings = jax.tree.map(lambda _: replicated(mesh), shapes)
    leaves = jax.tree.map(lambda s, sh: _abstract(s.shape, s.dtype, sh), shapes, shardings)
    norm_a, norm_b, row, col, log_z, info = leaves
    joint = Joint(tables, norm_a, norm_b, row, col, log_z, info, method=method, mesh=mesh)
    return cost, joint


def ag_pass_program(mesh: Mesh, vocab: int) -> ProgramCost:
    """One pass of AG's loop (``ag.one_pass``: the row and column sums of the AG map
    on the loop-invariant table), the table an input, without the log-space
    fall-back: the pass that runs unless float32 underflow reaches its sums (which
    redoes it from the two logit tables, two reads more). Its ``bytes_accessed`` is
    what a pass moves per device, set against one read of the local table
    (4 x local rows x V). (XLA counts a conditional at its costliest branch and a
    loop body once: with the fall-back compiled in, one block of it would count.)"""
    tables = abstract_tables(mesh, vocab)
    shard, rep = row_sharding(mesh), replicated(mesh)
    rows = tables.logits_a.shape[0]
    table = (tables.logits_a, _abstract((rows,), jnp.float32, shard))
    block_rows = default_block_rows(tables, mesh)
    norms = jax.eval_shape(normalisers, tables)
    norm_a, norm_b = _placed(norms[0], rep), _placed(norms[1], shard)
    log_pa, log_pb = _abstract((rows,), jnp.float32, shard), _abstract((vocab,), jnp.float32, rep)
    run = jax.jit(functools.partial(ag.one_pass, mesh, block_rows, fallback=False))
    return analyse("ag pass", lambda: run.lower(table, tables.logits_a, tables.logits_b, norm_a, norm_b,
                                                 log_pa, log_pb))


def metrics_program(mesh: Mesh, joint: Joint) -> ProgramCost:
    """The per-pair metrics core for one method's joint (jaxjoint.metrics)."""
    rep = replicated(mesh)
    gold = _abstract((), jnp.int32, rep)
    block_rows = default_block_rows(joint.tables, mesh)
    return analyse(f"metrics {joint.method}", lambda: pair_metric_arrays.lower(
        joint.tables, joint, gold, gold, block_rows=block_rows))


def unary_program(mesh: Mesh, vocab: int) -> ProgramCost:
    """The MLM's own unary NLL of a pair (jaxjoint.metrics), once a pair."""
    tables = abstract_tables(mesh, vocab)
    gold = _abstract((), jnp.int32, replicated(mesh))
    return analyse("mlm unary", lambda: mlm_unary_nll_array.lower(tables, gold, gold, mesh=mesh))


def local_rows(mesh: Mesh, vocab: int) -> int:
    """Rows of each table on one device."""
    return padded_size(vocab, mesh) // mesh_size(mesh)


__all__ = [
    "ProgramCost", "abstract_tables", "ag_pass_program", "analyse", "assemble_program", "both_masked_program",
    "derive_program", "hlo_cost_analysis", "local_rows", "metrics_program", "params_bytes",
    "tables_program", "unary_program", "xla_cost",
]
