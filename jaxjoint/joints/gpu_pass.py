"""AG's pass on NVIDIA GPUs as one Pallas (Triton) kernel.

XLA's GPU compiler cannot put a row reduction and a column reduction of the same
cells into one kernel: for ``x.sum(1)`` and ``x.sum(0)`` it writes the cells out
and reads them back (three table-sized transfers a pass, counted on a deviceless
H100 compile; ``benchmarks/ag_pass_bytes.py``). This kernel reads each row block
of the table once: a program takes ``BLOCK_ROWS`` rows and walks their columns in
tiles of ``BLOCK_COLS``, adding each tile's cells to its rows' sums (in registers)
and writing the tile's weighted column sums to its own row of a partial table
float32[blocks, V]; XLA sums the partials. That costs 2 / ``BLOCK_ROWS`` of a table
read more, and makes local rows / ``BLOCK_ROWS`` programs: one for each of an H100's
132 SMs from about 2,100 local rows. Compiled for ``sm_90`` without a
GPU (the plan's targets) and tested in Pallas's interpreter on CPU; not yet run on
a GPU.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_ROWS = 16
BLOCK_COLS = 256


def _kernel(e_ref, u_ref, w_ref, weight_ref, row_ref, part_ref):
    n, v = e_ref.shape
    block = pl.program_id(0)
    rows = block * BLOCK_ROWS + jnp.arange(BLOCK_ROWS)
    row_ok = rows < n
    # Rows past the end: u = 1 and e = 0 make their cells 0 (never 0/0).
    u = plgpu.load(u_ref.at[rows], mask=row_ok, other=1.0)
    weight = plgpu.load(weight_ref.at[rows], mask=row_ok, other=0.0)

    def tile(j, row_sum):
        cols = j * BLOCK_COLS + jnp.arange(BLOCK_COLS)
        col_ok = cols < v
        w = plgpu.load(w_ref.at[cols], mask=col_ok, other=1.0)
        e = plgpu.load(e_ref.at[rows[:, None], cols[None, :]], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                       eviction_policy="evict_first")
        x = e / (u[:, None] + w[None, :])
        plgpu.store(part_ref.at[block, cols], (weight[:, None] * x).sum(axis=0), mask=col_ok)
        return row_sum + x.sum(axis=1)

    row_sum = lax.fori_loop(0, pl.cdiv(v, BLOCK_COLS), tile, jnp.zeros(BLOCK_ROWS, jnp.float32))
    plgpu.store(row_ref.at[rows], row_sum, mask=row_ok)


def _typed_like(e: jax.Array, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """float32 of ``shape``, varying over shard_map's devices as ``e`` is (pallas_call
    takes that from its out_shape alone; jax 0.10 names the field ``manual_axis_type``,
    other versions ``vma``)."""
    aval = jax.typeof(e)
    fields = inspect.signature(jax.ShapeDtypeStruct).parameters
    if "manual_axis_type" in fields:
        return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=aval.mat)
    return jax.ShapeDtypeStruct(shape, jnp.float32, vma=aval.vma)


def pass_sums(e: jax.Array, u: jax.Array, w: jax.Array, weight: jax.Array, *,
              interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(row sums float32[n], weighted column sums float32[V]) of the cells
    ``x[a, b] = e[a, b] / (u[a] + w[b])``: ``x.sum(1)`` and ``(weight[:, None] * x).sum(0)``,
    in one read of e. e: float32[n, V]; u, weight: float32[n]; w: float32[V].
    ``interpret`` runs the kernel in Pallas's interpreter (any platform: the tests).
    """
    n, v = e.shape
    blocks = pl.cdiv(n, BLOCK_ROWS)
    out = (_typed_like(e, (n,)), _typed_like(e, (blocks, v)))
    row_sum, partials = pl.pallas_call(
        _kernel, out_shape=out, grid=(blocks,), interpret=interpret, name="jaxjoint_ag_pass",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
    )(e, u, w, weight)
    return row_sum, partials.sum(axis=0)
