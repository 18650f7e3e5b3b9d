"""Token ids and positions given to the public API, checked whatever their type.

Python ints, NumPy values and concrete JAX arrays are read on the host (a JAX
array's min and max: two scalars, not the array) and an id outside its range is
one ``UserError`` line. Under ``jax.jit`` or ``jax.vmap`` ids are abstract and
cannot be read: the callers then mark results of invalid ids NaN with ``valid``
(no other token's value, no finite number).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxjoint.errors import UserError


def is_traced(value: Any) -> bool:
    """Whether ``value`` (or any leaf of it) is abstract: inside jit, vmap or grad."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def bounds(values: Any, what: str) -> tuple[int, int] | None:
    """(min, max) of concrete integer ``values`` (None when empty, or when traced).

    Raises ``UserError`` for non-integer values (a float id would be truncated).
    """
    if is_traced(values):
        return None
    if isinstance(values, jax.Array):
        if not jnp.issubdtype(values.dtype, jnp.integer):
            raise UserError(f"{what} must be integers; got a {values.dtype} array")
        if values.size == 0:
            return None
        low, high = jax.device_get((jnp.min(values), jnp.max(values)))
        return int(low), int(high)
    array = np.asarray(values)
    if array.dtype == object or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{what} must be integers; got {_describe(values, array)}")
    if array.size == 0:
        return None
    return int(array.min()), int(array.max())


def check_range(values: Any, upper: int, what: str) -> None:
    """``UserError`` unless every concrete integer in ``values`` is in [0, upper);
    abstract (traced) values pass unchecked (see ``valid``). ``what``: the values'
    name, a parenthesised detail after it is moved to the end of the message."""
    span = bounds(values, what)
    if span is not None and (span[0] < 0 or span[1] >= upper):
        got = span[0] if span[0] < 0 else span[1]  # an offending value
        name, _, detail = what.partition(" (")
        raise UserError(f"{name} must be in [0, {upper}); got {got}" + (f" ({detail}" if detail else ""))


def valid(values: jax.Array, upper: int) -> jax.Array:
    """bool, ``values``' shape: True where 0 <= values < upper (traceable)."""
    return (values >= 0) & (values < upper)


def safe(values: jax.Array, upper: int) -> jax.Array:
    """``values`` with invalid entries replaced by 0, for a gather whose result is
    then masked with ``valid`` (JAX would wrap negatives round and clamp the rest)."""
    return jnp.where(valid(values, upper), values, 0)


def _describe(values: Any, array: np.ndarray) -> str:
    if array.ndim == 0:
        return repr(values.item() if hasattr(values, "item") else values)
    return f"an array of {array.dtype}"
