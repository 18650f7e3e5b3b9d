"""Published facts about the chips a plan can target, read from ``hardware/*.json``.

One file per chip: memory, HBM bandwidth, the dense matmul rate of each arithmetic
a product can compile to on it (``jaxjoint.models.precision.ARITHMETIC``: ``f32``,
``tf32``, ``tf32_x3``, ``bf16`` on NVIDIA GPUs; ``bf16``, ``bf16_x3``, ``bf16_x6`` on
TPUs; multi-pass rates are the one-pass rate over the passes), for NVIDIA GPUs the
device description XLA compiles against, and the sources of every number.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

HARDWARE_DIR = Path(__file__).parent / "hardware"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (one JAX device).

    key: the name used in TARGET (``h100``, ``v5e``, ...); platform: ``gpu``, ``tpu``
    or ``cpu``; device_kind: what ``jax.Device.device_kind`` reports for it.
    memory_bytes: the chip's memory; usable_memory_bytes: what one program may use
    (TPU: what the compiler accepts; GPU: set by the target from JAX's allocator
    fraction). Peaks and bandwidth are None when unknown (a local CPU).
    peak_flop_per_s: dense FLOP/s by arithmetic (``f32``, ``tf32``, ``tf32_x3``, ``bf16``,
    ``bf16_x3``, ``bf16_x6``); peak_sources: where each rate comes from.
    """

    key: str
    platform: str
    name: str
    device_kind: str
    memory_bytes: int | None
    usable_memory_bytes: int | None
    hbm_bandwidth_bytes_per_s: float | None
    peak_flop_per_s: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    target_config: dict[str, Any] | None = dataclasses.field(default=None, compare=False)
    topology_version: str | None = None
    chip_config_name: str | None = None
    sources: tuple[str, ...] = ()
    notes: str = ""


@functools.cache
def chips() -> dict[str, Chip]:
    """Every chip described in ``hardware/``, by key."""
    out = {}
    for path in sorted(HARDWARE_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        out[raw["key"]] = Chip(
            key=raw["key"],
            platform=raw["platform"],
            name=raw["name"],
            device_kind=raw["device_kind"],
            memory_bytes=raw["memory_bytes"],
            usable_memory_bytes=raw.get("usable_memory_bytes"),
            hbm_bandwidth_bytes_per_s=raw["hbm_bandwidth_bytes_per_s"],
            peak_flop_per_s=dict(raw["peak_flop_per_s"]),
            peak_sources=dict(raw["peak_sources"]),
            target_config=raw.get("target_config"),
            topology_version=raw.get("topology_version"),
            chip_config_name=raw.get("chip_config_name"),
            sources=tuple(raw["sources"]),
            notes=raw.get("notes", ""),
        )
    return out


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The described chip whose ``device_kind`` matches a real device's, if any."""
    for chip in chips().values():
        if chip.device_kind == device_kind:
            return chip
    return None


def gpu_target_config_text(chip: Chip) -> str:
    """The chip's ``stream_executor.GpuTargetConfigProto`` in protobuf text form,
    which XLA's GPU compiler takes in place of a device it can query."""
    config = chip.target_config
    if config is None:
        raise ValueError(f"{chip.key} has no GPU target description")
    return _text_proto({**config, "platform_name": "CUDA"})


def _text_proto(message: dict[str, Any], indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for field, value in message.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{field} {{\n{_text_proto(value, indent + 1)}{pad}}}\n")
        elif isinstance(value, str):
            lines.append(f'{pad}{field}: "{value}"\n')
        else:
            lines.append(f"{pad}{field}: {value}\n")
    return "".join(lines)
