"""Device mesh and partition specs for the vocabulary axis.

Every V-sized batch of forward passes and every V x V table is split over one
mesh axis, ``VOCAB_AXIS``. Parameters are replicated. JAX requires a sharded
dimension to divide evenly, so the vocabulary axis is padded up to a multiple
of the mesh size (``padded_size``) and the tail is masked by the consumer.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

VOCAB_AXIS = "vocab"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``VOCAB_AXIS`` over ``devices`` (default: all local devices)."""
    if devices is None:
        devices = jax.local_devices()
    return Mesh(np.asarray(devices), (VOCAB_AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    """Number of devices along the vocabulary axis (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[VOCAB_AXIS]


def padded_size(n: int, mesh: Mesh | None) -> int:
    """``n`` rounded up to a multiple of the mesh size."""
    k = mesh_size(mesh)
    return math.ceil(n / k) * k


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``VOCAB_AXIS``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(VOCAB_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())
