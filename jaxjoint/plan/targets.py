"""TARGET strings, and the devices (real or deviceless) a plan compiles for.

``h100``, ``h200``, ``a100``, ``b200`` with an optional ``xN`` device count
(``h100x8``; more than 8 means hosts of 8), a TPU topology as libtpu names it
(``v5e:2x2``, ``v5p:2x2x1``, ``v6e:2x4``, ``v4:2x2x1``), or ``local``: this
process's own devices. GPU and TPU targets need no accelerator: JAX's CUDA plugin
and libtpu build compile-only devices from a description of the hardware.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile

import jax
from jax.sharding import Mesh

from jaxjoint import sharding
from jaxjoint.errors import UserError
from jaxjoint.plan.hardware import Chip, chip_for_device_kind, chips, gpu_target_config_text
from jaxjoint.sharding import local_mesh, make_mesh, use_only_cpu_backend

GPUS_PER_HOST = 8
# JAX's GPU allocator takes this fraction of device memory unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
DEFAULT_GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved TARGET: its chip, its devices and how much memory a run may use.

    name: the TARGET string; devices: the JAX devices (compile-only for GPU and TPU
    targets); hosts: how many hosts they span; usable_bytes_per_device: what the
    programs of a run may hold at once on one device; memory_note: where that
    number comes from.
    """

    name: str
    chip: Chip
    devices: tuple
    hosts: int
    usable_bytes_per_device: int | None
    memory_note: str

    @property
    def device_count(self) -> int:
        return len(self.devices)

    @property
    def deviceless(self) -> bool:
        return self.name != "local"

    def mesh(self) -> Mesh:
        """A 1-D ``VOCAB_AXIS`` mesh over every device of the target."""
        return make_mesh(list(self.devices))


def gpu_memory_fraction() -> float:
    """The fraction of GPU memory JAX's allocator will use (``XLA_PYTHON_CLIENT_MEM_FRACTION``)."""
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if raw is None:
        return DEFAULT_GPU_MEMORY_FRACTION
    try:
        fraction = float(raw)
    except ValueError:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a number") from None
    return fraction


_GPU = re.compile(r"^([a-z]\d+)(?:x(\d+))?$")


def resolve_target(name: str) -> Target:
    """Parse ``name`` and build its devices. Raises ``UserError`` for an unknown
    target or a topology the installed JAX plugins cannot build."""
    name = name.strip().lower()
    if name == "local":
        return _local_target()
    match = _GPU.match(name)
    if match and match.group(1) in chips() and chips()[match.group(1)].platform == "gpu":
        count = int(match.group(2) or 1)
        return _gpu_target(name, chips()[match.group(1)], count)
    version = re.split(r"[:\-]", name, maxsplit=1)[0]
    if version in chips() and chips()[version].platform == "tpu" and version != name:
        return _tpu_target(name, chips()[version])
    gpus = ", ".join(k for k, c in chips().items() if c.platform == "gpu")
    tpus = ", ".join(k for k, c in chips().items() if c.platform == "tpu")
    raise UserError(
        f"unknown target {name!r}; give local, a GPU ({gpus}, optionally xN devices: h100x8) "
        f"or a TPU topology ({tpus} with a shape: v5e:2x2, v5p:2x2x1)")


def _gpu_target(name: str, chip: Chip, count: int) -> Target:
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise UserError(f"target {name}: give 1 to {GPUS_PER_HOST} GPUs, or a multiple of {GPUS_PER_HOST} (hosts of 8)")
    hosts = max(1, count // GPUS_PER_HOST)
    per_host = count // hosts
    use_only_cpu_backend()
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name="", target_config=gpu_target_config_text(chip),
            topology=f"1x{hosts}x{per_host}")
    except (NotImplementedError, RuntimeError) as err:
        raise UserError(
            f"cannot build the {chip.key} target ({_first_line(err)}): GPU targets need JAX's CUDA "
            "plugin (jax-cuda13-plugin, jax-cuda13-pjrt) and ptxas (nvidia-cuda-nvcc), and JAX started "
            "with JAX_PLATFORMS=cpu on a machine without a GPU") from None
    fraction = gpu_memory_fraction()
    usable = int(chip.memory_bytes * fraction)
    note = (f"{fraction:.0%} of {chip.memory_bytes / 2**30:.1f} GiB "
            "(JAX's GPU allocator; XLA_PYTHON_CLIENT_MEM_FRACTION)")
    chip = dataclasses.replace(chip, usable_memory_bytes=usable)
    return Target(name, chip, tuple(topology.devices), hosts, usable, note)


