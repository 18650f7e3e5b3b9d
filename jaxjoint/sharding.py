"""Device meshes and partition specs for the vocabulary axis: every choice of mesh is made here.

Every V-sized batch of forward passes and every V x V table is split over one
mesh axis, ``VOCAB_AXIS``. Parameters are replicated. JAX requires a sharded
dimension to divide evenly, so the vocabulary axis is padded up to a multiple
of 8 rows per device (``padded_size``) and the tail is masked by the consumer.

Which devices a mesh spans:

- ``make_mesh(devices)``: exactly the devices given (default: all local devices);
- ``local_mesh(count)``: the first ``count`` devices of this process, the mesh of a
  one-process run (``--devices``); ``local_mesh(1)`` is the library's default
  when a caller passes no mesh;
- ``global_mesh(per_process)``: the same number of devices from every process,
  the mesh of ``--distributed global``.

What a mesh's devices may hold: ``device_memory_limit``, ``mesh_memory_limit``.

And which backend JAX starts (``use_only_cpu_backend``, ``use_cpu_when_no_accelerator``):
with the CUDA plugin and libtpu installed for ``jaxjoint plan``, JAX probes for both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxjoint.errors import UserError

VOCAB_AXIS = "vocab"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``VOCAB_AXIS`` over ``devices`` (default: all local devices)."""
    if devices is None:
        devices = jax.local_devices()
    return Mesh(np.asarray(devices), (VOCAB_AXIS,))


def local_mesh(count: int | None = None) -> Mesh:
    """A mesh over the first ``count`` local devices (all when None).

    Raises ``UserError`` when this process has fewer than ``count`` devices.
    """
    available = jax.local_devices()
    if count is not None and count > len(available):
        raise UserError(f"asked for {count} devices; this host has {len(available)}")
    return make_mesh(available if count is None else available[:count])


def global_mesh(devices_per_process: int | None = None) -> Mesh:
    """A mesh over the first ``devices_per_process`` devices of every process (all
    when None; the smallest process bounds the count), the same on every process."""
    by_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    fewest = min(len(ds) for ds in by_process.values())
    if devices_per_process is not None and devices_per_process > fewest:
        raise UserError(f"asked for {devices_per_process} devices per process; the smallest process has {fewest}")
    n = devices_per_process or fewest
    return make_mesh([d for p in sorted(by_process) for d in by_process[p][:n]])


def mesh_size(mesh: Mesh | None) -> int:
    """Number of devices along the vocabulary axis (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[VOCAB_AXIS]


# Rows per device are a multiple of this: the TPU compiler lays arrays out in tiles
# of 8 rows and compiles the run's programs 50-90x slower on a ragged row count
# (bert-base's V = 28,996 over 4 chips: 7,249 rows a chip, 52 s for the assembly
# and 300 s for a metrics program, against 0.9 s and 3.5 s at 7,248).
ROW_MULTIPLE = 8


def padded_size(n: int, mesh: Mesh | None) -> int:
    """``n`` rounded up to a multiple of 8 rows per device (``ROW_MULTIPLE``) on
    ``mesh`` (one device when None): ``ceil(n / 8k) * 8k`` for k devices."""
    step = ROW_MULTIPLE * mesh_size(mesh)
    return math.ceil(n / step) * step


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``VOCAB_AXIS``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(VOCAB_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def device_memory_limit(device: jax.Device) -> int | None:
    """The bytes ``device``'s allocator may hold (``memory_stats()["bytes_limit"]``;
    on a GPU, 75% of its memory unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says
    otherwise), or None where the device reports none (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats.get("bytes_limit") if stats else None


def mesh_memory_limit(mesh: Mesh) -> int | None:
    """``device_memory_limit`` of this process's first device of ``mesh`` (only a
    process's own devices report their memory)."""
    return device_memory_limit(next(d for d in mesh.devices.flat if d.process_index == jax.process_index()))


# --- which backend JAX starts ------------------------------------------------------------


def use_only_cpu_backend() -> None:
    """Start JAX with its CPU backend only, unless something already chose.

    Deviceless targets need no accelerator backend: the CUDA plugin then registers
    without looking for cuDNN (which it otherwise requires before it offers the
    GPU topology), and libtpu does not probe for a TPU that is not there. Has no
    effect once JAX's backends are running or when ``JAX_PLATFORMS`` is set.
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or os.environ.get("JAX_PLATFORMS"):
        return
    if jax.config.jax_platforms in (None, ""):
        jax.config.update("jax_platforms", "cpu")


def use_cpu_when_no_accelerator() -> None:
    """Start JAX on its CPU backend alone when this machine shows no NVIDIA GPU and
    no TPU chip and nothing chose the platforms (``JAX_PLATFORMS`` unset).

    For commands that run on local devices: with JAX's CUDA plugin and libtpu
    installed (``plan`` needs them), JAX otherwise probes for both at start-up and
    prints a cuDNN traceback and libtpu warnings to stderr. Call before JAX starts
    its backends; later it has no effect.
    """
    from jax._src import hardware_utils, xla_bridge

    if xla_bridge.backends_are_initialized() or os.environ.get("JAX_PLATFORMS"):
        return
    if jax.config.jax_platforms not in (None, ""):
        return
    tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    if tpu_chips == 0 and not hardware_utils.has_visible_nvidia_gpu():
        jax.config.update("jax_platforms", "cpu")