def _tpu_target(name: str, chip: Chip) -> Target:
    shape = re.split(r"[:\-]", name, maxsplit=1)[1]
    kwargs = {}
    if chip.chip_config_name:
        kwargs["chip_config_name"] = chip.chip_config_name
    dims = [int(d) for d in shape.split("x")] if re.fullmatch(r"\d+(x\d+)*", shape) else None
    if dims is not None and math.prod(dims) == 1:
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    use_only_cpu_backend()
    # libtpu takes a lock file so that one process owns the TPU; compile-only
    # devices own nothing, and plans in parallel processes (tests) must not fail.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with quiet_stderr():
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=f"{chip.topology_version}:{shape}" if dims else name, **kwargs)
    except Exception as err:  # libtpu raises plain RuntimeErrors and XlaRuntimeErrors
        raise UserError(f"cannot build the TPU topology {name!r} ({_first_line(err)}); "
                        "shapes look like v5e:2x2, v5p:2x2x1, v6e:2x4, v4:2x2x1, and need libtpu "
                        "(pip install 'jax[tpu]')") from None
    devices = tuple(topology.devices)
    hosts = len({d.process_index for d in devices})
    note = (f"what the TPU compiler accepts per chip ({chip.usable_memory_bytes / 2**30:.2f} GiB "
            f"of {chip.memory_bytes / 2**30:.0f} GiB)")
    return Target(name, chip, devices, hosts, chip.usable_memory_bytes, note)


def _local_target() -> Target:
    return target_for_devices(local_mesh().devices.flat)  # the devices a run with no --devices takes


def target_for_devices(devices, *, usable_bytes: int | None = None) -> Target:
    """A ``local`` target over real ``devices`` (a run's mesh: ``mesh.devices.flat``),
    with ``usable_bytes`` per device, by default the memory limit this process's
    first device reports (``sharding.device_memory_limit``; the host's memory for a
    CPU, which reports none)."""
    devices = tuple(devices)
    device = next((d for d in devices if d.process_index == jax.process_index()), devices[0])
    limit = usable_bytes if usable_bytes is not None else sharding.device_memory_limit(device)
    reported = limit is not None
    if limit is None and device.platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # host memory
    known = chip_for_device_kind(device.device_kind)
    if known is not None:
        chip = dataclasses.replace(known, usable_memory_bytes=limit or known.usable_memory_bytes)
    else:
        chip = Chip(key=device.platform, platform=device.platform, name=device.device_kind,
                    device_kind=device.device_kind, memory_bytes=limit, usable_memory_bytes=limit,
                    hbm_bandwidth_bytes_per_s=None)
    note = ("the smallest limit of the run's processes" if usable_bytes is not None else
            "the device's own limit (memory_stats bytes_limit)" if reported else
            "the host's memory" if device.platform == "cpu" else "no limit reported by the device")
    hosts = len({d.process_index for d in devices})
    return Target("local", chip, devices, hosts, limit, note)


@contextlib.contextmanager
def quiet_stderr():
    """Drop what native code writes to file descriptor 2 meanwhile: libtpu's
    start-up warnings about TPU_ACCELERATOR_TYPE and worker hostnames, which mean
    nothing without a TPU, and XLA's log lines while compiling (errors still
    arrive as exceptions)."""
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


